import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import analytic, samplers, schedules
from jaxdiff._checks import JaxdiffError
from jaxdiff.samplers.grid_search import grid_from_logits, logits_from_grid, optimize_grid


def _gmm():
    sch = schedules.vp_linear()
    dist = analytic.gaussian_mixture(
        jnp.array([0.3, 0.7]), jnp.array([[-1.0], [0.8]]), jnp.array([0.05, 0.1])
    )
    model, params = analytic.as_denoiser(dist, sch)
    return sch, model, params


def _held_out_error(sch, model, params, smp, ts, n=256, dim=1):
    # evaluation noise independent of the calibration keys used below (0, 7)
    x_T = jax.random.normal(jax.random.PRNGKey(5), (n, dim))
    key = jax.random.PRNGKey(1)
    ref = jaxdiff.sample(key, model, params, sch, x_T, samplers.pf_ode(rtol=1e-9, atol=1e-9), 10)
    y = jaxdiff.sample(key, model, params, sch, x_T, smp, ts=ts)
    return float(jnp.mean(jnp.sqrt(jnp.mean((y - ref) ** 2, -1))))


def test_logit_parametrisation_round_trips(x64):
    sch = schedules.vp_linear()
    ts = samplers.time_grid(sch, 7, "karras")
    np.testing.assert_allclose(
        grid_from_logits(logits_from_grid(ts, sch), sch, 1.0, 1e-3), ts, rtol=1e-10
    )


@pytest.mark.parametrize("loss", ["mse", "l2"])
def test_optimised_grid_beats_the_log_snr_grid_on_held_out_noise(x64, loss):
    sch, model, params = _gmm()
    res = optimize_grid(
        jax.random.PRNGKey(0),
        model,
        params,
        sch,
        samplers.ddim(),
        5,
        (64, 1),
        init="log_snr",
        iterations=80,
        loss=loss,
    )
    ts = np.asarray(res.ts)
    assert ts.shape == (6,) and np.all(np.diff(ts) < 0)
    np.testing.assert_allclose([ts[0], ts[-1]], [1.0, 1e-3])
    assert res.init == "log_snr" and res.final_loss < 0.6 * res.initial_loss
    assert res.heldout_loss.shape == (80,) and res.calibration_nfe > 80 * 5
    base = _held_out_error(
        sch, model, params, samplers.ddim(), samplers.time_grid(sch, 5, "log_snr")
    )
    tuned = _held_out_error(sch, model, params, samplers.ddim(), res.ts)
    assert tuned < base / 1.5, (base, tuned)
    # JSON round trip
    back = samplers.GridSearchResult.from_dict(json.loads(json.dumps(res.to_dict())))
    np.testing.assert_allclose(np.asarray(back.ts), ts)


def test_search_keeps_the_best_iterate_and_never_returns_a_worse_grid(x64):
    # at a step size far too large Adam wanders off; the best iterate (by held-out loss) is
    # returned, never the last one, and never anything worse than the starting grid
    sch, model, params = _gmm()
    smp = samplers.dpm_solver_pp(2)
    res = optimize_grid(
        jax.random.PRNGKey(0), model, params, sch, smp, 4, (64, 1), iterations=40,
        learning_rate=2.0, init="log_snr",
    )  # fmt: skip
    assert res.final_loss <= res.initial_loss
    assert res.final_loss <= float(np.min(res.heldout_loss)) + 1e-12
    # warm start from a given grid (an earlier result)
    res2 = optimize_grid(
        jax.random.PRNGKey(0), model, params, sch, smp, 4, (64, 1), iterations=10, init=res.ts
    )
    assert res2.init == "given" and res2.final_loss <= res.final_loss + 1e-12


def test_solver_search_improves_held_out_error(x64):
    # 2-D two-mode mixture, 4 steps: the searched UniPC plan + grid beats the default UniPC-3
    # (budget grid, lower-order final) on evaluation noise independent of the calibration noise
    sch = schedules.vp_discrete()
    dist = analytic.gaussian_mixture(
        jnp.array([0.4, 0.6]), jnp.array([[-1.0, 0.5], [1.0, -0.3]]), jnp.array([0.02, 0.05])
    )
    model, params = analytic.as_denoiser(dist, sch, parametrization="eps")
    res = samplers.search_solver(
        jax.random.PRNGKey(7), model, params, sch, 4, (64, 2), rounds=1, iterations=40
    )
    assert res.final_loss <= res.initial_loss and res.seconds > 0
    orders = np.asarray(res.sampler.orders)
    assert orders.shape == (4,) and orders[0] == 1 and np.all(orders <= np.arange(1, 5))
    default = samplers.unipc(3)
    base = _held_out_error(
        sch, model, params, default, samplers.time_grid(sch, 4, "uniform"), dim=2
    )
    found = _held_out_error(sch, model, params, res.sampler, res.ts, dim=2)
    assert found < 0.7 * base, (base, found)
    back = samplers.SolverSearchResult.from_dict(json.loads(res.to_json()))
    np.testing.assert_array_equal(np.asarray(back.sampler.orders), orders)
    np.testing.assert_allclose(np.asarray(back.ts), np.asarray(res.ts))


def test_unipc_plan_reproduces_the_static_rule(x64):
    sch, model, params = _gmm()
    x_T = jax.random.normal(jax.random.PRNGKey(0), (8, 1))
    key = jax.random.PRNGKey(1)
    for n in (5, 12):
        orders = [min(3, k + 1, n - k) for k in range(n)]
        a = jaxdiff.sample(key, model, params, sch, x_T, samplers.unipc(3), n)
        b = jaxdiff.sample(
            key, model, params, sch, x_T, samplers.unipc(3, orders=orders, correctors=[1] * n), n
        )
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # all first order without corrector: DDIM
    ts = samplers.time_grid(sch, 6, "quadratic")
    plan = samplers.unipc(3, orders=[1] * 6, correctors=[0] * 6)
    a = jaxdiff.sample(key, model, params, sch, x_T, plan, ts=ts)
    b = jaxdiff.sample(key, model, params, sch, x_T, samplers.ddim(), ts=ts)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
    with pytest.raises(JaxdiffError, match="orders='shape"):
        jaxdiff.sample(key, model, params, sch, x_T, samplers.unipc(3, orders=[1, 2, 3]), 5)
    with pytest.raises(JaxdiffError, match=r"orders=\[1, 3\]"):
        samplers.unipc(2, orders=[1, 3])
    with pytest.raises(JaxdiffError, match="correctors"):
        samplers.unipc(2, correctors=[2, 0])


def test_bad_input():
    sch, model, params = _gmm()
    key = jax.random.PRNGKey(0)
    with pytest.raises(JaxdiffError, match="sampler"):
        optimize_grid(key, model, params, sch, samplers.ddpm(), 5, (8, 1))
    with pytest.raises(JaxdiffError, match="sampler"):
        optimize_grid(key, model, params, sch, samplers.pf_ode(), 5, (8, 1))
    with pytest.raises(JaxdiffError, match="steps"):
        optimize_grid(key, model, params, sch, samplers.ddim(), 0, (8, 1))
    with pytest.raises(JaxdiffError, match="shape"):
        optimize_grid(key, model, params, sch, samplers.ddim(), 4, (8, 3))
    with pytest.raises(JaxdiffError, match=r"shape \(1,\).*batch"):  # no batch axis
        optimize_grid(key, model, params, sch, samplers.ddim(), 4, (1,))
    with pytest.raises(JaxdiffError, match="loss"):
        optimize_grid(key, model, params, sch, samplers.ddim(), 4, (8, 1), loss="huber")
    with pytest.raises(JaxdiffError, match="holdout"):
        optimize_grid(key, model, params, sch, samplers.ddim(), 4, (8, 1), holdout=1.5)
    with pytest.raises(JaxdiffError, match="init"):
        optimize_grid(key, model, params, sch, samplers.ddim(), 4, (8, 1), init="cubic")
    with pytest.raises(JaxdiffError, match="init"):
        optimize_grid(key, model, params, sch, samplers.ddim(), 4, (8, 1), init=jnp.ones(3))
    with pytest.raises(JaxdiffError, match="steps"):
        samplers.search_solver(key, model, params, sch, 0, (8, 1))
    with pytest.raises(JaxdiffError, match="shape"):
        samplers.search_solver(key, model, params, sch, 4, (1,))
