"""Reward fine-tuning through the sampler (DRaFT-K / AlignProp): gradients against closed forms
and jax.grad of the unrolled sampler, the path-KL weights against the transition kernels' exact
Gaussian KL, jax.checkpoint's memory saving, and the reward-vs-regulariser trade-off on an
exact 8-Gaussian model with a learned residual."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from jaxdiff import JaxdiffError, analytic, losses, models, samplers, schedules
from jaxdiff import train as jtrain
from jaxdiff.denoiser import Denoiser
from jaxdiff.optimize import finetune as ft
from jaxdiff.samplers.api import prior_sample
from jaxdiff.samplers.base import per_example_normal

# ------------------------------------------------------------------------------------------
# shared float32 setting: exact 8-Gaussian eps plus a zero-initialised residual MLP, so the
# "pretrained" model is the exact data score and no pretraining is needed
# ------------------------------------------------------------------------------------------
SCH = schedules.vp_linear()
_ANG = np.arange(8) * 2 * np.pi / 8
MEANS = (2.0 * np.stack([np.cos(_ANG), np.sin(_ANG)], -1)).astype(np.float32)
STD = 0.1
MIX = analytic.gaussian_mixture(None, MEANS, STD**2)
EXACT, DIST = analytic.as_denoiser(MIX, SCH)
HIDDEN = 32


def mlp(p, x, t):
    h = jnp.tanh(x @ p["w1"] + t[:, None] * p["wt"] + p["b1"])
    return h @ p["w2"]


def mlp_params(key, hidden=HIDDEN, dim=2, dtype=jnp.float32, out_scale=0.0):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (dim, hidden), dtype),
        "wt": jax.random.normal(k2, (hidden,), dtype),
        "b1": jnp.zeros((hidden,), dtype),
        "w2": out_scale * jax.random.normal(k3, (hidden, dim), dtype) / np.sqrt(hidden),
    }


def residual_apply(p, x, t, cond=None):
    return EXACT(DIST, x, t) + mlp(p, x, t)


MODEL = Denoiser(apply=residual_apply, parametrization="eps", event_shape=(2,))
P0 = mlp_params(jax.random.key(0))
OPT = optax.adam(3e-3)  # one object: the compiled step is keyed on it


class Linear(struct.PyTreeNode):
    """r(x) = x @ direction; the direction is a leaf (sweeping it must not retrace)."""

    direction: Any

    def __call__(self, x):
        return x @ self.direction


TRACES = [0]


class CountingLinear(Linear):
    def __call__(self, x):
        TRACES[0] += 1
        return x @ self.direction


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------
def test_truncated_gradient_matches_closed_form_on_linear_model(x64):
    """eps(x) = theta x makes each DDIM step linear, x_{i+1} = c_i(theta) x_i with
    c_i = a_{i+1}/a_i + theta b_i, b_i = sigma_{i+1} - a_{i+1} sigma_i / a_i; for the reward
    r(x) = x.v the DRaFT-K gradient of -mean r(x_N) is
    -mean(x_T.v) sum_{j >= N-K} b_j prod_{i != j} c_i (only the last K factors differentiated)."""
    n = 4
    ts = samplers.time_grid(SCH, n, dtype=jnp.float64)
    model = Denoiser(apply=lambda th, x, t, c=None: th * x, parametrization="eps")
    x_T = jax.random.normal(jax.random.key(1), (3, 2), jnp.float64)
    v = jnp.array([1.0, -2.0])
    theta = jnp.float64(0.3)

    @jax.jit
    def grads(theta):
        out = {}
        for k, ck in ((1, True), (2, True), (n, True), (n, False), (2, False)):

            def loss(th, k=k, ck=ck):
                x = ft.draft_sample(
                    jax.random.key(0), model, th, SCH, x_T, ts, samplers.ddim(), k, checkpoint=ck
                )
                return -jnp.mean(x @ v)

            out[(k, ck)] = jax.grad(loss)(theta)
        return out

    got = grads(theta)
    a, s = (np.asarray(u) for u in SCH.alpha_sigma(ts))
    c = a[1:] / a[:-1] + float(theta) * (s[1:] - a[1:] * s[:-1] / a[:-1])
    b = s[1:] - a[1:] * s[:-1] / a[:-1]
    base = -float(jnp.mean(x_T @ v))
    for (k, _ck), g in got.items():
        want = base * sum(b[j] * np.prod(np.delete(c, j)) for j in range(n - k, n))
        np.testing.assert_allclose(float(g), want, rtol=1e-11)
    # truncation changes the gradient here (a test of the truncation, not only of the chain rule)
    assert abs(float(got[(1, True)]) - float(got[(n, True)])) > 0.05 * abs(float(got[(n, True)]))


def _check_full_gradient_equals_solve(smp, cks):
    """K = N draft_sample gradients (checkpoint on / off) versus jax.grad through solve."""
    model = Denoiser(apply=lambda q, x, t, c=None: mlp(q, x, t), parametrization="eps")
    params = mlp_params(jax.random.key(2), hidden=16, dtype=jnp.float64, out_scale=1.0)
    n = 5
    ts = samplers.time_grid(SCH, n, dtype=jnp.float64)
    x_T = jax.random.normal(jax.random.key(3), (4, 2), jnp.float64)
    key = jax.random.key(4)

    def reward(x):
        return jnp.sin(x[:, 0]) + x[:, 1] ** 2

    def solve_loss(q):
        x = samplers.solve(key, model, q, SCH, x_T, ts, smp)[0]
        return -jnp.mean(reward(x)), x

    def draft_loss(q, ck):
        x = ft.draft_sample(key, model, q, SCH, x_T, ts, smp, n, checkpoint=ck)
        return -jnp.mean(reward(x)), x

    @jax.jit
    def everything(p):
        g = jax.grad(solve_loss, has_aux=True)(p)
        return g, [jax.grad(draft_loss, has_aux=True)(p, ck) for ck in cks]

    (g_solve, x_solve), drafts = everything(params)
    assert float(optax.tree.norm(g_solve)) > 1e-3
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g_solve))
    for ck, (g, x) in zip(cks, drafts, strict=True):
        np.testing.assert_allclose(x, x_solve, rtol=0, atol=1e-12)
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), g, g_solve))
        assert max(float(d) for d in diffs) < 1e-6 * scale, (smp.name, ck)


def test_full_gradient_equals_grad_of_unrolled_sampler(x64):
    """K = N, with and without jax.checkpoint, equals jax.grad through samplers.solve (DDIM) to
    1e-6 relative (measured ~1e-15); the forward samples equal solve's. Truncated K: the
    closed-form test above."""
    _check_full_gradient_equals_solve(samplers.ddim(), (False, True))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpm_solver_pp", "unipc", "ddpm"])
def test_slow_full_gradient_multistep_and_stochastic_samplers(x64, name):
    """The same with DPM-Solver++(2M) and UniPC-2 (multistep states carrying earlier model
    outputs) and DDPM (noise drawn from fold_in(key, i) inside the checkpointed step)."""
    smp = {
        "dpm_solver_pp": samplers.dpm_solver_pp(2),
        "unipc": samplers.unipc(2),
        "ddpm": samplers.ddpm(),
    }[name]
    _check_full_gradient_equals_solve(smp, (False, True))


def test_checkpoint_shrinks_compiled_temp_memory():
    """The compiled backward pass of K = N = 20 steps (MLP width 256, batch 256) keeps the
    network's activations of every step without jax.checkpoint and only the sampler states
    with it: temp memory at least 10x smaller (measured on CPU: 0.57 MB vs 11.1 MB, 19x;
    with K = 1 both are 0.53 MB)."""
    n, batch, hidden = 20, 256, 256
    p = mlp_params(jax.random.key(5), hidden=hidden, out_scale=1.0)
    model = Denoiser(apply=lambda q, x, t, c=None: mlp(q, x, t), parametrization="eps")
    ts = samplers.time_grid(SCH, n)
    x_T = jnp.zeros((batch, 2))

    def temp_bytes(ck):
        def loss(q):
            x = ft.draft_sample(
                jax.random.key(0), model, q, SCH, x_T, ts, samplers.ddim(), n, checkpoint=ck
            )
            return -jnp.mean(x[:, 0])

        stats = jax.jit(jax.grad(loss)).lower(p).compile().memory_analysis()
        if stats is None:
            pytest.skip("memory_analysis() is not available on this backend")
        return stats.temp_size_in_bytes

    with_ck, without = temp_bytes(True), temp_bytes(False)
    # without checkpoint: >= n steps x (batch x hidden) float32 activations must be stored
    assert without >= n * batch * hidden * 4
    assert with_ck * 10 < without, (with_ck, without)


# ------------------------------------------------------------------------------------------
# the KL regulariser
# ------------------------------------------------------------------------------------------
def test_kl_weights_equal_exact_transition_kl(x64):
    """For each stochastic sampler, one step from the same x with the same noise under two models
    differs by exactly the difference of the transition means; the step's std is read off two
    draws with different noise. ||m_ft - m_ref||^2 / (2 v) must equal w_i ||eps_ft - eps_ref||^2.
    Deterministic samplers (and DDIM eta = 0) get w_i = h_i = lambda(t) - lambda(s)."""
    ref_dist = analytic.gaussian(jnp.zeros(2), 1.0)
    ft_dist = analytic.gaussian(jnp.array([0.4, -0.3]), jnp.array([0.5, 2.0]))
    model, _ = analytic.as_denoiser(ref_dist, SCH)
    ts = samplers.time_grid(SCH, 5, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(6), (4, 2), jnp.float64)
    k1, k2 = jax.random.key(7), jax.random.key(8)
    stochastic = (
        samplers.ddpm("small"),
        samplers.ddpm("large"),
        samplers.ddim(0.5),
        samplers.ddim(1.0),
        samplers.euler_maruyama(),
    )

    @jax.jit
    def both(x):
        out = []
        for smp in stochastic:
            kern = smp.kernel(model, SCH)

            def one(s, t, kern=kern):
                x_ft = kern.step(k1, x, s, t, ft_dist, None)[0]
                x_ref = kern.step(k1, x, s, t, ref_dist, None)[0]
                x_ref2 = kern.step(k2, x, s, t, ref_dist, None)[0]
                std = (x_ref - x_ref2) / (per_example_normal(k1, x) - per_example_normal(k2, x))
                kl = jnp.sum((x_ft - x_ref) ** 2, -1) / (2 * jnp.mean(std) ** 2)
                e_ft = model.x0_eps(ft_dist, x, s, None, SCH)[1]
                e_ref = model.x0_eps(ref_dist, x, s, None, SCH)[1]
                return kl, jnp.sum((e_ft - e_ref) ** 2, -1), jnp.std(std) / jnp.mean(std)

            kl, gap, spread = jax.vmap(one)(ts[:-1], ts[1:])
            out.append((kl, ft.kl_weights(smp, SCH, ts)[:, None] * gap, spread))
        return out

    for kl, formula, spread in both(x):
        assert float(jnp.max(spread)) < 1e-8  # one std for every entry: noise is additive
        assert float(jnp.max(kl)) > 1e-2
        np.testing.assert_allclose(formula, kl, rtol=1e-8)
    h = SCH.lam(ts[1:]) - SCH.lam(ts[:-1])
    for smp in (samplers.ddim(0.0), samplers.dpm_solver_pp(2), samplers.unipc(2)):
        np.testing.assert_allclose(ft.kl_weights(smp, SCH, ts), h, rtol=1e-12)


def test_path_kl_per_example_and_batch_independent():
    """path_kl equals sum_i w_i ||eps_ft - eps_ref||^2 over the trajectory, is 0 at the
    reference, and row 0 of a batch of 8 equals a batch of 1 (prior rows, DDPM noise and the KL
    are per example)."""
    p = mlp_params(jax.random.key(10), out_scale=0.5)
    p_ref = mlp_params(jax.random.key(10), out_scale=0.0)
    model = Denoiser(apply=lambda q, x, t, c=None: mlp(q, x, t), parametrization="eps")
    ts = samplers.time_grid(SCH, 6)
    smp = samplers.ddpm()
    w = ft.kl_weights(smp, SCH, ts)

    @jax.jit
    def terms(p):
        out = {}
        for b in (1, 8):
            x_T = prior_sample(jax.random.key(11), SCH, (b, 2))
            x, xs = ft.draft_sample(
                jax.random.key(12), model, p, SCH, x_T, ts, smp, 3, return_trajectory=True
            )
            kl = ft.path_kl(model, p, p_ref, SCH, xs, ts, smp)
            gap = jax.vmap(lambda xi, s: jnp.sum((model(p, xi, s) - model(p_ref, xi, s)) ** 2, -1))(
                xs, ts[:-1]
            )
            zero = ft.path_kl(model, p_ref, p_ref, SCH, xs, ts, smp)
            out[b] = (x, kl, ft.nearest_distance(x, MEANS), w @ gap, zero, xs, x_T)
        return out

    out = terms(p)
    x, kl, dist, manual, zero, xs, x_T = out[8]
    assert xs.shape == (6, 8, 2)
    np.testing.assert_allclose(xs[0], x_T)
    np.testing.assert_allclose(kl, manual, rtol=1e-5)
    assert float(jnp.min(kl)) > 1e-3
    np.testing.assert_array_equal(zero, 0.0)
    for a, b in zip(out[1][:3], out[8][:3], strict=True):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------
def _state(reg_weight, key=13):
    # one structure (model, OPT, N = 8, batch 32, CountingLinear, eval_data) for the three tests
    # below, so they share one compiled step
    return ft.init(
        jax.random.key(key), MODEL, P0, SCH, OPT, num_steps=8, batch_size=32, reg_weight=reg_weight
    )


EVAL = jnp.asarray(MEANS)


def test_sweeping_reg_weight_and_reward_target_does_not_retrace():
    s0 = _state(0.0)
    s1, m0 = ft.jit_step(s0, CountingLinear(jnp.array([1.0, 0.0])), None, EVAL)
    n1 = TRACES[0]
    # EMA: ema <- d ema + (1 - d) params with d = 0.99 (the default)
    want = jax.tree.map(lambda p, e: 0.99 * e + 0.01 * p, s1.params, P0)
    for a, b in zip(jax.tree.leaves(s1.ema_params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert int(s1.step) == 1
    assert n1 > 0
    seen = []
    for lam, d in ((1.0, [0.0, 1.0]), (0.5, [-1.0, 0.5])):
        s = s0.replace(config=s0.config.replace(reg_weight=jnp.float32(lam)))
        _, m = ft.jit_step(s, CountingLinear(jnp.array(d)), None, EVAL)
        # the swept values took effect: loss = -reward + lambda * regulariser
        np.testing.assert_allclose(
            m["loss"], -m["reward"] + lam * m["regularizer"], rtol=1e-5, atol=1e-6
        )
        seen.append(float(m["reward"]))
    assert TRACES[0] == n1
    assert abs(seen[0] - float(m0["reward"])) > 1e-3


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    r = CountingLinear(jnp.array([1.0, 0.0]))
    full, hist = ft.run(_state(0.1), r, 3, progress=False, eval_data=EVAL)
    assert set(hist) >= {
        "step",
        "loss",
        "reward",
        "reward_std",
        "regularizer",
        "grad_norm",
        "dist_to_data",
        "wall_s",
    }
    np.testing.assert_array_equal(hist["step"], [1, 2, 3])
    part, _ = ft.run(_state(0.1), r, 2, progress=False, eval_data=EVAL, checkpoint_dir=tmp_path)
    restored = ft.restore_checkpoint(tmp_path, _state(0.1))
    assert int(restored.step) == 2
    resumed, hist2 = ft.run(restored, r, 1, progress=False, eval_data=EVAL)
    np.testing.assert_array_equal(hist2["step"], [3])
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), full.params, P0))
    assert max(float(m) for m in moved) > 1e-3


def test_reward_rises_and_kl_regulariser_keeps_samples_on_the_data():
    """Push right, r(x) = x_1, on the exact 8-Gaussian model (modes on the radius-2 circle, std
    0.1) with a residual MLP; DDIM 8 steps, K = N, batch 32, adam 3e-3, 150 steps. Measured:
    lambda = 0 reward 0.13 -> 3.78 with the samples 1.89 from the nearest mode (reward hacking);
    KL lambda = 1 reward -> 1.94 at 0.07 from the nearest mode (the pretrained model: 0.16)."""
    r = CountingLinear(jnp.array([1.0, 0.0]))
    out = {}
    for lam in (0.0, 1.0):
        _, h = ft.run(_state(lam, key=4), r, 150, eval_data=EVAL, progress=False)
        out[lam] = (
            h["reward"][-10:].mean(),
            h["dist_to_data"][-10:].mean(),
            h["reward"][0],
            h["dist_to_data"][0],
        )
    (r0, d0, r_init, d_init), (r1, d1, _, _) = out[0.0], out[1.0]
    assert abs(r_init) < 0.5 and d_init < 0.25  # the pretrained model: balanced, on the data
    assert r0 > r_init + 2.5 and r1 > r_init + 1.5  # both raise the reward ...
    assert r0 > r1 + 1.0  # ... lambda = 0 more,
    assert d0 > 1.0 and d1 < 0.12 and d0 > 8 * d1  # by leaving the data; the KL keeps it there


def test_score_matching_regulariser_is_dsm_loss_on_a_data_batch():
    """The "score_matching" regulariser is dsm_loss(params, k_dsm, ...) on the data batch
    draw_batch(k_data, data, reg_batch_size) with (k_prior, k_sampler, k_data, k_dsm) =
    split(key, 4), and the loss is -mean r + lambda * regulariser."""
    data = MIX.sample(jax.random.key(14), 256)
    p = mlp_params(jax.random.key(16), out_scale=0.3)
    model = Denoiser(
        apply=lambda q, x, t, c=None: mlp(q, x, t), parametrization="eps", event_shape=(2,)
    )
    st = ft.init(
        jax.random.key(15), model, p, SCH, OPT, num_steps=2, batch_size=4,
        regularizer="score_matching", reg_weight=2.0, reg_batch_size=32,
    )  # fmt: skip
    key = jax.random.fold_in(jax.random.key(15), 0)
    _, _, k_data, k_dsm = jax.random.split(key, 4)

    @jax.jit
    def both(p, ref):
        loss, aux = ft.draft_loss(p, ref, key, st.config, lambda x: x[:, 1], data)
        x_data, _ = jtrain.draw_batch(k_data, data, 32)
        return (
            loss,
            aux,
            losses.dsm_loss(p, k_dsm, model, SCH, x_data),
            losses.dsm_loss(ref, k_dsm, model, SCH, x_data),
        )

    loss, aux, want, want_ref = both(p, P0)
    np.testing.assert_allclose(aux["regularizer"], want, rtol=1e-6)
    assert abs(float(want) - float(want_ref)) > 1e-3  # it is evaluated at params, not ref
    np.testing.assert_allclose(loss, -jnp.mean(aux["reward"]) + 2.0 * want, rtol=1e-6)
    np.testing.assert_allclose(aux["reward"], aux["x"][:, 1])


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
def test_bad_inputs():
    def make(**kw):
        return ft.init(
            jax.random.key(0), MODEL, P0, SCH, OPT, num_steps=kw.pop("num_steps", 4), **kw
        )

    for k in (0, 5, 1.5, True):
        with pytest.raises(JaxdiffError, match=r"^k="):
            make(k=k)
    with pytest.raises(JaxdiffError, match="regularizer"):
        make(regularizer="l2")
    with pytest.raises(JaxdiffError, match="reg_weight"):
        make(reg_weight=-1.0)
    with pytest.raises(JaxdiffError, match="ema_decay"):
        make(ema_decay=1.0)
    with pytest.raises(JaxdiffError, match="num_steps"):
        make(num_steps=0)
    with pytest.raises(JaxdiffError, match="sampler"):
        make(sampler=samplers.pf_ode())
    with pytest.raises(JaxdiffError, match="k="):
        ft.draft_sample(
            jax.random.key(0),
            MODEL,
            P0,
            SCH,
            jnp.zeros((2, 2)),
            samplers.time_grid(SCH, 3),
            samplers.ddim(),
            4,
        )
    st = make()
    bad_rewards = {
        "numpy": (lambda x: jnp.asarray(np.asarray(x)[:, 0]), "reward_fn=.*traceable"),
        "integer": (lambda x: (x[:, 0] > 0).astype(jnp.int32), "reward_fn=.*floating"),
        "shape": (lambda x: x, r"reward_fn=.*shape \(64,\)"),
        "scalar": (lambda x: jnp.sum(x), r"reward_fn=.*shape \(64,\)"),
        "not callable": (3.0, "reward_fn="),
    }
    for fn, pat in bad_rewards.values():
        with pytest.raises(JaxdiffError, match=pat):
            ft.step(st, fn)
        with pytest.raises(JaxdiffError, match=pat):
            ft.run(st, fn, 1, progress=False)
    with pytest.raises(JaxdiffError, match="num_iters"):
        ft.run(st, Linear(jnp.ones(2)), 0, progress=False)
    with pytest.raises(JaxdiffError, match="eval_data"):
        ft.run(st, Linear(jnp.ones(2)), 1, eval_data=jnp.zeros((5, 3)), progress=False)
    sm = make(regularizer="score_matching")
    with pytest.raises(JaxdiffError, match="^data=None"):
        ft.step(sm, Linear(jnp.ones(2)))
    with pytest.raises(JaxdiffError, match="^data=None"):
        ft.run(sm, Linear(jnp.ones(2)), 1, progress=False)


# ------------------------------------------------------------------------------------------
# slow: a trained MLPScoreNet, the exact KL of DDPM, and the score-matching regulariser
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_slow_trained_mlp_ddpm_kl_and_score_matching():
    """Pretrain an MLPScoreNet on the 8-Gaussian data (3000 DSM steps), then fine-tune all its
    weights to push right (adam 1e-4, 300 steps, N = K = 10, batch 64). Measured (benchmark
    numbers): DDPM lambda = 0 hacks the reward (samples ~700 from the data), DDPM with the exact
    transition KL, lambda = 0.1, reaches reward ~1.9 at ~0.2 from the nearest mode, and DDIM
    with the score-matching regulariser (lambda = 10) reward ~2.6 at ~0.6."""
    data = MIX.sample(jax.random.key(20), 8192)
    net = models.MLPScoreNet(hidden=64, depth=2)
    model, params = models.as_denoiser(
        net, jax.random.key(0), jnp.zeros((1, 2)), parametrization="eps"
    )
    params = jtrain.fit(
        jax.random.key(2), model, params, SCH, data, optax.adam(2e-3), 3000,
        batch_size=256, ema_decay=0.0, progress=False,
    )  # fmt: skip
    opt = optax.adam(1e-4)
    r = Linear(jnp.array([1.0, 0.0]))
    res = {}
    for smp, reg, lam in (
        ("ddpm", "kl", 0.0),
        ("ddpm", "kl", 0.1),
        ("ddim", "score_matching", 10.0),
    ):
        st = ft.init(
            jax.random.key(3), model, params, SCH, opt,
            sampler=samplers.ddpm() if smp == "ddpm" else samplers.ddim(),
            num_steps=10, batch_size=64, regularizer=reg, reg_weight=lam,
        )  # fmt: skip
        _, h = ft.run(st, r, 300, data=data, eval_data=MEANS, progress=False)
        res[(reg, lam)] = (h["reward"][0], h["reward"][-20:].mean(), h["dist_to_data"][-20:].mean())
    r0, r_hack, d_hack = res[("kl", 0.0)]
    assert abs(r0) < 0.5 and r_hack > 50 and d_hack > 10  # reward hacking without a regulariser
    for key in (("kl", 0.1), ("score_matching", 10.0)):
        r_init, r_end, d_end = res[key]
        assert r_end > r_init + 1.0, key
        assert d_end < 1.0, key
