"""Oracle tests for jaxdiff.analytic: exact scores/denoisers of Gaussian-type data (float64)."""

from __future__ import annotations

import math

import diffrax
import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import analytic, parametrize, schedules
from jaxdiff._checks import JaxdiffError

SCHEDULES = {
    "vp_linear": schedules.vp_linear,
    "vp_cosine": schedules.vp_cosine,
    "vp_discrete": schedules.vp_discrete,
    "ve": schedules.ve,
    "edm": schedules.edm,
    "flow": schedules.flow,
}


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _times(sch, n=5):
    """``n`` times spread (log-uniformly) over the sampling range [t_end, t_start]."""
    lo, hi = float(sch.t_end), float(sch.t_start)
    return np.geomspace(lo, hi, n)


def _gmm_np(dim=3, seed=0):
    rng = np.random.default_rng(seed)
    weights = np.array([0.2, 0.3, 0.5])
    means = 1.5 * rng.normal(size=(3, dim))
    b = rng.normal(size=(3, dim, dim))
    covs = 0.3 * b @ np.swapaxes(b, -1, -2) + 0.05 * np.eye(dim)
    return weights, means, covs


def _gmm(dim=3, seed=0):
    return analytic.gaussian_mixture(*_gmm_np(dim, seed))


def _ref_log_pt(x, a, s, weights, means, covs):
    """Independent log p_t: inverse + slogdet of C_k = alpha^2 Sigma_k + sigma^2 I, log-sum-exp."""
    d = means.shape[-1]
    c = a**2 * jnp.asarray(covs) + s**2 * jnp.eye(d)
    cinv = jnp.linalg.inv(c)
    logdet = jnp.linalg.slogdet(c)[1]
    diff = x[:, None, :] - a * jnp.asarray(means)
    quad = jnp.einsum("bkd,kde,bke->bk", diff, cinv, diff)
    comp = -0.5 * (d * math.log(2 * math.pi) + logdet + quad)
    return jax.nn.logsumexp(jnp.log(jnp.asarray(weights)) + comp, axis=-1)


def _test_points(dist, t, sch, n=16, seed=1):
    key = jax.random.key(seed)
    x = dist.sample_t(key, n, t, sch)
    # a couple of atypical points too (far from the data; tests the log-sum-exp)
    a, s = sch.alpha_sigma(t)
    far = jnp.asarray([[3.0, -2.0, 1.0], [-4.0, 0.5, 2.0]])[:, : dist.dim] * (a + s)
    return jnp.concatenate([x, far], axis=0)


# ------------------------------------------------------------------------------------------
# 1./2. exact eps = -sigma grad log p_t for every schedule; Tweedie; parametrization round trips
# ------------------------------------------------------------------------------------------
@jax.jit
def _ref_value_and_score(x, a, s, w, mu, cov):
    """Independent reference: ``(log p_t(x), grad_x log p_t(x))`` by autodiff of _ref_log_pt."""
    vals, vjp = jax.vjp(lambda y: _ref_log_pt(y, a, s, w, mu, cov), x)
    return vals, vjp(jnp.ones_like(vals))[0]


def _gmm_oracle(dist, x, t, sch, w, mu, cov):
    """Everything tests 1 and 2 compare (library calls are eager: they share one compiled core)."""
    a, s = sch.alpha_sigma(t)
    ref_lp, ref_score = _ref_value_and_score(x, a, s, w, mu, cov)
    out = {
        "eps": dist.eps(x, t, sch),
        "x0": dist.x0(x, t, sch),
        "score": dist.score(x, t, sch),
        "log_prob_t": dist.log_prob_t(x, t, sch),
        "eps_ref": -s * ref_score,
        "log_pt_ref": ref_lp,
        "log_pt_distrax": dist.marginal(t, sch).log_prob(x),
    }
    for p in parametrize.PARAMETRIZATIONS:
        pred = dist.predict(x, t, sch, p)
        out["pred_" + p] = pred
        out["back_" + p] = parametrize.to_x0_eps(pred, p, x, t, sch)
    return out


_ORACLE_CACHE: dict = {}


def _gmm_results(name):
    """``[(t, alpha, sigma, x, outputs), ...]`` for the 3-component full-covariance GMM in D=3 at
    several times of the schedule's sampling range (computed once per schedule, in float64)."""
    if name not in _ORACLE_CACHE:
        sch = SCHEDULES[name]()
        w, mu, cov = _gmm_np()
        dist = analytic.gaussian_mixture(w, mu, cov)
        res = []
        for t in _times(sch):
            x = _test_points(dist, t, sch)
            out = _gmm_oracle(dist, x, float(t), sch, w, mu, cov)
            a, s = (float(v) for v in sch.alpha_sigma(t))
            res.append((t, a, s, np.asarray(x), jax.tree.map(np.asarray, out)))
        _ORACLE_CACHE[name] = res
    return _ORACLE_CACHE[name]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_eps_matches_autodiff_of_independent_density(name):
    for t, _, s, _, out in _gmm_results(name):
        assert out["eps"].dtype == np.float64
        # eps* = -sigma grad log p_t with log p_t from inverse/slogdet of the raw covariances
        np.testing.assert_allclose(out["eps"], out["eps_ref"], rtol=1e-10, atol=1e-10, err_msg=t)
        np.testing.assert_allclose(out["score"], -out["eps_ref"] / s, rtol=1e-8, atol=1e-8 / s)
        # log p_t, and the distrax marginal is the same density
        np.testing.assert_allclose(out["log_prob_t"], out["log_pt_ref"], rtol=1e-10)
        np.testing.assert_allclose(out["log_pt_distrax"], out["log_pt_ref"], rtol=1e-10)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_tweedie_and_predict_round_trip(name):
    for _t, a, s, x, out in _gmm_results(name):
        x0, eps = out["x0"], out["eps"]
        # Tweedie: x0 = (x + sigma^2 score) / alpha
        np.testing.assert_allclose(x0, (x + s**2 * out["score"]) / a, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(eps, -s * out["score"], rtol=1e-12, atol=1e-12)
        for p in parametrize.PARAMETRIZATIONS:
            x0_back, eps_back = out["back_" + p]
            np.testing.assert_allclose(x0_back, x0, rtol=1e-8, atol=1e-8, err_msg=p)
            np.testing.assert_allclose(eps_back, eps, rtol=1e-8, atol=1e-8, err_msg=p)
        np.testing.assert_allclose(out["pred_v"], a * eps - s * x0, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(out["pred_x0"], x0)
        np.testing.assert_allclose(out["pred_eps"], eps)


# ------------------------------------------------------------------------------------------
# 3. Linear subspace
# ------------------------------------------------------------------------------------------
def _subspace_oracle(sub, singular, via_eig, x, t, sch):
    out = {
        "x0": sub.x0(x, t, sch),
        "eps": sub.eps(x, t, sch),
        "log_prob_t": sub.log_prob_t(x, t, sch),
        "log_prob_distrax": sub.marginal(t, sch).log_prob(x),
    }
    for key, g in (("sing", singular), ("eig", via_eig)):
        out[key] = (g.x0(x, t, sch), g.eps(x, t, sch), g.log_prob_t(x, t, sch))
    return out


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_linear_subspace_matches_singular_gaussian(name):
    sch = SCHEDULES[name]()
    rng = np.random.default_rng(3)
    b = rng.normal(size=(2, 2))
    cov_u = b @ b.T + 0.2 * np.eye(2)
    sub = analytic.random_subspace(jax.random.key(0), 6, 2, cov_u=cov_u)
    a_mat = np.asarray(sub.basis)
    # the mixture code's singular-covariance path (eigh of the rank-2 matrix A Sigma_u A^T)
    singular = analytic.gaussian(jnp.zeros(6), a_mat @ cov_u @ a_mat.T)
    via_eig = sub.to_gaussian()
    for t in _times(sch, 4):
        x = sub.sample_t(jax.random.key(1), 16, t, sch)
        out = jax.tree.map(np.asarray, _subspace_oracle(sub, singular, via_eig, x, float(t), sch))
        x0 = out["x0"]
        off = x0 - x0 @ a_mat @ a_mat.T
        assert np.max(np.linalg.norm(off, axis=-1)) < 1e-12
        for key in ("sing", "eig"):
            g_x0, g_eps, g_lp = out[key]
            np.testing.assert_allclose(x0, g_x0, rtol=1e-9, atol=1e-9, err_msg=key)
            np.testing.assert_allclose(out["eps"], g_eps, rtol=1e-9, atol=1e-9, err_msg=key)
            np.testing.assert_allclose(out["log_prob_t"], g_lp, rtol=1e-9, atol=1e-9, err_msg=key)
        np.testing.assert_allclose(out["log_prob_t"], out["log_prob_distrax"], rtol=1e-10)
    np.testing.assert_allclose(sub.cov(), singular.cov(), atol=1e-12)
    np.testing.assert_allclose(sub.cov_u, cov_u, atol=1e-12)


def test_linear_subspace_closed_form_with_identity_cov():
    # guidance.md 0.2(a): Sigma_u = I gives x0 = (alpha / (alpha^2 + sigma^2)) A A^T x
    sch = schedules.vp_linear()
    sub = analytic.random_subspace(jax.random.key(2), 6, 2)
    x = jax.random.normal(jax.random.key(3), (16, 6))
    a, s = sch.alpha_sigma(0.4)
    proj = sub.basis @ sub.basis.T
    np.testing.assert_allclose(sub.x0(x, 0.4, sch), a / (a**2 + s**2) * x @ proj, atol=1e-13)
    score = -(x - x @ proj) / s**2 - x @ proj / (a**2 + s**2)
    np.testing.assert_allclose(sub.score(x, 0.4, sch), score, rtol=1e-12)


# ------------------------------------------------------------------------------------------
# 4. Exact PF-ODE flow map of a Gaussian
# ------------------------------------------------------------------------------------------
def _pf_ode_diffrax(dist, x, s, t, sch):
    def vf(tau, y, args):
        return sch.drift_coef(tau) * y - 0.5 * sch.diffusion_sq(tau) * dist.score(y, tau, sch)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
        diffrax.Tsit5(),
        t0=s,
        t1=t,
        dt0=(t - s) / 200,
        y0=x,
        stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-11),
        max_steps=200_000,
    )
    return sol.ys[-1]


@pytest.mark.parametrize(
    "name",
    ["vp_linear"] + [pytest.param(n, marks=pytest.mark.slow) for n in ("flow", "edm", "vp_cosine")],
)
def test_gaussian_pf_ode_solution_matches_diffrax(name):
    sch = SCHEDULES[name]()
    w, mu, cov = _gmm_np()
    dist = analytic.gaussian(mu[0], cov[0])
    s, t = float(sch.t_start), float(sch.t_end)
    x_s = dist.sample_t(jax.random.key(4), 8, s, sch)
    exact = dist.pf_ode_solution(x_s, s, t, sch)
    solved = jax.jit(_pf_ode_diffrax)(dist, x_s, s, t, sch)
    rel = jnp.linalg.norm(solved - exact) / jnp.linalg.norm(exact)
    assert float(rel) < 1e-7, float(rel)


def test_gaussian_pf_ode_composes_and_affine_map():
    sch = schedules.vp_cosine()
    w, mu, cov = _gmm_np()
    dist = analytic.gaussian(mu[1], cov[1])
    x = jax.random.normal(jax.random.key(5), (6, 3))
    s, u, t = 0.9, 0.4, 0.01
    direct = dist.pf_ode_solution(x, s, t, sch)
    two = dist.pf_ode_solution(dist.pf_ode_solution(x, s, u, sch), u, t, sch)
    np.testing.assert_allclose(two, direct, rtol=1e-12, atol=1e-12)
    back = dist.pf_ode_solution(direct, t, s, sch)  # invertible: t -> s undoes s -> t
    np.testing.assert_allclose(back, x, rtol=1e-10, atol=1e-10)
    a_mat, b = dist.affine_pf_map(s, t, sch)
    np.testing.assert_allclose(x @ a_mat.T + b, direct, rtol=1e-12, atol=1e-12)
    # per-example times
    sb, tb = jnp.full((6,), s), jnp.linspace(0.01, 0.5, 6)
    out = dist.pf_ode_solution(x, sb, tb, sch)
    for i in (0, 3, 5):
        np.testing.assert_allclose(out[i], dist.pf_ode_solution(x[i : i + 1], s, tb[i], sch)[0])
    # pushes the exact marginal N(alpha_s mu, C_s) to N(alpha_t mu, C_t)
    ca = dist.marginal(s, sch).covariance()
    np.testing.assert_allclose(a_mat @ ca @ a_mat.T, dist.marginal(t, sch).covariance(), atol=1e-12)
    # point mass: samplers.md 7.1 exact endpoint alpha_E mu + (sigma_E/sigma_T)(x_T - alpha_T mu)
    pm = analytic.point_mass(jnp.asarray(mu[2]))
    a_s, sig_s = sch.alpha_sigma(s)
    a_t, sig_t = sch.alpha_sigma(t)
    expect = a_t * mu[2] + sig_t / sig_s * (x - a_s * mu[2])
    np.testing.assert_allclose(pm.pf_ode_solution(x, s, t, sch), expect, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# 5. sampling vs moments / densities
# ------------------------------------------------------------------------------------------
def _assert_moments(x, mean, cov, nsig=5.0):
    n = x.shape[0]
    x = np.asarray(x)
    m = x.mean(0)
    se = np.sqrt(np.diag(np.asarray(cov)) / n)
    assert np.all(np.abs(m - mean) < nsig * se), (m, mean)
    xc = x - m
    prod = xc[:, :, None] * xc[:, None, :]
    emp = prod.mean(0)
    se_c = prod.std(0) / np.sqrt(n)
    assert np.all(np.abs(emp - cov) < nsig * se_c + 1e-12), (emp, cov)


def test_sample_moments_and_sample_t():
    dist = _gmm()
    x = dist.sample(jax.random.key(6), 200_000)
    assert x.shape == (200_000, 3) and x.dtype == jnp.float64
    _assert_moments(x, dist.mean(), dist.cov())
    sch = schedules.vp_linear()
    a, s = sch.alpha_sigma(0.3)
    xt = dist.sample_t(jax.random.key(7), 200_000, 0.3, sch)
    _assert_moments(xt, a * dist.mean(), a**2 * dist.cov() + s**2 * jnp.eye(3))
    # distrax marginal mean agrees with the moments
    np.testing.assert_allclose(dist.marginal(0.3, sch).mean(), a * dist.mean(), atol=1e-12)
    # subspace samples
    sub = analytic.random_subspace(jax.random.key(8), 4, 2, cov_u=jnp.asarray([2.0, 0.5]))
    xs = sub.sample(jax.random.key(9), 200_000)
    _assert_moments(xs, sub.mean(), sub.cov())


def test_sample_matches_log_prob_1d():
    # ECDF of 200k samples vs the CDF integrated from exp(log_prob) (Kolmogorov distance)
    dist = analytic.gaussian_mixture([0.3, 0.7], [[-2.0], [1.0]], [0.25, 1.0])
    x = np.sort(np.asarray(dist.sample(jax.random.key(10), 200_000))[:, 0])
    grid = np.linspace(-8, 8, 8001)
    dens = np.exp(np.asarray(dist.log_prob(jnp.asarray(grid)[:, None])))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(grid))])
    assert abs(cdf[-1] - 1.0) < 1e-6
    ecdf = np.searchsorted(x, grid, side="right") / x.size
    assert np.max(np.abs(ecdf - cdf)) < 2.0 / np.sqrt(x.size)


def test_log_prob_t0_matches_distrax():
    w, mu, cov = _gmm_np()
    dist = analytic.gaussian_mixture(w, mu, cov)
    ref = distrax.MixtureSameFamily(
        distrax.Categorical(probs=jnp.asarray(w)),
        distrax.MultivariateNormalFullCovariance(jnp.asarray(mu), jnp.asarray(cov)),
    )
    x = dist.sample(jax.random.key(11), 18)
    np.testing.assert_allclose(dist.log_prob(x), ref.log_prob(x), rtol=1e-10)
    g = analytic.gaussian(mu[0], cov[0])
    np.testing.assert_allclose(g.mean(), mu[0])
    np.testing.assert_allclose(g.cov(), cov[0], atol=1e-12)
    np.testing.assert_allclose(dist.covs, cov, atol=1e-12)
    # subspace: density of the d-dim coordinates
    cov_u = jnp.asarray([[1.0, 0.3], [0.3, 0.5]])
    sub = analytic.random_subspace(jax.random.key(12), 4, 2, cov_u=cov_u)
    xs = sub.sample(jax.random.key(13), 5)
    coords = xs @ sub.basis
    np.testing.assert_allclose(
        sub.log_prob(xs),
        distrax.MultivariateNormalFullCovariance(jnp.zeros(2), cov_u).log_prob(coords),
        rtol=1e-10,
    )


# ------------------------------------------------------------------------------------------
# 6. point mass
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_point_mass_exact(name):
    sch = SCHEDULES[name]()
    pt = jnp.asarray([0.5, -1.0, 2.0])
    pm = analytic.point_mass(pt)
    for t in _times(sch, 4):
        x = 3.0 * jax.random.normal(jax.random.key(14), (18, 3))
        a, s = sch.alpha_sigma(t)
        np.testing.assert_array_equal(pm.x0(x, t, sch), jnp.broadcast_to(pt, x.shape))
        np.testing.assert_allclose(pm.eps(x, t, sch), (x - a * pt) / s, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(pm.predict(x, t, sch, "x0"), jnp.broadcast_to(pt, x.shape))


# ------------------------------------------------------------------------------------------
# classes: conditional predictions and classifier oracles
# ------------------------------------------------------------------------------------------
def test_components_and_class_posteriors():
    sch = schedules.vp_linear()
    dist = _gmm()
    t = 0.5
    x = _test_points(dist, t, sch)
    n = x.shape[0]
    ids = jnp.arange(n) % 3
    eps_c = dist.eps(x, t, sch, component=ids)
    for k in range(3):
        sel = np.asarray(ids == k)
        np.testing.assert_allclose(eps_c[sel], dist.condition(k).eps(x, t, sch)[sel], rtol=1e-12)
        np.testing.assert_allclose(
            dist.log_prob_t(x, t, sch, component=k), dist.condition(k).log_prob_t(x, t, sch)
        )
    # NULL_CLASS = unconditional
    mixed = jnp.where(ids == 1, analytic.NULL_CLASS, ids)
    out = dist.x0(x, t, sch, component=mixed)
    sel = np.asarray(ids == 1)
    np.testing.assert_allclose(out[sel], dist.x0(x, t, sch)[sel], rtol=1e-13)
    # class posteriors: Bayes with the weights, normalised, gradient = score_k - score
    lp = dist.class_log_prob_t(x, t, sch)
    expect = jnp.log(dist.weights) + dist.component_log_prob_t(x, t, sch)
    expect = expect - dist.log_prob_t(x, t, sch)[:, None]
    np.testing.assert_allclose(lp, expect, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dist.responsibilities(x, t, sch).sum(-1), 1.0, rtol=1e-13)
    grad_ref = jax.grad(lambda y: dist.class_log_prob_t(y, t, sch)[jnp.arange(n), ids].sum())(x)
    grad = dist.class_log_prob_grad(x, t, sch, ids)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        grad, dist.score(x, t, sch, component=ids) - dist.score(x, t, sch), rtol=1e-12
    )


def test_as_denoiser():
    sch = schedules.edm()
    dist = _gmm()
    x = _test_points(dist, 1.3, sch)
    n = x.shape[0]
    t = jnp.geomspace(0.01, 50.0, n)
    for p in parametrize.PARAMETRIZATIONS:
        model, params = analytic.as_denoiser(dist, sch, p)
        assert isinstance(model, analytic.AnalyticDenoiser) and params is dist
        assert model.parametrization == p and model.event_shape == (3,)
        np.testing.assert_allclose(model(params, x, t), dist.predict(x, t, sch, p), rtol=1e-13)
        x0, _ = model.x0_eps(params, x, t, None, sch)
        np.testing.assert_allclose(x0, dist.x0(x, t, sch), rtol=1e-9, atol=1e-9)
    # class-conditional: cond = component ids per example (NULL_CLASS = unconditional)
    model, params = analytic.as_denoiser(dist, sch, "x0")
    ids = jnp.arange(n) % 4 - 1
    np.testing.assert_allclose(model(params, x, t, ids), dist.x0(x, t, sch, component=ids))
    # the model is a pytree with the schedule's numbers as leaves: it goes through jit
    f = jax.jit(lambda m, p, y, tt: m(p, y, tt))
    np.testing.assert_allclose(f(model, params, x, t), model(params, x, t), rtol=1e-13)
    sch2 = schedules.edm(sigma_max=60.0)
    assert jax.tree_util.tree_structure(model) == jax.tree_util.tree_structure(
        model.replace(schedule=sch2)
    )
    # event_shape: inputs of shape (batch, *event_shape) are flattened
    m2, _ = analytic.as_denoiser(dist, sch, "eps", event_shape=(3, 1))
    out = m2(params, x.reshape(n, 3, 1), t)
    assert out.shape == (n, 3, 1)
    np.testing.assert_allclose(out.reshape(n, 3), dist.eps(x, t, sch), rtol=1e-13)


# ------------------------------------------------------------------------------------------
# 7. jit / vmap / grad
# ------------------------------------------------------------------------------------------
def test_jit_vmap_grad():
    sch = schedules.vp_linear()
    w, mu, cov = _gmm_np()
    dist = analytic.gaussian_mixture(w, mu, cov)
    x = _test_points(dist, 0.4, sch)
    t = jnp.linspace(0.05, 0.9, x.shape[0])
    eps_t = dist.eps(x, t, sch)
    # per-example times (batch,) agree with scalar-time evaluation, row by row
    for i in (0, 7, x.shape[0] - 1):
        np.testing.assert_allclose(eps_t[i], dist.eps(x, t[i], sch)[i], rtol=1e-12)
    mus = jnp.stack([jnp.asarray(mu) + 0.5 * i for i in range(3)])

    def loss(m, sc):
        return jnp.sum(analytic.gaussian_mixture(w, m, cov).eps(x, t, sc) ** 2)

    model, params = analytic.as_denoiser(dist, sch)

    @jax.jit
    def transformed(d, sc, ms):
        return {
            "jit": d.eps(x, t, sc),
            # vmap over means (distribution built inside) and over a stacked pytree batch
            "vmap_means": jax.vmap(lambda m: analytic.gaussian_mixture(w, m, cov).eps(x, t, sc))(
                ms
            ),
            "vmap_tree": jax.vmap(lambda dd: dd.eps(x, t, sc))(
                jax.vmap(lambda m: d.replace(means=m))(ms)
            ),
            # vmap over schedule parameters
            "vmap_sched": jax.vmap(lambda bm: d.eps(x, t, sc.replace(beta_max=bm)))(
                jnp.asarray([10.0, 20.0])
            ),
            "grad": jax.grad(loss)(d.means, sc),
            # the same gradient through the denoiser's params (params = the distribution)
            "grad_params": jax.grad(lambda p: jnp.sum(model(p, x, t) ** 2))(d).means,
        }

    out = transformed(dist, sch, mus)
    np.testing.assert_allclose(out["jit"], eps_t, rtol=1e-12)
    np.testing.assert_allclose(out["vmap_sched"][1], eps_t, rtol=1e-12)
    for i in range(3):
        ref = dist.replace(means=mus[i]).eps(x, t, sch)
        np.testing.assert_allclose(out["vmap_means"][i], ref, rtol=1e-12)
        np.testing.assert_allclose(out["vmap_tree"][i], ref, rtol=1e-12)
    # grad of sum(eps^2) w.r.t. the means vs central finite differences
    loss_j = jax.jit(loss)
    h = 1e-6
    fd = np.zeros_like(mu)
    for idx in np.ndindex(*mu.shape):
        e = np.zeros_like(mu)
        e[idx] = h
        fd[idx] = (loss_j(jnp.asarray(mu + e), sch) - loss_j(jnp.asarray(mu - e), sch)) / (2 * h)
    np.testing.assert_allclose(out["grad"], fd, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["grad_params"], out["grad"], rtol=1e-10, atol=1e-12)


def test_dtypes():
    with jax.enable_x64(False):
        dist = analytic.ring_mixture()
        assert dist.means.dtype == jnp.float32
        sch = schedules.vp_linear()
        x = jnp.ones((4, 2), jnp.float32)
        assert dist.eps(x, 0.5, sch).dtype == jnp.float32
        out = jax.jit(
            lambda d, y, sc: (
                d.predict(y, 0.5, sc, "velocity"),
                d.score(y, jnp.full((4,), 0.5), sc),
                d.sample(jax.random.key(0), 3),
            )
        )(dist, x, sch)
        assert all(o.dtype == jnp.float32 for o in out)
    dist = analytic.ring_mixture(num=6, radius=3.0, std=0.1, dim=3)
    assert dist.means.dtype == jnp.float64 and dist.means.shape == (6, 3)
    np.testing.assert_allclose(jnp.linalg.norm(dist.means, axis=-1), 3.0)
    np.testing.assert_allclose(dist.weights, 1.0 / 6.0)


# ------------------------------------------------------------------------------------------
# 8. bad input
# ------------------------------------------------------------------------------------------
def test_bad_input_raises():
    w, mu, cov = _gmm_np()
    with pytest.raises(JaxdiffError, match=r"^weights="):
        analytic.gaussian_mixture([0.2, 0.3, 0.6], mu, cov)
    with pytest.raises(JaxdiffError, match=r"^weights="):
        analytic.gaussian_mixture([-0.2, 0.7, 0.5], mu, cov)
    with pytest.raises(JaxdiffError, match=r"^weights="):
        analytic.gaussian_mixture([0.5, 0.5], mu, cov)
    with pytest.raises(JaxdiffError, match=r"^covs="):
        analytic.gaussian_mixture(w, mu, np.ones((3, 2, 2)))
    with pytest.raises(JaxdiffError, match=r"^cov="):
        analytic.gaussian(mu[0], np.ones((2, 3)))
    with pytest.raises(JaxdiffError, match=r"^covs=.*positive semi-definite"):
        analytic.gaussian_mixture(w, mu, np.stack([np.eye(3), np.eye(3), -np.eye(3)]))
    with pytest.raises(JaxdiffError, match=r"^cov=.*symmetric"):
        analytic.gaussian(mu[0], np.triu(np.ones((3, 3))))
    with pytest.raises(JaxdiffError, match=r"^covs=.*nonnegative"):
        analytic.gaussian_mixture(w, mu, np.array([1.0, -1.0, 1.0]))
    with pytest.raises(JaxdiffError, match=r"^means="):
        analytic.gaussian_mixture(w, mu[:, None], cov)
    with pytest.raises(JaxdiffError, match=r"^basis="):
        analytic.linear_subspace(np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(JaxdiffError, match=r"^sub_dim="):
        analytic.random_subspace(jax.random.key(0), 2, 3)

    sch = schedules.vp_linear()
    dist = analytic.gaussian_mixture(w, mu, cov)
    model, params = analytic.as_denoiser(dist, sch)
    bad_x = jnp.ones((4, 2))
    with pytest.raises(JaxdiffError, match=r"^x="):
        model.check_x(bad_x)
    with pytest.raises(JaxdiffError, match=r"^x="):
        model(params, bad_x, 0.5)
    with pytest.raises(JaxdiffError, match=r"^x="):
        dist.eps(bad_x, 0.5, sch)
    x = jnp.ones((4, 3))
    with pytest.raises(JaxdiffError, match=r"^cond=.*unknown id 3"):
        model(params, x, 0.5, jnp.asarray([0, 1, 3, 0]))
    with pytest.raises(JaxdiffError, match=r"^cond="):
        model(params, x, 0.5, jnp.asarray([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(JaxdiffError, match=r"^component="):
        dist.eps(x, 0.5, sch, component=7)
    with pytest.raises(JaxdiffError, match=r"^k="):
        dist.condition(3)
    with pytest.raises(JaxdiffError, match=r"^t="):
        dist.eps(x, 1.5, sch)
    with pytest.raises(JaxdiffError, match=r"^parametrization="):
        dist.predict(x, 0.5, sch, "noise")
    sub = analytic.random_subspace(jax.random.key(0), 3, 1)
    with pytest.raises(JaxdiffError, match=r"^cond="):
        analytic.as_denoiser(sub, sch)[0](sub, x, 0.5, jnp.zeros((4,), jnp.int32))
    with pytest.raises(JaxdiffError, match=r"^event_shape="):
        analytic.as_denoiser(dist, sch, event_shape=(2, 2))
