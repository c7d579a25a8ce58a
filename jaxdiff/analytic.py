"""Exact scores and denoisers of Gaussian, Gaussian-mixture and linear-subspace data.

For data ``p_0 = sum_k pi_k N(mu_k, Sigma_k)`` and a schedule ``x_t = alpha(t) x_0 + sigma(t) eps``
(any :class:`~jaxdiff.schedules.Schedule`: VP, VE with ``alpha = 1``, flow with ``alpha = 1 - t``),
the marginal is again a mixture (samplers.md 7.1; guidance.md 0.2):

* ``p_t = sum_k pi_k N(alpha mu_k, C_k)`` with ``C_k = alpha^2 Sigma_k + sigma^2 I``;
* responsibilities ``w_k(x) = softmax_k[log pi_k + log N(x; alpha mu_k, C_k)]`` (log-sum-exp);
* score ``grad log p_t(x) = -sum_k w_k C_k^{-1} (x - alpha mu_k)`` (Song et al., arXiv 2011.13456);
* noise prediction ``eps*(x) = -sigma grad log p_t(x)``;
* Tweedie's posterior mean (Efron 2011, "Tweedie's formula and selection bias", JASA;
  ``x0* = (x + sigma^2 grad log p_t(x)) / alpha``), in closed form
  ``x0*(x) = sum_k w_k [mu_k + alpha Sigma_k C_k^{-1} (x - alpha mu_k)]``.

Every covariance is stored once in eigen form ``Sigma_k = U_k diag(lambda_k) U_k^T`` so that
``C_k^{-1} = U_k diag(1 / (alpha^2 lambda_k + sigma^2)) U_k^T`` costs one rotation for any
per-example ``t``. Singular covariances (point masses, subspaces) are fine whenever ``sigma > 0``.

Distributions are pytrees (``flax.struct.PyTreeNode``): they can be passed through ``jit``,
``vmap`` (a batch of distributions) and ``grad`` (derivatives w.r.t. means, weights, ...), and
they are the ``params`` of the analytic denoiser returned by :func:`as_denoiser`.

Shapes: ``x`` is ``(batch, D)``; ``t`` is ``()`` or ``(batch,)``; outputs are ``(batch, D)`` or
``(batch,)``. Computations run in the promoted dtype of ``x`` and the distribution (float32 by
default, float64 under ``jax.enable_x64``).

Factories: :func:`gaussian`, :func:`gaussian_mixture`, :func:`point_mass`, :func:`linear_subspace`,
:func:`random_subspace`, :func:`ring_mixture`; denoiser: :func:`as_denoiser`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff import parametrize
from jaxdiff._checks import as_float_array, check_positive_int, fail, is_concrete
from jaxdiff.denoiser import Denoiser
from jaxdiff.schedules import Schedule

__all__ = [
    "NULL_CLASS",
    "AnalyticDistribution",
    "GaussianMixture",
    "Gaussian",
    "LinearSubspace",
    "AnalyticDenoiser",
    "gaussian",
    "gaussian_mixture",
    "point_mass",
    "linear_subspace",
    "random_subspace",
    "ring_mixture",
    "as_denoiser",
    "analytic_apply",
]

#: Component / class id meaning "no class": the unconditional (mixture) prediction for that example.
NULL_CLASS = -1

_LOG_2PI = math.log(2.0 * math.pi)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _float_dtype(*xs):
    dt = jnp.result_type(*xs)
    if not jnp.issubdtype(dt, jnp.inexact):
        dt = jnp.result_type(float)
    return dt


def _tol(dtype) -> float:
    return float(np.sqrt(np.finfo(np.dtype(dtype)).eps))


def _check_covs_psd(arg: str, covs) -> None:
    """Concrete ``covs`` of shape ``(K, D, D)``: finite, symmetric and PSD (else raise)."""
    c = np.asarray(covs, dtype=np.float64)
    if not np.all(np.isfinite(c)):
        fail(arg, covs, "finite covariance matrices")
    tol = _tol(jnp.asarray(covs).dtype) * max(1.0, float(np.max(np.abs(c), initial=0.0)))
    if np.max(np.abs(c - np.swapaxes(c, -1, -2)), initial=0.0) > tol:
        fail(arg, covs, "symmetric covariance matrices")
    lo = float(np.min(np.linalg.eigvalsh(0.5 * (c + np.swapaxes(c, -1, -2)))))
    if lo < -tol:
        fail(arg, covs, f"positive semi-definite covariance matrices (smallest eigenvalue {lo:g})")


def _eigen_covs(arg: str, covs, num: int, dim: int, dtype):
    """Eigen form ``(evals (num, dim), evecs (num, dim, dim))`` of ``num`` covariances given as
    ``()`` (one shared variance), ``(num,)`` (isotropic), ``(num, dim)`` (diagonal) or
    ``(num, dim, dim)`` (full, symmetric PSD; ``jnp.linalg.eigh`` once)."""
    covs = jnp.asarray(covs)
    if not jnp.issubdtype(covs.dtype, jnp.number) or jnp.issubdtype(
        covs.dtype, jnp.complexfloating
    ):
        fail(arg, covs, "a real array")
    covs = covs.astype(dtype)
    eye = jnp.broadcast_to(jnp.eye(dim, dtype=dtype), (num, dim, dim))
    if covs.ndim == 3:
        if covs.shape != (num, dim, dim):
            fail(
                arg,
                f"shape {covs.shape}",
                f"shape ({num}, {dim}, {dim}), ({num}, {dim}) or ({num},)",
            )
        if is_concrete(covs):
            _check_covs_psd(arg, covs)
        evals, evecs = jnp.linalg.eigh(0.5 * (covs + jnp.swapaxes(covs, -1, -2)))
        return jnp.maximum(evals, 0.0), evecs
    if covs.ndim == 0:
        evals = jnp.full((num, dim), covs, dtype)
    elif covs.ndim == 1 and covs.shape == (num,):
        evals = jnp.broadcast_to(covs[:, None], (num, dim))
    elif covs.ndim == 2 and covs.shape == (num, dim):
        evals = covs
    else:
        fail(arg, f"shape {covs.shape}", f"shape ({num}, {dim}, {dim}), ({num}, {dim}) or ({num},)")
    if is_concrete(evals):
        ev = np.asarray(evals)
        if not np.all(np.isfinite(ev)) or np.any(ev < 0):
            fail(arg, covs, "nonnegative (finite) variances")
    return evals, eye


def _eigen_cov_single(arg: str, cov, dim: int, dtype):
    """Eigen form of one covariance given as ``()``, ``(D,)`` or ``(D, D)``; leading axis 1."""
    cov = jnp.asarray(cov)
    if cov.ndim == 0:
        return _eigen_covs(arg, cov, 1, dim, dtype)
    if cov.ndim == 1 and cov.shape == (dim,):
        return _eigen_covs(arg, cov[None], 1, dim, dtype)
    if cov.ndim == 2 and cov.shape == (dim, dim):
        return _eigen_covs(arg, cov[None], 1, dim, dtype)
    fail(arg, f"shape {cov.shape}", f"a scalar, shape ({dim},) or shape ({dim}, {dim})")


def _as_time(t, batch: int, schedule: Schedule, arg: str = "t"):
    t = as_float_array(t)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        fail(arg, f"shape {t.shape}", f"shape () or ({batch},)")
    schedule.check_t(t, arg)
    return t


def _rotate_back(v, evecs):
    """``sum_k U_k v_k`` for ``v`` (B, K, D) and ``evecs`` (K, D, D) -> (B, D)."""
    return jnp.einsum("bke,kde->bd", v, evecs)


@functools.partial(jax.jit, static_argnames=("method", "static"))
def _jitted(obj, method: str, args, static=()):
    """``getattr(obj, method)(*args, *static)`` compiled once per shapes/static arguments.

    Public methods validate concrete arguments on the host, then evaluate through here, so that
    eager calls dispatch one compiled program (inside a user's ``jit`` this simply inlines).
    """
    return getattr(obj, method)(*args, *static)


# ------------------------------------------------------------------------------------------
# base class
# ------------------------------------------------------------------------------------------
class AnalyticDistribution(struct.PyTreeNode):
    """Base of the analytic data distributions (no fields of its own).

    Subclasses implement ``_x0_eps_log(x, a, s, component, need_x0, need_eps)`` returning
    ``(log p_t(x) (batch,), x0 (batch, D) | None, eps (batch, D) | None)`` for per-example
    ``a = alpha``, ``s = sigma`` of shape ``(batch,)``; every prediction below derives from it.
    """

    # ---- to override --------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Data dimension ``D``."""
        raise NotImplementedError

    @property
    def dtype(self):
        """Floating dtype of the parameters (computations promote it with the dtype of ``x``)."""
        raise NotImplementedError

    def _x0_eps_log(self, x, a, s, component, need_x0, need_eps):
        raise NotImplementedError

    def _sample_impl(self, key, n: int):
        raise NotImplementedError

    def _check_component(self, component, batch: int, arg: str = "component"):
        if component is not None:
            fail(arg, component, f"None ({type(self).__name__} has no classes)")
        return None

    # ---- shared ---------------------------------------------------------------------------
    def _check_x(self, x, arg: str = "x"):
        """``x`` as a (batch, D) array in the working dtype (promotion of x and the params)."""
        x = jnp.asarray(x)
        d = self.dim
        if x.ndim != 2 or x.shape[-1] != d:
            fail(arg, f"shape {tuple(x.shape)}", f"shape (batch, {d})")
        return x.astype(_float_dtype(x.dtype, self.dtype))

    def _validate(self, x, t, schedule: Schedule, component):
        if not isinstance(schedule, Schedule):
            fail("schedule", type(schedule).__name__, "a jaxdiff Schedule")
        x = self._check_x(x)
        t = _as_time(t, x.shape[0], schedule)
        return x, t, self._check_component(component, x.shape[0])

    @staticmethod
    def _alpha_sigma(t, schedule: Schedule, batch: int, dtype):
        a, s = schedule.alpha_sigma(t)
        a = jnp.broadcast_to(jnp.asarray(a, dtype), (batch,))
        s = jnp.broadcast_to(jnp.asarray(s, dtype), (batch,))
        return a, s

    def _core(self, x, a, s, component):
        """Traced core of the public per-time methods: ``(log p_t, x0*, eps*)``.

        Takes per-example ``alpha, sigma`` (computed outside), so one compiled program serves
        every schedule and every output; inside a caller's ``jit`` unused outputs are removed
        as dead code.
        """
        return self._x0_eps_log(x, a, s, component, True, True)

    def _run(self, x, t, schedule, component):
        x, t, comp = self._validate(x, t, schedule, component)
        a, s = self._alpha_sigma(t, schedule, x.shape[0], x.dtype)
        return (x, t, *_jitted(self, "_core", (x, a, s, comp)), a, s)

    def x0(self, x, t, schedule: Schedule, component=None):
        """Exact posterior mean ``E[x_0 | x_t = x]`` (Tweedie; Efron 2011), shape (batch, D).

        ``x0*(x) = sum_k w_k [mu_k + alpha Sigma_k C_k^{-1} (x - alpha mu_k)]`` (samplers.md 7.1).
        ``component``: ``None`` (the mixture), an int or an int array (batch,) of component ids
        (class-conditional prediction of that component; ``NULL_CLASS = -1`` = unconditional).
        """
        return self._run(x, t, schedule, component)[3]

    def eps(self, x, t, schedule: Schedule, component=None):
        """Exact noise prediction ``eps*(x) = -sigma grad log p_t(x)``, shape (batch, D).

        ``= sigma sum_k w_k C_k^{-1} (x - alpha mu_k)`` (samplers.md 7.1; arXiv 2011.13456).
        """
        return self._run(x, t, schedule, component)[4]

    def score(self, x, t, schedule: Schedule, component=None):
        """Exact score ``grad_x log p_t(x) = -sum_k w_k C_k^{-1}(x - alpha mu_k)``, (batch, D).

        Song et al., arXiv 2011.13456; with ``component`` the class-conditional score
        ``grad log p_t(x | y = k)`` (guidance.md 0.2(b)).
        """
        *_, eps, _, s = self._run(x, t, schedule, component)
        return -eps / s[:, None]

    def x0_eps(self, x, t, schedule: Schedule, component=None):
        """Both ``(x0*, eps*)`` from one evaluation, each (batch, D)."""
        return tuple(self._run(x, t, schedule, component)[3:5])

    def predict(self, x, t, schedule: Schedule, parametrization: str = "eps", component=None):
        """The exact prediction in ``parametrization`` (one of
        :data:`jaxdiff.parametrize.PARAMETRIZATIONS`), via
        :func:`jaxdiff.parametrize.from_x0_eps` from the directly computed ``(x0*, eps*)``
        (both in closed form, so no ``1/alpha`` or ``1/sigma`` amplification), (batch, D)."""
        parametrize.check_parametrization(parametrization)
        x, t, _, x0, eps, _, s = self._run(x, t, schedule, component)
        if parametrization == "score":
            return -eps / s[:, None]
        return parametrize.from_x0_eps(x0, eps, parametrization, x, t, schedule).astype(x.dtype)

    def log_prob_t(self, x, t, schedule: Schedule, component=None):
        """Log marginal density ``log p_t(x)`` (w.r.t. Lebesgue measure on R^D), shape (batch,).

        ``log sum_k pi_k N(x; alpha mu_k, C_k)`` by log-sum-exp. With ``component=k``: the
        class-conditional ``log p_t(x | y = k)``. Needs ``sigma > 0`` for singular covariances.
        """
        return self._run(x, t, schedule, component)[2]

    def sample(self, key, n: int):
        """Exact samples of the data distribution ``p_0``, shape (n, D)."""
        n = check_positive_int("n", n)
        return _jitted(self, "_sample_impl", (key,), (n,))

    def _noise_impl(self, x0, key, a, s):
        return a[:, None] * x0 + s[:, None] * jax.random.normal(key, x0.shape, x0.dtype)

    def sample_t(self, key, n: int, t, schedule: Schedule):
        """Exact samples of ``p_t``: ``alpha x_0 + sigma eps`` with ``x_0 ~ p_0``, ``eps ~ N(0, I)``;
        ``t`` of shape ``()`` or ``(n,)``; returns (n, D)."""
        n = check_positive_int("n", n)
        t = _as_time(t, n, schedule)
        k0, k1 = jax.random.split(key)
        x0 = self.sample(k0, n)
        a, s = self._alpha_sigma(t, schedule, n, x0.dtype)
        return _jitted(self, "_noise_impl", (x0, k1, a, s))


# ------------------------------------------------------------------------------------------
# Gaussian mixture
# ------------------------------------------------------------------------------------------
class GaussianMixture(AnalyticDistribution):
    """``p_0 = sum_k pi_k N(mu_k, Sigma_k)`` with full covariances in eigen form.

    Fields (pytree leaves; build with :func:`gaussian_mixture`, which validates and runs the
    eigendecomposition once):

    * ``log_weights``: (K,) ``log pi_k`` (``-inf`` for a zero weight).
    * ``means``: (K, D) ``mu_k``.
    * ``evals``: (K, D) eigenvalues ``lambda_k >= 0`` of ``Sigma_k`` (zeros: point mass).
    * ``evecs``: (K, D, D) orthonormal eigenvectors ``U_k`` (columns), ``Sigma_k = U_k diag(lambda_k) U_k^T``.

    Marginal ``p_t = sum_k pi_k N(alpha mu_k, C_k)``, ``C_k = alpha^2 Sigma_k + sigma^2 I``
    (samplers.md 7.1; guidance.md 0.2(b)). Cost per call: two ``(B, K, D) x (K, D, D)``
    contractions (memory ``O(B K D)``); :meth:`sample` uses ``O(n K D)`` memory.
    """

    log_weights: Any
    means: Any
    evals: Any
    evecs: Any

    # ---- basic properties -----------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Data dimension ``D``."""
        return int(jnp.shape(self.means)[-1])

    @property
    def num_components(self) -> int:
        """Number of components ``K``."""
        return int(jnp.shape(self.means)[-2])

    @property
    def dtype(self):
        """Floating dtype of the parameters."""
        return _float_dtype(self.means, self.evals, self.evecs)

    @property
    def weights(self):
        """Mixture weights ``pi_k``, (K,)."""
        return jnp.exp(self.log_weights)

    @property
    def covs(self):
        """Component covariances ``Sigma_k = U_k diag(lambda_k) U_k^T``, (K, D, D)."""
        return jnp.einsum("kde,ke,kfe->kdf", self.evecs, self.evals, self.evecs)

    # ---- components -----------------------------------------------------------------------
    def _check_component(self, component, batch: int, arg: str = "component"):
        """``None`` or an int array broadcast to (batch,); concrete ids must be in
        ``[-1, K)`` (``-1 = NULL_CLASS``: unconditional)."""
        if component is None:
            return None
        comp = jnp.asarray(component)
        if not jnp.issubdtype(comp.dtype, jnp.integer):
            fail(arg, component, "None or integer component ids")
        if comp.ndim > 1 or (comp.ndim == 1 and comp.shape[0] not in (1, batch)):
            fail(arg, f"shape {comp.shape}", f"shape () or ({batch},)")
        k = self.num_components
        if is_concrete(comp):
            c = np.asarray(comp)
            if np.any(c < NULL_CLASS) or np.any(c >= k):
                bad = int(c[(c < NULL_CLASS) | (c >= k)].ravel()[0])
                fail(
                    arg,
                    component,
                    f"class ids in [0, {k}) or {NULL_CLASS} (unconditional); found unknown id {bad}",
                )
        return jnp.broadcast_to(comp, (batch,))

    def condition(self, k) -> Gaussian:
        """The component ``N(mu_k, Sigma_k)`` as a :class:`Gaussian` (class-conditional data)."""
        comp = jnp.asarray(k)
        if comp.ndim != 0 or not jnp.issubdtype(comp.dtype, jnp.integer):
            fail("k", k, "a scalar integer component id")
        n = self.num_components
        if is_concrete(comp) and not 0 <= int(comp) < n:
            fail("k", k, f"a component id in [0, {n})")
        return Gaussian(
            log_weights=jnp.zeros((1,), self.dtype),
            means=self.means[comp][None],
            evals=self.evals[comp][None],
            evecs=self.evecs[comp][None],
        )

    # ---- core -----------------------------------------------------------------------------
    def _terms(self, x, a, s):
        """Per-component ``(log N(x; alpha mu_k, C_k), C_k-whitened z / c)``, (B, K[, D]), with
        ``z = U_k^T(x - alpha mu_k)`` and ``c = alpha^2 lambda_k + sigma^2`` (eigenvalues of C_k)."""
        d = self.dim
        a3 = a[:, None, None]
        diff = x[:, None, :] - a3 * self.means[None]
        z = jnp.einsum("bkd,kde->bke", diff, self.evecs)
        c = a3**2 * self.evals[None] + (s**2)[:, None, None]
        zc = z / c
        log_norm = -0.5 * (d * _LOG_2PI + jnp.sum(jnp.log(c), -1) + jnp.sum(z * zc, -1))
        return log_norm, zc

    def _x0_eps_log(self, x, a, s, component, need_x0, need_eps):
        log_norm, zc = self._terms(x, a, s)
        logits = self.log_weights + log_norm
        log_p = jax.nn.logsumexp(logits, axis=-1)
        w = jax.nn.softmax(logits, axis=-1)
        if component is not None:
            onehot = jax.nn.one_hot(component, self.num_components, dtype=w.dtype)
            cond = (component >= 0)[:, None]
            w = jnp.where(cond, onehot, w)
            log_p = jnp.where(
                component >= 0,
                jnp.sum(jnp.where(onehot > 0, log_norm, 0.0), -1),
                log_p,
            )
        x0 = eps = None
        wzc = w[..., None] * zc
        if need_x0:
            x0 = w @ self.means + a[:, None] * _rotate_back(wzc * self.evals[None], self.evecs)
        if need_eps:
            eps = s[:, None] * _rotate_back(wzc, self.evecs)
        return log_p, x0, eps

    # ---- class posteriors (classifier-guidance oracles) -------------------------------------
    def _class_terms(self, x, a, s, component):
        """``(log N(x; alpha mu_k, C_k) (B, K), log p(y = k | x) (B, K), grad_x log p(y | x))``."""
        log_norm, zc = self._terms(x, a, s)
        logits = self.log_weights + log_norm
        if component is None:
            return log_norm, jax.nn.log_softmax(logits, axis=-1), None
        w = jax.nn.softmax(logits, axis=-1)
        onehot = jax.nn.one_hot(component, self.num_components, dtype=w.dtype)
        onehot = jnp.where((component >= 0)[:, None], onehot, w)
        grad = -_rotate_back((onehot - w)[..., None] * zc, self.evecs)
        return log_norm, jax.nn.log_softmax(logits, axis=-1), grad

    def _run_class(self, x, t, schedule, component):
        x, t, comp = self._validate(x, t, schedule, component)
        a, s = self._alpha_sigma(t, schedule, x.shape[0], x.dtype)
        return _jitted(self, "_class_terms", (x, a, s, comp))

    def component_log_prob_t(self, x, t, schedule: Schedule):
        """``log N(x; alpha mu_k, C_k) = log p_t(x | y = k)`` for every k, shape (batch, K)."""
        return self._run_class(x, t, schedule, None)[0]

    def class_log_prob_t(self, x, t, schedule: Schedule):
        """Exact classifier ``log p(y = k | x_t = x) = log w_k(x)`` (log-softmax over
        ``log pi_k + log N(x; alpha mu_k, C_k)``), (batch, K)."""
        return self._run_class(x, t, schedule, None)[1]

    def responsibilities(self, x, t, schedule: Schedule):
        """Posterior component probabilities ``w_k(x) = p(y = k | x_t = x)``, (batch, K)."""
        return jnp.exp(self.class_log_prob_t(x, t, schedule))

    def class_log_prob_grad(self, x, t, schedule: Schedule, component):
        """Classifier-guidance gradient ``grad_x log p(y = k | x_t = x)`` (batch, D), in closed
        form ``score(x | k) - score(x) = -sum_j (1[j = k] - w_j) C_j^{-1}(x - alpha mu_j)``
        (Bayes' rule; classifier guidance, Dhariwal & Nichol arXiv 2105.05233)."""
        if component is None:
            fail("component", component, "integer class ids (batch,) or a scalar id")
        return self._run_class(x, t, schedule, component)[2]

    # ---- data distribution ----------------------------------------------------------------
    def _log_prob_impl(self, x):
        b = x.shape[0]
        ones = jnp.ones((b,), x.dtype)
        log_norm, _ = self._terms(x, ones, jnp.zeros((b,), x.dtype))
        return jax.nn.logsumexp(self.log_weights + log_norm, axis=-1)

    def log_prob(self, x):
        """Data log density ``log p_0(x) = log sum_k pi_k N(x; mu_k, Sigma_k)``, (batch,)
        (finite for nonsingular covariances)."""
        return _jitted(self, "_log_prob_impl", (self._check_x(x),))

    def _sample_impl(self, key, n: int):
        """Exact data samples ``x = mu_k + U_k sqrt(lambda_k) z``, ``k ~ pi``, (n, D)."""
        k0, k1 = jax.random.split(key)
        dtype = self.dtype
        idx = jax.random.categorical(k0, self.log_weights, shape=(n,))
        z = jax.random.normal(k1, (n, self.dim), dtype)
        # every component's affine map of z (vectorised over components), then pick k per sample
        y = jnp.einsum("nd,kd,ked->nke", z, jnp.sqrt(self.evals), self.evecs) + self.means
        return jnp.take_along_axis(y, idx[:, None, None], axis=1)[:, 0]

    def mean(self):
        """Mean of ``p_0``: ``sum_k pi_k mu_k``, (D,)."""
        return self.weights @ self.means

    def cov(self):
        """Covariance of ``p_0``: ``sum_k pi_k (Sigma_k + (mu_k - m)(mu_k - m)^T)``, (D, D)."""
        w = self.weights
        dm = self.means - self.mean()
        return jnp.einsum("k,kde->de", w, self.covs) + jnp.einsum("k,kd,ke->de", w, dm, dm)

    def _marginal_params(self, t, schedule: Schedule):
        t = as_float_array(t)
        if t.ndim != 0:
            fail("t", f"shape {t.shape}", "a scalar time")
        schedule.check_t(t)
        a, s = schedule.alpha_sigma(t)
        a = jnp.asarray(a, self.dtype)
        s = jnp.asarray(s, self.dtype)
        c = a**2 * self.evals + s**2
        covs = jnp.einsum("kde,ke,kfe->kdf", self.evecs, c, self.evecs)
        return a * self.means, covs

    def marginal(self, t, schedule: Schedule):
        """``p_t`` at scalar ``t`` as a distrax ``MixtureSameFamily`` of
        ``MultivariateNormalFullCovariance(alpha mu_k, C_k)``."""
        locs, covs = self._marginal_params(t, schedule)
        import distrax  # imported on use: it pulls in TensorFlow Probability's JAX backend

        return distrax.MixtureSameFamily(
            distrax.Categorical(logits=self.log_weights),
            distrax.MultivariateNormalFullCovariance(locs, covs),
        )


class Gaussian(GaussianMixture):
    """A single Gaussian ``N(mu, Sigma)``: a :class:`GaussianMixture` with ``K = 1`` (same fields,
    build with :func:`gaussian` or :func:`point_mass`), plus the exact probability-flow ODE flow
    map (samplers.md 7.1)."""

    def mean(self):
        """``mu``, (D,)."""
        return self.means[0]

    def cov(self):
        """``Sigma``, (D, D)."""
        return self.covs[0]

    def marginal(self, t, schedule: Schedule):
        """``p_t = N(alpha mu, alpha^2 Sigma + sigma^2 I)`` at scalar ``t`` (distrax)."""
        locs, covs = self._marginal_params(t, schedule)
        import distrax

        return distrax.MultivariateNormalFullCovariance(locs[0], covs[0])

    @staticmethod
    def _pf_coefs(s, t, schedule: Schedule, dtype):
        a_s, sig_s = schedule.alpha_sigma(s)
        a_t, sig_t = schedule.alpha_sigma(t)
        return tuple(jnp.asarray(v, dtype) for v in (a_s, sig_s, a_t, sig_t))

    def _pf_ratio(self, a_s, sig_s, a_t, sig_t):
        """``sqrt(eig C_t / eig C_s)`` in the eigenbasis of Sigma, shape (..., D)."""
        lam = self.evals[0]
        c_t = a_t[..., None] ** 2 * lam + sig_t[..., None] ** 2
        return jnp.sqrt(c_t / (a_s[..., None] ** 2 * lam + sig_s[..., None] ** 2))

    def _pf_solution_impl(self, x_s, a_s, sig_s, a_t, sig_t):
        ratio = self._pf_ratio(a_s, sig_s, a_t, sig_t)
        b = x_s.shape[0]
        a_s = jnp.broadcast_to(a_s, (b,))[:, None]
        a_t = jnp.broadcast_to(a_t, (b,))[:, None]
        mu, u = self.means[0], self.evecs[0]
        y = (x_s - a_s * mu) @ u
        return a_t * mu + (y * ratio) @ u.T

    def pf_ode_solution(self, x_s, s, t, schedule: Schedule):
        """Exact flow map of the probability-flow ODE ``dx/dt = f x - g^2/2 grad log p_t(x)``
        from time ``s`` to time ``t`` (either direction), (batch, D):

        ``x_t = alpha_t mu + C_t^{1/2} C_s^{-1/2} (x_s - alpha_s mu)``, ``C = alpha^2 Sigma + sigma^2 I``
        (samplers.md 7.1; Song et al. arXiv 2011.13456). ``s``, ``t``: ``()`` or ``(batch,)``.
        Needs ``C_s`` nonsingular.
        """
        x_s = self._check_x(x_s, "x_s")
        s = _as_time(s, x_s.shape[0], schedule, "s")
        t = _as_time(t, x_s.shape[0], schedule, "t")
        coefs = self._pf_coefs(s, t, schedule, x_s.dtype)
        return _jitted(self, "_pf_solution_impl", (x_s, *coefs))

    def _affine_impl(self, a_s, sig_s, a_t, sig_t):
        ratio = self._pf_ratio(a_s, sig_s, a_t, sig_t)
        mu, u = self.means[0], self.evecs[0]
        amat = (u * ratio) @ u.T
        return amat, a_t * mu - a_s * (amat @ mu)

    def affine_pf_map(self, s, t, schedule: Schedule):
        """``(A (D, D), b (D,))`` with ``x_t = A x_s + b`` the exact PF-ODE flow map between scalar
        times: ``A = C_t^{1/2} C_s^{-1/2}``, ``b = alpha_t mu - A alpha_s mu`` (samplers.md 7.1)."""
        s, t = as_float_array(s), as_float_array(t)
        if s.ndim != 0:
            fail("s", f"shape {s.shape}", "a scalar time")
        if t.ndim != 0:
            fail("t", f"shape {t.shape}", "a scalar time")
        schedule.check_t(s, "s")
        schedule.check_t(t, "t")
        coefs = self._pf_coefs(s, t, schedule, self.dtype)
        return _jitted(self, "_affine_impl", coefs)


# ------------------------------------------------------------------------------------------
# linear subspace
# ------------------------------------------------------------------------------------------
class LinearSubspace(AnalyticDistribution):
    """Data on a ``d``-dim linear subspace: ``x_0 = loc + A u``, ``u ~ N(0, Sigma_u)``, with
    ``A`` (D, d) orthonormal columns (guidance.md 0.2(a), generalised to any ``(alpha, sigma)``).

    Fields (pytree leaves; build with :func:`linear_subspace` / :func:`random_subspace`):
    ``basis`` (D, d) = ``A``; ``evals_u`` (d,), ``evecs_u`` (d, d): ``Sigma_u = V diag(lambda) V^T``;
    ``loc`` (D,) (default 0).

    With ``M = alpha^2 Sigma_u + sigma^2 I_d`` and ``y = x - alpha loc``:

    * ``x0*(x) = loc + A alpha Sigma_u M^{-1} A^T y`` (lies in ``loc + span(A)``);
    * ``score(x) = -(1/sigma^2)(I - A A^T) y - A M^{-1} A^T y``.

    All costs are ``O(B D d)``; densities, scores and eps need ``sigma > 0`` (``t > t_min``).
    """

    basis: Any
    evals_u: Any
    evecs_u: Any
    loc: Any

    @property
    def dim(self) -> int:
        """Ambient dimension ``D``."""
        return int(jnp.shape(self.basis)[-2])

    @property
    def sub_dim(self) -> int:
        """Subspace dimension ``d``."""
        return int(jnp.shape(self.basis)[-1])

    @property
    def dtype(self):
        """Floating dtype of the parameters."""
        return _float_dtype(self.basis, self.evals_u, self.evecs_u, self.loc)

    @property
    def cov_u(self):
        """``Sigma_u``, (d, d)."""
        return (self.evecs_u * self.evals_u[..., None, :]) @ jnp.swapaxes(self.evecs_u, -1, -2)

    def _x0_eps_log(self, x, a, s, component, need_x0, need_eps):
        d_full, d = self.dim, self.sub_dim
        y = x - a[:, None] * self.loc
        coord = y @ self.basis  # A^T y, (B, d)
        perp = y - coord @ self.basis.T  # (I - A A^T) y
        z = coord @ self.evecs_u  # V^T A^T y
        c = a[:, None] ** 2 * self.evals_u + (s**2)[:, None]
        zc = z / c
        s2 = s**2
        quad = jnp.sum(perp**2, -1) / s2 + jnp.sum(z * zc, -1)
        logdet = (d_full - d) * jnp.log(s2) + jnp.sum(jnp.log(c), -1)
        log_p = -0.5 * (d_full * _LOG_2PI + logdet + quad)
        x0 = eps = None
        av = self.basis @ self.evecs_u  # (D, d)
        if need_x0:
            x0 = self.loc + a[:, None] * ((self.evals_u * zc) @ av.T)
        if need_eps:
            eps = perp / s[:, None] + s[:, None] * (zc @ av.T)
        return log_p, x0, eps

    def _log_prob_impl(self, x):
        z = ((x - self.loc) @ self.basis) @ self.evecs_u
        lam = self.evals_u
        return -0.5 * (self.sub_dim * _LOG_2PI + jnp.sum(jnp.log(lam)) + jnp.sum(z**2 / lam, -1))

    def log_prob(self, x):
        """Log density of the subspace coordinates: ``log N(A^T (x - loc); 0, Sigma_u)``, (batch,).

        ``p_0`` has no density on R^D; this is its density w.r.t. the ``d``-dim Lebesgue
        measure on ``loc + span(A)`` (evaluated at the projection of ``x``); needs ``Sigma_u``
        nonsingular.
        """
        return _jitted(self, "_log_prob_impl", (self._check_x(x),))

    def _sample_impl(self, key, n: int):
        """Exact samples ``loc + A V sqrt(lambda) z``, ``z ~ N(0, I_d)``, (n, D)."""
        z = jax.random.normal(key, (n, self.sub_dim), self.dtype)
        return self.loc + ((z * jnp.sqrt(self.evals_u)) @ self.evecs_u.T) @ self.basis.T

    def mean(self):
        """``loc``, (D,)."""
        return self.loc

    def cov(self):
        """``A Sigma_u A^T``, (D, D) (rank ``d``)."""
        av = self.basis @ self.evecs_u
        return (av * self.evals_u) @ av.T

    def marginal(self, t, schedule: Schedule):
        """``p_t = N(alpha loc, alpha^2 A Sigma_u A^T + sigma^2 I)`` at scalar ``t`` (distrax)."""
        t = as_float_array(t)
        if t.ndim != 0:
            fail("t", f"shape {t.shape}", "a scalar time")
        schedule.check_t(t)
        a, s = schedule.alpha_sigma(t)
        a = jnp.asarray(a, self.dtype)
        s = jnp.asarray(s, self.dtype)
        cov = a**2 * self.cov() + s**2 * jnp.eye(self.dim, dtype=self.dtype)
        import distrax

        return distrax.MultivariateNormalFullCovariance(a * self.loc, cov)

    def to_gaussian(self) -> Gaussian:
        """The same law as a :class:`Gaussian` with singular covariance ``A Sigma_u A^T``
        (eigenvectors ``[A V, complement]``, eigenvalues ``[lambda, 0]``; no eigh)."""
        q = jnp.linalg.qr(self.basis, mode="complete")[0]
        evecs = jnp.concatenate([self.basis @ self.evecs_u, q[:, self.sub_dim :]], axis=1)
        evals = jnp.concatenate([self.evals_u, jnp.zeros((self.dim - self.sub_dim,), self.dtype)])
        return Gaussian(
            log_weights=jnp.zeros((1,), self.dtype),
            means=self.loc[None],
            evals=evals[None],
            evecs=evecs[None],
        )


# ------------------------------------------------------------------------------------------
# factories
# ------------------------------------------------------------------------------------------
def gaussian_mixture(weights, means, covs) -> GaussianMixture:
    """Validated :class:`GaussianMixture` ``sum_k pi_k N(mu_k, Sigma_k)``.

    Args:
      weights: (K,) nonnegative, summing to 1 within 1e-6; ``None`` for uniform weights.
      means: (K, D).
      covs: ``()`` (one shared variance), ``(K,)`` (isotropic ``s_k I``), ``(K, D)`` (diagonal)
        or ``(K, D, D)`` (full, symmetric PSD; may be singular). Eigendecomposed once here.
    Raises:
      JaxdiffError naming the bad argument (checks on concrete values only).
    """
    means = jnp.asarray(means)
    if means.ndim != 2:
        fail("means", f"shape {tuple(means.shape)}", "shape (K, D)")
    k, d = means.shape
    if is_concrete(means) and not np.all(np.isfinite(np.asarray(means))):
        fail("means", means, "finite means")
    if weights is None:
        weights = jnp.full((k,), 1.0 / k)
    weights = jnp.asarray(weights)
    dtype = _float_dtype(means, weights, jnp.asarray(covs))
    if weights.shape != (k,):
        fail("weights", f"shape {tuple(weights.shape)}", f"shape ({k},) (one weight per mean)")
    if is_concrete(weights):
        w = np.asarray(weights, np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            fail("weights", weights, "nonnegative finite mixture weights")
        if abs(w.sum() - 1.0) > 1e-6:
            fail("weights", weights, f"weights summing to 1 (sum is {w.sum():.9g})")
    evals, evecs = _eigen_covs("covs", covs, k, d, dtype)
    log_w = jnp.log(weights.astype(dtype))
    log_w = log_w - jax.nn.logsumexp(log_w)  # exact normalisation (sum within 1e-6 checked)
    return GaussianMixture(log_weights=log_w, means=means.astype(dtype), evals=evals, evecs=evecs)


def gaussian(mean, cov=1.0) -> Gaussian:
    """Validated :class:`Gaussian` ``N(mean, cov)``.

    Args:
      mean: (D,).
      cov: scalar (``cov I``), (D,) diagonal or (D, D) symmetric PSD (may be singular).
    """
    mean = jnp.asarray(mean)
    if mean.ndim != 1:
        fail("mean", f"shape {tuple(mean.shape)}", "shape (D,)")
    d = mean.shape[0]
    if is_concrete(mean) and not np.all(np.isfinite(np.asarray(mean))):
        fail("mean", mean, "a finite mean")
    dtype = _float_dtype(mean, jnp.asarray(cov))
    evals, evecs = _eigen_cov_single("cov", cov, d, dtype)
    return Gaussian(
        log_weights=jnp.zeros((1,), dtype), means=mean.astype(dtype)[None], evals=evals, evecs=evecs
    )


def point_mass(x) -> Gaussian:
    """The point mass ``delta_x`` (a :class:`Gaussian` with ``Sigma = 0``): ``x0* = x`` for all
    inputs and ``eps*(x_t) = (x_t - alpha x) / sigma`` (samplers.md 7.1 exactness test)."""
    x = jnp.asarray(x)
    if x.ndim != 1:
        fail("x", f"shape {tuple(x.shape)}", "shape (D,)")
    return gaussian(x, jnp.zeros((), _float_dtype(x)))


def linear_subspace(basis, cov_u=None, mean=None) -> LinearSubspace:
    """Validated :class:`LinearSubspace` ``x_0 = mean + A u``, ``u ~ N(0, cov_u)``.

    Args:
      basis: (D, d) with orthonormal columns (``A^T A = I_d``, checked), ``d <= D``.
      cov_u: ``None`` (identity), scalar, (d,) diagonal or (d, d) symmetric PSD.
      mean: ``None`` (zero) or (D,).
    """
    basis = jnp.asarray(basis)
    if basis.ndim != 2 or basis.shape[1] > basis.shape[0] or basis.shape[1] < 1:
        fail("basis", f"shape {tuple(basis.shape)}", "shape (D, d) with 1 <= d <= D")
    dim, sub = basis.shape
    cov_u = jnp.ones((), _float_dtype(basis)) if cov_u is None else jnp.asarray(cov_u)
    mean = jnp.zeros((dim,), _float_dtype(basis)) if mean is None else jnp.asarray(mean)
    if mean.shape != (dim,):
        fail("mean", f"shape {tuple(mean.shape)}", f"shape ({dim},)")
    dtype = _float_dtype(basis, cov_u, mean)
    basis = basis.astype(dtype)
    if is_concrete(basis):
        b = np.asarray(basis, np.float64)
        err = float(np.max(np.abs(b.T @ b - np.eye(sub)))) if np.all(np.isfinite(b)) else np.inf
        if not err <= 100 * dim * float(np.finfo(np.dtype(dtype)).eps):
            fail("basis", basis, f"orthonormal columns (max |A^T A - I| = {err:.3g})")
    evals, evecs = _eigen_cov_single("cov_u", cov_u, sub, dtype)
    return LinearSubspace(basis=basis, evals_u=evals[0], evecs_u=evecs[0], loc=mean.astype(dtype))


def random_subspace(key, dim: int, sub_dim: int, cov_u=None, dtype=None) -> LinearSubspace:
    """A :class:`LinearSubspace` with a uniformly random orthonormal basis (QR of a Gaussian
    matrix, signs fixed by ``diag(R) > 0``). ``dim = D``, ``sub_dim = d <= D``."""
    dim = check_positive_int("dim", dim)
    sub_dim = check_positive_int("sub_dim", sub_dim)
    if sub_dim > dim:
        fail("sub_dim", sub_dim, f"an integer <= dim = {dim}")
    dtype = dtype or jnp.result_type(float)
    q, r = jnp.linalg.qr(jax.random.normal(key, (dim, sub_dim), dtype))
    q = q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(dtype)
    return linear_subspace(q, cov_u)


def ring_mixture(
    num: int = 8, radius: float = 2.0, std: float = 0.2, dim: int = 2
) -> GaussianMixture:
    """``num`` equally weighted isotropic Gaussians (std ``std``) with means evenly spaced on a
    circle of radius ``radius`` in the first two coordinates (other coordinates 0): the classic
    "8 Gaussians" 2-D toy."""
    num = check_positive_int("num", num)
    dim = check_positive_int("dim", dim, minimum=2)
    if not float(std) >= 0:
        fail("std", std, "a nonnegative number")
    ang = 2.0 * np.pi * np.arange(num) / num
    means = np.zeros((num, dim))
    means[:, 0] = radius * np.cos(ang)
    means[:, 1] = radius * np.sin(ang)
    dtype = jnp.result_type(float)
    return gaussian_mixture(
        jnp.full((num,), 1.0 / num, dtype),
        jnp.asarray(means, dtype),
        jnp.full((num,), float(std) ** 2, dtype),
    )


# ------------------------------------------------------------------------------------------
# denoiser
# ------------------------------------------------------------------------------------------
def analytic_apply(params, x, t, cond=None, *, schedule, parametrization="eps"):
    """``params.predict(x, t, schedule, parametrization, component=cond)`` on ``x`` of shape
    ``(batch, *event_shape)`` (flattened to ``(batch, D)`` and back). The ``apply`` of
    :class:`AnalyticDenoiser`, which supplies ``schedule`` and ``parametrization``."""
    x = jnp.asarray(x)
    b = x.shape[0]
    params._check_component(cond, b, "cond")
    out = params.predict(x.reshape(b, -1), t, schedule, parametrization, component=cond)
    return out.reshape(x.shape)


class AnalyticDenoiser(Denoiser):
    """A :class:`~jaxdiff.denoiser.Denoiser` returning the exact prediction of its ``params``
    (an :class:`AnalyticDistribution`) under ``schedule`` (a pytree leaf, so schedules can be
    swept without recompiling).

    ``model(params, x, t, cond)`` = ``params.predict(x, t, schedule, parametrization,
    component=cond)``; for a :class:`GaussianMixture` ``cond`` is ``None`` (the mixture) or int
    class ids ``(batch,)`` (class-conditional prediction; ``NULL_CLASS = -1`` = unconditional for
    that example). ``apply`` is :func:`analytic_apply`, which takes the schedule as a keyword:
    call the model itself rather than ``model.apply``.
    """

    apply: Callable = struct.field(pytree_node=False, default=analytic_apply)
    schedule: Any = None

    def __call__(self, params, x, t, cond=None):
        """Exact prediction, shape of ``x`` = ``(batch, *event_shape)``; ``t`` () or (batch,)."""
        self.check_x(x)
        t = jnp.broadcast_to(as_float_array(t), jnp.shape(x)[:1])
        return self.apply(
            params,
            x,
            t,
            cond,
            schedule=self.schedule,
            parametrization=self.parametrization,
        )


def as_denoiser(
    dist: AnalyticDistribution,
    schedule: Schedule,
    parametrization: str = "eps",
    event_shape=None,
):
    """``(model, params)``: the exact denoiser of ``dist`` under ``schedule``.

    ``model`` is an :class:`AnalyticDenoiser` predicting ``parametrization``; ``params`` is
    ``dist`` itself (so ``grad``/``vmap`` over distribution parameters work). ``event_shape``
    defaults to ``(D,)``; any shape with ``prod(event_shape) = D`` is allowed (inputs are
    flattened).
    """
    if not isinstance(dist, AnalyticDistribution):
        fail(
            "dist",
            type(dist).__name__,
            "an analytic distribution (GaussianMixture, Gaussian, LinearSubspace)",
        )
    if not isinstance(schedule, Schedule):
        fail("schedule", type(schedule).__name__, "a jaxdiff Schedule")
    parametrize.check_parametrization(parametrization)
    d = dist.dim
    if event_shape is None:
        event_shape = (d,)
    event_shape = tuple(int(e) for e in np.atleast_1d(event_shape))
    if int(np.prod(event_shape)) != d:
        fail("event_shape", event_shape, f"a shape with {d} elements (the data dimension)")
    model = AnalyticDenoiser(
        parametrization=parametrization, event_shape=event_shape, schedule=schedule
    )
    return model, dist


# ------------------------------------------------------------------------------------------
# Gaussian-process sequences
# ------------------------------------------------------------------------------------------
_GP_KERNELS = ("exp", "rbf", "matern32")


def gp_sequence(
    length: int,
    lengthscale=4.0,
    kernel: str = "exp",
    variance=1.0,
    channels: int = 1,
    jitter=1e-5,
    mean=0.0,
) -> Gaussian:
    """Stationary Gaussian-process sequences as a :class:`Gaussian` with exact scores.

    A sequence ``x in R^{L x C}`` has ``C`` independent channels, each a zero-mean (plus
    ``mean``) GP on the grid ``i = 0 .. L-1`` with covariance ``k(|i - j|) + jitter * 1[i = j]``:

    * ``"exp"``: ``k(r) = v exp(-r / l)`` (Ornstein-Uhlenbeck / Matern-1/2: a stationary AR(1)
      chain with correlation ``exp(-1/l)`` per step);
    * ``"rbf"``: ``k(r) = v exp(-r^2 / (2 l^2))`` (squared exponential);
    * ``"matern32"``: ``k(r) = v (1 + sqrt(3) r / l) exp(-sqrt(3) r / l)``

    (Rasmussen & Williams 2006, "Gaussian Processes for Machine Learning", ch. 4). The
    distribution is over the row-major flattening ``x.reshape(L * C)`` (index ``i * C + c``),
    so its covariance is ``kron(K_L, I_C)`` and the event shape is ``(L * C,)``. The exact score
    at time ``t`` is ``-(alpha^2 Sigma + sigma^2 I)^{-1} (x - alpha mu)`` (see the module
    docstring). Motivation: spatial-temporal dependence learned by diffusion transformers,
    Fu et al. arXiv 2407.16134.

    To use it with sequence models of input ``(B, L, C)`` (e.g. :class:`jaxdiff.dit.DiT`)::

        dist = gp_sequence(32, lengthscale=4.0, channels=2)
        x0 = dist.sample(key, n).reshape(n, 32, 2)          # training data (B, L, C)
        exact, exact_params = as_denoiser(dist, schedule, event_shape=(32, 2))  # takes (B, L, C)
        s_star = dist.score(x_t.reshape(n, -1), t, schedule).reshape(n, 32, 2)

    Args:
      length: ``L``, the number of positions.
      lengthscale: ``l > 0`` in grid steps.
      kernel: ``"exp" | "rbf" | "matern32"``.
      variance: ``v > 0``, the marginal variance.
      channels: ``C``, independent channels per position.
      jitter: ``>= 0`` added to the diagonal (the RBF Gram matrix is numerically singular for
        long lengthscales).
      mean: a constant mean.
    Returns:
      a :class:`Gaussian` of dimension ``L * C`` (float32; float64 under ``jax.enable_x64``).
    """
    length = check_positive_int("length", length)
    channels = check_positive_int("channels", channels)
    if kernel not in _GP_KERNELS:
        fail("kernel", kernel, f"one of {_GP_KERNELS}")
    for name, v, lo in (("lengthscale", lengthscale, 0.0), ("variance", variance, 0.0)):
        if (
            not isinstance(v, int | float | np.floating | np.integer)
            or isinstance(v, bool)
            or not (np.isfinite(v) and v > lo)
        ):
            fail(name, v, "a positive finite number")
    if not isinstance(jitter, int | float | np.floating | np.integer) or not (
        np.isfinite(jitter) and jitter >= 0
    ):
        fail("jitter", jitter, "a finite number >= 0")
    if not isinstance(mean, int | float | np.floating | np.integer) or not np.isfinite(mean):
        fail("mean", mean, "a finite number (a constant mean)")
    r = np.abs(np.arange(length)[:, None] - np.arange(length)[None, :]).astype(np.float64)
    lsc = float(lengthscale)
    if kernel == "exp":
        k = np.exp(-r / lsc)
    elif kernel == "rbf":
        k = np.exp(-0.5 * (r / lsc) ** 2)
    else:
        a = math.sqrt(3.0) * r / lsc
        k = (1.0 + a) * np.exp(-a)
    k = float(variance) * k + float(jitter) * np.eye(length)
    cov = np.kron(k, np.eye(channels))
    dtype = jnp.result_type(float)
    return gaussian(jnp.full((length * channels,), float(mean), dtype), jnp.asarray(cov, dtype))


__all__ += ["gp_sequence"]
