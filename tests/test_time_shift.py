"""Time-shift sampler (arXiv 2305.15583): plain DDIM when off, and the exact variance match on
data with zero per-example spread (a point mass at 0, where the paper's criterion is exact)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import analytic, samplers, schedules
from jaxdiff._checks import JaxdiffError
from jaxdiff.samplers.time_shift import matched_time, time_shift

KEY = jax.random.PRNGKey(0)


def _gmm(sch):
    dist = analytic.gaussian_mixture(
        jnp.array([0.4, 0.6]),
        jnp.array([[-1.0, 0.5, 0.2], [1.0, 0.0, -0.3]]),
        jnp.array([0.1, 0.2]),
    )
    return analytic.as_denoiser(dist, sch)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_off_is_ddim(x64, eta):
    sch = schedules.vp_discrete()
    model, params = _gmm(sch)
    x_T = samplers.prior_sample(jax.random.PRNGKey(1), sch, (16, 3), jnp.float64)
    want = jaxdiff.sample(KEY, model, params, sch, x_T, samplers.ddim(eta), 12)
    for smp in (time_shift(eta, window=0.0, cutoff=0.0), time_shift(eta, window=0.2, cutoff=1.0)):
        got = jaxdiff.sample(KEY, model, params, sch, x_T, smp, 12, grid="uniform")
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


def test_point_mass_variance_is_matched_exactly(x64):
    # x0 = 0: the exact path is x_t = (sigma_t/sigma_T) x_T and DDIM follows it; a start 1.1x
    # too noisy stays 1.21x too noisy in variance. With the shift, after each step the network is
    # queried at tau with sigma_tau^2 = Var_d(x) (inside the window), so the next DDIM step
    # lands exactly on Var_d(x_t) = sigma_t^2 per example.
    sch = schedules.vp_linear()
    dim = 512
    model, params = analytic.as_denoiser(analytic.point_mass(jnp.zeros(dim)), sch)
    x_T = 1.1 * jax.random.normal(jax.random.PRNGKey(3), (4, dim), jnp.float64)
    ts = samplers.time_grid(sch, 10, "uniform", dtype=jnp.float64)
    _, sig_end = sch.alpha_sigma(ts[-1])
    var = lambda x: jnp.var(x, axis=1)  # noqa: E731
    plain = jaxdiff.sample(KEY, model, params, sch, x_T, samplers.ddim(), ts=ts)
    assert float(jnp.min(var(plain) / sig_end**2)) > 1.1
    smp = time_shift(window=1.0, cutoff=0.0)
    x, info = samplers.solve(KEY, model, params, sch, x_T, ts, smp)
    np.testing.assert_allclose(var(x), sig_end**2, rtol=1e-9)
    # the reported model times: sigma_tau^2 = Var_d(x) at every step where tau is interior
    t_model = info.steps["t_model"]
    assert t_model.shape == (10, 4)
    kern = smp.kernel(model, sch)
    state = kern.init(x_T, params, None, ts)
    for i in range(5):
        state, inf = kern.step(KEY, state, ts[i], ts[i + 1], params, None)
        v = var(state["x"])
        tau = inf["t_model"]
        _, s_tau = sch.alpha_sigma(tau)
        inside = (tau < sch.t_max - 1e-12) & (tau > ts[i + 1] - 0.5)
        np.testing.assert_allclose(jnp.where(inside, s_tau**2, v), v, rtol=1e-10)
    assert bool(jnp.all(tau > ts[5] + 1e-6))  # shifted to a noisier time than nominal


def test_matched_time_is_the_window_argmin(x64):
    # brute force over a fine window grid
    sch = schedules.vp_discrete()
    v = jnp.array([0.05, 0.3, 0.5, 0.8, 1.2, -0.1])
    t_next, w = 0.45, 0.2
    got = matched_time(sch, v, jnp.asarray(t_next), w)
    taus = jnp.linspace(t_next - w / 2, t_next + w / 2, 20001)
    _, s = sch.alpha_sigma(taus)
    best = taus[jnp.argmin((v[:, None] - s[None] ** 2) ** 2, axis=1)]
    np.testing.assert_allclose(got, best, atol=2e-5)


def test_bad_input():
    with pytest.raises(JaxdiffError, match="schedule='VE"):
        sch = schedules.ve()
        model, params = _gmm(sch)
        x_T = samplers.prior_sample(KEY, sch, (2, 3))
        jaxdiff.sample(KEY, model, params, sch, x_T, time_shift(), 4)
    with pytest.raises(JaxdiffError, match="window=-0.1"):
        time_shift(window=-0.1)
    with pytest.raises(JaxdiffError, match="cutoff=2"):
        time_shift(cutoff=2)
    with pytest.raises(JaxdiffError, match="eta=1.5"):
        time_shift(eta=1.5)


def test_window_wider_than_the_steps_still_steps_forward(x64):
    # a window wider than two grid steps: the shifted time stays above the next step's midpoint
    # (before that guard, a step from a time below its target produced NaN)
    sch = schedules.vp_discrete()
    model, params = _gmm(sch)
    x_T = 2.0 * samplers.prior_sample(jax.random.PRNGKey(1), sch, (8, 3), jnp.float64)
    ts = samplers.time_grid(sch, 20, "uniform", dtype=jnp.float64)
    x, info = samplers.solve(KEY, model, params, sch, x_T, ts, time_shift(window=0.3, cutoff=0.0))
    assert bool(jnp.all(jnp.isfinite(x)))
    t_model = info.steps["t_model"][:-1]
    assert bool(jnp.all(t_model >= 0.5 * (ts[1:-1] + ts[2:])[:, None] - 1e-12))
    assert bool(jnp.any(t_model > ts[1:-1][:, None] + 1e-6))  # it does shift
