"""Time-grid search: optimise a sampler's time grid for a given model by gradient descent.

Every jaxdiff sampler is differentiable in its grid, so the grid itself can be learned: minimise
the mean squared distance between the sampler's endpoint and a high-accuracy reference solve
(the diffrax PF-ODE at tight tolerance) over calibration noise ``x_T``
(cf. learned solver schedules: USF, Liu et al. arXiv 2312.07243; DPM-Solver-v3, Zheng et al.
arXiv 2310.13268; Watson et al. arXiv 2202.05830).

The grid is parametrised in the half log-SNR with fixed endpoints and positive increments:
``lambda_k = lambda_0 + (lambda_N - lambda_0) * sum_{i<k} softmax(theta)_i``, so every iterate
is a strictly decreasing grid in the schedule's range. The result is an ordinary array that the
user passes to any sampler (``jaxdiff.sample(..., ts=grid)``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff._checks import check_positive_int, fail
from jaxdiff.samplers.base import Sampler, solve
from jaxdiff.samplers.diffrax_bridge import pf_ode
from jaxdiff.samplers.grids import time_grid

__all__ = ["GridSearchResult", "optimize_grid", "grid_from_logits", "logits_from_grid"]


class GridSearchResult(NamedTuple):
    """``ts``: the optimised grid ``(steps + 1,)``; ``loss``: the calibration loss per
    iteration; ``initial_loss`` / ``final_loss``: mean squared endpoint error before/after."""

    ts: jax.Array
    loss: np.ndarray
    initial_loss: float
    final_loss: float


def grid_from_logits(theta, schedule, t_start, t_end):
    """Grid ``(N + 1,)`` from ``theta (N,)``: lambda increments ``softmax(theta)`` of the span."""
    l0, l1 = schedule.lam(t_start), schedule.lam(t_end)
    frac = jnp.concatenate([jnp.zeros((1,), theta.dtype), jnp.cumsum(jax.nn.softmax(theta))])
    ts = schedule.t_from_lam(l0 + (l1 - l0) * frac)
    return ts.at[0].set(t_start).at[-1].set(t_end)


def logits_from_grid(ts, schedule):
    """Inverse of :func:`grid_from_logits` (up to an additive constant)."""
    lam = schedule.lam(ts)
    return jnp.log(jnp.diff(lam) / (lam[-1] - lam[0]))


def optimize_grid(
    key,
    model,
    params,
    schedule,
    sampler: Sampler,
    steps: int,
    shape,
    *,
    cond=None,
    init: str = "log_snr",
    iterations: int = 200,
    learning_rate: float = 0.05,
    reference: Sampler | None = None,
    reference_steps: int = 64,
    t_start=None,
    t_end=None,
    loss: str = "mse",
) -> GridSearchResult:
    """Optimise the ``steps``-step grid of ``sampler`` for ``model`` by gradient descent.

    Args:
      key: PRNG key for the calibration noise (and the sampler's own noise, fixed).
      model, params, schedule, cond: the model to sample.
      sampler: a deterministic jaxdiff sampler (any fixed-grid kernel).
      steps: number of grid steps to optimise (a Python int).
      shape: calibration batch shape ``(n, *event_shape)``; ``x_T`` is drawn from the prior.
      init: grid kind to start from (``"log_snr"``, ``"uniform"``, ``"karras"``, ...).
      iterations, learning_rate: Adam iterations and step size on the logits.
      reference: the high-accuracy solver (default diffrax PF-ODE, rtol=atol=1e-7 in float64 or
        1e-5 in float32), run once on a ``reference_steps`` log-SNR grid.
      loss: ``"mse"``: ``mean_i e_i^2`` with ``e_i = ||sampler(x_T^i; ts) - reference(x_T^i)|| /
        sqrt(D)``; ``"l2"``: ``mean_i e_i`` — robust when a few calibration draws jump to another
        mode of a well-separated mixture (their squared error would dominate the gradient and the
        grid would be fitted to those few draws).
    Returns:
      :class:`GridSearchResult`; pass ``result.ts`` to any sampler as ``ts=``;
      ``initial_loss`` / ``final_loss`` are in the chosen ``loss``.
    """
    steps = check_positive_int("steps", steps)
    iterations = check_positive_int("iterations", iterations)
    if not isinstance(sampler, Sampler):
        fail("sampler", sampler, "a jaxdiff sampler")
    if sampler.stochastic:
        fail("sampler", sampler.name, "a deterministic sampler (grid search fits an ODE solve)")
    if loss not in ("mse", "l2"):
        fail("loss", loss, '"mse" or "l2"')
    model.check_x(tuple(shape), "shape")
    k_x, k_run = jax.random.split(key)
    dtype = jnp.result_type(float)
    x_T = schedule.prior_std().astype(dtype) * jax.random.normal(k_x, tuple(shape), dtype)
    t0 = jnp.asarray(schedule.t_start if t_start is None else t_start, dtype)
    t1 = jnp.asarray(schedule.t_end if t_end is None else t_end, dtype)
    if reference is None:
        tol = 1e-7 if dtype == jnp.float64 else 1e-5
        reference = pf_ode(rtol=tol, atol=tol)
    ref_ts = time_grid(schedule, reference_steps, "log_snr", t_start=t0, t_end=t1, dtype=dtype)
    target = jax.jit(
        lambda: solve(k_run, model, params, schedule, x_T, ref_ts, reference, cond)[0]
    )()
    theta = logits_from_grid(
        time_grid(schedule, steps, init, t_start=t0, t_end=t1, dtype=dtype), schedule
    )

    def loss_fn(theta):
        ts = grid_from_logits(theta, schedule, t0, t1)
        x = solve(k_run, model, params, schedule, x_T, ts, sampler, cond)[0]
        e2 = jnp.mean(jnp.reshape((x - target) ** 2, (x.shape[0], -1)), axis=1)
        if loss == "l2":
            return jnp.mean(jnp.sqrt(e2 + jnp.finfo(e2.dtype).eps ** 2))
        return jnp.mean(e2)

    opt = optax.adam(learning_rate)

    @jax.jit
    def run(theta):
        def body(carry, _):
            theta, opt_state = carry
            loss, g = jax.value_and_grad(loss_fn)(theta)
            g = jnp.where(jnp.isfinite(g), g, 0.0)
            upd, opt_state = opt.update(g, opt_state, theta)
            return (optax.apply_updates(theta, upd), opt_state), loss

        (theta, _), losses = jax.lax.scan(body, (theta, opt.init(theta)), None, length=iterations)
        return theta, losses, loss_fn(theta)

    theta_opt, losses, final = run(theta)
    losses = np.asarray(losses)
    final = float(final)
    initial = float(losses[0])
    if final > initial:  # never return something worse than the starting grid
        theta_opt, final = theta, initial
    return GridSearchResult(grid_from_logits(theta_opt, schedule, t0, t1), losses, initial, final)
