"""PF-ODE log-likelihood (jaxdiff.likelihood) against exact oracles (float64).

Oracles: for analytic data the marginal ``p_t`` is known in closed form
(``dist.log_prob_t``), so with the exact prior ``p_T`` and the exact divergence the only error
left is the ODE solver's. For Gaussian data the PF flow map is affine, ``x_T = A x + b`` with
``A = C_T^{1/2} C_eps^{-1/2}`` (samplers.md 7.1), so the latent and the log-det term are exact
too: ``l(T) = log det A = (log det C_T - log det C_eps) / 2``; and the divergence
``d f + g^2/2 tr(C_t^{-1})`` does not depend on x (samplers.md 8), so a Hutchinson estimate with
a fixed probe is ``v^T log(A) v``: exact for Rademacher probes when ``Sigma`` is diagonal.
"""

import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import analytic, schedules
from jaxdiff._checks import JaxdiffError, SolverError
from jaxdiff.likelihood import log_likelihood

TOL = {"rtol": 1e-8, "atol": 1e-8}
MEAN = (0.5, -0.3)
COV = ((1.0, 0.4), (0.4, 0.5))


def _schedule(name):
    return {"vp_linear": schedules.vp_linear(), "ve": schedules.ve()}[name]


def _gaussian():
    return analytic.gaussian(jnp.array(MEAN), jnp.array(COV))


def _gmm():
    return analytic.gaussian_mixture(
        jnp.array([0.3, 0.7]),
        jnp.array([[-1.0, 0.5], [0.8, -0.2]]),
        jnp.array([[[0.3, 0.1], [0.1, 0.2]], [[0.15, -0.05], [-0.05, 0.4]]]),
    )


def _dist(name):
    return {"gaussian": _gaussian, "gmm": _gmm}[name]()


def _x():
    return jnp.array([[0.1, 0.2], [1.0, -1.0], [-1.2, 0.6], [2.0, 1.5]])


def _exact_prior(dist, sch):
    return lambda z: dist.log_prob_t(z, sch.t_start, sch)


def _logdet_cov_t(dist, t, sch):
    a, s = sch.alpha_sigma(jnp.asarray(t))
    return float(jnp.sum(jnp.log(a**2 * dist.evals[0] + s**2)))


# ------------------------------------------------------------------------------------------
# exact trace: matches log p_{t_end} to solver accuracy
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched", ["vp_linear", "ve"])
@pytest.mark.parametrize("dname", ["gaussian", "gmm"])
def test_exact_trace_matches_analytic_log_prob(x64, dname, sched):
    sch = _schedule(sched)
    dist = _dist(dname)
    model, params = analytic.as_denoiser(dist, sch)
    x = _x()
    lp, info = log_likelihood(
        jax.random.key(0),
        model,
        params,
        sch,
        x,
        trace="exact",
        prior=_exact_prior(dist, sch),
        return_info=True,
        **TOL,
    )
    want = dist.log_prob_t(x, sch.t_end, sch)
    assert lp.shape == (4,) and lp.dtype == jnp.float64
    np.testing.assert_allclose(lp, want, rtol=0, atol=1e-6)  # brief: 1e-3; measured ~1e-8
    assert bool(jnp.all(info["solver_ok"])) and info["num_steps"].shape == (4,)
    np.testing.assert_allclose(info["prior"] + info["delta_logdet"], lp, rtol=0, atol=1e-12)
    if dname == "gaussian":
        # affine flow map: latent and log-det term are exact too
        z_want = dist.pf_ode_solution(x, sch.t_end, sch.t_start, sch)
        np.testing.assert_allclose(info["z"], z_want, rtol=0, atol=1e-6)
        ld = 0.5 * (_logdet_cov_t(dist, sch.t_start, sch) - _logdet_cov_t(dist, sch.t_end, sch))
        np.testing.assert_allclose(info["delta_logdet"], ld, rtol=0, atol=1e-6)


def test_default_prior_vs_exact_prior_vp(x64):
    # VP at t_start = 1: p_T = N(alpha mu, alpha^2 Sigma + sigma^2 I) with alpha(1) ~ 0.0066,
    # not exactly N(0, I). The ODE part is the same; only the prior term moves, by a tiny amount.
    sch = schedules.vp_linear()
    dist = _gaussian()
    model, params = analytic.as_denoiser(dist, sch)
    x = _x()
    run = functools.partial(log_likelihood, jax.random.key(0), model, params, sch, x)
    lp_ex, info_ex = run(trace="exact", prior=_exact_prior(dist, sch), return_info=True, **TOL)
    lp_def, info_def = run(trace="exact", return_info=True, **TOL)
    np.testing.assert_array_equal(info_def["delta_logdet"], info_ex["delta_logdet"])
    z = info_def["z"]
    std_normal = -0.5 * jnp.sum(z**2, -1) - jnp.log(2 * jnp.pi)
    np.testing.assert_allclose(info_def["prior"], std_normal, rtol=0, atol=1e-12)
    diff = lp_def - lp_ex
    expected = std_normal - dist.log_prob_t(z, sch.t_start, sch)
    np.testing.assert_allclose(diff, expected, rtol=0, atol=1e-12)
    alpha = float(sch.alpha(1.0))
    assert 0.006 < alpha < 0.007
    assert float(jnp.max(jnp.abs(diff))) < 0.03  # O(alpha |mu| |z|)
    assert float(jnp.max(jnp.abs(diff))) > 1e-4  # ... but not zero


# ------------------------------------------------------------------------------------------
# Hutchinson: unbiased around the exact trace
# ------------------------------------------------------------------------------------------
NP = 2  # probes per example in the Hutchinson tests (variance / NP)


def _hutchinson_rows(dist, sch, x_row, probe, key=1):
    """60 independent Hutchinson estimates (each the mean of NP probes) at ``x_row``: a batch of
    64 = ``_x()`` then 60 copies of ``x_row``; row i's probes come from ``fold_in(key, i)``.
    Returns ``(all 64 values, the 60 values at x_row)``."""
    model, params = analytic.as_denoiser(dist, sch)
    xs = jnp.concatenate([_x(), jnp.broadcast_to(x_row, (60, x_row.shape[0]))])
    lp = log_likelihood(
        jax.random.key(key),
        model,
        params,
        sch,
        xs,
        trace="hutchinson",
        probe=probe,
        num_probes=NP,
        prior=_exact_prior(dist, sch),
        **TOL,
    )
    return lp, np.asarray(lp[4:])


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dname", ["gaussian", "gmm"])
def test_hutchinson_mean_matches_exact(x64, dname, probe):
    sch = schedules.vp_linear()
    dist = _dist(dname)
    x_row = _x()[1]
    model, params = analytic.as_denoiser(dist, sch)
    exact = log_likelihood(
        jax.random.key(0),
        model,
        params,
        sch,
        _x(),  # same shapes as the exact-trace test above: reuses its compiled solve
        trace="exact",
        prior=_exact_prior(dist, sch),
        **TOL,
    )[1]
    _, rows = _hutchinson_rows(dist, sch, x_row, probe)
    se = rows.std(ddof=1) / np.sqrt(rows.size)
    assert rows.std() > 1e-3  # full covariance: the estimator really is random
    assert abs(rows.mean() - float(exact)) < 4 * se, (rows.mean(), float(exact), se)
    # rows use distinct probes (fold_in(key, i)); in D = 2 two Rademacher probes give 3 values
    assert np.unique(np.round(rows, 8)).size == (3 if probe == "rademacher" else 60)


def test_hutchinson_gaussian_probe_oracle(x64):
    # Gaussian data: div f~ is x-independent, so with a fixed probe v the estimate is exactly
    # v^T log(A) v (A = C_T^{1/2} C_eps^{-1/2}); its variance over Gaussian probes is
    # 2 ||log A||_F^2 and over Rademacher probes 2 sum_{i != j} (log A)_ij^2; averaging
    # num_probes = NP probes divides it by NP.
    sch = schedules.vp_linear()
    dist = _gaussian()
    x_row = _x()[1]
    lam = dist.evals[0]
    ratio = []
    for t in (sch.t_start, sch.t_end):
        a, s = sch.alpha_sigma(jnp.asarray(t))
        ratio.append(a**2 * lam + s**2)
    log_a = dist.evecs[0] @ jnp.diag(0.5 * jnp.log(ratio[0] / ratio[1])) @ dist.evecs[0].T
    off = log_a - jnp.diag(jnp.diag(log_a))
    for probe, var in (
        ("rademacher", 2 * jnp.sum(off**2)),
        ("gaussian", 2 * jnp.sum(log_a**2)),
    ):
        _, rows = _hutchinson_rows(dist, sch, x_row, probe, key=3)
        # sample variance of 60 draws within a generous chi^2 band of the exact variance
        ratio_var = rows.var(ddof=1) / (float(var) / NP)
        assert 0.5 < ratio_var < 1.6, (probe, ratio_var)


def test_hutchinson_rademacher_exact_for_diagonal_jacobian(x64):
    # Sigma diagonal => d f~/dx diagonal for all t => v^T J v = tr J for every +-1 probe.
    sch = schedules.vp_linear()
    dist = analytic.gaussian(jnp.array(MEAN), jnp.array([0.3, 1.5]))
    lp, _ = _hutchinson_rows(dist, sch, _x()[1], "rademacher")
    xs = jnp.concatenate([_x(), jnp.broadcast_to(_x()[1], (60, 2))])
    np.testing.assert_allclose(lp, dist.log_prob_t(xs, sch.t_end, sch), rtol=0, atol=1e-6)


def test_hutchinson_batch_independence(x64):
    # example i's probes come from fold_in(key, i) and each example is its own solve, so the
    # first 4 examples of a batch of 64 get the same values alone
    sch = schedules.vp_linear()
    dist = _gaussian()
    model, params = analytic.as_denoiser(dist, sch)
    lp64, _ = _hutchinson_rows(dist, sch, _x()[1], "gaussian", key=5)
    lp4 = log_likelihood(
        jax.random.key(5),
        model,
        params,
        sch,
        _x(),
        trace="hutchinson",
        probe="gaussian",
        num_probes=NP,
        prior=_exact_prior(dist, sch),
        **TOL,
    )
    np.testing.assert_allclose(lp4, lp64[:4], rtol=0, atol=1e-12)
    assert float(jnp.max(jnp.abs(lp4 - dist.log_prob_t(_x(), sch.t_end, sch)))) > 1e-4


# ------------------------------------------------------------------------------------------
# jit and grad
# ------------------------------------------------------------------------------------------
def test_jit_and_grad_wrt_mean(x64):
    sch = schedules.vp_linear()
    dist = _gaussian()
    model, _ = analytic.as_denoiser(dist, sch)
    x = _x()

    def mean_ll(p, x):
        lp = log_likelihood(
            jax.random.key(0),
            model,
            p,
            sch,
            x,
            trace="exact",
            prior=_exact_prior(p, sch),
            rtol=1e-10,
            atol=1e-10,
        )
        return jnp.mean(lp)

    vg = jax.jit(jax.value_and_grad(mean_ll))
    val, g = vg(dist, x)
    np.testing.assert_allclose(val, jnp.mean(dist.log_prob_t(x, sch.t_end, sch)), atol=1e-7)
    g_mu = g.means[0]
    # analytic: d/dmu mean_i log N(x_i; a mu, C) = a C^{-1} (mean_i x_i - a mu), at t_end
    a, s = sch.alpha_sigma(jnp.asarray(sch.t_end))
    c = a**2 * jnp.array(COV) + s**2 * jnp.eye(2)
    want = a * jnp.linalg.solve(c, jnp.mean(x, 0) - a * jnp.array(MEAN))
    np.testing.assert_allclose(g_mu, want, rtol=1e-5, atol=1e-6)
    # central finite differences of the (jitted) likelihood itself
    h = 1e-4
    fd = []
    for k in range(2):
        e = jnp.zeros(2).at[k].set(h)
        up = analytic.gaussian(jnp.array(MEAN) + e, jnp.array(COV))
        dn = analytic.gaussian(jnp.array(MEAN) - e, jnp.array(COV))
        fd.append((vg(up, x)[0] - vg(dn, x)[0]) / (2 * h))
    np.testing.assert_allclose(g_mu, jnp.array(fd), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
def test_bad_inputs():
    sch = schedules.vp_linear()
    dist = analytic.gaussian(jnp.zeros(2), 1.0)
    model, params = analytic.as_denoiser(dist, sch)
    x = jnp.zeros((3, 2))
    key = jax.random.key(0)
    run = functools.partial(log_likelihood, key, model, params, sch)
    with pytest.raises(JaxdiffError, match="^trace='jacobian'"):
        run(x, trace="jacobian")
    with pytest.raises(JaxdiffError, match="^probe='uniform'"):
        run(x, probe="uniform")
    with pytest.raises(JaxdiffError, match="^num_probes=0"):
        run(x, num_probes=0)
    with pytest.raises(JaxdiffError, match="^max_steps"):
        run(x, max_steps=0)
    with pytest.raises(JaxdiffError, match="^x="):
        run(jnp.zeros((3, 3)))
    with pytest.raises(JaxdiffError, match="^x="):
        run(jnp.zeros((2,)))
    with pytest.raises(JaxdiffError, match="^t_end=.*range"):
        run(x, t_end=-0.5)
    with pytest.raises(JaxdiffError, match="^t_start=.*range"):
        run(x, t_start=1.5)
    with pytest.raises(JaxdiffError, match="^t_end=.*below t_start"):
        run(x, t_start=0.5, t_end=0.6)
    with pytest.raises(JaxdiffError, match="^t_end=.*sigma"):
        run(x, t_end=0.0)
    with pytest.raises(JaxdiffError, match="^prior="):
        run(x, prior="standard")
    with pytest.raises(JaxdiffError, match="^solver="):
        run(x, solver="tsit5")
    with pytest.raises(JaxdiffError, match="^schedule="):
        log_likelihood(key, model, params, "vp", x)
    with pytest.raises(JaxdiffError, match="^cond="):
        run(x, cond=jnp.zeros((2,), jnp.int32))


def test_bad_prior_shape(x64):
    sch = schedules.vp_linear()
    dist = _gaussian()
    model, params = analytic.as_denoiser(dist, sch)
    run = functools.partial(log_likelihood, jax.random.key(0), model, params, sch, _x(), **TOL)
    with pytest.raises(JaxdiffError, match="^prior="):
        run(trace="exact", prior=lambda z: jnp.zeros(()))


@pytest.mark.slow
def test_max_steps_raises_eagerly_and_nans_under_jit(x64):
    sch = schedules.vp_linear()
    dist = _gaussian()
    model, params = analytic.as_denoiser(dist, sch)

    def f(p, x):
        return log_likelihood(jax.random.key(0), model, p, sch, x, max_steps=3, **TOL)

    with pytest.raises(SolverError, match="max_steps=3"):
        f(params, _x())
    assert bool(jnp.all(jnp.isnan(jax.jit(f)(params, _x()))))


@pytest.mark.slow
def test_float32_default_tolerances():
    # float32 with score_sde's tolerances (1e-5) and the default prior: within ~0.05 nats
    sch = schedules.vp_linear()
    dist = _gmm()
    model, params = analytic.as_denoiser(dist, sch)
    x = _x().astype(jnp.float32)
    lp = log_likelihood(
        jax.random.key(0), model, params, sch, x, trace="exact", prior=_exact_prior(dist, sch)
    )
    assert lp.dtype == jnp.float32
    np.testing.assert_allclose(lp, dist.log_prob_t(x, sch.t_end, sch), atol=5e-3)
    lp_h = log_likelihood(jax.random.key(0), model, params, sch, x, solver=diffrax.Dopri5())
    assert bool(jnp.all(jnp.isfinite(lp_h)))


@pytest.mark.slow
@pytest.mark.parametrize("sched", ["vp_cosine", "vp_discrete", "edm", "flow"])
def test_exact_trace_other_schedules_x0_model(x64, sched):
    sch = getattr(schedules, sched)()
    dist = _gmm()
    model, params = analytic.as_denoiser(dist, sch, parametrization="x0")
    x = _x()
    lp = log_likelihood(
        jax.random.key(0),
        model,
        params,
        sch,
        x,
        trace="exact",
        prior=_exact_prior(dist, sch),
        max_steps=20000,  # vp_discrete: the steps are clipped onto its 1000 knots
        **TOL,
    )
    np.testing.assert_allclose(lp, dist.log_prob_t(x, sch.t_end, sch), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_class_conditional_cond(x64):
    # cond = component ids (batch,), NULL_CLASS = -1 is the unconditional mixture
    sch = schedules.vp_linear()
    dist = _gmm()
    model, params = analytic.as_denoiser(dist, sch)
    x = _x()
    c = jnp.array([0, 1, analytic.NULL_CLASS, 1])
    lp = log_likelihood(
        jax.random.key(0),
        model,
        params,
        sch,
        x,
        c,
        trace="exact",
        prior=lambda z: dist.log_prob_t(z, sch.t_start, sch, component=c),
        **TOL,
    )
    want = dist.log_prob_t(x, sch.t_end, sch, component=c)
    np.testing.assert_allclose(lp, want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# the default estimator: exact trace in low dimension, 16 probes with a standard error above
# ------------------------------------------------------------------------------------------
def test_auto_trace_is_exact_in_low_dimension_and_hutchinson_with_stderr_above(x64):
    from jaxdiff.likelihood import DEFAULT_NUM_PROBES, EXACT_TRACE_MAX_DIM

    sch = schedules.vp_linear()
    dist = _gaussian()
    model, params = analytic.as_denoiser(dist, sch)
    kw = dict(prior=_exact_prior(dist, sch), return_info=True, **TOL)
    lp, info = log_likelihood(jax.random.key(0), model, params, sch, _x(), **kw)
    lp_ex, _ = log_likelihood(jax.random.key(0), model, params, sch, _x(), trace="exact", **kw)
    np.testing.assert_array_equal(lp, lp_ex)
    assert info["trace"] == "exact" and info["num_probes"] == 0
    np.testing.assert_array_equal(info["stderr"], 0.0)
    np.testing.assert_allclose(lp, dist.log_prob_t(_x(), sch.t_end, sch), atol=1e-6)

    # above the threshold: Hutchinson with DEFAULT_NUM_PROBES probes and a calibrated stderr.
    # Gaussian data: the per-probe estimate is v^T log(A) v with Var = 2 ||log A||_F^2 for
    # Gaussian probes (test above), so stderr^2 estimates 2 ||log A||_F^2 / K and the errors
    # over examples are ~N(0, stderr^2).
    d = EXACT_TRACE_MAX_DIM + 1
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (d, d)))
    lam = jnp.geomspace(0.05, 2.0, d)
    big = analytic.gaussian(jnp.zeros(d), (q * lam) @ q.T)
    model, params = analytic.as_denoiser(big, sch)
    x = big.sample(jax.random.key(2), 48)
    lp, info = log_likelihood(
        jax.random.key(3), model, params, sch, x, probe="gaussian",
        prior=_exact_prior(big, sch), return_info=True, rtol=1e-6, atol=1e-6,
    )  # fmt: skip
    assert info["trace"] == "hutchinson" and info["num_probes"] == DEFAULT_NUM_PROBES
    a0, s0 = sch.alpha_sigma(jnp.asarray(sch.t_start))
    a1, s1 = sch.alpha_sigma(jnp.asarray(sch.t_end))
    var = 2 * jnp.sum((0.5 * jnp.log((a0**2 * lam + s0**2) / (a1**2 * lam + s1**2))) ** 2)
    ratio = float(jnp.mean(info["stderr"] ** 2) / (var / DEFAULT_NUM_PROBES))
    assert 0.7 < ratio < 1.4, ratio
    z = (lp - big.log_prob_t(x, sch.t_end, sch)) / info["stderr"]
    assert 0.4 < float(jnp.mean(z**2)) < 1.8, float(jnp.mean(z**2))
