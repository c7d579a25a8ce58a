"""Momentum samplers (GHVB and heavy-ball DPM-Solver++, arXiv 2307.11118) against oracles:
DDIM and DPM-Solver++(2M) at beta = 1, an independent per-step Adams-Bashforth reference, exact
steps on point-mass data, and measured global orders on the exact PF-ODE solution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import analytic, samplers, schedules
from jaxdiff._checks import JaxdiffError
from jaxdiff.samplers.momentum import ghvb, ghvb_weights, heavy_ball

KEY = jax.random.PRNGKey(0)


@functools.cache
def _setup():
    with jax.enable_x64(True):
        sch = schedules.vp_linear()
        dist = analytic.gaussian_mixture(
            jnp.array([0.3, 0.7]), jnp.array([[-1.0], [0.8]]), jnp.array([0.05, 0.1])
        )
        model, params = analytic.as_denoiser(dist, sch, parametrization="eps")
        x_T = jax.random.normal(jax.random.PRNGKey(0), (64, 1), jnp.float64)
        ode = samplers.pf_ode(rtol=1e-12, atol=1e-12, max_steps=100_000)
        ref = jaxdiff.sample(KEY, model, params, sch, x_T, ode, ts=jnp.array([1.0, 1e-3]))
        return sch, model, params, x_T, ref


def _grid(sch, n):
    return samplers.time_grid(sch, n, "log_snr", dtype=jnp.float64)


@jax.jit
def _step(sampler, model, sch, state, s, t, params):
    return sampler.kernel(model, sch).step(KEY, state, s, t, params, None)[0]


def _run(sampler, model, sch, params, x_T, ts):
    kernel = sampler.kernel(model, sch)
    state = kernel.init(x_T, params, None, ts)
    for i in range(ts.shape[0] - 1):
        state = _step(sampler, model, sch, state, ts[i], ts[i + 1], params)
    return kernel.output(state)


def _ref_ghvb(model, params, sch, x, ts, k, beta):
    """Per-step reference written from the paper's rules with numpy weights (warm-up by lower
    orders, no lower-order final steps)."""
    tab = {
        1: [1.0],
        2: [(2 + beta) / (2 * beta), -(2 - beta) / (2 * beta)],
        3: [
            (18 + 5 * beta) / (12 * beta),
            -(24 - 8 * beta) / (12 * beta),
            (6 - beta) / (12 * beta),
        ],
    }
    vs = []
    for n in range(ts.shape[0] - 1):
        s, t = ts[n], ts[n + 1]
        _, e = model.x0_eps(params, x, s, None, sch)
        vs.insert(0, e if n == 0 else (1 - beta) * vs[0] + beta * e)
        p = min(k, n + 1)
        slope = sum(w * v for w, v in zip(tab[p], vs[:p], strict=True))
        (a_s, s_s), (a_t, s_t) = sch.alpha_sigma(s), sch.alpha_sigma(t)
        x = a_t * (x / a_s + (s_t / a_t - s_s / a_s) * slope)
    return x


def test_beta_one_is_ddim_and_dpm_solver_pp(x64):
    sch, model, params, x_T, _ = _setup()
    for n in (1, 4, 9):
        ts = _grid(sch, n)
        want = jaxdiff.sample(KEY, model, params, sch, x_T, samplers.ddim(), ts=ts)
        got = jaxdiff.sample(KEY, model, params, sch, x_T, ghvb(1), ts=ts)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
        for lof in (False, True):
            want = jaxdiff.sample(
                KEY,
                model,
                params,
                sch,
                x_T,
                samplers.dpm_solver_pp(2, lower_order_final=lof),
                ts=ts,
            )
            got = jaxdiff.sample(KEY, model, params, sch, x_T, heavy_ball(1.0, lof), ts=ts)
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


def test_final_lowered_steps_take_no_momentum(x64):
    # lower_order_final: the last step is a DDIM step from the current state, so two steps of
    # any GHVB / heavy ball are two DDIM steps; without it the momentum acts on the last step
    sch, model, params, x_T, _ = _setup()
    ts = _grid(sch, 2)
    want = jaxdiff.sample(KEY, model, params, sch, x_T, samplers.ddim(), ts=ts)
    for smp in (ghvb(2.8), ghvb(1.5), heavy_ball(0.7)):
        got = jaxdiff.sample(KEY, model, params, sch, x_T, smp, ts=ts)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
        off = jaxdiff.sample(
            KEY, model, params, sch, x_T, smp.replace(lower_order_final=False), ts=ts
        )
        assert float(jnp.max(jnp.abs(off - want))) > 1e-3


@pytest.mark.parametrize("order", [1.5, 2.0, 2.8, 3.0])
def test_ghvb_matches_independent_reference(x64, order):
    sch, model, params, x_T, _ = _setup()
    ts = _grid(sch, 7)
    smp = ghvb(order, lower_order_final=False)
    want = _ref_ghvb(model, params, sch, x_T, ts, smp.k, smp.beta)
    got = jaxdiff.sample(KEY, model, params, sch, x_T, smp, ts=ts)
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


def test_weights_sum_to_one_and_reduce_to_adams_bashforth():
    ab = {
        1: [1],
        2: [3 / 2, -1 / 2],
        3: [23 / 12, -16 / 12, 5 / 12],
        4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    }
    for k in (1, 2, 3, 4):
        np.testing.assert_allclose(ghvb_weights(k, jnp.asarray(1.0)), ab[k], rtol=1e-6)
        for b in (0.3, 0.8):
            assert abs(float(jnp.sum(ghvb_weights(k, jnp.asarray(b)))) - 1.0) < 1e-6


@pytest.mark.parametrize("smp", [ghvb(2.8), ghvb(3.6), ghvb(1.5), heavy_ball(0.8)], ids=str)
def test_exact_on_point_mass(x64, smp):
    # x0* constant and eps constant along the exact path: weights summing to 1 keep it exact
    sch = schedules.vp_linear()
    mu = jnp.array([0.7, -0.3])
    model, params = analytic.as_denoiser(analytic.point_mass(mu), sch, parametrization="eps")
    x_T = jax.random.normal(jax.random.PRNGKey(2), (4, 2), jnp.float64)
    for n in (1, 2, 6):
        ts = _grid(sch, n)
        a_T, s_T = sch.alpha_sigma(ts[0])
        a_E, s_E = sch.alpha_sigma(ts[-1])
        exact = a_E * mu + (s_E / s_T) * (x_T - a_T * mu)
        got = _run(smp, model, sch, params, x_T, ts)
        assert float(jnp.max(jnp.abs(got - exact))) <= 1e-9, (smp, n)
    # and a grid ending at sigma = 0 returns the point
    ts = _grid(sch, 5).at[-1].set(0.0)
    got = jaxdiff.sample(KEY, model, params, sch, x_T, smp, ts=ts)
    np.testing.assert_allclose(got, jnp.broadcast_to(mu, got.shape), atol=1e-9)


@pytest.mark.parametrize("k, beta", [(1, 0.5), (2, 0.6), (3, 0.5), (3, 1.0), (4, 0.8)])
def test_weights_have_local_order_k_plus_one(x64, k, beta):
    # one step y_1 - y_0 = h sum_j w_j v_{-j} of a long steady-state history (the momentum's
    # start-up transient decayed) against the exact integral of e(rho) = sin(rho + 0.3) + rho^2 / 3
    def local_error(h):
        m = 200
        rho = h * jnp.arange(-m, 1, dtype=jnp.float64)
        e = jnp.sin(rho + 0.3) + rho**2 / 3
        v = [e[0]]
        for i in range(1, m + 1):
            v.append((1 - beta) * v[-1] + beta * e[i])
        hist = jnp.stack(v[::-1][:k])
        step = h * jnp.dot(ghvb_weights(k, jnp.asarray(beta, jnp.float64)), hist)
        exact = (jnp.cos(0.3) - jnp.cos(h + 0.3)) + h**3 / 9
        return abs(float(step - exact))

    hs = np.array([0.04, 0.02, 0.01, 0.005])
    errs = [local_error(h) for h in hs]
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - (k + 1)) < 0.15, (k, beta, slope, errs)


NS = [128, 256, 512, 1024]


@pytest.mark.parametrize(
    "name, smp, expected",
    [
        # GHVB-k steps have local order k + 1 (test above), but the start (lower-order warm-up
        # steps and the momentum's start-up transient, each O(h^2) locally) limits the global
        # order of every k >= 2 to 2, PLMS (beta = 1) included
        ("ghvb1.6", ghvb(1.6), 2.0),
        ("ghvb2.5", ghvb(2.5), 2.0),
        ("ghvb3.0_plms", ghvb(3.0), 2.0),
        ("heavy_ball", heavy_ball(0.8), 1.0),
    ],
)
def test_global_order(x64, name, smp, expected):
    sch, model, params, x_T, ref = _setup()
    errs = [
        float(jnp.sqrt(jnp.mean((_run(smp, model, sch, params, x_T, _grid(sch, n)) - ref) ** 2)))
        for n in NS
    ]
    order = -np.polyfit(np.log(NS), np.log(errs), 1)[0]
    assert abs(order - expected) < 0.2, (name, order, errs)


def test_bad_input():
    for bad in (0, 0.5, -1.0, 4.5, float("nan"), True, "3"):
        with pytest.raises(JaxdiffError, match="order="):
            ghvb(bad)
    for bad in (0.0, 1.5, True):
        with pytest.raises(JaxdiffError, match="beta="):
            heavy_ball(bad)
    with pytest.raises(JaxdiffError, match="lower_order_final"):
        ghvb(2.8, lower_order_final="sometimes")
