"""Tests for jaxdiff.train: the pure step, EMA, the chunked loop, checkpoints, input checks."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import data, losses, models, schedules, train
from jaxdiff._checks import JaxdiffError, NonFiniteError

KEY = jax.random.PRNGKey(0)
SCHED = schedules.vp_linear()
DATA = jax.jit(data.two_moons, static_argnums=1)(jax.random.PRNGKey(1), 2048)
OPT = optax.adam(1e-2)
# one setting shared by most tests: train() reuses its compiled loop across them
RUN = dict(batch_size=32, progress=False, log_every=20)


def _linear(params, x, t, cond):
    return x @ params["w"] + params["b"] * t[:, None]


def _linear_model():
    params = {"w": 0.1 * jnp.eye(2), "b": jnp.zeros(2)}
    return models.as_denoiser(_linear, x_example=DATA[:1], params=params, parametrization="eps")


def _tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True)
    )


def test_train_is_deterministic_and_chunk_invariant():
    model, params = _linear_model()
    s1, h1 = train.train(KEY, model, params, SCHED, DATA, OPT, 60, **RUN)
    s2, _ = train.train(KEY, model, params, SCHED, DATA, OPT, 60, **RUN)
    s3, _ = train.train(KEY, model, params, SCHED, DATA, OPT, 60, **{**RUN, "log_every": 25})
    assert _tree_equal(s1, s2)
    assert _tree_equal(s1, s3)  # chunks of 25 + 25 + 10: same steps, same keys
    assert int(s1.step) == 60
    s4, _ = train.train(jax.random.PRNGKey(7), model, params, SCHED, DATA, OPT, 60, **RUN)
    assert not _tree_equal(s1.params, s4.params)
    np.testing.assert_array_equal(h1["step"], [20, 40, 60])
    assert set(h1) >= {"step", "loss", "steps_per_s"}
    assert h1["loss"].shape == h1["steps_per_s"].shape == (3,)
    assert np.all(np.isfinite(h1["loss"])) and np.all(h1["steps_per_s"] > 0)


def test_python_loop_takes_the_same_steps_as_the_compiled_loop():
    """loop="python" (one compiled step per call; auto-picked for conv nets on the CPU) runs the
    same steps with the same keys: equal to the fori_loop chunks to float tolerance."""
    model, params = _linear_model()
    s1, h1 = train.train(KEY, model, params, SCHED, DATA, OPT, 40, **RUN, loop="fori")
    s2, h2 = train.train(KEY, model, params, SCHED, DATA, OPT, 40, **RUN, loop="python")
    assert int(s2.step) == 40
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h1["loss"], h2["loss"], rtol=1e-5)
    assert train._resolve_loop("auto", params) == "fori"  # no conv kernels
    conv = {"kernel": jnp.zeros((3, 3, 1, 4))}
    assert train._resolve_loop("auto", conv) == (
        "python" if jax.default_backend() == "cpu" else "fori"
    )
    with pytest.raises(JaxdiffError, match="loop"):
        train.train(KEY, model, params, SCHED, DATA, OPT, 5, **RUN, loop="while")


def test_ema_matches_manual_computation():
    model, params = _linear_model()
    opt = optax.sgd(0.1)
    d = 0.9
    # the fixed decay (ema_warmup=False) and the default warm-up min(d, (1 + s) / (10 + s))
    for warmup, decays in ((False, [d, d, d]), (True, [1 / 10, 2 / 11, 3 / 12])):
        step = jax.jit(
            train.make_step(model, SCHED, opt, ema_decay=d, ema_warmup=warmup, batch_size=16)
        )
        state = train.init(params, opt, ema_decay=d)
        ema = params
        for s, d_s in enumerate(decays):
            np.testing.assert_allclose(train.ema_decay_at(s, d, warmup), d_s, rtol=1e-6)
            state, metrics = step(state, KEY, DATA)
            ema = jax.tree.map(lambda e, p, d_s=d_s: d_s * e + (1 - d_s) * p, ema, state.params)
            assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
        assert int(state.step) == 3
        assert not _tree_equal(state.params, params)
        for got, want in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(ema), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # the warm-up reaches the asymptotic decay at step 9 * d / (1 - d) - 1 and stays there
    np.testing.assert_allclose(train.ema_decay_at(jnp.int32(80), 0.9), 0.9, rtol=1e-6)
    np.testing.assert_allclose(train.ema_decay_at(10_000, 0.999), 0.999, rtol=1e-6)
    np.testing.assert_allclose(train.ema_decay_at(989, 0.999), 990 / 999, rtol=1e-6)
    # the update itself, for the first step: params - lr * grad on the same batch and key
    s0 = train.init(params, opt, ema_decay=0.0)
    assert s0.ema_params is None

    @jax.jit
    def first_step_and_manual(s0):
        s1, m1 = train.make_step(model, SCHED, opt, ema_decay=0.0, batch_size=16)(s0, KEY, DATA)
        k_data, k_loss = jax.random.split(jax.random.fold_in(KEY, 0))
        x, _ = train.draw_batch(k_data, DATA, 16)
        loss, g = jax.value_and_grad(losses.dsm_loss)(params, k_loss, model, SCHED, x)
        return s1, m1, loss, g

    s1, m1, loss, g = first_step_and_manual(s0)
    assert s1.ema_params is None
    np.testing.assert_allclose(m1["loss"], loss, rtol=1e-6)
    for got, p, gi in zip(*(jax.tree.leaves(a) for a in (s1.params, params, g)), strict=True):
        np.testing.assert_allclose(got, p - 0.1 * gi, rtol=1e-5, atol=1e-7)


def test_step_does_not_recompile():
    traces = []

    def counting(params, x, t, cond):
        traces.append(1)  # runs only while tracing
        return _linear(params, x, t, cond)

    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    model, params = models.as_denoiser(counting, params=params, parametrization="eps")
    opt = optax.adam(1e-3)
    step = jax.jit(train.make_step(model, SCHED, opt, batch_size=8))
    state = train.init(params, opt)
    for i in range(4):
        state, _ = step(state, jax.random.PRNGKey(i), DATA)
    assert len(traces) == 1
    # the loop: one compilation for all chunks (the shorter last one included) and for repeated
    # train() calls with the same model, optimizer and settings
    traces.clear()
    kw = dict(steps=25, batch_size=8, log_every=10, progress=False)
    train.train(KEY, model, params, SCHED, DATA, opt, **kw)
    train.train(jax.random.PRNGKey(3), model, params, SCHED, DATA, opt, **kw)
    assert len(traces) == 1


def test_loss_decreases_with_conditional_mlp_score_net():
    # class-conditional MLPScoreNet on (x, label) pairs, with CFG label dropout
    x, y = jax.jit(data.two_moons, static_argnums=(1, 3))(KEY, 2048, 0.05, True)
    net = models.MLPScoreNet(hidden=32, depth=1, embed_dim=16, num_classes=2)
    model, params = models.as_denoiser(net, KEY, x[:1], cond_example=y[:1], parametrization="eps")
    kw = dict(cond_drop_prob=0.2, null_cond=net.null_cond)
    state, hist = train.train(
        KEY, model, params, SCHED, (x, y), optax.adam(3e-3), steps=400, batch_size=128,
        log_every=100, progress=False, ema_decay=0.99, **kw,
    )  # fmt: skip
    eval_loss = jax.jit(
        lambda p: losses.dsm_loss(p, jax.random.PRNGKey(9), model, SCHED, x, y, **kw)
    )
    before, after = float(eval_loss(params)), float(eval_loss(state.params))
    assert after < 0.85 * before, (before, after)
    assert hist["loss"][-1] < hist["loss"][0]
    assert float(eval_loss(state.ema_params)) < before


def test_fit_returns_ema_or_raw_params():
    model, params = _linear_model()
    state, _ = train.train(KEY, model, params, SCHED, DATA, OPT, 20, **RUN)
    assert _tree_equal(train.fit(KEY, model, params, SCHED, DATA, OPT, 20, **RUN), state.ema_params)
    state0, _ = train.train(KEY, model, params, SCHED, DATA, OPT, 20, ema_decay=0.0, **RUN)
    raw = train.fit(KEY, model, params, SCHED, DATA, OPT, 20, ema_decay=0.0, **RUN)
    assert state0.ema_params is None and _tree_equal(raw, state0.params)


def test_callable_data():
    model, params = _linear_model()

    def sampler(key, n):  # data(key, n) -> x
        return jax.random.normal(key, (n, 2))

    s, h = train.train(KEY, model, params, SCHED, sampler, OPT, 20, **RUN)
    assert np.all(np.isfinite(h["loss"])) and int(s.step) == 20
    x_batch, cond = train.draw_batch(KEY, lambda k, n: (sampler(k, n), jnp.arange(n)), 5)
    assert x_batch.shape == (5, 2) and cond.shape == (5,)


def test_checkpoint_round_trip(tmp_path):
    model, params = _linear_model()
    state, _ = train.train(KEY, model, params, SCHED, DATA, OPT, 5, **RUN)
    path = train.save_checkpoint(tmp_path / "ckpt", state)
    target = train.init(params, OPT)
    restored = train.restore_checkpoint(path, target)
    assert isinstance(restored, train.TrainState)
    assert _tree_equal(restored, state)
    # explicit steps; the latest is restored by default; a repeated step is overwritten
    later = state.replace(step=state.step + 10, params=jax.tree.map(lambda a: a + 1, state.params))
    train.save_checkpoint(path, later)
    train.save_checkpoint(path, later, step=15)
    assert _tree_equal(train.restore_checkpoint(path, target), later)
    assert _tree_equal(train.restore_checkpoint(path, target, step=5), state)
    # preemption: restore, resume, and land exactly where an uninterrupted run lands
    resumed, hist = train.train(KEY, model, restored, SCHED, DATA, OPT, 15, **RUN)
    full, _ = train.train(KEY, model, params, SCHED, DATA, OPT, 20, **RUN)
    assert _tree_equal(resumed, full)
    np.testing.assert_array_equal(hist["step"], [20])
    with pytest.raises(JaxdiffError, match="ema_decay"):
        train.train(KEY, model, restored, SCHED, DATA, OPT, 5, ema_decay=0.0, **RUN)
    raw = train.restore_checkpoint(path)  # no target: nested dicts
    np.testing.assert_array_equal(raw["params"]["w"], later.params["w"])
    with pytest.raises(JaxdiffError, match="step"):
        train.restore_checkpoint(path, target, step=3)
    with pytest.raises(JaxdiffError, match="directory"):
        train.restore_checkpoint(tmp_path / "missing", target)


def test_bad_inputs_name_the_argument():
    model, params = _linear_model()
    opt = optax.adam(1e-3)

    def run(d=DATA, **kw):
        kw = {"steps": 2, "batch_size": 4, "progress": False, **kw}
        return train.train(KEY, model, params, SCHED, d, opt, **kw)

    for kw, name in [
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"log_every": 0}, "log_every"),
        ({"ema_decay": 1.0}, "ema_decay"),
    ]:
        with pytest.raises(JaxdiffError, match=name):
            run(**kw)
    for bad in [jnp.ones((16, 3)), jnp.ones(16), (DATA, jnp.ones(5)), "moons"]:
        with pytest.raises(JaxdiffError, match="data"):
            run(bad)
    with pytest.raises(JaxdiffError, match="data"):
        run(lambda k, n: jnp.ones((n, 3)))
    with pytest.raises(JaxdiffError, match="batch_size"):
        train.make_step(model, SCHED, opt, batch_size=0)


def test_non_finite_loss_names_the_step():
    # loss = -p while p < 2.5, NaN after: SGD(lr=1) moves p = 0, 1, 2, 3 -> NaN at step 3
    def loss_fn(p, key, model, schedule, x0, cond):
        return jnp.where(p > 2.5, jnp.nan, -p)

    model, _ = _linear_model()
    with pytest.raises(NonFiniteError, match="step 3"):
        train.train(KEY, model, jnp.float32(0.0), SCHED, DATA, optax.sgd(1.0), steps=10,
                    batch_size=2, log_every=4, progress=False, loss_fn=loss_fn)  # fmt: skip


def test_progress_bar_runs(capsys):
    model, params = _linear_model()
    train.train(KEY, model, params, SCHED, DATA, OPT, 4, **{**RUN, "progress": True})
    assert "steps_per_s" in capsys.readouterr().err


@pytest.mark.slow
def test_mlp_training_speed():
    """2000 steps of MLPScoreNet(128, 3) at batch 512 on 2-D data in under 20 s (CPU)."""
    x = data.two_moons(KEY, 10_000)
    model, params = models.as_denoiser(
        models.MLPScoreNet(hidden=128, depth=3), KEY, x[:1], parametrization="eps"
    )
    t0 = time.perf_counter()
    state, hist = train.train(KEY, model, params, SCHED, x, optax.adam(1e-3), steps=2000,
                              batch_size=512, progress=False, log_every=250)  # fmt: skip
    jax.block_until_ready(state)
    wall = time.perf_counter() - t0
    rate = 2000 / np.sum(2000 / len(hist["steps_per_s"]) / hist["steps_per_s"])
    print(f"2000 steps in {wall:.1f} s (compile included); {rate:.0f} steps/s")
    assert wall < 20.0
