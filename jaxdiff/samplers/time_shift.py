"""Time-shift sampler against exposure bias (Li, Qu, Yao, Sun, Moens, "Alleviating Exposure
Bias in Diffusion Models through Sampling with Shifted Time Steps", arXiv 2305.15583, ICLR 2024).

During sampling the state ``x_t`` tends to be noisier than the training marginal at ``t``.
After each step to the nominal time ``t'``, the paper estimates per example the variance of
the state over all its coordinates, ``v = Var_d(x_{t'})``, and queries the network (and takes
the next step's coefficients) at the time in a window around ``t'`` whose noise variance
matches it (the paper's Algorithm 1/2):

``t_s = argmin_{tau in [t' - w/2, t' + w/2]} (v - sigma_tau^2)^2``

while ``t' > t_c`` (the cutoff); below it ``t_s = t'``. On a variance-preserving schedule
``sigma^2 = 1 - alpha^2`` is increasing in ``tau``, so the minimiser over the window is the
exact clip ``t_s = clip(tau(v), t' - w/2, t' + w/2)`` with ``tau(v)`` the time where
``sigma^2 = v`` (the paper searches a discrete window of timesteps; this is its continuous
limit). The criterion ignores the ``alpha^2 Var(x0)`` part of ``Var(x_t)``: it is a heuristic on
the time argument (exact only for data with zero per-example spread), so it is refused on
non-VP schedules and should stay off in order tests.

The update is DDIM with stochasticity ``eta`` (Song et al. arXiv 2010.02502), from the shifted
time ``t_s`` to the next nominal time: ``x_{t'} = alpha_{t'} x0_hat(x, t_s) +
sqrt(sigma_{t'}^2 - c^2) eps_hat(x, t_s) + c z``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxdiff._checks import fail, is_concrete
from jaxdiff.samplers.base import Kernel, Sampler, per_example_normal
from jaxdiff.schedules import _bcast

__all__ = ["TimeShift", "time_shift"]


def matched_time(schedule, v, t_next, window, t_floor=None):
    """``clip(tau(v), t_next - window/2, t_next + window/2)`` within the schedule's range (and
    above ``t_floor`` if given): the minimiser of ``(v - sigma_tau^2)^2`` over the window on a
    VP schedule (``v``: shape ``(batch,)``, per-example variances; ``t_next``: scalar; returns
    shape ``(batch,)``)."""
    tdt = jnp.result_type(t_next)
    lo = jnp.maximum(t_next - 0.5 * window, schedule.t_min)
    if t_floor is not None:
        lo = jnp.maximum(lo, t_floor)
    hi = jnp.minimum(t_next + 0.5 * window, schedule.t_max)
    tiny = jnp.finfo(tdt).tiny ** 0.5
    vc = jnp.clip(v.astype(tdt), tiny, 1.0 - jnp.finfo(tdt).eps)
    lam = 0.5 * (jnp.log1p(-vc) - jnp.log(vc))  # sigma_tau^2 = v  <=>  lambda_tau = lam
    # clip in lambda first (decreasing in t), so t_from_lam stays inside the schedule's range
    lam = jnp.clip(lam, schedule.lam(hi).astype(tdt), schedule.lam(lo).astype(tdt))
    tau = schedule.t_from_lam(lam)
    tau = jnp.where(v >= 1.0, hi, jnp.where(v <= 0.0, lo, tau))
    return jnp.clip(tau, lo, hi).astype(tdt)


class TimeShift(Sampler):
    """DDIM(``eta``) with per-example shifted times (arXiv 2305.15583; module docstring).

    ``window``: width ``w`` of the search window, in the schedule's time units (the schedules'
    ``t`` runs over [0, 1]: 0.04 is 40 of 1000 DDPM timesteps), its clean end kept above the
    midpoint of the next grid step (so every step goes forward); ``cutoff``: no shift once
    the nominal time is ``<= cutoff``. All three are leaves (sweeping them does not recompile).
    The per-step info reports ``t_model``, shape ``(batch,)``: the time the next step queries.
    """

    eta: Any = 0.0
    window: Any = 0.04
    cutoff: Any = 0.3

    @property
    def stochastic(self):  # noqa: D401
        return not (is_concrete(self.eta) and float(self.eta) == 0.0)

    def kernel(self, model, schedule):
        if not schedule.is_vp:
            fail(
                "schedule",
                type(schedule).__name__,
                "a variance-preserving schedule (time_shift matches Var(x) to sigma^2 = 1 - alpha^2)",
            )

        def init(x, params, cond, ts):
            ts = jnp.asarray(ts)
            tdt = jnp.result_type(ts.dtype, float)
            return {
                "x": x,
                "t": jnp.full((x.shape[0],), ts[0], tdt),
                # the grid's next-but-one times: the window's clean end stays above the
                # midpoint of the next step, so every step goes forward in time
                "after": jnp.concatenate([ts[2:], ts[-1:], ts[-1:]]).astype(tdt),
                "n": jnp.zeros((), jnp.int32),
            }

        def step(key, state, s, t, params, cond):
            x, t_cur, n = state["x"], state["t"], state["n"]
            x0, eps = model.x0_eps(params, x, t_cur.astype(jnp.result_type(s)), cond, schedule)
            a_t, sig_t = schedule.alpha_sigma(t)
            h = schedule.lam(t) - schedule.lam(t_cur)
            c = _bcast(self.eta * sig_t * jnp.sqrt(-jnp.expm1(-2.0 * h)), x)
            x_next = a_t * x0 + jnp.sqrt(jnp.maximum(sig_t**2 - c**2, 0.0)) * eps
            if self.stochastic:
                x_next = x_next + c * per_example_normal(key, x)
            x_next = x_next.astype(x.dtype)
            v = jnp.var(x_next.reshape(x.shape[0], -1), axis=1)
            floor = 0.5 * (t + state["after"][n].astype(jnp.result_type(t)))
            shifted = matched_time(schedule, v, t, self.window, floor)
            t_new = jnp.where(t > self.cutoff, shifted, jnp.full_like(shifted, t))
            t_new = t_new.astype(t_cur.dtype)
            new = {"x": x_next, "t": t_new, "after": state["after"], "n": n + 1}
            return new, {"t_model": t_new}

        return Kernel(init, step, lambda state: state["x"])


def time_shift(eta: float = 0.0, window: float = 0.04, cutoff: float = 0.3) -> TimeShift:
    """Time-shift DDIM sampler (Li et al. arXiv 2305.15583): after each step, per example,
    query the network at the time in ``[t' - window/2, t' + window/2]`` whose noise variance
    ``sigma^2`` matches the state's variance over its coordinates, while ``t' > cutoff``.

    ``eta``: DDIM stochasticity in [0, 1] (1 = DDPM ancestral, the paper's TS-DDPM);
    ``window`` >= 0 and ``cutoff`` in [0, 1] in the schedule's time units. These defaults are
    jaxdiff's (the paper tunes ``w`` and ``t_c`` per data set); ``window=0`` is plain DDIM.
    VP schedules only. Returns a :class:`TimeShift`; shapes: ``x_T`` ``(batch, ...)``.
    """
    for arg, val, lo, hi in (("eta", eta, 0.0, 1.0), ("cutoff", cutoff, 0.0, 1.0)):
        if is_concrete(val) and not lo <= float(val) <= hi:
            fail(arg, val, f"a number in [{lo:g}, {hi:g}]")
    if is_concrete(window) and not float(window) >= 0.0:
        fail("window", window, "a width >= 0 in the schedule's time units")
    return TimeShift(eta=eta, window=window, cutoff=cutoff)
