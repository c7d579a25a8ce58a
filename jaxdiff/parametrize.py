"""Exact conversions between model parametrizations: eps, x0, v, score and flow velocity.

With ``x = alpha x0 + sigma eps`` (any schedule), every parametrization is an invertible linear
function of the pair ``(x0, eps)`` given ``x``; conversions go through that pair:

* ``eps``: the noise; ``x0 = (x - sigma eps) / alpha``.
* ``x0``: the data (Tweedie) prediction; ``eps = (x - alpha x0) / sigma``.
* ``v = alpha eps - sigma x0`` (Salimans & Ho, arXiv 2202.00512); for general schedules
  ``x0 = (alpha x - sigma v)/(alpha^2 + sigma^2)``, ``eps = (sigma x + alpha v)/(alpha^2 + sigma^2)``.
* ``score = grad log p_t(x) = -eps / sigma``.
* ``velocity u = alpha' x0 + sigma' eps = dx_t/dt`` (flow matching, arXiv 2210.02747); with
  ``det = alpha sigma' - sigma alpha'``: ``x0 = (sigma' x - sigma u)/det``, ``eps = (alpha u - alpha' x)/det``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff._checks import as_float_array, fail
from jaxdiff.schedules import Schedule, _bcast

__all__ = ["PARAMETRIZATIONS", "check_parametrization", "to_x0_eps", "from_x0_eps", "convert"]

PARAMETRIZATIONS = ("eps", "x0", "v", "score", "velocity")


def check_parametrization(p: str, arg: str = "parametrization") -> str:
    """Return ``p`` if it is one of :data:`PARAMETRIZATIONS`, else raise naming ``arg``."""
    if p not in PARAMETRIZATIONS:
        fail(arg, p, f"one of {PARAMETRIZATIONS}")
    return p


def _coefs(schedule: Schedule, t, x, need_derivs: bool):
    t = as_float_array(t)
    a, s = schedule.alpha_sigma(t)
    out = [_bcast(a, x), _bcast(s, x)]
    if need_derivs:
        one = jnp.ones_like(t)
        da = jax.jvp(schedule.alpha, (t,), (one,))[1]
        ds = jax.jvp(schedule.sigma, (t,), (one,))[1]
        out += [_bcast(da, x), _bcast(ds, x)]
    return out


def to_x0_eps(pred, parametrization: str, x, t, schedule: Schedule):
    """Convert a prediction to the pair ``(x0_hat, eps_hat)``.

    Args:
      pred: model output, shape ``(batch, *event)``.
      parametrization: what ``pred`` is, one of :data:`PARAMETRIZATIONS`.
      x: the noisy input ``x_t``, same shape as ``pred``.
      t: time, shape ``()`` or ``(batch,)``.
      schedule: the :class:`~jaxdiff.schedules.Schedule` defining ``alpha, sigma``.
    Returns:
      ``(x0_hat, eps_hat)``, each shaped like ``x``.
    """
    check_parametrization(parametrization)
    if parametrization == "velocity":
        a, s, da, ds = _coefs(schedule, t, x, True)
        det = a * ds - s * da
        return (ds * x - s * pred) / det, (a * pred - da * x) / det
    a, s = _coefs(schedule, t, x, False)
    if parametrization == "eps":
        return (x - s * pred) / a, pred
    if parametrization == "x0":
        return pred, (x - a * pred) / s
    if parametrization == "v":
        n = a**2 + s**2
        return (a * x - s * pred) / n, (s * x + a * pred) / n
    # score
    eps = -s * pred
    return (x - s * eps) / a, eps


def from_x0_eps(x0, eps, parametrization: str, x, t, schedule: Schedule):
    """Express the pair ``(x0, eps)`` in ``parametrization`` (inverse of :func:`to_x0_eps`)."""
    check_parametrization(parametrization)
    if parametrization == "x0":
        return x0
    if parametrization == "eps":
        return eps
    if parametrization == "velocity":
        _, _, da, ds = _coefs(schedule, t, x, True)
        return da * x0 + ds * eps
    a, s = _coefs(schedule, t, x, False)
    if parametrization == "v":
        return a * eps - s * x0
    return -eps / s  # score


def convert(pred, from_: str, to: str, x, t, schedule: Schedule):
    """Convert ``pred`` from parametrization ``from_`` to ``to`` at ``(x, t)``; exact."""
    check_parametrization(from_, "from_")
    check_parametrization(to, "to")
    if from_ == to:
        return pred
    x0, eps = to_x0_eps(pred, from_, x, t, schedule)
    return from_x0_eps(x0, eps, to, x, t, schedule)
