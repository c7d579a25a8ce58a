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
        iterations=80,
        loss=loss,
    )
    ts = np.asarray(res.ts)
    assert ts.shape == (6,) and np.all(np.diff(ts) < 0)
    np.testing.assert_allclose([ts[0], ts[-1]], [1.0, 1e-3])
    assert res.final_loss < 0.6 * res.initial_loss
    # held-out calibration noise, against a tight diffrax reference
    x_T = jax.random.normal(jax.random.PRNGKey(5), (256, 1))
    key = jax.random.PRNGKey(1)
    ref = jaxdiff.sample(key, model, params, sch, x_T, samplers.pf_ode(rtol=1e-9, atol=1e-9), 10)

    def err(ts):
        y = jaxdiff.sample(key, model, params, sch, x_T, samplers.ddim(), ts=ts)
        return float(jnp.sqrt(jnp.mean((y - ref) ** 2)))

    base = err(samplers.time_grid(sch, 5, "log_snr"))
    tuned = err(res.ts)
    assert tuned < base / 1.5, (base, tuned)


def test_bad_input():
    sch, model, params = _gmm()
    key = jax.random.PRNGKey(0)
    with pytest.raises(JaxdiffError, match="sampler"):
        optimize_grid(key, model, params, sch, samplers.ddpm(), 5, (8, 1))
    with pytest.raises(JaxdiffError, match="steps"):
        optimize_grid(key, model, params, sch, samplers.ddim(), 0, (8, 1))
    with pytest.raises(JaxdiffError, match="shape"):
        optimize_grid(key, model, params, sch, samplers.ddim(), 4, (8, 3))
    with pytest.raises(JaxdiffError, match="loss"):
        optimize_grid(key, model, params, sch, samplers.ddim(), 4, (8, 1), loss="huber")
