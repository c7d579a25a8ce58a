import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules
from jaxdiff._checks import JaxdiffError

NAMES = ["vp_linear", "vp_cosine", "vp_discrete", "ve", "edm", "flow"]


def make(name):
    return getattr(schedules, name)()


def grid(s, n=9):
    return jnp.linspace(float(s.t_end), float(s.t_start), n)


@pytest.mark.parametrize("name", NAMES)
def test_identities_float64(x64, name):
    s = make(name)
    t = grid(s)
    a, sig = s.alpha_sigma(t)
    if s.is_vp:
        np.testing.assert_allclose(a**2 + sig**2, 1.0, atol=1e-12)
    lam = s.lam(t)
    np.testing.assert_allclose(lam, jnp.log(a) - jnp.log(sig), atol=1e-12)
    np.testing.assert_allclose(s.t_from_lam(lam), t, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s.t_from_log_snr(s.log_snr(t)), t, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s.t_from_sigma_tilde(s.sigma_tilde(t)), t, rtol=1e-10, atol=1e-12)
    assert np.all(np.diff(np.asarray(lam)) < 0), "lambda must decrease with t"


@pytest.mark.parametrize("name", NAMES)
def test_sde_coefficients_match_definition(x64, name):
    # f = d log alpha/dt and g^2 = d sigma^2/dt - 2 f sigma^2, checked by central differences.
    s = make(name)
    t = grid(s)[1:-1]
    d = 1e-6 * (float(s.t_start) - float(s.t_end))
    f_fd = (s.log_alpha(t + d) - s.log_alpha(t - d)) / (2 * d)
    ds2 = (s.sigma(t + d) ** 2 - s.sigma(t - d) ** 2) / (2 * d)
    g2_fd = ds2 - 2 * f_fd * s.sigma(t) ** 2
    np.testing.assert_allclose(s.drift_coef(t), f_fd, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(s.diffusion_sq(t), g2_fd, rtol=1e-5, atol=1e-8)


def test_closed_forms(x64):
    vp = schedules.vp_linear()
    t = jnp.linspace(1e-3, 1.0, 11)
    np.testing.assert_allclose(vp.diffusion_sq(t), vp.beta(t), rtol=1e-12)
    np.testing.assert_allclose(vp.drift_coef(t), -0.5 * vp.beta(t), rtol=1e-12)
    # values quoted in samplers.md 1.1 item 3
    np.testing.assert_allclose(vp.lam(1.0), -5.02498, atol=1e-5)
    np.testing.assert_allclose(vp.lam(1e-3), 4.55771, atol=1e-5)
    ve = schedules.ve(0.01, 50.0)
    g2 = ve.sigma(t) ** 2 * 2 * np.log(50.0 / 0.01)
    np.testing.assert_allclose(ve.diffusion_sq(t), g2, rtol=1e-12)
    fl = schedules.flow()
    tt = jnp.linspace(0.1, 0.9, 5)
    np.testing.assert_allclose(fl.alpha(tt), 1 - tt, rtol=1e-14)
    np.testing.assert_allclose(fl.sigma(tt), tt, rtol=1e-14)
    e = schedules.edm()
    np.testing.assert_allclose(e.sigma(tt), tt, rtol=1e-14)
    np.testing.assert_allclose(e.sigma_tilde(tt), tt, rtol=1e-14)


def test_discrete_schedule_matches_ddpm(x64):
    s = schedules.vp_discrete()
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(s.alphas_cumprod(), abar, rtol=1e-12)
    n = np.arange(1000)
    np.testing.assert_allclose(s.alpha((n + 1) / 1000.0) ** 2, abar, rtol=1e-12)
    np.testing.assert_allclose(s.timestep((n + 1) / 1000.0), n, atol=1e-9)
    # half-way between knots, log alpha is the mean of its neighbours (piecewise-linear)
    tm = (n[:-1] + 1.5) / 1000.0
    np.testing.assert_allclose(
        s.log_alpha(tm), 0.25 * (np.log(abar[:-1]) + np.log(abar[1:])), rtol=1e-12
    )
    # the continuous VP-linear with beta in [0.1, 20] is the DDPM schedule's limit
    np.testing.assert_allclose(s.lam(0.5), schedules.vp_linear().lam(0.5), atol=5e-3)


def test_cosine_reference_values(x64):
    s = schedules.vp_cosine()
    # alpha_bar(u) = f(u)/f(0) with f(u) = cos^2(((u + s)/(1 + s)) pi/2)
    u = jnp.array([0.1, 0.5, 0.9])
    f = lambda u: jnp.cos((u + 0.008) / 1.008 * jnp.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(s.alpha(u) ** 2, f(u) / f(0.0), rtol=1e-12)
    # DPM-Solver stops the cosine schedule at T = 0.9946 (beta capped at 999): lambda(T) ~ -4.78
    np.testing.assert_allclose(s.lam(s.t_start), -4.77764, atol=1e-4)


def test_vmap_and_grad_through_schedule_parameters(x64):
    betas = jnp.array([10.0, 20.0, 30.0])
    out = jax.vmap(lambda b: schedules.vp_linear(beta_max=b).lam(0.5))(betas)
    want = [schedules.vp_linear(beta_max=float(b)).lam(0.5) for b in betas]
    np.testing.assert_allclose(out, want, rtol=1e-12)
    # d/d beta_max of log alpha(t) = -t^2/4
    g = jax.grad(lambda b: schedules.vp_linear(beta_max=b).log_alpha(0.5))(20.0)
    np.testing.assert_allclose(g, -0.25 * 0.25, rtol=1e-12)
    g = jax.grad(lambda smax: schedules.ve(sigma_max=smax).log_sigma(1.0))(50.0)
    np.testing.assert_allclose(g, 1 / 50.0, rtol=1e-12)
    # schedules pass through jit as pytrees
    f = jax.jit(lambda s, t: s.alpha_sigma(t))
    np.testing.assert_allclose(f(schedules.vp_cosine(), 0.3)[0], schedules.vp_cosine().alpha(0.3))


@pytest.mark.parametrize("name", NAMES)
def test_prior(name):
    s = make(name)
    x = s.prior_sample(jax.random.PRNGKey(0), (20000, 2))
    want = 1.0 if s.is_vp else float(s.prior_std())
    if s.is_ve:
        want = float(s.sigma(s.t_start))
    np.testing.assert_allclose(float(jnp.std(x)), want, rtol=0.02)


def test_bad_input():
    with pytest.raises(JaxdiffError, match="beta_min"):
        schedules.vp_linear(beta_min=-1.0)
    with pytest.raises(JaxdiffError, match="betas"):
        schedules.vp_discrete(betas=[0.1, 1.5])
    with pytest.raises(JaxdiffError, match=r"t=.*range"):
        schedules.vp_linear().check_t(jnp.array([0.5, 1.5]))
    with pytest.raises(JaxdiffError, match="sigma_max"):
        schedules.edm(sigma_max=0.0)


def test_bad_ranges_are_rejected():
    with pytest.raises(JaxdiffError, match="sigma_max"):
        schedules.ve(sigma_min=50.0, sigma_max=0.01)
    with pytest.raises(JaxdiffError, match="sigma_max"):
        schedules.edm(sigma_min=80.0, sigma_max=0.002)
    with pytest.raises(JaxdiffError, match="sigma_min"):
        schedules.ve(sigma_min=np.float32(0.0))
    # lambda -> -inf at t = 1 for the cosine schedule: the range stops short of it
    with pytest.raises(JaxdiffError, match="t="):
        schedules.vp_cosine().check_t(1.0)
    assert np.isfinite(float(schedules.vp_cosine().lam(schedules.vp_cosine().t_max)))
