"""Denoising score matching: the training loss of every diffusion parametrization.

``x_t = alpha(t) x0 + sigma(t) eps``; the model's prediction at ``(x_t, t)`` is converted exactly
to the target space (eps, x0, v, score or velocity) and compared with the true target under a
weighting ``w(t)`` (Vincent 2011; Ho et al. arXiv 2006.11239; Song et al. arXiv 2011.13456;
Kingma et al. arXiv 2107.00630). Label dropout for classifier-free guidance lives here too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import parametrize
from jaxdiff._checks import as_float_array, fail, is_concrete
from jaxdiff.denoiser import Denoiser
from jaxdiff.schedules import Schedule

__all__ = [
    "WEIGHTINGS",
    "T_SAMPLINGS",
    "dsm_loss",
    "dsm_loss_per_example",
    "sample_times",
    "loss_weight",
    "drop_cond",
]

WEIGHTINGS = ("none", "snr", "min_snr", "likelihood", "edm")
T_SAMPLINGS = ("uniform", "log_snr", "lognormal", "cosine")


def _time_range(schedule: Schedule, t_min, t_max):
    t_min = schedule.t_end if t_min is None else t_min
    t_max = schedule.t_start if t_max is None else t_max
    schedule.check_t(t_min, "t_min")
    schedule.check_t(t_max, "t_max")
    if is_concrete(t_min) and not float(np.asarray(t_min)) > float(schedule.t_min):
        fail("t_min", t_min, f"a time above {float(schedule.t_min):g}, where sigma = 0")
    if is_concrete(t_min, t_max) and not float(np.asarray(t_min)) < float(np.asarray(t_max)):
        fail("t_min", t_min, f"a time below t_max={float(np.asarray(t_max)):g}")
    return as_float_array(t_min), as_float_array(t_max)


def sample_times(
    key,
    schedule: Schedule,
    n: int,
    t_sampling: str | None = None,
    t_min=None,
    t_max=None,
    *,
    lognormal_mean=-1.2,
    lognormal_std=1.2,
    dtype=None,
):
    """Draw ``n`` training times in ``[t_min, t_max]`` (default ``[schedule.t_end, t_start]``)
    from ``t_sampling`` (default ``schedule.default_t_sampling``: ``"cosine"``, or
    ``"lognormal"`` on the EDM schedule):

    * ``"uniform"``: ``t ~ U[t_min, t_max]`` (Ho et al. arXiv 2006.11239; Song et al. 2011.13456).
    * ``"log_snr"``: ``lambda ~ U[lambda(t_max), lambda(t_min)]``, ``t = t(lambda)`` (uniform in
      half log-SNR; Kingma et al. arXiv 2107.00630 / 2303.00848).
    * ``"lognormal"``: ``ln sigma_tilde ~ N(lognormal_mean, lognormal_std^2)`` with
      ``sigma_tilde = sigma / alpha`` (EDM, Karras et al. arXiv 2206.00364: ``P_mean = -1.2``,
      ``P_std = 1.2``), clipped to ``[sigma_tilde(t_min), sigma_tilde(t_max)]``.
    * ``"cosine"``: the noise levels of the cosine schedule whatever the schedule:
      ``lambda = -log tan(pi u / 2)`` with ``u`` uniform on the interval that maps to
      ``[lambda(t_max), lambda(t_min)]``, ``t = t(lambda)`` (density ``sech(lambda) / pi``; the
      cosine schedule's ``alpha^2 = cos^2(pi u / 2)``, Nichol & Dhariwal arXiv 2102.09672; the
      schedule as a distribution over ``lambda``: Kingma & Gao arXiv 2303.00848).

    Returns:
      times, shape ``(n,)``.
    """
    if t_sampling is None:
        t_sampling = schedule.default_t_sampling
    if t_sampling not in T_SAMPLINGS:
        fail("t_sampling", t_sampling, f"one of {T_SAMPLINGS}")
    lo, hi = _time_range(schedule, t_min, t_max)
    dtype = dtype or jnp.result_type(float)
    lo, hi = lo.astype(dtype), hi.astype(dtype)
    if t_sampling == "uniform":
        return jax.random.uniform(key, (n,), dtype, lo, hi)
    if t_sampling == "log_snr":
        lam_hi, lam_lo = schedule.lam(lo), schedule.lam(hi)
        lam = jax.random.uniform(key, (n,), dtype, lam_lo, lam_hi)
        t = schedule.t_from_lam(lam)
    elif t_sampling == "cosine":
        lam_hi, lam_lo = schedule.lam(lo), schedule.lam(hi)
        u_lo = (2.0 / jnp.pi) * jnp.arctan(jnp.exp(-lam_hi))
        u_hi = (2.0 / jnp.pi) * jnp.arctan(jnp.exp(-lam_lo))
        u = jax.random.uniform(key, (n,), dtype, u_lo, u_hi)
        t = schedule.t_from_lam(-jnp.log(jnp.tan(0.5 * jnp.pi * u)))
    else:
        log_st_lo, log_st_hi = -schedule.lam(lo), -schedule.lam(hi)
        log_st = lognormal_mean + lognormal_std * jax.random.normal(key, (n,), dtype)
        t = schedule.t_from_lam(-jnp.clip(log_st, log_st_lo, log_st_hi))
    return jnp.clip(t, lo, hi).astype(dtype)


def _sq_factor(schedule: Schedule, t, target: str):
    """``c(t)^2`` with ``||target error||^2 = c^2 ||x0 error||^2`` at fixed ``x_t``.

    At fixed ``x_t`` an x0 error ``d`` implies an eps error ``-(alpha/sigma) d``; mapping the pair
    ``(d, -(alpha/sigma) d)`` to the target space is linear (:func:`parametrize.from_x0_eps`).
    Gives ``1`` (x0), ``SNR`` (eps), ``(alpha^2 + sigma^2)^2 / sigma^2`` (v), ``alpha^2/sigma^4``
    (score), ``(alpha' - sigma' alpha/sigma)^2`` (velocity).
    """
    a, s = schedule.alpha_sigma(t)
    c = parametrize.from_x0_eps(jnp.ones_like(t), -a / s, target, jnp.zeros_like(t), t, schedule)
    return c**2


def loss_weight(
    t,
    schedule: Schedule,
    weighting: str = "none",
    target: str = "eps",
    *,
    min_snr_gamma=5.0,
    sigma_data=None,
):
    """Per-example weight ``w(t)`` multiplying ``||prediction - target||^2`` in ``target`` space.

    With ``SNR = alpha^2/sigma^2 = exp(2 lambda)`` and ``c^2`` the factor with
    ``||target error||^2 = c^2 ||x0 error||^2`` (1 for x0, SNR for eps, ``1/sigma^2 = SNR + 1``
    for v on VP schedules):

    * ``"none"``: ``1`` (in the target space: the "simple" loss of Ho et al. arXiv 2006.11239).
    * ``"snr"``: ``SNR`` (in the target space; for an x0 target this is the eps "simple" loss).
    * ``"min_snr"``: ``min(SNR, gamma) / c^2`` (Min-SNR-gamma, Hang et al. arXiv 2303.09556:
      ``min(SNR, gamma)/SNR`` for eps, ``min(SNR, gamma)`` for x0, ``min(SNR, gamma)/(SNR + 1)``
      for v).
    * ``"likelihood"``: ``g(t)^2 / sigma^2`` in eps space, i.e. ``g^2 SNR / (sigma^2 c^2)``
      (likelihood weighting ``lambda(t) = g(t)^2`` of the score loss, Song et al. arXiv 2101.09258).
    * ``"edm"``: ``(sigma_tilde^2 + sigma_data^2) / (sigma_tilde sigma_data)^2`` in x0 space,
      divided by ``c^2`` (Karras et al. arXiv 2206.00364, table 1), with
      ``sigma_tilde = sigma/alpha``; ``sigma_data`` defaults to ``schedule.sigma_data`` or 0.5.

    Args:
      t: times, shape ``(batch,)``.
    Returns:
      weights, shape ``(batch,)``.
    """
    if weighting not in WEIGHTINGS:
        fail("weighting", weighting, f"one of {WEIGHTINGS}")
    parametrize.check_parametrization(target, "target")
    t = as_float_array(t)
    if weighting == "none":
        return jnp.ones_like(t)
    snr = jnp.exp(schedule.log_snr(t))
    if weighting == "snr":
        return snr
    if weighting == "min_snr":
        w0 = jnp.minimum(snr, min_snr_gamma)
    elif weighting == "likelihood":
        w0 = schedule.diffusion_sq(t) * snr / schedule.sigma(t) ** 2
    else:  # edm
        if sigma_data is None:
            sigma_data = getattr(schedule, "sigma_data", 0.5)
        st2 = jnp.exp(-2.0 * schedule.lam(t))
        w0 = (st2 + sigma_data**2) / (st2 * sigma_data**2)
    return w0 / _sq_factor(schedule, t, target)


def drop_cond(key, cond, prob, null_cond=None):
    """Label dropout for classifier-free guidance (Ho & Salimans arXiv 2207.12598).

    Each example's condition is replaced by ``null_cond`` with probability ``prob``
    (independently per example).

    Args:
      key: PRNG key.
      cond: array or pytree of arrays with leading batch axis ``(batch, ...)``.
      prob: drop probability in ``[0, 1]`` (may be traced).
      null_cond: the null condition, broadcast to each leaf's per-example shape: the null label
        ``num_classes`` for integer labels; defaults to NaN for real-valued leaves
        (:class:`~jaxdiff.models.MLPScoreNet`'s null vector). Required for integer leaves.
    Returns:
      ``cond`` with the same structure and shapes.
    """
    leaves, treedef = jax.tree.flatten(cond)
    if not leaves:
        fail("cond", cond, "a condition (array with a batch axis) to drop")
    batch = jnp.shape(leaves[0])[0] if jnp.ndim(leaves[0]) else None
    if batch is None:
        fail("cond", cond, "arrays with a leading batch axis")
    drop = jax.random.uniform(key, (batch,)) < prob
    if null_cond is None:
        nulls = [None] * len(leaves)
    else:
        nulls = treedef.flatten_up_to(null_cond) if treedef.num_leaves > 1 else [null_cond]
    out = []
    for leaf, null in zip(leaves, nulls, strict=True):
        leaf = jnp.asarray(leaf)
        if null is None:
            if not jnp.issubdtype(leaf.dtype, jnp.inexact):
                fail(
                    "null_cond",
                    None,
                    "the null label for integer conditions (num_classes for MLPScoreNet)",
                )
            null = jnp.nan
        null = jnp.broadcast_to(jnp.asarray(null, leaf.dtype), leaf.shape[1:])
        mask = drop.reshape((batch,) + (1,) * (leaf.ndim - 1))
        out.append(jnp.where(mask, null, leaf))
    return treedef.unflatten(out)


def dsm_loss_per_example(
    params,
    key,
    model: Denoiser,
    schedule: Schedule,
    x0,
    cond=None,
    *,
    target: str | None = None,
    weighting: str | None = None,
    t_sampling: str | None = None,
    t_min=None,
    t_max=None,
    min_snr_gamma=5.0,
    cond_drop_prob=0.0,
    null_cond=None,
    sigma_data=None,
    reduce: str = "sum",
):
    """Per-example denoising score-matching loss ``w(t) ||F(x_t, t) - target||^2``.

    ``t`` is drawn per example by :func:`sample_times`, ``eps ~ N(0, I)``,
    ``x_t = alpha(t) x0 + sigma(t) eps``; ``F`` is ``model``'s prediction converted exactly
    (:func:`jaxdiff.parametrize.convert`) to ``target`` space, and ``target`` is the true
    eps / x0 / v / score / velocity given ``(x0, eps)``. The weight is :func:`loss_weight`.
    Sources: Vincent (2011); Ho et al. arXiv 2006.11239 (eq. 14); Song et al. arXiv 2011.13456
    (eq. 7); Salimans & Ho arXiv 2202.00512 (v); Karras et al. arXiv 2206.00364 (EDM).

    Args:
      params: the model's parameters.
      key: PRNG key (times, noise, label dropout).
      model: a :class:`~jaxdiff.denoiser.Denoiser`.
      schedule: the noise schedule.
      x0: clean data, shape ``(batch, *event_shape)``.
      cond: condition with leading axis ``batch`` (or None).
      target: loss space; defaults to ``model.parametrization``.
      weighting: one of :data:`WEIGHTINGS`; default ``model.default_weighting`` (``"none"``,
        or ``"edm"`` for a :class:`~jaxdiff.denoiser.Preconditioned` model: its network's
        regression target gets unit weight).
      t_sampling: one of :data:`T_SAMPLINGS`; default ``schedule.default_t_sampling``
        (``"cosine"``: the cosine schedule's noise levels on any schedule; EDM's
        ``"lognormal"`` on the EDM schedule, where ``t = sigma``).
      t_min, t_max: time range (default ``[schedule.t_end, schedule.t_start]``).
      min_snr_gamma: ``gamma`` of ``"min_snr"``.
      cond_drop_prob: label-dropout probability (:func:`drop_cond`).
      null_cond: the null condition for label dropout.
      sigma_data: data std for the ``"edm"`` weighting (default: the model's ``sigma_data``
        when it has one, else the schedule's, else 0.5).
      reduce: ``"sum"`` (squared norm over the event dims, the default) or ``"mean"``.
    Returns:
      losses, shape ``(batch,)``.
    """
    if not isinstance(model, Denoiser):
        fail("model", type(model).__name__, "a jaxdiff Denoiser (see jaxdiff.models.as_denoiser)")
    target = model.parametrization if target is None else target
    parametrize.check_parametrization(target, "target")
    weighting = model.default_weighting if weighting is None else weighting
    if sigma_data is None:
        sigma_data = getattr(model, "sigma_data", None)
    if weighting not in WEIGHTINGS:
        fail("weighting", weighting, f"one of {WEIGHTINGS}")
    if reduce not in ("sum", "mean"):
        fail("reduce", reduce, "'sum' or 'mean'")
    if is_concrete(cond_drop_prob) and not 0.0 <= float(cond_drop_prob) <= 1.0:
        fail("cond_drop_prob", cond_drop_prob, "a probability in [0, 1]")
    model.check_x(x0, "x0")
    x0 = as_float_array(x0)
    batch = x0.shape[0]

    k_t, k_eps, k_drop = jax.random.split(key, 3)
    if t_sampling is None:
        t_sampling = schedule.default_t_sampling
    t = sample_times(k_t, schedule, batch, t_sampling, t_min, t_max, dtype=x0.dtype)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    x_t = schedule.marginal(x0, eps, t)

    if not (is_concrete(cond_drop_prob) and float(cond_drop_prob) == 0.0):
        if cond is None:
            fail("cond", None, "a condition to drop when cond_drop_prob > 0")
        cond = drop_cond(k_drop, cond, cond_drop_prob, null_cond)

    pred = model(params, x_t, t, cond)
    pred = parametrize.convert(pred, model.parametrization, target, x_t, t, schedule)
    true = parametrize.from_x0_eps(x0, eps, target, x_t, t, schedule)
    sq = jnp.square(pred - true).reshape(batch, -1)
    err = jnp.sum(sq, axis=-1) if reduce == "sum" else jnp.mean(sq, axis=-1)
    w = loss_weight(
        t,
        schedule,
        weighting,
        target,
        min_snr_gamma=min_snr_gamma,
        sigma_data=sigma_data,
    )
    return w.astype(err.dtype) * err


def dsm_loss(
    params,
    key,
    model: Denoiser,
    schedule: Schedule,
    x0,
    cond=None,
    *,
    target: str | None = None,
    weighting: str | None = None,
    t_sampling: str | None = None,
    t_min=None,
    t_max=None,
    min_snr_gamma=5.0,
    cond_drop_prob=0.0,
    null_cond=None,
    sigma_data=None,
    reduce: str = "sum",
):
    """Batch mean of :func:`dsm_loss_per_example` (same arguments): a scalar.

    ``L = E_{t, eps}[ w(t) ||F(alpha x0 + sigma eps, t) - target(x0, eps)||^2 ]``, estimated with
    one ``(t, eps)`` per example (Ho et al. arXiv 2006.11239; Song et al. arXiv 2011.13456).
    """
    return jnp.mean(
        dsm_loss_per_example(
            params,
            key,
            model,
            schedule,
            x0,
            cond,
            target=target,
            weighting=weighting,
            t_sampling=t_sampling,
            t_min=t_min,
            t_max=t_max,
            min_snr_gamma=min_snr_gamma,
            cond_drop_prob=cond_drop_prob,
            null_cond=null_cond,
            sigma_data=sigma_data,
            reduce=reduce,
        )
    )
