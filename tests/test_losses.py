"""Tests for jaxdiff.losses against the exact denoiser of Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import losses, schedules
from jaxdiff._checks import JaxdiffError
from jaxdiff.denoiser import Denoiser

KEY = jax.random.PRNGKey(0)
D = 3
S = 0.7  # data std: x0 ~ N(mu, S^2 I)
MU = jnp.array([1.0, -2.0, 0.5])
SCHED = schedules.vp_linear()
NB = 256  # batch of the small tests (one shape: fewer compilations)


def _exact_eps(mu, x, t, cond):
    """E[eps | x_t] for x0 ~ N(mu, S^2 I): sigma (x - alpha mu) / (alpha^2 S^2 + sigma^2)."""
    a, s = SCHED.alpha_sigma(t)
    a, s = a[:, None], s[:, None]
    return s * (x - a * mu) / (a**2 * S**2 + s**2)


EXACT = Denoiser(apply=_exact_eps, parametrization="eps", event_shape=(D,))


def _gauss_data(key, n):
    return MU + S * jax.random.normal(key, (n, D))


def _residual_variance(lam):
    """D alpha^2 S^2 / (alpha^2 S^2 + sigma^2) as a function of the half log-SNR (VP)."""
    a2 = 1.0 / (1.0 + np.exp(-2.0 * lam))
    return D * a2 * S**2 / (a2 * S**2 + (1.0 - a2))


@pytest.fixture(scope="module")
def x0_big():
    return _gauss_data(jax.random.PRNGKey(1), 100_000)


@pytest.mark.parametrize("t_sampling", ["uniform", "log_snr"])
def test_exact_denoiser_reaches_the_irreducible_minimum(x0_big, t_sampling):
    def per_example(mu):
        return losses.dsm_loss_per_example(mu, KEY, EXACT, SCHED, x0_big, t_sampling=t_sampling)

    both = jax.jit(jax.vmap(per_example))(jnp.stack([MU, MU + 0.3]))
    per, worse = np.asarray(both, np.float64)
    t_lo, t_hi = float(SCHED.t_end), float(SCHED.t_start)
    if t_sampling == "uniform":
        ts = np.linspace(t_lo, t_hi, 200_001)
        lam = np.asarray(SCHED.lam(jnp.asarray(ts)), np.float64)
    else:
        lam_hi, lam_lo = float(SCHED.lam(t_lo)), float(SCHED.lam(t_hi))
        lam = np.linspace(lam_lo, lam_hi, 200_001)
    expected = np.trapezoid(_residual_variance(lam), dx=1.0) / (lam.size - 1)
    stderr = per.std() / np.sqrt(per.size)
    assert abs(per.mean() - expected) < 4 * stderr, (per.mean(), expected, stderr)
    # a wrong mean is measurably worse (paired with the same t and noise)
    diff = worse - per
    assert diff.mean() > 10 * diff.std() / np.sqrt(diff.size)


def test_gradient_vanishes_at_the_true_mean(x0_big):
    x0 = x0_big[:50_000]

    @jax.jit
    def per_example_grads(mu):
        # forward mode: D tangents (reverse mode would need one pass per example)
        return jax.jacfwd(lambda m: losses.dsm_loss_per_example(m, KEY, EXACT, SCHED, x0))(mu)

    g = np.asarray(per_example_grads(MU), np.float64)  # (n, D)
    mean, stderr = g.mean(0), g.std(0) / np.sqrt(g.shape[0])
    assert np.all(np.abs(mean) < 4 * stderr), (mean, stderr)
    g_off = np.asarray(per_example_grads(MU + 0.2), np.float64).mean(0)
    assert np.all(np.abs(g_off) > 10 * stderr)  # and points back towards MU
    assert np.all(np.sign(g_off) == 1.0)


def test_weightings_match_their_formulas():
    t = jnp.linspace(0.01, 1.0, 50)
    a, s = SCHED.alpha_sigma(t)
    snr = a**2 / s**2
    beta = SCHED.beta(t)  # g(t)^2 of the VP-linear SDE in closed form
    g = 5.0

    def w(name, target="eps", sched=SCHED, tt=t):
        return losses.loss_weight(tt, sched, name, target, min_snr_gamma=g)

    rtol = 2e-5
    np.testing.assert_allclose(w("none"), 1.0)
    np.testing.assert_allclose(w("snr"), snr, rtol=rtol)
    np.testing.assert_allclose(w("min_snr", "eps"), np.minimum(snr, g) / snr, rtol=rtol)
    np.testing.assert_allclose(w("min_snr", "x0"), np.minimum(snr, g), rtol=rtol)
    np.testing.assert_allclose(w("min_snr", "v"), np.minimum(snr, g) / (snr + 1), rtol=rtol)
    np.testing.assert_allclose(w("likelihood", "eps"), beta / s**2, rtol=1e-4)
    np.testing.assert_allclose(w("likelihood", "x0"), beta / s**2 * snr, rtol=1e-4)
    np.testing.assert_allclose(w("likelihood", "score"), beta, rtol=1e-4)  # g^2 in score space
    edm = schedules.edm()
    sig = jnp.linspace(0.01, 80.0, 50)  # EDM: t = sigma_tilde
    sd2 = 0.25
    np.testing.assert_allclose(w("edm", "x0", edm, sig), (sig**2 + sd2) / (sig**2 * sd2), rtol=rtol)
    np.testing.assert_allclose(w("edm", "eps", edm, sig), (sig**2 + sd2) / sd2, rtol=rtol)


def test_weighted_loss_is_weight_times_unweighted():
    x0 = _gauss_data(jax.random.PRNGKey(2), NB)
    # the time drawn per example comes from the first of three subkeys
    t = losses.sample_times(jax.random.split(KEY, 3)[0], SCHED, NB)
    base = losses.dsm_loss_per_example(MU + 0.1, KEY, EXACT, SCHED, x0)
    for name in losses.WEIGHTINGS:
        got = losses.dsm_loss_per_example(MU + 0.1, KEY, EXACT, SCHED, x0, weighting=name)
        np.testing.assert_allclose(got, losses.loss_weight(t, SCHED, name) * base, rtol=1e-5)
    mean = losses.dsm_loss(MU + 0.1, KEY, EXACT, SCHED, x0, reduce="mean")
    np.testing.assert_allclose(mean, np.mean(base) / D, rtol=1e-6)
    # jit gives the eager result
    jitted = jax.jit(losses.dsm_loss_per_example)(MU + 0.1, KEY, EXACT, SCHED, x0)
    np.testing.assert_allclose(jitted, base, rtol=1e-4, atol=1e-7)  # XLA fusion may reorder


def test_target_conversion_is_exact():
    x0 = _gauss_data(jax.random.PRNGKey(3), NB)
    mu = MU + 0.2
    with jax.enable_x64(True):
        x0 = jnp.asarray(x0, jnp.float64)
        mu = jnp.asarray(mu, jnp.float64)
        # at fixed x_t an x0 error d is an eps error -(alpha/sigma) d, so
        # ||eps err||^2 = SNR ||x0 err||^2: the eps loss of an eps model is its SNR-weighted loss
        # in x0 space, and its x0-space loss is the eps loss weighted by 1/SNR (same key: same
        # t and noise; Kingma et al. arXiv 2107.00630; Ho et al. 2006.11239).
        eps_loss = losses.dsm_loss_per_example(mu, KEY, EXACT, SCHED, x0)
        x0_snr = losses.dsm_loss_per_example(
            mu, KEY, EXACT, SCHED, x0, target="x0", weighting="snr"
        )
        assert eps_loss.dtype == jnp.float64
        np.testing.assert_allclose(x0_snr, eps_loss, rtol=1e-10)
        t = losses.sample_times(jax.random.split(KEY, 3)[0], SCHED, x0.shape[0], dtype=jnp.float64)
        x0_loss = losses.dsm_loss_per_example(mu, KEY, EXACT, SCHED, x0, target="x0")
        np.testing.assert_allclose(x0_loss, eps_loss * jnp.exp(-SCHED.log_snr(t)), rtol=1e-10)
        # min_snr / likelihood / edm weightings define one objective whatever the target space
        for name in ("min_snr", "likelihood", "edm"):
            ref = losses.dsm_loss_per_example(mu, KEY, EXACT, SCHED, x0, weighting=name)
            for target in ("x0", "v", "score", "velocity"):
                got = losses.dsm_loss_per_example(
                    mu, KEY, EXACT, SCHED, x0, weighting=name, target=target
                )
                np.testing.assert_allclose(got, ref, rtol=1e-8, err_msg=f"{name}/{target}")


def test_lognormal_times():
    t = losses.sample_times(KEY, SCHED, 100_000, "lognormal")
    assert float(t.min()) >= float(SCHED.t_end) and float(t.max()) <= float(SCHED.t_start)
    log_st = np.asarray(-SCHED.lam(t), np.float64)
    assert abs(log_st.mean() + 1.2) < 0.03 and abs(log_st.std() - 1.2) < 0.03
    u = losses.sample_times(KEY, SCHED, 1000, t_min=0.2, t_max=0.4)
    assert float(u.min()) >= 0.2 and float(u.max()) <= 0.4


def test_cosine_times_have_the_cosine_schedules_noise_levels():
    # "cosine": lambda = -log tan(pi u / 2), u uniform on the interval mapping to the schedule's
    # lambda range, so P(lambda <= x) = (u_hi - (2/pi) arctan(e^-x)) / (u_hi - u_lo) on any
    # schedule, and on the cosine schedule (s = 0) it is exactly uniform in t
    for sch in (SCHED, schedules.ve()):
        lam = np.asarray(sch.lam(losses.sample_times(KEY, sch, 200_000, "cosine")), np.float64)
        lam_hi, lam_lo = float(sch.lam(sch.t_end)), float(sch.lam(sch.t_start))
        u_lo, u_hi = (
            (2 / np.pi) * np.arctan(np.exp(-lam_hi)),
            (2 / np.pi) * np.arctan(np.exp(-lam_lo)),
        )
        assert lam.min() >= lam_lo - 1e-4 and lam.max() <= lam_hi + 1e-4
        for x in np.linspace(lam_lo + 0.5, lam_hi - 0.5, 7):
            cdf = (u_hi - (2 / np.pi) * np.arctan(np.exp(-x))) / (u_hi - u_lo)
            assert abs(np.mean(lam <= x) - cdf) < 0.005, (type(sch).__name__, x)
    cos = schedules.vp_cosine(s=1e-9, t_start=0.99, t_end=0.01)  # s -> 0: alpha = cos(pi t / 2)
    t = np.asarray(losses.sample_times(KEY, cos, 200_000, "cosine"), np.float64)
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(t, q) - (0.01 + q * 0.98)) < 0.005


def test_label_dropout():
    labels = jnp.arange(10_000) % 3
    dropped = losses.drop_cond(KEY, labels, 0.3, null_cond=3)
    is_null = np.asarray(dropped == 3)
    assert abs(is_null.mean() - 0.3) < 0.02
    np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(labels)[~is_null])
    vec = jnp.ones((8, 2))
    np.testing.assert_array_equal(np.isnan(losses.drop_cond(KEY, vec, 1.0)), True)  # NaN = null
    np.testing.assert_array_equal(losses.drop_cond(KEY, vec, 0.0), vec)
    with pytest.raises(JaxdiffError, match="null_cond"):
        losses.drop_cond(KEY, labels, 0.1)  # integer labels need an explicit null id

    # inside the loss: prob 1 == training on the null condition
    def cond_model(p, x, t, c):
        return jnp.zeros_like(x) + (c[:, None] == 3) * p

    model = Denoiser(apply=cond_model, parametrization="eps")
    x0 = _gauss_data(jax.random.PRNGKey(2), NB)
    y = jnp.zeros((NB,), jnp.int32)
    kw = dict(null_cond=3)
    dropped_loss = losses.dsm_loss(1.0, KEY, model, SCHED, x0, y, cond_drop_prob=1.0, **kw)
    null_loss = losses.dsm_loss(1.0, KEY, model, SCHED, x0, jnp.full((NB,), 3))
    np.testing.assert_allclose(dropped_loss, null_loss, rtol=1e-6)
    # prob is a traced, sweepable argument
    f = jax.jit(lambda p: losses.dsm_loss(1.0, KEY, model, SCHED, x0, y, cond_drop_prob=p, **kw))
    np.testing.assert_allclose(f(1.0), null_loss, rtol=1e-6)


def test_jit_vmap_grad_through_the_loss():
    x0 = _gauss_data(jax.random.PRNGKey(2), NB)
    keys = jax.random.split(KEY, 4)
    per_key = jax.jit(jax.vmap(lambda k: losses.dsm_loss(MU, k, EXACT, SCHED, x0)))(keys)
    assert per_key.shape == (4,) and len(np.unique(np.asarray(per_key))) == 4
    np.testing.assert_allclose(
        per_key[0], losses.dsm_loss(MU, keys[0], EXACT, SCHED, x0), rtol=1e-5
    )

    # grad w.r.t. the params and w.r.t. the schedule's numbers (a schedule is a pytree)
    @jax.jit
    def grads(mu, sched):
        return jax.grad(losses.dsm_loss, argnums=(0, 3))(mu, KEY, EXACT, sched, x0)

    g, gs = grads(MU + 0.1, SCHED)
    assert g.shape == MU.shape and np.all(np.isfinite(g)) and np.any(g != 0)
    assert np.isfinite(gs.beta_max) and gs.beta_max != 0


def test_bad_arguments_name_the_argument():
    x0 = jnp.ones((NB, D))
    call = lambda **kw: losses.dsm_loss(MU, KEY, EXACT, SCHED, x0, **kw)  # noqa: E731
    with pytest.raises(JaxdiffError, match="weighting"):
        call(weighting="p2")
    with pytest.raises(JaxdiffError, match="target"):
        call(target="noise")
    with pytest.raises(JaxdiffError, match="t_sampling"):
        call(t_sampling="laplace")
    with pytest.raises(JaxdiffError, match="t_min"):
        call(t_min=0.5, t_max=0.2)
    with pytest.raises(JaxdiffError, match="t_max"):
        call(t_max=3.0)
    with pytest.raises(JaxdiffError, match="cond_drop_prob"):
        call(cond_drop_prob=1.5)
    with pytest.raises(JaxdiffError, match="cond"):
        call(cond_drop_prob=0.1)  # nothing to drop
    with pytest.raises(JaxdiffError, match="x0"):
        losses.dsm_loss(MU, KEY, EXACT, SCHED, jnp.ones((4, 2)))
    with pytest.raises(JaxdiffError, match="model"):
        losses.dsm_loss(MU, KEY, _exact_eps, SCHED, x0)
