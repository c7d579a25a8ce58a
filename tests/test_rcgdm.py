"""Reward-directed conditional diffusion (jaxdiff.optimize.rcgdm): oracles and trained pipelines.

Oracles: the ridge closed form (numpy), the Gaussian conditioning formula (brute-force Schur
complement of the joint law of (x, y_hat)), the closed-form achieved reward
``a theta^T Sigma theta_hat / (theta_hat^T Sigma theta_hat + nu^2)`` sampled with the exact
conditional score, and the exact likelihood score ``grad log p_t(y_hat = a | x_t)`` for the
guidance variant (guidance.md 1.2, 1.4).
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import analytic, metrics, models, samplers, schedules
from jaxdiff._checks import JaxdiffError
from jaxdiff.guidance import guide
from jaxdiff.optimize import rcgdm as R

SCH = schedules.vp_linear()
OPT = optax.adam(3e-3)  # one optimizer object: the jitted fit loops are cached across tests


def _subspace_problem(dim, sub, seed=0, dtype=jnp.float32):
    """Subspace data x = A z, z ~ N(0, I_d); true reward theta = A beta with ||beta|| = 1."""
    dist = analytic.random_subspace(jax.random.key(seed), dim, sub, dtype=dtype)
    beta = jax.random.normal(jax.random.key(seed + 1), (sub,), dtype)
    theta = dist.basis @ (beta / jnp.linalg.norm(beta))
    return dist, R.LinearReward(theta, jnp.zeros((), dtype))


def _labelled(dist, true, n, seed, noise=0.1):
    x = dist.sample(jax.random.key(seed), n)
    y = true(x) + noise * jax.random.normal(jax.random.key(seed + 1), (n,), x.dtype)
    return x, y


# ------------------------------------------------------------------------------------------
# reward models
# ------------------------------------------------------------------------------------------
def test_ridge_and_linear_fits_match_numpy(x64):
    rng = np.random.default_rng(0)
    n, d = 40, 6
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.7 + 0.1 * rng.normal(size=n)
    lam = 2.5
    r = R.fit_reward("ridge", None, jnp.asarray(x), jnp.asarray(y), lam=lam)
    xc, yc = x - x.mean(0), y - y.mean()
    theta = np.linalg.solve(xc.T @ xc + lam * np.eye(d), xc.T @ yc)
    np.testing.assert_allclose(r.theta, theta, rtol=1e-10)
    np.testing.assert_allclose(r.bias, y.mean() - x.mean(0) @ theta, rtol=1e-10)
    # unregularised, no intercept: ordinary least squares
    r0 = R.fit_reward("linear", None, jnp.asarray(x), jnp.asarray(y), intercept=False)
    np.testing.assert_allclose(r0.theta, np.linalg.lstsq(x, y, rcond=None)[0], rtol=1e-10)
    assert float(r0.bias) == 0.0
    # the default ridge penalty is 1e-3 n2 (guidance.md 1.6)
    rd = R.fit_reward("ridge", None, jnp.asarray(x), jnp.asarray(y))
    th_d = np.linalg.solve(xc.T @ xc + 1e-3 * n * np.eye(d), xc.T @ yc)
    np.testing.assert_allclose(rd.theta, th_d, rtol=1e-10)
    # the fit composes with jit (checks are skipped on tracers)
    fit = jax.jit(lambda y, lam: R.fit_reward("ridge", None, jnp.asarray(x), y, lam=lam).theta)
    np.testing.assert_allclose(fit(jnp.asarray(y), lam), theta, rtol=1e-10)
    # per-example predictions: a batch of 1 and a batch of 8 agree
    np.testing.assert_allclose(r(jnp.asarray(x[:1])), r(jnp.asarray(x[:8]))[:1], rtol=1e-13)


def test_mlp_reward_fits_a_nonlinear_reward():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(768, 3)).astype(np.float32)
    f = lambda z: np.sin(2 * z[:, 0]) + z[:, 1] ** 2  # noqa: E731
    y = f(x) + 0.05 * rng.normal(size=768).astype(np.float32)
    xtr, ytr, xte = x[:512], y[:512], x[512:]
    mlp = R.fit_reward("mlp", jax.random.key(0), xtr, ytr, hidden=32, depth=1, steps=600,
                       optimizer=OPT)  # fmt: skip
    lin = R.fit_reward("ridge", None, xtr, ytr)
    resid = lambda m: np.mean((np.asarray(m(xte)) - f(xte)) ** 2) / np.var(f(xte))  # noqa: E731
    r2_mlp, r2_lin = 1 - resid(mlp), 1 - resid(lin)
    print(f"held-out R^2: mlp {r2_mlp:.3f}, linear {r2_lin:.3f}")
    assert r2_mlp > 0.9 and r2_lin < 0.5
    np.testing.assert_allclose(mlp(xte[:1]), mlp(xte[:8])[:1], rtol=1e-6)


def _bt_data(n_items, dim, num_pairs, kappa, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_items, dim))
    theta = rng.normal(size=dim)
    theta /= np.linalg.norm(theta)
    i = rng.integers(0, n_items, num_pairs)
    j = (i + rng.integers(1, n_items, num_pairs)) % n_items
    diff = kappa * (x[i] - x[j]) @ theta
    o = (rng.uniform(size=num_pairs) < 1 / (1 + np.exp(-diff))).astype(np.float64)
    return x, theta, np.stack([i, j], 1), o


def test_bradley_terry_linear_recovers_the_link_scale(x64):
    kappa = 3.0
    x, theta, pairs, o = _bt_data(400, 5, 6000, kappa)
    r = R.fit_preferences("linear", None, jnp.asarray(x), jnp.asarray(pairs), jnp.asarray(o))
    th = np.asarray(r.theta)
    cos = th @ theta / np.linalg.norm(th)
    scale = np.linalg.norm(th)
    print(f"BT linear: cos {cos:.4f}, scale {scale:.3f} (kappa {kappa})")
    assert cos > 0.995 and abs(scale / kappa - 1) < 0.1
    # the Newton solution is the minimiser: the gradient of the BT loss vanishes there
    d = x[pairs[:, 0]] - x[pairs[:, 1]]
    g = jax.grad(lambda t: R.bradley_terry_loss(jnp.asarray(d) @ t, jnp.asarray(o)))(r.theta)
    assert float(jnp.max(jnp.abs(g))) < 1e-8
    # the winner-first convention: flip the losing pairs and drop the outcome
    flipped = np.where(o[:, None] == 1, pairs, pairs[:, ::-1])
    r2 = R.fit_preferences("linear", None, jnp.asarray(x), jnp.asarray(flipped))
    np.testing.assert_allclose(r2.theta, r.theta, rtol=1e-8)


def test_bradley_terry_mlp_orders_items():
    x, theta, pairs, o = _bt_data(300, 4, 3000, 3.0, seed=1)
    r = R.fit_preferences("mlp", jax.random.key(0), x.astype(np.float32), pairs, o,
                          steps=400, optimizer=OPT, hidden=32, depth=1)  # fmt: skip
    pred, truth = np.asarray(r(x.astype(np.float32))), x @ theta
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    spearman = np.corrcoef(rank(pred), rank(truth))[0, 1]
    print(f"BT mlp: Spearman correlation with the true reward {spearman:.3f}")
    assert spearman > 0.95


def test_pseudo_labels_have_noise_nu_and_do_not_depend_on_the_batch():
    dist, true = _subspace_problem(16, 4)
    x = dist.sample(jax.random.key(5), 8192)
    nu = 0.3
    y = R.pseudo_label(jax.random.key(6), true, x, nu)
    resid = np.asarray(y - true(x))
    se = nu / np.sqrt(resid.size)
    assert abs(resid.mean()) < 4 * se
    assert abs(resid.std() / nu - 1) < 4 / np.sqrt(2 * resid.size)
    y8 = R.pseudo_label(jax.random.key(6), true, x[:8], nu)
    np.testing.assert_array_equal(y8, y[:8])
    # (a batch of 1 may take another matmul path: equal up to float32 rounding)
    np.testing.assert_allclose(R.pseudo_label(jax.random.key(6), true, x[:1], nu), y[:1], rtol=1e-6)


def test_quantile_targets_are_quantiles_of_the_fitted_reward():
    dist, true = _subspace_problem(16, 4)
    x = dist.sample(jax.random.key(2), 8192)
    qs = (0.1, 0.5, 0.99)
    a = R.quantile_targets(true, x, qs)
    np.testing.assert_allclose(a, np.quantile(np.asarray(true(x)), qs), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# the closed-form oracle
# ------------------------------------------------------------------------------------------
def test_conditioning_formula_matches_the_joint_gaussian(x64):
    rng = np.random.default_rng(2)
    d = 5
    m = rng.normal(size=d)
    lo = rng.normal(size=(d, d))
    cov = lo @ lo.T + 0.1 * np.eye(d)
    th, nu, b, a = rng.normal(size=d), 0.4, 0.3, 1.7
    mu_a, cov_a = R.linear_gaussian_conditional(m, cov, th, nu, a, bias=b)
    # brute force: the joint covariance of (x, y_hat) and its Schur complement
    joint = np.zeros((d + 1, d + 1))
    joint[:d, :d] = cov
    joint[:d, d] = joint[d, :d] = cov @ th
    joint[d, d] = th @ cov @ th + nu**2
    mean_y = th @ m + b
    np.testing.assert_allclose(mu_a, m + joint[:d, d] / joint[d, d] * (a - mean_y), rtol=1e-12)
    schur = joint[:d, :d] - np.outer(joint[:d, d], joint[d, :d]) / joint[d, d]
    np.testing.assert_allclose(cov_a, schur, rtol=1e-12, atol=1e-14)


def test_exact_conditional_score_achieves_the_closed_form_reward():
    """x | y_hat = a sampled with its EXACT score (DPM-Solver++(2M), 30 steps): the mean true reward
    equals a theta^T Sigma theta_hat / (theta_hat^T Sigma theta_hat + nu^2) within 3 standard
    errors, and its variance theta^T Sigma_a theta within 15% (MC error 3%)."""
    dim, sub, n2, nu, n = 64, 16, 200, 0.3, 2000
    dist, true = _subspace_problem(dim, sub)
    x_l, y_l = _labelled(dist, true, n2, seed=10)
    r_hat = R.fit_reward("ridge", None, x_l, y_l)
    targets = jnp.asarray([-2.0, 0.5, 3.0])
    cov = dist.cov()
    th, thh = true.theta, r_hat.theta
    slope = float(th @ cov @ thh / (thh @ cov @ thh + nu**2))
    assert 0.85 < slope < 0.95  # nu = 0.3 and theta_hat != theta shrink it below 1

    @jax.jit
    def achieved(a):
        g = R.exact_conditional(dist, r_hat, nu, a)
        model, params = analytic.as_denoiser(g, SCH)
        x = samplers.sample(
            jax.random.key(7),
            model,
            params,
            SCH,
            (n, dim),
            samplers.dpm_solver_pp(2),
            30,
            final_denoise=True,
        )
        return true(x)

    rewards = np.asarray(jax.lax.map(achieved, targets))
    closed = np.asarray(R.conditional_expected_reward(dist, true, r_hat, nu, targets))
    np.testing.assert_allclose(closed, slope * (targets - r_hat.bias), rtol=1e-5)
    se = rewards.std(1, ddof=1) / np.sqrt(n)
    z = (rewards.mean(1) - closed) / se
    print("achieved", rewards.mean(1), "closed form", closed, "z", z)
    assert np.all(np.abs(z) < 3.0)
    # the conditional variance of the true reward is theta^T Sigma_a theta (< 1)
    var_a = float(th @ (cov - jnp.outer(cov @ thh, cov @ thh) / (thh @ cov @ thh + nu**2)) @ th)
    print("variance", rewards.var(1, ddof=1), "exact", var_a)
    np.testing.assert_allclose(rewards.var(1, ddof=1), var_a, rtol=0.15)


# ------------------------------------------------------------------------------------------
# guidance variant
# ------------------------------------------------------------------------------------------
class _ExactMu:
    """mu(x_t, t) = E[y_hat | x_t] = theta_hat^T x0_hat(x_t) + b_hat and 1 / Var(y_hat | x_t)."""

    def __init__(self, dist, r_hat, nu):
        self.dist, self.r, self.nu = dist, r_hat, nu
        w = dist.evecs_u.T @ (dist.basis.T @ r_hat.theta)
        self.w2, self.lam = w**2, dist.evals_u

    def __call__(self, x, t):
        return self.dist.x0(x, t, SCH) @ self.r.theta + self.r.bias

    def inv_var(self, t):
        a, s = SCH.alpha_sigma(t)
        c = a[:, None] ** 2 * self.lam + s[:, None] ** 2
        post = jnp.sum(self.w2 * self.lam * s[:, None] ** 2 / c, -1)
        return 1.0 / (post + self.nu**2)


def test_reward_guidance_with_the_exact_predictor_is_the_exact_conditional():
    """guide(unconditional, G = gamma_t (a - mu) grad mu) with mu = E[y_hat | x_t] and
    gamma_t = 1 / Var(y_hat | x_t) equals the exact model of x | y_hat = a (guidance.md 1.2).
    The term is per example (a batch of 1 gives the first row of a batch of 16) and linear in
    gamma."""
    dist, true, r_hat, *_ = _pipeline_data()
    nu, a = 0.2, 1.3
    mu = _ExactMu(dist, r_hat, nu)
    uncond, p_u = analytic.as_denoiser(dist, SCH)
    exact, p_e = analytic.as_denoiser(R.exact_conditional(dist, r_hat, nu, a), SCH)
    x = jax.random.normal(jax.random.key(0), (16, 16))
    t = jnp.linspace(0.02, 0.98, 16)

    def guided(gamma, x, t):
        return guide(uncond, SCH, R.reward_guidance(mu, a, gamma, gamma_fn=mu.inv_var))(p_u, x, t)

    @jax.jit
    def eps(x, t):
        ref = jax.value_and_grad(lambda z: mu(z[None], t[:1])[0])(x[0])
        e_u = uncond(p_u, x, t)
        return (guided(1.0, x, t), exact(p_e, x, t), e_u, guided(1.0, x[:1], t[:1]),
                guided(2.0, x, t) - e_u, ref)  # fmt: skip

    e_g, e_x, e_u, e_one, g2, (m0, g0) = eps(x, t)
    err = float(jnp.max(jnp.abs(e_g - e_x)) / jnp.max(jnp.abs(e_x)))
    print(f"guided vs exact conditional eps: max relative error {err:.2e}")
    assert err < 1e-4  # float32 (float64: 2e-14)
    assert float(jnp.max(jnp.abs(e_u - e_x))) > 0.1  # without the term they differ by O(1)
    np.testing.assert_allclose(e_one, e_g[:1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g2, 2 * (e_g - e_u), rtol=1e-3, atol=1e-4)
    # G = gamma_t (a - mu) grad mu, with eps~ = eps - sigma G, against autodiff of one example
    g_0 = -(e_g - e_u)[0] / SCH.sigma(t[0])
    np.testing.assert_allclose(g_0, mu.inv_var(t[:1])[0] * (a - m0) * g0, rtol=1e-3, atol=1e-3)


@functools.cache
def _noisy_reward():
    """A time-conditioned reward predictor trained on x_t (R^16, 4-dim subspace)."""
    dist, true, _, x, _ = _pipeline_data()
    nu = 0.2
    y = R.pseudo_label(jax.random.key(1), true, x, nu)
    mu, hist = R.train_noisy_reward(jax.random.key(2), x, y, SCH, steps=400, batch_size=256,
                                    module=R.NoisyRewardMLP(hidden=32, depth=1),
                                    optimizer=OPT)  # fmt: skip
    return dist, true, nu, mu, hist


def test_noisy_reward_predictor_learns_the_posterior_mean_reward():
    """The reward predictor trained on x_t approximates E[y_hat | x_t] = theta^T x0_hat(x_t) (its
    oracle for subspace data): R^2 > 0.9 at t = 0.1, 0.25 and 0.4 on fresh noised data."""
    dist, true, nu, mu, hist = _noisy_reward()
    oracle = _ExactMu(dist, true, nu)
    x0 = dist.sample(jax.random.key(9), 1024)

    @jax.jit
    def r2(t):
        t = jnp.full((1024,), t)
        a, s = SCH.alpha_sigma(t)
        xt = a[:, None] * x0 + s[:, None] * jax.random.normal(jax.random.key(10), x0.shape)
        m, ex = mu(xt, t), oracle(xt, t)
        return 1 - jnp.mean((m - ex) ** 2) / jnp.var(ex), jnp.var(ex)

    out = [tuple(float(v) for v in r2(t)) for t in (0.1, 0.25, 0.4)]
    print("noisy reward R^2 (and Var E[y|x_t]) at t = 0.1, 0.25, 0.4:", out, hist["loss"][-1])
    assert all(r > 0.9 for r, _ in out)
    assert out[2][1] < 0.5 * out[0][1]  # the signal it must learn shrinks with the noise


# ------------------------------------------------------------------------------------------
# the pipeline (one small trained pipeline shared by the tests: compiled programs are reused)
# ------------------------------------------------------------------------------------------
NET = models.MLPScoreNet(hidden=128, depth=1, cond_dim=1, embed_dim=16)
PIPE_STEPS = 1000
PIPE_OPT = optax.adam(optax.cosine_decay_schedule(5e-3, PIPE_STEPS, alpha=0.05))
PIPE_KW = dict(net=NET, optimizer=PIPE_OPT, batch_size=256, ema_decay=0.99, cond_drop_prob=0.1)
SWEEP_KW = dict(steps=30)  # every sweep: 3 targets x 1024 samples, one compiled program


@functools.partial(jax.jit, static_argnames=("cfg",))
def _sample_jit(pipe, a, w, cfg=False):
    """1024 samples at target a (traced), with CFG scale w when cfg (one compile per branch)."""
    return R.sample(pipe, jax.random.key(0), a, 1024, cfg_scale=w if cfg else None, **SWEEP_KW)


@functools.cache
def _pipeline_data():
    """R^16 with a 4-dim subspace: 8192 unlabelled points, 64 labelled ones, a ridge reward."""
    dist, true = _subspace_problem(16, 4, seed=7)
    x_u = dist.sample(jax.random.key(0), 8192)
    x_l, y_l = _labelled(dist, true, 64, seed=20)
    r_hat = R.fit_reward("ridge", None, x_l, y_l)
    return dist, true, r_hat, x_u, 0.1


@functools.cache
def _pipeline():
    dist, true, r_hat, x_u, nu = _pipeline_data()
    pipe, hist = R.run(jax.random.key(1), x_u, r_hat, nu, steps=PIPE_STEPS, progress=False,
                       log_every=500, **PIPE_KW)  # fmt: skip
    return dist, true, r_hat, nu, x_u, pipe, hist


@pytest.mark.slow  # trains two networks; the exact-score tests cover the pipeline by default
def test_small_trained_pipeline_moves_the_reward_toward_the_target():
    """Default-run version of the R^64 experiment: R^16 with a 4-dim subspace, 64 labelled points,
    a small MLP trained briefly. The achieved reward rises with a and tracks the closed form
    (within 10%) inside the reliable range; predicted and achieved rewards agree; samples stay
    near the subspace (off-subspace ratio < 0.1)."""
    dist, true, r_hat, nu, _, pipe, hist = _pipeline()
    targets = jnp.asarray([-1.5, 0.0, 1.5])
    out = R.sweep_targets(pipe, jax.random.key(2), targets, 1024, true_reward=true,
                          basis=dist.basis, **SWEEP_KW)  # fmt: skip
    closed = np.asarray(R.conditional_expected_reward(dist, true, r_hat, nu, targets))
    print("achieved", out["achieved"], "closed", closed, "r_off", out["off_support"])
    assert hist["loss"][-1] < hist["loss"][0]
    assert np.all(out["in_range"])
    assert out["achieved"][0] < out["achieved"][1] < out["achieved"][2]
    assert np.all(np.abs(out["achieved"][[0, 2]] / closed[[0, 2]] - 1) < 0.1)
    np.testing.assert_allclose(out["predicted"], out["achieved"], atol=0.1)
    assert np.all(out["off_support"] < 0.1)


def test_run_equals_init_followed_by_steps():
    dist, true, r_hat, nu, x_u, pipe_ref, _ = _pipeline()
    pipe, hist = R.run(jax.random.key(1), x_u, r_hat, nu, steps=3, progress=False, log_every=2,
                       **PIPE_KW)  # fmt: skip
    manual = R.init(jax.random.key(1), x_u, r_hat, nu, **PIPE_KW)
    step = jax.jit(R.step)
    losses = []
    for _ in range(3):
        manual, m = step(manual)
        losses.append(float(m["loss"]))
    assert int(pipe.train.step) == int(manual.train.step) == 3
    for a, b in zip(jax.tree.leaves(pipe.train), jax.tree.leaves(manual.train), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hist["loss"], [np.mean(losses[:2]), losses[2]], rtol=1e-5)
    assert list(hist["step"]) == [2, 3]
    # the stored scaler maps the pseudo-labels to mean 0, std 1; the same key gives the same labels
    c = np.asarray(pipe.cond[:, 0])
    assert abs(c.mean()) < 1e-5 and abs(c.std() - 1) < 1e-5
    np.testing.assert_allclose(
        pipe.scaler.encode(pipe.y_hat), pipe.cond[:, 0], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(pipe.y_hat, pipe_ref.y_hat)


def test_sweeping_targets_and_gamma_never_recompiles():
    pipe = _pipeline()[5]
    size = _sample_jit._cache_size()
    outs = [_sample_jit(pipe, jnp.float32(a), 1.0) for a in (-1.0, 0.5, 1.0)]
    assert _sample_jit._cache_size() <= size + 1  # at most the first call compiles
    rew = [float(jnp.mean(pipe.reward(o))) for o in outs]
    assert rew[0] < rew[1] < rew[2]  # the traced target did reach the network
    # a new grid of targets of the same length reuses the compiled sweep
    R.sweep_targets(pipe, jax.random.key(1), jnp.asarray([0.0, 0.5, 1.0]), 1024, **SWEEP_KW)
    size = R._sweep_jit._cache_size()
    R.sweep_targets(pipe, jax.random.key(1), jnp.asarray([0.1, 0.7, -0.3]), 1024, **SWEEP_KW)
    assert R._sweep_jit._cache_size() == size
    # reward-guidance target and gamma are leaves
    dist, _, _, mu, _ = _noisy_reward()
    uncond, p_u = analytic.as_denoiser(dist, SCH)
    traces = []

    @jax.jit
    def g(term, x):
        traces.append(1)
        return guide(uncond, SCH, term)(p_u, x, 0.5)

    x = jnp.ones((3, 16))
    for a, gam in [(0.0, 1.0), (1.0, 2.0), (2.0, 0.5)]:
        g(R.reward_guidance(mu, a, gam), x)
    assert len(traces) == 1


def test_cfg_at_scale_one_is_the_conditional_model_and_samples_are_per_example():
    pipe = _pipeline()[5]
    a = jnp.float32(0.5)
    plain = _sample_jit(pipe, a, 1.0)
    w1 = _sample_jit(pipe, a, 1.0, cfg=True)
    np.testing.assert_allclose(w1, plain, rtol=1e-5, atol=1e-5)
    w3 = _sample_jit(pipe, jnp.float32(1.5), 3.0, cfg=True)
    w1b = _sample_jit(pipe, jnp.float32(1.5), 1.0, cfg=True)
    # guidance strength w > 1 pushes the predicted reward further toward the target side
    r3, r1 = float(jnp.mean(pipe.reward(w3))), float(jnp.mean(pipe.reward(w1b)))
    print(f"mean predicted reward at a = 1.5: w=1 {r1:.3f}, w=3 {r3:.3f}")
    assert r3 > r1 + 0.05
    # a sample does not depend on the batch size (per-row prior noise, per-example network)
    one = R.sample(pipe, jax.random.key(0), a, 1, **SWEEP_KW)
    np.testing.assert_allclose(one, plain[:1], rtol=1e-5, atol=1e-5)
    with pytest.raises(JaxdiffError, match="cfg_scale.*label dropout"):
        R.sample(
            pipe.replace(cond_drop_prob=0.0), jax.random.key(0), 0.5, 4, steps=2, cfg_scale=2.0
        )


def test_target_outside_the_reliable_range_warns_with_the_range():
    pipe = _pipeline()[5]
    lo, hi = (float(v) for v in pipe.reliable)
    assert lo < -2.0 and hi > 2.0  # ~ +-2.6 std of the pseudo-labels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        R.check_targets(pipe, jnp.asarray([0.5 * (lo + hi), lo, hi]))  # inside: no warning
    pattern = rf"a=.*outside the reliable range \[{lo:.4g}, {hi:.4g}\].*0.5%-99.5% quantiles"
    with pytest.warns(R.ExtrapolationWarning, match=pattern):
        R.check_targets(pipe, hi + 1.0)
    # sample checks its targets first (here it then rejects the shape: nothing is compiled)
    with pytest.warns(R.ExtrapolationWarning, match=pattern):
        with pytest.raises(JaxdiffError, match="scalar target"):
            R.sample(pipe, jax.random.key(0), jnp.full((3,), hi + 1.0), 1024)
    with pytest.warns(R.ExtrapolationWarning, match="outside the reliable range"):
        out = R.sweep_targets(pipe, jax.random.key(0), jnp.asarray([0.0, lo - 2.0, 1.0]), 1024,
                              **SWEEP_KW)  # fmt: skip
    assert list(out["in_range"]) == [True, False, True]


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
def test_too_few_labelled_points_raise_with_the_counts():
    x = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    y = x.sum(1)
    with pytest.raises(JaxdiffError, match=r"at least 17 labelled points.*n2=16 <= D=16"):
        R.fit_reward("linear", None, x, y)
    R.fit_reward("ridge", None, x, y)  # a penalty makes it well posed
    with pytest.raises(JaxdiffError, match="1 labelled point.*at least 2"):
        R.fit_reward("ridge", None, x[:1], y[:1])
    with pytest.raises(JaxdiffError, match="1 labelled point.*at least 2"):
        R.fit_reward("mlp", jax.random.key(0), x[:1], y[:1])
    with pytest.raises(JaxdiffError, match=r"3 comparisons.*at least 16 comparisons"):
        R.fit_preferences("linear", None, x, np.array([[0, 1], [1, 2], [2, 3]]))
    with pytest.raises(JaxdiffError, match="kind='quadratic'.*one of"):
        R.fit_reward("quadratic", None, x, y)


def test_non_finite_labels_and_inputs_name_the_index():
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    y = x.sum(1)
    y[7] = np.nan
    with pytest.raises(JaxdiffError, match=r"y=.*finite labels \(y\[7\] = nan\)"):
        R.fit_reward("ridge", None, x, y)
    y[7], y[3] = 0.0, np.inf
    with pytest.raises(JaxdiffError, match=r"y\[3\] = inf"):
        R.fit_reward("mlp", jax.random.key(0), x, y)
    x[5, 2] = np.nan
    with pytest.raises(JaxdiffError, match=r"x=.*row 5 holds NaN"):
        R.fit_reward("ridge", None, x, np.zeros(30, np.float32))
    with pytest.raises(JaxdiffError, match=r"x_unlabelled=.*row 5"):
        R.init(jax.random.key(0), x, R.LinearReward(jnp.ones(4), 0.0), 0.1)
    with pytest.raises(JaxdiffError, match=r"nu=-0.1.*>= 0"):
        R.pseudo_label(jax.random.key(0), R.LinearReward(jnp.ones(4), 0.0), x[:5], -0.1)


def test_bad_preferences_raise():
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(JaxdiffError, match=r"pairs\[1\] = \(0, 10\).*\[0, 10\).*missing item"):
        R.fit_preferences("ridge", None, x, np.array([[1, 2], [0, 10]]))
    with pytest.raises(JaxdiffError, match=r"pairs\[0\] = \(-1, 2\).*missing item"):
        R.fit_preferences("ridge", None, x, np.array([[-1, 2]]))
    with pytest.raises(JaxdiffError, match=r"pairs\[1\] = \(4, 4\).*two different items"):
        R.fit_preferences("ridge", None, x, np.array([[1, 2], [4, 4]]))
    with pytest.raises(JaxdiffError, match=r"outcome\[1\] = 2.*\{0, 1\}"):
        R.fit_preferences("ridge", None, x, np.array([[1, 2], [3, 4]]), np.array([1.0, 2.0]))
    with pytest.raises(JaxdiffError, match=r"pairs=.*\(P, 2\)"):
        R.fit_preferences("ridge", None, x, np.array([1, 2]))
    with pytest.raises(JaxdiffError, match=r"outcome=.*one outcome per pair"):
        R.fit_preferences("ridge", None, x, np.array([[1, 2], [3, 4]]), np.ones(3))


def test_other_bad_arguments_raise():
    pipe = _pipeline()[5]
    with pytest.raises(JaxdiffError, match=r"qs=.*quantiles in \[0, 1\]"):
        R.quantile_targets(pipe.reward, pipe.x, (0.5, 1.5))
    with pytest.raises(JaxdiffError, match=r"a=.*scalar target or shape \(4,\)"):
        R.sample(pipe, jax.random.key(0), jnp.zeros(3), 4, steps=2, warn=False)
    with pytest.raises(JaxdiffError, match=r"targets=.*1-D"):
        R.sweep_targets(pipe, jax.random.key(0), 0.5, 4)
    with pytest.raises(JaxdiffError, match=r"reliable_q=.*0 <= lo < hi <= 1"):
        R.init(jax.random.key(0), pipe.x, pipe.reward, 0.1, reliable_q=(0.9, 0.1))
    with pytest.raises(JaxdiffError, match=r"gamma=.*finite"):
        R.reward_guidance(lambda x, t: x[:, 0], 1.0, np.inf)
    with pytest.raises(JaxdiffError, match=r"reward=.*varies"):
        R.init(jax.random.key(0), pipe.x, R.LinearReward(jnp.zeros(16), 0.0), 0.0)


# ------------------------------------------------------------------------------------------
# the R^64 / 16-dim experiment with trained networks (slow; benchmarks/rcgdm.py is the full one)
# ------------------------------------------------------------------------------------------
def _r64_pipe(labels: str, steps: int = 6000):
    """The benchmark's R^64 / 16-dim setting (benchmarks/rcgdm.py): n1 = 65536, n2 = 1024."""
    dist, true = _subspace_problem(64, 16)
    x_u = dist.sample(jax.random.key(2), 65536)
    x_l, y_l = _labelled(dist, true, 1024, seed=30)
    if labels == "real":
        r_hat = R.fit_reward("ridge", None, x_l, y_l)
        nu = 0.1
    else:
        rng = np.random.default_rng(0)
        f = np.asarray(true(x_l))
        i = rng.integers(0, 1024, 4096)
        j = (i + rng.integers(1, 1024, 4096)) % 1024
        o = (rng.uniform(size=4096) < 1 / (1 + np.exp(-4.0 * (f[i] - f[j])))).astype(np.float32)
        r_hat = R.fit_preferences("ridge", None, x_l, np.stack([i, j], 1), o)
        nu = 0.1 * float(jnp.std(r_hat(x_u)))
    net = models.MLPScoreNet(hidden=128, depth=3, cond_dim=1)
    opt = optax.adam(optax.cosine_decay_schedule(2e-3, steps, alpha=0.05))
    pipe, _ = R.run(jax.random.key(5), x_u, r_hat, nu, steps=steps, net=net, optimizer=opt,
                    progress=False, log_every=1000)  # fmt: skip
    return dist, true, r_hat, nu, x_u, pipe


@pytest.mark.slow
@pytest.mark.parametrize("labels", ["real", "preference"])
def test_r64_trained_model_tracks_the_closed_form_in_range(labels):
    """Trained v-prediction MLP on R^64 / 16-dim subspace data: inside the reliable range the
    achieved true reward is within 10% of the closed form and the off-subspace ratio is < 0.05;
    at 6 std beyond it the ratio is > 3x larger (the reward / distribution-shift trade-off).
    Targets are quantiles of f_hat inside the range (the only scale a Bradley-Terry reward has)
    and mean + k std beyond it."""
    dist, true, r_hat, nu, x_u, pipe = _r64_pipe(labels)
    f_u = r_hat(x_u)
    mean, std = float(jnp.mean(f_u)), float(jnp.std(f_u))
    inside = R.quantile_targets(r_hat, x_u, jax.scipy.stats.norm.cdf(np.asarray([0.5, 1.0, 2.0])))
    targets = jnp.concatenate([inside, jnp.asarray([mean + 4.0 * std, mean + 6.0 * std])])
    with pytest.warns(R.ExtrapolationWarning):
        out = R.sweep_targets(pipe, jax.random.key(6), targets, 2048, true_reward=true,
                              basis=dist.basis)  # fmt: skip
    closed = np.asarray(R.conditional_expected_reward(dist, true, r_hat, nu, targets))
    rel = out["achieved"] / closed - 1
    print(labels, "achieved", out["achieved"], "closed", closed, "r_off", out["off_support"])
    assert list(out["in_range"]) == [True, True, True, False, False]
    assert np.all(np.diff(out["achieved"]) > 0)
    assert np.all(np.abs(rel[:3]) < 0.10)
    assert np.all(out["off_support"][:3] < 0.05)
    assert out["off_support"][-1] > 3 * out["off_support"][:3].mean()


@pytest.mark.slow
def test_trained_noisy_reward_guidance_tracks_the_closed_form():
    """The guidance variant end to end: a reward predictor trained on x_t guides the exact
    unconditional scores; the mean reward at a = -1.5, 0, 1.5 tracks the closed form (25%)."""
    dist, true, _, x, _ = _pipeline_data()
    nu = 0.2
    y = R.pseudo_label(jax.random.key(1), true, x, nu)
    mu, _ = R.train_noisy_reward(jax.random.key(2), x, y, SCH, steps=1500, optimizer=OPT,
                                 module=R.NoisyRewardMLP(hidden=64, depth=2))  # fmt: skip
    oracle = _ExactMu(dist, true, nu)
    uncond, p_u = analytic.as_denoiser(dist, SCH)

    def run(a):
        term = R.reward_guidance(mu, a, 1.0, gamma_fn=oracle.inv_var)
        xs = samplers.sample(jax.random.key(3), guide(uncond, SCH, term), p_u, SCH, (2048, 16),
                             samplers.ddim(), 40, final_denoise=True)  # fmt: skip
        return jnp.mean(true(xs)), jnp.mean(metrics.off_subspace_ratio(xs, dist.basis))

    targets = jnp.asarray([-1.5, 0.0, 1.5])
    got, off = (np.asarray(v) for v in jax.jit(lambda a: jax.lax.map(run, a))(targets))
    closed = np.asarray(R.conditional_expected_reward(dist, true, true, nu, targets))
    print("noisy-reward guidance: achieved", got, "closed form", closed, "r_off", off)
    assert got[0] < got[1] < got[2]
    assert np.all(np.abs(got[[0, 2]] / closed[[0, 2]] - 1) < 0.25)
