"""Train -> sample -> metric, in the default test run (about 20 s on a 2-core CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdiff
from jaxdiff import analytic, metrics, models, samplers, schedules, train


def test_train_mlp_on_mixture_then_ddim20_is_within_2x_of_the_floor():
    key = jax.random.PRNGKey(0)
    k_data, k_init, k_train, k_sample, k_fresh, k_sw, k_floor = jax.random.split(key, 7)
    dist = analytic.ring_mixture(num=8, radius=2.0, std=0.15)
    data = dist.sample(k_data, 20_000)
    schedule = schedules.vp_linear()
    net = models.MLPScoreNet(hidden=128, depth=3)
    model, params = models.as_denoiser(net, k_init, data[:1], parametrization="v")
    steps = 1500
    opt = optax.adam(optax.cosine_decay_schedule(3e-3, steps, alpha=0.05))
    params = train.fit(
        k_train,
        model,
        params,
        schedule,
        data,
        opt,
        steps=steps,
        batch_size=512,
        ema_decay=0.99,
        progress=False,
    )
    n = 2000
    x = jaxdiff.sample(k_sample, model, params, schedule, (n, 2), samplers.ddim(), steps=20)
    assert x.shape == (n, 2) and bool(jnp.all(jnp.isfinite(x)))
    fresh = dist.sample(k_fresh, n)
    sw = float(metrics.sliced_wasserstein(k_sw, x, fresh, num_projections=1024))
    floors = [
        float(
            metrics.sliced_wasserstein_floor(
                jax.random.fold_in(k_floor, i), dist.sample, n, num_projections=1024
            )
        )
        for i in range(3)
    ]
    floor = float(np.mean(floors))
    assert sw < 2.0 * floor, (sw, floor)
