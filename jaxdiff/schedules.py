"""Noise schedules: ``x_t = alpha(t) x_0 + sigma(t) eps`` and everything derived from it.

Every schedule is a small pytree (``flax.struct.PyTreeNode``) whose numbers are leaves, so
``jax.vmap`` over schedule parameters and ``jax.grad`` through them work. Notation follows
``shared/reference/samplers.md`` section 0: the half log-SNR is ``lambda = log(alpha / sigma)``
(so ``SNR = exp(2 lambda)``), ``sigma_tilde = sigma / alpha = exp(-lambda)`` is the EDM/Karras
noise level, and the forward SDE is ``dx = f(t) x dt + g(t) dW`` with ``f = d log alpha / dt`` and
``g^2 = d sigma^2 / dt - 2 f sigma^2`` (Song et al., arXiv 2011.13456; Kingma et al. VDM,
arXiv 2107.00630).

Factories: :func:`vp_linear`, :func:`vp_cosine`, :func:`vp_discrete` (alias :func:`ddpm`),
:func:`ve`, :func:`edm`, :func:`flow`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff._checks import as_float_array, check_in_range, fail, is_concrete

__all__ = [
    "Schedule",
    "VPLinear",
    "VPCosine",
    "VPDiscrete",
    "VE",
    "EDM",
    "Flow",
    "vp_linear",
    "vp_cosine",
    "vp_discrete",
    "ddpm",
    "ve",
    "edm",
    "flow",
    "ddpm_betas",
]


def _softplus(x):
    return jnp.logaddexp(x, 0.0)


def _vp_log_sigma(log_alpha):
    # sigma = sqrt(1 - alpha^2), computed without cancellation when alpha -> 1.
    return 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


def _vp_log_alpha_from_lam(lam):
    # alpha^2 = sigmoid(2 lambda)  =>  log alpha = -softplus(-2 lambda) / 2.
    return -0.5 * _softplus(-2.0 * lam)


class Schedule(struct.PyTreeNode):
    """Base class. Subclasses define :meth:`log_alpha`, :meth:`log_sigma` and :meth:`t_from_lam`.

    Fields shared by all schedules (pytree leaves):

    * ``t_start``: default sampling start time (the noisiest time a sampler starts from).
    * ``t_end``: default sampling end time (> ``t_min`` where ``sigma(t_min) = 0``).

    ``t_min`` / ``t_max`` (the schedule's domain) are properties; times outside raise at the
    boundary of :func:`jaxdiff.sample` and of :meth:`check_t`.
    All methods take ``t`` of any shape and act elementwise.
    """

    is_vp: ClassVar[bool] = False
    #: alpha(t) == 1 for all t (VE, EDM): the prior is N(0, sigma(t_start)^2 I).
    is_ve: ClassVar[bool] = False
    #: the sampling grid a sampler whose default is ``"uniform"`` uses on this schedule
    #: (:func:`jaxdiff.samplers.grids.resolve_grid`): uniform in ``t`` unless ``t`` is a poor
    #: time variable for it (EDM's ``t = sigma``: ``"karras"``).
    default_grid: ClassVar[str] = "uniform"
    #: the training-time distribution :func:`jaxdiff.losses.dsm_loss` draws by default: the
    #: cosine schedule's noise levels (``"cosine"``: the same distribution of log-SNR whatever
    #: the time variable); EDM's lognormal on the EDM schedule. Measured in docs/defaults.md.
    default_t_sampling: ClassVar[str] = "cosine"
    #: ``sigma(t_min) = 0`` (False for VE, whose noise never falls below ``sigma_min``): where
    #: :func:`jaxdiff.sample`'s ``endpoint="zero"`` can step onto ``t_min``
    reaches_zero_noise: ClassVar[bool] = True

    # ---- to override -------------------------------------------------------------------
    def log_alpha(self, t):
        raise NotImplementedError

    def log_sigma(self, t):
        raise NotImplementedError

    def t_from_lam(self, lam):
        """Inverse of :meth:`lam`: the time whose half log-SNR is ``lam`` (exact)."""
        raise NotImplementedError

    def kinks(self):
        """Times where ``alpha``/``sigma`` are not smooth (adaptive ODE solvers step onto them),
        or ``None``."""
        return None

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return 1.0

    # ---- derived -----------------------------------------------------------------------
    def alpha(self, t):
        """Signal scale ``alpha(t)``."""
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t):
        """Noise scale ``sigma(t)``."""
        return jnp.exp(self.log_sigma(t))

    def alpha_sigma(self, t):
        """``(alpha(t), sigma(t))``, the pair every sampler needs."""
        return self.alpha(t), self.sigma(t)

    def lam(self, t):
        """Half log-SNR ``lambda(t) = log alpha(t) - log sigma(t)`` (DPM-Solver's lambda)."""
        return self.log_alpha(t) - self.log_sigma(t)

    def log_snr(self, t):
        """Log signal-to-noise ratio ``log(alpha^2 / sigma^2) = 2 lambda(t)`` (VDM's -gamma)."""
        return 2.0 * self.lam(t)

    def t_from_log_snr(self, log_snr):
        """Inverse of :meth:`log_snr`."""
        return self.t_from_lam(0.5 * log_snr)

    def sigma_tilde(self, t):
        """EDM / Karras noise level ``sigma / alpha = exp(-lambda)`` (diffusers' "sigmas")."""
        return jnp.exp(-self.lam(t))

    def t_from_sigma_tilde(self, sigma_tilde):
        """Inverse of :meth:`sigma_tilde`."""
        return self.t_from_lam(-jnp.log(sigma_tilde))

    def drift_coef(self, t):
        """``f(t) = d log alpha / dt``: the forward SDE drift is ``f(t) x``."""
        t = as_float_array(t)
        return jax.jvp(self.log_alpha, (t,), (jnp.ones_like(t),))[1]

    def diffusion_sq(self, t):
        """``g(t)^2 = d sigma^2/dt - 2 f(t) sigma(t)^2``: the forward SDE's squared diffusion."""
        t = as_float_array(t)
        one = jnp.ones_like(t)
        # d sigma^2/dt - 2 f sigma^2 = sigma^2 (d log sigma^2/dt - 2 d log alpha/dt)
        #                            = 2 sigma^2 d(log sigma - log alpha)/dt = -2 sigma^2 dlam/dt
        dlam = jax.jvp(self.lam, (t,), (one,))[1]
        return -2.0 * jnp.exp(2.0 * self.log_sigma(t)) * dlam

    def diffusion(self, t):
        """``g(t)``, the forward SDE diffusion coefficient."""
        return jnp.sqrt(self.diffusion_sq(t))

    def sde(self, x, t):
        """Forward SDE coefficients ``(f(t) x, g(t))`` for ``x`` of shape ``(batch, ...)``."""
        f = self.drift_coef(t)
        g = self.diffusion(t)
        return _bcast(f, x) * x, g

    def prior_std(self):
        """Std of the sampling prior ``N(0, prior_std^2 I)`` at ``t_start``.

        ``sqrt(alpha^2 + sigma^2)`` at ``t_start`` (the marginal std for unit-variance data;
        exactly 1 for VP); VE/EDM use ``sigma(t_start)`` as in score_sde and EDM.
        """
        a, s = self.alpha_sigma(as_float_array(self.t_start))
        return jnp.sqrt(a**2 + s**2)

    def prior_sample(self, key, shape, dtype=None):
        """Draw ``x_T ~ N(0, prior_std^2 I)`` of the given shape."""
        dtype = dtype or jnp.result_type(float)
        return self.prior_std().astype(dtype) * jax.random.normal(key, shape, dtype)

    def marginal(self, x0, eps, t):
        """``x_t = alpha(t) x0 + sigma(t) eps`` with ``t`` of shape ``()`` or ``(batch,)``."""
        a, s = self.alpha_sigma(t)
        return _bcast(a, x0) * x0 + _bcast(s, eps) * eps

    def check_t(self, t, arg: str = "t") -> None:
        """Raise :class:`jaxdiff.JaxdiffError` if concrete ``t`` leaves ``[t_min, t_max]``."""
        check_in_range(arg, t, self.t_min, self.t_max, f"{type(self).__name__}'s range")


def _bcast(a, x):
    """Reshape per-example coefficients ``a`` (shape ``()`` or ``(batch,)``) to broadcast to x."""
    a = jnp.asarray(a)
    return a.reshape(a.shape + (1,) * (jnp.ndim(x) - a.ndim))


# ------------------------------------------------------------------------------------------
# VP schedules
# ------------------------------------------------------------------------------------------
class VPLinear(Schedule):
    """Continuous VP with linear ``beta(t) = beta_min + t (beta_max - beta_min)`` on ``[0, 1]``.

    ``log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2``; ``sigma^2 = 1 - alpha^2``
    (score_sde VP-SDE, Song et al. arXiv 2011.13456; DPM-Solver's ``NoiseScheduleVP('linear')``).
    Inverse: ``t(lambda) = 2L / (sqrt(beta_min^2 + 2 (beta_max - beta_min) L) + beta_min)`` with
    ``L = log(1 + exp(-2 lambda))``.
    """

    beta_min: Any = 0.1
    beta_max: Any = 20.0
    t_start: Any = 1.0
    t_end: Any = 1e-3
    is_vp: ClassVar[bool] = True

    def log_alpha(self, t):
        t = as_float_array(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def log_sigma(self, t):
        return _vp_log_sigma(self.log_alpha(t))

    def beta(self, t):
        """``beta(t) = g(t)^2`` in closed form."""
        return self.beta_min + as_float_array(t) * (self.beta_max - self.beta_min)

    def t_from_lam(self, lam):
        lam = as_float_array(lam)
        big_l = _softplus(-2.0 * lam)
        d = self.beta_max - self.beta_min
        return 2.0 * big_l / (jnp.sqrt(self.beta_min**2 + 2.0 * d * big_l) + self.beta_min)


class VPCosine(Schedule):
    """Cosine VP schedule (Nichol & Dhariwal, arXiv 2102.09672), continuous time on ``[0, 1]``.

    ``log alpha(t) = log cos(((t + s)/(1 + s)) pi/2) - log cos((s/(1 + s)) pi/2)``, ``s = 0.008``.
    ``lambda -> -inf`` as ``t -> 1``, so sampling starts at ``t_start = 0.9946`` as in the
    DPM-Solver and UniPC code.
    """

    s: Any = 0.008
    t_start: Any = 0.9946
    t_end: Any = 1e-3
    is_vp: ClassVar[bool] = True

    @property
    def t_max(self) -> float:
        # lambda -> -inf and cos(.) rounds below 0 in float32 at t = 1
        return 0.9999

    def _c0(self):
        return jnp.log(jnp.cos(self.s / (1.0 + self.s) * (math.pi / 2)))

    def log_alpha(self, t):
        t = as_float_array(t)
        return jnp.log(jnp.cos((t + self.s) / (1.0 + self.s) * (math.pi / 2))) - self._c0()

    def log_sigma(self, t):
        return _vp_log_sigma(self.log_alpha(t))

    def t_from_lam(self, lam):
        log_a = _vp_log_alpha_from_lam(as_float_array(lam))
        return 2.0 * (1.0 + self.s) / math.pi * jnp.arccos(jnp.exp(log_a + self._c0())) - self.s


def ddpm_betas(
    num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, kind="linear"
):
    """DDPM betas: ``linear`` = ``linspace(beta_start, beta_end, N)`` (Ho et al. 2006.11239),
    ``scaled_linear`` = ``linspace(sqrt(beta_start), sqrt(beta_end), N)^2`` (Stable Diffusion)."""
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2
    fail("kind", kind, "'linear' or 'scaled_linear'")


class VPDiscrete(Schedule):
    """Discrete-time VP schedule (DDPM) made continuous as in DPM-Solver's wrapper.

    Index ``n`` (``alpha_bar_n = prod_{i<=n}(1 - beta_i)``) sits at ``t_n = (n + 1)/N``; ``log alpha``
    is interpolated piecewise-linearly in ``t`` through ``(t_n, log(alpha_bar_n)/2)`` and through
    ``(0, 0)``. The inverse of lambda is exact (piecewise-linear inverse of ``log alpha``).
    A network trained on integer timesteps ``n`` is fed ``N t - 1`` (see :meth:`timestep`).
    """

    log_alpha_knots: Any = None  # shape (N + 1,), log alpha at t = 0, 1/N, ..., 1
    t_start: Any = 1.0
    t_end: Any = 1e-3
    is_vp: ClassVar[bool] = True

    @property
    def num_steps(self) -> int:
        return int(np.shape(self.log_alpha_knots)[-1]) - 1

    def _knots(self):
        n = self.num_steps
        return jnp.linspace(0.0, 1.0, n + 1, dtype=jnp.asarray(self.log_alpha_knots).dtype)

    def log_alpha(self, t):
        t = as_float_array(t)
        return jnp.interp(t, self._knots(), jnp.asarray(self.log_alpha_knots, t.dtype))

    def log_sigma(self, t):
        return _vp_log_sigma(self.log_alpha(t))

    def t_from_lam(self, lam):
        log_a = _vp_log_alpha_from_lam(as_float_array(lam))
        knots = self._knots().astype(log_a.dtype)
        vals = jnp.asarray(self.log_alpha_knots, log_a.dtype)
        # log alpha is decreasing in t: interpolate on the reversed (increasing) table.
        return jnp.interp(log_a, vals[::-1], knots[::-1])

    def kinks(self):
        """The knots ``t = n/N`` of the piecewise-linear ``log alpha``."""
        return self._knots()

    def alphas_cumprod(self):
        """``alpha_bar_n`` for ``n = 0..N-1`` (diffusers' ``alphas_cumprod``)."""
        return jnp.exp(2.0 * jnp.asarray(self.log_alpha_knots)[1:])

    def timestep(self, t):
        """The (fractional) DDPM index ``n = N t - 1`` of continuous time ``t``."""
        return self.num_steps * as_float_array(t) - 1.0


# ------------------------------------------------------------------------------------------
# VE / EDM / flow
# ------------------------------------------------------------------------------------------
class VE(Schedule):
    """Variance-exploding schedule (SMLD / score_sde): ``alpha = 1``,
    ``sigma(t) = sigma_min (sigma_max / sigma_min)^t`` on ``[0, 1]`` (arXiv 2011.13456)."""

    sigma_min: Any = 0.01
    sigma_max: Any = 50.0
    t_start: Any = 1.0
    t_end: Any = 1e-5
    is_ve: ClassVar[bool] = True
    reaches_zero_noise: ClassVar[bool] = False

    def log_alpha(self, t):
        return jnp.zeros_like(as_float_array(t))

    def log_sigma(self, t):
        t = as_float_array(t)
        return jnp.log(self.sigma_min) + t * jnp.log(self.sigma_max / self.sigma_min)

    def t_from_lam(self, lam):
        lam = as_float_array(lam)
        return (-lam - jnp.log(self.sigma_min)) / jnp.log(self.sigma_max / self.sigma_min)

    def prior_std(self):
        return self.sigma(as_float_array(self.t_start))


class EDM(Schedule):
    """EDM / Karras schedule (arXiv 2206.00364): ``alpha = 1``, ``sigma(t) = t`` for
    ``t in [0, sigma_max]``; sampling runs from ``sigma_max = 80`` to ``sigma_min = 0.002``.

    Because ``t`` is ``sigma`` itself, "uniform in t" is a poor spacing both for sampling (almost
    every step lands at large sigma: DDIM-20 with the exact denoiser of the README's ring
    mixture is 14x the data floor) and for training (uniform t puts 99% of the examples above
    sigma = 1). So this schedule's defaults are the Karras grid for samplers whose default is
    ``"uniform"`` (``rho`` is its exponent) and EDM's lognormal training times
    (``ln sigma ~ N(-1.2, 1.2^2)``); see docs/defaults.md."""

    sigma_min: Any = 0.002
    sigma_max: Any = 80.0
    rho: Any = 7.0
    sigma_data: Any = 0.5
    is_ve: ClassVar[bool] = True
    default_grid: ClassVar[str] = "karras"
    default_t_sampling: ClassVar[str] = "lognormal"

    @property
    def t_start(self):
        return self.sigma_max

    @property
    def t_end(self):
        return self.sigma_min

    @property
    def t_max(self):
        return self.sigma_max

    def log_alpha(self, t):
        return jnp.zeros_like(as_float_array(t))

    def log_sigma(self, t):
        return jnp.log(as_float_array(t))

    def t_from_lam(self, lam):
        return jnp.exp(-as_float_array(lam))

    def prior_std(self):
        return as_float_array(self.sigma_max)


class Flow(Schedule):
    """Linear interpolant / rectified flow (arXiv 2209.03003, 2210.02747): ``alpha = 1 - t``,
    ``sigma = t`` on ``[0, 1]``. ``lambda = log((1 - t)/t)`` and ``t(lambda) = sigmoid(-lambda)``.
    Sampling defaults to ``[1e-3, 1 - 1e-3]`` so that eps- and x0-parametrized models stay finite;
    a velocity model may start at ``t = 1``."""

    t_start: Any = 0.999
    t_end: Any = 1e-3

    def log_alpha(self, t):
        return jnp.log1p(-as_float_array(t))

    def log_sigma(self, t):
        return jnp.log(as_float_array(t))

    def t_from_lam(self, lam):
        return jax.nn.sigmoid(-as_float_array(lam))


# ------------------------------------------------------------------------------------------
# factories
# ------------------------------------------------------------------------------------------
def _check_pos(name, v):
    if np.ndim(v) == 0 and is_concrete(v) and not float(v) > 0:
        fail(name, v, "a positive number")


def _check_order(lo_name, lo, hi_name, hi):
    if np.ndim(lo) == 0 and np.ndim(hi) == 0 and is_concrete(lo, hi) and not float(hi) > float(lo):
        fail(hi_name, hi, f"a value greater than {lo_name}={float(lo):g}")


def vp_linear(beta_min=0.1, beta_max=20.0, t_start=1.0, t_end=1e-3) -> VPLinear:
    """Continuous VP-linear schedule (score_sde defaults ``beta_min=0.1``, ``beta_max=20``)."""
    _check_pos("beta_min", beta_min)
    _check_pos("beta_max", beta_max)
    return VPLinear(beta_min=beta_min, beta_max=beta_max, t_start=t_start, t_end=t_end)


def vp_cosine(s=0.008, t_start=0.9946, t_end=1e-3) -> VPCosine:
    """Cosine VP schedule, started at ``t = 0.9946`` (lambda ~ -5.1) as in DPM-Solver/UniPC."""
    _check_pos("s", s)
    return VPCosine(s=s, t_start=t_start, t_end=t_end)


def vp_discrete(betas=None, t_start=1.0, t_end=None) -> VPDiscrete:
    """DDPM discrete schedule (default 1000 linear betas 1e-4..0.02), made continuous.

    ``t_end`` defaults to ``1/N`` (index 0), DPM-Solver's default interval ``[1/N, 1]``.
    """
    betas = ddpm_betas() if betas is None else np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2 or np.any(betas <= 0) or np.any(betas >= 1):
        fail("betas", betas, "a 1-D array of at least 2 values in (0, 1)")
    knots = np.concatenate([[0.0], 0.5 * np.cumsum(np.log1p(-betas))])
    t_end = 1.0 / betas.size if t_end is None else t_end
    return VPDiscrete(log_alpha_knots=knots, t_start=t_start, t_end=t_end)


ddpm = vp_discrete


def ve(sigma_min=0.01, sigma_max=50.0, t_start=1.0, t_end=1e-5) -> VE:
    """VE schedule (score_sde defaults ``sigma_min=0.01``, ``sigma_max=50`` for CIFAR-10)."""
    _check_pos("sigma_min", sigma_min)
    _check_pos("sigma_max", sigma_max)
    _check_order("sigma_min", sigma_min, "sigma_max", sigma_max)
    return VE(sigma_min=sigma_min, sigma_max=sigma_max, t_start=t_start, t_end=t_end)


def edm(sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_data=0.5) -> EDM:
    """EDM schedule: ``t = sigma``; defaults from Karras et al. (arXiv 2206.00364)."""
    _check_pos("sigma_min", sigma_min)
    _check_pos("sigma_max", sigma_max)
    _check_order("sigma_min", sigma_min, "sigma_max", sigma_max)
    return EDM(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, sigma_data=sigma_data)


def flow(t_start=0.999, t_end=1e-3) -> Flow:
    """Linear-interpolant / rectified-flow schedule ``alpha = 1 - t``, ``sigma = t``."""
    return Flow(t_start=t_start, t_end=t_end)
