"""Samplers against exact oracles (float64), plus the contract every sampler keeps."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import analytic, samplers, schedules
from jaxdiff._checks import JaxdiffError, NonFiniteError
from jaxdiff.denoiser import Denoiser


def _gauss_1d():
    # samplers.md 7.2: N(0.5, 0.3), VP-linear, lambda-uniform grid from lambda(1) to lambda(1e-3)
    return analytic.gaussian(jnp.array([0.5]), jnp.array([[0.3]]))


def _endpoint_map(sampler, n, grid="log_snr"):
    sch = schedules.vp_linear()
    model, dist = analytic.as_denoiser(_gauss_1d(), sch, parametrization="eps")
    x = jnp.array([[0.0], [1.0]])
    y = jaxdiff.sample(jax.random.PRNGKey(0), model, dist, sch, x, sampler, n, grid=grid)
    return float(y[1, 0] - y[0, 0]), float(y[0, 0])


A_STAR, B_STAR = 0.547801088331, 0.498172552139


def test_exact_endpoint_map_reference(x64):
    # the closed form used as the oracle reproduces samplers.md's portable constants
    sch = schedules.vp_linear()
    a, b = _gauss_1d().affine_pf_map(1.0, 1e-3, sch)
    np.testing.assert_allclose(float(jnp.squeeze(a)), A_STAR, rtol=1e-11)
    np.testing.assert_allclose(float(jnp.squeeze(b)), B_STAR, rtol=1e-11)


def test_ddim_regression_values(x64):
    # samplers.md 7.2 "portable regression values"
    for n, want in [(10, -1.166223e-1), (20, -6.181832e-2), (40, -3.183398e-2)]:
        a, _ = _endpoint_map(samplers.ddim(), n)
        np.testing.assert_allclose(a - A_STAR, want, rtol=1e-6)


def test_ddim_order_one(x64):
    # Gaussian data in D=3 with a full covariance; error of the endpoint vs the exact PF-ODE map
    sch = schedules.vp_linear()
    cov = jnp.array([[0.5, 0.2, 0.0], [0.2, 0.3, 0.1], [0.0, 0.1, 0.8]])
    dist = analytic.gaussian(jnp.array([0.5, -1.0, 2.0]), cov)
    model, params = analytic.as_denoiser(dist, sch, parametrization="eps")
    x_T = jax.random.normal(jax.random.PRNGKey(1), (64, 3))
    exact = dist.pf_ode_solution(x_T, 1.0, 1e-3, sch)
    errs = []
    ns = [32, 64, 128, 256]
    for n in ns:
        y = jaxdiff.sample(
            jax.random.PRNGKey(0), model, params, sch, x_T, samplers.ddim(), n, grid="log_snr"
        )
        errs.append(float(jnp.sqrt(jnp.mean((y - exact) ** 2))))
    order = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(order - 1.0) < 0.15, (order, errs)


@pytest.mark.parametrize("parametrization", ["eps", "x0", "v", "score"])
def test_pf_ode_diffrax_matches_exact_solution(x64, parametrization):
    sch = schedules.vp_linear()
    cov = jnp.array([[0.5, 0.2], [0.2, 0.3]])
    dist = analytic.gaussian(jnp.array([1.0, -0.5]), cov)
    model, params = analytic.as_denoiser(dist, sch, parametrization=parametrization)
    x_T = jax.random.normal(jax.random.PRNGKey(2), (16, 2))
    exact = dist.pf_ode_solution(x_T, 1.0, 1e-3, sch)
    y = jaxdiff.sample(
        jax.random.PRNGKey(0),
        model,
        params,
        sch,
        x_T,
        samplers.pf_ode(diffrax.Tsit5(), rtol=1e-10, atol=1e-10),
        steps=10,
    )
    rel = float(jnp.linalg.norm(y - exact) / jnp.linalg.norm(exact))
    assert rel < 1e-6, rel


@pytest.mark.parametrize("name", ["vp_cosine", "vp_discrete", "ve", "edm", "flow"])
def test_pf_ode_exact_on_every_schedule(x64, name):
    sch = getattr(schedules, name)()
    dist = analytic.gaussian(jnp.array([1.0, -0.5]), jnp.array([[0.5, 0.2], [0.2, 0.3]]))
    model, params = analytic.as_denoiser(dist, sch, parametrization="eps")
    x_T = sch.prior_std() * jax.random.normal(jax.random.PRNGKey(2), (8, 2))
    exact = dist.pf_ode_solution(x_T, sch.t_start, sch.t_end, sch)
    # the discrete schedule's vector field jumps at 1000 knots; the solver steps onto them
    max_steps = 20_000 if name == "vp_discrete" else 4096
    ode = samplers.pf_ode(rtol=1e-10, atol=1e-10, max_steps=max_steps)
    y = jaxdiff.sample(jax.random.PRNGKey(0), model, params, sch, x_T, ode, 10)
    assert float(jnp.linalg.norm(y - exact) / jnp.linalg.norm(exact)) < 1e-6


def test_pf_ode_fixed_steps_is_the_diffrax_solver_on_the_grid(x64):
    # fixed-grid Euler through diffrax == Euler on the t-form PF-ODE written out by hand
    sch = schedules.vp_linear()
    dist = _gauss_1d()
    model, params = analytic.as_denoiser(dist, sch)
    x = jnp.array([[0.3], [-1.2]])
    ts = samplers.time_grid(sch, 25)
    y = jaxdiff.sample(
        jax.random.PRNGKey(0),
        model,
        params,
        sch,
        x,
        samplers.pf_ode(diffrax.Euler(), adaptive=False),
        ts=ts,
    )
    z = x
    for i in range(25):
        z = z + (ts[i + 1] - ts[i]) * samplers.pf_ode_vector_field(model, params, sch, z, ts[i])
    np.testing.assert_allclose(y, z, rtol=1e-12)


def test_ddim_eta1_equals_ddpm_small(x64):
    sch = schedules.vp_linear()
    model, params = analytic.as_denoiser(analytic.ring_mixture(), sch)
    key = jax.random.PRNGKey(3)
    a = jaxdiff.sample(key, model, params, sch, (64, 2), samplers.ddim(eta=1.0), 30)
    b = jaxdiff.sample(key, model, params, sch, (64, 2), samplers.ddpm("small"), 30)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)


def _moments(sampler, n_steps, n=200_000, grid="log_snr"):
    sch = schedules.vp_linear()
    dist = _gauss_1d()
    model, params = analytic.as_denoiser(dist, sch)
    y = jaxdiff.sample(
        jax.random.PRNGKey(4), model, params, sch, (n, 1), sampler, n_steps, grid=grid
    )
    a, s = sch.alpha_sigma(1e-3)
    return float(jnp.mean(y)) - float(a * 0.5), float(jnp.var(y)) - float(a**2 * 0.3 + s**2)


@pytest.mark.parametrize(
    "sampler", [samplers.ddpm(), samplers.ddim(eta=0.5)], ids=["ddpm", "ddim0.5"]
)
def test_stochastic_moments_converge_at_first_order(x64, sampler):
    # exact marginal at t_end is N(alpha 0.5, alpha^2 0.3 + sigma^2); the variance error is O(1/N)
    # (samplers.md 7.2: N * dvar -> -2.87 for DDPM on the lambda grid). MC s.e. of var ~ 1e-3.
    m1, v1 = _moments(sampler, 32)
    m2, v2 = _moments(sampler, 64)
    assert abs(m1) < 5e-3 and abs(m2) < 5e-3
    assert abs(v2) < abs(v1)
    assert 1.5 < v1 / v2 < 2.6, (v1, v2)


def test_ddpm_variance_constant_matches_reference(x64):
    _, v = _moments(samplers.ddpm(), 256)
    assert -3.6 < 256 * v < -2.3, 256 * v  # reference -2.87 at N=4096 (MC s.e. ~0.3 here)


@pytest.mark.slow
def test_euler_maruyama_scan_is_weak_first_order_and_agrees_with_diffrax(x64):
    # EM's mean and variance errors are both O(1/N) (measured 0.012, 0.005 and 0.016, 0.0065 at
    # N = 32, 64; MC s.e. 1.2e-3 and 1e-3)
    m1, v1 = _moments(samplers.euler_maruyama(), 32, grid="uniform")
    m2, v2 = _moments(samplers.euler_maruyama(), 64, grid="uniform")
    assert abs(m2) < abs(m1) and abs(m2) < 0.01
    assert 1.5 < v1 / v2 < 3.0, (v1, v2)
    # diffrax's Euler on the same SDE and grid has the same weak error (different noise)
    md, vd = _moments(samplers.reverse_sde(), 32, n=20_000, grid="uniform")
    assert abs(md - m1) < 0.015 and abs(vd - v1) < 0.02, (md, vd, m1, v1)


def test_reverse_sde_diffrax_moments(x64):
    m1, v1 = _moments(samplers.reverse_sde(), 10, n=8000, grid="uniform")
    m2, v2 = _moments(samplers.reverse_sde(), 40, n=8000, grid="uniform")
    # MC s.e.: mean 6e-3, var 5e-3
    assert abs(m2) < 0.025 and abs(v2) < 0.025, (m2, v2)
    assert abs(v2) < abs(v1), (v1, v2)


# --------------------------------------------------------------------------------------------
# contract tests shared by every sampler
# --------------------------------------------------------------------------------------------
ALL = {
    "ddim": samplers.ddim(),
    "ddim_eta": samplers.ddim(eta=0.7),
    "ddpm": samplers.ddpm(),
    "ddpm_large": samplers.ddpm("large"),
    "pf_ode": samplers.pf_ode(rtol=1e-9, atol=1e-9, max_steps=256),
    "pf_ode_fixed": samplers.pf_ode(diffrax.Heun(), adaptive=False),
    "reverse_sde": samplers.reverse_sde(),
    "euler_maruyama": samplers.euler_maruyama(),
    "dpm_solver3": samplers.dpm_solver(3),
    "dpm_solver_pp2M": samplers.dpm_solver_pp(2),
    "dpm_solver_pp3M": samplers.dpm_solver_pp(3),
    "dpm_solver_pp2S": samplers.dpm_solver_pp(2, variant="singlestep"),
    "sde_dpm_solver_pp2M": samplers.sde_dpm_solver_pp(2),
    "unipc2": samplers.unipc(2),
    "deis3": samplers.deis(3),
    "edm_euler": samplers.euler(),
    "heun": samplers.heun(),
    "heun_churn": samplers.heun(s_churn=3.0),
    "predictor_corrector": samplers.predictor_corrector(),
    "accelerated_ode": samplers.accelerated_ode(),
    "accelerated_sde": samplers.accelerated_sde(),
}


def _setup():
    sch = schedules.vp_linear()
    dist = analytic.gaussian_mixture(
        jnp.array([0.3, 0.7]), jnp.array([[-1.0, 0.5], [1.0, 0.0]]), jnp.array([0.1, 0.2])
    )
    model, params = analytic.as_denoiser(dist, sch)
    return sch, model, params


# the default run checks the contract on one member of each family (ddim, ddpm, pf_ode,
# euler_maruyama, dpm_solver_pp2M, sde_dpm_solver_pp2M, unipc2, heun, predictor_corrector,
# accelerated_ode); the variants below run with -m slow (their accuracy and order tests stay
# in the default run)
_SLOW_CONTRACT = {
    "reverse_sde",
    "pf_ode_fixed",
    "accelerated_sde",
    "ddim_eta",
    "ddpm_large",
    "dpm_solver3",
    "dpm_solver_pp3M",
    "dpm_solver_pp2S",
    "deis3",
    "edm_euler",
    "heun_churn",
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_CONTRACT else n for n in ALL]
)
def test_contract_jit_vmap_grad(x64, name):
    sampler = ALL[name]
    sch, model, params = _setup()
    ts = samplers.time_grid(sch, 6)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (3, 2))
    key = jax.random.PRNGKey(1)

    # jaxdiff.sample composes inside the user's jit (it then skips its own jit and checks)
    ref = jaxdiff.sample(key, model, params, sch, x_T, sampler, ts=ts)
    inside = jax.jit(lambda k, p: jaxdiff.sample(k, model, p, sch, x_T, sampler, ts=ts))
    np.testing.assert_allclose(inside(key, params), ref, rtol=1e-9, atol=1e-12)

    def run(key, params):
        return samplers.solve(key, model, params, sch, x_T, ts, sampler)[0]

    keys = jax.random.split(jax.random.PRNGKey(5), 2)
    many = jax.jit(jax.vmap(run, in_axes=(0, None)))(keys, params)
    assert many.shape == (2, 3, 2)
    if sampler.stochastic:
        assert float(jnp.min(jnp.abs(many[0] - many[1]))) > 0  # independent paths
    else:
        np.testing.assert_allclose(many[0], many[1], rtol=1e-12)

    # grad w.r.t. params (here: the mixture's means) matches central finite differences
    def loss(means):
        return jnp.sum(run(key, params.replace(means=means)) ** 2)

    g = jax.jit(jax.grad(loss))(params.means)
    e = jnp.zeros_like(params.means).at[1, 0].set(1e-5)
    loss_j = jax.jit(loss)
    fd = (loss_j(params.means + e) - loss_j(params.means - e)) / 2e-5
    np.testing.assert_allclose(float(g[1, 0]), float(fd), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "name",
    ["ddim_eta", "ddpm", pytest.param("reverse_sde", marks=pytest.mark.slow), "euler_maruyama"],
)
def test_noise_depends_only_on_key_and_index(name):
    sampler = ALL[name]
    sch, model, params = _setup()
    key = jax.random.PRNGKey(7)
    small = jaxdiff.sample(key, model, params, sch, (3, 2), sampler, 6)
    big = jaxdiff.sample(key, model, params, sch, (9, 2), sampler, 6)
    np.testing.assert_allclose(small, big[:3], rtol=1e-5, atol=1e-6)


def test_no_recompilation_when_only_numbers_change():
    traces = []
    sch = schedules.vp_linear()

    def apply(p, x, t, c):
        traces.append(1)
        return p * x

    model = Denoiser(apply=apply, parametrization="eps", event_shape=(2,))
    key = jax.random.PRNGKey(0)
    ts = samplers.time_grid(sch, 5)
    jaxdiff.sample(key, model, jnp.float32(0.1), sch, (4, 2), samplers.ddim(eta=0.3), ts=ts)
    n = len(traces)
    jaxdiff.sample(key, model, jnp.float32(0.2), sch, (4, 2), samplers.ddim(eta=0.6), ts=ts * 0.9)
    jaxdiff.sample(
        jax.random.PRNGKey(1),
        model,
        jnp.float32(0.3),
        sch.replace(beta_max=15.0),
        (4, 2),
        samplers.ddim(eta=0.1),
        ts=ts,
    )
    assert len(traces) == n, "changing eta / params / grid values / schedule numbers recompiled"


class _CountCompiles:
    """Counts XLA compilations (``jax_log_compiles`` records) inside a ``with`` block."""

    def __enter__(self):
        import logging

        self.n = 0
        self.names = []
        outer = self

        class H(logging.Handler):
            def emit(self, record):
                msg = record.getMessage()
                if msg.startswith("Finished XLA compilation of"):
                    outer.n += 1
                    outer.names.append(msg.split(" in ")[0][len("Finished XLA compilation of ") :])

        self._h, self._logger = H(), logging.getLogger("jax")
        self._level = self._logger.level
        self._logger.addHandler(self._h)
        self._logger.setLevel(logging.DEBUG)
        self._prev = jax.config.jax_log_compiles
        jax.config.update("jax_log_compiles", True)
        return self

    def __exit__(self, *exc):
        jax.config.update("jax_log_compiles", self._prev)
        self._logger.removeHandler(self._h)
        self._logger.setLevel(self._level)


def test_a_new_batch_size_or_step_count_compiles_one_program():
    # the prior draw, the grid, the solve and the finiteness check are one compiled program, so
    # a new batch size or step count costs one compilation, not one per eager op; the adaptive
    # PF-ODE reads only the grid's ends, so a new step count compiles nothing
    sch, model, params = _setup()
    key = jax.random.PRNGKey(3)
    for sampler in (samplers.ddim(), samplers.dpm_solver_pp()):
        jaxdiff.sample(key, model, params, sch, (16, 2), sampler, steps=5)  # warm
        for shape, steps in (((24, 2), 5), ((24, 2), 7), ((16, 2), 7)):
            with _CountCompiles() as c:
                jaxdiff.sample(key, model, params, sch, shape, sampler, steps=steps)
            assert c.n == 1, (sampler.name, shape, steps, c.names)
        with _CountCompiles() as c:  # everything seen before: nothing compiles
            jaxdiff.sample(key, model, params, sch, (24, 2), sampler, steps=5)
        assert c.n == 0, c.names
    ode = samplers.pf_ode()
    a = jaxdiff.sample(key, model, params, sch, (16, 2), ode, steps=5)
    with _CountCompiles() as c:
        b = jaxdiff.sample(key, model, params, sch, (16, 2), ode, steps=40)
    assert c.n == 0, c.names
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", samplers.GRIDS)
@pytest.mark.parametrize("name", ["vp_linear", "vp_cosine", "vp_discrete", "ve", "edm", "flow"])
def test_grids(x64, kind, name):
    sch = getattr(schedules, name)()
    ts = samplers.time_grid(sch, 12, kind)
    assert ts.shape == (13,)
    np.testing.assert_allclose([ts[0], ts[-1]], [sch.t_start, sch.t_end], rtol=1e-12)
    assert np.all(np.diff(np.asarray(ts)) < 0)
    if kind == "log_snr":
        np.testing.assert_allclose(
            np.diff(np.asarray(sch.lam(ts))), (sch.lam(ts[-1]) - sch.lam(ts[0])) / 12, rtol=1e-8
        )
    if kind == "karras":
        st = np.asarray(sch.sigma_tilde(ts)) ** (1 / 7)
        np.testing.assert_allclose(np.diff(st), (st[-1] - st[0]) / 12, rtol=1e-7)
    if kind == "quadratic":
        np.testing.assert_allclose(
            np.diff(np.sqrt(np.asarray(ts))), (np.sqrt(ts[-1]) - np.sqrt(ts[0])) / 12, rtol=1e-10
        )


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def test_bad_input():
    sch, model, params = _setup()
    key = jax.random.PRNGKey(0)
    with pytest.raises(JaxdiffError, match="steps=0"):
        jaxdiff.sample(key, model, params, sch, (4, 2), samplers.ddim(), 0)
    with pytest.raises(JaxdiffError, match="steps=None"):
        jaxdiff.sample(key, model, params, sch, (4, 2), samplers.ddim())
    with pytest.raises(JaxdiffError, match="strictly decreasing"):
        jaxdiff.sample(
            key, model, params, sch, (4, 2), samplers.ddim(), ts=jnp.array([0.5, 0.7, 0.1])
        )
    with pytest.raises(JaxdiffError, match=r"ts=.*range"):
        jaxdiff.sample(
            key, model, params, sch, (4, 2), samplers.ddim(), ts=jnp.array([1.5, 0.5, 0.1])
        )
    with pytest.raises(JaxdiffError, match="t_start"):
        jaxdiff.sample(key, model, params, sch, (4, 2), samplers.ddim(), 5, t_start=2.0)
    with pytest.raises(JaxdiffError, match=r"x_T=.*\(batch, 2\)"):
        jaxdiff.sample(key, model, params, sch, jnp.zeros((4, 3)), samplers.ddim(), 5)
    with pytest.raises(JaxdiffError, match="shape="):
        jaxdiff.sample(key, model, params, sch, (4,), samplers.ddim(), 5)
    with pytest.raises(JaxdiffError, match="grid='linear'"):
        jaxdiff.sample(key, model, params, sch, (4, 2), samplers.ddim(), 5, grid="linear")
    with pytest.raises(JaxdiffError, match="eta=2"):
        samplers.ddim(eta=2.0)
    with pytest.raises(JaxdiffError, match="variance"):
        samplers.ddpm("huge")
    with pytest.raises(JaxdiffError, match="sampler="):
        jaxdiff.sample(key, model, params, sch, (4, 2), "ddim", 5)
    with pytest.raises(JaxdiffError, match="solver="):
        samplers.pf_ode(solver="tsit5")


def test_solver_failure_is_reported():
    sch, model, params = _setup()
    with pytest.raises(jaxdiff.SolverError, match="max_steps"):
        jaxdiff.sample(
            jax.random.PRNGKey(0), model, params, sch, (4, 2), samplers.pf_ode(max_steps=3), 5
        )


def test_non_finite_result_names_the_step():
    sch = schedules.vp_linear()

    def apply(p, x, t, c):  # blows up below t = 0.5
        return jnp.where(t[:, None] < 0.5, jnp.nan, x)

    model = Denoiser(apply=apply, parametrization="eps", event_shape=(2,))
    # uniform grid: ts[5] = 0.5005, ts[6] = 0.4006 -> the first NaN comes from step 6
    with pytest.raises(NonFiniteError, match=r"step 6 of 10 \(t=0.4006"):
        jaxdiff.sample(jax.random.PRNGKey(0), model, None, sch, (4, 2), samplers.ddim(), 10)


def test_x0_clipping_and_dynamic_thresholding():
    sch = schedules.vp_linear()
    model, params = analytic.as_denoiser(analytic.ring_mixture(radius=3.0), sch)
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (64, 2))
    t = jnp.full((64,), 0.3)
    clipped = samplers.threshold_x0(model, sch, clip=1.0)
    x0 = clipped(params, x, t)
    raw, _ = model.x0_eps(params, x, t, None, sch)
    np.testing.assert_allclose(x0, jnp.clip(raw, -1.0, 1.0), rtol=1e-6)
    # eps is recomputed from the processed x0 (diffusers' use_clipped_model_output)
    x0b, eps = clipped.x0_eps(params, x, t, None, sch)
    a, s = sch.alpha_sigma(0.3)
    np.testing.assert_allclose(eps, (x - a * x0b) / s, rtol=1e-5, atol=1e-5)
    # dynamic thresholding against a direct numpy computation (Imagen, arXiv 2205.11487)
    dyn = samplers.threshold_x0(model, sch, ratio=0.9, max_value=2.5)(params, x, t)
    r = np.asarray(raw)
    s_np = np.clip(np.quantile(np.abs(r), 0.9, axis=1), 1.0, 2.5)[:, None]
    np.testing.assert_allclose(dyn, np.clip(r, -s_np, s_np) / s_np, rtol=1e-5, atol=1e-6)
    # it is a model like any other: every sampler takes it, samples stay bounded
    y = jaxdiff.sample(jax.random.PRNGKey(1), clipped, params, sch, (256, 2), samplers.ddim(), 10)
    assert float(jnp.max(jnp.abs(y))) < 1.0 + 3 * float(sch.sigma(sch.t_end)) + 1e-3
    with pytest.raises(JaxdiffError, match="ratio"):
        samplers.threshold_x0(model, sch, ratio=1.5)
    with pytest.raises(JaxdiffError, match="clip"):
        samplers.threshold_x0(model, sch)


def test_t_end_where_sigma_vanishes_is_rejected():
    sch, model, params = _setup()
    with pytest.raises(JaxdiffError, match="t_end"):
        samplers.time_grid(sch, 4, "log_snr", t_end=0.0)
    with pytest.raises(JaxdiffError, match="t_end"):
        jaxdiff.sample(
            jax.random.PRNGKey(0), model, params, sch, (4, 2), samplers.ddim(), 4, t_end=0.0
        )
    with pytest.raises(JaxdiffError, match="t_min"):
        jaxdiff.losses.sample_times(jax.random.PRNGKey(0), sch, 5, "log_snr", t_min=0.0)


def test_nfe_is_counted_for_wrapped_and_tableau_solvers():
    sch, model, params = _setup()
    _, info = jaxdiff.sample(
        jax.random.PRNGKey(0),
        model,
        params,
        sch,
        (2, 2),
        samplers.pf_ode(diffrax.Bosh3(), adaptive=False),
        4,
        return_info=True,
    )
    assert int(info.nfe) == 12
    _, info = jaxdiff.sample(
        jax.random.PRNGKey(0),
        model,
        params,
        sch,
        (2, 2),
        samplers.pf_ode(diffrax.HalfSolver(diffrax.Heun()), rtol=1e-3, atol=1e-3),
        4,
        return_info=True,
    )
    assert int(info.nfe) > 0 and int(info.nfe) % 6 == 0


@pytest.mark.parametrize("name", ["ddim", "dpm_solver_pp2", "unipc2"])
def test_bf16_model_keeps_schedule_arithmetic_in_float32(name):
    # The model computes in bfloat16; coefficients come from the float32 times and the state
    # stays float32, so the result matches the float32 model to bf16 precision of the model
    # output only (alpha_bar near 1 at t_end = 1e-3 would round to 1 in bf16).
    sampler = {
        "ddim": samplers.ddim(),
        "dpm_solver_pp2": samplers.dpm_solver_pp(2),
        "unipc2": samplers.unipc(2),
    }[name]
    sch, model, params = _setup()

    def apply_bf16(p, x, t, c):
        return model(p, x.astype(jnp.bfloat16).astype(jnp.float32), t).astype(jnp.bfloat16)

    bf16_model = Denoiser(apply=apply_bf16, parametrization="eps", event_shape=(2,))
    key = jax.random.PRNGKey(0)
    ref = jaxdiff.sample(key, model, params, sch, (256, 2), sampler, 10, grid="log_snr")
    out = jaxdiff.sample(key, bf16_model, params, sch, (256, 2), sampler, 10, grid="log_snr")
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 2e-2, rel


@pytest.mark.parametrize("name", [pytest.param("dpm_solver_pp2", marks=pytest.mark.slow), "ddpm"])
def test_unrolled_step_loop_gives_the_same_samples(x64, name):
    # unroll only changes how XLA lays out the loop: same samples (float64: to rounding), and
    # stochastic samplers keep their per-step keys fold_in(key, i)
    sampler = {"dpm_solver_pp2": samplers.dpm_solver_pp(2), "ddpm": samplers.ddpm()}[name]
    sch = schedules.vp_linear()
    model, params = analytic.as_denoiser(
        analytic.gaussian_mixture(None, jnp.array([[-1.0, 0.5], [1.0, -0.5]]), 0.2), sch
    )
    key = jax.random.PRNGKey(3)
    a = jaxdiff.sample(key, model, params, sch, (16, 2), sampler, steps=7)
    for unroll in (True, 3):
        b = jaxdiff.sample(key, model, params, sch, (16, 2), sampler, steps=7, unroll=unroll)
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
    with pytest.raises(JaxdiffError, match="unroll"):
        jaxdiff.sample(key, model, params, sch, (16, 2), sampler, steps=7, unroll=0)
