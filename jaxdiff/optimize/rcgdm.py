"""Reward-directed conditional diffusion (RCGDM): sample designs whose reward is close to a target.

Yuan, Huang, Ni, Chen, Wang, "Reward-Directed Conditional Diffusion: Provable Distribution
Estimation and Reward Improvement" (NeurIPS 2023, arXiv 2307.07055); pairwise-preference labels:
Li, Yuan, Huang, Ni, Ye, Chen, Wang, "Diffusion Model for Data-Driven Black-Box Optimization"
(arXiv 2403.13219); ../shared/reference/guidance.md section 1.

The pipeline (guidance.md 1.2), for a large unlabelled set ``x_u (n1, D)`` and a small labelled one
``(x_l, y_l)`` (``n2 << n1``):

1. **reward learning** on the labelled set: :func:`fit_reward` (ridge ``theta_hat = (X^T X +
   lam I)^{-1} X^T y`` or a Flax MLP regressor) or, from pairwise comparisons,
   :func:`fit_preferences` (Bradley-Terry, ``P(i > j) = sigmoid(r(x_i) - r(x_j))``);
2. **pseudo-labelling** the unlabelled set: ``y_hat_j = f_hat(x_j) + nu xi_j``, ``xi ~ N(0, 1)``
   (:func:`pseudo_label`);
3. **conditional score matching** on ``(x_j, y_hat_j)``: a real-conditioned
   :class:`~jaxdiff.models.MLPScoreNet` trained by :mod:`jaxdiff.train` on the normalised label
   ``c = (y_hat - mean) / std`` (:func:`init` / :func:`step` / :func:`run`);
4. **conditioned generation** at a target reward ``a`` with any jaxdiff sampler
   (:func:`sample`, :func:`sweep_targets`), optionally with classifier-free guidance.

Choosing ``a`` (guidance.md 1.4): the achieved reward first grows with ``a`` and then saturates
while the samples leave the data's support; :func:`sweep_targets` reports predicted reward,
achieved (true) reward and an off-support distance per target, :func:`quantile_targets` gives
targets for preference-trained rewards (whose scale is only known up to the Bradley-Terry link),
and a target outside the pseudo-labels' reliable range raises an :class:`ExtrapolationWarning`.

Oracle: for Gaussian (or linear-subspace) data and a linear pseudo-labeller, ``x | y_hat = a`` is
Gaussian in closed form (:func:`linear_gaussian_conditional`, :func:`exact_conditional`) and the
expected true reward is ``a theta^T Sigma theta_hat / (theta_hat^T Sigma theta_hat + nu^2)``
(:func:`conditional_expected_reward`).

Guidance variant (the paper's image experiment, guidance.md 1.2 "Variant"): a reward predictor
``mu(x_t, t)`` trained on noised inputs (:class:`NoisyRewardMLP`, :func:`train_noisy_reward`) and
the score-space term ``G = gamma (a - mu(x_t, t)) grad_x mu(x_t, t)``, per example
(:func:`reward_guidance`), for :func:`jaxdiff.guidance.guide`.

Every number a user sweeps (targets ``a``, ``nu``, ``gamma``, reward parameters) is a pytree leaf:
sweeping it under ``jit`` never recompiles. All reductions over a batch are per example.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxdiff import analytic, metrics
from jaxdiff import train as _train
from jaxdiff._checks import NonFiniteError, as_float_array, check_positive_int, fail, is_concrete
from jaxdiff.denoiser import Denoiser
from jaxdiff.guidance.base import GuidanceContext, GuidanceTerm, _bcast, guide, scale_at
from jaxdiff.guidance.cfg import cfg
from jaxdiff.guidance.classifier import time_conditioned_trunk
from jaxdiff.models import MLPScoreNet, as_denoiser
from jaxdiff.samplers.api import prior_sample
from jaxdiff.samplers.api import sample as _sample
from jaxdiff.samplers.base import Sampler
from jaxdiff.samplers.classic import ddim
from jaxdiff.schedules import Schedule, vp_linear

__all__ = [
    "REWARD_KINDS",
    "ExtrapolationWarning",
    "LinearReward",
    "MLPReward",
    "RewardMLP",
    "fit_reward",
    "fit_preferences",
    "bradley_terry_loss",
    "pseudo_label",
    "reliable_range",
    "LabelScaler",
    "RCGDM",
    "init",
    "step",
    "run",
    "train_more",
    "sample",
    "sweep_targets",
    "quantile_targets",
    "check_targets",
    "linear_gaussian_conditional",
    "exact_conditional",
    "conditional_expected_reward",
    "NoisyRewardMLP",
    "NoisyReward",
    "train_noisy_reward",
    "RewardGuidance",
    "reward_guidance",
]

#: Reward-model kinds accepted by :func:`fit_reward` and :func:`fit_preferences`.
REWARD_KINDS = ("linear", "ridge", "mlp")


class ExtrapolationWarning(UserWarning):
    """A target reward outside the range the pseudo-labels support (guidance.md 1.4, 1.7)."""


# ------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------
def _flat(x):
    x = as_float_array(x)
    return x.reshape(x.shape[0], -1)


def _check_inputs(arg: str, x, min_rows: int = 1):
    """``x`` as a float array ``(N, *event)`` with ``N >= min_rows`` and finite rows."""
    if not hasattr(x, "shape") and not isinstance(x, list | tuple):
        fail(arg, x, "an array of shape (N, *event_shape)")
    x = as_float_array(x)
    if x.ndim < 2:
        fail(arg, f"shape {tuple(x.shape)}", "shape (N, *event_shape) with a leading axis")
    if is_concrete(x):
        ok = np.isfinite(np.asarray(x).reshape(x.shape[0], -1)).all(axis=1)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            fail(arg, f"shape {tuple(x.shape)}", f"finite inputs (row {i} holds NaN or inf)")
    return x


def _check_labels(arg: str, y, n: int):
    """``y`` as a float array ``(n,)`` of finite labels (the first bad index is named)."""
    y = as_float_array(y)
    if y.shape != (n,):
        fail(arg, f"shape {tuple(y.shape)}", f"shape ({n},): one label per row of x")
    if is_concrete(y):
        yy = np.asarray(y)
        bad = ~np.isfinite(yy)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            fail(
                arg,
                f"array with {int(bad.sum())} non-finite label(s)",
                f"finite labels ({arg}[{i}] = {yy[i]})",
            )
    return y


def _check_nonneg(arg: str, v):
    v = as_float_array(v)
    if v.ndim != 0:
        fail(arg, f"shape {tuple(v.shape)}", "a scalar")
    if is_concrete(v) and not float(v) >= 0.0:
        fail(arg, float(v), "a finite number >= 0")
    return v


def _check_kind(kind):
    if kind not in REWARD_KINDS:
        fail("kind", kind, f"one of {REWARD_KINDS}")


def _check_optimizer(optimizer):
    if optimizer is None:
        return optax.adam(1e-3)
    if not isinstance(optimizer, optax.GradientTransformation):
        fail("optimizer", optimizer, "an optax.GradientTransformation, e.g. optax.adam(1e-3)")
    return optimizer


# ------------------------------------------------------------------------------------------
# reward models
# ------------------------------------------------------------------------------------------
class LinearReward(struct.PyTreeNode):
    """``f(x) = theta^T flatten(x) + bias``; ``x (B, *event)`` -> ``(B,)``.

    Leaves: ``theta (D,)``, ``bias ()`` (so swapping or differentiating a reward never recompiles).
    Built by :func:`fit_reward` (``kind="linear" | "ridge"``) and :func:`fit_preferences`.
    """

    theta: Any
    bias: Any = 0.0

    def __call__(self, x):
        """Rewards ``(B,)`` of ``x (B, *event)``."""
        xf = _flat(x)
        if xf.shape[1] != jnp.shape(self.theta)[0]:
            fail(
                "x", f"shape {tuple(jnp.shape(x))}", f"{jnp.shape(self.theta)[0]} features per row"
            )
        return xf @ self.theta.astype(xf.dtype) + jnp.asarray(self.bias, xf.dtype)


class RewardMLP(nn.Module):
    """MLP regressor ``x (B, *event) -> (B,)``: ``depth`` blocks ``Dense_h -> act``, then
    ``Dense_1``. The network of :func:`fit_reward` / :func:`fit_preferences` with ``kind="mlp"``."""

    hidden: int = 64
    depth: int = 2
    activation: Callable = nn.silu

    @nn.compact
    def __call__(self, x):
        z = x.reshape(x.shape[0], -1)
        for i in range(self.depth):
            z = self.activation(nn.Dense(self.hidden, name=f"dense_{i}")(z))
        return nn.Dense(1, name="out")(z)[:, 0]


class MLPReward(struct.PyTreeNode):
    """``f(x) = y_mean + y_scale * module((flatten(x) - x_mean) / x_scale)``, ``(B,)``.

    ``module`` (static) is a Linen module ``(B, D) -> (B,)`` (default :class:`RewardMLP`);
    ``params``, ``x_mean (D,)``, ``x_scale ()``, ``y_mean ()``, ``y_scale ()`` are leaves. Inputs
    and labels are standardised for training; a Bradley-Terry fit keeps ``y_mean = 0``,
    ``y_scale = 1`` (its scale is that of the logistic link).
    """

    module: nn.Module = struct.field(pytree_node=False)
    params: Any
    x_mean: Any
    x_scale: Any = 1.0
    y_mean: Any = 0.0
    y_scale: Any = 1.0

    def __call__(self, x):
        """Rewards ``(B,)`` of ``x (B, *event)``."""
        xf = _flat(x)
        z = (xf - self.x_mean.astype(xf.dtype)) / jnp.asarray(self.x_scale, xf.dtype)
        out = self.module.apply(self.params, z)
        return jnp.asarray(self.y_mean, xf.dtype) + jnp.asarray(self.y_scale, xf.dtype) * out


# ---- the generic optax loop of the MLP fits ---------------------------------------------
def _l2(params):
    return sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))


@dataclasses.dataclass(frozen=True)
class _MSELoss:
    """``mean_i (module(x_i) - y_i)^2 + lam ||params||^2`` on a minibatch (standardised data)."""

    module: nn.Module

    def __call__(self, params, key, batch, aux):
        x, y = batch
        pred = self.module.apply(params, x)
        return jnp.mean(jnp.square(pred - y)) + aux["lam"] * _l2(params)


@dataclasses.dataclass(frozen=True)
class _BTLoss:
    """Bradley-Terry negative log-likelihood of a minibatch of pairs + ``lam ||params||^2``."""

    module: nn.Module

    def __call__(self, params, key, batch, aux):
        pairs, outcome = batch
        x = aux["x"]
        r = lambda idx: self.module.apply(params, jnp.take(x, idx, axis=0))  # noqa: E731
        return bradley_terry_loss(r(pairs[:, 0]) - r(pairs[:, 1]), outcome) + aux["lam"] * _l2(
            params
        )


@dataclasses.dataclass(frozen=True)
class _NoisyMSELoss:
    """MSE of ``module(x_t, t)`` to the standardised label, ``x_t = alpha x0 + sigma eps``."""

    module: nn.Module

    def __call__(self, params, key, batch, aux):
        x0, y = batch
        sch = aux["schedule"]
        k_t, k_eps = jax.random.split(key)
        t = jax.random.uniform(k_t, (x0.shape[0],), x0.dtype, aux["t_lo"], aux["t_hi"])
        a, s = sch.alpha_sigma(t)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        x_t = _bcast(a, x0) * x0 + _bcast(s, x0) * eps
        return jnp.mean(jnp.square(self.module.apply(params, x_t, t) - y))


class _FitState(struct.PyTreeNode):
    """State of the MLP fits: ``step`` (int32), ``params``, ``opt_state``."""

    step: Any
    params: Any
    opt_state: Any


def _fit_step(state: _FitState, key, batch, aux, *, loss, optimizer, batch_size):
    """One optax step on a minibatch drawn with ``fold_in(key, state.step)``; ``(state, loss)``."""
    num = jax.tree.leaves(batch)[0].shape[0]
    k_idx, k_loss = jax.random.split(jax.random.fold_in(key, state.step))
    idx = jax.random.randint(k_idx, (batch_size,), 0, num)
    mb = jax.tree.map(lambda v: jnp.take(v, idx, axis=0), batch)
    value, grads = jax.value_and_grad(loss)(state.params, k_loss, mb, aux)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return _FitState(step=state.step + 1, params=params, opt_state=opt_state), value


@functools.partial(jax.jit, static_argnames=("loss", "optimizer", "batch_size"))
def _fit_chunk(state, key, n, batch, aux, *, loss, optimizer, batch_size):
    def body(_, carry):
        st, tot = carry
        st, value = _fit_step(
            st, key, batch, aux, loss=loss, optimizer=optimizer, batch_size=batch_size
        )
        return st, tot + value

    zero = jnp.zeros((), jnp.result_type(float))
    state, tot = jax.lax.fori_loop(0, n, body, (state, zero))
    return state, tot / jnp.maximum(n, 1).astype(tot.dtype)


def _fit_loop(key, params, batch, aux, *, loss, optimizer, steps, batch_size, log_every, progress,
              desc):  # fmt: skip
    """Run ``steps`` optax steps in jitted chunks of ``log_every``; ``(params, history)``."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    state = _FitState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
    )
    hist = {"step": [], "loss": [], "wall_s": []}
    done = 0
    with tqdm(total=steps, disable=not progress, desc=desc, unit="step") as bar:
        while done < steps:
            n = min(log_every, steps - done)
            state, value = _fit_chunk(
                state, key, jnp.int32(n), batch, aux,
                loss=loss, optimizer=optimizer, batch_size=batch_size,
            )  # fmt: skip
            value = float(value)
            if not math.isfinite(value):
                raise NonFiniteError(
                    f"{desc}: the loss became {value} by step {done + n}; lower the learning "
                    "rate or check the data"
                )
            done += n
            hist["step"].append(done)
            hist["loss"].append(value)
            hist["wall_s"].append(time.perf_counter() - t0)
            bar.set_postfix(loss=f"{value:.4g}")
            bar.update(n)
    return state.params, {k: np.asarray(v) for k, v in hist.items()}


# ---- closed-form linear fit ------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("intercept", "min_norm"))
def _ridge(xf, y, lam, intercept: bool, min_norm: bool):
    """``theta = (X^T X + lam I)^{-1} X^T y`` on centred data when ``intercept`` (the intercept is
    not penalised: ``b = ybar - xbar^T theta``). ``lam = 0`` uses the minimum-norm least-squares
    solution (``lstsq``), which stays in the span of the data for data on a subspace."""
    if intercept:
        xm, ym = jnp.mean(xf, 0), jnp.mean(y)
        xc, yc = xf - xm, y - ym
    else:
        xm, ym = jnp.zeros(xf.shape[1], xf.dtype), jnp.zeros((), xf.dtype)
        xc, yc = xf, y
    if min_norm:
        theta = jnp.linalg.lstsq(xc, yc)[0]
    else:
        gram = xc.T @ xc + lam * jnp.eye(xf.shape[1], dtype=xf.dtype)
        theta = jnp.linalg.solve(gram, xc.T @ yc)
    return theta, ym - xm @ theta


def _mlp_init(key, module, xf):
    return module.init(key, xf[:1])


def fit_reward(
    kind: str,
    key,
    x,
    y,
    *,
    lam=None,
    intercept: bool = True,
    hidden: int = 64,
    depth: int = 2,
    module: nn.Module | None = None,
    steps: int = 2000,
    batch_size: int = 256,
    optimizer: optax.GradientTransformation | None = None,
    log_every: int = 200,
    progress: bool = False,
    return_history: bool = False,
):
    """Fit a reward model to labelled data ``(x (n2, *event), y (n2,))`` (guidance.md 1.2 step 1).

    ``kind``:

    * ``"linear"`` / ``"ridge"``: the closed form ``theta_hat = (X^T X + lam I)^{-1} X^T y``
      (Yuan et al. arXiv 2307.07055, reward learning in the linear setting), on centred data with
      an unpenalised intercept when ``intercept``. ``lam`` defaults to ``0`` for ``"linear"``
      (minimum-norm least squares, needs ``n2 > D``) and ``1e-3 * n2`` for ``"ridge"``
      (guidance.md 1.6).
    * ``"mlp"``: a Flax regressor (``module``, default ``RewardMLP(hidden, depth)``) trained by
      an optax loop (default Adam 1e-3) on standardised inputs and labels, loss
      ``mean (f(x_i) - y_i)^2 + lam ||params||^2`` (``lam`` default 0); minibatches of
      ``batch_size`` drawn with ``fold_in(key, step)``.

    Args:
      kind: one of :data:`REWARD_KINDS`.
      key: PRNG key (unused by the closed form).
      x: labelled inputs ``(n2, *event)``; y: labels ``(n2,)``.
    Returns:
      A :class:`LinearReward` or :class:`MLPReward` (pytree, ``reward(x) -> (B,)``); with
      ``return_history`` also the loss history of the MLP loop (``None`` for the closed form).
    Raises:
      JaxdiffError: unknown ``kind``; fewer labelled points than needed (``n2 < 2``, or
      ``n2 <= D`` for the unregularised linear fit, naming the counts); non-finite labels or inputs
      (naming the first bad index); ``lam < 0``.
    """
    _check_kind(kind)
    x = _check_inputs("x", x)
    n2 = int(x.shape[0])
    y = _check_labels("y", y, n2)
    xf = _flat(x)
    dim = int(xf.shape[1])
    if lam is None:
        lam = 1e-3 * n2 if kind == "ridge" else 0.0
    lam = _check_nonneg("lam", lam)
    if n2 < 2:
        fail("x", f"{n2} labelled point(s)", f"at least 2 labelled points to fit a {kind} reward")
    if kind in ("linear", "ridge"):
        need = dim + (1 if intercept else 0)
        if is_concrete(lam) and float(lam) == 0.0 and n2 < need:
            fail(
                "x",
                f"{n2} labelled points",
                f"at least {need} labelled points for an unregularised linear fit in dimension "
                f"{dim}{' with an intercept' if intercept else ''} (n2={n2} <= D={dim}); pass "
                "lam > 0 (kind='ridge') or label more points",
            )
        min_norm = bool(is_concrete(lam) and float(lam) == 0.0)
        theta, bias = _ridge(xf, y.astype(xf.dtype), lam.astype(xf.dtype), intercept, min_norm)
        out = LinearReward(theta=theta, bias=bias)
        return (out, None) if return_history else out

    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    log_every = check_positive_int("log_every", log_every)
    optimizer = _check_optimizer(optimizer)
    module = RewardMLP(hidden=hidden, depth=depth) if module is None else module
    x_mean = jnp.mean(xf, 0)
    x_scale = jnp.sqrt(jnp.mean(jnp.square(xf - x_mean))) + 1e-12
    y_mean, y_scale = jnp.mean(y), jnp.std(y) + 1e-12
    z = (xf - x_mean) / x_scale
    k_init, k_fit = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    params = _mlp_init(k_init, module, z)
    params, hist = _fit_loop(
        k_fit, params, (z, (y - y_mean) / y_scale), {"lam": lam.astype(z.dtype)},
        loss=_MSELoss(module), optimizer=optimizer, steps=steps, batch_size=batch_size,
        log_every=log_every, progress=progress, desc="fit_reward",
    )  # fmt: skip
    out = MLPReward(module, params, x_mean, x_scale, y_mean, y_scale)
    return (out, hist) if return_history else out


# ---- pairwise preferences (Bradley-Terry) ----------------------------------------------
def bradley_terry_loss(diff, outcome):
    """Mean Bradley-Terry negative log-likelihood of reward differences ``diff = r_i - r_j`` (P,):

    ``-mean[o log sigmoid(diff) + (1 - o) log sigmoid(-diff)] = mean softplus(-(2o - 1) diff)``
    with ``o = 1`` when item ``i`` (the first of the pair) is preferred (Bradley & Terry 1952;
    guidance.md 1.3; Li et al. arXiv 2403.13219).
    """
    diff = as_float_array(diff)
    sign = 2.0 * jnp.asarray(outcome, diff.dtype) - 1.0
    return jnp.mean(jax.nn.softplus(-sign * diff))


def _check_pairs(pairs, outcome, n_items: int):
    p = jnp.asarray(pairs)
    if p.ndim != 2 or p.shape[1] != 2 or not jnp.issubdtype(p.dtype, jnp.integer):
        fail("pairs", f"shape {tuple(p.shape)}, dtype {p.dtype}", "integer indices of shape (P, 2)")
    num = int(p.shape[0])
    if num < 1:
        fail("pairs", f"{num} pairs", "at least 1 comparison")
    if is_concrete(p):
        pn = np.asarray(p)
        bad = (pn < 0) | (pn >= n_items)
        if bad.any():
            i = int(np.flatnonzero(bad.any(axis=1))[0])
            fail(
                "pairs",
                f"pairs[{i}] = ({int(pn[i, 0])}, {int(pn[i, 1])})",
                f"indices of existing items in [0, {n_items}) (x has {n_items} items); pair {i} "
                "refers to a missing item",
            )
        same = pn[:, 0] == pn[:, 1]
        if same.any():
            i = int(np.flatnonzero(same)[0])
            fail(
                "pairs",
                f"pairs[{i}] = ({int(pn[i, 0])}, {int(pn[i, 1])})",
                "two different items per pair",
            )
    if outcome is None:
        o = jnp.ones((num,), jnp.result_type(float))  # winner-first convention
    else:
        o = as_float_array(outcome)
        if o.shape != (num,):
            fail("outcome", f"shape {tuple(o.shape)}", f"shape ({num},): one outcome per pair")
        if is_concrete(o):
            on = np.asarray(o)
            bad = ~((on == 0) | (on == 1))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                fail(
                    "outcome",
                    f"outcome[{i}] = {on[i]}",
                    "outcomes in {0, 1} (1: the first item wins)",
                )
    return p, o


def _bt_newton(d, o, lam, iters: int = 40):
    """Penalised logistic regression on differences ``d (P, D)`` by damped Newton steps:
    minimise ``sum_p softplus(-(2o_p - 1) theta^T d_p) + lam ||theta||^2`` (each step takes the
    best of 12 step sizes ``2^-k``, so the loss never increases)."""
    sign = 2.0 * o - 1.0
    dim = d.shape[1]
    eye = jnp.eye(dim, dtype=d.dtype)
    tr = jnp.sum(jnp.square(d)) / dim

    def obj(th):
        return jnp.sum(jax.nn.softplus(-sign * (d @ th))) + lam * jnp.sum(th * th)

    steps = 2.0 ** -jnp.arange(12, dtype=d.dtype)

    def body(_, th):
        z = d @ th
        p = jax.nn.sigmoid(z)
        grad = d.T @ (p - o) + 2.0 * lam * th
        hess = (d * (p * (1 - p))[:, None]).T @ d + (2.0 * lam + 1e-10 * tr) * eye
        direction = jnp.linalg.solve(hess, grad)
        cand = th[None] - steps[:, None] * direction[None]
        vals = jax.vmap(obj)(cand)
        best = jnp.argmin(vals)
        return jnp.where(vals[best] < obj(th), cand[best], th)

    return jax.lax.fori_loop(0, iters, body, jnp.zeros((dim,), d.dtype))


def fit_preferences(
    kind: str,
    key,
    x,
    pairs,
    outcome=None,
    *,
    lam=None,
    hidden: int = 64,
    depth: int = 2,
    module: nn.Module | None = None,
    steps: int = 2000,
    batch_size: int = 256,
    optimizer: optax.GradientTransformation | None = None,
    newton_iters: int = 40,
    log_every: int = 200,
    progress: bool = False,
    return_history: bool = False,
):
    """Fit a reward to pairwise comparisons with the Bradley-Terry model (guidance.md 1.3).

    ``P(item i beats item j) = sigmoid(r(x_i) - r(x_j))``; the fit minimises
    ``-sum_p [o_p log sigmoid(r_i - r_j) + (1 - o_p) log sigmoid(r_j - r_i)] + lam ||params||^2``
    (Li et al. arXiv 2403.13219; Bradley & Terry 1952).

    * ``"linear"`` / ``"ridge"``: ``r(x) = theta^T x`` (no intercept: a constant cancels in
      every difference), fitted by damped Newton steps (convex). ``lam`` defaults to ``0`` for
      ``"linear"`` (needs ``P >= D`` comparisons; diverges if the comparisons are separable) and
      ``1e-3 * P`` for ``"ridge"``.
    * ``"mlp"``: ``RewardMLP`` (or ``module``) trained by an optax loop on minibatches of pairs
      (mean loss, ``lam`` default ``1e-4``).

    **Scale.** The reward is identified only up to an additive constant, and its scale is that of
    the logistic link (if people compare with ``sigmoid(kappa (f_i - f_j))``, ``r ~ kappa f``).
    Choose targets relative to the fitted reward on the unlabelled data
    (:func:`quantile_targets`) and set the pseudo-label noise ``nu`` in the same units
    (e.g. a tenth of ``std(r(x_u))``).

    Args:
      kind: one of :data:`REWARD_KINDS`.
      key: PRNG key (MLP initialisation and minibatches).
      x: the compared items ``(N, *event)``.
      pairs: ``(P, 2)`` integer indices into ``x``.
      outcome: ``(P,)`` in ``{0, 1}`` (1: ``pairs[p, 0]`` preferred), or ``None`` for the
        winner-first convention (every first item won).
    Returns:
      A :class:`LinearReward` (bias 0) or :class:`MLPReward`; with ``return_history`` also the
      loss history of the MLP loop (``None`` for the linear fit).
    Raises:
      JaxdiffError: ``pairs`` not ``(P, 2)`` integers, referring to a missing item (index out of
      range, naming the pair) or comparing an item with itself; ``outcome`` outside ``{0, 1}``;
      too few items or comparisons (``N < 2``, ``P < D`` for the unregularised linear fit).
    """
    _check_kind(kind)
    x = _check_inputs("x", x)
    n_items = int(x.shape[0])
    if n_items < 2:
        fail("x", f"{n_items} item(s)", "at least 2 items to compare")
    p, o = _check_pairs(pairs, outcome, n_items)
    num = int(p.shape[0])
    xf = _flat(x)
    dim = int(xf.shape[1])
    if lam is None:
        lam = {"linear": 0.0, "ridge": 1e-3 * num, "mlp": 1e-4}[kind]
    lam = _check_nonneg("lam", lam)
    o = o.astype(xf.dtype)
    if kind in ("linear", "ridge"):
        if is_concrete(lam) and float(lam) == 0.0 and num < dim:
            fail(
                "pairs",
                f"{num} comparisons",
                f"at least {dim} comparisons for an unregularised linear Bradley-Terry fit in "
                f"dimension {dim}; pass lam > 0 (kind='ridge') or collect more comparisons",
            )
        d = jnp.take(xf, p[:, 0], axis=0) - jnp.take(xf, p[:, 1], axis=0)
        theta = jax.jit(_bt_newton, static_argnames="iters")(
            d, o, lam.astype(xf.dtype), newton_iters
        )
        out = LinearReward(theta=theta, bias=jnp.zeros((), xf.dtype))
        return (out, None) if return_history else out

    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    log_every = check_positive_int("log_every", log_every)
    optimizer = _check_optimizer(optimizer)
    module = RewardMLP(hidden=hidden, depth=depth) if module is None else module
    x_mean = jnp.mean(xf, 0)
    x_scale = jnp.sqrt(jnp.mean(jnp.square(xf - x_mean))) + 1e-12
    z = (xf - x_mean) / x_scale
    params = _mlp_init(jax.random.fold_in(key, 0), module, z)
    params, hist = _fit_loop(
        jax.random.fold_in(key, 1), params, (p, o), {"x": z, "lam": lam.astype(z.dtype)},
        loss=_BTLoss(module), optimizer=optimizer, steps=steps, batch_size=batch_size,
        log_every=log_every, progress=progress, desc="fit_preferences",
    )  # fmt: skip
    out = MLPReward(module, params, x_mean, x_scale, jnp.zeros((), z.dtype), jnp.ones((), z.dtype))
    return (out, hist) if return_history else out


def _check_reward(reward):
    if not callable(reward):
        fail("reward", reward, "a reward model reward(x) -> (B,) (see fit_reward)")
    return reward


class _StaticReward(struct.PyTreeNode):
    """A plain reward function held as a static field, so the pipeline stays a pytree."""

    fn: Callable = struct.field(pytree_node=False)

    def __call__(self, x):
        return self.fn(x)


def _as_pytree_reward(reward):
    leaves = jax.tree_util.tree_leaves(reward)
    if len(leaves) == 1 and leaves[0] is reward:
        return _StaticReward(reward)
    return reward


# ------------------------------------------------------------------------------------------
# pseudo-labelling, label normalisation, reliable range
# ------------------------------------------------------------------------------------------
def _predict(reward, x):
    out = reward(x)
    if jnp.shape(out) != (x.shape[0],):
        fail(
            "reward",
            type(reward).__name__,
            f"a reward returning shape ({x.shape[0]},), got {jnp.shape(out)}",
        )
    return out


_predict_jit = jax.jit(_predict)


def pseudo_label(key, reward, x, nu):
    """Pseudo-labels ``y_hat_j = f_hat(x_j) + nu xi_j``, ``xi_j ~ N(0, 1)`` (guidance.md 1.2 step 2).

    ``xi_j`` is drawn from ``fold_in(key, j)``, so a row's label does not depend on the batch.
    ``nu > 0`` keeps the law of ``x`` given ``y_hat`` non-degenerate; set it near the label
    noise (Yuan et al. arXiv 2307.07055).

    Args:
      key: PRNG key; reward: a reward model ``(B, *event) -> (B,)``; x: ``(n1, *event)``;
      nu: noise level, a scalar ``>= 0`` (a leaf: sweeping it never recompiles).
    Returns:
      ``(n1,)`` pseudo-labels.
    Raises:
      JaxdiffError: ``nu < 0``; non-finite inputs (naming the row); a reward returning non-finite
      values or the wrong shape.
    """
    reward = _as_pytree_reward(_check_reward(reward))
    x = _check_inputs("x", x)
    nu = _check_nonneg("nu", nu)
    f = _predict_jit(reward, x) if is_concrete(x) else _predict(reward, x)
    if is_concrete(f):
        fn = np.asarray(f)
        if not np.all(np.isfinite(fn)):
            i = int(np.flatnonzero(~np.isfinite(fn))[0])
            fail("reward", type(reward).__name__, f"finite predictions (reward(x)[{i}] = {fn[i]})")
    return _add_label_noise(key, f, nu.astype(f.dtype))


@jax.jit
def _add_label_noise(key, f, nu):
    xi = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (), f.dtype))(
        jnp.arange(f.shape[0])
    )
    return f + nu * xi


def reliable_range(y_hat, q=(0.005, 0.995)):
    """``(lo, hi)`` = the ``q`` quantiles of the pseudo-labels, shape ``(2,)``: the range of
    targets the conditional model has seen data for (guidance.md 1.4, 1.7)."""
    lo, hi = _check_quantile_pair(q)
    return jnp.quantile(as_float_array(y_hat), jnp.asarray([lo, hi]))


def _check_quantile_pair(q):
    if not isinstance(q, tuple | list) or len(q) != 2:
        fail("reliable_q", q, "a pair of quantiles (lo, hi)")
    lo, hi = float(q[0]), float(q[1])
    if not 0.0 <= lo < hi <= 1.0:
        fail("reliable_q", q, "quantiles 0 <= lo < hi <= 1")
    return lo, hi


class LabelScaler(struct.PyTreeNode):
    """``c = (y - mean) / std``: the network's condition for a reward ``y`` (leaves ``mean``,
    ``std``; guidance.md 1.2 step 3: normalise the label so large targets do not blow up the
    embedding)."""

    mean: Any
    std: Any

    def encode(self, a):
        """Normalised condition of reward(s) ``a`` (same shape)."""
        return (as_float_array(a) - self.mean) / self.std

    def decode(self, c):
        """Reward of normalised condition(s) ``c``."""
        return as_float_array(c) * self.std + self.mean


# ------------------------------------------------------------------------------------------
# the pipeline: init / step / run
# ------------------------------------------------------------------------------------------
class RCGDM(struct.PyTreeNode):
    """A reward-conditioned diffusion model and everything needed to train and sample it.

    Pytree fields (leaves unless noted): ``model`` (the conditional
    :class:`~jaxdiff.denoiser.Denoiser`; its network is static), ``schedule``, ``train``
    (:class:`jaxdiff.train.TrainState`), ``key`` (training key: step ``i`` uses
    ``fold_in(key, i)``), ``x`` ``(n1, *event)`` and ``cond`` ``(n1, 1)`` (the unlabelled data
    and their normalised pseudo-labels), ``y_hat`` ``(n1,)``, ``reward`` (``f_hat``), ``scaler``
    (:class:`LabelScaler`), ``nu``, ``reliable`` ``(2,)`` (the reliable target range).
    Static: ``optimizer``, ``batch_size``, ``ema_decay``, ``ema_warmup``, ``cond_drop_prob``,
    ``reliable_q``.

    Build with :func:`init` (or :func:`run`); train with :func:`step`; sample with
    :meth:`sample` / :func:`sample` and :meth:`sweep` / :func:`sweep_targets`.
    """

    model: Denoiser
    schedule: Schedule
    train: Any
    key: Any
    x: Any
    cond: Any
    y_hat: Any
    reward: Any
    scaler: LabelScaler
    nu: Any
    reliable: Any
    optimizer: Any = struct.field(pytree_node=False, default=None)
    batch_size: int = struct.field(pytree_node=False, default=256)
    ema_decay: float = struct.field(pytree_node=False, default=0.999)
    ema_warmup: bool = struct.field(pytree_node=False, default=True)
    cond_drop_prob: float = struct.field(pytree_node=False, default=0.0)
    reliable_q: tuple = struct.field(pytree_node=False, default=(0.005, 0.995))

    @property
    def params(self):
        """The parameters to sample with: the EMA parameters when kept, else the raw ones."""
        st = self.train
        return st.params if st.ema_params is None else st.ema_params

    @property
    def null_cond(self):
        """The null (unconditional) condition of the real-conditioned network: ``[NaN]``."""
        return jnp.full((1,), jnp.nan, self.cond.dtype)

    def condition(self, a, n: int):
        """The network's condition ``(n, 1)`` for target reward(s) ``a`` (scalar or ``(n,)``)."""
        c = jnp.broadcast_to(self.scaler.encode(a), (n,))
        return c[:, None].astype(self.cond.dtype)

    def sample(self, key, a, n: int, **kwargs):
        """:func:`sample` with this pipeline."""
        return sample(self, key, a, n, **kwargs)

    def sweep(self, key, targets, n: int = 1024, **kwargs):
        """:func:`sweep_targets` with this pipeline."""
        return sweep_targets(self, key, targets, n, **kwargs)


def _loss_kwargs(pipe: RCGDM) -> dict:
    if pipe.cond_drop_prob > 0.0:
        return {"cond_drop_prob": pipe.cond_drop_prob, "null_cond": pipe.null_cond}
    return {}


def init(
    key,
    x_unlabelled,
    reward,
    nu,
    *,
    net: MLPScoreNet | None = None,
    schedule: Schedule | None = None,
    optimizer: optax.GradientTransformation | None = None,
    batch_size: int = 256,
    ema_decay: float = 0.999,
    cond_drop_prob: float = 0.0,
    reliable_q=(0.005, 0.995),
    params=None,
    parametrization: str = "edm",
    ema_warmup: bool = True,
) -> RCGDM:
    """Pseudo-label ``x_unlabelled`` and set up the conditional score network (guidance.md 1.2).

    Steps: ``y_hat = f_hat(x) + nu xi`` (:func:`pseudo_label`, key ``fold_in(key, 0)``); the
    label scaler ``c = (y_hat - mean(y_hat)) / std(y_hat)``; the reliable range (the
    ``reliable_q`` quantiles of ``y_hat``); the network (default ``MLPScoreNet(hidden=256,
    depth=3, cond_dim=1)``, ``parametrization`` prediction, initialised with ``fold_in(key, 1)``)
    and a fresh
    :class:`jaxdiff.train.TrainState`. Training keys are ``fold_in(fold_in(key, 2), step)``.

    Args:
      key: PRNG key.
      x_unlabelled: ``(n1, *event)`` unlabelled data.
      reward: the fitted reward ``f_hat`` (:func:`fit_reward`, :func:`fit_preferences` or any
        ``(B, *event) -> (B,)`` pytree/function).
      nu: pseudo-label noise level ``>= 0``.
      net: a real-conditioned Linen score network taking ``cond (B, 1)``.
      schedule: noise schedule (default ``vp_linear()``).
      optimizer: optax transformation (default ``adam(1e-3)``).
      batch_size, ema_decay, ema_warmup: as in :func:`jaxdiff.train.train`.
      cond_drop_prob: label-dropout probability (> 0 enables classifier-free guidance at
        sampling time, ``sample(..., cfg_scale=w)``).
      reliable_q: quantiles of ``y_hat`` bounding the reliable target range.
      params: initial network parameters (default: initialise ``net``).
      parametrization: what ``net`` predicts (``"edm"`` default: EDM preconditioning with
        ``sigma_data = 1``, the library's default, which on the default VP schedule is
        v-prediction; ``"v"``, ``"eps"``, ``"x0"``, ...); the DSM loss is taken in that space
        (:func:`jaxdiff.losses.dsm_loss`). For data on a subspace an ambient eps-network leaks
        off it (Yuan et al. arXiv 2307.07055): in the R^64 / 16-dim benchmark, 6000 steps give
        an off-subspace ratio of 0.15 (eps), 0.026 (v) and 0.001 (x0).
    Returns:
      An :class:`RCGDM` at step 0.
    Raises:
      JaxdiffError: bad ``x_unlabelled`` (fewer than 2 rows, non-finite rows), ``nu``,
      ``cond_drop_prob``, ``reliable_q``, ``batch_size`` or ``ema_decay``; a constant pseudo-label.
    """
    _check_reward(reward)
    x = _check_inputs("x_unlabelled", x_unlabelled)
    if x.shape[0] < 2:
        fail("x_unlabelled", f"{x.shape[0]} row(s)", "at least 2 unlabelled points")
    batch_size = check_positive_int("batch_size", batch_size)
    if not 0.0 <= float(cond_drop_prob) < 1.0:
        fail("cond_drop_prob", cond_drop_prob, "a probability in [0, 1)")
    if not 0.0 <= float(ema_decay) < 1.0:
        fail("ema_decay", ema_decay, "a decay in [0, 1)")
    reliable_q = _check_quantile_pair(reliable_q)
    schedule = vp_linear() if schedule is None else schedule
    if not isinstance(schedule, Schedule):
        fail("schedule", type(schedule).__name__, "a jaxdiff Schedule")
    optimizer = _check_optimizer(optimizer)
    y_hat = pseudo_label(jax.random.fold_in(key, 0), reward, x, nu)
    mean, std = jnp.mean(y_hat), jnp.std(y_hat)
    if is_concrete(std) and not float(std) > 0.0:
        fail("reward", type(reward).__name__, "a reward that varies over x_unlabelled (or nu > 0)")
    scaler = LabelScaler(mean=mean, std=std)
    cond = scaler.encode(y_hat)[:, None].astype(x.dtype)
    net = MLPScoreNet(hidden=256, depth=3, cond_dim=1) if net is None else net
    model, params = as_denoiser(
        net,
        jax.random.fold_in(key, 1),
        x[:1],
        cond_example=cond[:1],
        params=params,
        parametrization=parametrization,
        schedule=schedule,
    )
    return RCGDM(
        model=model,
        schedule=schedule,
        train=_train.init(params, optimizer, float(ema_decay)),
        key=jax.random.fold_in(key, 2),
        x=x,
        cond=cond,
        y_hat=y_hat,
        reward=_as_pytree_reward(reward),
        scaler=scaler,
        nu=as_float_array(nu),
        reliable=reliable_range(y_hat, reliable_q),
        optimizer=optimizer,
        batch_size=batch_size,
        ema_decay=float(ema_decay),
        ema_warmup=bool(ema_warmup),
        cond_drop_prob=float(cond_drop_prob),
        reliable_q=reliable_q,
    )


def step(pipe: RCGDM) -> tuple[RCGDM, dict]:
    """One denoising-score-matching step on the pseudo-labelled data (pure, jit-able).

    ``min E_{t, eps} ||eps_theta(alpha x_j + sigma eps, c_j, t) - eps||^2`` with ``c_j`` the
    normalised pseudo-label (guidance.md 1.2 step 3; Yuan et al. arXiv 2307.07055), one Adam /
    optax step on a batch drawn with ``fold_in(pipe.key, pipe.train.step)``
    (:func:`jaxdiff.train.make_step`), with label dropout when ``cond_drop_prob > 0``.

    Returns:
      ``(pipe, metrics)``, metrics ``{"loss", "grad_norm"}`` (scalars).
    """
    fn = _train.make_step(
        pipe.model,
        pipe.schedule,
        pipe.optimizer,
        ema_decay=pipe.ema_decay,
        ema_warmup=pipe.ema_warmup,
        batch_size=pipe.batch_size,
        **_loss_kwargs(pipe),
    )
    new, m = fn(pipe.train, pipe.key, (pipe.x, pipe.cond))
    return pipe.replace(train=new), m


def run(
    key,
    x_unlabelled,
    reward,
    nu,
    *,
    steps: int,
    progress: bool = True,
    log_every: int = 100,
    **init_kwargs,
) -> tuple[RCGDM, dict]:
    """:func:`init` then ``steps`` training steps; returns ``(pipe, history)``.

    The steps run through :func:`jaxdiff.train.train` (jitted chunks of ``log_every`` steps, a
    tqdm progress bar); step ``i`` uses the same key as :func:`step` would, so ``run`` equals
    :func:`init` followed by ``steps`` calls of :func:`step`. A pipeline already trained can be
    trained further with ``run(..., steps=k)`` on a fresh init or :func:`step`.

    Args:
      key, x_unlabelled, reward, nu, **init_kwargs: as in :func:`init`.
      steps: number of optimizer steps (>= 1).
      progress: show a tqdm progress bar.
      log_every: steps per history entry.
    Returns:
      ``(pipe, history)``; ``history`` has numpy arrays ``step``, ``loss`` (mean DSM loss over
      each chunk), ``steps_per_s``, ``wall_s``, and the scalars ``label_mean``, ``label_std``,
      ``reliable_lo``, ``reliable_hi``.
    """
    pipe = init(key, x_unlabelled, reward, nu, **init_kwargs)
    return train_more(pipe, steps, progress=progress, log_every=log_every)


def train_more(pipe: RCGDM, steps: int, *, progress: bool = True, log_every: int = 100):
    """Train ``pipe`` for ``steps`` more DSM steps, resuming its step count (step ``i`` still uses
    ``fold_in(pipe.key, i)``), through :func:`jaxdiff.train.train`; returns ``(pipe, history)``
    as :func:`run` does."""
    state, hist = _train.train(
        pipe.key,
        pipe.model,
        pipe.train,
        pipe.schedule,
        (pipe.x, pipe.cond),
        pipe.optimizer,
        steps,
        batch_size=pipe.batch_size,
        ema_decay=pipe.ema_decay,
        ema_warmup=pipe.ema_warmup,
        progress=progress,
        log_every=log_every,
        **_loss_kwargs(pipe),
    )
    hist = dict(hist)
    hist["label_mean"] = np.asarray(pipe.scaler.mean)
    hist["label_std"] = np.asarray(pipe.scaler.std)
    hist["reliable_lo"] = np.asarray(pipe.reliable[0])
    hist["reliable_hi"] = np.asarray(pipe.reliable[1])
    return pipe.replace(train=state), hist


# ------------------------------------------------------------------------------------------
# sampling at a target reward
# ------------------------------------------------------------------------------------------
def check_targets(pipe: RCGDM, targets, stacklevel: int = 2) -> np.ndarray:
    """Warn (:class:`ExtrapolationWarning`) when concrete ``targets`` leave ``pipe.reliable``.

    Returns a boolean array: which targets lie inside the reliable range (all True for traced
    targets, which are not checked)."""
    a = as_float_array(targets)
    if not is_concrete(a, pipe.reliable):
        return np.ones(np.shape(a), bool)
    an = np.atleast_1d(np.asarray(a, np.float64))
    lo, hi = (float(v) for v in np.asarray(pipe.reliable))
    inside = (an >= lo) & (an <= hi)
    if not inside.all():
        bad = ", ".join(f"{v:.4g}" for v in an[~inside][:6])
        q0, q1 = (100 * q for q in pipe.reliable_q)
        warnings.warn(
            f"target a={bad} is outside the reliable range [{lo:.4g}, {hi:.4g}] (the "
            f"{q0:g}%-{q1:g}% quantiles of the pseudo-labels): the conditional model extrapolates "
            "there, samples drift off the data's support and the achieved reward saturates "
            "(guidance.md 1.4)",
            ExtrapolationWarning,
            stacklevel=stacklevel + 1,
        )
    return inside.reshape(np.shape(a))


def _sampling_model(model, schedule, cfg_scale, terms, null_cond):
    if cfg_scale is not None:
        model = cfg(model, cfg_scale, null_cond=null_cond)
    if terms:
        model = guide(model, schedule, *terms)
    return model


def _sample_core(key, a, model, params, schedule, scaler, null_cond, x_T, sampler, cfg_scale,
                 terms, *, steps, final_denoise):  # fmt: skip
    n = x_T.shape[0]
    c = jnp.broadcast_to(scaler.encode(a), (n,))[:, None].astype(x_T.dtype)
    m = _sampling_model(model, schedule, cfg_scale, terms, null_cond)
    return _sample(
        key, m, params, schedule, x_T, sampler, steps, cond=c, final_denoise=final_denoise
    )


def _prep_sampling(pipe, key, n, x_T, sampler, cfg_scale, terms, steps):
    if not isinstance(pipe, RCGDM):
        fail("pipe", type(pipe).__name__, "an RCGDM pipeline (see init / run)")
    steps = check_positive_int("steps", steps)
    sampler = ddim() if sampler is None else sampler
    if not isinstance(sampler, Sampler):
        fail("sampler", sampler, "a jaxdiff sampler, e.g. jaxdiff.samplers.ddim()")
    if cfg_scale is not None and pipe.cond_drop_prob == 0.0:
        fail(
            "cfg_scale",
            cfg_scale,
            "None: classifier-free guidance needs a model trained with label dropout "
            "(init(..., cond_drop_prob=0.1))",
        )
    terms = tuple(terms)
    for i, term in enumerate(terms):
        if not isinstance(term, GuidanceTerm):
            fail(f"terms[{i}]", type(term).__name__, "a jaxdiff guidance term")
    if x_T is None:
        n = check_positive_int("n", n)
        # row i from fold_in(fold_in(key, 1), i): a sample does not depend on the batch size
        x_T = prior_sample(
            jax.random.fold_in(key, 1), pipe.schedule, (n, *pipe.x.shape[1:]), pipe.x.dtype
        )
    else:
        x_T = as_float_array(x_T)
        pipe.model.check_x(x_T, "x_T")
    return sampler, terms, x_T, steps


def sample(
    pipe: RCGDM,
    key,
    a,
    n: int,
    *,
    sampler: Sampler | None = None,
    steps: int = 50,
    cfg_scale=None,
    terms=(),
    x_T=None,
    final_denoise: bool = True,
    warn: bool = True,
):
    """Samples ``(n, *event)`` from the reward-conditioned model at target reward(s) ``a``
    (guidance.md 1.2 step 4; Yuan et al. arXiv 2307.07055).

    The condition is ``c = (a - mean) / std`` (:class:`LabelScaler`); ``a`` is a scalar or
    ``(n,)`` array and a traced leaf (a sweep of targets under ``jit`` compiles once). Optional
    classifier-free guidance ``u + w (c - u)`` (``cfg_scale=w``, needs ``cond_drop_prob > 0``)
    and extra score-space ``terms`` (e.g. :func:`reward_guidance`) through
    :func:`jaxdiff.guidance.guide`. ``final_denoise`` returns the x0-prediction at ``t_end``
    (guidance.md 1.7: do not skip the last denoising step).

    Args:
      pipe: a trained :class:`RCGDM`.
      key: PRNG key (prior row ``i`` from ``fold_in(fold_in(key, 1), i)``, so a sample does not
        depend on ``n``; sampler noise from ``fold_in(key, 2)``).
      a: target reward(s), in the units of the pseudo-labels.
      n: number of samples (ignored when ``x_T`` is given).
      sampler: a jaxdiff sampler (default ``ddim()``); steps: its number of steps.
      x_T: optional initial noise ``(n, *event)``.
      warn: warn (:class:`ExtrapolationWarning`) for concrete targets outside ``pipe.reliable``.
    """
    sampler, terms, x_T, steps = _prep_sampling(pipe, key, n, x_T, sampler, cfg_scale, terms, steps)
    if warn:
        check_targets(pipe, a, stacklevel=2)
    a = as_float_array(a)
    if a.ndim > 1 or (a.ndim == 1 and a.shape[0] not in (1, x_T.shape[0])):
        fail("a", f"shape {tuple(a.shape)}", f"a scalar target or shape ({x_T.shape[0]},)")
    return _sample_core(
        jax.random.fold_in(key, 2), a, pipe.model, pipe.params, pipe.schedule, pipe.scaler,
        pipe.null_cond, x_T, sampler, cfg_scale, terms, steps=steps, final_denoise=final_denoise,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("steps", "final_denoise"))
def _sweep_jit(key, targets, model, params, schedule, scaler, null_cond, x_T, sampler, cfg_scale,
               terms, *, steps, final_denoise):  # fmt: skip
    def one(a):
        return _sample_core(
            key, a, model, params, schedule, scaler, null_cond, x_T, sampler, cfg_scale, terms,
            steps=steps, final_denoise=final_denoise,
        )  # fmt: skip

    return jax.lax.map(one, targets)


def _mean_se(v):
    v = np.asarray(v, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0


def sweep_targets(
    pipe: RCGDM,
    key,
    targets,
    n: int = 1024,
    *,
    true_reward: Callable | None = None,
    off_support: Callable | None = None,
    basis=None,
    sampler: Sampler | None = None,
    steps: int = 50,
    cfg_scale=None,
    terms=(),
    final_denoise: bool = True,
    return_samples: bool = False,
) -> dict:
    """Sample ``n`` points at each target in ``targets`` and report the reward / support trade-off
    (guidance.md 1.4-1.5).

    Per target ``a`` (rows of the returned arrays):

    * ``predicted``: mean ``f_hat(x)`` of the samples (the pseudo-labeller's view);
    * ``achieved``: mean ``true_reward(x)`` (when given) — report this, never only ``f_hat``
      (guidance.md 1.7);
    * ``off_support``: mean ``off_support(x)`` (any ``(B, *event) -> (B,)``), or for data on a
      linear subspace with ``basis`` ``A (D, d)`` the off-subspace ratio
      ``||x_perp|| / ||x_par||`` (:func:`jaxdiff.metrics.off_subspace_ratio`);
    * ``in_range``: whether ``a`` lies in the reliable range (an :class:`ExtrapolationWarning`
      names the range for targets outside it).

    All targets share the initial noise and sampler noise (common random numbers), and run in one
    compiled program (targets are traced: a new grid of the same length never recompiles).

    Returns:
      dict of numpy arrays: ``target``, ``condition`` (normalised), ``in_range``, ``predicted``,
      ``predicted_se``, and when available ``achieved``, ``achieved_se``, ``off_support``;
      scalars ``reliable_lo``, ``reliable_hi``; ``samples (T, n, *event)`` with
      ``return_samples``.
    """
    t = as_float_array(targets)
    if t.ndim != 1 or t.shape[0] < 1:
        fail("targets", f"shape {tuple(t.shape)}", "a 1-D array of target rewards")
    if is_concrete(t) and not np.all(np.isfinite(np.asarray(t))):
        fail("targets", targets, "finite target rewards")
    if off_support is not None and basis is not None:
        fail("basis", "given with off_support", "either off_support or basis, not both")
    if off_support is None and basis is not None:
        b = as_float_array(basis)

        def off_support(x):
            return metrics.off_subspace_ratio(x, b)

    sampler, terms, x_T, steps = _prep_sampling(
        pipe, key, n, None, sampler, cfg_scale, terms, steps
    )
    inside = check_targets(pipe, t, stacklevel=2)
    xs = _sweep_jit(
        jax.random.fold_in(key, 2), t, pipe.model, pipe.params, pipe.schedule, pipe.scaler,
        pipe.null_cond, x_T, sampler, cfg_scale, terms, steps=steps, final_denoise=final_denoise,
    )  # fmt: skip
    pred = [pipe.reward(x) for x in xs]
    out = {
        "target": np.asarray(t, np.float64),
        "condition": np.asarray(pipe.scaler.encode(t), np.float64),
        "in_range": np.asarray(inside, bool),
        "reliable_lo": float(pipe.reliable[0]),
        "reliable_hi": float(pipe.reliable[1]),
    }
    stats = {"predicted": [_mean_se(p) for p in np.asarray(pred)]}
    if true_reward is not None:
        stats["achieved"] = [_mean_se(true_reward(x)) for x in xs]
    if off_support is not None:
        out["off_support"] = np.asarray([float(np.mean(off_support(x))) for x in xs])
    for name, rows in stats.items():
        out[name] = np.asarray([r[0] for r in rows])
        out[name + "_se"] = np.asarray([r[1] for r in rows])
    if return_samples:
        out["samples"] = np.asarray(xs)
    return out


def quantile_targets(reward_model, x_unlabelled, qs):
    """Targets ``a_q = quantile_q(f_hat(x_u))`` for ``q`` in ``qs``, shape ``(len(qs),)``.

    For rewards learned from preferences the scale is fixed only by the Bradley-Terry link
    (guidance.md 1.3), so targets are best chosen relative to the fitted reward's distribution on
    the unlabelled data: e.g. ``qs = (0.5, 0.9, 0.99)``. Quantiles above the pipeline's
    ``reliable_q[1]`` are extrapolation targets.
    """
    _check_reward(reward_model)
    q = np.asarray(qs, np.float64)
    if q.ndim != 1 or q.size < 1 or not np.all((q >= 0) & (q <= 1)):
        fail("qs", qs, "a 1-D sequence of quantiles in [0, 1]")
    x = _check_inputs("x_unlabelled", x_unlabelled)
    f = _predict(reward_model, x)
    return jnp.quantile(f, jnp.asarray(q, f.dtype))


# ------------------------------------------------------------------------------------------
# closed-form oracle: linear pseudo-labels of Gaussian data
# ------------------------------------------------------------------------------------------
def linear_gaussian_conditional(mean, cov, theta_hat, nu, a, bias=0.0):
    """``(mu_a, Sigma_a)``: the law of ``x ~ N(mean, cov)`` given ``y_hat = theta_hat^T x + bias +
    nu xi = a`` (guidance.md 1.4, derived; the Gaussian conditioning formula).

    ``(x, y_hat)`` is jointly Gaussian with ``Cov(x, y_hat) = Sigma theta_hat`` and
    ``Var(y_hat) = s = theta_hat^T Sigma theta_hat + nu^2``, so

    ``mu_a = mean + Sigma theta_hat (a - theta_hat^T mean - bias) / s``,
    ``Sigma_a = Sigma - Sigma theta_hat theta_hat^T Sigma / s``.

    Shapes: ``mean (D,)``, ``cov (D, D)``, ``theta_hat (D,)``; ``a`` scalar (or ``(T,)``, giving
    ``mu_a (T, D)``). Needs ``s > 0``.
    """
    mean, cov, th = as_float_array(mean), as_float_array(cov), as_float_array(theta_hat)
    ct = cov @ th
    s = th @ ct + jnp.square(as_float_array(nu))
    if is_concrete(s) and not float(s) > 0.0:
        fail("nu", nu, "nu > 0 or a reward that varies over the data (Var(y_hat) = 0)")
    shift = (as_float_array(a) - th @ mean - bias) / s
    mu_a = mean + jnp.asarray(shift)[..., None] * ct
    return mu_a, cov - jnp.outer(ct, ct) / s


def exact_conditional(dist, reward_hat: LinearReward, nu, a) -> analytic.Gaussian:
    """The exact law of ``x | y_hat = a`` as :func:`jaxdiff.analytic.gaussian` (a zero-training
    oracle whose exact denoiser, ``analytic.as_denoiser``, any sampler can sample).

    ``dist``: a :class:`jaxdiff.analytic.Gaussian` or :class:`~jaxdiff.analytic.LinearSubspace`
    (anything with ``mean()`` and ``cov()``); ``reward_hat``: the linear pseudo-labeller;
    ``a``: a scalar target. See :func:`linear_gaussian_conditional`."""
    if not isinstance(reward_hat, LinearReward):
        fail(
            "reward_hat",
            type(reward_hat).__name__,
            "a LinearReward (the oracle is linear-Gaussian)",
        )
    mu, cov = linear_gaussian_conditional(
        dist.mean(), dist.cov(), reward_hat.theta, nu, a, reward_hat.bias
    )
    return analytic.gaussian(mu, 0.5 * (cov + cov.T))


def conditional_expected_reward(dist, true_reward: LinearReward, reward_hat: LinearReward, nu, a):
    """``E[f*(x) | y_hat = a]`` in closed form for Gaussian data and linear rewards (guidance.md 1.4).

    ``= theta^T mu_a + b = theta^T m + b + theta^T Sigma theta_hat (a - theta_hat^T m - b_hat) /
    (theta_hat^T Sigma theta_hat + nu^2)``; for centred data and ``b = b_hat = 0`` this is
    ``a theta^T Sigma theta_hat / (theta_hat^T Sigma theta_hat + nu^2)`` (linear in ``a``, slope
    below 1 when ``nu > 0`` or ``theta_hat != theta``). ``a``: scalar or ``(T,)``."""
    mu, _ = linear_gaussian_conditional(
        dist.mean(), dist.cov(), reward_hat.theta, nu, a, reward_hat.bias
    )
    return mu @ true_reward.theta + true_reward.bias


# ------------------------------------------------------------------------------------------
# guidance variant: a reward predictor on noised inputs and its score-space term
# ------------------------------------------------------------------------------------------
class NoisyRewardMLP(nn.Module):
    """Time-conditioned reward regressor ``(x_t (B, *event), t (B,)) -> (B,)``.

    ``e = Dense_h(act(Dense_h(time_features(t))))``, ``z = Dense_h(flatten(x))``, ``depth``
    pre-LayerNorm residual blocks ``z += Dense_h(act(LN(z) + e))``, output ``Dense_1``; time
    features as :class:`jaxdiff.models.MLPScoreNet`. The noise-aware reward model of the RCGDM
    guidance variant (guidance.md 1.2 "Variant", 1.7: train it on ``x_t``)."""

    hidden: int = 128
    depth: int = 2
    time_embedding: str = "fourier"
    embed_dim: int = 32
    fourier_scale: float = 4.0
    time_scale: float = 1000.0
    activation: Callable = nn.silu

    @nn.compact
    def __call__(self, x, t):
        if self.time_embedding not in ("fourier", "sinusoidal"):
            fail("time_embedding", self.time_embedding, "'fourier' or 'sinusoidal'")
        x = as_float_array(x)
        return nn.Dense(1, name="out")(time_conditioned_trunk(self, x, t))[:, 0]


class NoisyReward(struct.PyTreeNode):
    """``mu(x_t, t) = y_mean + y_scale * module(x_t, t)``, shape ``(B,)``: a trained
    :class:`NoisyRewardMLP` (static ``module``; leaves ``params``, ``y_mean``, ``y_scale``)."""

    module: nn.Module = struct.field(pytree_node=False)
    params: Any
    y_mean: Any = 0.0
    y_scale: Any = 1.0

    def __call__(self, x, t):
        """Predicted reward ``(B,)`` of noised inputs ``x (B, *event)`` at times ``t``."""
        x = as_float_array(x)
        t = jnp.broadcast_to(as_float_array(t), x.shape[:1])
        out = self.module.apply(self.params, x, t)
        return jnp.asarray(self.y_mean, out.dtype) + jnp.asarray(self.y_scale, out.dtype) * out


def train_noisy_reward(
    key,
    x,
    y,
    schedule: Schedule,
    *,
    module: nn.Module | None = None,
    steps: int = 2000,
    batch_size: int = 256,
    optimizer: optax.GradientTransformation | None = None,
    t_min=None,
    t_max=None,
    log_every: int = 200,
    progress: bool = False,
) -> tuple[NoisyReward, dict]:
    """Train a reward predictor on noised inputs by MSE (guidance.md 1.2 "Variant").

    Each step draws a batch ``(x0, y)``, ``t ~ U[t_min, t_max]`` (default
    ``[schedule.t_end, schedule.t_start]``), ``eps ~ N(0, I)``, and takes an optax step on
    ``mean (mu(alpha x0 + sigma eps, t) - y)^2`` (labels standardised); keys
    ``fold_in(key, step)``. The RCGDM code trains a (not time-conditioned) predictor with Adam
    1e-3; here it is time-conditioned, so its gradient is meaningful at every noise level
    (guidance.md 1.7).

    Args:
      key: PRNG key; x: ``(N, *event)`` clean inputs; y: ``(N,)`` labels (e.g. the pseudo-labels
      ``pipe.y_hat``); schedule: the diffusion model's schedule; module: default
      ``NoisyRewardMLP()``; optimizer: default ``adam(1e-3)``.
    Returns:
      ``(NoisyReward, history)``; history: numpy arrays ``step``, ``loss``, ``wall_s``.
    Raises:
      JaxdiffError: too few rows, non-finite inputs or labels (naming the index), bad times.
    """
    x = _check_inputs("x", x)
    n = int(x.shape[0])
    if n < 2:
        fail("x", f"{n} labelled point(s)", "at least 2 labelled points")
    y = _check_labels("y", y, n).astype(x.dtype)
    if not isinstance(schedule, Schedule):
        fail("schedule", type(schedule).__name__, "a jaxdiff Schedule")
    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    log_every = check_positive_int("log_every", log_every)
    optimizer = _check_optimizer(optimizer)
    module = NoisyRewardMLP() if module is None else module
    t_lo = as_float_array(schedule.t_end if t_min is None else t_min).astype(x.dtype)
    t_hi = as_float_array(schedule.t_start if t_max is None else t_max).astype(x.dtype)
    schedule.check_t(t_lo, "t_min")
    schedule.check_t(t_hi, "t_max")
    if not float(t_lo) < float(t_hi):
        fail("t_min", t_min, f"a time below t_max={float(t_hi):g}")
    y_mean, y_scale = jnp.mean(y), jnp.std(y) + 1e-12
    params = jax.jit(module.init)(jax.random.fold_in(key, 0), x[:1], jnp.full((1,), 0.5, x.dtype))
    params, hist = _fit_loop(
        jax.random.fold_in(key, 1), params, (x, (y - y_mean) / y_scale),
        {"schedule": schedule, "t_lo": t_lo, "t_hi": t_hi},
        loss=_NoisyMSELoss(module), optimizer=optimizer, steps=steps, batch_size=batch_size,
        log_every=log_every, progress=progress, desc="train_noisy_reward",
    )  # fmt: skip
    return NoisyReward(module, params, y_mean, y_scale), hist


def _call_params(params, x, t):
    """A pytree-valued predictor travels as ``params`` (its leaves are traced)."""
    return params(x, t)


@dataclasses.dataclass(frozen=True)
class _PlainFn:
    fn: Callable

    def __call__(self, params, x, t):
        return self.fn(x, t)


class RewardGuidance(GuidanceTerm):
    """Score-space term ``G = gamma(t) (a - mu(x_t, t)) grad_x mu(x_t, t)``, per example.

    The gradient of the Gaussian log-likelihood ``log p_t(y = a | x_t) ~ -gamma/2 (a - mu)^2``
    (guidance.md 1.2 "Variant"; Yuan et al. arXiv 2307.07055, image experiment). Example ``i``'s
    term uses only ``x_i`` (``grad`` of ``sum_i mu(x_i)`` is block-diagonal over the batch), so
    ``gamma`` keeps its meaning for any batch size — unlike the official code, whose batch-mean
    MSE divides the guidance by the batch size (guidance.md 1.2 pitfall).

    Leaves: ``params`` (the predictor when it is a pytree, e.g. :class:`NoisyReward`),
    ``target`` (``a``: scalar or ``(B,)``), ``gamma`` (scalar or ``(B,)``); static: ``mu_fn``,
    ``gamma_fn`` (optional ``t (B,) -> (B,)`` multiplier). Build with :func:`reward_guidance`.
    """

    mu_fn: Callable = struct.field(pytree_node=False, default=None)
    params: Any = None
    target: Any = 0.0
    gamma: Any = 1.0
    gamma_fn: Callable | None = struct.field(pytree_node=False, default=None)

    def predict_and_grad(self, x, t):
        """``(mu (B,), grad_x mu (B, *event))`` with per-example gradients."""
        b = x.shape[0]

        def total(z):
            mu = self.mu_fn(self.params, z, t)
            if jnp.shape(mu) != (b,):
                fail("mu", f"output shape {jnp.shape(mu)}", f"per-example rewards of shape ({b},)")
            return jnp.sum(mu), mu

        grad, mu = jax.grad(total, has_aux=True)(x)
        return mu, grad

    def __call__(self, ctx: GuidanceContext) -> jax.Array:
        """``gamma(t) (a - mu(x_t, t)) grad_x mu(x_t, t)``, shape of ``ctx.x``."""
        x, t = ctx.x, ctx.t
        b = x.shape[0]
        mu, grad = self.predict_and_grad(x, t)
        a = jnp.broadcast_to(jnp.asarray(self.target, mu.dtype), (b,))
        w = scale_at(self.gamma, self.gamma_fn, t, b).astype(mu.dtype)
        return (_bcast(w * (a - mu), grad) * grad).astype(x.dtype)


def reward_guidance(mu, target, gamma=1.0, *, gamma_fn: Callable | None = None) -> RewardGuidance:
    """Reward guidance toward target ``a``: ``G = gamma(t) (a - mu(x_t, t)) grad_x mu(x_t, t)``.

    Use with :func:`jaxdiff.guidance.guide` (on an unconditional model, or on top of an
    :class:`RCGDM` model through ``sample(..., terms=[...])``); the noise prediction becomes
    ``eps~ = eps_hat - sigma(t) G`` (guidance.md 0.1, 1.2 "Variant").

    With ``mu(x_t) = E[y_hat | x_t]`` and ``gamma(t) = 1 / Var(y_hat | x_t)`` this is exactly
    ``grad log p_t(y_hat = a | x_t)`` when ``y_hat | x_t`` is Gaussian (e.g. Gaussian data, a linear
    pseudo-labeller), so the guided model samples ``x | y_hat = a`` (tested to 1e-9).

    Args:
      mu: a predictor ``mu(x (B, *event), t (B,)) -> (B,)`` differentiable in ``x``: a
        :class:`NoisyReward` (or any pytree callable: its numbers are leaves) or a plain function
        (static: build the term once).
      target: ``a``, scalar or ``(B,)`` (a leaf: sweeping it never recompiles).
      gamma: guidance strength ``gamma`` (the inverse likelihood variance ``1/sigma_y^2``), scalar
        or ``(B,)``; the paper's example uses ``gamma = 100`` for ``a = 1``.
      gamma_fn: optional static ``t (B,) -> (B,)``: ``gamma(t) = gamma * gamma_fn(t)``.
    Raises:
      JaxdiffError: ``mu`` not callable, non-finite or non-scalar ``gamma``/``target`` shapes.
    """
    if not callable(mu):
        fail("mu", mu, "a reward predictor mu(x_t, t) -> (B,)")
    if gamma_fn is not None and not callable(gamma_fn):
        fail("gamma_fn", gamma_fn, "None or a function t (B,) -> (B,)")
    g = as_float_array(gamma)
    if g.ndim > 1:
        fail("gamma", f"shape {tuple(g.shape)}", "a scalar or shape (B,)")
    if is_concrete(g) and not np.all(np.isfinite(np.asarray(g))):
        fail("gamma", gamma, "a finite guidance strength")
    a = as_float_array(target)
    if a.ndim > 1:
        fail("target", f"shape {tuple(a.shape)}", "a scalar or shape (B,)")
    if is_concrete(a) and not np.all(np.isfinite(np.asarray(a))):
        fail("target", target, "a finite target reward")
    leaves = jax.tree_util.tree_leaves(mu)
    if len(leaves) == 1 and leaves[0] is mu:
        fn, params = _PlainFn(mu), None
    else:
        fn, params = _call_params, mu
    return RewardGuidance(mu_fn=fn, params=params, target=a, gamma=g, gamma_fn=gamma_fn)
