"""Score networks and the adapters that turn any Flax module or plain function into a Denoiser.

:class:`MLPScoreNet` is a small residual MLP with a time embedding and optional class-label or
real-vector conditioning (with a learned null condition for classifier-free guidance);
:class:`~jaxdiff.unet.UNet` (images) and :class:`~jaxdiff.dit.DiT` (sequences and images) are
re-exported here; all three share the condition embedding of :mod:`jaxdiff._nn` and take
``dtype`` / ``param_dtype`` for mixed precision.
:func:`as_denoiser` wraps a Flax Linen module, a Flax NNX module or a plain function
``fn(params, x, t, cond)`` into a :class:`~jaxdiff.denoiser.Denoiser` plus its params.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff._checks import as_float_array, fail, is_concrete
from jaxdiff._nn import (
    check_cond_fields,
    check_dtype,
    cond_embedding,
    fourier_embedding,
    null_cond_value,
    sinusoidal_embedding,
    time_features,
)
from jaxdiff.denoiser import Denoiser, Preconditioned
from jaxdiff.dit import DiT
from jaxdiff.parametrize import PARAMETRIZATIONS
from jaxdiff.unet import UNet

__all__ = [
    "MLPScoreNet",
    "UNet",
    "DiT",
    "as_denoiser",
    "sinusoidal_embedding",
    "fourier_embedding",
]


# ------------------------------------------------------------------------------------------
# MLP score network
# ------------------------------------------------------------------------------------------
class MLPScoreNet(nn.Module):
    """Residual MLP score network for data of any event shape (flattened internally).

    Architecture (``h`` = ``hidden``, ``act`` = ``activation``)::

        e = Dense_h(time_features(t)) [+ Embed(label) | + Dense_h([cond, null_flag])]
        e = Dense_h(act(e))
        z = Dense_h(flatten(x))
        repeat depth times:  z = z + Dense_h(act(LayerNorm(z) + e))       # pre-LN residual block
        out = Dense_D(act(LayerNorm(z)))        # zero-initialised when zero_init_out

    Time features: ``"fourier"`` (Gaussian Fourier features with scale ``fourier_scale``,
    Song et al. arXiv 2011.13456) or ``"sinusoidal"`` (positional embedding of
    ``time_scale * t``, Ho et al. arXiv 2006.11239); see :func:`fourier_embedding` and
    :func:`sinusoidal_embedding`. The time embedding enters every block (as in the DDPM U-Net's
    residual blocks).

    Conditioning (for classifier-free guidance, Ho & Salimans arXiv 2207.12598):

    * ``num_classes=K``: ``cond`` holds integer labels of shape ``(batch,)``; a learned embedding
      table of ``K + 1`` rows, where row ``K`` is the *null* label (``cond=None`` means all null).
    * ``cond_dim=C``: ``cond`` is real, shape ``(batch, C)``. A row containing NaN (or
      ``cond=None``) is the *null* condition: it is replaced by zeros (so no NaN reaches the
      network or its gradients) and a ``null_flag = 1`` input is set, whose weights learn the
      null embedding.

    :attr:`null_cond` gives the value that means "unconditional" (``K`` or a NaN vector).

    Mixed precision: parameters are created in ``param_dtype`` (float32), the dense layers run
    in ``dtype`` (e.g. ``jnp.bfloat16``; None = the dtype of ``x``), LayerNorm statistics in
    float32, and the output is cast back to ``x.dtype``.

    Call: ``net.apply(variables, x, t, cond=None)`` with ``x`` of shape ``(batch, *event)`` and
    ``t`` of shape ``(batch,)`` or ``()``; returns an array shaped like ``x``.
    """

    hidden: int = 128
    depth: int = 3
    time_embedding: str = "fourier"
    embed_dim: int = 64
    time_scale: float = 1000.0
    fourier_scale: float = 16.0
    num_classes: int | None = None
    cond_dim: int | None = None
    activation: Callable = nn.silu
    zero_init_out: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def null_cond(self):
        """The "no condition" value: ``num_classes`` (labels), a NaN vector (real) or None."""
        return null_cond_value(self.num_classes, self.cond_dim)

    def _check_fields(self):
        check_cond_fields("MLPScoreNet", self.time_embedding, self.num_classes, self.cond_dim)
        check_dtype("dtype", self.dtype)
        check_dtype("param_dtype", self.param_dtype, allow_none=False)
        for name in ("hidden", "depth", "embed_dim"):
            v = getattr(self, name)
            if not isinstance(v, int | np.integer) or v < (0 if name == "depth" else 1):
                fail(name, v, "a positive integer" if name != "depth" else "an integer >= 0")

    @nn.compact
    def __call__(self, x, t, cond=None):
        self._check_fields()
        x = as_float_array(x)
        if x.ndim < 2:
            fail("x", f"shape {x.shape}", "shape (batch, *event_shape) with a batch axis")
        batch, event = x.shape[0], x.shape[1:]
        cdt = x.dtype if self.dtype is None else self.dtype
        pdt = self.param_dtype
        t = jnp.broadcast_to(jnp.asarray(t, jnp.promote_types(x.dtype, jnp.float32)), (batch,))
        act = self.activation

        c = cond_embedding(  # first: validates cond before any compute
            cond,
            batch,
            self.hidden,
            num_classes=self.num_classes,
            cond_dim=self.cond_dim,
            owner="MLPScoreNet",
            dtype=cdt,
            param_dtype=pdt,
        )
        feats = time_features(
            t,
            self.time_embedding,
            self.embed_dim,
            fourier_scale=self.fourier_scale,
            time_scale=self.time_scale,
        )
        e = nn.Dense(self.hidden, dtype=cdt, param_dtype=pdt, name="time_in")(feats)
        if c is not None:
            e = e + c
        e = nn.Dense(self.hidden, dtype=cdt, param_dtype=pdt, name="time_out")(act(e))

        z = nn.Dense(self.hidden, dtype=cdt, param_dtype=pdt, name="x_in")(
            x.reshape(batch, -1).astype(cdt)
        )
        for i in range(self.depth):
            y = act(_layer_norm(z, cdt, pdt, f"norm_{i}") + e)
            z = z + nn.Dense(self.hidden, dtype=cdt, param_dtype=pdt, name=f"dense_{i}")(y)
        z = act(_layer_norm(z, cdt, pdt, "norm_out"))
        init = nn.initializers.zeros if self.zero_init_out else nn.initializers.lecun_normal()
        out = nn.Dense(
            int(np.prod(event)), kernel_init=init, dtype=cdt, param_dtype=pdt, name="out"
        )(z)
        return out.reshape(x.shape).astype(x.dtype)


def _layer_norm(z, cdt, pdt, name):
    """LayerNorm with float32 (or wider) statistics, output in the compute dtype ``cdt``."""
    z32 = z.astype(jnp.promote_types(z.dtype, jnp.float32))
    return nn.LayerNorm(dtype=z32.dtype, param_dtype=pdt, name=name)(z32).astype(cdt)


# ------------------------------------------------------------------------------------------
# adapters
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _LinenApply:
    """``(params, x, t, cond) -> module.apply(params, x, t[, cond])``; hashable by module."""

    module: nn.Module

    def __call__(self, params, x, t, cond=None):
        if cond is None:
            return self.module.apply(params, x, t)
        return self.module.apply(params, x, t, cond)


@dataclasses.dataclass(frozen=True)
class _NNXApply:
    """``(state, x, t, cond) -> nnx.merge(graphdef, state)(x, t[, cond])``; hashable by graphdef."""

    graphdef: Any

    def __call__(self, params, x, t, cond=None):
        module = nnx.merge(self.graphdef, params)
        if cond is None:
            return module(x, t)
        return module(x, t, cond)


@functools.partial(jax.jit, static_argnums=0)
def _linen_init(net, key, *args):
    # one compiled init (cached for equal modules and shapes) instead of dozens of eagerly
    # dispatched, separately compiled ops
    return net.init_with_output(key, *args)


def _check_x_example(x_example):
    if x_example is None:
        return None
    x = as_float_array(x_example)
    if x.ndim < 2:
        fail(
            "x_example",
            f"shape {tuple(x.shape)}",
            "an array of shape (batch, *event_shape) with a leading batch axis "
            "(e.g. x[:1] rather than x[0])",
        )
    return x


def _check_output(out, x, net):
    shape = getattr(out, "shape", None)
    if shape is None or tuple(shape) != tuple(x.shape):
        fail(
            "net",
            net if not isinstance(net, nn.Module | nnx.Module) else type(net).__name__,
            f"a network whose output has the shape of x_example {tuple(x.shape)} "
            f"(got {None if shape is None else tuple(shape)})",
        )


def as_denoiser(
    net,
    key=None,
    x_example=None,
    *,
    parametrization: str | None = None,
    cond_example=None,
    params=None,
    schedule=None,
    sigma_data=1.0,
) -> tuple[Denoiser, Any]:
    """Wrap a Flax Linen module, a Flax NNX module or a plain function as a Denoiser.

    * Linen ``nn.Module`` (unbound instance): ``params = net.init(key, x_example, t_example,
      cond_example)`` (skipped when ``params`` is given); ``apply(p, x, t, c) =
      net.apply(p, x, t, c)`` (``c`` omitted when None). ``key`` and ``x_example`` are required.
    * NNX ``nnx.Module`` (an initialised instance): ``graphdef, params = nnx.split(net)``;
      ``apply`` merges ``(graphdef, p)`` and calls ``module(x, t, c)``. ``key`` is unused.
      Modules holding RNG streams (``nnx.Rngs``, ``nnx.Dropout``) are rejected: split them off.
    * a plain function ``fn(params, x, t, cond) -> prediction``: needs ``params=``.

    Args:
      net: the network, one of the three kinds above. ``t`` reaches it with shape ``(batch,)``.
      key: PRNG key for Linen initialisation.
      x_example: an example input of shape ``(batch, *event_shape)``; sets
        ``Denoiser.event_shape = x_example.shape[1:]`` (``None`` = any shape, for NNX/functions).
        When given, one abstract evaluation (``jax.eval_shape``) checks the output shape.
      parametrization: what ``net`` predicts: ``"eps" | "x0" | "v" | "score" | "velocity"``,
        or ``"edm"``: ``net`` is the preconditioned network ``F`` of Karras et al. (arXiv
        2206.00364, eq. 7) and the model is a :class:`~jaxdiff.denoiser.Preconditioned`
        x0-predictor ``c_skip x / alpha + c_out F(c_in x, t)`` (needs ``schedule``).
        Default for a Flax module (a network to train): ``"edm"`` with ``sigma_data = 1``,
        the best or close to the best of eps / x0 / v / EDM on every problem and schedule
        measured, where each of the others fails badly somewhere (docs/defaults.md); on a
        variance-preserving schedule it is v-prediction. A plain function must say what it
        predicts (no default: it is usually a pretrained or exact predictor).
      cond_example: an example condition for initialisation / the shape check (e.g. labels of
        shape ``(batch,)``); None for an unconditional call.
      params: parameters to use instead of initialising (required for plain functions).
      schedule: the noise schedule, for ``parametrization="edm"`` (its ``alpha``, ``sigma``
        set the preconditioning); ignored otherwise.
      sigma_data: the data std of ``"edm"`` preconditioning (a scalar).
    Returns:
      ``(Denoiser, params)``.
    """
    if parametrization is None:
        if callable(net) and not isinstance(net, nn.Module | nnx.Module | type):
            fail(
                "parametrization",
                None,
                f"what the function predicts, one of {PARAMETRIZATIONS + ('edm',)} (a plain "
                "function has no default: it is usually a pretrained or exact predictor)",
            )
        parametrization = "edm"
    edm = parametrization == "edm"
    if edm:
        from jaxdiff.schedules import Schedule

        if not isinstance(schedule, Schedule):
            fail(
                "schedule",
                schedule,
                "the noise schedule the model is trained and sampled with, e.g. "
                "as_denoiser(net, key, x, schedule=jaxdiff.schedules.vp_linear()): the default "
                "parametrization 'edm' scales the network's input and output by alpha(t) and "
                "sigma(t) (or pass parametrization='v', 'eps', 'x0', ...)",
            )
        if is_concrete(sigma_data) and not (
            np.ndim(sigma_data) == 0 and float(np.asarray(sigma_data)) > 0
        ):
            fail("sigma_data", sigma_data, "a positive scalar (the data std)")
    elif parametrization not in PARAMETRIZATIONS:
        fail("parametrization", parametrization, f"one of {PARAMETRIZATIONS + ('edm',)}")
    x = _check_x_example(x_example)
    event_shape = None if x is None else tuple(x.shape[1:])

    if isinstance(net, type):
        fail("net", net, "a module instance (e.g. MLPScoreNet()), not a class")
    if isinstance(net, Denoiser):
        fail("net", type(net).__name__, "a Flax module or a function; net is already a Denoiser")

    if isinstance(net, nn.Module):
        if x is None:
            fail("x_example", None, "an example input of shape (batch, *event_shape) for init")
        apply = _LinenApply(net)
        t_example = jnp.full(x.shape[:1], 0.5, x.dtype)
        if params is None:
            if key is None:
                fail("key", None, "a PRNG key to initialise the Linen module")
            args = (x, t_example) if cond_example is None else (x, t_example, cond_example)
            out, params = _linen_init(net, key, *args)
        else:
            out = jax.eval_shape(apply, params, x, t_example, cond_example)
        _check_output(out, x, net)
    elif isinstance(net, nnx.Module):
        graphdef, state = nnx.split(net)
        if any(
            hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
            for leaf in jax.tree.leaves(state)
        ):
            fail(
                "net",
                type(net).__name__,
                "an NNX module without RNG state (nnx.Rngs / Dropout streams cannot be "
                "optimised as params); use a deterministic module",
            )
        apply = _NNXApply(graphdef)
        params = state if params is None else params
        if x is not None:
            t_example = jnp.full(x.shape[:1], 0.5, x.dtype)
            _check_output(jax.eval_shape(apply, params, x, t_example, cond_example), x, net)
    elif callable(net):
        if params is None:
            fail("params", None, "the parameters of the plain function net(params, x, t, cond)")
        apply = net
        if x is not None:
            t_example = jnp.full(x.shape[:1], 0.5, x.dtype)
            _check_output(jax.eval_shape(apply, params, x, t_example, cond_example), x, net)
    else:
        fail(
            "net",
            net,
            "a flax.linen.Module, a flax.nnx.Module or a function fn(params, x, t, cond)",
        )
    if edm:
        return Preconditioned(
            apply=apply, event_shape=event_shape, schedule=schedule, sigma_data=sigma_data
        ), params
    return Denoiser(apply=apply, parametrization=parametrization, event_shape=event_shape), params
