"""Tests for jaxdiff.metrics: every number is checked against an independent oracle."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from jaxdiff import metrics as M
from jaxdiff._checks import JaxdiffError

KEY = jax.random.PRNGKey(0)


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# numpy oracles
# ---------------------------------------------------------------------------------------------
def _np_pairwise(a, b):
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def _np_energy(x, y, unbiased):
    n, m = len(x), len(y)
    dxy, dxx, dyy = _np_pairwise(x, y), _np_pairwise(x, x), _np_pairwise(y, y)
    if unbiased:
        return 2 * dxy.mean() - dxx.sum() / (n * (n - 1)) - dyy.sum() / (m * (m - 1))
    return 2 * dxy.mean() - dxx.mean() - dyy.mean()


def _np_mmd(x, y, bandwidths, unbiased):
    def k(a, b):
        d2 = _np_pairwise(a, b) ** 2
        return sum(np.exp(-d2 / (2 * s**2)) for s in bandwidths)

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    if unbiased:
        np.fill_diagonal(kxx, 0.0)
        np.fill_diagonal(kyy, 0.0)
        return kxx.sum() / (n * (n - 1)) + kyy.sum() / (m * (m - 1)) - 2 * kxy.mean()
    return kxx.mean() + kyy.mean() - 2 * kxy.mean()


def _np_w2_1d(x, y, p=2):
    """W_p^p between 1-D empirical measures by replicating both to a common size lcm(n, m)."""
    n, m = len(x), len(y)
    size = n * m // math.gcd(n, m)
    xs = np.repeat(np.sort(x), size // n)
    ys = np.repeat(np.sort(y), size // m)
    return np.mean(np.abs(xs - ys) ** p)


# ---------------------------------------------------------------------------------------------
# sliced Wasserstein
# ---------------------------------------------------------------------------------------------
def test_sw2_gaussian_shift_matches_closed_form():
    # N(0, I) vs N(m, I): projected W2^2 = (theta.m)^2, whose mean over the sphere is |m|^2 / D.
    d, n = 2, 1000
    shift = np.array([1.0, -0.5])
    rng = _rng(1)
    z1, z2 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    # Antithetic samples [z; -z] have exact means 0 and m, removing the O(n^-1/2) mean noise.
    x = np.concatenate([z1, -z1]).astype(np.float32)
    y = (np.concatenate([z2, -z2]) + shift).astype(np.float32)
    exact = np.linalg.norm(shift) / np.sqrt(d)
    sw = float(M.sliced_wasserstein(KEY, x, y, num_projections=500))
    # Projection Monte-Carlo s.d. of SW2 is ~1.6 % here (theta_1^2 ~ Beta(1/2, 1/2) has relative
    # s.d. 0.71; 500 projections; square root halves it); 6 % is ~3.5 s.d.
    assert sw == pytest.approx(exact, rel=0.06)


def _sw_data():
    rng = _rng(2)
    x = rng.normal(size=(500, 3)).astype(np.float32)
    y = rng.normal(size=(400, 3)).astype(np.float32) + 0.3
    return x, y


def test_sw_self_is_zero_and_order_invariant():
    rng = _rng(3)
    x, y = _sw_data()
    assert float(M.sliced_wasserstein(KEY, x, x)) == 0.0
    base = float(M.sliced_wasserstein(KEY, x, y))
    perm_x, perm_y = rng.permutation(500), rng.permutation(400)
    permuted = float(M.sliced_wasserstein(KEY, x[perm_x], y[perm_y]))
    assert permuted == pytest.approx(base, rel=1e-6, abs=1e-7)
    # Symmetric in its arguments for the same directions.
    assert float(M.sliced_wasserstein(KEY, y, x)) == pytest.approx(base, rel=1e-6)


@pytest.mark.parametrize("n,m", [(300, 300), (300, 170), (64, 1000)])
def test_sw_1d_p1_equals_scipy_w1(n, m):
    rng = _rng(3)
    x, y = rng.normal(size=n), rng.standard_t(3, size=m) + 0.4
    with jax.enable_x64(True):
        sw = float(M.sliced_wasserstein(KEY, x, y, num_projections=2, p=1))
    assert sw == pytest.approx(scipy.stats.wasserstein_distance(x, y), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("n,m,p", [(200, 200, 2), (120, 90, 2), (35, 50, 3)])
def test_sw_1d_wp_equals_sorted_numpy(n, m, p):
    rng = _rng(4)
    x, y = rng.exponential(size=n), rng.normal(size=(m, 1))
    with jax.enable_x64(True):
        sw = float(M.sliced_wasserstein(KEY, x[:, None], y, num_projections=2, p=p))
    expected = _np_w2_1d(x, y[:, 0], p=p) ** (1 / p)
    assert sw == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_sw_floor_is_small_and_below_a_real_shift():
    calls = []

    def sample_fn(key, n):  # a host-side sampler seeded by the key
        calls.append(n)
        return np.random.default_rng(np.asarray(key)).normal(size=(n, 3)).astype(np.float32)

    floor = float(M.sliced_wasserstein_floor(KEY, sample_fn, 1000))
    assert calls == [1000] * 16  # the mean over 8 pairs
    assert 0.0 < floor < 0.1
    calls.clear()
    one = float(M.sliced_wasserstein_floor(KEY, sample_fn, 1000, num_pairs=1))
    assert calls == [1000, 1000] and 0.0 < one < 0.1
    # the mean of 8 pairs is the mean of the 8 single-pair floors of the folded keys
    singles = [
        float(M.sliced_wasserstein_floor(jax.random.fold_in(KEY, i), sample_fn, 1000, num_pairs=1))
        for i in range(8)
    ]
    assert floor == pytest.approx(np.mean(singles), rel=1e-5)
    x = sample_fn(np.array([0, 5], np.uint32), 1000) + 0.5 / np.sqrt(3)
    y = sample_fn(np.array([0, 6], np.uint32), 1000)
    assert float(M.sliced_wasserstein(KEY, x, y)) > 3 * floor


def test_sw_jit_with_static_num_projections():
    x, y = _sw_data()
    x, y = x.reshape(500, 3, 1), y.reshape(400, 3, 1)  # event shape (3, 1) is flattened
    sw_jit = jax.jit(M.sliced_wasserstein, static_argnames="num_projections")
    eager = M.sliced_wasserstein(KEY, x, y, num_projections=256, p=2)
    jitted = sw_jit(KEY, x, y, num_projections=256, p=2.0)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# energy distance
# ---------------------------------------------------------------------------------------------
def test_energy_1d_matches_scipy():
    rng = _rng(6)
    x, y = rng.normal(size=300), rng.gamma(2.0, size=170)
    with jax.enable_x64(True):
        e = float(M.energy_distance(x, y))
    # scipy returns sqrt(2E|X-Y| - E|X-X'| - E|Y-Y'|) (V-statistic).
    assert e == pytest.approx(scipy.stats.energy_distance(x, y) ** 2, rel=1e-9)


@pytest.mark.parametrize("d", [2, 8])  # direct differences / Gram expansion
def test_energy_matches_numpy_and_chunking(d):
    rng = _rng(7)
    x = rng.normal(size=(150, d))
    y = rng.normal(size=(110, d)) * 1.3 + 0.2
    for unbiased in (False, True):
        # float64: the blocked path (17 row blocks under lax.scan) equals the direct one.
        with jax.enable_x64(True):
            full64 = float(M.energy_distance(x, y, unbiased=unbiased))
            chunked64 = float(M.energy_distance(x, y, unbiased=unbiased, max_pairs=1000))
        assert full64 == pytest.approx(_np_energy(x, y, unbiased), rel=1e-10)
        assert chunked64 == pytest.approx(full64, rel=1e-12)
    # float32 (blocked): the result (~0.1) is a difference of O(1) means, a few ulps each.
    if d == 8:
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
        full = float(M.energy_distance(x32, y32, max_pairs=1000))
        assert full == pytest.approx(_np_energy(x32, y32, False), abs=5e-6)


def test_energy_jit_and_sign():
    rng = _rng(8)
    x = rng.normal(size=(200, 2)).astype(np.float32)
    y = rng.normal(size=(200, 2)).astype(np.float32)
    f = jax.jit(M.energy_distance, static_argnames="max_pairs")
    # float32: the result is a difference of O(1) means, so compare with an absolute tolerance.
    jitted = float(f(x, y, max_pairs=500))
    assert jitted == pytest.approx(float(M.energy_distance(x, y)), abs=1e-6)
    # Same distribution: V-statistic small and >= 0; shifted: clearly positive.
    assert 0.0 <= float(M.energy_distance(x, y)) < 0.03
    assert float(M.energy_distance(x, y + 1.0)) > 0.5


# ---------------------------------------------------------------------------------------------
# MMD
# ---------------------------------------------------------------------------------------------
_MMD_JIT = jax.jit(M.mmd, static_argnames="max_pairs")


@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd_matches_numpy(unbiased):
    # Same shapes for both parametrizations: ``unbiased`` is traced, so one compilation.
    rng = _rng(9)
    x = rng.normal(size=(120, 3)).astype(np.float32)
    y = (rng.normal(size=(90, 3)) + 0.5).astype(np.float32)
    bws = (0.7, 1.5)
    got = float(M.mmd(x, y, bandwidths=jnp.asarray(bws), unbiased=unbiased))
    assert got == pytest.approx(_np_mmd(x, y, bws, unbiased), rel=1e-4, abs=1e-6)
    # Default bandwidths: median heuristic over the pooled sample (all rows when <= 512).
    pooled = np.concatenate([x, y])
    d = _np_pairwise(pooled, pooled)[np.triu_indices(len(pooled), k=1)]
    med = np.median(d)
    assert float(M.median_bandwidth(x, y)) == pytest.approx(med, rel=1e-5)
    got_default = float(M.mmd(x, y, unbiased=unbiased))
    expected = _np_mmd(x, y, (0.5 * med, med, 2 * med), unbiased)
    assert got_default == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # Chunked pair sums agree; jit with a traced ``unbiased``.
    chunked = _MMD_JIT(x, y, bws, unbiased, max_pairs=700)
    assert float(chunked) == pytest.approx(got, rel=1e-5, abs=1e-7)


def test_mmd_same_vs_shifted():
    rng = _rng(10)
    x = rng.normal(size=(500, 2)).astype(np.float32)
    y = rng.normal(size=(500, 2)).astype(np.float32)
    same = float(M.mmd(x, y))
    shifted = float(M.mmd(x, y + 0.5))
    # Unbiased estimate under H0: mean 0, s.d. O(1/n) ~ 1e-3 here.
    assert abs(same) < 5e-3
    assert shifted > 0.05
    assert shifted > 20 * abs(same)


# ---------------------------------------------------------------------------------------------
# likelihoods
# ---------------------------------------------------------------------------------------------
def test_mean_nll_and_bits_per_dim():
    rng = _rng(11)
    x = rng.normal(size=(50, 4))

    def log_prob(x):
        return jnp.sum(jax.scipy.stats.norm.logpdf(x), axis=-1)

    expected = -scipy.stats.norm.logpdf(x).sum(-1).mean()
    with jax.enable_x64(True):
        assert float(M.mean_nll(log_prob, x)) == pytest.approx(expected, rel=1e-10)
        assert float(M.mean_nll(log_prob, x, batched=False)) == pytest.approx(expected, rel=1e-10)
        bpd = M.bits_per_dim(-expected, 4, offset=7.0)
    assert float(bpd) == pytest.approx(expected / (4 * np.log(2)) + 7.0, rel=1e-12)
    # Uniform density on [0, 1]^D has log p = 0; with 8-bit data that is 8 bits per dim.
    assert float(M.bits_per_dim(0.0, 3072, offset=8.0)) == 8.0


# ---------------------------------------------------------------------------------------------
# off-subspace ratio
# ---------------------------------------------------------------------------------------------
def test_off_subspace_ratio_exact():
    d_full, d = 6, 2
    q = np.linalg.qr(_rng(12).normal(size=(d_full, d_full)))[0]
    a = q[:, :d]  # orthonormal basis of the subspace
    perp = q[:, d:]
    x = np.stack(
        [
            3 * a[:, 0] + 4 * perp[:, 0],  # ratio 4/3
            a[:, 0] - 2 * a[:, 1],  # in the subspace: 0
            2 * perp[:, 1] + 2 * perp[:, 2],  # orthogonal: sqrt(8) / 1e-8
            5 * a[:, 1] + 12 * perp[:, 3],  # 12 / 5
        ]
    )
    with jax.enable_x64(True):
        r = np.asarray(M.off_subspace_ratio(x, a))
        mean = float(M.off_subspace_ratio(x, a, reduce="mean"))
        single = float(M.off_subspace_ratio(x[0], a))
    eps = 1e-8  # added to ||x_par|| in the denominator
    expected = np.array([4 / (3 + eps), 0.0, np.sqrt(8) / eps, 12 / (5 + eps)])
    # Entry 2 has ||x_par|| ~ 1e-16 (round-off) next to the 1e-8 guard, hence rtol 1e-7.
    np.testing.assert_allclose(r, expected, rtol=1e-7, atol=1e-9)
    assert mean == pytest.approx(expected.mean(), rel=1e-7)
    assert single == pytest.approx(4 / (3 + eps), rel=1e-12)
    jitted = jax.jit(M.off_subspace_ratio)(x.astype(np.float32)[[0, 3]], a.astype(np.float32))
    np.testing.assert_allclose(np.asarray(jitted), [4 / 3, 12 / 5], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Gaussian oracles
# ---------------------------------------------------------------------------------------------
def test_gaussian_w2_1d_and_commuting():
    with jax.enable_x64(True):
        w2 = M.gaussian_w2(1.0, 4.0, -0.5, 0.25)  # sigmas 2 and 0.5
        assert float(w2) ** 2 == pytest.approx(1.5**2 + 1.5**2, rel=1e-12)
        assert float(M.gaussian_w2(1.0, 4.0, -0.5, 0.25, squared=True)) == pytest.approx(4.5)
        # Commuting covariances: C_i = Q diag(l_i) Q^T; W2^2 = |dm|^2 + |sqrt(l1) - sqrt(l2)|^2.
        q = np.linalg.qr(_rng(13).normal(size=(4, 4)))[0]
        l1, l2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([0.2, 2.0, 4.0, 1.0])
        m1, m2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
        c1, c2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
        expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
        got = float(M.gaussian_w2(m1, c1, m2, c2, squared=True))
        assert got == pytest.approx(expected, rel=1e-10)
        assert float(M.gaussian_w2(m1, c1, m1, c1)) == pytest.approx(0.0, abs=1e-6)


def test_gaussian_w2_general_vs_scipy_sqrtm():
    rng = _rng(14)
    b1, b2 = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    c1, c2 = b1 @ b1.T + 0.1 * np.eye(3), b2 @ b2.T + 0.1 * np.eye(3)
    m1, m2 = rng.normal(size=3), rng.normal(size=3)
    s1 = scipy.linalg.sqrtm(c1).real
    cross = scipy.linalg.sqrtm(s1 @ c2 @ s1).real
    expected = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * cross)
    with jax.enable_x64(True):
        got = float(M.gaussian_w2(m1, c1, m2, c2, squared=True))
    assert got == pytest.approx(expected, rel=1e-9)
    # float32 and jit
    got32 = jax.jit(M.gaussian_w2)(*(np.float32(a) for a in (m1, c1, m2, c2)))
    assert float(got32) == pytest.approx(np.sqrt(expected), rel=1e-4)


def test_gaussian_kl():
    with jax.enable_x64(True):
        m1, s1, m2, s2 = 0.3, 1.5, -1.0, 0.7
        expected = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
        assert float(M.gaussian_kl(m1, s1**2, m2, s2**2)) == pytest.approx(expected, rel=1e-12)
        rng = _rng(15)
        b1, b2 = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
        c1, c2 = b1 @ b1.T + 0.2 * np.eye(3), b2 @ b2.T + 0.2 * np.eye(3)
        mu1, mu2 = rng.normal(size=3), rng.normal(size=3)
        c2i = np.linalg.inv(c2)
        dm = mu2 - mu1
        expected = 0.5 * (
            np.trace(c2i @ c1)
            + dm @ c2i @ dm
            - 3
            + np.linalg.slogdet(c2)[1]
            - np.linalg.slogdet(c1)[1]
        )
        assert float(M.gaussian_kl(mu1, c1, mu2, c2)) == pytest.approx(expected, rel=1e-10)
        assert float(M.gaussian_kl(mu1, c1, mu1, c1)) == pytest.approx(0.0, abs=1e-12)


def test_moment_errors():
    rng = _rng(16)
    x = rng.normal(size=(400, 2, 2)) @ np.diag([1.0, 2.0]) + 0.5
    mean, cov = np.full(4, 0.5), np.diag([1.0, 4.0, 1.0, 4.0])
    flat = x.reshape(400, -1)
    exp_mean = np.linalg.norm(flat.mean(0) - mean)
    exp_cov = np.linalg.norm(np.cov(flat, rowvar=False) - cov) / np.linalg.norm(cov)
    with jax.enable_x64(True):
        e_mean, e_cov = M.moment_errors(x, mean, cov)
    assert float(e_mean) == pytest.approx(exp_mean, rel=1e-10)
    assert float(e_cov) == pytest.approx(exp_cov, rel=1e-10)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------
X = np.zeros((10, 3), np.float32)
Y = np.ones((12, 3), np.float32)


@pytest.mark.parametrize(
    "call,arg",
    [
        (lambda: M.sliced_wasserstein(KEY, X, np.ones((10, 4))), "y"),
        (lambda: M.sliced_wasserstein(KEY, X, np.ones((10, 3, 1))), "y"),
        (lambda: M.sliced_wasserstein(KEY, X, Y, num_projections=0), "num_projections"),
        (lambda: M.sliced_wasserstein(KEY, X, Y, num_projections=2.5), "num_projections"),
        (lambda: M.sliced_wasserstein(KEY, X, Y, p=0.5), "p"),
        (lambda: M.sliced_wasserstein(KEY, X[:1], Y), "x"),
        (lambda: M.sliced_wasserstein(KEY, X, Y[:1]), "y"),
        (lambda: M.sliced_wasserstein(KEY, np.float32(1.0), Y), "x"),
        (lambda: M.sliced_wasserstein_floor(KEY, lambda k, n: X, 5), "sample_fn"),
        (lambda: M.energy_distance(X, np.ones((12, 2))), "y"),
        (lambda: M.energy_distance(X[:1], Y), "x"),
        (lambda: M.energy_distance(X, Y, max_pairs=0), "max_pairs"),
        (lambda: M.mmd(X, np.ones((12, 2))), "y"),
        (lambda: M.mmd(X, Y, bandwidths=[1.0, -1.0]), "bandwidths"),
        (lambda: M.mmd(X, Y, bandwidths=np.ones((2, 2))), "bandwidths"),
        (lambda: M.mean_nll(lambda x: jnp.zeros(3), X), "log_prob_fn"),
        (lambda: M.bits_per_dim(0.0, 0), "dim"),
        (lambda: M.off_subspace_ratio(X, np.eye(4)[:, :2]), "basis"),
        (lambda: M.off_subspace_ratio(X, 2 * np.eye(3)[:, :2]), "basis"),
        (lambda: M.off_subspace_ratio(X, np.eye(3)[:, :2], reduce="sum"), "reduce"),
        (lambda: M.gaussian_w2(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3)), "cov2"),
        (lambda: M.gaussian_w2(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)), "mean2"),
        (lambda: M.gaussian_w2(np.zeros(2), np.array([[1.0, 1.0], [0, 1]]), 0, 1), "cov1"),
        (lambda: M.gaussian_kl(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2)), "cov1"),
        (lambda: M.moment_errors(X, np.zeros(2), np.eye(2)), "mean"),
        (lambda: M.moment_errors(X, np.zeros(3), np.eye(2)), "cov"),
        (lambda: M.moment_errors(X[:1], np.zeros(3), np.eye(3)), "x"),
    ],
)
def test_bad_inputs_name_the_argument(call, arg):
    with pytest.raises(JaxdiffError, match=rf"^{arg}="):
        call()
