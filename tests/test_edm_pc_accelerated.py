"""EDM Euler/Heun, predictor-corrector and Li et al. accelerated samplers vs exact oracles.

float64 throughout (``x64`` fixture). Order tests follow samplers.md 7.2: VP-linear from t=1 to
t=1e-3, 1-D GMM ``pi=(0.3, 0.7), mu=(-1, 0.8), var=(0.05, 0.1)``, RMS endpoint error over 64
fixed x_T against a tight diffrax PF-ODE solve. To keep compile time down, grids of different N
are padded with repeated ``t_end`` to one length: a zero-length step is the identity for these
deterministic samplers (and for the SDE samplers compared here: their step's beta is 0).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import analytic, samplers, schedules
from jaxdiff._checks import JaxdiffError
from jaxdiff.samplers.accelerated import accelerated_ode, accelerated_sde, vanilla_sde
from jaxdiff.samplers.classic import DDIM
from jaxdiff.samplers.edm import euler, heun
from jaxdiff.samplers.pc import predictor_corrector

A_STAR = 0.547801088331  # samplers.md 7.2: exact endpoint map of N(0.5, 0.3), t: 1 -> 1e-3


def _pad(ts, length):
    return jnp.concatenate([ts, jnp.full((length - ts.shape[0],), ts[-1], ts.dtype)])


def _gmm():
    return analytic.gaussian_mixture(
        jnp.array([0.3, 0.7]), jnp.array([[-1.0], [0.8]]), jnp.array([0.05, 0.1])
    )


@functools.lru_cache(maxsize=1)
def _gmm_reference():
    """(x_T (64, 1), exact endpoint) for the GMM, computed once per module (float64)."""
    with jax.enable_x64(True):
        sch = schedules.vp_linear()
        model, params = analytic.as_denoiser(_gmm(), sch)
        x_T = jax.random.normal(jax.random.PRNGKey(11), (64, 1), jnp.float64)
        ode = samplers.pf_ode(rtol=1e-12, atol=1e-12, max_steps=100_000)
        ref = jaxdiff.sample(jax.random.PRNGKey(0), model, params, sch, x_T, ode, 1)
        return np.asarray(x_T), np.asarray(ref)


def _measured_order(sampler, ns, grid):
    sch = schedules.vp_linear()
    model, params = analytic.as_denoiser(_gmm(), sch)
    x_T, ref = _gmm_reference()
    x_T = jnp.asarray(x_T)
    run = jax.jit(
        lambda ts: samplers.solve(jax.random.PRNGKey(0), model, params, sch, x_T, ts, sampler)[0]
    )
    errs = []
    for n in ns:
        ts = _pad(samplers.time_grid(sch, n, grid), max(ns) + 1)
        errs.append(float(jnp.sqrt(jnp.mean((run(ts) - ref) ** 2))))
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0], errs


# --------------------------------------------------------------------------------------------
# identities and exactness
# --------------------------------------------------------------------------------------------
def test_euler_equals_ddim_on_the_same_grid(x64):
    sch = schedules.vp_linear()
    model, params = analytic.as_denoiser(_gmm(), sch, parametrization="v")
    x_T = jax.random.normal(jax.random.PRNGKey(2), (16, 1))
    ts = samplers.time_grid(sch, 13, "karras")
    a = jaxdiff.sample(jax.random.PRNGKey(0), model, params, sch, x_T, euler(), ts=ts)
    b = jaxdiff.sample(jax.random.PRNGKey(0), model, params, sch, x_T, samplers.ddim(), ts=ts)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "sampler", [euler(), heun(), accelerated_ode()], ids=["euler", "heun", "accelerated_ode"]
)
def test_point_mass_exact_for_any_n(x64, sampler):
    # samplers.md 7.1: exact endpoint alpha_E mu + (sigma_E/sigma_T)(x_T - alpha_T mu), any N
    sch = schedules.vp_linear()
    mu = jnp.array([0.7, -0.3])
    model, params = analytic.as_denoiser(analytic.point_mass(mu), sch)
    x_T = jax.random.normal(jax.random.PRNGKey(3), (5, 2))
    a_T, s_T = sch.alpha_sigma(1.0)
    a_E, s_E = sch.alpha_sigma(1e-3)
    exact = a_E * mu + (s_E / s_T) * (x_T - a_T * mu)
    run = jax.jit(
        lambda ts: samplers.solve(jax.random.PRNGKey(0), model, params, sch, x_T, ts, sampler)[0]
    )
    for n in (1, 2, 5):
        kind = samplers.grids.default_kind(sch, sampler.default_grid, n)
        ts = _pad(samplers.time_grid(sch, n, kind), 6)
        np.testing.assert_allclose(run(ts), exact, rtol=0, atol=1e-9, err_msg=f"N={n}")


def test_edm_heun_regression_values(x64):
    # samplers.md 7.2 portable values: Karras grid between sigma_tilde(1) and sigma_tilde(1e-3);
    # they are reproduced with the Heun stage on every step (final_euler=False)
    sch = schedules.vp_linear()
    dist = analytic.gaussian(jnp.array([0.5]), jnp.array([[0.3]]))
    model, params = analytic.as_denoiser(dist, sch, parametrization="eps")
    x = jnp.array([[0.0], [1.0]])
    run = jax.jit(
        lambda ts: samplers.solve(
            jax.random.PRNGKey(0), model, params, sch, x, ts, heun(final_euler=False)
        )[0]
    )
    for n, want in [(10, 1.022320e-1), (20, 2.306066e-2), (40, 5.453215e-3)]:
        y = run(_pad(samplers.time_grid(sch, n, "karras"), 41))
        np.testing.assert_allclose(float(y[1, 0] - y[0, 0]) - A_STAR, want, rtol=1e-4)


def test_accelerated_ode_matches_the_literal_arcsin_formula(x64):
    # the stable arctan form == the authors' README/code expression (samplers.md 4)
    sch = schedules.vp_linear()
    model, params = analytic.as_denoiser(_gmm(), sch)
    x = jax.random.normal(jax.random.PRNGKey(4), (8, 1))
    ts = jnp.array([0.9, 0.6, 0.35])
    k = accelerated_ode(lower_order_final=False).kernel(model, sch)
    state = k.init(x, params, None, ts)
    state, _ = k.step(None, state, ts[0], ts[1], params, None)
    state, _ = k.step(None, state, ts[1], ts[2], params, None)

    ab = lambda t: sch.alpha(t) ** 2  # noqa: E731
    rho = lambda t: jnp.sqrt(1 - ab(t)) / jnp.sqrt(ab(t))  # noqa: E731

    def ddim(x, eps, s, t):
        r = jnp.sqrt(ab(t) / ab(s))
        return r * x + (jnp.sqrt(1 - ab(t)) - r * jnp.sqrt(1 - ab(s))) * eps

    e0 = model.x0_eps(params, x, ts[0], None, sch)[1]
    x1 = ddim(x, e0, ts[0], ts[1])
    e1 = model.x0_eps(params, x1, ts[1], None, sch)[1]
    p, c, n = ts[0], ts[1], ts[2]  # their t+1, t, t-1
    bracket = (
        ab(c) * rho(n) + jnp.arcsin(jnp.sqrt(ab(n))) - ab(c) * rho(c) - jnp.arcsin(jnp.sqrt(ab(c)))
    )
    x2 = ddim(x1, e1, c, n) + jnp.sqrt(ab(n)) / (ab(c) - ab(p)) * bracket * (e0 - e1)
    np.testing.assert_allclose(k.output(state), x2, rtol=1e-12, atol=1e-13)
    assert float(jnp.max(jnp.abs(x2 - ddim(x1, e1, c, n)))) > 1e-4  # the correction is active


# --------------------------------------------------------------------------------------------
# measured orders (samplers.md 7.2: Euler 1.01, Heun 2.01, accelerated ODE 1.93 on the GMM)
# --------------------------------------------------------------------------------------------
def test_order_euler(x64):
    # DDIM's order on the GMM is non-monotone below N ~ 100 (samplers.md 7.2)
    order, errs = _measured_order(euler(), [128, 256, 512, 1024], "log_snr")
    assert abs(order - 1.0) < 0.15, (order, errs)


def test_order_heun(x64):
    order, errs = _measured_order(heun(), [32, 64, 128, 256], "karras")
    assert abs(order - 2.0) < 0.15, (order, errs)


def test_order_accelerated_ode(x64):
    order, errs = _measured_order(accelerated_ode(), [64, 128, 256, 512], "log_snr")
    assert abs(order - 2.0) < 0.15, (order, errs)


# --------------------------------------------------------------------------------------------
# stochastic samplers: Monte Carlo moments vs the exact marginal at t_end
# --------------------------------------------------------------------------------------------
def _exact_moments(mean=0.5, var=0.3):
    a, s = schedules.vp_linear().alpha_sigma(1e-3)
    return float(a * mean), float(a**2 * var + s**2)


def _marginal_at_1(n, dim=1, key=3):
    a, s = schedules.vp_linear().alpha_sigma(1.0)
    z = jax.random.normal(jax.random.PRNGKey(key), (n, dim))
    return a * 0.5 + jnp.sqrt(a**2 * 0.3 + s**2) * z


def _moment_errors(sampler, ts, x0, key, dim=1):
    sch = schedules.vp_linear()
    dist = analytic.gaussian(jnp.full((dim,), 0.5), 0.3)
    model, params = analytic.as_denoiser(dist, sch)
    y = _solve_jit(key, model, params, sch, x0, ts, sampler)
    m, v = _exact_moments()
    return float(jnp.mean(y)) - m, float(jnp.var(y)) - v


@jax.jit
def _solve_jit(key, model, params, sch, x0, ts, sampler):
    return samplers.solve(key, model, params, sch, x0, ts, sampler)[0]


def test_accelerated_sde_beats_ddpm_and_vanilla(x64):
    # samplers.md 7.2: N * dvar -> -2.87 (DDPM), +2.88 (vanilla), -0.885 (accelerated), lambda grid
    sch = schedules.vp_linear()
    n = 100_000
    x0 = _marginal_at_1(n)
    mc_var = float(np.sqrt(2.0 / n)) * _exact_moments()[1]  # ~1e-3
    dvar = {}
    for name, sampler in [
        ("ddpm", samplers.ddpm()),
        ("vanilla", vanilla_sde()),
        ("accelerated", accelerated_sde()),
    ]:
        for steps in (16, 32, 64):
            ts = _pad(samplers.time_grid(sch, steps, "log_snr"), 65)
            dm, dv = _moment_errors(sampler, ts, x0, jax.random.PRNGKey(steps))
            assert abs(dm) < 5 * float(np.sqrt(0.31 / n)), (name, steps, dm)
            dvar[name, steps] = dv
    for steps in (16, 32, 64):
        acc = abs(dvar["accelerated", steps])
        assert acc < abs(dvar["ddpm", steps]) - 3 * mc_var, (steps, dvar)
        assert acc < abs(dvar["vanilla", steps]) - 3 * mc_var, (steps, dvar)
    assert abs(dvar["accelerated", 32]) < abs(dvar["accelerated", 16]) - 2 * mc_var, dvar
    assert abs(dvar["accelerated", 64]) < abs(dvar["accelerated", 32]) - 2 * mc_var, dvar


def test_heun_churn_moments_converge(x64):
    sch = schedules.vp_linear()
    n = 100_000
    x0 = _marginal_at_1(n)
    errs = []
    for steps in (8, 16, 32):
        ts = samplers.time_grid(sch, steps, "karras")
        errs.append(_moment_errors(heun(s_churn=5.0), ts, x0, jax.random.PRNGKey(steps)))
    dv = [abs(e[1]) for e in errs]
    assert dv[0] > dv[1] > dv[2], errs
    assert dv[2] < 0.03 and all(abs(e[0]) < 0.01 for e in errs), errs


def test_pc_moments_at_64_steps(x64):
    # Per-sample norms need D >> 1 (in 1-D the step 2 a (r |z| / |score|)^2 is heavy-tailed and
    # blows up), so this uses N(0.5, 0.3 I) in D = 32; score_sde's uniform-in-t grid.
    sch = schedules.vp_linear()
    n, dim = 25_000, 32  # 800k scalar draws
    x0 = _marginal_at_1(n, dim)
    ts = samplers.time_grid(sch, 64, "uniform")
    dm, dv = _moment_errors(predictor_corrector(), ts, x0, jax.random.PRNGKey(1), dim)
    m, v = _exact_moments()
    mc_mean, mc_var = np.sqrt(v / (n * dim)), np.sqrt(2.0 / (n * dim)) * v
    assert abs(dm) < 3 * mc_mean + 0.02 and abs(dv) < 3 * mc_var + 0.02, (dm, dv)


def test_pc_step_size_is_per_sample():
    # example i's result must not depend on the rest of the batch (same key, batch 3 vs 9)
    sch = schedules.vp_linear()
    dist = analytic.gaussian_mixture(
        jnp.array([0.3, 0.7]), jnp.array([[-1.0, 0.5], [1.0, 0.0]]), jnp.array([0.1, 0.2])
    )
    model, params = analytic.as_denoiser(dist, sch)
    key = jax.random.PRNGKey(7)
    pc = predictor_corrector(n_corrector_steps=2, snr=0.3)
    small = jaxdiff.sample(key, model, params, sch, (3, 2), pc, 6)
    big = jaxdiff.sample(key, model, params, sch, (9, 2), pc, 6)
    np.testing.assert_allclose(small, big[:3], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# bad input, flags
# --------------------------------------------------------------------------------------------
def test_bad_input_and_flags():
    with pytest.raises(JaxdiffError, match="s_churn=-1"):
        heun(s_churn=-1.0)
    with pytest.raises(JaxdiffError, match="s_noise"):
        heun(s_noise=-0.5)
    with pytest.raises(JaxdiffError, match="s_tmax"):
        heun(s_tmin=2.0, s_tmax=1.0)
    with pytest.raises(JaxdiffError, match="snr=-0.1"):
        predictor_corrector(snr=-0.1)
    with pytest.raises(JaxdiffError, match="n_corrector_steps=0"):
        predictor_corrector(n_corrector_steps=0)
    with pytest.raises(JaxdiffError, match="predictor="):
        predictor_corrector(predictor="ddpm")
    ve = schedules.ve()
    model, params = analytic.as_denoiser(analytic.gaussian(jnp.zeros(2), 1.0), ve)
    for make in (accelerated_ode, accelerated_sde, vanilla_sde):
        with pytest.raises(JaxdiffError, match="schedule='VE'"):
            jaxdiff.sample(jax.random.PRNGKey(0), model, params, ve, (4, 2), make(), 5)
    # a predictor whose state is not x is refused by name
    with pytest.raises(JaxdiffError, match="predictor="):
        jaxdiff.sample(
            jax.random.PRNGKey(0), model, params, ve, (4, 2), predictor_corrector(heun()), 5
        )

    assert not heun().stochastic and heun(s_churn=1.0).stochastic and not euler().stochastic
    assert heun().nfe_per_step == 2 and heun().default_grid == "karras"
    assert predictor_corrector(n_corrector_steps=3).nfe_per_step == 4
    assert accelerated_sde().stochastic and not accelerated_ode().stochastic


def test_pc_inherits_min_steps():
    class ThreeStep(DDIM):
        min_steps = 3

    sch = schedules.vp_linear()
    model, params = analytic.as_denoiser(analytic.gaussian(jnp.zeros(2), 1.0), sch)
    pc = predictor_corrector(ThreeStep())
    assert pc.min_steps == 3
    with pytest.raises(JaxdiffError, match="steps=2"):
        jaxdiff.sample(jax.random.PRNGKey(0), model, params, sch, (4, 2), pc, 2)
    _, info = jaxdiff.sample(
        jax.random.PRNGKey(0), model, params, sch, (4, 2), pc, 3, return_info=True
    )
    assert int(info.nfe) == 3 * 2


def test_churn_numbers_do_not_recompile(x64):
    traces = []
    sch = schedules.vp_linear()
    model, params = analytic.as_denoiser(analytic.gaussian(jnp.zeros(2), 1.0), sch)

    @jax.jit
    def run(sampler):
        traces.append(1)
        return samplers.solve(
            jax.random.PRNGKey(0),
            model,
            params,
            sch,
            jnp.ones((2, 2)),
            samplers.time_grid(sch, 4),
            sampler,
        )[0]

    run(heun(s_churn=1.0, s_noise=1.003))
    run(heun(s_churn=2.0, s_tmin=0.1, s_tmax=10.0))
    run(predictor_corrector(snr=0.1))
    run(predictor_corrector(snr=0.2))
    assert len(traces) == 2
