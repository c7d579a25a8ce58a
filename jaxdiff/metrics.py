"""Sample-quality metrics: distances between sample sets, likelihood summaries and Gaussian oracles.

All functions are pure JAX and jit-able (shapes are checked at trace time, values only when concrete).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdiff._checks import as_float_array, check_positive_int, fail, is_concrete

__all__ = [
    "sliced_wasserstein",
    "sliced_wasserstein_floor",
    "energy_distance",
    "mmd",
    "median_bandwidth",
    "mean_nll",
    "bits_per_dim",
    "off_subspace_ratio",
    "gaussian_w2",
    "gaussian_kl",
    "frechet_distance",
    "moment_errors",
]

#: Pairwise-distance budget: above this many pairs, pair sums are computed in row blocks.
DEFAULT_MAX_PAIRS = 4_000_000
#: Event dimension up to which pairwise distances use explicit differences (exact) instead of
#: the Gram expansion ``|a|^2 + |b|^2 - 2 a.b`` (matmul-friendly, used for larger D).
_DIRECT_MAX_DIM = 4
#: Rows of each sample used by the median heuristic of :func:`median_bandwidth`.
_MEDIAN_MAX_ROWS = 512


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------
def _samples(arg: str, x: Any, min_rows: int = 2) -> jax.Array:
    """``x`` of shape ``(n, ...)`` as a float array of shape ``(n, D)``; 1-D input is ``(n, 1)``."""
    x = as_float_array(x)
    if x.ndim == 0:
        fail(arg, x, "samples of shape (n, ...) with n >= 2")
    if x.shape[0] < min_rows:
        fail(arg, x, f"at least {min_rows} samples (rows), got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1)


def _paired_samples(x: Any, y: Any) -> tuple[jax.Array, jax.Array]:
    """Validate two sample sets with the same event shape; return them flattened to 2-D."""
    xa, ya = as_float_array(x), as_float_array(y)
    xf = _samples("x", xa)
    yf = _samples("y", ya)
    if xa.shape[1:] != ya.shape[1:]:
        fail(
            "y",
            y,
            f"samples with event shape {tuple(xa.shape[1:])} like x (got {tuple(ya.shape[1:])})",
        )
    dtype = jnp.result_type(xf, yf)
    return xf.astype(dtype), yf.astype(dtype)


def _check_p(p: Any) -> None:
    if is_concrete(p):
        p_np = np.asarray(p)
        if p_np.ndim != 0 or not np.isfinite(p_np) or p_np < 1:
            fail("p", p, "a finite scalar p >= 1")


def _gaussian(arg_mean: str, mean: Any, arg_cov: str, cov: Any) -> tuple[jax.Array, jax.Array]:
    """Validate a Gaussian's ``mean (D,)`` and ``cov (D, D)``; scalars mean D = 1."""
    mean = jnp.atleast_1d(as_float_array(mean))
    cov = as_float_array(cov)
    if cov.ndim == 0:
        cov = cov.reshape(1, 1)
    if mean.ndim != 1:
        fail(arg_mean, mean, "a mean vector of shape (D,)")
    d = mean.shape[0]
    if cov.shape != (d, d):
        fail(arg_cov, cov, f"a covariance matrix of shape ({d}, {d}) matching the mean")
    if is_concrete(cov):
        c = np.asarray(cov, dtype=np.float64)
        if not np.all(np.isfinite(c)):
            fail(arg_cov, cov, "a finite covariance matrix")
        if not np.allclose(c, c.T, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(c).max()))):
            fail(arg_cov, cov, "a symmetric covariance matrix")
    return mean, cov


# ---------------------------------------------------------------------------------------------
# sliced Wasserstein
# ---------------------------------------------------------------------------------------------
def _quantile_merge(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segments of [0, 1] on which both empirical quantile functions are constant.

    Returns ``(weights, ix, iy)``: segment lengths and, per segment, the order-statistic index of
    the ``n``-sample and of the ``m``-sample. ``i / n == j / m`` yields the same double for equal
    rationals (IEEE division is correctly rounded), so ``np.unique`` merges shared breakpoints.
    """
    grid = np.unique(np.concatenate([np.arange(n + 1) / n, np.arange(m + 1) / m]))
    weights = np.diff(grid)
    mid = 0.5 * (grid[:-1] + grid[1:])
    ix = np.minimum(np.floor(mid * n).astype(np.int64), n - 1)
    iy = np.minimum(np.floor(mid * m).astype(np.int64), m - 1)
    return weights, ix, iy


def sliced_wasserstein(
    key: jax.Array, x: Any, y: Any, num_projections: int = 256, p: float = 2
) -> jax.Array:
    r"""Sliced p-Wasserstein distance between two empirical distributions.

    Shapes: ``x (n, ...)``, ``y (m, ...)`` with the same event shape (flattened to ``D``); a 1-D
    array is ``n`` scalar samples. Returns a scalar.

    .. math::

        SW_p(\mu, \nu) = \Big( \frac{1}{L} \sum_{l=1}^{L} W_p^p(\theta_l{}_\# \mu,\,
        \theta_l{}_\# \nu) \Big)^{1/p}, \qquad \theta_l \sim \mathrm{Unif}(S^{D-1}),

    a Monte-Carlo estimate of ``(E_theta W_p^p)^{1/p}`` with ``L = num_projections`` directions
    drawn from ``key``. Each 1-D ``W_p^p = \int_0^1 |F^{-1}(u) - G^{-1}(u)|^p du`` is computed
    exactly from sorted projections: for ``n == m`` it is ``mean_i |x_(i) - y_(i)|^p``; for
    ``n != m`` the integral is evaluated on the merged grid of quantile levels ``{i/n} ∪ {j/m}``
    (at most ``n + m - 1`` segments; this is the exact W_p between the two empirical measures,
    so in ``D = 1`` with ``p = 1`` it equals ``scipy.stats.wasserstein_distance``).

    Even for two samples of the same distribution the estimate is positive (finite-sample bias,
    roughly ``O(n^{-1/2})``); compare against :func:`sliced_wasserstein_floor`.
    ``num_projections`` must be static under ``jit``; ``p`` may be traced.

    Sources: Rabin, Peyré, Delon & Bernot, "Wasserstein Barycenter and its Application to Texture
    Mixing" (SSVM 2011); Bonneel, Rabin, Peyré & Pfister, "Sliced and Radon Wasserstein
    Barycenters of Measures" (JMIV 2015).
    """
    num_projections = check_positive_int("num_projections", num_projections)
    _check_p(p)
    xf, yf = _paired_samples(x, y)
    # Drawn outside the jitted core: jax.random.normal is itself jitted (cached per shape), so the
    # costly-to-compile PRNG is not recompiled for every new sample size.
    theta = jax.random.normal(key, (num_projections, xf.shape[1]), dtype=xf.dtype)
    return _sliced_wasserstein(theta, xf, yf, jnp.asarray(p, xf.dtype))


@jax.jit
def _sliced_wasserstein(theta, xf, yf, p):
    n, m = xf.shape[0], yf.shape[0]
    theta = theta / jnp.linalg.norm(theta, axis=-1, keepdims=True)
    xs = jnp.sort(xf @ theta.T, axis=0)  # (n, L)
    ys = jnp.sort(yf @ theta.T, axis=0)  # (m, L)
    if n == m:
        wpp = jnp.mean(jnp.abs(xs - ys) ** p, axis=0)
    else:
        weights, ix, iy = _quantile_merge(n, m)
        w = jnp.asarray(weights, dtype=xf.dtype)
        wpp = jnp.einsum("k,kl->l", w, jnp.abs(xs[ix] - ys[iy]) ** p)
    return jnp.mean(wpp) ** (1.0 / p)


def sliced_wasserstein_floor(
    key: jax.Array,
    sample_fn: Callable[[jax.Array, int], Any],
    n: int,
    num_projections: int = 256,
    p: float = 2,
    num_pairs: int = 8,
) -> jax.Array:
    r"""Data-vs-data floor of :func:`sliced_wasserstein` at sample size ``n``.

    ``sample_fn(key, n) -> (n, ...)`` draws from the data distribution. Returns the scalar
    ``mean_k SW_p(X_k, X'_k)`` over ``num_pairs`` pairs of independent samples of size ``n``
    (same ``num_projections`` and ``p``; projections drawn anew per pair): an estimate of the
    value a perfect model would score at that sample size. Report it next to the model's score,
    e.g. ``"SW2 = 0.052 (floor 0.031)"``, where the model's score uses ``n`` model samples
    against ``n`` fresh data samples.

    One pair is a noisy estimate: for the README's 8-mode ring at ``n = 2000`` a single pair
    gives 0.085 +- 0.028 (33% relative spread over 20 pairs, from the fluctuating mode counts),
    so the default averages 8 pairs (about 12%); the model's own score has a similar spread,
    which averaging it over several fresh references (or a larger ``n``) reduces.

    Source: the finite-sample bias of empirical (sliced) Wasserstein distances, see Nadjahi et al.,
    "Statistical and Topological Properties of Sliced Probability Divergences" (arXiv 2003.05783).
    """
    n = check_positive_int("n", n, minimum=2)
    num_pairs = check_positive_int("num_pairs", num_pairs)
    total = 0.0
    for i in range(num_pairs):
        k1, k2, k3 = jax.random.split(key if num_pairs == 1 else jax.random.fold_in(key, i), 3)
        a = as_float_array(sample_fn(k1, n))
        b = as_float_array(sample_fn(k2, n))
        if a.ndim == 0 or a.shape[0] != n:
            fail(
                "sample_fn", sample_fn, f"a sampler returning {n} rows, got shape {tuple(a.shape)}"
            )
        total = total + sliced_wasserstein(k3, a, b, num_projections=num_projections, p=p)
    return total / num_pairs


# ---------------------------------------------------------------------------------------------
# pairwise sums (energy distance, MMD)
# ---------------------------------------------------------------------------------------------
def _sq_dists(a: jax.Array, b: jax.Array, b_sq: jax.Array | None) -> jax.Array:
    """Squared Euclidean distances ``(r, m)`` between rows of ``a (r, D)`` and ``b (m, D)``."""
    if b_sq is None:  # small D: explicit differences, exact
        return jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, axis=-1)
    a_sq = jnp.sum(a * a, axis=-1)
    return jnp.maximum(a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T), 0.0)


def _pair_sums(
    x: jax.Array,
    y: jax.Array,
    fn: Callable[[jax.Array], jax.Array],
    max_pairs: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(S_xx, S_xy, S_yy)`` with ``S_ab = sum_{i,j} fn(|a_i - b_j|^2)``, skipping ``i == j``.

    Works on the pooled sample ``z = [x; y]`` (``N = n + m`` rows, centred for the Gram
    expansion): at most ``max_pairs`` pairs are materialised at once; above that, ``z`` is split
    into row blocks of ``max(1, max_pairs // N)`` rows that a ``lax.scan`` visits one at a time.
    Each row yields its sums over the x-columns and the y-columns.
    """
    n = x.shape[0]
    z = jnp.concatenate([x, y], axis=0)
    z = z - jnp.mean(z, axis=0)
    big_n, d = z.shape
    z_sq = None if d <= _DIRECT_MAX_DIM else jnp.sum(z * z, axis=-1)
    rows = big_n if big_n * big_n <= max_pairs else max(1, max_pairs // big_n)
    n_blocks = -(-big_n // rows)
    cols = jnp.arange(big_n)

    def row_sums(blk: jax.Array, start: jax.Array) -> jax.Array:
        vals = fn(_sq_dists(blk, z, z_sq))  # (rows, N)
        i = start + jnp.arange(blk.shape[0])[:, None]
        vals = jnp.where((i < big_n) & (i != cols[None, :]), vals, 0.0)
        return jnp.stack([jnp.sum(vals[:, :n], axis=1), jnp.sum(vals[:, n:], axis=1)], axis=1)

    if n_blocks == 1:
        sums = row_sums(z, jnp.asarray(0))
    else:
        blocks = jnp.pad(z, ((0, n_blocks * rows - big_n), (0, 0))).reshape(n_blocks, rows, d)

        def body(carry, inp):
            return carry, row_sums(*inp)

        _, sums = lax.scan(body, None, (blocks, jnp.arange(n_blocks) * rows))
        sums = sums.reshape(n_blocks * rows, 2)[:big_n]
    s_xx = jnp.sum(sums[:n, 0])
    s_xy = 0.5 * (jnp.sum(sums[:n, 1]) + jnp.sum(sums[n:, 0]))  # both orders, symmetric
    s_yy = jnp.sum(sums[n:, 1])
    return s_xx, s_xy, s_yy


def _safe_sqrt(d2: jax.Array) -> jax.Array:
    # sqrt with a finite gradient at 0 (coincident points).
    pos = d2 > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, d2, 1.0)), 0.0)


def _check_max_pairs(max_pairs: Any) -> int:
    return check_positive_int("max_pairs", max_pairs)


def energy_distance(
    x: Any, y: Any, unbiased: bool = False, max_pairs: int = DEFAULT_MAX_PAIRS
) -> jax.Array:
    r"""Squared energy distance between two samples.

    Shapes: ``x (n, ...)``, ``y (m, ...)`` with the same event shape (flattened to ``D``; 1-D
    input is scalar samples). Returns a scalar.

    .. math::

        \mathcal{E}^2(X, Y) = 2\,E|X - Y| - E|X - X'| - E|Y - Y'|

    with Euclidean norms. ``unbiased=False`` (default) is the V-statistic (averages over all
    ``n^2`` / ``m^2`` pairs, ``>= 0``); ``unbiased=True`` the U-statistic (averages over
    ``i != j``, i.e. divides by ``n (n - 1)`` and ``m (m - 1)``; can be slightly negative).
    ``scipy.stats.energy_distance(u, v)`` (1-D) equals ``sqrt`` of the V-statistic.
    Memory-aware: all pairs of the pooled sample (``(n + m)^2``) are evaluated, at most
    ``max_pairs`` (default 4e6) at once; beyond that the sums run in row blocks under
    ``lax.scan``. ``max_pairs`` must be static under ``jit``; ``unbiased`` may be traced.

    Source: Székely & Rizzo, "Energy statistics: A class of statistics based on distances"
    (J. Stat. Plan. Inference 2013); Székely & Rizzo, "Testing for equal distributions in high
    dimension" (InterStat 2004).
    """
    max_pairs = _check_max_pairs(max_pairs)
    xf, yf = _paired_samples(x, y)
    return _energy_distance(xf, yf, jnp.asarray(unbiased, bool), max_pairs)


@partial(jax.jit, static_argnames="max_pairs")
def _energy_distance(xf, yf, unbiased, max_pairs):
    n, m = xf.shape[0], yf.shape[0]
    s_xx, s_xy, s_yy = _pair_sums(xf, yf, _safe_sqrt, max_pairs)
    # Python floats: n * n overflows int32 for n > 46340.
    e_xx = s_xx / jnp.where(unbiased, float(n * (n - 1)), float(n * n))
    e_yy = s_yy / jnp.where(unbiased, float(m * (m - 1)), float(m * m))
    return 2.0 * s_xy / float(n * m) - e_xx - e_yy


def median_bandwidth(x: Any, y: Any) -> jax.Array:
    r"""Median heuristic: the median pairwise Euclidean distance of the pooled sample.

    Shapes: ``x (n, ...)``, ``y (m, ...)``; returns a scalar. Uses up to 512 evenly strided rows
    of each sample (all rows when ``n, m <= 512``) and the pairs ``i < j`` of the pooled set:
    ``sigma = median_{i<j} |z_i - z_j|``. Returns 1 when that median is 0 (degenerate samples).

    Source: Gretton et al., "A Kernel Two-Sample Test" (JMLR 2012), section 8; Garreau,
    Jitkrittum & Kanagawa, "Large sample analysis of the median heuristic" (arXiv 1707.07269).
    """
    return _median_bandwidth(*_paired_samples(x, y))


@jax.jit
def _median_bandwidth(xf, yf):
    def rows(a: jax.Array) -> jax.Array:
        k = a.shape[0]
        if k <= _MEDIAN_MAX_ROWS:
            return a
        return a[np.unique(np.round(np.linspace(0, k - 1, _MEDIAN_MAX_ROWS)).astype(np.int64))]

    z = jnp.concatenate([rows(xf), rows(yf)], axis=0)
    z = z - jnp.mean(z, axis=0)
    b_sq = None if z.shape[1] <= _DIRECT_MAX_DIM else jnp.sum(z * z, axis=-1)
    iu = np.triu_indices(z.shape[0], k=1)
    med = jnp.median(_safe_sqrt(_sq_dists(z, z, b_sq))[iu])
    return jnp.where(med > 0, med, jnp.ones_like(med))


def mmd(
    x: Any,
    y: Any,
    bandwidths: Any = None,
    unbiased: bool = True,
    max_pairs: int = DEFAULT_MAX_PAIRS,
) -> jax.Array:
    r"""Squared maximum mean discrepancy with a sum of Gaussian (RBF) kernels.

    Shapes: ``x (n, ...)``, ``y (m, ...)`` with the same event shape (flattened to ``D``);
    ``bandwidths``: scalar or ``(K,)``. Returns a scalar.

    .. math::

        k(a, b) = \sum_{s} \exp\!\big(-|a - b|^2 / (2 s^2)\big), \qquad
        \mathrm{MMD}_u^2 = \frac{\sum_{i \ne j} k(x_i, x_j)}{n(n-1)}
        + \frac{\sum_{i \ne j} k(y_i, y_j)}{m(m-1)} - \frac{2}{nm} \sum_{i,j} k(x_i, y_j).

    ``unbiased=True`` (default) is the U-statistic above (unbiased, can be slightly negative);
    ``unbiased=False`` the V-statistic (sums over all pairs, divided by ``n^2`` / ``m^2``,
    ``>= 0``). Default ``bandwidths`` = :func:`median_bandwidth` ``* (0.5, 1, 2)``. Pair sums
    are blocked above ``max_pairs`` pairs like :func:`energy_distance`.

    Source: Gretton, Borgwardt, Rasch, Schölkopf & Smola, "A Kernel Two-Sample Test"
    (JMLR 2012), section 2.2 (the unbiased ``MMD_u^2`` and biased ``MMD_b^2`` estimates).
    """
    max_pairs = _check_max_pairs(max_pairs)
    xf, yf = _paired_samples(x, y)
    bw = None
    if bandwidths is not None:
        bw = jnp.atleast_1d(as_float_array(bandwidths)).astype(xf.dtype)
        if bw.ndim != 1 or bw.shape[0] == 0:
            fail("bandwidths", bandwidths, "a positive scalar or a non-empty 1-D array")
        if is_concrete(bw):
            bw_np = np.asarray(bw)
            if not (np.all(np.isfinite(bw_np)) and np.all(bw_np > 0)):
                fail("bandwidths", bandwidths, "positive finite bandwidths")
    return _mmd(xf, yf, bw, jnp.asarray(unbiased, bool), max_pairs)


@partial(jax.jit, static_argnames="max_pairs")
def _mmd(xf, yf, bw, unbiased, max_pairs):
    n, m = xf.shape[0], yf.shape[0]
    if bw is None:
        bw = _median_bandwidth(xf, yf) * jnp.asarray([0.5, 1.0, 2.0], dtype=xf.dtype)
    gammas = 0.5 / bw**2
    n_kernels = bw.shape[0]

    def kernel(d2: jax.Array) -> jax.Array:
        return sum(jnp.exp(-gammas[k] * d2) for k in range(n_kernels))

    s_xx, s_xy, s_yy = _pair_sums(xf, yf, kernel, max_pairs)
    # V-statistic: add the diagonal k(x, x) = K and divide by n^2.
    k_xx = jnp.where(unbiased, s_xx / float(n * (n - 1)), (s_xx + n * n_kernels) / float(n * n))
    k_yy = jnp.where(unbiased, s_yy / float(m * (m - 1)), (s_yy + m * n_kernels) / float(m * m))
    return k_xx + k_yy - 2.0 * s_xy / float(n * m)


# ---------------------------------------------------------------------------------------------
# likelihoods
# ---------------------------------------------------------------------------------------------
def mean_nll(
    log_prob_fn: Callable[[jax.Array], jax.Array], x: Any, batched: bool = True
) -> jax.Array:
    r"""Mean negative log-likelihood (nats) of samples under a model.

    Shapes: ``x (n, ...)``; ``log_prob_fn(x) -> (n,)`` when ``batched`` (default), else
    ``log_prob_fn(x_i) -> ()`` per sample (vmapped here). Returns a scalar:

    .. math:: \mathrm{NLL} = -\frac{1}{n} \sum_i \log p(x_i).

    Source: the standard likelihood metric of diffusion models, e.g. Song et al. (arXiv
    2011.13456, Table 2) and Kingma et al. VDM (arXiv 2107.00630); convert with
    :func:`bits_per_dim`.
    """
    x = as_float_array(x)
    if x.ndim == 0 or x.shape[0] < 1:
        fail("x", x, "samples of shape (n, ...) with n >= 1")
    lp = jnp.asarray(log_prob_fn(x) if batched else jax.vmap(log_prob_fn)(x))
    if lp.shape != (x.shape[0],):
        fail(
            "log_prob_fn",
            log_prob_fn,
            f"a function returning log-probabilities of shape ({x.shape[0]},), got {tuple(lp.shape)}",
        )
    return -jnp.mean(lp)


def bits_per_dim(log_prob: Any, dim: int, offset: float = 0.0) -> jax.Array:
    r"""Convert log-likelihoods (nats, any shape) to bits per dimension, elementwise.

    .. math:: \mathrm{bpd} = -\frac{\log p(x)}{D \ln 2} + \mathrm{offset}

    with ``D = dim``. ``offset`` accounts for the data scaling when the continuous density is on
    rescaled 8-bit data: ``offset = log2(256 / range)``, i.e. 8 for data in ``[0, 1]`` and 7 for
    data in ``[-1, 1]`` (the convention of Song et al. score_sde, arXiv 2011.13456; see also
    Theis, van den Oord & Bethge, arXiv 1511.01844). Pass ``mean_nll`` as ``-log_prob`` for the
    dataset average.
    """
    dim = check_positive_int("dim", dim)
    return -as_float_array(log_prob) / (dim * math.log(2.0)) + offset


# ---------------------------------------------------------------------------------------------
# subspace and Gaussian oracles
# ---------------------------------------------------------------------------------------------
def off_subspace_ratio(x: Any, basis: Any, reduce: str | None = "none") -> jax.Array:
    r"""Off-subspace ratio of samples relative to the span of an orthonormal basis.

    Shapes: ``x (n, ...)`` flattened to ``(n, D)`` (or a single ``(D,)`` vector, giving a scalar),
    ``basis`` ``A (D, d)`` with orthonormal columns (``A^T A = I_d``, checked when concrete).

    .. math::

        x_\parallel = A A^\top x, \quad x_\perp = x - x_\parallel, \quad
        r_{\mathrm{off}} = \frac{\|x_\perp\|}{\|x_\parallel\| + 10^{-8}}.

    ``reduce="none"`` (default; also ``None``) returns the per-sample ratios ``(n,)``;
    ``reduce="mean"`` returns their mean (a scalar).

    Source: ``shared/reference/guidance.md`` section 0.2(a) (linear-subspace Gaussian oracle); the
    metric of the GGDM code for Guo et al., "Gradient Guidance for Diffusion Models: An
    Optimization Perspective" (arXiv 2404.14743), also used by RCGDM (Yuan et al., arXiv
    2307.07055).
    """
    if reduce not in (None, "none", "mean"):
        fail("reduce", reduce, "'none' (or None) or 'mean'")
    x = as_float_array(x)
    a = as_float_array(basis)
    single = x.ndim == 1
    if x.ndim == 0:
        fail("x", x, "samples of shape (n, ...) or a single vector (D,)")
    xf = x[None, :] if single else x.reshape(x.shape[0], -1)
    d_full = xf.shape[1]
    if a.ndim != 2 or a.shape[0] != d_full or not 1 <= a.shape[1] <= d_full:
        fail(
            "basis", basis, f"a ({d_full}, d) matrix with 1 <= d <= {d_full} (orthonormal columns)"
        )
    if is_concrete(a):
        a_np = np.asarray(a, dtype=np.float64)
        gram_err = np.abs(a_np.T @ a_np - np.eye(a_np.shape[1])).max()
        if not np.isfinite(gram_err) or gram_err > 1e-3:
            fail("basis", basis, f"orthonormal columns (max |A^T A - I| = {gram_err:.2g})")
    dtype = jnp.result_type(xf, a)
    ratio = _off_subspace_ratio(xf.astype(dtype), a.astype(dtype))
    if reduce == "mean":
        return jnp.mean(ratio)
    return ratio[0] if single else ratio


@jax.jit
def _off_subspace_ratio(xf, a):
    x_par = (xf @ a) @ a.T
    return jnp.linalg.norm(xf - x_par, axis=-1) / (jnp.linalg.norm(x_par, axis=-1) + 1e-8)


def _sqrtm_psd(c: jax.Array) -> jax.Array:
    w, v = jnp.linalg.eigh(0.5 * (c + c.T))
    return (v * jnp.sqrt(jnp.maximum(w, 0.0))) @ v.T


def gaussian_w2(mean1: Any, cov1: Any, mean2: Any, cov2: Any, squared: bool = False) -> jax.Array:
    r"""2-Wasserstein (Bures-Wasserstein) distance between two Gaussians, in closed form.

    Shapes: ``mean1, mean2 (D,)``, ``cov1, cov2 (D, D)`` symmetric PSD (scalars mean D = 1).
    Returns the scalar ``W2`` (``W2^2`` if ``squared``):

    .. math::

        W_2^2 = \|m_1 - m_2\|^2 + \mathrm{tr}\Big(C_1 + C_2
        - 2 \big(C_1^{1/2} C_2 C_1^{1/2}\big)^{1/2}\Big).

    In 1-D this is ``(m1 - m2)^2 + (s1 - s2)^2``; for commuting covariances
    ``|m1 - m2|^2 + ||C1^{1/2} - C2^{1/2}||_F^2``. Matrix square roots use ``eigh`` with
    eigenvalues clipped at 0, so equal Gaussians give ``~sqrt(eps) * scale`` rather than exactly 0
    in float32.

    Source: Dowson & Landau, "The Fréchet distance between multivariate normal distributions"
    (J. Multivariate Anal. 1982); Olkin & Pukelsheim (Linear Algebra Appl. 1982); Givens & Shortt
    (Michigan Math. J. 1984).
    """
    m1, c1 = _gaussian("mean1", mean1, "cov1", cov1)
    m2, c2 = _gaussian("mean2", mean2, "cov2", cov2)
    if m2.shape != m1.shape:
        fail("mean2", mean2, f"a mean vector of shape {tuple(m1.shape)} like mean1")
    dtype = jnp.result_type(m1, c1, m2, c2)
    w2sq = _gaussian_w2sq(*(a.astype(dtype) for a in (m1, c1, m2, c2)))
    return w2sq if squared else jnp.sqrt(w2sq)


@jax.jit
def _gaussian_w2sq(m1, c1, m2, c2):
    s1 = _sqrtm_psd(c1)
    cross = s1 @ c2 @ s1
    tr_sqrt = jnp.sum(jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(0.5 * (cross + cross.T)), 0.0)))
    w2sq = jnp.sum((m1 - m2) ** 2) + jnp.trace(c1) + jnp.trace(c2) - 2.0 * tr_sqrt
    return jnp.maximum(w2sq, 0.0)


def gaussian_kl(mean1: Any, cov1: Any, mean2: Any, cov2: Any) -> jax.Array:
    r"""KL divergence ``KL(N(m1, C1) || N(m2, C2))`` in nats, in closed form.

    Shapes: ``mean1, mean2 (D,)``, ``cov1, cov2 (D, D)`` symmetric positive definite (scalars
    mean D = 1). Returns a scalar:

    .. math::

        \mathrm{KL} = \tfrac12\Big[\mathrm{tr}(C_2^{-1} C_1) + (m_2 - m_1)^\top C_2^{-1}
        (m_2 - m_1) - D + \ln\det C_2 - \ln\det C_1\Big].

    Computed with Cholesky factors (NaN if a covariance is not positive definite).

    Source: e.g. Rasmussen & Williams, "Gaussian Processes for Machine Learning" (2006),
    eq. (A.23); Kullback, "Information Theory and Statistics" (1959).
    """
    m1, c1 = _gaussian("mean1", mean1, "cov1", cov1)
    m2, c2 = _gaussian("mean2", mean2, "cov2", cov2)
    if m2.shape != m1.shape:
        fail("mean2", mean2, f"a mean vector of shape {tuple(m1.shape)} like mean1")
    dtype = jnp.result_type(m1, c1, m2, c2)
    return _gaussian_kl(*(a.astype(dtype) for a in (m1, c1, m2, c2)))


@jax.jit
def _gaussian_kl(m1, c1, m2, c2):
    d = m1.shape[0]
    l1 = jnp.linalg.cholesky(0.5 * (c1 + c1.T))
    l2 = jnp.linalg.cholesky(0.5 * (c2 + c2.T))
    solve = jax.scipy.linalg.solve_triangular
    a = solve(l2, l1, lower=True)  # L2^{-1} L1: tr(C2^{-1} C1) = ||a||_F^2
    b = solve(l2, m2 - m1, lower=True)
    logdet1 = 2.0 * jnp.sum(jnp.log(jnp.diag(l1)))
    logdet2 = 2.0 * jnp.sum(jnp.log(jnp.diag(l2)))
    return 0.5 * (jnp.sum(a * a) + jnp.sum(b * b) - d + logdet2 - logdet1)


def frechet_distance(feats_a: Any, feats_b: Any) -> jax.Array:
    r"""Fréchet distance between two feature sets (FID's statistic on any features).

    Shapes: ``feats_a (n, D)``, ``feats_b (m, D)`` with ``n, m >= 2``. Returns a scalar: the
    squared 2-Wasserstein distance between the Gaussians fitted to the two sets,

    .. math::

        \mathrm{FD} = \|\hat m_a - \hat m_b\|^2 + \mathrm{tr}\big(\hat C_a + \hat C_b
        - 2 (\hat C_a \hat C_b)^{1/2}\big),

    with sample means ``m`` and unbiased covariances ``C = X_c^T X_c / (n - 1)`` (``X_c`` the
    centred features, as in the reference FID code): the same number as
    ``gaussian_w2(m_a, C_a, m_b, C_b, squared=True)`` on the fitted moments, computed from the
    centred data instead of the covariance matrices. With thin SVDs
    ``A_c = U_a S_a V_a^T``, ``B_c = U_b S_b V_b^T``:

    .. math::

        \mathrm{tr} \hat C_a = \frac{\|S_a\|^2}{n - 1}, \qquad
        \mathrm{tr} (\hat C_a \hat C_b)^{1/2} = \frac{\|S_a V_a^\top V_b S_b\|_*}
        {\sqrt{(n - 1)(m - 1)}}

    (the eigenvalues of ``C_a C_b`` are the squared singular values of ``A_c B_c^T /
    sqrt((n-1)(m-1))``; ``||.||_*`` is the nuclear norm). Singular values carry an absolute
    error ``~eps * s_max`` where eigenvalues of ``C`` carry ``~eps * s_max^2``, so this avoids
    the float32 bias of square roots of clipped near-zero eigenvalues that rank-deficient
    feature covariances (dead ReLU units, ``n < D``) otherwise give: with 64-d features of rank
    20, float32 FD is within 1e-5 relative of the float64 value, where the covariance route
    (:func:`gaussian_w2`) is 3 % low. The result is clipped at 0.

    FD is biased upwards at finite ``n`` (two samples of one distribution score ``> 0``):
    compare scores only at equal sample sizes, next to a real-vs-real reference.

    Source: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium" (arXiv 1706.08500), section 3 (FID); Dowson & Landau (1982) for the Gaussian
    W2 closed form.

    Raises:
      JaxdiffError: a set that is not 2-D, has fewer than 2 rows, or feature dimensions that
      differ.
    """
    a, b = as_float_array(feats_a), as_float_array(feats_b)
    for arg, f, v in (("feats_a", a, feats_a), ("feats_b", b, feats_b)):
        if f.ndim != 2 or f.shape[0] < 2 or f.shape[1] < 1:
            fail(arg, v, f"features of shape (n, D) with n >= 2 (got shape {tuple(f.shape)})")
    if a.shape[1] != b.shape[1]:
        fail(
            "feats_b",
            feats_b,
            f"features of dimension {a.shape[1]} like feats_a (got {b.shape[1]})",
        )
    dtype = jnp.result_type(a, b)
    return _frechet_distance(a.astype(dtype), b.astype(dtype))


@jax.jit
def _frechet_distance(a, b):
    n, m = a.shape[0], b.shape[0]
    m_a, m_b = jnp.mean(a, axis=0), jnp.mean(b, axis=0)
    _, s_a, vt_a = jnp.linalg.svd(a - m_a, full_matrices=False)
    _, s_b, vt_b = jnp.linalg.svd(b - m_b, full_matrices=False)
    cross = (s_a[:, None] * vt_a) @ (vt_b.T * s_b[None, :])
    nuclear = jnp.sum(jnp.linalg.svd(cross, compute_uv=False))
    fd = (
        jnp.sum((m_a - m_b) ** 2)
        + jnp.sum(s_a**2) / (n - 1)
        + jnp.sum(s_b**2) / (m - 1)
        - 2.0 * nuclear / math.sqrt((n - 1) * (m - 1))
    )
    return jnp.maximum(fd, 0.0)


def moment_errors(x: Any, mean: Any, cov: Any) -> tuple[jax.Array, jax.Array]:
    r"""Errors of the sample mean and covariance against target moments.

    Shapes: ``x (n, ...)`` flattened to ``(n, D)``, ``mean (D,)``, ``cov (D, D)``. Returns the
    scalars

    .. math::

        \big(\|\hat m - m\|_2,\; \|\hat C - C\|_F / \|C\|_F\big),
        \quad \hat m = \tfrac1n \sum_i x_i,\;
        \hat C = \tfrac{1}{n-1} \sum_i (x_i - \hat m)(x_i - \hat m)^\top.

    Source: plain moment matching (unbiased sample covariance); the fidelity checks of
    ``shared/reference/guidance.md`` section 1.5.
    """
    xf = _samples("x", x)
    m, c = _gaussian("mean", mean, "cov", cov)
    if m.shape[0] != xf.shape[1]:
        fail("mean", mean, f"a mean vector of shape ({xf.shape[1]},) matching x's flattened events")
    dtype = jnp.result_type(xf, m, c)
    return _moment_errors(xf.astype(dtype), m.astype(dtype), c.astype(dtype))


@jax.jit
def _moment_errors(xf, m, c):
    m_hat = jnp.mean(xf, axis=0)
    xc = xf - m_hat
    c_hat = (xc.T @ xc) / (xf.shape[0] - 1)
    return jnp.linalg.norm(m_hat - m), jnp.linalg.norm(c_hat - c) / jnp.linalg.norm(c)
