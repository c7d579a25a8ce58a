"""Gradient-guided optimisation (Guo et al., arXiv 2404.14743): Algorithm 1 (score fixed) and
Algorithm 2 (adaptive fine-tuning), on data on a 4-dim subspace of R^16 with exact scores.

The shared problem: ``f(x) = log sigmoid(w^T x)`` (concave, ``sup f = 0``) with
``||w_perp|| = 2 ||w_par|| = 2``, guidance ``noise = 0.5``, ``delta = 2.5``. In this regime the
look-ahead guided sampler is exact Gaussian conditioning of the prior (guidance.md 2.1), so the
plateau of Algorithm 1 is the stationary value of a 1-D Markov chain simulated in numpy (the
oracle of Theorem 2's regularised optimum), and Algorithm 2's fine-tuned mean moves by a
gradient step ``~ delta g / noise^2`` per round: gradient ascent on a concave objective whose
gap is Theta(1/K) (the logistic example that makes the first-order 1/K bound tight).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import JaxdiffError, analytic, samplers, schedules
from jaxdiff.optimize import gradient_guided as gg

D, SUB, B = 16, 4, 64
DELTA, NOISE = 2.5, 0.5
TRACES = []  # appended to each time the objective is called (eagerly or while tracing)


@pytest.fixture(scope="module")
def prob():
    with jax.enable_x64(True):
        dist = analytic.random_subspace(jax.random.PRNGKey(0), D, SUB)
        a = np.asarray(dist.basis)
        v = np.random.default_rng(5).normal(size=D)
        par = a @ (a.T @ v)
        perp = v - par
        w = jnp.asarray(par / np.linalg.norm(par) + 2.0 * perp / np.linalg.norm(perp))

        def objective(x):
            TRACES.append(1)
            return jax.nn.log_sigmoid(x @ w)

        sch = schedules.vp_linear(t_end=1e-8)  # sigma(t_end) ~ 3e-5: the r_off floor
        model, params = analytic.as_denoiser(dist, sch)
        x0 = dist.sample(jax.random.PRNGKey(9), B)
        common = dict(x_init=x0, sampler=samplers.ddim(), delta=DELTA, noise=NOISE, basis=a)
        common["optimum"] = 0.0
        return types.SimpleNamespace(
            dist=dist, a=a, w=w, f=objective, sch=sch, model=model, params=params, x0=x0,
            common=common, opt=gg.subspace_mean_optimizer(optax.sgd(0.3), a),
        )  # fmt: skip


def _alg1(prob, guidance, steps=100, rounds=40, key=0):
    st = gg.algorithm1_init(
        jax.random.PRNGKey(key), prob.model, prob.params, prob.sch, prob.f,
        guidance=guidance, steps=steps, **prob.common,
    )  # fmt: skip
    return gg.run_rounds(st, rounds, progress=False)


@pytest.fixture(scope="module")
def alg1_runs(prob):
    with jax.enable_x64(True):
        return {
            "lookahead": _alg1(prob, "lookahead"),
            "lookahead10": _alg1(prob, "lookahead", steps=10, rounds=20),
            "naive10": _alg1(prob, "naive", steps=10, rounds=20),
        }


def oracle_chain(delta, noise, rounds=200, n=200_000, seed=0):
    """Algorithm 1 with exact conditioning, in the coordinate ``u = w_par^T x`` (prior N(0, 1)).

    Look-ahead guidance with the paper's ``beta_t`` is the exact score of ``p_t(y | x_t)`` for
    Gaussian data (guidance.md 2.1), so a guided sample is a draw from the prior conditioned on
    ``g_par^T x + N(0, noise^2) = y`` with ``g = sigmoid(-u) w`` and ``y = g^T z + delta``.
    Returns the mean objective ``E log sigmoid(u)`` after each round."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=n)
    out = []
    for _ in range(rounds):
        c = 1.0 / (1.0 + np.exp(u))  # d/du log sigmoid(u)
        y = c * u + delta
        mean, var = c * y / (c**2 + noise**2), noise**2 / (c**2 + noise**2)
        u = mean + np.sqrt(var) * rng.normal(size=n)
        out.append(np.mean(-np.logaddexp(0.0, -u)))
    return np.asarray(out)


# ------------------------------------------------------------------------------------------
# Algorithm 1
# ------------------------------------------------------------------------------------------
def test_algorithm1_lookahead_reaches_the_regularised_optimum_on_the_subspace(x64, prob, alg1_runs):
    """Look-ahead raises f from its initial value to a plateau that matches the exact-
    conditioning oracle (Theorem 2's regularised optimum), with r_off at the sampler's floor.
    Measured (100 DDIM steps, B=64, 40 rounds): f -0.843 -> plateau -0.287 (oracle -0.298; the
    difference shrinks with the number of steps: DDIM bias); r_off 6.5e-5."""
    _, look = alg1_runs["lookahead"]
    f0 = look["objective_mean"][0]
    plateau = np.mean(look["objective_mean"][10:])
    oracle = np.mean(oracle_chain(DELTA, NOISE)[40:])
    print(f"f0 {f0:.3f} plateau {plateau:.4f} oracle {oracle:.4f}")
    print("r_off", look["off_subspace_ratio"].max())
    assert plateau - f0 > 0.4  # measured 0.56
    assert abs(plateau - oracle) < 0.03, (plateau, oracle)  # measured 0.005 (MC + DDIM bias)
    assert look["off_subspace_ratio"].max() < 1e-3
    # Algorithm 1 plateaus: the second half is no better than the first
    assert np.mean(look["objective_mean"][25:]) < np.mean(look["objective_mean"][10:25]) + 0.02


def test_algorithm1_naive_leaves_the_subspace(x64, alg1_runs):
    """Same rounds with a 10-step DDIM: both raise f, look-ahead stays at the floor
    (r_off < 1e-3), naive guidance's direction g (mostly off the subspace) pushes the samples off
    it (r_off > 0.1). Measured: r_off 7.1e-5 vs 0.16-0.29; f -0.843 -> -0.273 (look-ahead) /
    -0.238 (naive)."""
    _, look = alg1_runs["lookahead10"]
    _, naive = alg1_runs["naive10"]
    r_naive = naive["off_subspace_ratio"][1:]
    print("r_off look", look["off_subspace_ratio"].max(), "naive", r_naive.min(), r_naive.max())
    print("f", [(h["objective_mean"][0], np.mean(h["objective_mean"][5:])) for h in (look, naive)])
    assert look["off_subspace_ratio"].max() < 1e-3
    assert np.min(naive["off_subspace_ratio"][1:]) > 0.1
    for h in (look, naive):
        assert np.mean(h["objective_mean"][5:]) - h["objective_mean"][0] > 0.4


def test_same_key_same_history_and_sweeping_leaves_never_retraces(x64, prob, alg1_runs):
    _, h = alg1_runs["lookahead"]
    _, h2 = _alg1(prob, "lookahead")  # the compiled step is reused
    for k in h:
        if k != "wall_s":
            np.testing.assert_array_equal(h[k], h2[k])
    st = gg.algorithm1_init(
        jax.random.PRNGKey(0), prob.model, prob.params, prob.sch, prob.f,
        guidance="lookahead", steps=100, **prob.common,
    )  # fmt: skip
    gg.algorithm1_step(st)
    n = len(TRACES)
    outs = []
    for delta, noise, scale in [(0.5, 0.2, 1.0), (1.0, 0.5, 0.5), (3.0, 1.0, 2.0)]:
        swept = gg.with_config(st, delta=delta, noise=noise, scale=scale)
        outs.append(gg.algorithm1_step(swept)[0].samples)
    assert len(TRACES) == n  # no retrace, no eager call of the objective
    assert not np.allclose(outs[0], outs[1])
    with pytest.raises(JaxdiffError, match="delta"):
        gg.with_config(st, delta=-1.0)
    with pytest.raises(JaxdiffError, match="lr"):
        gg.with_config(st, lr=1.0)


def test_jit_and_per_example_rounds(x64, prob, alg1_runs):
    """A batch of 1 under the user's ``jax.jit`` gives row 0 of the batch-64 round exactly."""
    st64, _ = _alg1(prob, "lookahead", rounds=1)
    common = dict(prob.common, x_init=prob.x0[:1])
    st1 = gg.algorithm1_init(
        jax.random.PRNGKey(0), prob.model, prob.params, prob.sch, prob.f,
        guidance="lookahead", steps=100, **common,
    )  # fmt: skip
    st1, m = jax.jit(gg.algorithm1_step)(st1)
    np.testing.assert_allclose(st1.samples[0], st64.samples[0], rtol=1e-10, atol=1e-12)
    assert int(st1.round) == 1 and set(m) >= {"objective_mean", "off_subspace_ratio", "gap"}


def test_query_directions_and_targets_closed_form(x64):
    """f(x) = -||x - b||^2 / 2: grad f = b - x; per-sample and batch-mean references;
    increment and gradient-step targets."""
    rng = np.random.default_rng(0)
    b = jnp.asarray(rng.normal(size=3))
    z = jnp.asarray(rng.normal(size=(5, 3)))

    def f(x):
        return -0.5 * jnp.sum((x - b) ** 2, axis=-1)

    g, y, fz = jax.jit(lambda z: gg.query(f, z, 0.3))(z)
    np.testing.assert_allclose(g, b - z, rtol=1e-12)
    np.testing.assert_allclose(y, np.sum((b - z) * z, -1) + 0.3, rtol=1e-12)
    np.testing.assert_allclose(fz, f(z), rtol=1e-12)
    g, y, _ = jax.jit(lambda z: gg.query(f, z, 0.3, reference="mean", target="gradient"))(z)
    zbar = np.mean(np.asarray(z), 0)
    gbar = np.asarray(b) - zbar
    np.testing.assert_allclose(g, np.broadcast_to(gbar, (5, 3)), rtol=1e-12)
    np.testing.assert_allclose(y, np.full(5, gbar @ zbar + 0.3 * gbar @ gbar), rtol=1e-12)


# ------------------------------------------------------------------------------------------
# Algorithm 2
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def alg2_runs(prob):
    with jax.enable_x64(True):
        runs = []
        for seed in range(3):
            st = gg.algorithm2_init(
                jax.random.PRNGKey(seed), prob.model, prob.params, prob.sch, prob.f, prob.opt,
                steps=10, **dict(prob.common, x_init=prob.dist.sample(jax.random.PRNGKey(9 + seed), B)),
            )  # fmt: skip
            runs.append(gg.run_rounds(st, 120, progress=False))
        return runs


def test_algorithm2_keeps_improving_past_algorithm1_plateau(x64, prob, alg1_runs, alg2_runs):
    """Fine-tuning the score's mean on the new samples (DSM, SGD) moves the prior with them:
    after 120 rounds the gap is ~10x below Algorithm 1's plateau, still on the subspace.
    Measured: Algorithm 1 plateau gap 0.287; Algorithm 2 gap 0.025 / 0.024 / 0.028;
    w^T loc 0 -> 3.6-3.7."""
    plateau_gap = -np.mean(alg1_runs["lookahead"][1]["objective_mean"][10:])
    finals = [h["gap"][-1] for _, h in alg2_runs]
    print("alg1 plateau gap", plateau_gap, "alg2 final gaps", finals)
    assert max(finals) < 0.25 * plateau_gap
    assert plateau_gap - max(finals) > 0.2  # objective beyond the plateau by > 0.2 (meas. 0.26)
    for st, h in alg2_runs:
        assert h["off_subspace_ratio"].max() < 1e-3
        assert np.all(np.isfinite(h["finetune_loss"][1:]))
        # only the subspace mean moved
        np.testing.assert_array_equal(st.params.basis, prob.params.basis)
        np.testing.assert_array_equal(st.params.evals_u, prob.params.evals_u)
        loc = np.asarray(st.params.loc)
        assert np.linalg.norm(loc - prob.a @ (prob.a.T @ loc)) < 1e-10 * np.linalg.norm(loc)
        print("w^T loc", np.asarray(prob.w) @ loc)
        assert np.asarray(prob.w) @ loc > 2.0  # the mean moved toward higher f


def test_algorithm2_gap_falls_like_one_over_k(x64, alg2_runs):
    """Log-log slope of the mean gap over rounds 20..120 (3 seeds): -1 +- 0.2.
    Measured -0.962 (per seed -0.98, -0.99, -0.92). The tolerance covers the seed spread and
    the fit window (from round 10 / 30 / 40 / 60: -0.88 / -0.99 / -1.01 / -1.07; 5 seeds over
    300 rounds in the benchmark: -1.05); the 1/K asymptote K * gap ~ 3.3 is reached by round 20."""
    gaps = np.mean([h["gap"] for _, h in alg2_runs], axis=0)
    k = np.arange(gaps.shape[0])
    sel = k >= 20
    slope = np.polyfit(np.log(k[sel]), np.log(gaps[sel]), 1)[0]
    print(
        "slope",
        slope,
        [np.polyfit(np.log(k[sel]), np.log(h["gap"][sel]), 1)[0] for _, h in alg2_runs],
    )
    assert abs(slope + 1.0) < 0.2


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
def test_bad_inputs(x64, prob):
    m, p, s = prob.model, prob.params, prob.sch
    key = jax.random.PRNGKey(0)
    kw = dict(x_init=prob.x0[:4], steps=2)

    def init(f=prob.f, **extra):
        return gg.algorithm1_init(key, m, p, s, f, **{**kw, **extra})

    def uses_numpy(x):
        return jnp.asarray(np.sum(np.asarray(x), axis=-1))

    def as_ints(x):
        return jnp.round(x[:, 0]).astype(jnp.int32)

    def wrong_shape(x):
        return x

    with pytest.raises(JaxdiffError, match="objective=.*differentiable"):
        init(uses_numpy)
    with pytest.raises(JaxdiffError, match="objective=.*differentiable"):
        init(as_ints)
    with pytest.raises(JaxdiffError, match=r"objective='wrong_shape returning shape \(4, 16\)'"):
        init(wrong_shape)
    with pytest.raises(JaxdiffError, match="objective="):
        init(3.0)
    with pytest.raises(JaxdiffError, match=r"x_init='shape \(4, 15\)'"):
        init(x_init=jnp.ones((4, 15)))
    with pytest.raises(JaxdiffError, match=r"basis='shape \(15, 4\)'"):
        init(basis=np.ones((15, 4)))
    with pytest.raises(JaxdiffError, match="basis=.*orthonormal"):
        init(basis=2.0 * prob.a)
    for name in ("delta", "scale", "beta"):
        with pytest.raises(JaxdiffError, match=f"{name}=-0.1: expected a nonnegative"):
            init(**{name: -0.1})
    with pytest.raises(JaxdiffError, match="noise=0.0: expected a positive"):
        init(noise=0.0)
    with pytest.raises(JaxdiffError, match="steps=0"):
        init(steps=0)
    with pytest.raises(JaxdiffError, match="batch_size=0"):
        gg.algorithm1_init(key, m, p, s, prob.f, batch_size=0)
    with pytest.raises(JaxdiffError, match="guidance='dps'"):
        init(guidance="dps")
    with pytest.raises(JaxdiffError, match="reference="):
        init(reference="median")
    with pytest.raises(JaxdiffError, match="target="):
        init(target="newton")
    with pytest.raises(JaxdiffError, match="optimum="):
        init(optimum=np.zeros(2))
    with pytest.raises(JaxdiffError, match="rounds=0"):
        gg.run_algorithm1(key, m, p, s, prob.f, 0, progress=False, **kw)
    with pytest.raises(JaxdiffError, match="rounds=-3"):
        gg.run_algorithm2(key, m, p, s, prob.f, prob.opt, -3, progress=False, **kw)
    with pytest.raises(JaxdiffError, match="optimizer=None"):
        gg.algorithm2_init(key, m, p, s, prob.f, None, **kw)
    with pytest.raises(JaxdiffError, match="finetune_steps=0"):
        gg.algorithm2_init(key, m, p, s, prob.f, prob.opt, finetune_steps=0, **kw)
    with pytest.raises(JaxdiffError, match="finetune_start=-1"):
        gg.algorithm2_init(key, m, p, s, prob.f, prob.opt, finetune_start=-1, **kw)
    with pytest.raises(JaxdiffError, match="state="):
        gg.algorithm2_step(init())
    with pytest.raises(JaxdiffError, match="basis="):
        gg.subspace_mean_optimizer(optax.sgd(1.0), np.ones(3))
