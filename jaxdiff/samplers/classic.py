"""DDPM ancestral sampling and DDIM, written for any schedule ``x_t = alpha x0 + sigma eps``.

One step goes from the noisier time ``s`` to the cleaner time ``t`` with
``h = lambda_t - lambda_s > 0``. The DDPM posterior ``q(x_t | x_s, x0)`` (Ho et al. arXiv
2006.11239; general-schedule form of Kingma et al. VDM arXiv 2107.00630) has

* mean ``(alpha_s/alpha_t)(sigma_t^2/sigma_s^2) x_s + alpha_t (1 - e^{-2h}) x0_hat``,
* variance ``sigma_t^2 (1 - e^{-2h})`` ("small"), or ``sigma_s^2 (1 - e^{-2h})`` ("large", the
  step's beta for VP).

DDIM (Song et al. arXiv 2010.02502) with ``c = eta sigma_t sqrt(1 - e^{-2h})``:
``x_t = alpha_t x0_hat + sqrt(sigma_t^2 - c^2) eps_hat + c z``; ``eta = 0`` is deterministic
(= DPM-Solver-1, first order) and ``eta = 1`` is DDPM ancestral with "small" variance.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import struct

from jaxdiff._checks import fail, is_concrete
from jaxdiff.samplers.base import Kernel, Sampler, per_example_normal

__all__ = ["DDIM", "DDPM", "EulerMaruyama", "ddim", "ddpm", "euler_maruyama"]


class DDIM(Sampler):
    """DDIM with stochasticity ``eta`` (a traced leaf: sweeping it does not recompile)."""

    eta: Any = 0.0

    @property
    def stochastic(self):  # noqa: D401 - property on purpose
        return not (is_concrete(self.eta) and float(self.eta) == 0.0)

    def kernel(self, model, schedule):
        def init(x, params, cond, ts):
            return x

        def step(key, x, s, t, params, cond):
            x0, eps = model.x0_eps(params, x, s, cond, schedule)
            a_t, sig_t = schedule.alpha_sigma(t)
            h = schedule.lam(t) - schedule.lam(s)
            c = self.eta * sig_t * jnp.sqrt(-jnp.expm1(-2.0 * h))
            x_next = a_t * x0 + jnp.sqrt(jnp.maximum(sig_t**2 - c**2, 0.0)) * eps
            if self.stochastic:
                x_next = x_next + c * per_example_normal(key, x)
            return x_next.astype(x.dtype), {}

        return Kernel(init, step, lambda x: x)


class DDPM(Sampler):
    """DDPM ancestral sampling from the posterior ``q(x_t | x_s, x0_hat)``.

    ``variance``: ``"small"`` (posterior variance, DDPM's ``fixed_small``; identical to DDIM
    ``eta = 1``) or ``"large"`` (the step's beta, ``fixed_large``). Noise is added on every step,
    so the result follows the marginal at ``ts[-1]``; pass ``final_denoise=True`` to
    :func:`jaxdiff.sample` to return ``x0_hat`` instead.
    """

    variance: str = struct.field(pytree_node=False, default="small")
    stochastic = True

    def kernel(self, model, schedule):
        if self.variance not in ("small", "large"):
            fail("variance", self.variance, "'small' or 'large'")

        def init(x, params, cond, ts):
            return x

        def step(key, x, s, t, params, cond):
            x0, _ = model.x0_eps(params, x, s, cond, schedule)
            a_s, sig_s = schedule.alpha_sigma(s)
            a_t, sig_t = schedule.alpha_sigma(t)
            h = schedule.lam(t) - schedule.lam(s)
            one_m = -jnp.expm1(-2.0 * h)  # 1 - e^{-2h} = sigma_{s|t}^2 / sigma_s^2
            mean = (a_s / a_t) * (sig_t**2 / sig_s**2) * x + a_t * one_m * x0
            std = jnp.sqrt(one_m) * (sig_t if self.variance == "small" else sig_s)
            return (mean + std * per_example_normal(key, x)).astype(x.dtype), {}

        return Kernel(init, step, lambda x: x)


class EulerMaruyama(Sampler):
    """Euler-Maruyama on the reverse SDE, as a ``lax.scan`` kernel (score_sde's EM predictor).

    ``x_t = x_s - [f(s) x_s - g(s)^2 score(x_s, s)] (s - t) + g(s) sqrt(s - t) z`` with
    ``score = -eps_hat / sigma`` (Song et al. arXiv 2011.13456, eq. 6 and app. G). Strong order
    1/2, weak order 1. The fast alternative to :func:`jaxdiff.samplers.reverse_sde` (diffrax with
    a Brownian tree): noise is drawn per example and step with ``per_example_normal``.
    """

    stochastic = True

    def kernel(self, model, schedule):
        def init(x, params, cond, ts):
            return x

        def step(key, x, s, t, params, cond):
            _, eps = model.x0_eps(params, x, s, cond, schedule)
            dt = s - t  # > 0
            f = schedule.drift_coef(s)
            g2 = schedule.diffusion_sq(s)
            drift = f * x + (g2 / schedule.sigma(s)) * eps  # f x - g^2 score
            x_next = x - drift * dt + jnp.sqrt(g2 * dt) * per_example_normal(key, x)
            return x_next.astype(x.dtype), {}

        return Kernel(init, step, lambda x: x)


def euler_maruyama() -> EulerMaruyama:
    """Euler-Maruyama reverse-SDE sampler (a scan; see :class:`EulerMaruyama`)."""
    return EulerMaruyama()


def ddim(eta: float = 0.0) -> DDIM:
    """DDIM sampler (arXiv 2010.02502); ``eta=0`` deterministic, ``eta=1`` = DDPM ancestral."""
    if is_concrete(eta) and not 0.0 <= float(eta) <= 1.0:
        fail("eta", eta, "a number in [0, 1]")
    return DDIM(eta=eta)


def ddpm(variance: str = "small") -> DDPM:
    """DDPM ancestral sampler (arXiv 2006.11239) with ``"small"`` or ``"large"`` variance."""
    if variance not in ("small", "large"):
        fail("variance", variance, "'small' or 'large'")
    return DDPM(variance=variance)
