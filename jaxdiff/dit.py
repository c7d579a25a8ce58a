"""Diffusion Transformer (DiT, Peebles & Xie arXiv 2212.09748) for sequences and images.

Patchify -> linear patch embedding + fixed sinusoidal position embedding -> ``depth`` transformer
blocks conditioned by adaLN-Zero on the time (+ condition) embedding -> adaLN final layer ->
unpatchify.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxdiff._checks import as_float_array, fail
from jaxdiff._nn import (
    check_cond_fields,
    check_dtype,
    cond_embedding,
    norm_f32,
    null_cond_value,
    self_attention,
    time_features,
)

__all__ = ["DiT", "sincos_position_embedding"]

_zeros = nn.initializers.zeros


def _is_pos_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | np.integer) and v >= 1


def _sincos_1d(pos: np.ndarray, dim: int, max_period: float = 10000.0) -> np.ndarray:
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half) / half)
    arg = pos.astype(np.float64)[:, None] * freqs[None]
    return np.concatenate([np.sin(arg), np.cos(arg)], axis=-1)


def sincos_position_embedding(grid: tuple, dim: int) -> np.ndarray:
    """Fixed sinusoidal position embedding (Vaswani et al. arXiv 1706.03762; 2-D form of
    MAE/DiT, Peebles & Xie arXiv 2212.09748) of the tokens of a patch grid.

    * ``grid = (n,)`` (sequence): ``pe[i] = [sin(i w_k), cos(i w_k)]``,
      ``w_k = 10000^(-k / (dim/2))``; needs ``dim`` even.
    * ``grid = (gh, gw)`` (image, row-major tokens): ``pe[(r, c)] = [pe_{dim/2}(r), pe_{dim/2}(c)]``;
      needs ``dim % 4 == 0``.

    Returns a float32 numpy array of shape ``(prod(grid), dim)`` (a constant, not a parameter).
    """
    if len(grid) == 1:
        return _sincos_1d(np.arange(grid[0]), dim).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    pe = np.concatenate(
        [_sincos_1d(rows.ravel(), dim // 2), _sincos_1d(cols.ravel(), dim // 2)], axis=-1
    )
    return pe.astype(np.float32)


class DiT(nn.Module):
    """Diffusion Transformer with adaLN-Zero for sequences ``(B, L, C)`` or images ``(B, H, W, C)``.

    Architecture (``D = hidden``, ``p = patch_size``)::

        tokens = Dense_D(patchify_p(x)) + pos_embed           # (B, N, D), N = L/p or HW/p^2
        c = Dense_D(silu(Dense_D(time_features(t)) [+ cond_embedding(cond)]))
        depth x (adaLN-Zero block):
            (s1, g1, a1, s2, g2, a2) = Dense_6D(silu(c))      # zero-initialised
            z = z + a1 * MHSA(LN(z) * (1 + g1) + s1)
            z = z + a2 * MLP(LN(z) * (1 + g2) + s2)           # MLP: D -> mlp_ratio D -> D, GELU
        (s, g) = Dense_2D(silu(c))                            # zero-initialised
        out = unpatchify(Dense_{p^d C}(LN(z) * (1 + g) + s))  # zero-initialised

    LN has no affine parameters (the modulation supplies scale and shift). Patches: a sequence
    is cut into ``L / p`` consecutive chunks of ``p`` positions (``p C`` features each); an image
    into ``(H/p)(W/p)`` non-overlapping ``p x p`` squares (``p^2 C`` features), tokens in
    row-major order. Position embedding: :func:`sincos_position_embedding` (fixed). With the
    zero-initialised modulation and final layer every block starts as the identity and the
    network predicts exactly zero at initialisation (Peebles & Xie arXiv 2212.09748, sec. 3.2).

    Conditioning exactly as :class:`~jaxdiff.models.MLPScoreNet` (``num_classes`` labels with a
    null class, or ``cond_dim`` real vectors with NaN = null; :attr:`null_cond`). Time features:
    ``"fourier"`` or ``"sinusoidal"`` of ``time_scale * t``.

    Mixed precision: parameters in ``param_dtype`` (float32), dense layers and attention
    products in ``dtype`` (e.g. bfloat16; None = ``x``'s dtype), LayerNorm statistics and the
    attention softmax in float32, output cast back to ``x.dtype``.

    Attributes:
      hidden: token width ``D`` (divisible by ``num_heads``; even for sequences, a multiple
        of 4 for images).
      depth: number of transformer blocks.
      num_heads: attention heads.
      patch_size: ``p``; ``L`` (or ``H`` and ``W``) must be divisible by it.
      mlp_ratio: MLP hidden width / ``D``.
      input_size: None (any size divisible by ``p``), an int ``L`` (sequences) / ``H = W``
        (images), or ``(H, W)``: inputs of another size are rejected.
      num_classes, cond_dim, time_embedding, embed_dim, time_scale, fourier_scale: as UNet.
      dtype, param_dtype: compute and parameter dtypes.

    Call: ``net.apply(variables, x, t, cond=None)`` with ``t`` of shape ``(B,)`` or ``()``;
    returns an array of ``x``'s shape and dtype.
    """

    hidden: int = 64
    depth: int = 2
    num_heads: int = 4
    patch_size: int = 2
    mlp_ratio: float = 4.0
    input_size: int | tuple | None = None
    num_classes: int | None = None
    cond_dim: int | None = None
    time_embedding: str = "sinusoidal"
    embed_dim: int | None = None
    time_scale: float = 1000.0
    fourier_scale: float = 16.0
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @property
    def null_cond(self):
        """The "no condition" value: ``num_classes`` (labels), a NaN vector (real) or None."""
        return null_cond_value(self.num_classes, self.cond_dim)

    def _check_fields(self):
        check_cond_fields("DiT", self.time_embedding, self.num_classes, self.cond_dim)
        check_dtype("dtype", self.dtype)
        check_dtype("param_dtype", self.param_dtype, allow_none=False)
        for name in ("hidden", "num_heads", "patch_size"):
            if not _is_pos_int(getattr(self, name)):
                fail(name, getattr(self, name), "a positive integer")
        if (
            isinstance(self.depth, bool)
            or not isinstance(self.depth, int | np.integer)
            or (self.depth < 0)
        ):
            fail("depth", self.depth, "an integer >= 0")
        if not isinstance(self.mlp_ratio, int | float) or not self.mlp_ratio > 0:
            fail("mlp_ratio", self.mlp_ratio, "a positive number")
        if self.hidden % self.num_heads:
            fail("hidden", self.hidden, f"a multiple of num_heads={self.num_heads}")
        if self.embed_dim is not None and (not _is_pos_int(self.embed_dim) or self.embed_dim % 2):
            fail("embed_dim", self.embed_dim, "None or a positive even integer")
        s = self.input_size
        if s is not None and not (
            _is_pos_int(s)
            or (isinstance(s, tuple | list) and len(s) == 2 and all(_is_pos_int(v) for v in s))
        ):
            fail("input_size", s, "None, a positive int or a pair (H, W)")

    def _check_x(self, x):
        p = self.patch_size
        if x.ndim not in (3, 4):
            fail(
                "x",
                f"shape {tuple(x.shape)}",
                "sequences (B, L, C) or images (B, H, W, C) (rank 3 or 4)",
            )
        spatial = tuple(x.shape[1:-1])
        if self.input_size is not None:
            s = self.input_size
            want = (s,) * len(spatial) if _is_pos_int(s) else tuple(s)
            if tuple(want) != spatial:
                fail(
                    "x",
                    f"shape {tuple(x.shape)}",
                    f"wrong input size: this DiT has input_size={s}, so x must be "
                    f"(B, {', '.join(map(str, want))}, C)",
                )
        names = ("L",) if len(spatial) == 1 else ("H", "W")
        for n, d in zip(names, spatial, strict=True):
            if d % p:
                fail(
                    "x",
                    f"shape {tuple(x.shape)}",
                    f"{n} = {d} divisible by patch_size={p}",
                )
        if len(spatial) == 1 and self.hidden % 2:
            fail("hidden", self.hidden, "an even width for the sinusoidal position embedding")
        if len(spatial) == 2 and self.hidden % 4:
            fail("hidden", self.hidden, "a multiple of 4 for the 2-D position embedding of images")

    def _patchify(self, x):
        p = self.patch_size
        if x.ndim == 3:
            b, length, c = x.shape
            return x.reshape(b, length // p, p * c), (length // p,)
        b, h, w, c = x.shape
        y = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(b, (h // p) * (w // p), p * p * c), (h // p, w // p)

    def _unpatchify(self, y, shape):
        p = self.patch_size
        if len(shape) == 3:
            return y.reshape(shape)
        b, h, w, c = shape
        y = y.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(shape)

    @nn.compact
    def __call__(self, x, t, cond=None):
        self._check_fields()
        x = as_float_array(x)
        self._check_x(x)
        batch, d = x.shape[0], self.hidden
        cdt = x.dtype if self.dtype is None else self.dtype
        pdt = self.param_dtype
        t = jnp.broadcast_to(jnp.asarray(t, jnp.promote_types(x.dtype, jnp.float32)), (batch,))

        def dense(n, name, init=None):
            kw = {} if init is None else {"kernel_init": init, "bias_init": _zeros}
            return nn.Dense(n, dtype=cdt, param_dtype=pdt, name=name, **kw)

        def ln(z, name):
            return norm_f32(
                z, "layer", dtype=cdt, param_dtype=pdt, name=name, use_scale=False, use_bias=False
            )

        c = cond_embedding(
            cond,
            batch,
            d,
            num_classes=self.num_classes,
            cond_dim=self.cond_dim,
            owner="DiT",
            dtype=cdt,
            param_dtype=pdt,
        )
        feats = time_features(
            t,
            self.time_embedding,
            self.embed_dim or d,
            fourier_scale=self.fourier_scale,
            time_scale=self.time_scale,
        )
        e = dense(d, "time_in")(feats)
        if c is not None:
            e = e + c
        e = nn.silu(dense(d, "time_out")(nn.silu(e)))  # silu(c) feeds every modulation

        patches, grid = self._patchify(x.astype(cdt))
        z = dense(d, "patch_embed")(patches)
        z = z + jnp.asarray(sincos_position_embedding(grid, d), cdt)[None]

        mlp_width = max(1, int(round(self.mlp_ratio * d)))
        for i in range(self.depth):
            mod = dense(6 * d, f"block{i}_adaln", init=_zeros)(e)[:, None, :]
            s1, g1, a1, s2, g2, a2 = jnp.split(mod, 6, axis=-1)
            h = ln(z, f"block{i}_norm1") * (1 + g1) + s1
            z = z + a1 * self_attention(
                h, self.num_heads, dtype=cdt, param_dtype=pdt, name=f"block{i}_attn"
            )
            h = ln(z, f"block{i}_norm2") * (1 + g2) + s2
            h = dense(mlp_width, f"block{i}_mlp1")(h)
            h = dense(d, f"block{i}_mlp2")(nn.gelu(h, approximate=True))
            z = z + a2 * h

        s, g = jnp.split(dense(2 * d, "final_adaln", init=_zeros)(e)[:, None, :], 2, axis=-1)
        h = ln(z, "final_norm") * (1 + g) + s
        out = dense(patches.shape[-1], "final_out", init=_zeros)(h)
        return self._unpatchify(out, x.shape).astype(x.dtype)
