"""Score networks and the adapters that turn any Flax module or plain function into a Denoiser.

:class:`MLPScoreNet` is a small residual MLP with a time embedding and optional class-label or
real-vector conditioning (with a learned null condition for classifier-free guidance);
:func:`as_denoiser` wraps a Flax Linen module, a Flax NNX module or a plain function
``fn(params, x, t, cond)`` into a :class:`~jaxdiff.denoiser.Denoiser` plus its params.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff._checks import as_float_array, fail, is_concrete
from jaxdiff.denoiser import Denoiser
from jaxdiff.parametrize import check_parametrization

__all__ = [
    "MLPScoreNet",
    "as_denoiser",
    "sinusoidal_embedding",
    "fourier_embedding",
]

_TIME_EMBEDDINGS = ("fourier", "sinusoidal")


# ------------------------------------------------------------------------------------------
# time embeddings
# ------------------------------------------------------------------------------------------
def sinusoidal_embedding(t, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
    """Transformer-style positional embedding of ``scale * t`` (DDPM, Ho et al. arXiv 2006.11239).

    ``emb = [sin(scale t w_k), cos(scale t w_k)]`` with ``w_k = max_period^(-k / (dim/2))`` for
    ``k = 0 .. dim/2 - 1`` (Vaswani et al. arXiv 1706.03762, section 3.5).

    Args:
      t: times, shape ``(batch,)``.
      dim: embedding size (even).
      scale: multiplies ``t`` first; ``1000`` maps ``t in [0, 1]`` to DDPM's integer steps.
    Returns:
      shape ``(batch, dim)``.
    """
    if dim % 2:
        fail("dim", dim, "an even embedding size")
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half) / half)
    arg = (scale * as_float_array(t))[:, None] * jnp.asarray(freqs, dtype=jnp.result_type(t, float))
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


def fourier_embedding(t, dim: int, scale: float = 16.0, seed: int = 0):
    """Gaussian Fourier features of ``t`` (Song et al. arXiv 2011.13456; Tancik et al.
    arXiv 2006.10739).

    ``emb = [sin(2 pi t B_k), cos(2 pi t B_k)]`` with fixed ``B_k ~ N(0, scale^2)``, ``k < dim/2``.
    ``B`` is a compile-time constant drawn from ``numpy.random.default_rng(seed)``: it is neither
    a parameter (no optimizer or weight decay touches it) nor hidden PRNG state.

    Args:
      t: times, shape ``(batch,)``.
      dim: embedding size (even).
      scale: standard deviation of the frequencies ``B``.
    Returns:
      shape ``(batch, dim)``.
    """
    if dim % 2:
        fail("dim", dim, "an even embedding size")
    b = np.random.default_rng(seed).standard_normal(dim // 2) * scale
    arg = 2.0 * math.pi * as_float_array(t)[:, None] * jnp.asarray(b, jnp.result_type(t, float))
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


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

    @property
    def null_cond(self):
        """The "no condition" value: ``num_classes`` (labels), a NaN vector (real) or None."""
        if self.num_classes is not None:
            return self.num_classes
        if self.cond_dim is not None:
            return np.full((self.cond_dim,), np.nan, np.float32)
        return None

    def _check_fields(self):
        if self.time_embedding not in _TIME_EMBEDDINGS:
            fail("time_embedding", self.time_embedding, f"one of {_TIME_EMBEDDINGS}")
        if self.num_classes is not None and self.cond_dim is not None:
            fail(
                "cond_dim",
                self.cond_dim,
                "None when num_classes is set (MLPScoreNet takes one kind of condition)",
            )
        for name in ("hidden", "depth", "embed_dim"):
            v = getattr(self, name)
            if not isinstance(v, int | np.integer) or v < (0 if name == "depth" else 1):
                fail(name, v, "a positive integer" if name != "depth" else "an integer >= 0")

    def _cond_embedding(self, cond, batch: int, dtype):
        if self.num_classes is not None:
            if cond is None:
                labels = jnp.full((batch,), self.num_classes, jnp.int32)
            else:
                labels = jnp.asarray(cond)
                if not jnp.issubdtype(labels.dtype, jnp.integer):
                    fail("cond", f"dtype {labels.dtype}", "integer class labels")
                if is_concrete(labels) and (
                    np.any(np.asarray(labels) < 0) or np.any(np.asarray(labels) > self.num_classes)
                ):
                    fail(
                        "cond",
                        labels,
                        f"labels in [0, {self.num_classes}] ({self.num_classes} = null)",
                    )
                labels = jnp.broadcast_to(labels, (batch,))
            return nn.Embed(self.num_classes + 1, self.hidden, name="label_embed")(labels)
        if self.cond_dim is not None:
            if cond is None:
                vec = jnp.zeros((batch, self.cond_dim), dtype)
                null = jnp.ones((batch, 1), dtype)
            else:
                c = jnp.asarray(cond, dtype)
                if c.shape[-1:] != (self.cond_dim,):
                    fail("cond", f"shape {c.shape}", f"shape (batch, {self.cond_dim})")
                c = jnp.broadcast_to(c, (batch, self.cond_dim))
                is_null = jnp.any(jnp.isnan(c), axis=-1, keepdims=True)
                vec = jnp.where(is_null, 0.0, c)
                null = is_null.astype(dtype)
            return nn.Dense(self.hidden, name="cond_embed")(jnp.concatenate([vec, null], -1))
        if cond is not None:
            fail("cond", cond, "None: this MLPScoreNet has num_classes=None and cond_dim=None")
        return None

    @nn.compact
    def __call__(self, x, t, cond=None):
        self._check_fields()
        x = as_float_array(x)
        if x.ndim < 2:
            fail("x", f"shape {x.shape}", "shape (batch, *event_shape) with a batch axis")
        batch, event = x.shape[0], x.shape[1:]
        dtype = x.dtype
        t = jnp.broadcast_to(jnp.asarray(t, dtype), (batch,))
        act = self.activation

        c = self._cond_embedding(cond, batch, dtype)  # first: validates cond before any compute
        if self.time_embedding == "fourier":
            feats = fourier_embedding(t, self.embed_dim, self.fourier_scale)
        else:
            feats = sinusoidal_embedding(t, self.embed_dim, self.time_scale)
        e = nn.Dense(self.hidden, name="time_in")(feats)
        if c is not None:
            e = e + c
        e = nn.Dense(self.hidden, name="time_out")(act(e))

        z = nn.Dense(self.hidden, name="x_in")(x.reshape(batch, -1))
        for i in range(self.depth):
            y = act(nn.LayerNorm(name=f"norm_{i}")(z) + e)
            z = z + nn.Dense(self.hidden, name=f"dense_{i}")(y)
        z = act(nn.LayerNorm(name="norm_out")(z))
        init = nn.initializers.zeros if self.zero_init_out else nn.initializers.lecun_normal()
        out = nn.Dense(int(np.prod(event)), kernel_init=init, name="out")(z)
        return out.reshape(x.shape)


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
    parametrization: str = "eps",
    cond_example=None,
    params=None,
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
      parametrization: what ``net`` predicts: ``"eps" | "x0" | "v" | "score" | "velocity"``.
      cond_example: an example condition for initialisation / the shape check (e.g. labels of
        shape ``(batch,)``); None for an unconditional call.
      params: parameters to use instead of initialising (required for plain functions).
    Returns:
      ``(Denoiser, params)``.
    """
    parametrization = check_parametrization(parametrization)
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
    return Denoiser(apply=apply, parametrization=parametrization, event_shape=event_shape), params
