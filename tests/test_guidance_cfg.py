"""Classifier-free guidance (jaxdiff.guidance.cfg) against exact Gaussian-mixture oracles.

Oracles: the exact conditional / unconditional predictions of ``jaxdiff.analytic`` (closed form,
float64), the exact class-conditional law ``N(mu_k, I)`` (sliced W2 against its data-vs-data floor),
the Bayes posterior of the original mixture, and the table of guidance.md 6.1 (Wu et al. arXiv
2403.01639) for the 1-D two-component setting.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.spatial import cKDTree
from scipy.special import digamma, gammaln

import jaxdiff
from jaxdiff import analytic, metrics, models, parametrize, samplers, schedules, train
from jaxdiff._checks import JaxdiffError
from jaxdiff.denoiser import Denoiser
from jaxdiff.guidance.cfg import CFG, cfg

SQUARE = np.array([[2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -2.0]])


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def knn_entropy(x, k: int = 5) -> float:
    """Kozachenko-Leonenko differential entropy estimate (nats) of samples ``x (n, d)``:
    ``psi(n) - psi(k) + log V_d + (d/n) sum_i log r_i`` with ``r_i`` the distance to the k-th
    nearest neighbour and ``V_d`` the volume of the unit d-ball (Kozachenko & Leonenko 1987;
    Kraskov et al. arXiv cond-mat/0305641 eq. 20)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    n, d = x.shape
    r = cKDTree(x).query(x, k + 1)[0][:, k]
    log_vd = 0.5 * d * np.log(np.pi) - gammaln(0.5 * d + 1.0)
    return float(digamma(n) - digamma(k) + log_vd + d * np.mean(np.log(r)))


def _mixture3(dim=2, seed=0):
    rng = np.random.default_rng(seed)
    means = 2.0 * rng.normal(size=(3, dim))
    b = rng.normal(size=(3, dim, dim))
    covs = 0.3 * b @ np.swapaxes(b, -1, -2) + 0.1 * np.eye(dim)
    return analytic.gaussian_mixture(np.array([0.2, 0.3, 0.5]), means, covs)


def _inputs(n=8, dim=2, seed=1, dtype=None):
    rng = np.random.default_rng(seed)
    dtype = dtype or jnp.result_type(float)
    x = jnp.asarray(rng.normal(size=(n, dim)) * 2.0, dtype)
    t = jnp.asarray(rng.uniform(0.05, 0.95, size=n), dtype)
    cond = jnp.asarray(rng.integers(0, 3, size=n), jnp.int32)
    return x, t, cond


def _counting_model(dist, sched, calls):
    """An eps Denoiser of ``dist`` recording the batch size of every call (eagerly)."""

    def apply(params, x, t, cond):
        calls.append(x.shape[0])
        return params.predict(x, t, sched, "eps", component=cond)

    return Denoiser(apply=apply, parametrization="eps", event_shape=(dist.dim,))


@functools.cache
def _real_cond_net():
    """An (untrained, non-zero output) MLPScoreNet with real 3-vector conditions, shared by
    tests so its initialisation compiles once."""
    net = models.MLPScoreNet(hidden=32, depth=1, cond_dim=3, zero_init_out=False)
    model, params = models.as_denoiser(
        net,
        jax.random.key(2),
        jnp.zeros((1, 2)),
        cond_example=jnp.zeros((1, 3)),
        parametrization="eps",
    )
    return net, model, params


def _bayes_class(dist, x, sched):
    """Bayes posterior ``p(y = k | x)`` of the original (t = 0) mixture, (n, K)."""
    return np.exp(np.asarray(dist.class_log_prob_t(jnp.asarray(x), 0.0, sched)))


# ------------------------------------------------------------------------------------------
# closed form
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batched", [True, False])
def test_cfg_equals_closed_form(x64, batched):
    """out = u + w (c - u) with the exact conditional (c) and unconditional (u) eps, to 1e-12."""
    sched = schedules.vp_linear()
    dist = _mixture3()
    model, params = analytic.as_denoiser(dist, sched)
    x, t, cond = _inputs()
    c = dist.eps(x, t, sched, component=cond)
    u = dist.eps(x, t, sched)
    null = analytic.NULL_CLASS if batched else None
    for w in [0.0, 0.5, 1.0, 3.0, 7.5]:
        out = cfg(model, w, null_cond=null)(params, x, t, cond)
        np.testing.assert_allclose(out, u + w * (c - u), rtol=0, atol=1e-12)
    # w = 1 is the conditional model exactly (bitwise: c + 0 * (c - u)); w = 0 the unconditional
    np.testing.assert_array_equal(cfg(model, 1.0, null_cond=null)(params, x, t, cond), c)
    np.testing.assert_allclose(cfg(model, 0.0, null_cond=null)(params, x, t, cond), u, atol=1e-12)


@pytest.mark.parametrize("param", ["x0", "v", "score", "velocity"])
def test_cfg_any_parametrization_equals_eps_space(x64, param):
    """CFG of an x0 / v / score / velocity model, converted to eps, equals CFG in eps space
    (an affine map with the same x commutes with the affine combination)."""
    sched = schedules.vp_cosine()
    dist = _mixture3(seed=3)
    m_eps, params = analytic.as_denoiser(dist, sched, "eps")
    m_p, _ = analytic.as_denoiser(dist, sched, param)
    x, t, cond = _inputs(seed=4)
    for w in [0.0, 2.5, 6.0]:
        ref = cfg(m_eps, w, null_cond=-1)(params, x, t, cond)
        g = cfg(m_p, w, null_cond=-1)
        assert g.parametrization == param
        out = parametrize.convert(g(params, x, t, cond), param, "eps", x, t, sched)
        np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-9)


def test_cfg_one_batched_call_with_null_cond():
    """null_cond given: exactly one model call on a batch of 2B; None: two calls of size B."""
    sched = schedules.vp_linear()
    dist = _mixture3()
    calls = []
    model = _counting_model(dist, sched, calls)
    x, t, cond = _inputs(n=5)
    out1 = cfg(model, 3.0, null_cond=-1)(dist, x, t, cond)
    assert calls == [10]
    calls.clear()
    out2 = cfg(model, 3.0)(dist, x, t, cond)
    assert calls == [5, 5]
    np.testing.assert_allclose(out1, out2, rtol=1e-5, atol=1e-5)


def test_cfg_per_example_scale_and_batch_independence(x64):
    """scale of shape (B,): row i equals the scalar-scale result with w_i; a batch of 1 and a
    batch of 8 give identical per-example results."""
    sched = schedules.vp_linear()
    dist = _mixture3()
    model, params = analytic.as_denoiser(dist, sched)
    x, t, cond = _inputs(n=8)
    ws = jnp.linspace(0.0, 7.0, 8)
    out = cfg(model, ws, null_cond=-1)(params, x, t, cond)
    for i in range(8):
        row = cfg(model, ws[i], null_cond=-1)(params, x[i : i + 1], t[i : i + 1], cond[i : i + 1])
        np.testing.assert_allclose(out[i : i + 1], row, rtol=0, atol=1e-13)


def test_cfg_interval_and_scale_fn(x64):
    """Outside [t_lo, t_hi] the output is the conditional prediction exactly (w = 1); inside it
    is u + w(t) (c - u) with w(t) = scale * scale_fn(t)."""
    sched = schedules.vp_linear()
    dist = _mixture3()
    model, params = analytic.as_denoiser(dist, sched)
    x, _, cond = _inputs(n=6)
    t = jnp.array([0.05, 0.2, 0.3, 0.45, 0.6, 0.9])
    c = dist.eps(x, t, sched, component=cond)
    u = dist.eps(x, t, sched)
    g = cfg(model, 4.0, null_cond=-1, interval=(0.3, 0.6), scale_fn=lambda s: 1.0 + s)
    out = g(params, x, t, cond)
    inside = np.array([False, False, True, True, True, False])
    np.testing.assert_array_equal(np.asarray(out)[~inside], np.asarray(c)[~inside])
    w = 4.0 * (1.0 + t)[:, None]
    np.testing.assert_allclose(
        np.asarray(out)[inside], np.asarray(u + w * (c - u))[inside], rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(g.guidance_scale(t, 6), np.where(inside, 4.0 * (1 + t), 1.0))


def test_cfg_real_valued_condition():
    """Real conditions (B, C): the batched call with the NaN null vector of MLPScoreNet equals
    the two-call form with cond=None, and both equal u + w (c - u) of the network's outputs."""
    net, model, params = _real_cond_net()
    x = jax.random.normal(jax.random.key(0), (6, 2))
    cond = jax.random.normal(jax.random.key(1), (6, 3))
    t = jnp.linspace(0.1, 0.9, 6)
    c = model(params, x, t, cond)
    u = model(params, x, t, None)
    assert float(jnp.max(jnp.abs(c - u))) > 1e-2  # the condition matters
    batched = jax.jit(lambda w: cfg(model, w, null_cond=net.null_cond)(params, x, t, cond))
    two_calls = jax.jit(lambda w: cfg(model, w)(params, x, t, cond))
    for w in [0.0, 2.0, 5.0]:
        a, b = batched(w), two_calls(w)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a, u + w * (c - u), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# what guidance does on Gaussian mixtures
# ------------------------------------------------------------------------------------------
WU_W = np.array([1.0, 1.5, 2.0, 3.0, 5.0, 9.0])  # eta = w - 1 = 0, 0.5, 1, 2, 4, 8
# guidance.md 6.1 (numpy run, 1000 Euler steps, N = 20000): eta -> (C, H) for ODE and SDE
WU_TABLE_ODE = {0: (0.966, 1.422), 0.5: (0.997, 1.183), 1: (0.9996, 1.047), 2: (1.0, 0.917),
                4: (1.0, 0.755), 8: (1.0, 0.641)}  # fmt: skip
WU_TABLE_SDE = {0: (0.966, 1.421), 0.5: (0.990, 1.307), 1: (0.995, 1.283), 2: (0.997, 1.273),
                4: (0.999, 1.261), 8: (0.999, 1.250)}  # fmt: skip


@pytest.mark.parametrize(
    "kind, sampler, steps",
    [
        ("ode", samplers.dpm_solver_pp(2), 100),
        ("sde", samplers.sde_dpm_solver_pp(2), 100),
    ],
)
def test_wu_two_gaussians_confidence_up_entropy_down(kind, sampler, steps):
    """Wu et al. (arXiv 2403.01639; guidance.md 6.1): 1-D 0.5 N(-2,1) + 0.5 N(2,1), target +2,
    exact scores, w = 1 + eta over eta in {0, .5, 1, 2, 4, 8}: the confidence mean sigma(2 mu x)
    rises and the kNN entropy falls (monotone within 0.01); at w = 1 mean ~ 2 and std ~ 1.

    Measured (N = 10000), ODE (DPM-Solver++(2M), 100 steps): C = .963 .998 .9996 1 1 1,
    H = 1.430 1.195 1.066 .921 .778 .656, mean/std at w = 1: 1.984 / 1.013; SDE
    (SDE-DPM-Solver++(2M), 100 steps): C = .964 .989 .994 .997 .998 .999, H = 1.424 1.319 1.292
    1.270 1.256 1.251, mean/std 1.988 / 1.008. The table's values are matched within 0.004 (C)
    and 0.025 (H); the exact C at w = 1 is E sigma(4 x), x ~ N(2, 1) = 0.9657 (quadrature)."""
    sched = schedules.vp_linear()
    dist = analytic.gaussian_mixture([0.5, 0.5], [[-2.0], [2.0]], 1.0)
    model, params = analytic.as_denoiser(dist, sched)
    n = 10000
    x_T = jax.random.normal(jax.random.key(0), (n, 1))
    cond = jnp.ones((n,), jnp.int32)

    # vmap over the scale (a leaf): one compiled program, common random numbers across w
    @jax.jit
    def run(ws):
        def one(w):
            g = cfg(model, w, null_cond=analytic.NULL_CLASS)
            key = jax.random.key(10)
            return jaxdiff.sample(key, g, params, sched, x_T, sampler, steps=steps, cond=cond)

        return jax.vmap(one)(ws)

    out = np.asarray(run(jnp.asarray(WU_W)))[..., 0]
    conf = np.array([np.mean(1.0 / (1.0 + np.exp(-4.0 * x))) for x in out])
    ent = np.array([knn_entropy(x) for x in out])
    assert np.all(np.diff(conf) >= -0.01), conf
    assert np.all(np.diff(ent) <= 0.01), ent
    assert conf[-1] - conf[0] > 0.03 and ent[0] - ent[-1] > (0.6 if kind == "ode" else 0.12)
    assert abs(out[0].mean() - 2.0) < 0.05 and abs(out[0].std() - 1.0) < 0.05
    table = WU_TABLE_ODE if kind == "ode" else WU_TABLE_SDE
    ref_c = np.array([table[e][0] for e in (0, 0.5, 1, 2, 4, 8)])
    ref_h = np.array([table[e][1] for e in (0, 0.5, 1, 2, 4, 8)])
    np.testing.assert_allclose(conf, ref_c, atol=0.005)
    np.testing.assert_allclose(ent, ref_h, atol=0.04)


def test_guidance_sharpens_2d_four_class_mixture():
    """2-D, 4 classes N(mu_k, I) at the corners of a square, exact scores, target class 0: as
    w goes 0, 1, 2, 4, 8 the Bayes posterior of class 0 (under the original mixture) rises and
    the kNN entropy falls; at w = 1 the samples follow N(mu_0, I) (sliced W2 within 1.5x of the
    exact-vs-exact floor at the same n).

    Measured (n = 4000): confidence .253 .926 .999 1 1; entropy 4.11 2.86 2.13 1.66 1.35
    (exact entropy at w = 1: log(2 pi e) = 2.84); mean SW2 / mean floor = 0.050 / 0.040 = 1.23
    with these keys (1.09 averaged over 20 draws of each)."""
    sched = schedules.vp_linear()
    dist = analytic.gaussian_mixture(None, SQUARE, 1.0)
    model, params = analytic.as_denoiser(dist, sched)
    n = 4000
    x_T = jax.random.normal(jax.random.key(0), (n, 2))
    cond = jnp.zeros((n,), jnp.int32)
    ws = jnp.array([0.0, 1.0, 2.0, 4.0, 8.0])
    sampler = samplers.dpm_solver_pp(2)

    @jax.jit
    def run(ws):
        def one(w):
            g = cfg(model, w, null_cond=-1)
            return jaxdiff.sample(
                jax.random.key(10), g, params, sched, x_T, sampler, 100, cond=cond
            )

        return jax.vmap(one)(ws)

    out = np.asarray(run(ws))
    conf = np.array([_bayes_class(dist, x, sched)[:, 0].mean() for x in out])
    ent = np.array([knn_entropy(x) for x in out])
    assert np.all(np.diff(conf) >= -0.005), conf
    assert np.all(np.diff(ent) <= 0.0), ent
    assert conf[0] < 0.3 and conf[1] > 0.9 and conf[-1] > 0.999
    assert abs(ent[1] - np.log(2 * np.pi * np.e)) < 0.1  # N(mu_0, I): entropy log(2 pi e)
    # one SW2 draw fluctuates by ~ +-30% (0.029 .. 0.055 here): average 5 of each
    target = dist.condition(0)
    keys = jax.random.split(jax.random.key(3), 15)
    sw = np.mean(
        [
            metrics.sliced_wasserstein(keys[i], out[1], target.sample(keys[5 + i], n))
            for i in range(5)
        ]
    )
    floor = np.mean(
        [metrics.sliced_wasserstein_floor(keys[10 + i], target.sample, n) for i in range(5)]
    )
    assert sw < 1.5 * floor, (sw, floor)


# ------------------------------------------------------------------------------------------
# jit / vmap / grad
# ------------------------------------------------------------------------------------------
def test_sweeping_scale_under_jit_does_not_retrace():
    sched = schedules.vp_linear()
    dist = _mixture3()
    model, params = analytic.as_denoiser(dist, sched)
    x, t, cond = _inputs()
    traces = []

    @jax.jit
    def f(g, x):
        traces.append(1)
        return g(params, x, t, cond)

    for w in [0.0, 1.0, 2.5, 8.0]:
        out = f(cfg(model, w, null_cond=-1, interval=(0.1, 0.8)), x)
        ref = cfg(model, w, null_cond=-1, interval=(0.1, 0.8))(params, x, t, cond)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert len(traces) == 1

    # through jaxdiff.sample (internally jitted): count traces of the model function
    calls = []
    counting = _counting_model(dist, sched, calls)
    kw = dict(steps=5, cond=jnp.zeros((4,), jnp.int32))
    jaxdiff.sample(jax.random.key(0), cfg(counting, 1.0, null_cond=-1), dist, sched, (4, 2), **kw)
    n = len(calls)
    for w in [2.0, 3.0, 9.0]:
        g = cfg(counting, w, null_cond=-1)
        jaxdiff.sample(jax.random.key(0), g, dist, sched, (4, 2), **kw)
    assert len(calls) == n, "changing the guidance scale recompiled the sampler"


def test_grad_of_sample_wrt_scale_matches_finite_differences(x64):
    sched = schedules.vp_linear()
    dist = analytic.gaussian_mixture(None, SQUARE, 1.0)
    model, params = analytic.as_denoiser(dist, sched)
    x_T = jax.random.normal(jax.random.key(0), (8, 2))
    cond = jnp.arange(8, dtype=jnp.int32) % 4

    def f(w):
        g = cfg(model, w, null_cond=-1)
        x = jaxdiff.sample(jax.random.key(1), g, params, sched, x_T, samplers.ddim(), 10, cond=cond)
        return jnp.mean(jnp.sum(x * jnp.asarray(SQUARE)[cond], -1))  # projection on own mean

    w0, h = 2.0, 1e-5
    value, grad = jax.jit(jax.value_and_grad(f))(w0)
    fj = jax.jit(f)
    fd = (float(fj(w0 + h)) - float(fj(w0 - h))) / (2 * h)
    grad = float(grad)
    np.testing.assert_allclose(value, fj(w0), rtol=1e-12)
    assert np.isfinite(grad) and grad > 0  # more guidance pushes samples outward
    np.testing.assert_allclose(grad, fd, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# a trained conditional network
# ------------------------------------------------------------------------------------------
def test_trained_conditional_mlp_with_label_dropout():
    """MLPScoreNet(num_classes=4) trained with label dropout (p = 0.2, null label 4) on the
    square mixture; CFG with null_cond = 4: the fraction of samples the Bayes classifier assigns
    to the target class rises with w. Measured with the library's default recipe: w = 0, 1, 2, 4
    -> .25, .95, 1, 1 (exact model: .25, .955, 1, 1; eps-prediction gave .27, .94, .975, .956)."""
    sched = schedules.vp_linear()
    dist = analytic.gaussian_mixture(None, SQUARE, 1.0)
    k1, k2 = jax.random.split(jax.random.key(0))
    y = jax.random.randint(k1, (20000,), 0, 4)
    x = jnp.asarray(SQUARE, jnp.float32)[y] + jax.random.normal(k2, (20000, 2))
    net = models.MLPScoreNet(hidden=64, depth=2, num_classes=4)
    model, p0 = models.as_denoiser(
        net, jax.random.key(1), x[:2], cond_example=y[:2], schedule=sched
    )
    state, hist = train.train(
        jax.random.key(2), model, p0, sched, (x, y), optax.adam(2e-3), 2000, batch_size=256,
        progress=False, log_every=500, cond_drop_prob=0.2, null_cond=net.null_cond,
    )  # fmt: skip
    params = state.ema_params
    n = 2000
    x_T = jax.random.normal(jax.random.key(3), (n, 2))
    cond = jnp.zeros((n,), jnp.int32)
    ws = jnp.array([0.0, 1.0, 2.0, 4.0])

    @jax.jit
    def run(ws):
        def one(w):
            g = cfg(model, w, null_cond=net.null_cond)
            s = samplers.dpm_solver_pp(2)
            return jaxdiff.sample(jax.random.key(4), g, params, sched, x_T, s, 30, cond=cond)

        return jax.vmap(one)(ws)

    out = np.asarray(run(ws))
    frac = np.array([np.mean(np.argmax(_bayes_class(dist, s, sched), -1) == 0) for s in out])
    assert np.all(np.diff(frac) >= -0.01), frac
    assert frac[0] < 0.4 and frac[1] > 0.6 and frac[2] > 0.85 and frac[3] > 0.9, frac
    assert frac[2] - frac[0] > 0.5, frac


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------
def test_bad_inputs():
    sched = schedules.vp_linear()
    dist = _mixture3()
    model, params = analytic.as_denoiser(dist, sched)
    x, t, cond = _inputs(n=4)
    g = cfg(model, 2.0, null_cond=-1)
    with pytest.raises(JaxdiffError, match="cond=None.*needs a condition"):
        g(params, x, t, None)
    with pytest.raises(JaxdiffError, match=r"cond=.*shape \(3,\).*batch axis of size 4"):
        g(params, x, t, cond[:3])
    with pytest.raises(JaxdiffError, match=r"cond=.*shape \(\).*batch axis of size 4"):
        g(params, x, t, jnp.int32(1))
    with pytest.raises(JaxdiffError, match=r"null_cond=.*shape \(2,\).*per-example shape"):
        cfg(model, 2.0, null_cond=jnp.array([-1, -1]))(params, x, t, cond)
    with pytest.raises(JaxdiffError, match="null_cond=.*integer null label"):
        cfg(model, 2.0, null_cond=0.5)(params, x, t, cond)
    with pytest.raises(JaxdiffError, match="null_cond=.*numeric"):
        cfg(model, 2.0, null_cond="none")
    with pytest.raises(JaxdiffError, match=r"scale=.*shape \(4, 2\)"):
        cfg(model, jnp.ones((4, 2)))
    with pytest.raises(JaxdiffError, match=r"scale=.*shape \(5,\)"):
        cfg(model, jnp.ones(5), null_cond=-1)(params, x, t, cond)
    with pytest.raises(JaxdiffError, match="scale=.*finite"):
        cfg(model, float("nan"))
    with pytest.raises(JaxdiffError, match="scale=.*real"):
        cfg(model, 1.0 + 2.0j)
    with pytest.raises(JaxdiffError, match="model=.*Denoiser"):
        cfg(lambda p, x, t, c: x, 2.0)
    with pytest.raises(JaxdiffError, match="interval=.*t_lo <= t_hi"):
        cfg(model, 2.0, interval=(0.8, 0.2))
    with pytest.raises(JaxdiffError, match="interval=.*pair"):
        cfg(model, 2.0, interval=0.5)
    with pytest.raises(JaxdiffError, match="scale_fn=.*function"):
        cfg(model, 2.0, scale_fn=3.0)
    # real-valued condition: null vector of the wrong length
    _, m3, p3 = _real_cond_net()
    c3 = jnp.ones((4, 3))
    with pytest.raises(JaxdiffError, match=r"null_cond=.*shape \(2,\).*\(3,\)"):
        cfg(m3, 2.0, null_cond=jnp.full((2,), jnp.nan))(p3, x, t, c3)


def test_unknown_class_ids_surface_through_cfg():
    """Unknown class ids are reported by the base model (analytic mixture, MLPScoreNet) through
    both the batched and the two-call form."""
    sched = schedules.vp_linear()
    dist = _mixture3()
    model, params = analytic.as_denoiser(dist, sched)
    x, t, _ = _inputs(n=4)
    bad = jnp.array([0, 1, 7, 2], jnp.int32)
    for null in (-1, None):
        with pytest.raises(JaxdiffError, match="cond=.*unknown id 7"):
            cfg(model, 2.0, null_cond=null)(params, x, t, bad)
    with pytest.raises(JaxdiffError, match="cond=.*unknown id 5"):  # a bad null id
        cfg(model, 2.0, null_cond=5)(params, x, t, jnp.zeros((4,), jnp.int32))
    net = models.MLPScoreNet(hidden=8, depth=1, num_classes=3)
    m, p = models.as_denoiser(
        net, jax.random.key(0), x, cond_example=jnp.zeros((4,), jnp.int32), parametrization="eps"
    )
    for null in (3, None):
        with pytest.raises(JaxdiffError, match=r"cond=.*labels in \[0, 3\]"):
            cfg(m, 2.0, null_cond=null)(p, x, t, bad)


def test_cfg_is_a_pytree_denoiser():
    """Numbers are leaves (same tree structure for any scale / interval / null value), the
    parametrization and event shape are the base model's."""
    sched = schedules.vp_linear()
    model, _ = analytic.as_denoiser(_mixture3(), sched, "v")
    g = cfg(model, 2.0, null_cond=-1, interval=(0.1, 0.5))
    h = cfg(model, jnp.float32(7.0), null_cond=2, interval=(0.2, 0.3))
    assert isinstance(g, CFG) and isinstance(g, Denoiser)
    assert g.parametrization == "v" and g.event_shape == model.event_shape
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(h)
