"""Training: a pure optax train step with EMA, a fast chunked loop, and orbax checkpoints.

:func:`make_step` builds ``step(state, key, data) -> (state, metrics)`` (pure, jit-able; the batch
and the loss's randomness come from ``fold_in(key, state.step)``); :func:`train` / :func:`fit` run
it as jitted chunks (ending at every ``log_every`` and ``checkpoint_every`` step) with a progress
bar, optional preemption-safe checkpoints (:mod:`jaxdiff.checkpoint`: ``checkpoint_dir=``,
resumed automatically), data parallelism on a device mesh (``mesh=``) and a ``callback``;
:func:`save_checkpoint` / :func:`restore_checkpoint` write and read any pytree in the one format of
:mod:`jaxdiff.checkpoint`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxdiff._checks import NonFiniteError, check_positive_int, fail, is_concrete
from jaxdiff.denoiser import Denoiser
from jaxdiff.losses import dsm_loss
from jaxdiff.schedules import Schedule

__all__ = [
    "TrainState",
    "init",
    "make_step",
    "apply_gradients",
    "ema_decay_at",
    "draw_batch",
    "train",
    "fit",
    "save_checkpoint",
    "restore_checkpoint",
]


class TrainState(struct.PyTreeNode):
    """Training state, a pytree.

    Attributes:
      step: number of optimizer steps taken, int32 scalar.
      params: the model's parameters.
      opt_state: the optax optimizer state.
      ema_params: exponential moving average of ``params`` (None when ``ema_decay == 0``).
    """

    step: Any
    params: Any
    opt_state: Any
    ema_params: Any = None


def _check_decay(ema_decay) -> None:
    if is_concrete(ema_decay) and not 0.0 <= float(ema_decay) < 1.0:
        fail("ema_decay", ema_decay, "a number in [0, 1) (0 disables the EMA)")


def _no_ema(ema_decay) -> bool:
    return is_concrete(ema_decay) and float(ema_decay) == 0.0


def init(params, optimizer: optax.GradientTransformation, ema_decay=0.999) -> TrainState:
    """A fresh :class:`TrainState`: ``step = 0``, ``opt_state = optimizer.init(params)``, and
    ``ema_params = params`` (None when ``ema_decay == 0``)."""
    _check_decay(ema_decay)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=None if _no_ema(ema_decay) else params,
    )


def draw_batch(key, data, batch_size: int):
    """Draw a training batch ``(x, cond)`` (``cond`` is None for unconditional data).

    Args:
      key: PRNG key.
      data: an array ``(N, *event_shape)`` (rows drawn uniformly with replacement); a tuple
        ``(x, cond)`` of such arrays (``cond`` a pytree with leading axis ``N``, rows drawn with
        the same indices); or a function ``data(key, n)`` returning ``x`` or ``(x, cond)``.
      batch_size: number of examples ``n``.
    Returns:
      ``(x, cond)`` with leading axis ``batch_size``.
    """
    if callable(data):
        out = data(key, batch_size)
        return tuple(out) if isinstance(out, tuple | list) else (out, None)
    x, cond = data if isinstance(data, tuple | list) else (data, None)
    idx = jax.random.randint(key, (batch_size,), 0, jnp.shape(x)[0])
    take = lambda a: jnp.take(jnp.asarray(a), idx, axis=0)  # noqa: E731
    return take(x), (None if cond is None else jax.tree.map(take, cond))


def ema_decay_at(step, ema_decay, ema_warmup: bool = True):
    """The EMA decay used by the update after ``step`` optimizer steps.

    ``min(ema_decay, (1 + step) / (10 + step))`` with ``ema_warmup`` (the warm-up of
    TensorFlow's ``ExponentialMovingAverage(num_updates=...)``, also diffusers' ``EMAModel``
    default), else ``ema_decay``. With warm-up the average covers roughly the last ``step / 9``
    steps until that reaches ``1 / (1 - ema_decay)``, so a short run is not dominated by its
    initialisation (a plain 0.999 EMA after 1000 steps still holds ``0.999^1000 = 37%`` of
    the initial params).

    Args:
      step: the number of updates taken before this one (an int scalar, may be traced).
      ema_decay: the asymptotic decay in ``[0, 1)``.
    Returns:
      a float scalar.
    """
    d = jnp.asarray(ema_decay, jnp.result_type(float))
    if not ema_warmup:
        return d
    s = jnp.asarray(step).astype(d.dtype)
    return jnp.minimum(d, (1.0 + s) / (10.0 + s))


def apply_gradients(
    state: TrainState, grads, optimizer, ema_decay, ema_warmup: bool = True
) -> TrainState:
    """One optimizer update and EMA step: ``params <- apply_updates(params, optimizer.update(g))``,
    ``ema <- d ema + (1 - d) params`` with ``d = ema_decay_at(state.step, ema_decay,
    ema_warmup)`` (no EMA for a state without one), ``step <- step + 1``. Shared by
    :func:`make_step` and :func:`jaxdiff.parallel.make_pmap_step`."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if state.ema_params is None:
        if not _no_ema(ema_decay):
            fail("ema_decay", ema_decay, "0 for a state made by init(..., ema_decay=0)")
        ema = None
    else:
        d = ema_decay_at(state.step, ema_decay, ema_warmup)
        ema = jax.tree.map(
            lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state.ema_params, params
        )
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def make_step(
    model: Denoiser,
    schedule: Schedule,
    optimizer: optax.GradientTransformation,
    *,
    ema_decay=0.999,
    ema_warmup: bool = True,
    loss_fn: Callable = dsm_loss,
    batch_size: int,
    batch_sharding=None,
    **loss_kwargs,
) -> Callable:
    """Build a pure, jit-able train step ``step(state, key, data) -> (state, metrics)``.

    Per call: ``k = fold_in(key, state.step)``; a batch is drawn with :func:`draw_batch`;
    ``loss, g = value_and_grad(loss_fn)(params, k', model, schedule, x, cond, **loss_kwargs)``;
    ``params <- optax.apply_updates(params, optimizer.update(g, opt_state, params))``; and the EMA
    ``ema <- d ema + (1 - d) params`` (Polyak averaging as in Ho et al. arXiv 2006.11239, Song
    et al. arXiv 2011.13456) with ``d = ema_decay_at(step, ema_decay, ema_warmup)``.

    Args:
      model, schedule: passed to ``loss_fn``.
      optimizer: an optax gradient transformation.
      ema_decay: EMA decay ``d`` in ``[0, 1)``; may be traced; 0 with a state made by
        ``init(..., ema_decay=0)`` keeps no EMA.
      ema_warmup: use ``min(d, (1 + step) / (10 + step))`` (:func:`ema_decay_at`).
      loss_fn: ``loss_fn(params, key, model, schedule, x0, cond, **loss_kwargs) -> scalar``
        (default :func:`jaxdiff.losses.dsm_loss`).
      batch_size: examples per step.
      batch_sharding: an optional ``jax.sharding.Sharding`` for the drawn batch (e.g.
        ``NamedSharding(mesh, P("data"))``): ``x`` and every ``cond`` leaf are constrained to it
        with ``jax.lax.with_sharding_constraint`` (data parallelism; the values are unchanged).
      **loss_kwargs: forwarded to ``loss_fn`` (weighting, target, cond_drop_prob, ...).
    Returns:
      ``step``; ``metrics = {"loss": scalar, "grad_norm": scalar}`` (loss before the update).
    """
    batch_size = check_positive_int("batch_size", batch_size)
    _check_decay(ema_decay)

    def step(state: TrainState, key, data):
        k_data, k_loss = jax.random.split(jax.random.fold_in(key, state.step))
        x, cond = draw_batch(k_data, data, batch_size)
        if batch_sharding is not None:
            shard = lambda a: jax.lax.with_sharding_constraint(a, batch_sharding)  # noqa: E731
            x, cond = shard(x), jax.tree.map(shard, cond)
        loss, grads = jax.value_and_grad(loss_fn)(
            state.params, k_loss, model, schedule, x, cond, **loss_kwargs
        )
        return apply_gradients(state, grads, optimizer, ema_decay, ema_warmup), {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
        }

    return step


def _check_data(model: Denoiser, data, key, batch_size: int):
    """Validate ``data`` against ``model.event_shape``; return it with arrays on the device."""
    if callable(data):
        try:
            out = jax.eval_shape(lambda k: data(k, batch_size), key)
        except Exception as e:  # the user's sampler does not run: report it at the boundary
            fail(
                "data", data, f"a function data(key, n) -> x or (x, cond) (calling it raised {e!r})"
            )
        x = out[0] if isinstance(out, tuple | list) else out
        model.check_x(x, "data")
        if x.shape[0] != batch_size:
            fail("data", data, f"a function data(key, n) returning n={batch_size} rows")
        return data
    if isinstance(data, tuple | list):
        if len(data) != 2:
            fail("data", f"a {type(data).__name__} of length {len(data)}", "a pair (x, cond)")
        x, cond = jax.tree.map(jnp.asarray, tuple(data))
    elif hasattr(data, "shape"):
        x, cond = jnp.asarray(data), None
    else:
        fail(
            "data", data, "an array (N, *event_shape), a pair (x, cond) or a function data(key, n)"
        )
    model.check_x(x, "data")
    n = x.shape[0]
    if n < 1:
        fail("data", f"shape {x.shape}", "at least one example")
    if cond is not None:
        for leaf in jax.tree.leaves(cond):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != n:
                fail("data", f"cond of shape {jnp.shape(leaf)}", f"cond with leading axis {n}")
        return x, cond
    return x


def _split_kwargs(kwargs):
    """Split loss kwargs into hashable compile-time constants and traced pytrees (arrays)."""
    static, dynamic = {}, {}
    for k, v in kwargs.items():
        is_array = isinstance(v, jax.Array | np.ndarray)
        try:
            hash(v)
        except TypeError:
            is_array = True
        (dynamic if is_array else static)[k] = v
    return tuple(sorted(static.items())), dynamic


#: compile-time settings of the two training loops below (hashable; part of jit's cache key)
_LOOP_STATICS = (
    "optimizer", "batch_size", "ema_decay", "ema_warmup", "sampler", "static_kw", "batch_sharding",
)  # fmt: skip


def _loop_step(
    model, schedule, dynamic_kw, optimizer, batch_size, ema_decay, ema_warmup, static_kw,
    batch_sharding,
):  # fmt: skip
    """The :func:`make_step` both training loops run (loss kwargs split into static/dynamic)."""
    return make_step(
        model,
        schedule,
        optimizer,
        ema_decay=ema_decay,
        ema_warmup=ema_warmup,
        batch_size=batch_size,
        batch_sharding=batch_sharding,
        **dict(static_kw),
        **dynamic_kw,
    )


@functools.partial(jax.jit, static_argnames=_LOOP_STATICS)
def _train_chunk(
    state, key, arrays, n, model, schedule, dynamic_kw, *, optimizer, batch_size, ema_decay,
    ema_warmup, sampler, static_kw, batch_sharding=None,
):  # fmt: skip
    """``n`` (traced) train steps in one compiled loop; ``(state, mean loss, first bad step)``.

    Module-level and keyed on hashable settings, so repeated :func:`train` calls with the same
    model, optimizer and settings reuse the compiled loop."""
    step_fn = _loop_step(
        model,
        schedule,
        dynamic_kw,
        optimizer,
        batch_size,
        ema_decay,
        ema_warmup,
        static_kw,
        batch_sharding,
    )
    data = sampler if sampler is not None else arrays

    def body(_, carry):
        state, total, bad = carry
        state_next, metrics = step_fn(state, key, data)
        loss = metrics["loss"]
        bad = jnp.where((bad < 0) & ~jnp.isfinite(loss), state.step, bad)
        return state_next, total + loss, bad

    total = jnp.zeros((), jnp.result_type(float))
    state, total, bad = jax.lax.fori_loop(0, n, body, (state, total, jnp.int32(-1)))
    return state, total / jnp.maximum(n, 1), bad


@functools.partial(jax.jit, static_argnames=_LOOP_STATICS)
def _train_one(
    state, key, arrays, model, schedule, dynamic_kw, *, optimizer, batch_size, ema_decay,
    ema_warmup, sampler, static_kw, batch_sharding=None,
):  # fmt: skip
    """One train step as its own compiled program: ``(state, loss, bad)`` with ``bad`` the step
    index when the loss is non-finite, else -1 (the per-step form of :func:`_train_chunk`)."""
    step_fn = _loop_step(
        model,
        schedule,
        dynamic_kw,
        optimizer,
        batch_size,
        ema_decay,
        ema_warmup,
        static_kw,
        batch_sharding,
    )
    new, metrics = step_fn(state, key, sampler if sampler is not None else arrays)
    loss = metrics["loss"]
    return new, loss, jnp.where(jnp.isfinite(loss), jnp.int32(-1), state.step.astype(jnp.int32))


def _has_conv_kernels(params) -> bool:
    """Whether ``params`` hold a convolution kernel (a leaf of rank >= 4)."""
    return any(jnp.ndim(leaf) >= 4 for leaf in jax.tree.leaves(params))


def _resolve_loop(loop: str, params) -> str:
    """``"fori"`` (one compiled loop per chunk) or ``"python"`` (one compiled step per call).

    ``"auto"`` picks ``"python"`` on the CPU backend when the params hold convolution kernels:
    XLA:CPU compiles the *gradient* of a convolution inside a while-loop body to code about 50x
    slower than the same gradient outside a loop (measured with 3x3 convs, 32 channels, batch
    64: 850 ms vs 16 ms per step; forward convolutions are unaffected), so a U-Net trains far
    faster one dispatched step at a time. Elsewhere the compiled loop saves the per-step
    dispatch (~0.1 ms, noticeable for small MLPs)."""
    if loop not in ("auto", "fori", "python"):
        fail("loop", loop, "'auto', 'fori' or 'python'")
    if loop != "auto":
        return loop
    return "python" if jax.default_backend() == "cpu" and _has_conv_kernels(params) else "fori"


def _resolve_mesh(mesh, batch_size: int):
    """``(replicated, batch)`` NamedShardings for ``mesh`` / ``(mesh, axis_name)`` (or Nones)."""
    if mesh is None:
        return None, None
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    axis = "data"
    if isinstance(mesh, tuple | list):
        if len(mesh) != 2:
            fail("mesh", mesh, "a jax.sharding.Mesh or a pair (mesh, axis_name)")
        mesh, axis = mesh
    if not isinstance(mesh, Mesh):
        fail("mesh", mesh, "a jax.sharding.Mesh or a pair (mesh, axis_name)")
    if axis not in mesh.axis_names:
        fail("mesh", f"axis names {mesh.axis_names}", f"a mesh with an axis named {axis!r}")
    n = int(mesh.shape[axis])
    if batch_size % n:
        fail("batch_size", batch_size, f"a multiple of the {n} devices on mesh axis {axis!r}")
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(axis))


def _next_boundary(step: int, every: int | None) -> float:
    return math.inf if every is None else (step // every + 1) * every


def train(
    key,
    model: Denoiser,
    params,
    schedule: Schedule,
    data,
    optimizer: optax.GradientTransformation,
    steps: int,
    batch_size: int = 256,
    ema_decay=0.999,
    progress: bool = True,
    log_every: int = 100,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
    keep: int = 3,
    resume: bool = True,
    mesh=None,
    callback: Callable | None = None,
    loop: str = "auto",
    ema_warmup: bool = True,
    **loss_kwargs,
) -> tuple[TrainState, dict]:
    """Train ``model`` for ``steps`` optimizer steps; return ``(state, history)``.

    Runs :func:`make_step` in jitted chunks: one compiled ``lax`` loop whose trip count is an
    argument, so shorter chunks reuse it, and so do later calls with the same model, optimizer
    and settings (jit's cache). Chunks end at every multiple of ``log_every`` (a history row)
    and of ``checkpoint_every`` (a checkpoint), counted in absolute steps. Step ``i`` uses
    ``fold_in(key, i)``, so the result depends only on ``key`` (bitwise, for a fixed backend),
    not on ``log_every``, ``checkpoint_every`` or interruptions.

    Checkpoints (:class:`jaxdiff.checkpoint.CheckpointManager`): with ``checkpoint_dir``,
    ``steps`` is the *total* step count; when ``resume`` and the directory holds a checkpoint,
    the newest good one is restored (a corrupt newest step falls back to the previous one with
    a warning) and only the remaining steps run; a checkpoint is written at every multiple of
    ``checkpoint_every`` and at the end. The data position is the step (batches are drawn with
    ``fold_in(key, step)``); ``examples_seen = step * batch_size`` is stored alongside. A
    directory written by a different model raises before anything in it is touched.

    Args:
      key: PRNG key.
      model: a :class:`~jaxdiff.denoiser.Denoiser`.
      params: initial parameters, or a :class:`TrainState` to resume from (e.g. restored by
        :func:`restore_checkpoint`): step ``i`` still uses ``fold_in(key, i)``, so an interrupted
        and resumed run equals an uninterrupted one.
      schedule: noise schedule.
      data: an array ``(N, *event_shape)``, a pair ``(x, cond)`` or a function ``data(key, n)``
        (see :func:`draw_batch`).
      optimizer: an optax gradient transformation.
      steps: without ``checkpoint_dir``, the number of optimizer steps to take (>= 1); with it,
        the total number of steps the run should reach.
      batch_size: examples per step (>= 1).
      ema_decay: EMA decay in ``[0, 1)``; 0 disables the EMA.
      ema_warmup: warm the EMA up: decay ``min(ema_decay, (1 + step) / (10 + step))``
        (:func:`ema_decay_at`), so short runs average recent params, not the initialisation.
      progress: show a tqdm progress bar (loss and steps/s).
      log_every: steps per history entry (and per ``callback`` call).
      checkpoint_dir: a directory, or a :class:`~jaxdiff.checkpoint.CheckpointManager` (e.g.
        one carrying a ``config`` dict to compare); None disables checkpoints.
      checkpoint_every: checkpoint period in steps (default ``log_every``).
      keep: number of most recent checkpoints kept.
      resume: restore from ``checkpoint_dir`` when it holds a checkpoint (False: start from
        ``params``; this run's checkpoints replace any later steps there).
      mesh: a ``jax.sharding.Mesh`` with an axis ``"data"``, or a pair ``(mesh, axis_name)``:
        the state and data arrays are replicated on the mesh and each drawn batch is sharded
        along the axis (``batch_size`` must be a multiple of its size). None: default device.
      callback: ``callback(state, row)`` after every history row, ``row`` a dict with ``step``,
        ``loss``, ``steps_per_s``, ``wall_s`` (e.g. periodic metrics or sample grids).
      loop: ``"fori"``: each chunk is one compiled ``lax.fori_loop``; ``"python"``: one
        compiled step per Python iteration (same steps and keys); ``"auto"`` (default):
        ``"python"`` for convolutional nets on the CPU, where XLA compiles convolution gradients
        inside loops to slow code, else ``"fori"``.
      **loss_kwargs: forwarded to the loss (``loss_fn=`` picks another loss).
    Returns:
      ``(TrainState, history)``; ``history`` has numpy arrays ``step`` (``state.step`` at each
      row), ``loss`` (mean loss since the previous row), ``steps_per_s`` (compilation excluded)
      and ``wall_s`` (seconds since the start, compilation included).
    Raises:
      JaxdiffError: bad ``steps``, ``batch_size``, ``log_every``, ``ema_decay``, ``data``,
        ``mesh``, checkpoint settings, or an incompatible/unreadable checkpoint directory.
      NonFiniteError: the loss became NaN/inf (the message names the first such step).
    """
    from tqdm.auto import tqdm

    from jaxdiff.checkpoint import CheckpointManager

    t_start = time.perf_counter()
    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    log_every = check_positive_int("log_every", log_every)
    if checkpoint_every is not None:
        checkpoint_every = check_positive_int("checkpoint_every", checkpoint_every)
    keep = check_positive_int("keep", keep)
    if callback is not None and not callable(callback):
        fail("callback", callback, "a function callback(state, row) or None")
    if not isinstance(model, Denoiser):
        fail("model", type(model).__name__, "a jaxdiff Denoiser (see jaxdiff.models.as_denoiser)")
    arrays = _check_data(model, data, key, batch_size)
    replicated, batch_sharding = _resolve_mesh(mesh, batch_size)
    if isinstance(params, TrainState):  # resume: steps continue from params.step
        state = params
        _check_decay(ema_decay)
        if (state.ema_params is None) != _no_ema(ema_decay):
            fail("ema_decay", ema_decay, "0 exactly when the resumed state has no EMA params")
    else:
        state = init(params, optimizer, ema_decay)
    if replicated is not None:
        state = jax.device_put(state, replicated)

    manager = None
    if checkpoint_dir is not None:
        if isinstance(checkpoint_dir, CheckpointManager):
            manager = checkpoint_dir
        else:
            manager = CheckpointManager(
                checkpoint_dir, every=checkpoint_every or log_every, keep=keep
            )
        if manager.every is None:
            manager.every = checkpoint_every or log_every
        checkpoint_every = manager.every
        manager.check_compatible(state)  # raises (touching nothing) for another model
        if resume and manager.steps():
            state = manager.restore(state).state
        target = steps
    else:
        checkpoint_every = None
    first_step = int(np.asarray(state.step))
    if checkpoint_dir is None:
        target = first_step + steps
    if is_concrete(ema_decay):
        ema_decay = float(np.asarray(ema_decay))  # hashable: a compile-time constant
    static_kw, dynamic_kw = _split_kwargs(loss_kwargs)
    sampler, arrays = (arrays, None) if callable(arrays) else (None, arrays)
    if replicated is not None and arrays is not None:
        arrays = jax.device_put(arrays, replicated)
    loop = _resolve_loop(loop, state.params)
    settings = dict(
        optimizer=optimizer,
        batch_size=batch_size,
        ema_decay=ema_decay,
        ema_warmup=bool(ema_warmup),
        sampler=sampler,
        static_kw=static_kw,
        batch_sharding=batch_sharding,
    )
    if loop == "python":
        one = functools.partial(_train_one, **settings)

        def run(state, key, arrays, n):
            total, bad = jnp.zeros((), jnp.result_type(float)), jnp.int32(-1)
            for _ in range(int(n)):
                state, loss, b = one(state, key, arrays, model, schedule, dynamic_kw)
                total, bad = total + loss, jnp.where(bad < 0, b, bad)
            return state, total / max(int(n), 1), bad

        def warm_up():  # compiles (or finds in jit's cache) the step
            return one(state, key, arrays, model, schedule, dynamic_kw)
    else:
        run = functools.partial(
            _train_chunk, model=model, schedule=schedule, dynamic_kw=dynamic_kw, **settings
        )

        def warm_up():  # zero steps: compiles (or finds in jit's cache) the chunk
            return run(state, key, arrays, jnp.int32(0))

    hist = {"step": [], "loss": [], "steps_per_s": [], "wall_s": []}
    if first_step >= target:  # already done (a finished run restarted)
        if manager is not None and not isinstance(checkpoint_dir, CheckpointManager):
            manager.close()
        return state, {
            k: np.asarray(v, np.int64 if k == "step" else np.float64) for k, v in hist.items()
        }
    jax.block_until_ready(warm_up())  # so steps/s excludes compilation
    try:
        with tqdm(
            total=target - first_step, disable=not progress, desc="train", unit="step"
        ) as bar:
            cur = first_step
            acc_loss, acc_n, acc_t = 0.0, 0, 0.0
            while cur < target:
                stop = int(
                    min(
                        target,
                        _next_boundary(cur, log_every),
                        _next_boundary(cur, checkpoint_every),
                    )
                )
                n = stop - cur
                t0 = time.perf_counter()
                state, loss, bad = run(state, key, arrays, jnp.int32(n))
                loss, bad = float(loss), int(bad)
                acc_t += time.perf_counter() - t0
                if bad >= 0:
                    raise NonFiniteError(
                        f"training loss is non-finite at step {bad}; lower the learning "
                        "rate, check the data for NaN/inf, or narrow the time range (t_min/t_max)"
                    )
                cur = stop
                acc_loss += loss * n
                acc_n += n
                bar.update(n)
                if manager is not None and (manager.should_save(cur) or cur == target):
                    manager.save(cur, state, examples_seen=cur * batch_size, force=cur == target)
                if cur % log_every == 0 or cur == target:
                    row = {
                        "step": cur,
                        "loss": acc_loss / acc_n,
                        "steps_per_s": acc_n / max(acc_t, 1e-12),
                        "wall_s": time.perf_counter() - t_start,
                    }
                    for k, v in row.items():
                        hist[k].append(v)
                    bar.set_postfix(
                        loss=f"{row['loss']:.4g}", steps_per_s=f"{row['steps_per_s']:.0f}"
                    )
                    acc_loss, acc_n, acc_t = 0.0, 0, 0.0
                    if callback is not None:
                        callback(state, row)
    finally:
        if manager is not None and not isinstance(checkpoint_dir, CheckpointManager):
            manager.close()
    history = {
        "step": np.asarray(hist["step"], np.int64),
        "loss": np.asarray(hist["loss"], np.float64),
        "steps_per_s": np.asarray(hist["steps_per_s"], np.float64),
        "wall_s": np.asarray(hist["wall_s"], np.float64),
    }
    return state, history


def fit(
    key,
    model: Denoiser,
    params,
    schedule: Schedule,
    data,
    optimizer: optax.GradientTransformation,
    steps: int,
    batch_size: int = 256,
    ema_decay=0.999,
    progress: bool = True,
    log_every: int = 100,
    ema_warmup: bool = True,
    **loss_kwargs,
):
    """:func:`train`, returning only the trained parameters: the EMA params, or the raw params
    when ``ema_decay == 0``."""
    state, _ = train(
        key,
        model,
        params,
        schedule,
        data,
        optimizer,
        steps,
        batch_size=batch_size,
        ema_decay=ema_decay,
        progress=progress,
        log_every=log_every,
        ema_warmup=ema_warmup,
        **loss_kwargs,
    )
    return state.params if state.ema_params is None else state.ema_params


# ------------------------------------------------------------------------------------------
# checkpoints: the one format of jaxdiff.checkpoint
# ------------------------------------------------------------------------------------------
def save_checkpoint(path, state, step: int | None = None, **kwargs) -> str:
    """Save ``state`` as checkpoint ``step`` (default ``state.step``) under directory ``path``:
    :func:`jaxdiff.checkpoint.save` (the format ``train(checkpoint_dir=...)`` and the CLI write,
    so each reads the others'). Returns the absolute ``path``."""
    from jaxdiff.checkpoint import save

    return save(path, state, step, **kwargs)


def restore_checkpoint(path, target=None, step: int | None = None, **kwargs):
    """Restore the newest good checkpoint (or ``step``) under ``path`` into ``target``'s
    structure: :func:`jaxdiff.checkpoint.restore`, which reads what :func:`save_checkpoint`,
    ``train(checkpoint_dir=...)``, ``jaxdiff train`` and ``CheckpointManager`` wrote. Without
    ``target``, nested dicts of the saved leaves."""
    from jaxdiff.checkpoint import restore

    return restore(path, target, step=step, **kwargs)
