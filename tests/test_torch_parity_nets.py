"""The PyTorch twins of MLPScoreNet and UNet (benchmarks/_torch_nets.py) are the same functions.

Independent-implementation oracle for ``benchmarks/training.py``: with jaxdiff's parameters copied
in, the torch networks give the same outputs (float32, ~1e-5), have the same parameter counts, and
the torch eps-DSM loss and its gradients equal jaxdiff's ``dsm_loss`` on the same draws, so the
benchmark's speed ratio compares like with like. Parameters are randomised (every leaf, including
LayerNorm/GroupNorm scales and the zero-initialised output layers) so that no layer is skipped by
a zero weight. Runs when the ``bench`` extra (torch) is installed.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import losses, models, schedules

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import _torch_nets as tn  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny nets: one torch thread (OpenMP threads only cost time here); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_variables(net, *args, seed=0):
    """Random parameters with the structure of ``net.init(key, *args)``, made in numpy from
    ``jax.eval_shape`` (no compiled init): kernels ``N(0, 1/fan_in)``, norm scales ``1 + 0.3 N``,
    biases ``0.3 N``, embeddings ``N(0, 1)``. Every leaf is nonzero, including the layers that
    jaxdiff zero-initialises, so no layer escapes the comparison."""
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), *args)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        if "kernel" in name:
            return jnp.asarray(z / np.sqrt(np.prod(leaf.shape[:-1])))
        if "scale" in name:
            return jnp.asarray(1.0 + 0.3 * z)
        if "bias" in name:
            return jnp.asarray(0.3 * z)
        return jnp.asarray(z)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _n(tree):
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def _np(t):
    return t.detach().numpy()


def _t(a):
    return torch.from_numpy(np.array(a))  # a writable copy


@pytest.mark.parametrize(
    "kw",
    [
        dict(hidden=32, depth=2, time_embedding="fourier"),
        dict(hidden=48, depth=3, time_embedding="sinusoidal", num_classes=3),
    ],
    ids=["fourier", "sinusoidal-labels"],
)
def test_mlp_forward_parity(kw):
    net = models.MLPScoreNet(**kw)
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 5))
    t = jax.random.uniform(jax.random.PRNGKey(1), (16,), minval=1e-3, maxval=1.0)
    cond = jnp.arange(16) % 4 if "num_classes" in kw else None  # label 3 = the null class
    args = (x, t) if cond is None else (x, t, cond)
    v = _random_variables(net, *args)
    ours = np.asarray(jax.jit(net.apply)(v, *args))  # one compile, not per-op
    tnet = tn.load_mlp_params(tn.TorchMLPScoreNet.from_flax(net, (5,)), v)
    assert tn.count_params(tnet) == _n(v)
    tcond = None if cond is None else _t(cond)
    theirs = _np(tnet(_t(x), _t(t), tcond))
    assert np.std(ours) > 0.3  # a real function of the input, not zeros
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)


def test_mlp_dsm_loss_grad_and_adam_step_parity():
    """torch's eps-DSM loss, gradients and one Adam step equal jaxdiff's ``dsm_loss`` / optax.adam.

    The draws of ``t`` and ``eps`` are taken from ``dsm_loss``'s key the way it draws them; the
    first assertion checks that reconstruction against ``dsm_loss`` itself."""
    net = models.MLPScoreNet(hidden=32, depth=2)
    sch = schedules.vp_linear()
    x0 = jax.random.normal(jax.random.PRNGKey(0), (32, 4))
    v = _random_variables(net, x0, x0[:, 0])
    model, v = models.as_denoiser(net, x_example=x0[:1], params=v, parametrization="eps")
    key = jax.random.PRNGKey(3)
    loss, grads = jax.jit(jax.value_and_grad(losses.dsm_loss))(v, key, model, sch, x0)

    k_t, k_eps, _ = jax.random.split(key, 3)
    t = losses.sample_times(k_t, sch, 32)
    eps = jax.random.normal(k_eps, x0.shape)
    recon = jax.jit(
        lambda v: jnp.mean(jnp.sum((model(v, sch.marginal(x0, eps, t), t) - eps) ** 2, -1))
    )(v)
    np.testing.assert_allclose(float(recon), float(loss), rtol=1e-6)

    tnet = tn.load_mlp_params(tn.TorchMLPScoreNet.from_flax(net, (4,)), v)
    tl = tn.dsm_eps_loss(tnet, *(_t(a) for a in (x0, t, eps)))
    tl.backward()
    np.testing.assert_allclose(float(tl.detach()), float(loss), rtol=1e-5)
    # the gradient tree, loaded into a second twin, must equal the torch gradients
    gnet = tn.load_mlp_params(tn.TorchMLPScoreNet.from_flax(net, (4,)), grads)
    for (name, p), g in zip(tnet.named_parameters(), gnet.parameters(), strict=True):
        np.testing.assert_allclose(_np(p.grad), _np(g), rtol=2e-4, atol=2e-5, err_msg=name)

    # one Adam step (optax defaults = torch defaults) from the same gradients
    opt = optax.adam(1e-2)
    new_v = jax.jit(lambda g, v: optax.apply_updates(v, opt.update(g, opt.init(v), v)[0]))(grads, v)
    new = tn.load_mlp_params(tn.TorchMLPScoreNet.from_flax(net, (4,)), new_v)
    topt = torch.optim.Adam(tnet.parameters(), lr=1e-2, foreach=True)
    topt.step()
    for p, q in zip(tnet.parameters(), new.parameters(), strict=True):
        np.testing.assert_allclose(_np(p), _np(q), rtol=1e-5, atol=1e-6)


def test_vp_linear_alpha_sigma_parity():
    sch = schedules.vp_linear()
    t = np.linspace(1e-3, 1.0, 50, dtype=np.float32)
    a, s = tn.vp_linear_alpha_sigma(torch.from_numpy(t))
    ja, js = sch.alpha_sigma(jnp.asarray(t))
    np.testing.assert_allclose(_np(a), np.asarray(ja), rtol=1e-6)
    np.testing.assert_allclose(_np(s), np.asarray(js), rtol=1e-5)


@pytest.mark.parametrize(
    "kw, shape",
    [
        # the benchmarked structure: 2 levels, attention at 4x4 and in the middle, sinusoidal t
        (dict(channels=8, groups=4, num_heads=2), (3, 8, 8, 1)),
        pytest.param(
            dict(
                channels=8,
                groups=4,
                num_heads=2,
                channel_mults=(1, 2),
                num_res_blocks=2,
                attention_levels=(0,),
                time_embedding="fourier",
                num_classes=5,
            ),
            (2, 8, 4, 3),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["default", "2-blocks-attn0-labels-nonsquare"],
)
def test_unet_forward_parity(kw, shape):
    unet = pytest.importorskip("jaxdiff.unet")
    net = unet.UNet(**kw)
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    t = jax.random.uniform(jax.random.PRNGKey(1), shape[:1], minval=1e-3, maxval=1.0)
    cond = jnp.arange(shape[0]) % 6 if "num_classes" in kw else None
    args = (x, t) if cond is None else (x, t, cond)
    v = _random_variables(net, *args)
    ours = np.asarray(jax.jit(net.apply)(v, *args))  # one compile, not per-op
    tnet = tn.load_unet_params(tn.TorchUNet.from_flax(net, shape[1:]), v)
    assert tn.count_params(tnet) == _n(v)
    tcond = None if cond is None else _t(cond)
    x_nchw = _t(x).permute(0, 3, 1, 2)
    theirs = _np(tnet(x_nchw, _t(t), tcond).permute(0, 2, 3, 1))
    assert np.std(ours) > 0.3
    scale = float(np.max(np.abs(ours)))
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5 * scale)


def test_unet_stride2_padding_matters():
    """The twin's asymmetric SAME padding is needed: torch's symmetric padding=1 differs."""
    conv = tn._SameConv(2, 3, stride=2)
    x = torch.randn(1, 2, 8, 8)
    sym = torch.nn.functional.conv2d(x, conv.conv.weight, conv.conv.bias, stride=2, padding=1)
    assert conv(x).shape == sym.shape == (1, 3, 4, 4)
    assert float((conv(x) - sym).detach().abs().max()) > 0.1
