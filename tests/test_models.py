"""Tests for jaxdiff.models (MLPScoreNet, as_denoiser adapters) and jaxdiff.data."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff import data, models
from jaxdiff._checks import JaxdiffError
from jaxdiff.denoiser import Denoiser

KEY = jax.random.PRNGKey(0)
SMALL = dict(hidden=16, depth=1, embed_dim=8)


@jax.jit
def _call(model, params, x, t, cond=None):
    # one compiled call per shape instead of op-by-op dispatch: keeps the tests fast
    return model(params, x, t, cond)


# ------------------------------------------------------------------------------------------
# MLPScoreNet
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uncond_model():
    # sinusoidal time embedding here; the conditional nets below use the default (fourier)
    net = models.MLPScoreNet(time_embedding="sinusoidal", **SMALL)
    x = jax.random.normal(KEY, (5, 4, 3))  # any event shape: flattened and restored
    model, params = models.as_denoiser(net, KEY, x[:2], parametrization="eps")
    return model, params, x


def test_unconditional_shapes(uncond_model):
    model, params, x = uncond_model
    assert model.event_shape == (4, 3)
    out = _call(model, params, x, jnp.linspace(0.1, 1.0, 5))
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out, 0.0)  # zero-initialised output layer
    assert np.any(params["params"]["dense_0"]["kernel"] != 0)
    assert _call(model, params, x, 0.3).shape == x.shape  # scalar t broadcasts
    with pytest.raises(JaxdiffError, match="cond"):
        _call(model, params, x, 0.5, jnp.arange(5))  # unconditional net given a condition


@pytest.fixture(scope="module")
def class_model():
    net = models.MLPScoreNet(num_classes=3, zero_init_out=False, **SMALL)
    x = jax.random.normal(KEY, (4, 2))
    labels = jnp.array([0, 1, 2, 3])  # 3 = the null label
    model, params = models.as_denoiser(net, KEY, x, cond_example=labels, parametrization="eps")
    return net, model, params, x, labels


def test_class_conditioning_and_null_label(class_model):
    net, model, params, x, labels = class_model
    emb = params["params"]["label_embed"]["embedding"]
    assert emb.shape == (4, 16)  # num_classes + 1 rows
    assert net.null_cond == 3
    out = _call(model, params, x, 0.5, labels)
    assert out.shape == x.shape
    # distinct labels give distinct outputs; cond=None is the null label for every row
    assert not np.allclose(out[0], _call(model, params, x, 0.5, jnp.array([1, 1, 1, 1]))[0])
    np.testing.assert_allclose(
        _call(model, params, x, 0.5, None),
        _call(model, params, x, 0.5, jnp.full((4,), 3)),
        rtol=1e-6,
    )
    with pytest.raises(JaxdiffError, match="cond"):
        _call(model, params, x, 0.5, jnp.ones((4,)))  # float labels
    with pytest.raises(JaxdiffError, match="cond"):
        model(params, x, 0.5, jnp.array([0, 1, 2, 4]))  # label out of range (eager: concrete)


def test_vector_conditioning_and_null_flag():
    net = models.MLPScoreNet(cond_dim=3, zero_init_out=False, **SMALL)
    x = jax.random.normal(KEY, (4, 2))
    c = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    model, params = models.as_denoiser(net, KEY, x, cond_example=c, parametrization="eps")
    out = _call(model, params, x, 0.5, c)
    assert out.shape == x.shape
    # a NaN row means "null": equal to cond=None, finite, and no NaN in the gradient
    c_null = c.at[1].set(jnp.nan)
    out_null = _call(model, params, x, 0.5, c_null)
    out_none = _call(model, params, x, 0.5, None)
    assert np.all(np.isfinite(out_null))
    np.testing.assert_allclose(out_null[1], out_none[1], rtol=1e-6)
    np.testing.assert_allclose(out_null[0], out[0], rtol=1e-6)
    assert not np.allclose(out_none[0], out[0])
    g = jax.grad(lambda p: jnp.sum(model(p, x, 0.5, c_null) ** 2))(params)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))
    assert np.isnan(net.null_cond).all() and net.null_cond.shape == (3,)


def test_bad_fields():
    x = jnp.ones((2, 2))
    with pytest.raises(JaxdiffError, match="time_embedding"):
        models.as_denoiser(
            models.MLPScoreNet(time_embedding="rope", **SMALL), KEY, x, parametrization="eps"
        )
    with pytest.raises(JaxdiffError, match="cond_dim"):
        models.as_denoiser(
            models.MLPScoreNet(num_classes=2, cond_dim=2, **SMALL), KEY, x, parametrization="eps"
        )
    with pytest.raises(JaxdiffError, match="hidden"):
        models.as_denoiser(models.MLPScoreNet(hidden=0), KEY, x, parametrization="eps")


# ------------------------------------------------------------------------------------------
# adapters
# ------------------------------------------------------------------------------------------
class _LinenLinear(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, t, cond=None):
        return nn.Dense(self.features)(x) * (1.0 + t[:, None])


class _NNXLinear(nnx.Module):
    def __init__(self, d, rngs):
        self.lin = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x, t, cond=None):
        return self.lin(x) * (1.0 + t[:, None])


def _plain(params, x, t, cond):
    return (x @ params["kernel"] + params["bias"]) * (1.0 + t[:, None])


def test_adapters_agree_for_equal_weights():
    d = 3
    x = jax.random.normal(KEY, (5, d))
    t = jnp.linspace(0.0, 1.0, 5)
    lin_model, lin_params = models.as_denoiser(_LinenLinear(d), KEY, x[:1], parametrization="x0")
    w = lin_params["params"]["Dense_0"]
    nnx_net = _NNXLinear(d, nnx.Rngs(1))
    nnx_net.lin.kernel[...] = w["kernel"]
    nnx_net.lin.bias[...] = w["bias"]
    nnx_model, nnx_params = models.as_denoiser(nnx_net, x_example=x[:1], parametrization="x0")
    fn_model, fn_params = models.as_denoiser(
        _plain, x_example=x[:1], parametrization="x0", params=dict(w)
    )
    ref = _call(lin_model, lin_params, x, t)
    np.testing.assert_allclose(_call(nnx_model, nnx_params, x, t), ref, rtol=1e-6)
    np.testing.assert_allclose(_call(fn_model, fn_params, x, t), ref, rtol=1e-6)
    for m in (lin_model, nnx_model, fn_model):
        assert isinstance(m, Denoiser)
        assert m.parametrization == "x0" and m.event_shape == (d,)
    # the NNX params are the module state: gradients flow through it
    g = jax.jit(jax.grad(lambda p: jnp.sum(nnx_model(p, x, t))))(nnx_params)
    np.testing.assert_allclose(g["lin"]["bias"][...], jnp.sum(1.0 + t) * jnp.ones(d), rtol=1e-5)


def test_plain_function_without_example_accepts_any_shape():
    model, params = models.as_denoiser(lambda p, x, t, c: p * x, params=2.0, parametrization="eps")
    assert model.event_shape is None
    np.testing.assert_allclose(_call(model, params, jnp.ones((2, 3, 4)), 0.1), 2.0)


def test_adapter_errors_name_the_argument():
    x = jnp.ones((2, 3))
    with pytest.raises(JaxdiffError, match="parametrization"):
        models.as_denoiser(_LinenLinear(3), KEY, x, parametrization="noise")
    with pytest.raises(JaxdiffError, match="x_example"):
        models.as_denoiser(
            _LinenLinear(3), KEY, jnp.ones(3), parametrization="eps"
        )  # no batch axis
    with pytest.raises(JaxdiffError, match="x_example"):
        models.as_denoiser(_LinenLinear(3), KEY, parametrization="eps")
    with pytest.raises(JaxdiffError, match="key"):
        models.as_denoiser(_LinenLinear(3), None, x, parametrization="eps")
    with pytest.raises(JaxdiffError, match="net"):
        models.as_denoiser(42, KEY, x, parametrization="eps")
    with pytest.raises(JaxdiffError, match="net"):
        models.as_denoiser(
            models.MLPScoreNet, KEY, x, parametrization="eps"
        )  # a class, not an instance
    with pytest.raises(JaxdiffError, match="net"):
        models.as_denoiser(
            _LinenLinear(2), KEY, x, parametrization="eps"
        )  # output shape (2, 2) != (2, 3)
    with pytest.raises(JaxdiffError, match="params"):
        models.as_denoiser(_plain, x_example=x, parametrization="eps")


def test_nnx_module_with_rng_state_is_rejected():
    class WithDropout(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(2, 2, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

        def __call__(self, x, t, cond=None):
            return self.drop(self.lin(x))

    with pytest.raises(JaxdiffError, match="net"):
        models.as_denoiser(WithDropout(nnx.Rngs(0)), parametrization="eps")


def test_equal_modules_give_equal_denoisers(uncond_model):
    # hashable, equal apply functions: jit caches hit across as_denoiser calls
    m1, _, x = uncond_model
    net = models.MLPScoreNet(time_embedding="sinusoidal", **SMALL)
    m2, _ = models.as_denoiser(net, jax.random.PRNGKey(5), x[:2], parametrization="eps")
    assert m1 == m2 and hash(m1) == hash(m2)
    n1, _ = models.as_denoiser(_NNXLinear(2, nnx.Rngs(0)), parametrization="eps")
    n2, _ = models.as_denoiser(_NNXLinear(2, nnx.Rngs(1)), parametrization="eps")
    assert n1 == n2


def test_jit_vmap_grad_through_denoiser(class_model):
    _, model, params, x, y = class_model
    ref = model(params, x, 0.4, y)  # eager
    # the Denoiser itself is a pytree argument of jit
    np.testing.assert_allclose(_call(model, params, x, 0.4, y), ref, rtol=1e-5)
    # vmap over a stack of batches and over times (each vmapped function compiled once)
    xs = jnp.stack([x, 2 * x, -x])
    out = jax.jit(jax.vmap(lambda xb: model(params, xb, 0.4, y)))(xs)
    np.testing.assert_allclose(out[0], ref, rtol=1e-5)
    ts = jnp.array([0.1, 0.4, 0.9])
    out_t = jax.jit(jax.vmap(lambda t: model(params, x, t, y)))(ts)
    np.testing.assert_allclose(out_t[1], ref, rtol=1e-5)

    # grad w.r.t. params, x and t
    @jax.jit
    def grads(p, xx, t):
        return jax.grad(lambda p, xx, t: jnp.sum(model(p, xx, t, y) ** 2), (0, 1, 2))(p, xx, t)

    gp, gx, gt = grads(params, x, 0.4)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(gp))
    assert gx.shape == x.shape and np.any(gx != 0)
    assert np.isfinite(gt) and gt != 0


def test_time_embeddings():
    t = jnp.array([0.0, 0.5, 1.0])
    s = models.sinusoidal_embedding(t, 8, scale=1000.0)
    assert s.shape == (3, 8)
    np.testing.assert_allclose(s[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)  # sin(0), cos(0)
    np.testing.assert_allclose(s[2, 0], np.sin(1000.0), rtol=1e-4)  # first frequency = 1
    f = models.fourier_embedding(t, 8, scale=16.0)
    assert f.shape == (3, 8)
    np.testing.assert_allclose(jnp.sum(f[:, :4] ** 2 + f[:, 4:] ** 2, -1), 4.0, rtol=1e-5)
    np.testing.assert_array_equal(f, models.fourier_embedding(t, 8, scale=16.0))  # fixed B
    with pytest.raises(JaxdiffError, match="dim"):
        models.sinusoidal_embedding(t, 7)


# ------------------------------------------------------------------------------------------
# toy data
# ------------------------------------------------------------------------------------------
_SAMPLE = {name: jax.jit(data.SAMPLERS[name], static_argnums=1) for name in data.SAMPLERS}
N = 2000


@pytest.mark.parametrize("name", ["two_moons", "swiss_roll"])
def test_toy_data_shapes_and_determinism(name):
    sample = _SAMPLE[name]
    a = sample(KEY, N)
    assert a.shape == (N, 2) and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, sample(KEY, N))
    assert not np.allclose(a, sample(jax.random.PRNGKey(1), N))
    assert data.make_sampler(name, noise=0.1).func is data.SAMPLERS[name]


def test_toy_data_geometry():
    x = np.asarray(_SAMPLE["two_moons"](KEY, N, 0.0))  # noise=0: exactly on the two arcs
    r_up = np.hypot(x[:, 0], x[:, 1])
    r_lo = np.hypot(x[:, 0] - 1.0, x[:, 1] - 0.5)
    upper = (np.abs(r_up - 1.0) < 1e-5) & (x[:, 1] >= -1e-6)
    lower = (np.abs(r_lo - 1.0) < 1e-5) & (x[:, 1] <= 0.5 + 1e-6)
    assert np.all(upper | lower) and 0.45 < upper.mean() < 0.55
    c = np.asarray(_SAMPLE["checkerboard"](KEY, N))
    assert np.all(np.abs(c) <= 2.0)
    cells = np.floor(c + 2.0).astype(int)  # unit cells on [-2, 2]^2
    assert np.all((cells.sum(-1) % 2) == 0)  # dark squares only
    assert len({tuple(v) for v in cells}) == 8  # all 8 dark squares are hit
    z, mean, std = data.standardize(_SAMPLE["swiss_roll"](KEY, N), return_stats=True)
    np.testing.assert_allclose(np.mean(z, 0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.std(z, 0), 1.0, rtol=1e-4)
    assert mean.shape == std.shape == (1, 2)


def test_toy_data_errors():
    with pytest.raises(JaxdiffError, match="name"):
        data.make_sampler("mnist")
    with pytest.raises(JaxdiffError, match="n"):
        data.two_moons(KEY, 0)
    with pytest.raises(JaxdiffError, match="squares"):
        data.checkerboard(KEY, 10, squares=3)


# ------------------------------------------------------------------------------------------
# EDM preconditioning (parametrization="edm")
# ------------------------------------------------------------------------------------------
def _fn(p, x, t, c=None):
    return jnp.sin(p * x) + t[:, None] * x**2


@pytest.mark.parametrize("sched", ["vp_linear", "vp_cosine"])
def test_edm_with_unit_sigma_data_is_v_prediction_on_vp(x64, sched):
    # VP: D = alpha x + sigma F, i.e. v-prediction with F = -v (and the same unweighted loss)
    from jaxdiff import losses, schedules

    sch = getattr(schedules, sched)()
    x = jax.random.normal(KEY, (6, 3), jnp.float64)
    t = jnp.linspace(sch.t_end, sch.t_start, 6)
    m_v, _ = models.as_denoiser(_fn, None, x, parametrization="v", params=1.3)
    m_e, _ = models.as_denoiser(
        lambda p, x, t, c=None: -_fn(p, x, t), None, x, parametrization="edm", params=1.3,
        schedule=sch, sigma_data=1.0,
    )  # fmt: skip
    for a, b in zip(
        m_v.x0_eps(1.3, x, t, None, sch), m_e.x0_eps(1.3, x, t, None, sch), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    k = jax.random.PRNGKey(4)
    np.testing.assert_allclose(
        losses.dsm_loss_per_example(1.3, k, m_v, sch, x),
        losses.dsm_loss_per_example(1.3, k, m_e, sch, x),
        rtol=1e-10,
    )


@pytest.mark.parametrize("sched", ["vp_linear", "ve", "edm", "flow"])
def test_edm_preconditioning_is_exact_for_gaussian_data_at_zero_output(x64, sched):
    # data N(m=0, sd^2 I): the exact x0-prediction is c_skip x / alpha, i.e. F* = 0, so the
    # zero-initialised network is already the exact denoiser; the network input c_in x_t has
    # unit variance at every noise level; the default loss is ||F - F_target||^2 unweighted
    from jaxdiff import analytic, losses, schedules

    sch = getattr(schedules, sched)()
    sd = 0.7
    dist = analytic.gaussian(jnp.zeros(3), jnp.full((3,), sd**2))
    exact, dparams = analytic.as_denoiser(dist, sch)
    zero = lambda p, x, t, c=None: jnp.zeros_like(x)  # noqa: E731
    x = 3.0 * jax.random.normal(KEY, (5, 3), jnp.float64)
    t = jnp.linspace(sch.t_end, sch.t_start, 5)
    m, _ = models.as_denoiser(zero, None, x, parametrization="edm", params=0.0, schedule=sch,
                              sigma_data=sd)  # fmt: skip
    np.testing.assert_allclose(
        m.x0_eps(0.0, x, t, None, sch)[0], exact.x0_eps(dparams, x, t, None, sch)[0], rtol=1e-8
    )
    c_in, c_skip, c_out = m.coefficients(t)
    a, s = sch.alpha_sigma(t)
    np.testing.assert_allclose(c_in**2 * (a**2 * sd**2 + s**2), 1.0, rtol=1e-12)
    st = s / a
    np.testing.assert_allclose(c_skip * a, sd**2 / (st**2 + sd**2), rtol=1e-12)
    np.testing.assert_allclose(c_out, st * sd / jnp.sqrt(st**2 + sd**2), rtol=1e-12)

    # the loss of a network F(u, t) = u: the EDM weighting makes it ||F - F_target||^2
    ident = lambda p, u, t, c=None: p * u  # noqa: E731
    mi, _ = models.as_denoiser(ident, None, x, parametrization="edm", params=1.0, schedule=sch,
                               sigma_data=sd)  # fmt: skip
    assert mi.default_weighting == "edm"
    x0 = dist.sample(jax.random.PRNGKey(1), 5)
    k = jax.random.PRNGKey(2)
    got = losses.dsm_loss_per_example(1.0, k, mi, sch, x0)
    k_t, k_eps, _ = jax.random.split(k, 3)
    tt = losses.sample_times(k_t, sch, 5, sch.default_t_sampling, dtype=x0.dtype)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    xt = sch.marginal(x0, eps, tt)
    ci, cs, co = (v[:, None] for v in mi.coefficients(tt))
    want = jnp.sum((ci * xt - (x0 - cs * xt) / co) ** 2, axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_edm_preconditioning_bad_arguments():
    x = jnp.zeros((1, 2))
    with pytest.raises(JaxdiffError, match=r"^schedule=None"):
        models.as_denoiser(_fn, None, x, parametrization="edm", params=1.0)
    from jaxdiff import schedules

    with pytest.raises(JaxdiffError, match=r"^sigma_data=0"):
        models.as_denoiser(_fn, None, x, parametrization="edm", params=1.0,
                           schedule=schedules.ve(), sigma_data=0)  # fmt: skip
    with pytest.raises(JaxdiffError, match=r"^parametrization='edn'.*'edm'"):
        models.as_denoiser(_fn, None, x, parametrization="edn", params=1.0)
