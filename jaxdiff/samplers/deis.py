"""DEIS: rho-AB-DEIS, the exponential-integrator Adams-Bashforth method of Zhang & Chen
(arXiv 2204.13902) with exact integrals of the Lagrange interpolant in ``log rho``.

With ``rho = sigma/alpha = exp(-lambda)`` the PF-ODE is ``d(x/alpha)/d rho = eps_hat``, so one
step from the noisier time ``s`` (``rho_0``) to the cleaner time ``t`` (``rho_t``) is

``x_t / alpha_t = x_s / alpha_s + sum_{j<p} c_j eps_hat(x_{s_j}, s_j)``,
``c_j = int_{rho_0}^{rho_t} l_j(log rho) d rho``,

where ``l_j`` is the Lagrange basis polynomial in ``log rho`` on the nodes
``log rho_0 (newest), log rho_1, ...`` of the last ``p`` model evaluations. The integrals have
closed forms (samplers.md 3.4), with ``L = log``:

* ``p = 1``: ``c_0 = rho_t - rho_0`` (DDIM);
* ``p = 2``: ``F(x; b, c) = x (L x - L c - 1) / (L b - L c)``,
  ``c_0 = F(rho_t; rho_0, rho_1) - F(rho_0; rho_0, rho_1)`` and ``c_1`` with the nodes swapped;
* ``p = 3``: ``G(x; b, c, d) = x [L c (L d - L x + 1) - L d L x + L d + (L x)^2 - 2 L x + 2]
  / ((L b - L c)(L b - L d))``, ``c_j = G(rho_t; rho_j, ...) - G(rho_0; rho_j, ...)``.

The integrals are evaluated in the shifted variable ``rho / rho_0`` (the Lagrange basis only
depends on differences of ``log rho``), which keeps ``log rho`` of size ``O(h)`` and avoids
cancellation. rho-AB-DEIS-p has global order ``p``; it equals the noise-form DPM-Solver 2M
"taylor" for ``p = 2`` and the noise-form 3M with the exact (``c = 2``) coefficient for ``p = 3``.
"""

from __future__ import annotations

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

__all__ = ["DEIS", "deis"]

_ORDERS = (1, 2, 3)


def _f(u, ub, uc):
    """``F`` of samplers.md 3.4 at ``x = e^u`` with ``L b = ub``, ``L c = uc``."""
    return jnp.exp(u) * (u - uc - 1.0) / (ub - uc)


def _g(u, ub, uc, ud):
    """``G`` of samplers.md 3.4 at ``x = e^u`` with ``L b = ub``, ``L c = uc``, ``L d = ud``."""
    poly = uc * (ud - u + 1.0) - ud * u + ud + u**2 - 2.0 * u + 2.0
    return jnp.exp(u) * poly / ((ub - uc) * (ub - ud))


def _coefficients(p, order, nodes, u_t):
    """``c_j / rho_0`` for the static order ``p``, padded with zeros to length ``order``.

    ``nodes``: ``log(rho_j / rho_0)`` for ``j = 0..order-1`` (``nodes[0] = 0``);
    ``u_t = log(rho_t / rho_0) = -h``.
    """
    dtype = u_t.dtype
    if p == 1:
        c = [jnp.expm1(u_t)]
    elif p == 2:
        u0, u1 = nodes[0], nodes[1]
        c = [_f(u_t, u0, u1) - _f(0.0, u0, u1), _f(u_t, u1, u0) - _f(0.0, u1, u0)]
    else:
        u0, u1, u2 = nodes[0], nodes[1], nodes[2]
        c = [
            _g(u_t, u0, u1, u2) - _g(0.0, u0, u1, u2),
            _g(u_t, u1, u2, u0) - _g(0.0, u1, u2, u0),
            _g(u_t, u2, u0, u1) - _g(0.0, u2, u0, u1),
        ]
    c = c + [jnp.zeros((), dtype)] * (order - p)
    return jnp.stack([jnp.asarray(ci, dtype) for ci in c])


class DEIS(Sampler):
    """rho-AB-DEIS of order ``order`` (1, 2 or 3; arXiv 2204.13902), multistep.

    ``x_t = (alpha_t/alpha_s) x_s + alpha_t sum_{j<p} c_j eps_hat_j`` with the exact
    ``log rho``-Lagrange integrals ``c_j`` (module docstring). Step ``k`` uses order
    ``p = min(order, k + 1)`` (warm-up by lower orders; with ``lower_order_final=True`` also
    ``<= N - k``, with ``"auto"`` that when ``N < 10``: the meaning DPM-Solver++ and UniPC use). Global order ``order``; one model evaluation per step; order 1 is DDIM.
    """

    order: int = struct.field(pytree_node=False, default=3)
    lower_order_final: Any = struct.field(pytree_node=False, default=True)
    default_grid = "auto"  # per budget and schedule: jaxdiff.samplers.grids.budget_grid

    def kernel(self, model, schedule):
        _validate(self.order)
        lof = check_lower_order_final(self.lower_order_final)
        order = self.order

        def init(x, params, cond, ts):
            ts = jnp.asarray(ts)
            lam0 = schedule.lam(ts[0])
            return {
                "x": x,
                # eps_hat at the previous grid points (newest first) and their lambdas
                "e_hist": jnp.zeros((max(order - 1, 1), *x.shape), x.dtype),
                "lam_hist": lam0 - 1.0 - jnp.arange(max(order - 1, 1), dtype=lam0.dtype),
                "k": jnp.zeros((), jnp.int32),
                "cap": jnp.asarray(lower_order_cap(ts.shape[0] - 1, lof), jnp.int32),
            }

        def step(key, state, s, t, params, cond):
            x, k = state["x"], state["k"]
            tdt = jnp.result_type(s)
            x0_s, eps = model.x0_eps(params, x, s, cond, schedule)  # the one model evaluation
            a_end = schedule.alpha(t)
            zero, t = zero_noise_guard(schedule, s, t)
            lam_s = schedule.lam(s).astype(tdt)
            lam_t = schedule.lam(t).astype(tdt)
            a_s, sig_s = schedule.alpha_sigma(s)
            a_t, _ = schedule.alpha_sigma(t)
            lam_hist = state["lam_hist"].astype(tdt)
            x_new = (a_t / a_s) * x
            if order == 1:
                c = jnp.expm1(lam_s - lam_t)[None]
                es = eps[None]
            else:
                j = jnp.arange(1, order, dtype=jnp.int32)
                valid = j <= k
                # log(rho_j / rho_0) = lambda_s - lambda_{s_j} > 0; negative dummies otherwise
                u = jnp.where(valid, lam_s - lam_hist[: order - 1], -j.astype(tdt))
                nodes = jnp.concatenate([jnp.zeros((1,), tdt), u])
                u_t = lam_s - lam_t
                p = jnp.minimum(order, k + 1)
                p = jnp.maximum(jnp.minimum(p, state["cap"] - k), 1)  # lower_order_final
                cs = jnp.stack([_coefficients(q, order, nodes, u_t) for q in range(1, order + 1)])
                c = cs[p - 1]
                es = jnp.concatenate([eps[None], state["e_hist"][: order - 1]])
            # alpha_t * rho_0 * (c_j / rho_0), rho_0 = sigma_s / alpha_s
            coef = (a_t * sig_s / a_s) * c
            x_new = x_new + jnp.tensordot(coef.astype(x.dtype), es, axes=1)
            x_new = jnp.where(zero, a_end * x0_s, x_new)  # the h -> inf limit at sigma_t = 0
            if order == 1:
                e_hist, new_lam = state["e_hist"], state["lam_hist"]
            else:
                e_hist = jnp.concatenate([eps[None], state["e_hist"][:-1]])
                new_lam = jnp.concatenate([lam_s[None], lam_hist[:-1]])
            new = {
                "x": x_new.astype(x.dtype),
                "e_hist": e_hist.astype(x.dtype),
                "lam_hist": new_lam,
                "k": k + 1,
                "cap": state["cap"],
            }
            return new, {}

        return Kernel(init, step, lambda state: state["x"])


def _validate(order):
    if isinstance(order, bool) or order not in _ORDERS:
        fail("order", order, "1, 2 or 3")


def deis(order: int = 3, lower_order_final=True) -> DEIS:
    """rho-AB-DEIS sampler (Zhang & Chen, arXiv 2204.13902) of order 1, 2 or 3.

    ``x_t / alpha_t = x_s / alpha_s + sum_j c_j eps_hat_j``, ``c_j`` the exact integrals over
    ``rho = sigma/alpha`` of the Lagrange basis in ``log rho`` (samplers.md 3.4); warm-up by
    lower orders; global order ``order``; ``deis(1)`` is DDIM. See :class:`DEIS`.
    """
    _validate(order)
    return DEIS(order=int(order), lower_order_final=check_lower_order_final(lower_order_final))
