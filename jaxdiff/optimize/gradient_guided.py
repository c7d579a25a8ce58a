"""Gradient-guided diffusion for generative optimisation (Guo, Yuan, Yang, Chen, Wang, "Gradient
Guidance for Diffusion Models: An Optimization Perspective", NeurIPS 2024, arXiv 2404.14743;
../shared/reference/guidance.md sections 2.2-2.3).

Maximise an objective ``f`` with a pretrained diffusion model by guiding it, round after round,
toward a target that moves with the samples:

* **Algorithm 1** (score fixed). Start from ``B`` unguided samples ``z_0``. In round ``k``:
  query ``g_k = grad f`` at the current samples (per sample, the official code; or at their mean,
  the paper's text), set the target ``y_k = g_k^T z_k + delta`` (the linearised objective plus
  the desired increment; or ``+ delta ||g_k||^2``, a gradient-ascent step), and draw fresh guided
  samples ``z_{k+1}`` with look-ahead guidance ``G_loss(g_k, y_k)``
  (:func:`jaxdiff.guidance.lookahead_gradient`) or naive guidance ``G``
  (:func:`jaxdiff.guidance.naive_gradient`). The pretrained prior regularises every round, so
  the samples converge to the maximiser of a *regularised* problem (Theorem 2), not of ``f``.
* **Algorithm 2** (adaptive fine-tuning). The same loop, and in every round from
  ``finetune_start`` on, ``finetune_steps`` optimizer steps of denoising score matching
  (:func:`jaxdiff.losses.dsm_loss` through :func:`jaxdiff.train.make_step`) on the newest samples
  before drawing the next ones, so the prior follows the samples and the regularisation moves
  with them (Theorem 3: ``f* - f = O~(1/K)`` for concave ``f``). The order (query the gradient
  at ``z_k``, fine-tune on ``z_k``, sample ``z_{k+1}``) follows the official code
  (``yukang123/GGDMOptim``, ``simulations/main.py``).

Both are init/step loops over pytrees: ``state = algorithm1_init(...)``,
``state, metrics = algorithm1_step(state)`` (pure, jit-able; round ``k`` uses
``fold_in(state.key, k)``), with :func:`run_algorithm1` / :func:`run_algorithm2` /
:func:`run_rounds` as conveniences (progress bar, per-round history). The numbers a user sweeps
(``delta``, ``noise``, ``scale``, ``beta``, ``finetune_start``, the subspace basis, the optimum
value) are leaves of ``state.config``: change them with :func:`with_config` and a jitted step
never recompiles.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxdiff import metrics as _metrics
from jaxdiff._checks import check_positive_int, fail, is_concrete
from jaxdiff.denoiser import Denoiser
from jaxdiff.guidance.base import guide
from jaxdiff.guidance.gradient import _checked_vjp, lookahead_gradient, naive_gradient
from jaxdiff.samplers.api import sample
from jaxdiff.samplers.base import Sampler
from jaxdiff.samplers.classic import ddpm
from jaxdiff.schedules import Schedule
from jaxdiff.train import TrainState, make_step

__all__ = [
    "GUIDANCES",
    "REFERENCES",
    "TARGETS",
    "GradientGuidedConfig",
    "GradientGuidedState",
    "algorithm1_init",
    "algorithm1_step",
    "algorithm2_init",
    "algorithm2_step",
    "run_algorithm1",
    "run_algorithm2",
    "run_rounds",
    "with_config",
    "query",
    "subspace_mean_optimizer",
]

GUIDANCES = ("lookahead", "naive")
REFERENCES = ("sample", "mean")
TARGETS = ("increment", "gradient")

_PURPOSE = "gradient-guided optimisation"


# ------------------------------------------------------------------------------------------
# state
# ------------------------------------------------------------------------------------------
class GradientGuidedConfig(struct.PyTreeNode):
    """Settings of a gradient-guided optimisation run (a pytree; build it with
    :func:`algorithm1_init` / :func:`algorithm2_init`, change it with :func:`with_config`).

    Leaves (sweeping them under ``jit`` never recompiles): ``delta`` (the target increment),
    ``noise`` (the guidance's ``sigma``), ``scale`` (``beta_coef``), ``beta`` (constant step-size
    override or None), ``finetune_start`` (first fine-tuning round, int), ``basis`` ((D, d) or
    None, for the off-subspace metric), ``optimum`` (``f*`` or None, for the optimality gap), and
    the children ``model``, ``schedule``, ``sampler``.

    Static: ``objective`` (``f(x (B, *event)) -> (B,)``), ``steps`` (sampler steps per round),
    ``guidance`` (:data:`GUIDANCES`), ``reference`` (:data:`REFERENCES`), ``target``
    (:data:`TARGETS`), ``final_denoise``, and for Algorithm 2 ``optimizer`` (optax),
    ``finetune_steps`` and ``dsm_kwargs`` (a sorted tuple of ``(name, value)`` pairs forwarded to
    :func:`jaxdiff.losses.dsm_loss`).
    """

    model: Denoiser
    schedule: Schedule
    sampler: Sampler
    delta: Any
    noise: Any
    scale: Any
    beta: Any = None
    finetune_start: Any = None
    basis: Any = None
    optimum: Any = None
    objective: Callable = struct.field(pytree_node=False, default=None)
    steps: int = struct.field(pytree_node=False, default=100)
    guidance: str = struct.field(pytree_node=False, default="lookahead")
    reference: str = struct.field(pytree_node=False, default="sample")
    target: str = struct.field(pytree_node=False, default="increment")
    final_denoise: bool = struct.field(pytree_node=False, default=False)
    optimizer: Any = struct.field(pytree_node=False, default=None)
    finetune_steps: int = struct.field(pytree_node=False, default=1)
    dsm_kwargs: tuple = struct.field(pytree_node=False, default=())


class GradientGuidedState(struct.PyTreeNode):
    """State of Algorithm 1 / 2 (a pytree).

    Attributes:
      params: the score model's parameters (fixed in Algorithm 1, fine-tuned in Algorithm 2).
      opt_state: the optax optimizer state (None for Algorithm 1).
      samples: ``(B, *event)`` the current samples ``z_k``: the points where the next round
        queries the objective's gradient.
      direction: ``(B, *event)`` the guidance direction ``g`` of the last round (zeros before the
        first round).
      target: ``(B,)`` the guidance target ``y`` of the last round (zeros before the first).
      round: int32 scalar ``k``, the number of rounds taken.
      key: the PRNG key; round ``k`` uses ``fold_in(key, k)``.
      config: the :class:`GradientGuidedConfig`.
    """

    params: Any
    opt_state: Any
    samples: Any
    direction: Any
    target: Any
    round: Any
    key: Any
    config: GradientGuidedConfig


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------
def _scalar_leaf(
    arg: str, value, dtype, *, positive=False, allow_none=False, integer=False, signed=False
):
    if value is None:
        if allow_none:
            return None
        fail(arg, value, "a number")
    v = jnp.asarray(value)
    if v.ndim != 0:
        fail(arg, f"shape {v.shape}", "a scalar")
    if integer:
        if not jnp.issubdtype(v.dtype, jnp.integer) and not (
            is_concrete(v) and float(v) == int(float(v))
        ):
            fail(arg, value, "an integer")
        v = v.astype(jnp.int32)
    else:
        if not jnp.issubdtype(v.dtype, jnp.number) or jnp.issubdtype(v.dtype, jnp.complexfloating):
            fail(arg, value, "a real number")
        v = v.astype(dtype)
    if is_concrete(v):
        x = float(v)
        if not np.isfinite(x):
            fail(arg, value, "a finite number")
        if positive and not x > 0:
            fail(arg, value, "a positive number")
        if not positive and not signed and x < 0:
            fail(arg, value, "a nonnegative number")
    return v


def _check_choice(arg, value, choices):
    if value not in choices:
        fail(arg, value, f"one of {choices}")
    return value


def _check_basis(basis, dim: int, dtype):
    if basis is None:
        return None
    a = jnp.asarray(basis)
    if a.ndim != 2 or a.shape[0] != dim or not 1 <= a.shape[1] <= dim:
        fail("basis", f"shape {tuple(a.shape)}", f"shape ({dim}, d) with 1 <= d <= {dim}")
    if is_concrete(a):
        an = np.asarray(a, np.float64)
        err = float(np.max(np.abs(an.T @ an - np.eye(an.shape[1]))))
        if not err <= 1e-3:
            fail("basis", basis, f"orthonormal columns (max |A^T A - I| = {err:.2g})")
    return a if dtype is None else a.astype(dtype)


def _config_leaves(dtype, dim, **kw):
    out = {}
    if "delta" in kw:
        out["delta"] = _scalar_leaf("delta", kw["delta"], dtype)
    if "noise" in kw:
        out["noise"] = _scalar_leaf("noise", kw["noise"], dtype, positive=True)
    if "scale" in kw:
        out["scale"] = _scalar_leaf("scale", kw["scale"], dtype)
    if "beta" in kw:
        out["beta"] = _scalar_leaf("beta", kw["beta"], dtype, allow_none=True)
    if "finetune_start" in kw:
        out["finetune_start"] = _scalar_leaf(
            "finetune_start", kw["finetune_start"], dtype, allow_none=True, integer=True
        )
    if "optimum" in kw:
        if kw["optimum"] is not None and np.ndim(kw["optimum"]) != 0:
            fail("optimum", kw["optimum"], "a scalar (the maximum value f*) or None")
        out["optimum"] = _scalar_leaf("optimum", kw["optimum"], dtype, allow_none=True, signed=True)
    if "basis" in kw:
        out["basis"] = _check_basis(kw["basis"], dim, dtype)
    return out


def _event_size(shape) -> int:
    return int(np.prod(shape))


# ------------------------------------------------------------------------------------------
# one round
# ------------------------------------------------------------------------------------------
def query(objective: Callable, samples, delta, *, reference: str = "sample", target="increment"):
    """The guidance direction and target of one round (arXiv 2404.14743, Algorithms 1-2;
    guidance.md 2.2).

    * ``reference="sample"`` (the official code): ``g^(i) = grad f(z^(i))`` per sample;
      ``reference="mean"`` (the paper's text): ``g = grad f(z_bar)`` at the batch mean, shared.
    * ``target="increment"`` (code, ``--interval``): ``y^(i) = g^(i)T z^(i) + delta``;
      ``target="gradient"`` (the theory's gradient-ascent form):
      ``y^(i) = g^(i)T z^(i) + delta ||g^(i)||^2`` (``delta`` is then a step size ``eta``).
      With ``reference="mean"`` the reference point is ``z_bar`` for every sample.

    Args:
      objective: ``f(x (B, *event)) -> (B,)``, per example, differentiable by JAX.
      samples: ``(B, *event)`` the current samples ``z``.
      delta: the increment (or step size), a scalar.
    Returns:
      ``(g (B, *event), y (B,), f(z) (B,))``.
    Raises:
      JaxdiffError (argument ``objective``) if ``f`` is not differentiable or does not return
      shape ``(B,)``.
    """
    _check_choice("reference", reference, REFERENCES)
    _check_choice("target", target, TARGETS)
    z = jnp.asarray(samples)
    b = z.shape[0]
    fz, vjp = _checked_vjp(objective, z, "objective", _PURPOSE)
    if reference == "sample":
        g = vjp(jnp.ones_like(fz))[0].astype(z.dtype)
        ref = z
    else:
        zbar = jnp.mean(z, axis=0, keepdims=True)
        f_bar, vjp_bar = _checked_vjp(objective, zbar, "objective", _PURPOSE)
        g = jnp.broadcast_to(vjp_bar(jnp.ones_like(f_bar))[0].astype(z.dtype), z.shape)
        ref = jnp.broadcast_to(zbar, z.shape)
    flat = lambda v: v.reshape(b, -1)  # noqa: E731
    lin = jnp.sum(flat(g) * flat(ref), axis=-1)
    delta = jnp.asarray(delta, z.dtype)
    if target == "increment":
        y = lin + delta
    else:
        y = lin + delta * jnp.sum(flat(g) ** 2, axis=-1)
    return g, y, fz


def _round_metrics(cfg: GradientGuidedConfig, z, fz=None) -> dict:
    f = cfg.objective(z) if fz is None else fz
    zbar = jnp.mean(z, axis=0, keepdims=True)
    f_bar = cfg.objective(zbar)[0]
    m = {
        "objective_mean": jnp.mean(f),
        "objective_median": jnp.median(f),
        "objective_max": jnp.max(f),
        "objective_at_mean": f_bar,
    }
    if cfg.optimum is not None:
        m["gap"] = cfg.optimum - m["objective_mean"]
        m["gap_at_mean"] = cfg.optimum - f_bar
    if cfg.basis is not None:
        m["off_subspace_ratio"] = _metrics.off_subspace_ratio(
            z.reshape(z.shape[0], -1), cfg.basis, reduce="mean"
        )
    return m


def _finetune(cfg: GradientGuidedConfig, params, opt_state, z, key, k):
    """``finetune_steps`` optimizer steps of DSM on the batch ``z`` (train.make_step)."""
    n = cfg.finetune_steps
    step_fn = make_step(
        cfg.model,
        cfg.schedule,
        cfg.optimizer,
        ema_decay=0.0,
        batch_size=z.shape[0],
        **dict(cfg.dsm_kwargs),
    )
    data = lambda _key, _n: z  # noqa: E731  (the whole new batch in every step)

    def body(ts, _):
        ts, m = step_fn(ts, key, data)
        return ts, m["loss"]

    ts = TrainState(step=k * n, params=params, opt_state=opt_state, ema_params=None)
    ts, losses = jax.lax.scan(body, ts, None, length=n)
    return ts.params, ts.opt_state, jnp.mean(losses).astype(z.dtype)


def _step(state: GradientGuidedState, finetune: bool):
    cfg = state.config
    k = state.round
    k_round = jax.random.fold_in(state.key, k)
    k_sample, k_ft = jax.random.split(k_round)
    z = state.samples
    g, y, _ = query(cfg.objective, z, cfg.delta, reference=cfg.reference, target=cfg.target)
    params, opt_state = state.params, state.opt_state
    extra = {}
    if finetune:

        def do(args):
            p, o = args
            return _finetune(cfg, p, o, z, k_ft, k)

        def skip(args):
            p, o = args
            return p, o, jnp.asarray(jnp.nan, z.dtype)

        params, opt_state, loss = jax.lax.cond(
            k >= cfg.finetune_start, do, skip, (params, opt_state)
        )
        extra["finetune_loss"] = loss
    if cfg.guidance == "lookahead":
        term = lookahead_gradient(g, y, noise=cfg.noise, scale=cfg.scale, beta=cfg.beta)
    else:
        term = naive_gradient(g, y, noise=cfg.noise, scale=cfg.scale)
    guided = guide(cfg.model, cfg.schedule, term)
    z_new = sample(
        k_sample,
        guided,
        params,
        cfg.schedule,
        z.shape,
        cfg.sampler,
        cfg.steps,
        final_denoise=cfg.final_denoise,
        dtype=z.dtype,
    ).astype(z.dtype)
    m = _round_metrics(cfg, z_new)
    m.update(extra)
    m["round"] = k + 1
    new = state.replace(
        params=params,
        opt_state=opt_state,
        samples=z_new,
        direction=g,
        target=y,
        round=k + 1,
    )
    return new, m


_step_jit = jax.jit(_step, static_argnames=("finetune",))


def _check_state(state, algorithm: int):
    if not isinstance(state, GradientGuidedState):
        fail("state", type(state).__name__, f"a state from algorithm{algorithm}_init")
    has_opt = state.config.optimizer is not None
    if algorithm == 2 and not has_opt:
        fail("state", "an Algorithm 1 state (no optimizer)", "a state from algorithm2_init")


def algorithm1_step(state: GradientGuidedState):
    """One round of Algorithm 1 (arXiv 2404.14743; guidance.md 2.2), score fixed.

    With ``z = state.samples`` (B, *event): ``(g, y) = query(f, z, delta)`` (:func:`query`);
    ``z' ~`` the sampler run on ``guide(model, schedule, G(g, y))``, with
    ``G = 2 beta_t (y - g^T x0_hat) J_t^T g`` (look-ahead) or ``beta_t (y - g^T x0_hat) g``
    (naive), from fresh noise drawn with ``fold_in(state.key, state.round)``.

    Pure and jit-able (``jax.jit(algorithm1_step)(state)``); called eagerly it runs a jitted
    version (compiled once per config structure).

    Returns:
      ``(state, metrics)``: ``state.samples = z'``, ``state.round + 1``; ``metrics`` (scalars):
      ``objective_mean`` / ``objective_median`` / ``objective_max`` of ``f(z')``,
      ``objective_at_mean`` (``f`` at the batch mean), ``off_subspace_ratio`` (mean
      ``||x_perp|| / ||x_par||``, when ``config.basis`` is set), ``gap`` / ``gap_at_mean``
      (``f* - objective_mean`` / ``f* - f(z_bar)``, when ``config.optimum`` is set) and
      ``round``.
    """
    _check_state(state, 1)
    run = _step if not is_concrete(state) else _step_jit
    return run(state, finetune=False)


def algorithm2_step(state: GradientGuidedState):
    """One round of Algorithm 2 (arXiv 2404.14743; guidance.md 2.3): adaptive fine-tuning.

    As :func:`algorithm1_step`, and when ``state.round >= config.finetune_start``: before
    sampling, ``config.finetune_steps`` optimizer steps of denoising score matching
    (:func:`jaxdiff.losses.dsm_loss`, via :func:`jaxdiff.train.make_step`, each on the whole
    current batch ``z`` with fresh ``t, eps``) update ``state.params``, and the new samples are
    drawn from the updated model. ``metrics`` adds ``finetune_loss`` (mean DSM loss of the
    round's steps; NaN before ``finetune_start``).
    """
    _check_state(state, 2)
    run = _step if not is_concrete(state) else _step_jit
    return run(state, finetune=True)


# ------------------------------------------------------------------------------------------
# init
# ------------------------------------------------------------------------------------------
def _init(
    key,
    model,
    params,
    schedule,
    objective,
    *,
    batch_size,
    sampler,
    steps,
    guidance,
    reference,
    target,
    delta,
    noise,
    scale,
    beta,
    basis,
    optimum,
    final_denoise,
    x_init,
    optimizer=None,
    finetune_steps=1,
    finetune_start=None,
    dsm_kwargs=None,
):
    if not isinstance(model, Denoiser):
        fail("model", type(model).__name__, "a jaxdiff Denoiser")
    if not isinstance(schedule, Schedule):
        fail("schedule", type(schedule).__name__, "a jaxdiff Schedule")
    if not callable(objective):
        fail("objective", objective, "a callable objective f(x (B, *event)) -> (B,)")
    sampler = ddpm() if sampler is None else sampler
    if not isinstance(sampler, Sampler):
        fail("sampler", sampler, "a jaxdiff sampler, e.g. jaxdiff.samplers.ddpm()")
    steps = check_positive_int("steps", steps)
    _check_choice("guidance", guidance, GUIDANCES)
    _check_choice("reference", reference, REFERENCES)
    _check_choice("target", target, TARGETS)
    k_init, k_loop = jax.random.split(key)
    if x_init is None:
        batch_size = check_positive_int("batch_size", batch_size)
        if model.event_shape is None:
            fail("x_init", None, "initial samples (the model has no event_shape)")
        shape = (batch_size, *model.event_shape)
        z0 = sample(
            k_init, model, params, schedule, shape, sampler, steps, final_denoise=final_denoise
        )
    else:
        z0 = jnp.asarray(x_init)
        if not jnp.issubdtype(z0.dtype, jnp.floating):
            fail("x_init", f"dtype {z0.dtype}", "floating initial samples")
        model.check_x(z0, "x_init")
        if z0.shape[0] < 1:
            fail("x_init", f"shape {z0.shape}", "at least one sample")
    dtype = z0.dtype
    dim = _event_size(z0.shape[1:])
    leaves = _config_leaves(
        dtype,
        dim,
        delta=delta,
        noise=noise,
        scale=scale,
        beta=beta,
        basis=basis,
        optimum=optimum,
        finetune_start=finetune_start,
    )
    opt_state = None
    if optimizer is not None:
        if not isinstance(optimizer, optax.GradientTransformation):
            fail("optimizer", optimizer, "an optax GradientTransformation, e.g. optax.adam(1e-3)")
        finetune_steps = check_positive_int("finetune_steps", finetune_steps)
        dsm_kwargs = dict(dsm_kwargs or {})
        for name, value in dsm_kwargs.items():
            try:
                hash(value)
            except TypeError:
                fail(f"dsm_kwargs[{name!r}]", value, "a hashable setting (a string or number)")
        opt_state = optimizer.init(params)
    cfg = GradientGuidedConfig(
        model=model,
        schedule=schedule,
        sampler=sampler,
        objective=objective,
        steps=steps,
        guidance=guidance,
        reference=reference,
        target=target,
        final_denoise=bool(final_denoise),
        optimizer=optimizer,
        finetune_steps=finetune_steps if optimizer is not None else 1,
        dsm_kwargs=tuple(sorted((dsm_kwargs or {}).items())) if optimizer is not None else (),
        **leaves,
    )
    # the objective must be differentiable and per example: checked once here, on z_0
    query(objective, z0, leaves["delta"], reference=reference, target=target)
    return GradientGuidedState(
        params=params,
        opt_state=opt_state,
        samples=z0,
        direction=jnp.zeros_like(z0),
        target=jnp.zeros(z0.shape[:1], dtype),
        round=jnp.zeros((), jnp.int32),
        key=k_loop,
        config=cfg,
    )


_INIT_DOC_ARGS = """
    Args:
      key: PRNG key (split into one for the initial samples and one for the rounds).
      model: the pretrained :class:`~jaxdiff.denoiser.Denoiser` (a network, or an exact
        :func:`jaxdiff.analytic.as_denoiser`).
      params: its parameters.
      schedule: the schedule it was trained with.
      objective: ``f(x (B, *event)) -> (B,)``, per example and differentiable by JAX (its
        gradient is taken with ``jax.vjp``); static (compared by identity under ``jit``).
      batch_size: ``B``, samples per round (ignored when ``x_init`` is given).
      sampler: any :mod:`jaxdiff.samplers` sampler (default ``ddpm()``, as in the paper).
      steps: sampler steps per round (the paper: 200 DDPM steps).
      guidance: ``"lookahead"`` (``G_loss``, structure-preserving) or ``"naive"`` (``G``).
      reference, target: how the direction and target are formed, see :func:`query`.
      delta: the target increment (code ``--interval``: 0.2 for look-ahead, 0.9 for naive on the
        paper's f1; 1 on f2) or, with ``target="gradient"``, the step size; >= 0.
      noise: the guidance's ``sigma`` (> 0; code default 0.1).
      scale: ``beta_coef`` (>= 0; default 1).
      beta: None (the paper's ``beta_t``) or a constant step size (look-ahead only).
      basis: optional ``(D, d)`` orthonormal basis: logs the off-subspace ratio.
      optimum: optional ``f*``: logs the optimality gap.
      final_denoise: return the guided model's ``x0_hat`` at the last time instead of the
        sampler's state (default False, as :func:`jaxdiff.sample`). With an exact subspace
        score this is a projection onto the subspace (Tweedie), which hides the off-subspace
        drift of naive guidance; with a learned score it is not.
      x_init: optional initial samples ``(B, *event)`` instead of unguided ones.
"""


def algorithm1_init(
    key,
    model: Denoiser,
    params,
    schedule: Schedule,
    objective: Callable,
    *,
    batch_size: int = 32,
    sampler: Sampler | None = None,
    steps: int = 100,
    guidance: str = "lookahead",
    reference: str = "sample",
    target: str = "increment",
    delta=0.05,
    noise=0.1,
    scale=1.0,
    beta=None,
    basis=None,
    optimum=None,
    final_denoise: bool = False,
    x_init=None,
) -> GradientGuidedState:
    """Initial state of Algorithm 1 (gradient-guided diffusion for generative optimisation,
    score fixed; arXiv 2404.14743, guidance.md 2.2): ``z_0`` = ``B`` unguided samples of the
    pretrained model (or ``x_init``).
    """
    return _init(
        key, model, params, schedule, objective, batch_size=batch_size, sampler=sampler,
        steps=steps, guidance=guidance, reference=reference, target=target, delta=delta,
        noise=noise, scale=scale, beta=beta, basis=basis, optimum=optimum,
        final_denoise=final_denoise, x_init=x_init,
    )  # fmt: skip


def algorithm2_init(
    key,
    model: Denoiser,
    params,
    schedule: Schedule,
    objective: Callable,
    optimizer: optax.GradientTransformation,
    *,
    finetune_steps: int = 1,
    finetune_start: int = 0,
    dsm_kwargs: dict | None = None,
    batch_size: int = 32,
    sampler: Sampler | None = None,
    steps: int = 100,
    guidance: str = "lookahead",
    reference: str = "sample",
    target: str = "increment",
    delta=0.05,
    noise=0.1,
    scale=1.0,
    beta=None,
    basis=None,
    optimum=None,
    final_denoise: bool = False,
    x_init=None,
) -> GradientGuidedState:
    """Initial state of Algorithm 2 (gradient-guided diffusion with adaptive fine-tuning;
    arXiv 2404.14743, guidance.md 2.3): as :func:`algorithm1_init`, plus
    ``opt_state = optimizer.init(params)``.

    Extra args: ``optimizer`` (any optax transformation; the paper: Adam, betas (0.9, 0.99),
    lr ``1e-6`` to ``1e-5`` for its U-Net), ``finetune_steps`` (DSM steps per round, >= 1; code
    default 1), ``finetune_start`` (first round that fine-tunes, >= 0; a leaf; the paper: 40 or
    60), ``dsm_kwargs`` (forwarded to :func:`jaxdiff.losses.dsm_loss`: ``weighting``,
    ``t_sampling``, ``t_min``, ...).
    """
    if optimizer is None:
        fail("optimizer", None, "an optax GradientTransformation, e.g. optax.adam(1e-4)")
    return _init(
        key, model, params, schedule, objective, batch_size=batch_size, sampler=sampler,
        steps=steps, guidance=guidance, reference=reference, target=target, delta=delta,
        noise=noise, scale=scale, beta=beta, basis=basis, optimum=optimum,
        final_denoise=final_denoise, x_init=x_init, optimizer=optimizer,
        finetune_steps=finetune_steps, finetune_start=finetune_start, dsm_kwargs=dsm_kwargs,
    )  # fmt: skip


algorithm1_init.__doc__ += (
    _INIT_DOC_ARGS
    + """
    Returns:
      A :class:`GradientGuidedState` (``opt_state=None``).
    Raises:
      JaxdiffError naming the argument: a non-differentiable objective or one not returning
      ``(B,)``, a negative ``delta`` / ``scale`` / ``beta``, ``noise <= 0``, ``steps < 1``,
      ``batch_size < 1``, ``x_init`` or ``basis`` of the wrong shape, an unknown
      ``guidance`` / ``reference`` / ``target``.
"""
)
algorithm2_init.__doc__ += (
    _INIT_DOC_ARGS
    + """
    Returns:
      A :class:`GradientGuidedState` with the optimizer state.
    Raises:
      JaxdiffError as :func:`algorithm1_init`, and for a missing/invalid ``optimizer``,
      ``finetune_steps < 1``, ``finetune_start < 0``.
"""
)


def with_config(state: GradientGuidedState, **changes) -> GradientGuidedState:
    """``state`` with validated new values of the config's leaves: ``delta``, ``noise``,
    ``scale``, ``beta``, ``finetune_start``, ``basis``, ``optimum``.

    Values are cast to the dtype the run uses, so a jitted step never recompiles when they
    change (switching ``beta``/``basis``/``optimum`` between None and a value changes the
    pytree structure and does recompile).
    """
    if not isinstance(state, GradientGuidedState):
        fail("state", type(state).__name__, "a GradientGuidedState")
    allowed = ("delta", "noise", "scale", "beta", "finetune_start", "basis", "optimum")
    for name in changes:
        if name not in allowed:
            fail(name, changes[name], f"one of the sweepable settings {allowed}")
    z = state.samples
    leaves = _config_leaves(z.dtype, _event_size(z.shape[1:]), **changes)
    if "finetune_start" in leaves and state.config.optimizer is None:
        fail("finetune_start", changes["finetune_start"], "None for an Algorithm 1 state")
    return state.replace(config=state.config.replace(**leaves))


def subspace_mean_optimizer(optimizer: optax.GradientTransformation, basis):
    """An optax transformation that fine-tunes only the mean of an exact subspace score.

    For the params of ``jaxdiff.analytic.as_denoiser(jaxdiff.analytic.linear_subspace(A))``
    (a :class:`~jaxdiff.analytic.LinearSubspace`): the ``loc`` leaf is updated by
    ``optimizer`` and the update is projected onto ``span(A)`` (``u -> A A^T u``); the basis and
    the covariance stay fixed. The score family ``{N(A m, A Sigma_u A^T)}`` is then a DSM-
    trainable "network" with the exact subspace structure: the linear-latent setting of
    Theorem 3 of arXiv 2404.14743, where re-fitting the score to new samples moves its mean.

    The projection matters: the eps-loss weighs off-subspace errors by ``alpha^2/sigma^2``
    (unbounded as ``t -> 0``), so without it the sampler's small off-subspace noise floor kicks
    the mean off the subspace.

    Args:
      optimizer: any optax transformation (SGD tracks the samples most directly).
      basis: ``(D, d)`` with orthonormal columns, the subspace's ``A``.
    Returns:
      An ``optax.GradientTransformation`` for ``LinearSubspace`` params.
    """
    from jaxdiff.analytic import LinearSubspace

    if not isinstance(optimizer, optax.GradientTransformation):
        fail("optimizer", optimizer, "an optax GradientTransformation")
    if np.ndim(basis) != 2:
        fail("basis", basis, "a (D, d) matrix with orthonormal columns")
    a = _check_basis(basis, int(np.shape(basis)[0]), None)

    def project(updates, params=None):
        return jax.tree.map(lambda u: (u @ a.astype(u.dtype)) @ a.T.astype(u.dtype), updates)

    labels = LinearSubspace(basis="fixed", evals_u="fixed", evecs_u="fixed", loc="mean")
    return optax.multi_transform(
        {"mean": optax.chain(optimizer, optax.stateless(project)), "fixed": optax.set_to_zero()},
        labels,
    )


# ------------------------------------------------------------------------------------------
# loops
# ------------------------------------------------------------------------------------------
def run_rounds(state: GradientGuidedState, rounds: int, *, progress: bool = True):
    """Run ``rounds`` rounds of the state's algorithm (Algorithm 2 when it has an optimizer,
    else Algorithm 1) with a jitted step and a tqdm progress bar.

    Returns:
      ``(state, history)``: ``history`` maps each metric of the step (and ``wall_s``) to a numpy
      array of ``rounds + 1`` values; index 0 describes ``state.samples`` before the first round
      (``finetune_loss`` is NaN there).
    """
    from tqdm.auto import tqdm

    rounds = check_positive_int("rounds", rounds)
    if not isinstance(state, GradientGuidedState):
        fail("state", type(state).__name__, "a GradientGuidedState")
    finetune = state.config.optimizer is not None
    t0 = time.perf_counter()
    first = _metrics_jit(state.config, state.samples)
    first["round"] = state.round
    if finetune:
        first["finetune_loss"] = jnp.asarray(jnp.nan)
    hist = [first]
    walls = [0.0]
    name = "algorithm 2" if finetune else "algorithm 1"
    with tqdm(total=rounds, disable=not progress, desc=name, unit="round") as bar:
        for _ in range(rounds):
            state, m = _step_jit(state, finetune=finetune)
            hist.append(m)
            if progress:
                bar.set_postfix(f=f"{float(m['objective_mean']):.4g}")
            walls.append(time.perf_counter() - t0)
            bar.update(1)
    history = {k: np.asarray([np.asarray(h[k]) for h in hist]) for k in hist[-1]}
    history["round"] = history["round"].astype(np.int64)
    history["wall_s"] = np.asarray(walls)
    return state, history


@jax.jit
def _metrics_jit(cfg, z):
    return _round_metrics(cfg, z)


def run_algorithm1(
    key,
    model: Denoiser,
    params,
    schedule: Schedule,
    objective: Callable,
    rounds: int,
    *,
    progress: bool = True,
    **kwargs,
):
    """:func:`algorithm1_init` then ``rounds`` rounds of :func:`algorithm1_step`
    (arXiv 2404.14743, Algorithm 1). ``kwargs`` go to :func:`algorithm1_init`.

    Returns:
      ``(state, history)`` as :func:`run_rounds` (``rounds + 1`` entries per metric).
    """
    rounds = check_positive_int("rounds", rounds)
    state = algorithm1_init(key, model, params, schedule, objective, **kwargs)
    return run_rounds(state, rounds, progress=progress)


def run_algorithm2(
    key,
    model: Denoiser,
    params,
    schedule: Schedule,
    objective: Callable,
    optimizer: optax.GradientTransformation,
    rounds: int,
    *,
    progress: bool = True,
    **kwargs,
):
    """:func:`algorithm2_init` then ``rounds`` rounds of :func:`algorithm2_step`
    (arXiv 2404.14743, Algorithm 2). ``kwargs`` go to :func:`algorithm2_init`.

    Returns:
      ``(state, history)`` as :func:`run_rounds`, with ``finetune_loss``.
    """
    rounds = check_positive_int("rounds", rounds)
    state = algorithm2_init(key, model, params, schedule, objective, optimizer, **kwargs)
    return run_rounds(state, rounds, progress=progress)
