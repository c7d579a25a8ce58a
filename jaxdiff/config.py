"""Validated batch-job configs (TOML or YAML) and the builders that turn them into objects.

A config file has the sections ``[data]``, ``[model]``, ``[schedule]``, ``[optim]``, ``[train]``,
``[sample]`` and ``[run]`` (schema: the dataclasses below; every field has a type hint and a
default unless required). :func:`load_config` parses ``.toml`` with :mod:`tomllib` and
``.yaml``/``.yml`` with ``yaml.safe_load`` and validates every key: an unknown key raises
:class:`~jaxdiff._checks.JaxdiffError` naming its full path (``model.hiden``) and the nearest
valid key (:mod:`difflib`); a wrong type or enum value names the path, the value and what was
expected; a missing required key names its path.

Builders: :func:`build_data`, :func:`build_model`, :func:`build_schedule`,
:func:`build_optimizer`, :func:`build_sampler`. The image models (``unet``, ``dit``) and the
digits data are imported lazily inside the builders.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import field
from typing import Any, Literal

import numpy as np

from jaxdiff._errors import JaxdiffError, fail

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "ScheduleConfig",
    "OptimConfig",
    "TrainConfig",
    "SampleConfig",
    "RunConfig",
    "DataBundle",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "checkpoint_fingerprint",
    "build_data",
    "build_model",
    "build_schedule",
    "build_optimizer",
    "build_lr_schedule",
    "build_sampler",
]

DataName = Literal[
    "digits", "two_moons", "checkerboard", "swiss_roll", "ring_mixture", "gp_sequence"
]
SamplerName = Literal[
    "ddim", "ddpm", "dpm_solver", "dpm_solver_pp", "unipc", "deis", "heun", "euler", "pf_ode"
]


@dataclasses.dataclass
class DataConfig:
    """``[data]``: the training set.

    ``name``: ``digits`` (scikit-learn's 8x8 digits, ``(N, 8, 8, 1)`` in ``[-1, 1]``, labels
    0-9), ``two_moons`` / ``checkerboard`` / ``swiss_roll`` (2-D toys; ``two_moons`` has 2
    labels), ``ring_mixture`` (8 Gaussians on a ring, labels = component), ``gp_sequence``
    (Gaussian-process sequences of ``length``). Toy sets draw ``num_examples`` points once from
    ``seed`` (a fixed set, so the data position is the step). ``conditional``: train on class
    labels (enables classifier-free guidance with ``train.cond_drop_prob``)."""

    name: DataName
    batch_size: int = 256
    num_examples: int = 20000
    conditional: bool = False
    seed: int = 0
    noise: float | None = None
    split: Literal["train", "test", "all"] = "train"
    length: int = 32


@dataclasses.dataclass
class ModelConfig:
    """``[model]``: the network. ``kind`` ``mlp`` (:class:`~jaxdiff.models.MLPScoreNet`: any
    data), ``unet`` (images ``(H, W, C)``) or ``dit`` (images or sequences). ``dtype`` is the
    compute dtype (params stay float32). Fields that a kind does not use are ignored."""

    kind: Literal["mlp", "unet", "dit"] = "mlp"
    parametrization: Literal["edm", "eps", "x0", "v", "score", "velocity"] = "edm"
    sigma_data: float = 1.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    hidden: int = 128
    depth: int = 3
    time_embedding: Literal["fourier", "sinusoidal"] | None = None
    embed_dim: int | None = None
    channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (1,)
    num_heads: int = 4
    groups: int = 8
    patch_size: int = 2
    mlp_ratio: float = 4.0


@dataclasses.dataclass
class ScheduleConfig:
    """``[schedule]``: ``kind`` names a factory in :mod:`jaxdiff.schedules`; ``options`` are its
    keyword arguments (e.g. ``{beta_max = 20.0}``)."""

    kind: Literal["vp_linear", "vp_cosine", "ve", "edm", "flow"] = "vp_linear"
    options: dict = field(default_factory=dict)


@dataclasses.dataclass
class OptimConfig:
    """``[optim]``: AdamW with ``weight_decay``, global-norm clipping at ``grad_clip`` (None:
    off), linear warmup over ``warmup`` steps, then ``decay`` (``constant``, ``cosine`` or
    ``linear`` down to ``lr * end_factor`` at ``decay_steps``, default ``train.steps``); EMA of
    the params with ``ema_decay``."""

    lr: float = 2e-3
    warmup: int = 0
    decay: Literal["constant", "cosine", "linear"] = "constant"
    decay_steps: int | None = None
    end_factor: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    ema_decay: float = 0.999
    ema_warmup: bool = True


@dataclasses.dataclass
class TrainConfig:
    """``[train]``: ``steps`` (required) in total; a history row / metrics line every
    ``log_every`` steps; a checkpoint every ``checkpoint_every`` (default ``log_every``), the
    last ``keep`` kept; a sample grid every ``sample_every`` steps (a multiple of
    ``log_every``; None: only at the end); label dropout ``cond_drop_prob`` for CFG."""

    steps: int
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int | None = None
    keep: int = 3
    sample_every: int | None = None
    cond_drop_prob: float = 0.0


@dataclasses.dataclass
class SampleConfig:
    """``[sample]``: ``sampler`` names a factory in :mod:`jaxdiff.samplers` (``options`` its
    keyword arguments), ``steps`` solver steps, ``num`` samples, classifier-free
    ``guidance_scale`` (1: plain conditional), ``class`` (a label for every sample; default:
    labels cycle through the classes), ``seed``."""

    sampler: SamplerName = "dpm_solver_pp"
    options: dict = field(default_factory=dict)
    steps: int = 20
    num: int = 64
    guidance_scale: float = 1.0
    label: int | None = field(default=None, metadata={"key": "class"})
    seed: int = 0


@dataclasses.dataclass
class RunConfig:
    """``[run]``: ``out_dir`` (checkpoints, metrics.jsonl, sample grids) and ``devices``
    (``"all"`` or a count; more than one trains data-parallel on a mesh axis ``"data"``)."""

    out_dir: str = "runs/jaxdiff"
    devices: int | Literal["all"] = 1


@dataclasses.dataclass
class Config:
    """A whole batch job: one field per section (``data`` and ``train`` are required)."""

    data: DataConfig
    train: TrainConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------
def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if tp is dict or origin is dict:
        return "a table/mapping"
    if origin is tuple:
        return "a list of integers"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return "a table/mapping"
    return str(tp)


_NO = object()


def _coerce(tp, value, path: str):
    """``value`` converted to ``tp``, or ``_NO`` if it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is int:
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return float(value)
            except ValueError:
                return _NO
        return _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is dict or origin is dict:
        return dict(value) if isinstance(value, dict) else _NO
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return _NO
        out = [_coerce(args[0], v, path) for v in value]
        return _NO if any(o is _NO for o in out) else tuple(out)
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in args) else _NO
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else _NO
        for a in args:
            if a is type(None):
                continue
            out = _coerce(a, value, path)
            if out is not _NO:
                return out
        return _NO
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            return _NO
        return _from_dict(tp, value, path)
    raise TypeError(f"unsupported schema type {tp}")  # pragma: no cover


def _choices(tp) -> list[str]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return [str(a) for a in args]
    if origin in (typing.Union, types.UnionType):
        return [c for a in args for c in _choices(a)]
    return []


def _from_dict(cls, d: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {_key(f): f for f in dataclasses.fields(cls)}
    for k in d:
        if k not in fields:
            path = f"{prefix}{k}"
            near = difflib.get_close_matches(str(k), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{near[0]}?" if near else ""
            raise JaxdiffError(
                f"unknown config key {path}{hint} (valid keys in "
                f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)})"
            )
    kwargs = {}
    for k, f in fields.items():
        path = f"{prefix}{k}"
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if k not in d:
            if required:
                raise JaxdiffError(
                    f"missing required config key {path} (expected {_describe(hints[f.name])})"
                )
            continue
        value = _coerce(hints[f.name], d[k], path + ".")
        if value is _NO:
            choices = _choices(hints[f.name])
            near = difflib.get_close_matches(str(d[k]), choices, n=1, cutoff=0.5)
            extra = f" (did you mean {near[0]!r}?)" if near else ""
            fail(path, d[k], _describe(hints[f.name]) + extra)
        kwargs[f.name] = value
    return cls(**kwargs)


def _check_semantics(cfg: Config) -> Config:
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.num_examples": cfg.data.num_examples,
        "data.length": cfg.data.length,
        "train.steps": cfg.train.steps,
        "train.log_every": cfg.train.log_every,
        "train.keep": cfg.train.keep,
        "sample.steps": cfg.sample.steps,
        "sample.num": cfg.sample.num,
        "model.hidden": cfg.model.hidden,
        "model.channels": cfg.model.channels,
    }
    for name in ("train.checkpoint_every", "train.sample_every", "optim.decay_steps"):
        sec, key = name.split(".")
        v = getattr(getattr(cfg, sec), key)
        if v is not None:
            positive[name] = v
    for name, v in positive.items():
        if v < 1:
            fail(name, v, "an integer >= 1")
    if cfg.train.sample_every is not None and cfg.train.sample_every % cfg.train.log_every:
        fail(
            "train.sample_every",
            cfg.train.sample_every,
            f"a multiple of train.log_every={cfg.train.log_every}",
        )
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        fail("optim.ema_decay", cfg.optim.ema_decay, "a number in [0, 1)")
    if not cfg.model.sigma_data > 0:
        fail("model.sigma_data", cfg.model.sigma_data, "a positive number (the data std)")
    if cfg.optim.lr <= 0:
        fail("optim.lr", cfg.optim.lr, "a positive number")
    if cfg.optim.warmup < 0:
        fail("optim.warmup", cfg.optim.warmup, "an integer >= 0")
    if cfg.optim.grad_clip is not None and cfg.optim.grad_clip <= 0:
        fail("optim.grad_clip", cfg.optim.grad_clip, "a positive number or null")
    if not 0.0 <= cfg.train.cond_drop_prob < 1.0:
        fail("train.cond_drop_prob", cfg.train.cond_drop_prob, "a probability in [0, 1)")
    labeled = ("digits", "two_moons", "ring_mixture")
    if cfg.data.conditional and cfg.data.name not in labeled:
        fail("data.conditional", True, f"false for {cfg.data.name} (labels exist for {labeled})")
    if not cfg.data.conditional:
        if cfg.train.cond_drop_prob > 0:
            fail("train.cond_drop_prob", cfg.train.cond_drop_prob, "0 unless data.conditional")
        if cfg.sample.guidance_scale != 1.0:
            fail("sample.guidance_scale", cfg.sample.guidance_scale, "1 unless data.conditional")
        if cfg.sample.label is not None:
            fail("sample.class", cfg.sample.label, "unset unless data.conditional")
    if cfg.model.kind == "unet" and cfg.data.name != "digits":
        fail("model.kind", "unet", f"mlp or dit for {cfg.data.name} (the UNet takes images)")
    if isinstance(cfg.run.devices, int) and cfg.run.devices < 1:
        fail("run.devices", cfg.run.devices, "'all' or an integer >= 1")
    return cfg


def config_from_dict(d: dict) -> Config:
    """Validate a nested dict (the parsed file) into a :class:`Config`.

    Raises:
      JaxdiffError: unknown key (full path + nearest valid key), wrong type or enum value (path,
        value, expected), missing required key, or an inconsistent setting.
    """
    if not isinstance(d, dict):
        fail("config", d, "a mapping with sections data, model, schedule, optim, train, ...")
    return _check_semantics(_from_dict(Config, d))


def config_to_dict(cfg: Config) -> dict:
    """The config as a plain nested dict (file key names, tuples as lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        sec = getattr(cfg, f.name)
        out[f.name] = {
            _key(g): (list(v) if isinstance(v, tuple) else v)
            for g in dataclasses.fields(sec)
            for v in [getattr(sec, g.name)]
        }
    return out


def load_config(path, overrides: dict | None = None) -> Config:
    """Read a ``.toml`` (tomllib) or ``.yaml``/``.yml`` (``yaml.safe_load``) file and validate it.

    Args:
      path: the file.
      overrides: optional ``{"section.key": value}`` applied before validation (e.g. from the
        command line).
    Returns:
      a :class:`Config`.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".toml", ".yaml", ".yml"):
        fail("config", path, "a .toml, .yaml or .yml file")
    if not os.path.isfile(path):
        fail("config", path, "an existing file")
    try:
        if ext == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            with open(path, "rb") as f:
                d = tomllib.load(f)
        else:
            import yaml

            with open(path, encoding="utf-8") as f:
                d = yaml.safe_load(f)
    except Exception as e:  # a syntax error: report it with the file name
        raise JaxdiffError(f"config={path!r}: cannot parse it ({type(e).__name__}: {e})") from e
    d = {} if d is None else d
    for dotted, value in (overrides or {}).items():
        sec, key = dotted.split(".", 1)
        if not isinstance(d.get(sec, {}), dict):
            break  # validation reports it
        d.setdefault(sec, {})[key] = value
    return config_from_dict(d)


def checkpoint_fingerprint(cfg: Config) -> dict:
    """The settings that determine the model and its training (stored with every checkpoint and
    compared on resume): ``data``, ``model``, ``schedule``, ``optim``, ``train.seed`` and
    ``train.cond_drop_prob``. ``train.steps``, logging, checkpoint, sampling and run settings may
    change between restarts.

    A decaying learning rate without an explicit ``optim.decay_steps`` is defined over
    ``train.steps``, whatever its value (stored as ``"train.steps"``): extending a finished run
    with a larger ``train.steps`` continues from the saved optimizer state on the schedule of
    the new total (so the learning rate at the resumed step is that of the longer schedule)."""
    d = config_to_dict(cfg)
    optim = dict(d["optim"])
    if cfg.optim.decay == "constant":
        optim["decay_steps"] = None
    elif cfg.optim.decay_steps is None:
        optim["decay_steps"] = "train.steps"
    return {
        "data": d["data"],
        "model": d["model"],
        "schedule": d["schedule"],
        "optim": optim,
        "train": {"seed": cfg.train.seed, "cond_drop_prob": cfg.train.cond_drop_prob},
    }


# ------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DataBundle:
    """What :func:`build_data` returns.

    Attributes:
      train: the ``data`` argument of :func:`jaxdiff.train.train`: an array ``(N, *event)`` or a
        pair ``(x, labels)``.
      x_example: ``(1, *event)`` (for model initialisation).
      num_classes: number of labels when conditional, else None.
      kind: ``"image"`` (``(H, W, C)``), ``"points"`` (2-D) or ``"sequence"``.
      reference: a few real examples for plots (``(n, *event)``).
    """

    train: Any
    x_example: Any
    num_classes: int | None
    kind: str
    reference: Any = None


_NUM_CLASSES = {"digits": 10, "two_moons": 2, "ring_mixture": 8}


def num_classes(cfg: Config) -> int | None:
    """Number of class labels the model is conditioned on (None when unconditional)."""
    return _NUM_CLASSES[cfg.data.name] if cfg.data.conditional else None


def build_data(cfg: Config) -> DataBundle:
    """Build the training set of ``cfg.data`` (a fixed array drawn once from ``data.seed``)."""
    import jax
    import jax.numpy as jnp

    from jaxdiff import data as D

    c = cfg.data
    key = jax.random.fold_in(jax.random.PRNGKey(c.seed), 0)
    labels = None
    if c.name == "digits":
        x, labels = D.load_digits(split=c.split)
        x, labels = jnp.asarray(x), jnp.asarray(labels)
        kind = "image"
    elif c.name in ("two_moons", "checkerboard", "swiss_roll"):
        kw = {} if c.noise is None else {"noise": c.noise}
        if c.name == "two_moons":
            x, labels = D.two_moons(key, c.num_examples, return_labels=True, **kw)
        elif c.name == "checkerboard":
            if c.noise is not None:
                fail("data.noise", c.noise, "unset for checkerboard")
            x = D.checkerboard(key, c.num_examples)
        else:
            x = D.swiss_roll_2d(key, c.num_examples, **kw)
        kind = "points"
    elif c.name == "ring_mixture":  # 8 Gaussians on a circle of radius 2 (analytic.ring_mixture)
        k_c, k_x = jax.random.split(key)
        labels = jax.random.randint(k_c, (c.num_examples,), 0, 8)
        ang = 2.0 * np.pi * labels / 8.0
        centers = 2.0 * jnp.stack([jnp.cos(ang), jnp.sin(ang)], -1)
        std = 0.15 if c.noise is None else c.noise
        x = centers + std * jax.random.normal(k_x, (c.num_examples, 2))
        kind = "points"
    else:  # gp_sequence
        from jaxdiff import analytic

        if not hasattr(analytic, "gp_sequence"):
            fail("data.name", c.name, "a data set available in this jaxdiff (gp_sequence is not)")
        dist = analytic.gp_sequence(c.length)
        x = dist.sample(key, c.num_examples)
        if x.ndim == 2:
            x = x[..., None]
        kind = "sequence"
    x = jnp.asarray(x, jnp.float32)
    train_data = (x, jnp.asarray(labels, jnp.int32)) if c.conditional else x
    return DataBundle(
        train=train_data,
        x_example=x[:1],
        num_classes=num_classes(cfg),
        kind=kind,
        reference=x[: min(len(x), 2000)],
    )


def build_model(cfg: Config, key, x_example):
    """Build ``cfg.model`` and initialise it on ``x_example`` ``(1, *event)``.

    Returns:
      ``(model, params)`` from :func:`jaxdiff.models.as_denoiser`.
    """
    import jax.numpy as jnp

    from jaxdiff import models

    m = cfg.model
    k = num_classes(cfg)
    dtype = jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32
    common = {"num_classes": k, "dtype": dtype}
    if m.time_embedding is not None:
        common["time_embedding"] = m.time_embedding
    if m.embed_dim is not None:
        common["embed_dim"] = m.embed_dim
    if m.kind == "mlp":
        net = models.MLPScoreNet(hidden=m.hidden, depth=m.depth, **common)
    elif m.kind == "unet":
        net = models.UNet(
            channels=m.channels,
            channel_mults=tuple(m.channel_mults),
            num_res_blocks=m.num_res_blocks,
            attention_levels=tuple(m.attention_levels),
            num_heads=m.num_heads,
            groups=m.groups,
            **common,
        )
    else:
        net = models.DiT(
            hidden=m.hidden,
            depth=m.depth,
            num_heads=m.num_heads,
            patch_size=m.patch_size,
            mlp_ratio=m.mlp_ratio,
            **common,
        )
    cond_example = None if k is None else jnp.zeros(np.shape(x_example)[:1], jnp.int32)
    return models.as_denoiser(
        net,
        key,
        x_example,
        parametrization=m.parametrization,
        cond_example=cond_example,
        schedule=build_schedule(cfg),
        sigma_data=m.sigma_data,
    )


def build_schedule(cfg: Config):
    """``jaxdiff.schedules.<kind>(**options)``."""
    from jaxdiff import schedules

    try:
        return getattr(schedules, cfg.schedule.kind)(**cfg.schedule.options)
    except TypeError as e:
        raise JaxdiffError(f"schedule.options={cfg.schedule.options!r}: {e}") from e


def _decay_steps(cfg: Config) -> int:
    return cfg.optim.decay_steps if cfg.optim.decay_steps is not None else cfg.train.steps


def build_lr_schedule(cfg: Config):
    """The learning-rate schedule ``step -> lr`` of :class:`OptimConfig`: linear warmup from 0
    to ``lr`` over ``warmup`` steps, then ``constant``, ``cosine`` (Loshchilov & Hutter arXiv
    1608.03983) or ``linear`` decay to ``lr * end_factor`` at ``decay_steps``."""
    import optax

    o = cfg.optim
    total = _decay_steps(cfg)
    if o.decay == "constant":
        main = optax.constant_schedule(o.lr)
    elif o.decay == "cosine":
        main = optax.cosine_decay_schedule(o.lr, max(total - o.warmup, 1), alpha=o.end_factor)
    else:
        main = optax.linear_schedule(o.lr, o.lr * o.end_factor, max(total - o.warmup, 1))
    if o.warmup > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup), main], [o.warmup])
    return main


_OPTIMIZERS: dict = {}


def build_optimizer(cfg: Config):
    """AdamW (Loshchilov & Hutter arXiv 1711.05101) with global-norm clipping at ``grad_clip``
    and :func:`build_lr_schedule`.

    Equal settings return the same object (cached), so :func:`jaxdiff.train.train` reuses its
    compiled loop when a job is restarted in the same process."""
    import json

    import optax

    o = cfg.optim
    total = None if o.decay == "constant" else _decay_steps(cfg)
    key = json.dumps([dataclasses.asdict(o), total], sort_keys=True)
    if key not in _OPTIMIZERS:
        parts = [] if o.grad_clip is None else [optax.clip_by_global_norm(o.grad_clip)]
        parts.append(
            optax.adamw(build_lr_schedule(cfg), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
        )
        _OPTIMIZERS[key] = optax.chain(*parts)
    return _OPTIMIZERS[key]


def build_sampler(cfg: Config):
    """``jaxdiff.samplers.<sampler>(**options)``."""
    from jaxdiff import samplers

    try:
        return getattr(samplers, cfg.sample.sampler)(**cfg.sample.options)
    except TypeError as e:
        raise JaxdiffError(f"sample.options={cfg.sample.options!r}: {e}") from e
