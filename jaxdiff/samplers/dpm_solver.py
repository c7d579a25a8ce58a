"""Exponential integrators for the diffusion PF-ODE / SDE: DPM-Solver, DPM-Solver++, SDE-DPM-Solver++.

All methods integrate the ODE in the half log-SNR ``lambda = log(alpha/sigma)`` by variation of
constants (samplers.md section 0, (E1)/(E2)), so they hold for any schedule in
``(alpha, sigma, lambda)`` form. One step goes from the noisier time ``s`` to the cleaner time
``t`` with ``h = lambda_t - lambda_s > 0``; ``E_s``/``D_s`` are the noise / data predictions at
``(x_s, s)``. Formulas: samplers.md sections 3.1 and 3.2.

* :func:`dpm_solver` -- noise-prediction singlestep DPM-Solver-1/2/3 (Lu et al. arXiv 2206.00927).
* :func:`dpm_solver_pp` -- data-prediction DPM-Solver++ 1, 2S, 3S (singlestep) and 2M, 3M
  (multistep) (Lu et al. arXiv 2211.01095).
* :func:`sde_dpm_solver_pp` -- SDE-DPM-Solver++ 1 and 2M (arXiv 2211.01095; k-diffusion's
  generalised ``eta`` form).

Multistep methods keep ``(lambda, x0_hat)`` of the last two steps in the state and warm up with
lower orders (step ``k`` uses order ``min(order, k + 1)``); every method therefore accepts any
grid with at least one step (``min_steps = 1``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxdiff._checks import fail, is_concrete
from jaxdiff.samplers.base import (
    Kernel,
    Sampler,
    check_lower_order_final,
    lower_order_cap,
    per_example_normal,
    zero_noise_guard,
)

__all__ = [
    "DPMSolver",
    "DPMSolverPP",
    "SDEDPMSolverPP",
    "dpm_solver",
    "dpm_solver_pp",
    "sde_dpm_solver_pp",
]

_ORDERS = (1, 2, 3)
_VARIANTS = ("multistep", "singlestep")
_PP_SOLVER_TYPES = ("midpoint", "taylor", "heun")
_SDE_SOLVER_TYPES = ("midpoint", "heun")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_order(order, allowed) -> None:
    if not _is_int(order) or order not in allowed:
        fail("order", order, f"one of {allowed}")


def _check_choice(arg: str, value, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:
        fail(arg, value, f"one of {allowed}")


def _check_r(r1, r2, order) -> None:
    """Intermediate-stage fractions: ``0 < r1 < 1`` (order 2), ``0 < r1 < r2 < 1`` (order 3)."""
    if order >= 2 and is_concrete(r1) and not 0.0 < float(r1) < 1.0:
        fail("r1", r1, "a number in (0, 1)")
    if order == 3 and is_concrete(r1, r2) and not float(r1) < float(r2) < 1.0:
        fail("r2", r2, f"a number in (r1={float(r1):g}, 1)")


def _check_lof(value) -> None:
    check_lower_order_final(value)


class _Times:
    """Coefficients of one interval ``s -> t`` in the dtype of the times."""

    def __init__(self, schedule, s, t):
        self.schedule = schedule
        self.a_s, self.sig_s = schedule.alpha_sigma(s)
        self.a_t, self.sig_t = schedule.alpha_sigma(t)
        self.lam_s = schedule.lam(s)
        self.h = schedule.lam(t) - self.lam_s
        # alpha_t / alpha_s and sigma_t / sigma_s through logs (no cancellation near t = 0)
        self.alpha_ratio = jnp.exp(schedule.log_alpha(t) - schedule.log_alpha(s))
        self.sigma_ratio = jnp.exp(schedule.log_sigma(t) - schedule.log_sigma(s))

    def mid(self, r):
        """``(m, alpha_m, sigma_m, alpha_m/alpha_s, sigma_m/sigma_s)`` at ``lambda_s + r h``."""
        sch = self.schedule
        m = sch.t_from_lam(self.lam_s + r * self.h)
        a_m, sig_m = sch.alpha_sigma(m)
        return m, a_m, sig_m, a_m / self.a_s, sig_m / self.sig_s


#: steps with a larger log-SNR step ``h`` take DPM-Solver's data-prediction form (see DPMSolver)
MAX_NOISE_FORM_H = 1.0


# ----------------------------------------------------------------------------------------------
# DPM-Solver (noise prediction, singlestep)
# ----------------------------------------------------------------------------------------------
class DPMSolver(Sampler):
    """Singlestep noise-prediction DPM-Solver-k (Lu et al. arXiv 2206.00927), ``k`` NFE per step.

    With ``E`` the noise prediction, ``h = lambda_t - lambda_s``, ``m_i = t(lambda_s + r_i h)``:

    * order 1 (= DDIM): ``x_t = (alpha_t/alpha_s) x - sigma_t (e^h - 1) E_s``; order 1.
    * order 2 (``r1``, default 1/2): ``u = (alpha_m/alpha_s) x - sigma_m (e^{r1 h} - 1) E_s``,
      ``x_t = (alpha_t/alpha_s) x - sigma_t (e^h - 1) E_s
      - (sigma_t / (2 r1)) (e^h - 1) (E(u, m) - E_s)``; global order 2.
    * order 3 (``r1, r2``, default 1/3, 2/3):
      ``u1 = (alpha_m1/alpha_s) x - sigma_m1 (e^{r1 h} - 1) E_s``,
      ``u2 = (alpha_m2/alpha_s) x - sigma_m2 (e^{r2 h} - 1) E_s
      - sigma_m2 (r2/r1) ((e^{r2 h} - 1)/(r2 h) - 1) (E(u1, m1) - E_s)``,
      ``x_t = (alpha_t/alpha_s) x - sigma_t (e^h - 1) E_s
      - (sigma_t/r2) ((e^h - 1)/h - 1) (E(u2, m2) - E_s)``; global order 3.

    ``r1``, ``r2`` are pytree leaves; ``order`` is static. Intermediate times come from
    ``schedule.t_from_lam``.

    Large steps: the noise form multiplies the stage differences ``E(u, m) - E_s`` by
    ``sigma_t e^h``, which for a step from ``sigma_max`` explodes (one DPM-Solver-2 step on the
    DDPM discrete schedule, ``h = 9.7``: endpoint error 287x DDIM-2's on a 64-D mixture). A step
    with ``h > max_noise_h`` (a leaf, default ``MAX_NOISE_FORM_H = 1``) is taken in the
    data-prediction form of the same order (DPM-Solver++ 2S "midpoint" / 3S, arXiv 2211.01095
    eq. 9 and App. B, bounded as ``h -> inf``), with the same stage times and model
    evaluations. Measured with the exact noise predictor of an 8-D mixture, NFE 4-10, VP
    discrete / EDM / VE: the threshold 6 left the noise form 2-37x DDIM's error at NFE 4-9; 1
    gives 0.55-1.1x (docs/few_step.md). So on most grids below ~30 NFE the steps are data-form;
    ``max_noise_h=float("inf")`` is the pure noise form of the paper.
    """

    r1: Any = 0.5
    r2: Any = 2.0 / 3.0
    max_noise_h: Any = MAX_NOISE_FORM_H
    order: int = struct.field(pytree_node=False, default=2)
    default_grid = "log_snr"
    min_steps = 1

    @property
    def nfe_per_step(self):
        return self.order

    def kernel(self, model, schedule):
        _check_order(self.order, _ORDERS)
        _check_r(self.r1, self.r2, self.order)
        order = self.order

        def init(x, params, cond, ts):
            return x

        def step(key, x, s, t, params, cond):
            # One set of stages for both forms. A step with e^h > e^max_noise_h (the stage
            # differences multiplied by sigma_t e^h in the noise form) takes the data-prediction
            # form of the same order (DPM-Solver++ 2S "midpoint" / 3S) instead: each stage state is
            # chosen with a `where` before the stage's single model evaluation (the two forms'
            # first-order stage states agree), and the stages run as a scan over one traced
            # model call (a lax.cond over the two forms traced 2 * order calls).
            a_end = schedule.alpha(t)
            zero, t = zero_noise_guard(schedule, s, t)
            c = _Times(schedule, s, t)
            h = c.h
            data = h > jnp.asarray(self.max_noise_h, h.dtype)
            pick = lambda d, n: jnp.where(data, d, n).astype(x.dtype)  # noqa: E731
            phi1 = jnp.expm1(h)  # noise form: e^h - 1
            one_m = -jnp.expm1(-h)  # data form: 1 - e^{-h}
            if order == 1:
                d_s, e_s = model.x0_eps(params, x, s, cond, schedule)
                x_next = c.alpha_ratio * x - c.sig_t * phi1 * e_s
                x_next = jnp.where(zero, a_end * d_s, x_next)
                return x_next.astype(x.dtype), {}
            r1, r2 = self.r1, self.r2
            m1, a_m1, sig_m1, ar_m1, sr_m1 = c.mid(r1)
            if order == 2:
                stage_t = jnp.stack([jnp.asarray(s, m1.dtype), m1])
            else:
                m2, a_m2, sig_m2, ar_m2, sr_m2 = c.mid(r2)
                stage_t = jnp.stack([jnp.asarray(s, m1.dtype), m1, m2])
                phi1_r2 = jnp.expm1(r2 * h)
                one_m2 = -jnp.expm1(-r2 * h)
                phi2_r2 = 1.0 - one_m2 / (r2 * h)

            def first(D, E):
                return x

            def second(D, E):
                return pick(
                    sr_m1 * x - a_m1 * jnp.expm1(-r1 * h) * D[0],
                    ar_m1 * x - sig_m1 * jnp.expm1(r1 * h) * E[0],
                )

            def third(D, E):
                return pick(
                    sr_m2 * x + a_m2 * one_m2 * D[0] + a_m2 * (r2 / r1) * phi2_r2 * (D[1] - D[0]),
                    ar_m2 * x
                    - sig_m2 * phi1_r2 * E[0]
                    - sig_m2 * (r2 / r1) * (phi1_r2 / (r2 * h) - 1.0) * (E[1] - E[0]),
                )

            # the stages as a scan with one traced model call: a singlestep method then compiles
            # about like a one-call-per-step method (benchmarks/compile.py)
            branches = (first, second, third)[:order]

            def body(carry, i):
                D, E = carry
                u = jax.lax.switch(i, branches, D, E)
                d, e = model.x0_eps(
                    params, u, stage_t[i].astype(jnp.result_type(s)), cond, schedule
                )
                return (D.at[i].set(d.astype(x.dtype)), E.at[i].set(e.astype(x.dtype))), None

            zeros = jnp.zeros((order, *x.shape), x.dtype)
            (D, E), _ = jax.lax.scan(body, (zeros, zeros), jnp.arange(order))
            d_s, e_s = D[0], E[0]
            base_n = c.alpha_ratio * x - c.sig_t * phi1 * e_s
            base_d = c.sigma_ratio * x + c.a_t * one_m * d_s
            if order == 2:
                x_next = pick(
                    base_d + (c.a_t / (2.0 * r1)) * one_m * (D[1] - d_s),
                    base_n - (c.sig_t / (2.0 * r1)) * phi1 * (E[1] - e_s),
                )
            else:
                x_next = pick(
                    base_d + (c.a_t / r2) * (1.0 - one_m / h) * (D[2] - d_s),
                    base_n - (c.sig_t / r2) * (phi1 / h - 1.0) * (E[2] - e_s),
                )
            x_next = jnp.where(zero, a_end * d_s, x_next)
            return x_next.astype(x.dtype), {}

        return Kernel(init, step, lambda x: x)


def dpm_solver(order: int = 2, r1=None, r2=None, max_noise_h=MAX_NOISE_FORM_H) -> DPMSolver:
    """Singlestep noise-prediction DPM-Solver-1/2/3 (arXiv 2206.00927); see :class:`DPMSolver`.

    Args:
      order: 1 (= DDIM), 2 or 3; global order = ``order``, ``order`` model calls per step.
      r1: position of the first intermediate stage in ``lambda`` (fraction of ``h``); default
        1/2 for order 2, 1/3 for order 3.
      r2: second stage for order 3 (default 2/3).
      max_noise_h: steps with a larger log-SNR step ``h`` use the data-prediction form of the
        same order (default 1; ``float("inf")``: always the noise form). See :class:`DPMSolver`.
    """
    _check_order(order, _ORDERS)
    r1 = (0.5 if order == 2 else 1.0 / 3.0) if r1 is None else r1
    r2 = 2.0 / 3.0 if r2 is None else r2
    _check_r(r1, r2, order)
    if is_concrete(max_noise_h) and not float(max_noise_h) > 0:
        fail("max_noise_h", max_noise_h, 'a log-SNR step > 0 (float("inf"): the pure noise form)')
    return DPMSolver(r1=r1, r2=r2, max_noise_h=max_noise_h, order=order)


# ----------------------------------------------------------------------------------------------
# DPM-Solver++ (data prediction)
# ----------------------------------------------------------------------------------------------
def _plan_cap(n: int, lower_order_final) -> int:
    """Static step count used by the lower-order-final rule (a huge number disables it)."""
    return lower_order_cap(n, lower_order_final)


def _multistep_init(x, ts, lower_order_final):
    n = ts.shape[0] - 1
    tdt = jnp.result_type(ts.dtype, float)
    zero_l = jnp.zeros((), tdt)
    return {
        "x": x,
        "k": jnp.zeros((), jnp.int32),
        "cap": jnp.asarray(_plan_cap(n, lower_order_final), jnp.int32),
        "lam1": zero_l,
        "m1": jnp.zeros_like(x),
        "lam2": zero_l,
        "m2": jnp.zeros_like(x),
    }


def _step_order(state, order):
    """Order of this step: warm-up ``min(order, k + 1)`` and the lower-order-final cap."""
    k = state["k"]
    return jnp.minimum(jnp.minimum(order, k + 1), jnp.maximum(state["cap"] - k, 1))


def _history_update(state, x_next, lam_s, m0):
    return {
        "x": x_next,
        "k": state["k"] + 1,
        "cap": state["cap"],
        "lam1": jnp.asarray(lam_s, state["lam1"].dtype),
        "m1": m0.astype(state["m1"].dtype),
        "lam2": state["lam1"],
        "m2": state["m1"],
    }


def _first_differences(state, lam_s, h, m0, k):
    """``(r0, D1 = (M0 - M1)/r0)`` with the unused-history case made harmless (finite, grad-safe)."""
    h0 = jnp.where(k >= 1, lam_s - state["lam1"], h)
    r0 = h0 / h
    return r0, (m0 - state["m1"]) / r0


class DPMSolverPP(Sampler):
    """DPM-Solver++ (Lu et al. arXiv 2211.01095): data prediction ``D`` (``x0_hat``), any schedule.

    Common part, ``h = lambda_t - lambda_s``: ``x_t = (sigma_t/sigma_s) x + alpha_t (1 - e^{-h}) D_s
    + (higher-order terms)``. With ``phi2 = (e^{-h} - 1)/h + 1`` and
    ``phi3 = (e^{-h} - 1 + h)/h^2 - 1/2``:

    * order 1 (either variant) = DDIM = DPM-Solver-1; order 1.
    * ``variant="multistep"`` (1 NFE per step; history ``(lambda, D)`` of the two previous steps,
      ``r0 = h0/h``, ``r1 = h1/h``, ``M0 = D_s``):

      - 2M, ``D1 = (M0 - M1)/r0``; ``"midpoint"``: ``+ alpha_t (1 - e^{-h}) D1 / 2``;
        ``"taylor"`` (alias ``"heun"``): ``+ alpha_t phi2 D1``. Order 2.
      - 3M, ``Delta0 = (M0 - M1)/r0``, ``Delta1 = (M1 - M2)/r1``,
        ``D1 = Delta0 + r0/(r0 + r1) (Delta0 - Delta1)``, ``D2 = (Delta0 - Delta1)/(r0 + r1)``:
        ``+ alpha_t phi2 D1 - c alpha_t phi3 D2`` with ``c = third_order_coef`` (a leaf).
        ``c = 2`` (default) is the exact integral of the quadratic Lagrange interpolant of ``D`` in
        ``lambda`` and is truly 3rd order; ``c = 1`` is the value of the reference code,
        diffusers and k-diffusion and converges with order 2 (samplers.md 3.2 "(!!)", 7.2).
      - warm-up: step ``k`` (0-based) uses order ``min(order, k + 1)``.
      - ``lower_order_final`` (the same meaning for UniPC and DEIS): ``True`` (alias
        ``"always"``) applies ``order_k = min(order, steps - k)`` for every step count (so 3M
        ends with orders 2, 1); ``"auto"`` applies it when ``steps < 10`` (the DPM-Solver++
        reference code's rule); ``False`` never.

    * ``variant="singlestep"`` (``order`` NFE per step, stages at ``m_i = t(lambda_s + r_i h)``):

      - 2S (``r1``, default 1/2): ``u = (sigma_m/sigma_s) x + alpha_m (1 - e^{-r1 h}) D_s``;
        ``"midpoint"``: ``+ (alpha_t/(2 r1)) (1 - e^{-h}) (D(u, m) - D_s)``; ``"taylor"``:
        ``+ (alpha_t/r1) phi2 (D(u, m) - D_s)``. Order 2.
      - 3S (``r1, r2``, default 1/3, 2/3): ``u1`` as ``u`` with ``r1``,
        ``u2 = (sigma_m2/sigma_s) x + alpha_m2 (1 - e^{-r2 h}) D_s
        + alpha_m2 (r2/r1) phi2(r2 h) (D(u1, m1) - D_s)``,
        ``x_t = ... + (alpha_t/r2) phi2 (D(u2, m2) - D_s)`` (both solver types). Order 3.

    samplers.md 3.2.
    """

    third_order_coef: Any = 2.0
    r1: Any = 0.5
    r2: Any = 2.0 / 3.0
    order: int = struct.field(pytree_node=False, default=2)
    variant: str = struct.field(pytree_node=False, default="multistep")
    solver_type: str = struct.field(pytree_node=False, default="midpoint")
    lower_order_final: Any = struct.field(pytree_node=False, default=True)
    min_steps = 1

    @property
    def default_grid(self):
        """Multistep: ``"auto"`` (per budget and schedule, :func:`~jaxdiff.samplers.grids.
        budget_grid`); singlestep: ``"log_snr"``."""
        return "log_snr" if self.variant == "singlestep" or self.order == 1 else "auto"

    @property
    def nfe_per_step(self):
        return self.order if self.variant == "singlestep" else 1

    def _validate(self):
        _check_order(self.order, _ORDERS)
        _check_choice("variant", self.variant, _VARIANTS)
        _check_choice("solver_type", self.solver_type, _PP_SOLVER_TYPES)
        _check_lof(self.lower_order_final)
        if self.variant == "singlestep":
            _check_r(self.r1, self.r2, self.order)

    def kernel(self, model, schedule):
        self._validate()
        if self.variant == "singlestep" or self.order == 1:
            return self._singlestep_kernel(model, schedule)
        return self._multistep_kernel(model, schedule)

    # -- singlestep ------------------------------------------------------------------------
    def _singlestep_kernel(self, model, schedule):
        order = self.order
        midpoint = self.solver_type == "midpoint"

        def init(x, params, cond, ts):
            return x

        def step(key, x, s, t, params, cond):
            a_end = schedule.alpha(t)
            zero, t = zero_noise_guard(schedule, s, t)
            c = _Times(schedule, s, t)
            h = c.h
            d_s, _ = model.x0_eps(params, x, s, cond, schedule)
            one_m = -jnp.expm1(-h)  # 1 - e^{-h}
            base = c.sigma_ratio * x + c.a_t * one_m * d_s
            phi2 = 1.0 - one_m / h
            if order == 1:
                x_next = base
            elif order == 2:
                r1 = self.r1
                m, a_m, _, _, sr_m = c.mid(r1)
                u = (sr_m * x - a_m * jnp.expm1(-r1 * h) * d_s).astype(x.dtype)
                d_m, _ = model.x0_eps(params, u, m, cond, schedule)
                if midpoint:
                    x_next = base + (c.a_t / (2.0 * r1)) * one_m * (d_m - d_s)
                else:
                    x_next = base + (c.a_t / r1) * phi2 * (d_m - d_s)
            else:
                r1, r2 = self.r1, self.r2
                m1, a_m1, _, _, sr_m1 = c.mid(r1)
                m2, a_m2, _, _, sr_m2 = c.mid(r2)
                u1 = (sr_m1 * x - a_m1 * jnp.expm1(-r1 * h) * d_s).astype(x.dtype)
                d_1, _ = model.x0_eps(params, u1, m1, cond, schedule)
                one_m2 = -jnp.expm1(-r2 * h)
                phi2_r2 = 1.0 - one_m2 / (r2 * h)
                u2 = (
                    sr_m2 * x + a_m2 * one_m2 * d_s + a_m2 * (r2 / r1) * phi2_r2 * (d_1 - d_s)
                ).astype(x.dtype)
                d_2, _ = model.x0_eps(params, u2, m2, cond, schedule)
                x_next = base + (c.a_t / r2) * phi2 * (d_2 - d_s)
            x_next = jnp.where(zero, a_end * d_s, x_next)
            return x_next.astype(x.dtype), {}

        return Kernel(init, step, lambda x: x)

    # -- multistep -------------------------------------------------------------------------
    def _multistep_kernel(self, model, schedule):
        order = self.order
        midpoint = self.solver_type == "midpoint"
        lof = self.lower_order_final

        def init(x, params, cond, ts):
            return _multistep_init(x, ts, lof)

        def step(key, state, s, t, params, cond):
            x = state["x"]
            a_end = schedule.alpha(t)
            zero, t = zero_noise_guard(schedule, s, t)
            c = _Times(schedule, s, t)
            h = c.h
            k = state["k"]
            m0, _ = model.x0_eps(params, x, s, cond, schedule)
            one_m = -jnp.expm1(-h)
            phi2 = 1.0 - one_m / h
            base = c.sigma_ratio * x + c.a_t * one_m * m0
            r0, d1 = _first_differences(state, c.lam_s, h, m0, k)
            if midpoint:
                x2 = base + 0.5 * c.a_t * one_m * d1
            else:
                x2 = base + c.a_t * phi2 * d1
            k_ord = _step_order(state, order)
            x_next = jnp.where(k_ord >= 2, x2, base)
            if order == 3:
                h1 = jnp.where(k >= 2, state["lam1"] - state["lam2"], h)
                r1 = h1 / h
                delta1 = (state["m1"] - state["m2"]) / r1
                dd = d1 - delta1
                d1_3 = d1 + (r0 / (r0 + r1)) * dd
                d2_3 = dd / (r0 + r1)
                phi3 = (jnp.expm1(-h) + h) / h**2 - 0.5
                x3 = base + c.a_t * phi2 * d1_3 - self.third_order_coef * c.a_t * phi3 * d2_3
                x_next = jnp.where(k_ord >= 3, x3, x_next)
            x_next = jnp.where(zero, a_end * m0, x_next).astype(x.dtype)
            return _history_update(state, x_next, c.lam_s, m0), {"order": k_ord}

        return Kernel(init, step, lambda st: st["x"])


def dpm_solver_pp(
    order: int = 2,
    variant: str = "multistep",
    solver_type: str = "midpoint",
    third_order_coef=2.0,
    lower_order_final=True,
    r1=None,
    r2=None,
) -> DPMSolverPP:
    """DPM-Solver++ (arXiv 2211.01095): 1, 2M, 3M (multistep) or 2S, 3S (singlestep).

    See :class:`DPMSolverPP` for the update equations.

    Args:
      order: 1, 2 or 3 (global order; 3M with ``third_order_coef=1`` is order 2 in practice).
      variant: ``"multistep"`` (1 NFE per step) or ``"singlestep"`` (``order`` NFE per step).
      solver_type: ``"midpoint"`` or ``"taylor"`` (alias ``"heun"``): the form of the 2nd-order
        correction (2M/2S; 3M and 3S have one form).
      third_order_coef: coefficient ``c`` of the 3M second difference (a leaf). 2.0 = exact
        Lagrange integral (order 3); 1.0 = reference code / diffusers / k-diffusion (order 2).
      lower_order_final: ``True`` (alias ``"always"``): step ``k`` of ``steps`` uses order
        ``<= steps - k`` (the last step first order); ``"auto"``: that rule when ``steps < 10``
        (the reference code's); ``False``: never. Multistep only; one meaning across
        DPM-Solver++, UniPC and DEIS. Singlestep steps are self-contained and ignore it.
      r1, r2: singlestep stage positions (fractions of ``h`` in lambda); defaults 1/2 (2S) and
        1/3, 2/3 (3S).
    """
    _check_order(order, _ORDERS)
    _check_choice("variant", variant, _VARIANTS)
    _check_choice("solver_type", solver_type, _PP_SOLVER_TYPES)
    _check_lof(lower_order_final)
    r1 = (0.5 if order == 2 else 1.0 / 3.0) if r1 is None else r1
    r2 = 2.0 / 3.0 if r2 is None else r2
    out = DPMSolverPP(
        third_order_coef=third_order_coef,
        r1=r1,
        r2=r2,
        order=order,
        variant=variant,
        solver_type=solver_type,
        lower_order_final=lower_order_final,
    )
    out._validate()
    return out


# ----------------------------------------------------------------------------------------------
# SDE-DPM-Solver++
# ----------------------------------------------------------------------------------------------
class SDEDPMSolverPP(Sampler):
    """SDE-DPM-Solver++ 1 and 2M (Lu et al. arXiv 2211.01095), k-diffusion's ``eta`` form.

    With ``h = lambda_t - lambda_s``, ``z ~ N(0, I)`` from :func:`per_example_normal`:

    ``x_t = (sigma_t/sigma_s) e^{-eta h} x + alpha_t (1 - e^{-(1+eta) h}) M0
    + (2nd-order term) + sigma_t sqrt(1 - e^{-2 eta h}) z``.

    * order 1: no 2nd-order term; ``eta = 1`` is DDPM ancestral (``fixed_small``) = DDIM(eta=1).
      Weak order 1.
    * order 2 (2M, history of the previous ``(lambda, D)``, ``D1 = (M0 - M1)/r0``):
      ``"midpoint"``: ``+ alpha_t (1 - e^{-(1+eta) h}) D1 / 2``; ``"heun"``:
      ``+ alpha_t ((1 - e^{-(1+eta) h})/(-(1+eta) h) + 1) D1``. Second order in the marginal
      variance (samplers.md 7.2). ``eta = 0`` is the ODE DPM-Solver++(2M).

    ``eta`` (>= 0) is a leaf. samplers.md 3.2.
    """

    eta: Any = 1.0
    order: int = struct.field(pytree_node=False, default=2)
    solver_type: str = struct.field(pytree_node=False, default="midpoint")
    stochastic = True
    default_grid = "log_snr"
    min_steps = 1

    def kernel(self, model, schedule):
        _check_order(self.order, (1, 2))
        _check_choice("solver_type", self.solver_type, _SDE_SOLVER_TYPES)
        order = self.order
        midpoint = self.solver_type == "midpoint"
        eta = self.eta

        def init(x, params, cond, ts):
            return _multistep_init(x, ts, False)

        def step(key, state, s, t, params, cond):
            x = state["x"]
            a_end = schedule.alpha(t)
            zero, t = zero_noise_guard(schedule, s, t)
            c = _Times(schedule, s, t)
            h = c.h
            k = state["k"]
            m0, _ = model.x0_eps(params, x, s, cond, schedule)
            h_eta = (1.0 + eta) * h
            one_m = -jnp.expm1(-h_eta)  # 1 - e^{-(1+eta) h}
            x_next = c.sigma_ratio * jnp.exp(-eta * h) * x + c.a_t * one_m * m0
            if order == 2:
                _, d1 = _first_differences(state, c.lam_s, h, m0, k)
                if midpoint:
                    corr = 0.5 * c.a_t * one_m * d1
                else:
                    corr = c.a_t * (1.0 - one_m / h_eta) * d1
                x_next = jnp.where(k >= 1, x_next + corr, x_next)
            std = c.sig_t * jnp.sqrt(-jnp.expm1(-2.0 * eta * h))
            x_next = x_next + std * per_example_normal(key, x)
            x_next = jnp.where(zero, a_end * m0, x_next).astype(x.dtype)
            return _history_update(state, x_next, c.lam_s, m0), {}

        return Kernel(init, step, lambda st: st["x"])


def sde_dpm_solver_pp(order: int = 2, solver_type: str = "midpoint", eta=1.0) -> SDEDPMSolverPP:
    """SDE-DPM-Solver++(1) / (2M) (arXiv 2211.01095); see :class:`SDEDPMSolverPP`.

    Args:
      order: 1 (= DDPM ancestral at ``eta = 1``) or 2 (2M, one NFE per step).
      solver_type: ``"midpoint"`` or ``"heun"`` (form of the 2M correction).
      eta: noise level (a leaf, >= 0); 1 = the SDE-DPM-Solver++ of the paper, 0 = ODE.
    """
    _check_order(order, (1, 2))
    _check_choice("solver_type", solver_type, _SDE_SOLVER_TYPES)
    if is_concrete(eta) and not float(eta) >= 0.0:
        fail("eta", eta, "a number >= 0")
    return SDEDPMSolverPP(eta=eta, order=order, solver_type=solver_type)
