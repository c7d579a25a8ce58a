"""UniPC and rho-AB-DEIS against exact oracles and independent references (float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import analytic, samplers, schedules
from jaxdiff._checks import JaxdiffError
from jaxdiff.samplers.deis import deis
from jaxdiff.samplers.unipc import unipc

KEY = jax.random.PRNGKey(0)


def _gmm_1d():
    # samplers.md 7.2 GMM: pi = (0.3, 0.7), mu = (-1, 0.8), variances (0.05, 0.1)
    return analytic.gaussian_mixture(
        jnp.array([0.3, 0.7]), jnp.array([[-1.0], [0.8]]), jnp.array([0.05, 0.1])
    )


def _grid(sch, n):
    return samplers.time_grid(sch, n, "log_snr", dtype=jnp.float64)


@jax.jit
def _step(sampler, model, sch, state, s, t, params):
    # sampler/model/schedule are pytrees: one compile per sampler structure, reused for every N
    return sampler.kernel(model, sch).step(KEY, state, s, t, params, None)[0]


def _run(sampler, model, sch, params, x_T, ts):
    """The scan driver written as a Python loop over one jitted step (no recompile per N)."""
    kernel = sampler.kernel(model, sch)
    state = kernel.init(x_T, params, None, ts)
    for i in range(ts.shape[0] - 1):
        state = _step(sampler, model, sch, state, ts[i], ts[i + 1], params)
    return kernel.output(state)


# --------------------------------------------------------------------------------------------
# tiny local references (samplers.md 3.2), written with plain per-step formulas
# --------------------------------------------------------------------------------------------
def _ref_2m_midpoint(model, params, sch, x, ts, orders):
    """DPM-Solver++(2M) "midpoint" (data form); ``orders[k]`` in {1, 2} for step k."""
    lam = sch.lam(ts)
    prev = None
    for k in range(ts.shape[0] - 1):
        s, t = ts[k], ts[k + 1]
        h = lam[k + 1] - lam[k]
        m0, _ = model.x0_eps(params, x, s, None, sch)
        a_t, sig_t = sch.alpha_sigma(t)
        d = m0
        if orders[k] == 2:
            r0 = (lam[k] - lam[k - 1]) / h
            d = m0 + 0.5 * (m0 - prev) / r0
        x = (sig_t / sch.sigma(s)) * x - a_t * jnp.expm1(-h) * d
        prev = m0
    return x


def _ref_noise_multistep(model, params, sch, x, ts, orders):
    """Noise-form multistep: 2M "taylor" and 3M with the exact (c = 2) coefficient."""
    lam = sch.lam(ts)
    hist = []
    for k in range(ts.shape[0] - 1):
        s, t = ts[k], ts[k + 1]
        h = lam[k + 1] - lam[k]
        _, e0 = model.x0_eps(params, x, s, None, sch)
        a_t, sig_t = sch.alpha_sigma(t)
        psi2 = jnp.expm1(h) / h - 1.0
        psi3 = (jnp.expm1(h) - h) / h**2 - 0.5
        x = (a_t / sch.alpha(s)) * x - sig_t * jnp.expm1(h) * e0
        if orders[k] == 2:
            r0 = (lam[k] - lam[k - 1]) / h
            x = x - sig_t * psi2 * (e0 - hist[-1]) / r0
        elif orders[k] == 3:
            r0 = (lam[k] - lam[k - 1]) / h
            r1 = (lam[k - 1] - lam[k - 2]) / h
            d0 = (e0 - hist[-1]) / r0
            d1 = (hist[-1] - hist[-2]) / r1
            big_d1 = d0 + r0 / (r0 + r1) * (d0 - d1)
            big_d2 = (d0 - d1) / (r0 + r1)
            x = x - sig_t * psi2 * big_d1 - 2.0 * sig_t * psi3 * big_d2
        hist.append(e0)
    return x


@functools.cache
def _order_setup():
    # samplers.md 7.2 setup; the reference solve is computed once per module
    with jax.enable_x64(True):
        sch = schedules.vp_linear()
        model, params = analytic.as_denoiser(_gmm_1d(), sch, parametrization="eps")
        x_T = jax.random.normal(jax.random.PRNGKey(0), (64, 1), jnp.float64)
        ode = samplers.pf_ode(rtol=1e-12, atol=1e-12, max_steps=100_000)
        ref = jaxdiff.sample(KEY, model, params, sch, x_T, ode, ts=jnp.array([1.0, 1e-3]))
        return sch, model, params, x_T, ref


N_ID = 9


@pytest.mark.parametrize(
    "name, sampler, ref, orders",
    [
        ("unip1_ddim", unipc(1, corrector=False), "ddim", None),
        ("unip1_bh1_ddim", unipc(1, "bh1", corrector=False), "ddim", None),
        ("deis1_ddim", deis(1), "ddim", None),
        ("unip2_bh2_2m", unipc(2, corrector=False, lower_order_final=False), "2m", [1] + [2] * (N_ID - 1)),
        ("unip2_bh2_2m_lof", unipc(2, corrector=False, lower_order_final=True), "2m",
         [1] + [2] * (N_ID - 2) + [1]),
        ("deis2_taylor", deis(2, lower_order_final=False), "noise", [1] + [2] * (N_ID - 1)),
        ("deis3_3m_c2", deis(3, lower_order_final=False), "noise", [1, 2] + [3] * (N_ID - 2)),
        ("deis3_lof", deis(3, lower_order_final=True), "noise", [1, 2] + [3] * (N_ID - 4) + [2, 1]),
    ],
)  # fmt: skip
def test_identities(x64, name, sampler, ref, orders):
    # samplers.md 7.1: UniP-1 = DEIS-1 = DDIM; UniP-2 (bh2) = DPM-Solver++(2M) midpoint;
    # DEIS-2 = noise-form 2M "taylor"; DEIS-3 = noise-form 3M with c = 2
    sch, model, params, x_T, _ = _order_setup()
    ts = _grid(sch, N_ID)
    got = _run(sampler, model, sch, params, x_T, ts)
    if ref == "ddim":
        want = _run(samplers.ddim(), model, sch, params, x_T, ts)
    elif ref == "2m":
        want = _ref_2m_midpoint(model, params, sch, x_T, ts, orders)
    else:
        want = _ref_noise_multistep(model, params, sch, x_T, ts, orders)
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


POINT_MASS_SAMPLERS = {
    "unipc1": unipc(1),
    "unipc2_bh1": unipc(2, "bh1"),
    "unipc3": unipc(3),
    "unipc3_lof": unipc(3, lower_order_final=True),
    "unipc2_noise": unipc(2, predict_x0=False),
    "deis2": deis(2),
    "deis3": deis(3),
}


@pytest.mark.parametrize("name", list(POINT_MASS_SAMPLERS))
def test_exact_on_point_mass(x64, name):
    # samplers.md 7.1: x0* is constant, so every step is exact, for any N
    sch = schedules.vp_linear()
    mu = jnp.array([0.7, -0.3])
    model, params = analytic.as_denoiser(analytic.point_mass(mu), sch, parametrization="eps")
    x_T = jax.random.normal(jax.random.PRNGKey(2), (4, 2))
    for n in (1, 2, 5):
        ts = _grid(sch, n)
        a_T, s_T = sch.alpha_sigma(ts[0])
        a_E, s_E = sch.alpha_sigma(ts[-1])
        exact = a_E * mu + (s_E / s_T) * (x_T - a_T * mu)
        got = _run(POINT_MASS_SAMPLERS[name], model, sch, params, x_T, ts)
        assert float(jnp.max(jnp.abs(got - exact))) <= 1e-9, (name, n)


# --------------------------------------------------------------------------------------------
# measured global orders (samplers.md 7.2 / 7.3)
# --------------------------------------------------------------------------------------------
LOW, HIGH = [32, 64, 128, 256], [64, 128, 256, 512]


@pytest.mark.parametrize(
    "name, sampler, ns, expected",
    [
        ("unipc_bh2_p1", unipc(1, "bh2"), [64, 128, 256, 512], 2.0),
        ("unipc_bh2_p2", unipc(2, "bh2"), HIGH, 3.0),
        ("unipc_bh1_p2", unipc(2, "bh1"), HIGH, 3.0),
        ("unip2_no_corrector", unipc(2, corrector=False), LOW, 2.0),
        ("deis2", deis(2), HIGH, 2.0),
        ("deis3", deis(3), HIGH, 3.0),
    ],
)
def test_global_order(x64, name, sampler, ns, expected):
    sch, model, params, x_T, ref = _order_setup()
    errs = []
    for n in ns:
        y = _run(sampler, model, sch, params, x_T, _grid(sch, n))
        errs.append(float(jnp.sqrt(jnp.mean((y - ref) ** 2))))
    order = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(order - expected) < 0.15, (name, order, errs)


def test_python_loop_runner_is_the_scan_driver(x64):
    # the order tests use _run (one compile for all N); it must agree with jaxdiff.sample
    sch, model, params, x_T, _ = _order_setup()
    for sampler in (unipc(2), deis(3)):
        ts = _grid(sch, 12)
        want = jaxdiff.sample(KEY, model, params, sch, x_T, sampler, ts=ts)
        np.testing.assert_allclose(
            _run(sampler, model, sch, params, x_T, ts), want, rtol=1e-12, atol=1e-13
        )


# --------------------------------------------------------------------------------------------
# regression (samplers.md 7.2 portable values)
# --------------------------------------------------------------------------------------------
A_STAR = 0.547801088331


def test_unipc_bh2_p2_regression_values(x64):
    sch = schedules.vp_linear()
    dist = analytic.gaussian(jnp.array([0.5]), jnp.array([[0.3]]))
    model, params = analytic.as_denoiser(dist, sch, parametrization="eps")
    x = jnp.array([[0.0], [1.0]])
    for n, want in [(10, 2.404271e-2), (20, 4.447643e-3), (40, 6.095696e-4)]:
        y = _run(unipc(2, "bh2", lower_order_final=False), model, sch, params, x, _grid(sch, n))
        np.testing.assert_allclose(float(y[1, 0] - y[0, 0]) - A_STAR, want, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# bad input, defaults, contract
# --------------------------------------------------------------------------------------------
def test_bad_input():
    with pytest.raises(JaxdiffError, match="order=4"):
        unipc(order=4)
    with pytest.raises(JaxdiffError, match="solver_type='bh3'"):
        unipc(solver_type="bh3")
    with pytest.raises(JaxdiffError, match="order=0"):
        deis(order=0)
    with pytest.raises(JaxdiffError, match="order=True"):
        deis(order=True)
    sch, model, params = _contract_setup()
    # the classes validate too, when bound to a model
    with pytest.raises(JaxdiffError, match="order=5"):
        type(unipc())(order=5).kernel(model, sch)
    with pytest.raises(JaxdiffError, match="solver_type='x'"):
        type(unipc())(solver_type="x").kernel(model, sch)
    with pytest.raises(JaxdiffError, match="order=7"):
        type(deis())(order=7).kernel(model, sch)
    # min_steps = 1 (warm-up by lower orders): steps=0 is rejected, steps=1 runs
    for sampler in (unipc(3), deis(3)):
        assert sampler.min_steps == 1 and sampler.nfe_per_step == 1
        assert sampler.default_grid == "auto"  # per budget: jaxdiff.samplers.grids.budget_grid
        with pytest.raises(JaxdiffError, match="steps=0"):
            jaxdiff.sample(KEY, model, params, sch, (2, 2), sampler, 0)


def test_nfe_is_one_per_step():
    calls = []
    sch = schedules.vp_linear()

    def apply(p, x, t, c):
        calls.append(1)
        return p * x

    model = jaxdiff.denoiser.Denoiser(apply=apply, parametrization="eps", event_shape=(2,))
    for sampler in (unipc(3), deis(3)):
        calls.clear()
        y, info = jaxdiff.sample(
            KEY, model, jnp.float32(0.1), sch, (4, 2), sampler, 7, return_info=True
        )
        assert int(info.nfe) == 7
        assert len(calls) == 1  # one model call traced inside the scan body
        assert info.steps == {}
        assert y.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y)))


def _contract_setup():
    sch = schedules.vp_linear()
    dist = analytic.gaussian_mixture(
        jnp.array([0.3, 0.7]), jnp.array([[-1.0, 0.5], [1.0, 0.0]]), jnp.array([0.1, 0.2])
    )
    model, params = analytic.as_denoiser(dist, sch)
    return sch, model, params
