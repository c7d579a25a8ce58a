"""Momentum samplers against divergence at small budgets (Wizadwongsa & Suwajanakorn, "Diffusion
Sampling with Momentum for Mitigating Divergence Artifacts", arXiv 2307.11118, ICLR 2024).

High-order multistep solvers have small stability regions, and at a few large steps their
extrapolation of the model output can overshoot. The paper damps the combined slope with
Polyak heavy-ball momentum. Two samplers:

* :func:`ghvb` -- generalised heavy ball (GHVB, the paper's section 4.2) on the PLMS /
  Adams-Bashforth method in the rho-form of the PF-ODE: with ``y = x/alpha``,
  ``rho = sigma/alpha`` and ``e_n = eps_hat(x_n, t_n)``,

  ``v_n = (1 - beta) v_{n-1} + beta e_n`` (``v_0 = e_0``),
  ``y_{n+1} = y_n + (rho_{n+1} - rho_n) sum_j w_j(beta) v_{n-j}``,

  with the beta-dependent Adams-Bashforth weights of order ``k`` (the paper's table 1):

  - ``k = 1``: ``v_n``;
  - ``k = 2``: ``((2 + b) v_n - (2 - b) v_{n-1}) / (2 b)``;
  - ``k = 3``: ``((18 + 5b) v_n - (24 - 8b) v_{n-1} + (6 - b) v_{n-2}) / (12 b)``;
  - ``k = 4``: ``((46 + 9b) v_n - (78 - 19b) v_{n-1} + (42 - 5b) v_{n-2} - (10 - b) v_{n-3})
    / (24 b)``.

  At ``beta = 1`` these are the Adams-Bashforth weights (PLMS, Liu et al. arXiv 2202.09778);
  ``k = 1, beta = 1`` is DDIM. The order argument is fractional: ``order = k - 1 + beta``
  (2.8 is ``k = 3``, ``beta = 0.8``). The weights sum to 1 for every beta, and the momentum lag
  ``v_n = e_n - ((1 - beta)/beta) h e'_n + O(h^2)`` is what they undo: a GHVB-k step on a
  settled history has local order ``k + 1`` on steps uniform in rho. The start (lower-order
  warm-up steps, the momentum's start-up transient) and non-uniform grids limit the measured
  global order to 2 for every ``k >= 2``, PLMS included (``tests/test_momentum.py``).

* :func:`heavy_ball` -- heavy ball on DPM-Solver++(2M) (data prediction, the paper's
  section 4.1): ``v = (1 - beta) v + beta (M0 + D1/2)``, ``D1 = (M0 - M1)/r``,
  ``x_t = (sigma_t/sigma_s) x + alpha_t (1 - e^{-h}) v``. First order for ``beta < 1``;
  ``beta = 1`` is DPM-Solver++(2M) "midpoint".
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from flax import struct

from jaxdiff._checks import fail
from jaxdiff.samplers.base import (
    Kernel,
    Sampler,
    check_lower_order_final,
    lower_order_cap,
    zero_noise_guard,
)
from jaxdiff.samplers.dpm_solver import _first_differences

__all__ = ["GHVB", "HeavyBall", "ghvb", "heavy_ball"]


def ghvb_weights(k: int, beta):
    """The GHVB weights ``w_j(beta)`` of order ``k`` (1-4) on ``v_n, v_{n-1}, ...`` (newest
    first), arXiv 2307.11118 table 1; at ``beta = 1`` the Adams-Bashforth weights."""
    b = beta
    if k == 1:
        w = [jnp.ones_like(b)]
    elif k == 2:
        w = [(2 + b) / (2 * b), -(2 - b) / (2 * b)]
    elif k == 3:
        w = [(18 + 5 * b) / (12 * b), -(24 - 8 * b) / (12 * b), (6 - b) / (12 * b)]
    else:
        w = [
            (46 + 9 * b) / (24 * b),
            -(78 - 19 * b) / (24 * b),
            (42 - 5 * b) / (24 * b),
            -(10 - b) / (24 * b),
        ]
    return jnp.stack(w)


def split_order(order) -> tuple[int, float]:
    """``(k, beta)`` of a GHVB order ``k - 1 + beta`` with ``0 < beta <= 1``."""
    k = max(1, math.ceil(order - 1e-12))
    return k, float(order) - (k - 1)


def _check_order(order):
    if (
        isinstance(order, bool)
        or not isinstance(order, (int, float))
        or not math.isfinite(order)
        or not 1 <= order <= 4
    ):
        fail("order", order, "a number in [1, 4] (k - 1 + beta: 2.8 is order 3 with beta 0.8)")


def _check_beta(beta):
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 1:
        fail("beta", beta, "a momentum in (0, 1] (1 is no momentum)")


class GHVB(Sampler):
    """Generalised heavy ball of order ``k`` with momentum ``beta`` on PLMS (arXiv 2307.11118
    section 4.2; module docstring): one model evaluation per step, multistep.

    Step ``n`` (0-based) uses order ``p = min(k, n + 1)`` (warm-up) and, with
    ``lower_order_final`` (the meaning of DPM-Solver++, UniPC and DEIS), ``p <= N - n``; the
    final steps that rule lowers take no momentum (``beta = 1`` there: with no extrapolation
    left to damp, the momentum would only lag; measured: 1.2-1.3x DDIM's error at NFE 2-3
    with it, <= 1x without, docs/few_step.md).
    ``beta`` is a leaf (sweeping it does not recompile); ``k`` is static.
    """

    beta: Any = 0.8
    k: int = struct.field(pytree_node=False, default=3)
    lower_order_final: Any = struct.field(pytree_node=False, default=True)
    default_grid = "auto"

    def kernel(self, model, schedule):
        if self.k not in (1, 2, 3, 4):
            fail("k", self.k, "1, 2, 3 or 4")
        lof = check_lower_order_final(self.lower_order_final)
        k = self.k

        def init(x, params, cond, ts):
            ts = jnp.asarray(ts)
            return {
                "x": x,
                "v_hist": jnp.zeros((k, *x.shape), x.dtype),  # v_n, v_{n-1}, ... newest first
                "n": jnp.zeros((), jnp.int32),
                "cap": jnp.asarray(lower_order_cap(ts.shape[0] - 1, lof), jnp.int32),
            }

        def step(key, state, s, t, params, cond):
            x, n = state["x"], state["n"]
            tdt = jnp.result_type(s)
            beta = jnp.asarray(self.beta, tdt)
            _, eps = model.x0_eps(params, x, s, cond, schedule)
            a_s, sig_s = schedule.alpha_sigma(s)
            a_t, sig_t = schedule.alpha_sigma(t)
            prev = state["v_hist"]
            p = jnp.minimum(k, n + 1)
            final = state["cap"] - n < p  # a final step lowered by lower_order_final
            p = jnp.maximum(jnp.minimum(p, state["cap"] - n), 1)
            beta = jnp.where(final, jnp.ones_like(beta), beta)  # ... takes no momentum
            v = jnp.where(n == 0, eps, (1 - beta) * prev[0] + beta * eps).astype(x.dtype)
            hist = jnp.concatenate([v[None], prev[:-1]])
            rows = [
                jnp.concatenate([ghvb_weights(q, beta), jnp.zeros((k - q,), tdt)])
                for q in range(1, k + 1)
            ]
            w = jnp.stack(rows)[p - 1]
            slope = jnp.tensordot(w.astype(x.dtype), hist, axes=1)
            # y_t = y_s + (rho_t - rho_s) slope, rho = sigma/alpha (finite at sigma_t = 0)
            drho = sig_t / a_t - sig_s / a_s
            x_new = a_t * (x / a_s + drho * slope)
            new = {"x": x_new.astype(x.dtype), "v_hist": hist, "n": n + 1, "cap": state["cap"]}
            return new, {}

        return Kernel(init, step, lambda state: state["x"])


def ghvb(order: float = 2.8, lower_order_final=True) -> GHVB:
    """GHVB sampler (Wizadwongsa & Suwajanakorn, arXiv 2307.11118) of fractional order
    ``order = k - 1 + beta`` in [1, 4]: ``k = ceil(order)`` Adams-Bashforth steps on the
    momentum ``v_n = (1 - beta) v_{n-1} + beta eps_hat_n`` in ``rho = sigma/alpha``
    (see :class:`GHVB` and the module docstring). Integer orders are PLMS (AB-k with warm-up),
    ``ghvb(1)`` is DDIM; the paper recommends ``beta`` around 0.8 (``order=2.8``, the default)
    against divergence at small budgets. Orders below 1 (heavy ball on DDIM: no extrapolation
    to damp, only the momentum's lag; 1.1-2.1x DDIM's error at NFE 2-20 on the test mixture)
    are refused. Returns a :class:`GHVB`; shapes: any ``x_T``.
    """
    _check_order(order)
    k, beta = split_order(order)
    return GHVB(beta=beta, k=k, lower_order_final=check_lower_order_final(lower_order_final))


class HeavyBall(Sampler):
    """Polyak heavy ball on DPM-Solver++(2M) "midpoint" (arXiv 2307.11118 section 4.1):

    ``v <- (1 - beta) v + beta (M0 + D1/2)`` (``v = M0`` at the first step), ``D1 = (M0 - M1)/r``,
    ``r = h_prev/h``, ``x_t = (sigma_t/sigma_s) x + alpha_t (1 - e^{-h}) v``.

    The first step and (with ``lower_order_final``) the final one use ``M0`` in place of
    ``M0 + D1/2``; that final step takes no momentum (``beta = 1``, as in :class:`GHVB`). A step to ``sigma_t = 0`` is the ``h -> inf`` limit
    ``x_t = alpha_t ((1 - beta) v + beta M0)``. First order for ``beta < 1``; ``beta = 1`` is
    :func:`~jaxdiff.samplers.dpm_solver_pp` ``(2)``.
    """

    beta: Any = 0.8
    lower_order_final: Any = struct.field(pytree_node=False, default=True)
    default_grid = "auto"

    def kernel(self, model, schedule):
        lof = check_lower_order_final(self.lower_order_final)

        def init(x, params, cond, ts):
            ts = jnp.asarray(ts)
            tdt = jnp.result_type(ts.dtype, float)
            return {
                "x": x,
                "v": jnp.zeros_like(x),
                "m1": jnp.zeros_like(x),
                "lam1": jnp.zeros((), tdt),
                "n": jnp.zeros((), jnp.int32),
                "cap": jnp.asarray(lower_order_cap(ts.shape[0] - 1, lof), jnp.int32),
            }

        def step(key, state, s, t, params, cond):
            x, n = state["x"], state["n"]
            tdt = jnp.result_type(s)
            beta = jnp.asarray(self.beta, tdt).astype(x.dtype)
            m0, _ = model.x0_eps(params, x, s, cond, schedule)
            a_end = schedule.alpha(t)
            zero, t = zero_noise_guard(schedule, s, t)
            lam_s = schedule.lam(s).astype(tdt)
            lam_t = schedule.lam(t).astype(tdt)
            h = lam_t - lam_s
            a_s, sig_s = schedule.alpha_sigma(s)
            a_t, sig_t = schedule.alpha_sigma(t)
            second = (n >= 1) & (jnp.maximum(state["cap"] - n, 1) >= 2)
            final = (n >= 1) & (state["cap"] - n < 2)  # lowered by lower_order_final ...
            beta = jnp.where(final, jnp.ones_like(beta), beta)  # ... takes no momentum
            _, d1 = _first_differences(state, lam_s, h, m0, n)  # DPM-Solver++(2M)'s D1
            e_bar = jnp.where(second, m0 + 0.5 * d1, m0)
            v = jnp.where(n == 0, e_bar, (1 - beta) * state["v"] + beta * e_bar)
            x_new = (sig_t / sig_s) * x - a_t * jnp.expm1(-h) * v
            v_zero = jnp.where(n == 0, m0, (1 - beta) * state["v"] + beta * m0)
            x_new = jnp.where(zero, a_end * v_zero, x_new)
            new = {
                "x": x_new.astype(x.dtype),
                "v": v.astype(x.dtype),
                "m1": m0.astype(x.dtype),
                "lam1": lam_s.astype(state["lam1"].dtype),
                "n": n + 1,
                "cap": state["cap"],
            }
            return new, {}

        return Kernel(init, step, lambda state: state["x"])


def heavy_ball(beta: float = 0.8, lower_order_final=True) -> HeavyBall:
    """Heavy-ball DPM-Solver++(2M) (arXiv 2307.11118 section 4.1) with momentum ``beta`` in
    (0, 1]; ``beta = 1`` is DPM-Solver++(2M). See :class:`HeavyBall`. Shapes: any ``x_T``."""
    _check_beta(beta)
    return HeavyBall(beta=float(beta), lower_order_final=check_lower_order_final(lower_order_final))
