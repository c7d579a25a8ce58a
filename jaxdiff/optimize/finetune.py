"""Reward fine-tuning by backpropagating through the sampler (DRaFT-K / AlignProp).

The fine-tuned model ``theta`` draws ``x_T`` from the prior and runs a fixed-grid sampler
``x_{i+1} = Phi_i(x_i; theta)`` for ``N`` steps. The loss is

    L(theta) = -E[r(x_N)] + lambda * R(theta),

whose reward gradient flows through the **last K** sampler steps only: the state entering step
``N - K`` is held constant (``stop_gradient``), so

    grad_K = -E[ sum_{j >= N-K} (d r / d x_N) (prod_{i > j} d Phi_i / d x_i) d Phi_j / d theta ].

``K = N`` is the full gradient (AlignProp, Prabhudesai et al. arXiv 2310.03739); ``K < N`` is
DRaFT-K (Clark et al. arXiv 2309.17400), a biased but cheaper estimate. Each differentiable step
is wrapped in ``jax.checkpoint``: the backward pass stores one sampler state per step and
recomputes the network's activations, so memory grows with the state size, not the network's.

The regulariser ``R`` keeps the model near the pretrained one (``ref_params``):

* ``"kl"``: a path KL along the sampled trajectory, ``R = E[ sum_i w_i ||eps_theta(x_i, s_i) -
  eps_ref(x_i, s_i)||^2 ]`` with ``x_i`` held constant (see :func:`path_kl`, :func:`kl_weights`);
  for DDPM / DDIM (``eta > 0``) / Euler-Maruyama this is exactly the sum over steps of the KL
  between the two Gaussian transition kernels, for deterministic samplers the continuous-time
  (Girsanov) KL of the associated reverse SDEs, discretised on the grid (a surrogate). KL
  regularised reward fine-tuning: Fan et al. arXiv 2305.16381 (DPOK); Uehara et al. arXiv
  2402.15194.
* ``"score_matching"``: the pretraining loss :func:`jaxdiff.losses.dsm_loss` on a batch of
  pretraining data (keeps the model a good score of the data).
* ``"none"``.

Loop: :func:`init` -> :class:`FinetuneState`; :func:`step` (pure, jit-able; step ``i`` uses
``fold_in(state.key, i)``); :func:`jit_step` (``step`` compiled once per reward structure); and
:func:`run` (progress bar, history, orbax checkpoints through :mod:`jaxdiff.train`).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxdiff import train as _train
from jaxdiff._checks import NonFiniteError, check_positive_int, fail, is_concrete
from jaxdiff.denoiser import Denoiser
from jaxdiff.losses import dsm_loss
from jaxdiff.samplers.api import prior_sample
from jaxdiff.samplers.base import Sampler
from jaxdiff.samplers.classic import DDIM, DDPM, EulerMaruyama, ddim
from jaxdiff.samplers.grids import resolve_grid
from jaxdiff.schedules import Schedule

__all__ = [
    "REGULARIZERS",
    "FinetuneConfig",
    "FinetuneState",
    "init",
    "step",
    "jit_step",
    "run",
    "draft_sample",
    "kl_weights",
    "path_kl",
    "draft_loss",
    "check_reward",
    "nearest_distance",
    "save_checkpoint",
    "restore_checkpoint",
]

REGULARIZERS = ("kl", "score_matching", "none")


class FinetuneConfig(struct.PyTreeNode):
    """Everything :func:`step` needs besides the parameters, a pytree.

    Leaves (traced; changing them under ``jit`` never recompiles): ``model``'s and
    ``schedule``'s numbers, ``sampler`` (e.g. DDIM's ``eta``), the grid ``ts`` ``(N + 1,)``,
    ``reg_weight`` (``lambda``) and ``ema_decay``. Static (part of the compiled program):
    ``optimizer``, ``k``, ``batch_size``, ``regularizer``, ``reg_batch_size``, ``checkpoint``,
    ``event_shape`` and the DSM options ``dsm_kwargs``.
    """

    model: Denoiser
    schedule: Schedule
    sampler: Sampler
    ts: Any
    reg_weight: Any
    ema_decay: Any
    optimizer: optax.GradientTransformation = struct.field(pytree_node=False)
    k: int = struct.field(pytree_node=False, default=1)
    batch_size: int = struct.field(pytree_node=False, default=64)
    regularizer: str = struct.field(pytree_node=False, default="kl")
    reg_batch_size: int = struct.field(pytree_node=False, default=64)
    checkpoint: bool = struct.field(pytree_node=False, default=True)
    event_shape: tuple = struct.field(pytree_node=False, default=())
    dsm_kwargs: tuple = struct.field(pytree_node=False, default=())

    @property
    def num_steps(self) -> int:
        """``N``, the number of sampler steps (``ts.shape[0] - 1``)."""
        return int(self.ts.shape[0]) - 1


class FinetuneState(struct.PyTreeNode):
    """Fine-tuning state, a pytree.

    Attributes:
      step: optimizer steps taken, int32 scalar.
      key: raw PRNG key data (``uint32``; step ``i`` uses ``fold_in(key, i)``).
      params: the fine-tuned parameters ``theta``.
      ref_params: the frozen pretrained parameters (the regulariser's reference).
      opt_state: the optax state.
      ema_params: exponential moving average of ``params`` (None when ``ema_decay == 0``).
      config: a :class:`FinetuneConfig`.
    """

    step: Any
    key: Any
    params: Any
    ref_params: Any
    opt_state: Any
    ema_params: Any
    config: FinetuneConfig


# ------------------------------------------------------------------------------------------
# the differentiable sampler
# ------------------------------------------------------------------------------------------
def _kernel(sampler: Sampler, model: Denoiser, schedule: Schedule):
    try:
        return sampler.kernel(model, schedule)
    except NotImplementedError:
        fail(
            "sampler",
            sampler.name,
            "a fixed-grid jaxdiff sampler with a kernel (ddim, ddpm, euler_maruyama, "
            "dpm_solver_pp, unipc, deis, heun, ...); samplers that own their solve (diffrax) "
            "are not supported",
        )


def draft_sample(
    key,
    model: Denoiser,
    params,
    schedule: Schedule,
    x_T,
    ts,
    sampler: Sampler,
    k: int,
    *,
    checkpoint: bool = True,
    cond=None,
    return_trajectory: bool = False,
):
    """Run ``sampler`` from ``x_T`` over ``ts`` with the gradient in ``params`` flowing through
    the last ``k`` steps only (DRaFT-K, Clark et al. arXiv 2309.17400; ``k = N`` is AlignProp's
    full backpropagation, Prabhudesai et al. arXiv 2310.03739).

    Steps ``0 .. N-k-1`` run with ``stop_gradient(params)`` and the state they produce is
    ``stop_gradient``-ed; steps ``N-k .. N-1`` run with ``params``, each inside
    ``jax.checkpoint`` when ``checkpoint`` (the gradient is unchanged; the backward pass stores
    one sampler state per step and recomputes the network's activations). Step ``i`` uses the
    key ``fold_in(key, i)`` and goes from ``ts[i]`` to ``ts[i+1]``, as in
    :func:`jaxdiff.samplers.solve`, so the forward result equals ``solve``'s.

    Args:
      key: PRNG key (used by stochastic samplers).
      model, params, schedule: the model, its parameters and its schedule.
      x_T: initial state ``(batch, *event_shape)``.
      ts: decreasing grid ``(N + 1,)``.
      sampler: a fixed-grid sampler (one with a ``kernel``).
      k: number of differentiable final steps, ``1 <= k <= N`` (a Python int).
      checkpoint: wrap each differentiable step in ``jax.checkpoint``.
      cond: optional condition passed to the model.
      return_trajectory: also return the states entering each step.
    Returns:
      ``x_N`` shaped like ``x_T``; with ``return_trajectory``, ``(x_N, xs)`` where
      ``xs[i]`` ``(N, batch, *event_shape)`` is the (gradient-stopped) state entering step ``i``.
    """
    n = int(ts.shape[0]) - 1
    k = _check_k(k, n)
    kernel = _kernel(sampler, model, schedule)
    frozen = jax.lax.stop_gradient(params)
    n_frozen = n - k

    def one_step(p, state, i):
        x_in = jax.lax.stop_gradient(kernel.output(state))
        state, _ = kernel.step(jax.random.fold_in(key, i), state, ts[i], ts[i + 1], p, cond)
        return state, x_in

    diff_step = jax.checkpoint(one_step, prevent_cse=False) if checkpoint else one_step
    state = kernel.init(x_T, frozen if n_frozen else params, cond, ts)
    xs = []
    if n_frozen:
        state, xs_a = jax.lax.scan(lambda s, i: one_step(frozen, s, i), state, jnp.arange(n_frozen))
        state = jax.lax.stop_gradient(state)
        xs.append(xs_a)
    state, xs_b = jax.lax.scan(lambda s, i: diff_step(params, s, i), state, jnp.arange(n_frozen, n))
    xs.append(xs_b)
    x_end = kernel.output(state)
    if not return_trajectory:
        return x_end
    return x_end, (xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=0))


# ------------------------------------------------------------------------------------------
# regularisers
# ------------------------------------------------------------------------------------------
def kl_weights(sampler: Sampler, schedule: Schedule, ts):
    """Per-step weights ``w_i`` of the path KL ``sum_i w_i ||eps_theta - eps_ref||^2``.

    With ``s = ts[i]``, ``t = ts[i+1]``, ``h = lambda(t) - lambda(s) > 0`` (``lambda = log
    alpha/sigma``) and the step's Gaussian transition ``N(m_theta, v I)``, the KL of one step is
    ``||m_theta - m_ref||^2 / (2 v)``; ``m`` is affine in the eps-prediction, so it is
    ``w_i ||eps_theta - eps_ref||^2`` with (derivations in ``docs/reward_finetuning.md``):

    * DDPM ``"small"`` (= DDIM ``eta = 1``): ``w = (e^{2h} - 1) / 2``.
    * DDPM ``"large"``: ``w = alpha_t^2 (1 - e^{-2h}) / (2 alpha_s^2)``.
    * DDIM ``0 < eta``: with ``q = eta^2 (1 - e^{-2h})``,
      ``w = (sqrt(1 - q) - e^h)^2 / (2 q)`` (Song et al. arXiv 2010.02502, eq. 12).
    * Euler-Maruyama: ``w = g(s)^2 (s - t) / (2 sigma(s)^2)``.
    * every other sampler (deterministic ones, DDIM ``eta = 0``): ``w = h``, the continuous-time
      KL between the reverse SDEs of the two models (Girsanov; Song et al. arXiv 2101.09258,
      thm. 1: ``KL = E int g^2/(2 sigma^2) ||eps_theta - eps_ref||^2 dt``, and
      ``g^2 / (2 sigma^2) = -d lambda/dt``), with the eps difference held at its value at ``s``
      over the interval. For a deterministic sampler the two path measures are singular, so this
      is a surrogate evaluated along the ODE trajectory (as the eps-matching KL bound of DPOK,
      Fan et al. arXiv 2305.16381, lemma 4.1).

    Args:
      sampler: the sampler; schedule: its schedule; ts: the grid ``(N + 1,)``.
    Returns:
      weights ``(N,)`` in the dtype of ``ts``.
    """
    ts = jnp.asarray(ts)
    s, t = ts[:-1], ts[1:]
    h = schedule.lam(t) - schedule.lam(s)
    if isinstance(sampler, DDPM):
        if sampler.variance == "small":
            return 0.5 * jnp.expm1(2.0 * h)
        a_s, a_t = schedule.alpha(s), schedule.alpha(t)
        return 0.5 * (a_t / a_s) ** 2 * (-jnp.expm1(-2.0 * h))
    if isinstance(sampler, DDIM) and sampler.stochastic:
        eta = jnp.asarray(sampler.eta, h.dtype)
        pos = eta > 0
        q = jnp.where(pos, eta**2, 1.0) * (-jnp.expm1(-2.0 * h))
        w = (jnp.sqrt(1.0 - q) - jnp.exp(h)) ** 2 / (2.0 * q)
        return jnp.where(pos, w, h)
    if isinstance(sampler, EulerMaruyama):
        return 0.5 * schedule.diffusion_sq(s) * (s - t) / schedule.sigma(s) ** 2
    return h


def path_kl(
    model: Denoiser,
    params,
    ref_params,
    schedule: Schedule,
    xs,
    ts,
    sampler: Sampler,
    cond=None,
    *,
    checkpoint: bool = True,
):
    """Per-example path KL ``sum_i w_i ||eps_theta(x_i, s_i) - eps_ref(x_i, s_i)||^2``.

    ``x_i = xs[i]`` (held constant: the gradient flows through ``eps_theta``'s parameters only,
    as in DPOK, Fan et al. arXiv 2305.16381), ``s_i = ts[i]``, ``w_i`` from :func:`kl_weights`,
    ``eps_ref`` from the frozen ``ref_params``. The squared norm sums over the event dims.

    Args:
      xs: states entering each step, ``(N, batch, *event_shape)`` (``draft_sample(...,
        return_trajectory=True)``).
      ts: grid ``(N + 1,)``.
    Returns:
      ``(batch,)``.
    """
    w = kl_weights(sampler, schedule, ts).astype(xs.dtype)
    ref = jax.lax.stop_gradient(ref_params)

    def term(p, x, s, wi, e_ref):
        _, e_ft = model.x0_eps(p, x, s, cond, schedule)
        d = jnp.sum(jnp.square(e_ft - e_ref).reshape(x.shape[0], -1), axis=-1)
        return wi * d

    if checkpoint:  # the backward pass recomputes eps_theta; eps_ref is an input (stored)
        term = jax.checkpoint(term, prevent_cse=False)

    def body(acc, inp):
        x, s, wi = inp
        x = jax.lax.stop_gradient(x)
        e_ref = jax.lax.stop_gradient(model.x0_eps(ref, x, s, cond, schedule)[1])
        return acc + term(params, x, s, wi, e_ref), None

    acc0 = jnp.zeros(xs.shape[1:2], xs.dtype)
    out, _ = jax.lax.scan(body, acc0, (xs, jnp.asarray(ts)[:-1], w))
    return out


# ------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------
def _check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= int(k) <= n:
        fail("k", k, f"an integer in [1, {n}] (the number of sampler steps to backpropagate)")
    return int(k)


def _first_line(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


def check_reward(reward_fn: Callable, x_shape, dtype=None) -> None:
    """Raise :class:`~jaxdiff.JaxdiffError` (naming ``reward_fn``) unless ``reward_fn`` maps
    ``x`` of shape ``x_shape = (batch, *event)`` to real rewards of shape ``(batch,)`` and is
    traceable and reverse-mode differentiable by JAX (checked abstractly with
    ``jax.eval_shape``: no computation runs)."""
    x = jax.ShapeDtypeStruct(tuple(x_shape), dtype or jnp.result_type(float))
    if not callable(reward_fn):
        fail("reward_fn", reward_fn, "a function x (batch, *event) -> rewards (batch,)")
    try:
        out = jax.eval_shape(reward_fn, x)
    except Exception as e:
        fail(
            "reward_fn",
            reward_fn,
            "a JAX-traceable function (jnp, not numpy or Python control flow on values); "
            f"tracing it raised {_first_line(e)}",
        )
    if not isinstance(out, jax.ShapeDtypeStruct) or tuple(out.shape) != (x.shape[0],):
        got = getattr(out, "shape", type(out).__name__)
        fail(
            "reward_fn",
            reward_fn,
            f"one reward per example, shape ({x.shape[0]},) for x of shape {x.shape} (got {got})",
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        fail(
            "reward_fn",
            reward_fn,
            f"real-valued (floating) rewards to differentiate (got dtype {out.dtype})",
        )
    try:
        jax.eval_shape(jax.grad(lambda z: jnp.sum(reward_fn(z))), x)
    except Exception as e:
        fail("reward_fn", reward_fn, f"a reverse-mode differentiable function ({_first_line(e)})")


def nearest_distance(x, data):
    """Per-example distance to the nearest row of ``data``: ``min_j ||x_i - y_j||``.

    Args:
      x: ``(batch, *event)``; data: ``(M, *event)``.
    Returns:
      ``(batch,)``.
    """
    xf = x.reshape(x.shape[0], -1)
    yf = jnp.asarray(data, xf.dtype).reshape(data.shape[0], -1)
    d2 = jnp.sum(xf**2, -1)[:, None] - 2.0 * xf @ yf.T + jnp.sum(yf**2, -1)[None, :]
    return jnp.sqrt(jnp.maximum(jnp.min(d2, axis=-1), 0.0))


def _raw_key(key):
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    if key.dtype != jnp.uint32:
        fail("key", key, "a PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed))")
    return key


# ------------------------------------------------------------------------------------------
# init / loss / step
# ------------------------------------------------------------------------------------------
def init(
    key,
    model: Denoiser,
    params,
    schedule: Schedule,
    optimizer: optax.GradientTransformation,
    *,
    sampler: Sampler | None = None,
    num_steps: int | None = 20,
    k: int | None = None,
    batch_size: int = 64,
    regularizer: str = "kl",
    reg_weight=0.1,
    reg_batch_size: int | None = None,
    ema_decay=0.99,
    checkpoint: bool = True,
    ts=None,
    grid: str | None = None,
    t_start=None,
    t_end=None,
    dtype=None,
    **dsm_kwargs,
) -> FinetuneState:
    """A fresh :class:`FinetuneState` for reward fine-tuning ``params``.

    Args:
      key: PRNG key; step ``i`` uses ``fold_in(key, i)``.
      model: a :class:`~jaxdiff.denoiser.Denoiser` with a fixed ``event_shape``.
      params: pretrained parameters (also stored, frozen, as ``ref_params``).
      schedule: the schedule the model was trained with.
      optimizer: any optax gradient transformation.
      sampler: a fixed-grid sampler (default ``ddim()``, deterministic).
      num_steps: sampler steps ``N`` (a grid of kind ``grid`` from ``t_start`` to ``t_end``);
        or pass ``ts``.
      k: differentiable final steps ``1 <= k <= N`` (default ``N``: full backpropagation).
      batch_size: samples per step.
      regularizer: ``"kl"``, ``"score_matching"`` or ``"none"`` (see the module docstring).
      reg_weight: ``lambda >= 0`` (a leaf: sweep it without recompiling).
      reg_batch_size: data examples per step for ``"score_matching"`` (default ``batch_size``).
      ema_decay: EMA decay in ``[0, 1)``; 0 keeps no EMA.
      checkpoint: ``jax.checkpoint`` every differentiable step.
      ts: an explicit decreasing grid ``(N + 1,)``.
      grid, t_start, t_end: grid kind (default the sampler's) and endpoints.
      dtype: float dtype of the samples (default: jax's default float).
      **dsm_kwargs: forwarded to :func:`jaxdiff.losses.dsm_loss` (hashable values: ``weighting=``,
        ``t_sampling=``, ...; they are compile-time constants).
    Returns:
      the state; ``state.config`` holds the settings.
    Raises:
      JaxdiffError naming the bad argument (``k``, ``num_steps``, ``regularizer``, ...).
    """
    if not isinstance(model, Denoiser):
        fail("model", type(model).__name__, "a jaxdiff Denoiser (see jaxdiff.models.as_denoiser)")
    if model.event_shape is None:
        fail("model", "event_shape=None", "a Denoiser with a fixed event_shape (pass x_example)")
    if not isinstance(schedule, Schedule):
        fail("schedule", type(schedule).__name__, "a jaxdiff schedule")
    sampler = ddim() if sampler is None else sampler
    if not isinstance(sampler, Sampler):
        fail("sampler", sampler, "a jaxdiff sampler, e.g. jaxdiff.samplers.ddim()")
    _kernel(sampler, model, schedule)
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        fail("optimizer", optimizer, "an optax GradientTransformation, e.g. optax.adam(1e-4)")
    if regularizer not in REGULARIZERS:
        fail("regularizer", regularizer, f"one of {REGULARIZERS}")
    batch_size = check_positive_int("batch_size", batch_size)
    reg_batch_size = check_positive_int(
        "reg_batch_size", batch_size if reg_batch_size is None else reg_batch_size
    )
    if is_concrete(reg_weight) and not (np.isfinite(float(reg_weight)) and float(reg_weight) >= 0):
        fail("reg_weight", reg_weight, "a finite number >= 0")
    if is_concrete(ema_decay) and not 0.0 <= float(ema_decay) < 1.0:
        fail("ema_decay", ema_decay, "a number in [0, 1) (0 disables the EMA)")
    dtype = dtype or jnp.result_type(float)
    ts = resolve_grid(
        schedule, sampler.min_steps, sampler.default_grid, num_steps, ts, grid, t_start, t_end,
        dtype=dtype, steps_arg="num_steps",
    )  # fmt: skip
    n = int(ts.shape[0]) - 1
    k = n if k is None else _check_k(k, n)
    no_ema = is_concrete(ema_decay) and float(ema_decay) == 0.0
    config = FinetuneConfig(
        model=model,
        schedule=schedule,
        sampler=sampler,
        ts=ts,
        reg_weight=jnp.asarray(reg_weight, dtype),
        ema_decay=jnp.asarray(ema_decay, dtype),
        optimizer=optimizer,
        k=k,
        batch_size=batch_size,
        regularizer=regularizer,
        reg_batch_size=reg_batch_size,
        checkpoint=bool(checkpoint),
        event_shape=tuple(model.event_shape),
        dsm_kwargs=tuple(sorted(dsm_kwargs.items())),
    )
    return FinetuneState(
        step=jnp.zeros((), jnp.int32),
        key=_raw_key(key),
        params=params,
        ref_params=params,
        opt_state=optimizer.init(params),
        ema_params=None if no_ema else params,
        config=config,
    )


def _step_keys(key, step_index):
    """``(k_prior, k_sampler, k_data, k_dsm) = split(fold_in(key, step), 4)``."""
    return jax.random.split(jax.random.fold_in(key, step_index), 4)


def draft_loss(params, ref_params, key, config: FinetuneConfig, reward_fn: Callable, data=None):
    """The fine-tuning loss ``-mean_b r(x_N^b) + lambda R`` and its parts.

    ``key`` is split as ``(k_prior, k_sampler, k_data, k_dsm) = split(key, 4)``: ``x_T =
    prior_sample(k_prior, ...)`` (row ``b`` from ``fold_in(k_prior, b)``), the sampler runs with
    ``k_sampler`` (:func:`draft_sample`), and ``"score_matching"`` evaluates
    ``dsm_loss(params, k_dsm, model, schedule, x_data)`` on
    ``x_data = train.draw_batch(k_data, data, reg_batch_size)[0]``. ``"kl"`` is the batch mean of
    :func:`path_kl` along the sampled trajectory.

    Returns:
      ``(loss, aux)`` with ``aux = {"reward": (batch,), "regularizer": scalar, "x": x_N}``
      (``x`` gradient-stopped).
    """
    c = config
    k_prior, k_sampler, k_data, k_dsm = jax.random.split(key, 4)
    dtype = c.ts.dtype
    x_T = prior_sample(k_prior, c.schedule, (c.batch_size, *c.event_shape), dtype)
    x0, xs = draft_sample(
        k_sampler,
        c.model,
        params,
        c.schedule,
        x_T,
        c.ts,
        c.sampler,
        c.k,
        checkpoint=c.checkpoint,
        return_trajectory=True,
    )
    r = reward_fn(x0)
    if c.regularizer == "kl":
        reg = jnp.mean(
            path_kl(
                c.model, params, ref_params, c.schedule, xs, c.ts, c.sampler,
                checkpoint=c.checkpoint,
            )
        )  # fmt: skip
    elif c.regularizer == "score_matching":
        x_data, _ = _train.draw_batch(k_data, data, c.reg_batch_size)
        x_data = jnp.asarray(x_data, dtype)
        reg = dsm_loss(params, k_dsm, c.model, c.schedule, x_data, None, **dict(c.dsm_kwargs))
    else:
        reg = jnp.zeros((), dtype)
    loss = -jnp.mean(r) + c.reg_weight.astype(dtype) * reg
    return loss, {"reward": r, "regularizer": reg, "x": jax.lax.stop_gradient(x0)}


def step(state: FinetuneState, reward_fn: Callable, data=None, eval_data=None):
    """One fine-tuning step, pure and jit-able: ``(state, metrics)``.

    With ``(loss, aux), g = value_and_grad(draft_loss)(params, ...)`` at the key
    ``fold_in(state.key, state.step)``: ``params <- apply_updates(params, optimizer.update(g))``,
    ``ema <- d ema + (1 - d) params`` and ``step <- step + 1``.

    Args:
      state: a :class:`FinetuneState`.
      reward_fn: ``r(x) -> (batch,)`` real rewards, differentiable (a function, or a pytree
        with ``__call__`` whose leaves, e.g. a target, can be swept without recompiling).
      data: pretraining data for ``"score_matching"``: an array ``(M, *event)`` or a function
        ``data(key, n)`` (see :func:`jaxdiff.train.draw_batch`); ignored otherwise.
      eval_data: optional ``(M, *event)`` data; adds ``metrics["dist_to_data"]``, the batch
        mean of :func:`nearest_distance` of this step's samples.
    Returns:
      ``(state, metrics)``; metrics (scalars, before the update): ``loss``, ``reward`` (batch
      mean), ``reward_std``, ``regularizer``, ``grad_norm`` (and ``dist_to_data``).
    Raises:
      JaxdiffError: a bad ``reward_fn`` (see :func:`check_reward`) or missing ``data``.
    """
    c = state.config
    check_reward(reward_fn, (c.batch_size, *c.event_shape), c.ts.dtype)
    if c.regularizer == "score_matching" and data is None:
        fail("data", None, "pretraining data (an array or data(key, n)) for 'score_matching'")
    key = jax.random.wrap_key_data(state.key)
    (loss, aux), grads = jax.value_and_grad(draft_loss, has_aux=True)(
        state.params, state.ref_params, jax.random.fold_in(key, state.step), c, reward_fn, data
    )
    updates, opt_state = c.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        ema = optax.incremental_update(params, ema, 1.0 - c.ema_decay)
    r = aux["reward"]
    metrics = {
        "loss": loss,
        "reward": jnp.mean(r),
        "reward_std": jnp.std(r),
        "regularizer": aux["regularizer"],
        "grad_norm": optax.tree.norm(grads),
    }
    if eval_data is not None:
        metrics["dist_to_data"] = jnp.mean(nearest_distance(aux["x"], eval_data))
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
    return new, metrics


# ------------------------------------------------------------------------------------------
# compiled step and the loop
# ------------------------------------------------------------------------------------------
def _is_dynamic(leaf) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic | float | int | complex)


def _partition(tree):
    leaves, treedef = jax.tree.flatten(tree)
    dyn = [leaf if _is_dynamic(leaf) else None for leaf in leaves]
    static = tuple(None if _is_dynamic(leaf) else leaf for leaf in leaves)
    return dyn, (treedef, static)


def _combine(dyn, static):
    treedef, st = static
    return treedef.unflatten([d if s is None else s for d, s in zip(dyn, st, strict=True)])


@functools.partial(jax.jit, static_argnames=("static",))
def _step_jit(state, dyn, static):
    r_dyn, d_dyn, e_dyn = dyn
    r_st, d_st, e_st = static
    return step(state, _combine(r_dyn, r_st), _combine(d_dyn, d_st), _combine(e_dyn, e_st))


def jit_step(state: FinetuneState, reward_fn: Callable, data=None, eval_data=None):
    """:func:`step` under ``jit``, compiled once per structure of its arguments.

    ``reward_fn`` and ``data`` may be plain functions (compile-time constants) or pytrees: their
    array and number leaves are traced, so a new target or a new ``state.config.reg_weight``
    reuses the compiled step.
    """
    parts = [_partition(a) for a in (reward_fn, data, eval_data)]
    dyn = tuple(p[0] for p in parts)
    static = tuple(p[1] for p in parts)
    return _step_jit(state, dyn, static)


def save_checkpoint(path, state: FinetuneState) -> str:
    """Save ``state`` under ``path/<state.step>`` (:func:`jaxdiff.train.save_checkpoint`)."""
    return _train.save_checkpoint(path, state)


def restore_checkpoint(path, target: FinetuneState, step: int | None = None) -> FinetuneState:
    """Restore a state saved by :func:`save_checkpoint` into ``target``'s structure (a state from
    :func:`init` with the same settings); ``step`` defaults to the latest."""
    return _train.restore_checkpoint(path, target=target, step=step)


def run(
    state: FinetuneState,
    reward_fn: Callable,
    num_iters: int,
    *,
    data=None,
    eval_data=None,
    progress: bool = True,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
) -> tuple[FinetuneState, dict]:
    """Run ``num_iters`` fine-tuning steps (:func:`jit_step`); return ``(state, history)``.

    Args:
      state: from :func:`init` (or :func:`restore_checkpoint`: step ``i`` still uses
        ``fold_in(key, i)``, so a resumed run equals an uninterrupted one).
      reward_fn: ``r(x) -> (batch,)`` (see :func:`step`).
      num_iters: steps to take (>= 1).
      data: pretraining data for ``"score_matching"``.
      eval_data: data ``(M, *event)`` for the ``dist_to_data`` metric.
      progress: show a tqdm bar (reward, regulariser).
      checkpoint_dir, checkpoint_every: save the state with orbax every ``checkpoint_every``
        steps and at the end (when ``checkpoint_dir`` is given).
    Returns:
      ``(state, history)``: numpy arrays ``step`` and every metric of :func:`step`, one entry
      per step, and ``wall_s`` (seconds since the start, compilation included).
    Raises:
      JaxdiffError: bad arguments. NonFiniteError: the loss became NaN/inf.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    if not isinstance(state, FinetuneState):
        fail("state", type(state).__name__, "a FinetuneState from finetune.init")
    num_iters = check_positive_int("num_iters", num_iters)
    c = state.config
    check_reward(reward_fn, (c.batch_size, *c.event_shape), c.ts.dtype)
    if eval_data is not None:
        eval_data = jnp.asarray(eval_data)
        c.model.check_x(eval_data, "eval_data")
    if c.regularizer == "score_matching":
        if data is None:
            fail("data", None, "pretraining data (an array or data(key, n)) for 'score_matching'")
        if not callable(data):
            data = jnp.asarray(data)
            c.model.check_x(data, "data")
    if checkpoint_every is not None:
        checkpoint_every = check_positive_int("checkpoint_every", checkpoint_every)
        if checkpoint_dir is None:
            fail("checkpoint_dir", None, "a directory when checkpoint_every is given")
    hist: dict[str, list] = {"step": [], "wall_s": []}
    with tqdm(total=num_iters, disable=not progress, desc="finetune", unit="step") as bar:
        for _ in range(num_iters):
            state, metrics = jit_step(state, reward_fn, data, eval_data)
            metrics = {name: float(v) for name, v in metrics.items()}
            s = int(state.step)
            if not np.isfinite(metrics["loss"]):
                raise NonFiniteError(
                    f"fine-tuning loss is non-finite at step {s - 1}; lower the learning rate, "
                    "raise reg_weight, or check the reward for NaN/inf"
                )
            hist["step"].append(s)
            for name, v in metrics.items():
                hist.setdefault(name, []).append(v)
            hist["wall_s"].append(time.perf_counter() - t_start)
            if checkpoint_every is not None and s % checkpoint_every == 0:
                save_checkpoint(checkpoint_dir, state)
            bar.set_postfix(reward=f"{metrics['reward']:.4g}", reg=f"{metrics['regularizer']:.3g}")
            bar.update(1)
    if checkpoint_dir is not None:
        save_checkpoint(os.fspath(checkpoint_dir), state)
    history = {
        name: np.asarray(v, np.int64 if name == "step" else np.float64) for name, v in hist.items()
    }
    return state, history
