"""UniPC: the unified predictor-corrector multistep solver (Zhao et al., arXiv 2302.04867).

One step goes from the noisier time ``s`` to the cleaner time ``t`` with
``h = lambda_t - lambda_s > 0``. In data-prediction mode (``predict_x0=True``) the model output
is ``M = x0_hat`` and ``hh = -h``; in noise mode it is ``M = eps_hat`` and ``hh = h``.
With history ``M0`` (at ``s``) and older ``M_k`` (at ``lambda_{s_k}``),
``r_k = (lambda_{s_k} - lambda_s) / h``, ``D_k = (M_k - M0) / r_k`` and
``B(h) = hh`` ("bh1") or ``expm1(hh)`` ("bh2"):

* base (DDIM): ``x~ = (sigma_t/sigma_s) x - alpha_t expm1(hh) M0`` (noise mode:
  ``(alpha_t/alpha_s) x - sigma_t expm1(hh) M0``);
* UniP-p (predictor): ``x_t^P = x~ - alpha_t B(h) sum_{k<p} a_k D_k`` with
  ``a = R[:p-1, :p-1]^{-1} b[:p-1]`` (``a = 1/2`` for ``p = 2``);
* UniC-p (corrector): with ``M_t = x0_hat(x_t^P, t)`` and ``D_t = M_t - M0``,
  ``x_t^C = x~ - alpha_t B(h) (sum_{k<p} c_k D_k + c_p D_t)``, ``c = R^{-1} b`` (``c = 1/2``
  for ``p = 1``),

where ``R_{ik} = r_k^{i-1}`` (``r_p = 1``) and ``b_i = hh phi_{i+1}(hh) i! / B(h)``. (Noise mode
uses ``sigma_t`` in place of ``alpha_t``.) The evaluation ``M_t`` at the *predicted* point is
reused as the next step's history entry, so the corrector costs no extra model evaluation; the
last step is not corrected. UniP-p is order ``p``; UniPC-p (with UniC) is order ``p + 1``.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff._checks import fail, is_concrete
from jaxdiff.samplers.base import (
    Kernel,
    Sampler,
    check_lower_order_final,
    lower_order_cap,
    zero_noise_guard,
)

__all__ = ["UniPC", "unipc"]

_ORDERS = (1, 2, 3)
_SOLVER_TYPES = ("bh1", "bh2")
_TERMS = 18  # Taylor terms of phi_k for |z| < 1: truncation < 1/(k+18)! relative to 1/k!


def _phis(z, n):
    """``[phi_1(z), ..., phi_n(z)]`` with ``phi_1 = expm1(z)/z``, ``phi_{k+1} = (phi_k - 1/k!)/z``.

    Uses the Taylor series ``phi_k(z) = sum_j z^j / (j+k)!`` for ``|z| < 1`` (the recursion
    cancels there) and the recursion elsewhere.
    """
    small = jnp.abs(z) < 1.0
    z_big = jnp.where(small, 1.0, z)  # keeps the unused branch finite (also under grad)
    z_small = jnp.where(small, z, 0.0)
    out = []
    phi = jnp.expm1(z_big) / z_big
    for k in range(1, n + 1):
        series = jnp.full_like(z, 1.0 / math.factorial(k + _TERMS - 1))
        for j in range(_TERMS - 2, -1, -1):  # Horner
            series = series * z_small + 1.0 / math.factorial(j + k)
        out.append(jnp.where(small, series, phi))
        phi = (phi - 1.0 / math.factorial(k)) / z_big
    return out


def _weights(p, order, r, hh, b_h, phis, corrector):
    """Weights of ``(D_1, ..., D_{order-1}, D_t)`` for the static order ``p`` (zeros elsewhere).

    ``r``: the ``order - 1`` history ratios (entries beyond ``p - 1`` are unused);
    ``phis``: ``[phi_1(hh), ..., phi_{order+1}(hh)]``.
    """
    dtype = hh.dtype
    w = jnp.zeros((order,), dtype)
    if corrector:
        if p == 1:
            return w.at[order - 1].set(0.5)
    elif p == 1:
        return w
    elif p == 2:
        return w.at[0].set(0.5)
    b = jnp.stack([hh * phis[i] * math.factorial(i) / b_h for i in range(1, p + 1)])
    nodes = jnp.concatenate([r[: p - 1], jnp.ones((1,), dtype)])
    mat = jnp.stack([nodes**i for i in range(p)])  # R_{ik} = r_k^{i}, i = 0..p-1
    if corrector:
        c = _solve_small(mat, b)
        return w.at[: p - 1].set(c[: p - 1]).at[order - 1].set(c[p - 1])
    a = _solve_small(mat[: p - 1, : p - 1], b[: p - 1])
    return w.at[: p - 1].set(a)


def _det(m):
    n = m.shape[0]
    if n == 1:
        return m[0, 0]
    if n == 2:
        return m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    return (
        m[0, 0] * (m[1, 1] * m[2, 2] - m[1, 2] * m[2, 1])
        - m[0, 1] * (m[1, 0] * m[2, 2] - m[1, 2] * m[2, 0])
        + m[0, 2] * (m[1, 0] * m[2, 1] - m[1, 1] * m[2, 0])
    )


def _solve_small(mat, b):
    """``mat^{-1} b`` for the 1x1-3x3 Vandermonde systems of UniPC by Cramer's rule: plain
    arithmetic, which compiles much faster on CPU than ``jnp.linalg.solve``'s LU calls (two
    updates per step, each solving for every order of the plan)."""
    det = _det(mat)
    cols = [_det(mat.at[:, k].set(b)) for k in range(mat.shape[0])]
    return jnp.stack(cols) / det


class UniPC(Sampler):
    """UniPC (arXiv 2302.04867): UniP-``order`` predictor + UniC corrector, multistep.

    Static options: ``order`` (1, 2 or 3), ``solver_type`` ("bh1" or "bh2"), ``predict_x0``
    (data- or noise-prediction mode), ``corrector`` (apply UniC), ``lower_order_final`` (``True``:
    step ``k`` of ``N`` uses order ``min(order, k + 1, N - k)``; ``"auto"``: that when ``N < 10``;
    ``False``: never; the same meaning as DPM-Solver++'s and DEIS'). Order ``p`` at step ``k`` is
    ``min(order, k + 1)`` (warm-up); the corrector of a step reuses that step's order. Global
    order: ``order`` without the corrector, ``order + 1`` with it. One model evaluation per step.
    See the module docstring for the update equations.
    """

    order: int = struct.field(pytree_node=False, default=2)
    solver_type: str = struct.field(pytree_node=False, default="bh2")
    predict_x0: bool = struct.field(pytree_node=False, default=True)
    corrector: bool = struct.field(pytree_node=False, default=True)
    lower_order_final: Any = struct.field(pytree_node=False, default=True)
    orders: Any = None
    correctors: Any = None
    default_grid = "auto"  # per budget and schedule: jaxdiff.samplers.grids.budget_grid

    def kernel(self, model, schedule):
        _validate(self.order, self.solver_type)
        lof = check_lower_order_final(self.lower_order_final)
        order = self.order
        data = self.predict_x0
        orders, correctors = self.orders, self.correctors
        use_corrector = self.corrector or correctors is not None

        def predict(params, x, t, cond):
            x0, eps = model.x0_eps(params, x, t, cond, schedule)
            return (x0 if data else eps), x0

        def init(x, params, cond, ts):
            ts = jnp.asarray(ts)
            n_steps = ts.shape[0] - 1
            for arg, plan in (("orders", orders), ("correctors", correctors)):
                if plan is not None and jnp.shape(plan) != (n_steps,):
                    fail(arg, f"shape {jnp.shape(plan)}", f"shape ({n_steps},): one per step")
            lam0 = schedule.lam(ts[0])
            return {
                "x": x,
                "x_prev": x,
                "t_prev": ts[0],
                # model outputs at s_prev, s_prev2, ... (newest first) and their lambdas; the
                # lambdas start as distinct finite dummies so unused branches stay finite
                "m_hist": jnp.zeros((order, *x.shape), x.dtype),
                "lam_hist": lam0 - 1.0 - jnp.arange(order, dtype=lam0.dtype),
                "k": jnp.zeros((), jnp.int32),
                "p_prev": jnp.ones((), jnp.int32),
                "cap": jnp.asarray(lower_order_cap(ts.shape[0] - 1, lof), jnp.int32),
            }

        def update(x, lam_hist, m_hist, n_valid, s, t, p, m_new):
            """One UniP (``m_new is None``) or UniC update from ``s`` = ``lam_hist[0]`` to ``t``.

            ``m_hist[0]`` is M0 at ``s``; ``m_hist[1:]`` and ``lam_hist[1:]`` are older, the
            first ``n_valid`` of them real.
            """
            tdt = lam_hist.dtype
            lam_s, lam_t = lam_hist[0], schedule.lam(t).astype(tdt)
            h = lam_t - lam_s
            hh = -h if data else h
            b_h = hh if self.solver_type == "bh1" else jnp.expm1(hh)
            a_s, sig_s = schedule.alpha_sigma(s)
            a_t, sig_t = schedule.alpha_sigma(t)
            if data:
                base, scale = (sig_t / sig_s) * x, a_t
            else:
                base, scale = (a_t / a_s) * x, sig_t
            m0 = m_hist[0]
            x_new = base - (scale * jnp.expm1(hh)) * m0
            if order == 1 and m_new is None:
                return x_new
            j = jnp.arange(1, order, dtype=jnp.int32)
            valid = j <= n_valid
            r = jnp.where(valid, (lam_hist[1:] - lam_s) / h, (j + 1).astype(tdt))
            is_corr = m_new is not None
            phis = _phis(hh, order + 1)
            ws = jnp.stack(
                [_weights(q, order, r, hh, b_h, phis, is_corr) for q in range(1, order + 1)]
            )
            w = ws[p - 1]
            bshape = (-1,) + (1,) * x.ndim
            d_hist = (m_hist[1:] - m0[None]) / r.astype(x.dtype).reshape(bshape)
            d_hist = jnp.where(valid.reshape(bshape), d_hist, 0.0)
            corr = jnp.tensordot(w[: order - 1].astype(x.dtype), d_hist, axes=1)
            if is_corr:
                corr = corr + w[order - 1].astype(x.dtype) * (m_new - m0)
            return x_new - (scale * b_h) * corr

        def step(key, state, s, t, params, cond):
            x, k = state["x"], state["k"]
            tdt = jnp.result_type(s)
            lam_hist = state["lam_hist"].astype(tdt)
            lam_s = schedule.lam(s).astype(tdt)
            m_s, x0_s = predict(params, x, s, cond)  # the one model evaluation of this step
            a_end = schedule.alpha(t)
            zero, t = zero_noise_guard(schedule, s, t)
            if use_corrector:
                # correct the previous step (s_prev -> s) with the evaluation at its prediction
                x_c = update(
                    state["x_prev"],
                    lam_hist,
                    state["m_hist"],
                    k - 1,
                    state["t_prev"],
                    s,
                    state["p_prev"],
                    m_s,
                )
                do = k > 0
                if correctors is not None:
                    do = do & jnp.asarray(correctors)[jnp.maximum(k - 1, 0)].astype(bool)
                x = jnp.where(do, x_c.astype(x.dtype), x)
            m_hist = jnp.concatenate([m_s[None], state["m_hist"][:-1]])
            lam_hist = jnp.concatenate([lam_s[None], lam_hist[:-1]])
            p = jnp.minimum(order, k + 1)
            if orders is None:
                p = jnp.minimum(p, state["cap"] - k)  # lower_order_final
            else:
                p = jnp.minimum(p, jnp.asarray(orders)[k].astype(jnp.int32))
            p = jnp.maximum(p, 1).astype(jnp.int32)
            x_t = update(x, lam_hist, m_hist, k, s, t, p, None)
            x_t = jnp.where(zero, a_end * x0_s, x_t)  # the h -> inf limit at sigma_t = 0
            new = {
                "x": x_t.astype(x.dtype),
                "x_prev": x,
                "t_prev": jnp.asarray(s, state["t_prev"].dtype),
                "m_hist": m_hist,
                "lam_hist": lam_hist,
                "k": k + 1,
                "p_prev": p,
                "cap": state["cap"],
            }
            return new, {}

        return Kernel(init, step, lambda state: state["x"])


def _validate(order, solver_type):
    if isinstance(order, bool) or order not in _ORDERS:
        fail("order", order, "1, 2 or 3")
    if solver_type not in _SOLVER_TYPES:
        fail("solver_type", solver_type, "'bh1' or 'bh2'")


def unipc(
    order: int = 2,
    solver_type: str = "bh2",
    predict_x0: bool = True,
    corrector: bool = True,
    lower_order_final=True,
    orders=None,
    correctors=None,
) -> UniPC:
    """UniPC sampler (Zhao et al., arXiv 2302.04867): UniP-``order`` predictor + UniC corrector.

    ``x_t^P = x~ - alpha_t B(h) sum_k a_k D_k`` (UniP, order ``p``), corrected with the model
    evaluation at ``x_t^P``: ``x_t^C = x~ - alpha_t B(h)(sum_k c_k D_k + c_p (M_t - M0))`` (UniC,
    order ``p + 1``), one model evaluation per step. ``unipc(1, corrector=False)`` is DDIM and
    ``unipc(2, "bh2", corrector=False)`` is DPM-Solver++(2M). ``orders`` / ``correctors``: an
    optional per-step plan ``(N,)`` (see :class:`UniPC`; its length fixes the step count).
    """
    _validate(order, solver_type)
    plan = {}
    for arg, val, kind in (("orders", orders, "integer"), ("correctors", correctors, "bool")):
        if val is None:
            plan[arg] = None
            continue
        arr = np.asarray(val) if is_concrete(val) else val
        if jnp.ndim(arr) != 1:
            fail(arg, f"shape {jnp.shape(arr)}", "a 1-D per-step array (N,)")
        if is_concrete(val):
            if kind == "integer" and not (
                np.issubdtype(arr.dtype, np.integer) and np.all((arr >= 1) & (arr <= order))
            ):
                fail(arg, val, f"integers in [1, {order}] (order={order})")
            if kind == "bool" and not (arr.dtype == bool or np.all((arr == 0) | (arr == 1))):
                fail(arg, val, "booleans (or 0/1)")
            arr = jnp.asarray(arr, jnp.int32)
        plan[arg] = arr
    return UniPC(
        order=int(order),
        solver_type=solver_type,
        predict_x0=bool(predict_x0),
        corrector=bool(corrector),
        lower_order_final=check_lower_order_final(lower_order_final),
        **plan,
    )
