"""Building blocks shared by :class:`~jaxdiff.models.MLPScoreNet`, :class:`~jaxdiff.unet.UNet` and
:class:`~jaxdiff.dit.DiT`: time features, the class / real-vector condition embedding with its
null condition, float32-statistics normalisation and multi-head self-attention with a float32
softmax (mixed precision).

All helpers that create parameters are plain functions meant to be called from inside a Linen
``@nn.compact`` method: the submodules they build attach to that (calling) module, under the
names given.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxdiff._checks import as_float_array, fail, is_concrete

__all__ = [
    "TIME_EMBEDDINGS",
    "sinusoidal_embedding",
    "fourier_embedding",
    "time_features",
    "check_cond_fields",
    "check_dtype",
    "null_cond_value",
    "cond_embedding",
    "norm_f32",
    "self_attention",
]

TIME_EMBEDDINGS = ("fourier", "sinusoidal")


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


def time_features(t, kind: str, dim: int, *, fourier_scale: float, time_scale: float):
    """``fourier_embedding(t, dim, fourier_scale)`` or ``sinusoidal_embedding(t, dim,
    time_scale)`` by ``kind``; ``t`` of shape ``(batch,)`` -> ``(batch, dim)``."""
    if kind == "fourier":
        return fourier_embedding(t, dim, fourier_scale)
    return sinusoidal_embedding(t, dim, time_scale)


# ------------------------------------------------------------------------------------------
# field checks
# ------------------------------------------------------------------------------------------
def check_cond_fields(owner: str, time_embedding, num_classes, cond_dim) -> None:
    """Raise unless ``time_embedding`` is known and at most one of ``num_classes`` /
    ``cond_dim`` is set (each a positive integer)."""
    if time_embedding not in TIME_EMBEDDINGS:
        fail("time_embedding", time_embedding, f"one of {TIME_EMBEDDINGS}")
    if num_classes is not None and cond_dim is not None:
        fail(
            "cond_dim",
            cond_dim,
            f"None when num_classes is set ({owner} takes one kind of condition)",
        )
    for name, v in (("num_classes", num_classes), ("cond_dim", cond_dim)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1):
            fail(name, v, "None or a positive integer")


def check_dtype(name: str, dtype, allow_none: bool = True) -> None:
    """Raise unless ``dtype`` is a floating dtype (or None when ``allow_none``)."""
    if dtype is None:
        if not allow_none:
            fail(name, dtype, "a floating dtype (e.g. jnp.float32)")
        return
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        fail(name, dtype, "a floating dtype such as jnp.float32 or jnp.bfloat16")


def null_cond_value(num_classes, cond_dim):
    """The "no condition" value of one example: ``num_classes`` (labels), a NaN vector of
    length ``cond_dim`` (real conditions) or None (unconditional network)."""
    if num_classes is not None:
        return num_classes
    if cond_dim is not None:
        return np.full((cond_dim,), np.nan, np.float32)
    return None


# ------------------------------------------------------------------------------------------
# condition embedding
# ------------------------------------------------------------------------------------------
def cond_embedding(
    cond,
    batch: int,
    features: int,
    *,
    num_classes,
    cond_dim,
    owner: str,
    dtype=None,
    param_dtype=jnp.float32,
):
    """Embedding ``(batch, features)`` of the condition, or None for an unconditional network.

    Call from inside a Linen ``@nn.compact`` method; creates ``label_embed`` (an ``nn.Embed``)
    or ``cond_embed`` (an ``nn.Dense``) on the calling module.

    * ``num_classes=K``: ``cond`` holds integer labels ``(batch,)`` (or a scalar, broadcast);
      the table has ``K + 1`` rows and row ``K`` is the null label; ``cond=None`` means all null.
    * ``cond_dim=C``: ``cond`` is real ``(batch, C)``; a row holding NaN (or ``cond=None``) is
      the null condition: it is replaced by zeros and a ``null_flag = 1`` input is appended
      (``Dense([cond, null_flag])``), so no NaN reaches the network or its gradients.

    Classifier-free guidance (Ho & Salimans arXiv 2207.12598) trains the null entry by label
    dropout. Raises :class:`~jaxdiff.JaxdiffError` for non-integer labels, labels outside
    ``[0, K]`` (concrete values only), a real condition of the wrong shape, or a condition given
    to an unconditional network.
    """
    if num_classes is not None:
        if cond is None:
            labels = jnp.full((batch,), num_classes, jnp.int32)
        else:
            labels = jnp.asarray(cond)
            if not jnp.issubdtype(labels.dtype, jnp.integer):
                fail("cond", f"dtype {labels.dtype}", "integer class labels")
            if labels.ndim > 1 or (labels.ndim == 1 and labels.shape[0] not in (1, batch)):
                fail("cond", f"shape {labels.shape}", f"integer labels of shape ({batch},)")
            if is_concrete(labels) and (
                np.any(np.asarray(labels) < 0) or np.any(np.asarray(labels) > num_classes)
            ):
                fail("cond", labels, f"labels in [0, {num_classes}] ({num_classes} = null)")
            labels = jnp.broadcast_to(labels, (batch,))
        return nn.Embed(
            num_classes + 1, features, dtype=dtype, param_dtype=param_dtype, name="label_embed"
        )(labels)
    if cond_dim is not None:
        fdt = jnp.float32 if dtype is None else dtype
        fdt = jnp.promote_types(fdt, jnp.float32)
        if cond is None:
            vec = jnp.zeros((batch, cond_dim), fdt)
            null = jnp.ones((batch, 1), fdt)
        else:
            c = jnp.asarray(cond)
            if not jnp.issubdtype(c.dtype, jnp.number) or jnp.issubdtype(
                c.dtype, jnp.complexfloating
            ):
                fail("cond", f"dtype {c.dtype}", f"real vectors of shape (batch, {cond_dim})")
            c = c.astype(fdt)
            if (
                c.shape[-1:] != (cond_dim,)
                or c.ndim > 2
                or (c.ndim == 2 and c.shape[0] not in (1, batch))
            ):
                fail("cond", f"shape {c.shape}", f"shape ({batch}, {cond_dim})")
            c = jnp.broadcast_to(c, (batch, cond_dim))
            is_null = jnp.any(jnp.isnan(c), axis=-1, keepdims=True)
            vec = jnp.where(is_null, 0.0, c)
            null = is_null.astype(fdt)
        return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name="cond_embed")(
            jnp.concatenate([vec, null], -1)
        )
    if cond is not None:
        fail("cond", cond, f"None: this {owner} has num_classes=None and cond_dim=None")
    return None


# ------------------------------------------------------------------------------------------
# mixed-precision layers
# ------------------------------------------------------------------------------------------
def norm_f32(
    h,
    kind: str,
    *,
    dtype,
    param_dtype=jnp.float32,
    groups: int = 1,
    name=None,
    use_scale: bool = True,
    use_bias: bool = True,
):
    """GroupNorm (``kind="group"``, Wu & He arXiv 1803.08494) or LayerNorm (``"layer"``) of one
    example at a time, with statistics and normalisation in float32 (at least), output cast to
    ``dtype`` (the compute dtype; None keeps ``h``'s dtype)."""
    out_dtype = h.dtype if dtype is None else dtype
    h32 = h.astype(jnp.promote_types(h.dtype, jnp.float32))
    if kind == "group":
        y = nn.GroupNorm(
            num_groups=groups,
            dtype=h32.dtype,
            param_dtype=param_dtype,
            name=name,
            use_scale=use_scale,
            use_bias=use_bias,
        )(h32)
    else:
        y = nn.LayerNorm(
            dtype=h32.dtype,
            param_dtype=param_dtype,
            name=name,
            use_scale=use_scale,
            use_bias=use_bias,
        )(h32)
    return y.astype(out_dtype)


def self_attention(
    h, num_heads: int, *, dtype, param_dtype=jnp.float32, name: str = "attn", out_init=None
):
    """Multi-head self-attention over the token axis of ``h (batch, tokens, features)``
    (Vaswani et al. arXiv 1706.03762): ``softmax(q k^T / sqrt(d_head)) v`` per head, then an
    output projection. Each example attends only to its own tokens. Projections run in
    ``dtype``; the logits and the softmax in float32 (cast back to ``dtype`` before ``@ v``).

    Creates ``{name}_qkv`` and ``{name}_out`` Dense layers on the calling module;
    ``out_init`` initialises the output kernel (default lecun normal).
    """
    b, n, f = h.shape
    dh = f // num_heads
    qkv = nn.Dense(3 * f, dtype=dtype, param_dtype=param_dtype, name=f"{name}_qkv")(h)
    q, k, v = jnp.split(qkv.reshape(b, n, 3, num_heads, dh), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # (b, n, heads, dh)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.promote_types(q.dtype, jnp.float32))
    w = nn.softmax(logits / math.sqrt(dh), axis=-1).astype(v.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, f)
    kw = {} if out_init is None else {"kernel_init": out_init}
    return nn.Dense(f, dtype=dtype, param_dtype=param_dtype, name=f"{name}_out", **kw)(o)
