"""EDM / k-diffusion samplers (Karras et al., arXiv 2206.00364): Euler and Heun with churn.

Both work in the EDM variables ``x_tilde = x / alpha`` and ``sigma_tilde = sigma / alpha =
exp(-lambda)`` (samplers.md 0, 3.5), in which the probability-flow ODE of *any* schedule is
``d x_tilde / d sigma_tilde = (x_tilde - D(x_tilde; sigma_tilde)) / sigma_tilde = eps_hat``.
The model is called in the schedule's own variables (``x = alpha x_tilde`` at the time whose
``sigma_tilde`` matches) and every step converts back, so the state is always the schedule's
``x`` and these samplers run on any schedule (VP, VE, EDM, flow).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxdiff._checks import fail, is_concrete
from jaxdiff.samplers.base import Kernel, Sampler, per_example_normal

__all__ = ["EDMEuler", "EDMHeun", "euler", "heun"]


def _tilde(schedule, t):
    """``(alpha_t, sigma_tilde_t)`` in the dtype of ``t``."""
    a, _ = schedule.alpha_sigma(t)
    return a, jnp.exp(-schedule.lam(t))


class EDMEuler(Sampler):
    """EDM / k-diffusion Euler in ``(x_tilde, sigma_tilde)``.

    Update (one step from the noisier ``s`` to ``t``)::

        d = (x_tilde_s - D(x_tilde_s; sigma_tilde_s)) / sigma_tilde_s      (= eps_hat)
        x_tilde_t = x_tilde_s + (sigma_tilde_t - sigma_tilde_s) d,   x_t = alpha_t x_tilde_t

    First order. It equals DDIM (eta = 0, arXiv 2010.02502) on the same grid (samplers.md 7.1)
    and is exact for point-mass data. Source: Karras et al. arXiv 2206.00364 (Algorithm 1 without
    the second stage); k-diffusion ``sample_euler``.

    Default grid: the schedule's own spacing (Karras on the EDM schedule, uniform in t on VP
    schedules), as DDIM's, so that ``euler()`` and ``ddim()`` give the same numbers by default
    (with the Karras grid on the DDPM discrete schedule it was 1.0-1.6x DDIM at NFE 3-20).
    """

    default_grid = "uniform"

    def kernel(self, model, schedule):
        def init(x, params, cond, ts):
            return x

        def step(key, x, s, t, params, cond):
            a_s, st_s = _tilde(schedule, s)
            a_t, st_t = _tilde(schedule, t)
            _, d = model.x0_eps(params, x, s, cond, schedule)  # (x~ - D)/sigma~ == eps_hat
            x_tilde = x / a_s + (st_t - st_s) * d
            return (a_t * x_tilde).astype(x.dtype), {}

        return Kernel(init, step, lambda x: x)


class EDMHeun(Sampler):
    """EDM Heun sampler with "churn" (Karras et al. arXiv 2206.00364, Algorithm 2).

    One step from the noisier ``s`` to ``t`` (``N`` = number of grid steps, ``z ~ N(0, I)``)::

        gamma = min(s_churn / N, sqrt(2) - 1) if s_tmin <= sigma_tilde_s <= s_tmax else 0
        sigma_hat = sigma_tilde_s (1 + gamma)       -> t_hat = schedule.t_from_sigma_tilde(...)
        x_hat = x_tilde_s + sqrt(sigma_hat^2 - sigma_tilde_s^2) s_noise z
        d  = (x_hat - D(x_hat; sigma_hat)) / sigma_hat
        x' = x_hat + (sigma_tilde_t - sigma_hat) d                         (Euler)
        d' = (x' - D(x'; sigma_tilde_t)) / sigma_tilde_t
        x_tilde_t = x_hat + (sigma_tilde_t - sigma_hat) (d + d') / 2       (Heun)

    and ``x_t = alpha_t x_tilde_t``. Second order; 2 model evaluations per step
    (``nfe_per_step = 2``); exact for point-mass data when ``s_churn = 0``.

    Last step: EDM's grid ends at ``sigma_tilde = 0`` and its last step is a plain Euler step
    (NFE ``2N - 1``). ``final_euler=True`` (default) does the same on any grid: the step onto
    ``ts[-1]`` is Euler (one evaluation, NFE ``2N - 1``; with ``endpoint="zero"`` in
    :func:`jaxdiff.sample` it is EDM's own final step). The Heun stage there would evaluate
    ``d' = (x' - D(x'))/sigma_tilde_t`` at the smallest noise level, which amplifies the Euler
    predictor's error off the data manifold by ``~ (sigma_s - sigma_t) / (2 sigma_t)``: on the
    DDPM discrete schedule (``sigma_tilde(t_end) = 0.01``) Heun on every step was 5-200x worse
    than DDIM at NFE 3-10 on a 64-D mixture, with the final Euler step 0.9-2.7x
    (docs/few_step.md). ``final_euler=False`` takes the Heun step on every step (NFE ``2N``;
    samplers.md 7.2's regression values). A step that lands on ``sigma_tilde_t = 0`` is Euler.

    Churn: ``sigma_hat`` is mapped back to a time with ``schedule.t_from_sigma_tilde`` and
    clipped to ``schedule.t_max`` (then ``sigma_hat = sigma_tilde(t_hat)``, so no noise is added
    where the schedule cannot go noisier, e.g. the first step from ``t = 1`` on ``vp_linear``).
    ``s_tmin``/``s_tmax`` are in ``sigma_tilde`` units. ``s_churn``, ``s_tmin``, ``s_tmax`` and
    ``s_noise`` are pytree leaves. EDM's ImageNet-64 setting: ``s_churn=40, s_tmin=0.05,
    s_tmax=50, s_noise=1.003`` with 256 steps.
    """

    s_churn: Any = 0.0
    s_tmin: Any = 0.0
    s_tmax: Any = math.inf
    s_noise: Any = 1.0
    final_euler: bool = struct.field(pytree_node=False, default=True)
    nfe_per_step = 2
    default_grid = "karras"

    def total_nfe(self, steps):
        return max(2 * steps - 1, 0) if self.final_euler else 2 * steps

    @property
    def stochastic(self):  # noqa: D401 - property on purpose
        return not (is_concrete(self.s_churn) and float(self.s_churn) == 0.0)

    def kernel(self, model, schedule):
        churn = self.stochastic

        def init(x, params, cond, ts):
            # state: (x, number of grid steps N as a float in the dtype of the times, ts[-1])
            return x, jnp.asarray(ts.shape[0] - 1, ts.dtype), jnp.asarray(ts)[-1]

        def step(key, state, s, t, params, cond):
            x, n, t_last = state
            a_s, st_s = _tilde(schedule, s)
            a_t, st_t = _tilde(schedule, t)
            x_hat = x / a_s  # x_tilde
            t_hat, a_hat, st_hat = s, a_s, st_s
            if churn:
                inside = (st_s >= self.s_tmin) & (st_s <= self.s_tmax)
                gamma = jnp.where(inside, jnp.minimum(self.s_churn / n, math.sqrt(2.0) - 1.0), 0.0)
                t_hat = schedule.t_from_sigma_tilde(st_s * (1.0 + gamma))
                t_hat = jnp.clip(t_hat, s, schedule.t_max).astype(st_s.dtype)
                t_hat = jnp.where(gamma > 0, t_hat, s)  # gamma = 0: exactly s, no round trip
                a_hat, st_hat = _tilde(schedule, t_hat)
                var = st_hat**2 - st_s**2
                pos = var > 0
                std = jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)  # grad-safe sqrt
                x_hat = x_hat + (std * self.s_noise) * per_example_normal(key, x)
            _, d = model.x0_eps(params, a_hat * x_hat, t_hat, cond, schedule)
            dst = st_t - st_hat
            x_eul = x_hat + dst * d
            # Heun unless the step lands on sigma_tilde = 0 or (final_euler) on ts[-1]
            heun_ok = st_t > 0
            if self.final_euler:
                heun_ok = heun_ok & (t != t_last)
            t_eval = jnp.where(heun_ok, t, t_hat)
            a_eval = jnp.where(heun_ok, a_t, a_hat)

            def heun_stage(_):
                _, d2 = model.x0_eps(params, a_eval * x_eul, t_eval, cond, schedule)
                return x_hat + dst * (0.5 * (d + d2))

            x_tilde = jax.lax.cond(heun_ok, heun_stage, lambda _: x_eul, None)
            return ((a_t * x_tilde).astype(x.dtype), n, t_last), {}

        return Kernel(init, step, lambda state: state[0])


def euler() -> EDMEuler:
    """EDM / k-diffusion Euler sampler (arXiv 2206.00364), first order; equals DDIM."""
    return EDMEuler()


def heun(s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, final_euler=True) -> EDMHeun:
    """EDM Heun sampler with churn (arXiv 2206.00364, Algorithm 2), second order, 2 NFE/step.

    Args:
      s_churn: total churn ``S_churn >= 0``; ``gamma_i = min(s_churn/N, sqrt(2) - 1)``.
        ``0`` (default) is the deterministic Heun solver of the probability-flow ODE.
      s_tmin, s_tmax: churn only where ``s_tmin <= sigma_tilde_i <= s_tmax``.
      s_noise: scale of the churn noise (EDM uses 1.003 on ImageNet-64).
      final_euler: the last step (onto ``ts[-1]``) is Euler, as EDM's step to sigma = 0 (NFE
        ``2N - 1``); ``False``: Heun on every step (NFE ``2N``). See :class:`EDMHeun`.
    """
    for name, v in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
        if is_concrete(v) and not float(v) >= 0.0:
            fail(name, v, "a number >= 0")
    if is_concrete(s_tmin, s_tmax) and not float(s_tmax) >= float(s_tmin):
        fail("s_tmax", s_tmax, f"a number >= s_tmin={float(s_tmin):g}")
    return EDMHeun(
        s_churn=s_churn,
        s_tmin=s_tmin,
        s_tmax=s_tmax,
        s_noise=s_noise,
        final_euler=bool(final_euler),
    )
