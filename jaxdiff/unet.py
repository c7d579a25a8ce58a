"""A small DDPM/ADM-style U-Net score network for NHWC images.

Ho et al. arXiv 2006.11239 (DDPM, appendix B) and Dhariwal & Nichol arXiv 2105.05233 (ADM):
residual blocks with a time (+ condition) embedding, down/up-sampling with skip connections,
multi-head self-attention at the low resolutions and in the middle, zero-initialised output.
"""

from __future__ import annotations

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

__all__ = ["UNet"]

_zeros = nn.initializers.zeros


def _is_pos_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | np.integer) and v >= 1


class UNet(nn.Module):
    """DDPM-style U-Net for images ``x`` of shape ``(B, H, W, C)`` (NHWC).

    Architecture (``ch = channels``, ``L = len(channel_mults)``, ``e`` the embedding)::

        e = Dense_4ch(silu(Dense_4ch(time_features(t)) [+ cond_embedding(cond)]))
        h = Conv3x3_ch(x);  skips = [h]
        for level l < L:                                   # resolution H / 2^l
            num_res_blocks x: h = ResBlock_{ch*mult_l}(h, e) [-> Attn if l in attention_levels]
                              skips.push(h)
            if l < L-1: h = Downsample(h) (Conv3x3 stride 2); skips.push(h)
        h = ResBlock(h, e) -> Attn(h) -> ResBlock(h, e)    # middle, lowest resolution
        for level l = L-1 .. 0:
            (num_res_blocks + 1) x: h = ResBlock_{ch*mult_l}(concat(h, skips.pop()), e)
                                    [-> Attn if l in attention_levels]
            if l > 0: h = Upsample(h) (nearest x2, Conv3x3)
        out = Conv3x3_C(silu(GroupNorm(h)))               # zero-initialised

        ResBlock_c(h, e) = skip(h) + Conv3x3_c(silu(GN(r)))          # second conv zero-init
                           r = Conv3x3_c(silu(GN(h))) + Dense_c(silu(e))[:, None, None, :]
                           skip = 1x1 conv when the channel count changes, else identity
        Attn(h) = h + Dense(MHSA(GN(h)))   over the H*W tokens of each example

    GroupNorm normalises each example separately, so a batch of one and a batch of eight give
    the same rows (no batch statistics).

    Time features: ``"fourier"`` (Song et al. arXiv 2011.13456) or ``"sinusoidal"`` of
    ``time_scale * t`` (Ho et al. arXiv 2006.11239). Conditioning exactly as
    :class:`~jaxdiff.models.MLPScoreNet`: ``num_classes=K`` (integer labels ``(B,)``, label
    ``K`` and ``cond=None`` are the null class) or ``cond_dim=C`` (real ``(B, C)``, a row with a
    NaN and ``cond=None`` are the null condition); :attr:`null_cond` gives the null value.

    Mixed precision: parameters are created in ``param_dtype`` (float32); convolutions, dense
    layers and the attention products run in ``dtype`` (e.g. ``jnp.bfloat16``; None = the dtype
    of ``x``); GroupNorm statistics and the attention softmax run in float32; the output is
    cast back to ``x.dtype`` (so sampler state stays float32).

    Attributes:
      channels: base width ``ch``.
      channel_mults: width multiplier per resolution level; ``H`` and ``W`` must be divisible by
        ``2 ** (len(channel_mults) - 1)``.
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attention_levels: level indices (0 = full resolution) with self-attention after each
        residual block; the middle block always has attention.
      num_heads: attention heads (each attention level's width must be divisible by it).
      groups: GroupNorm groups (every level's width must be divisible by it).
      image_size: None (any size allowed by the levels) or ``(H, W)`` / an int ``H = W``:
        inputs of another spatial size are rejected.
      num_classes, cond_dim: the condition (at most one).
      time_embedding, embed_dim, time_scale, fourier_scale: time features.
      dtype, param_dtype: compute and parameter dtypes.

    Call: ``net.apply(variables, x, t, cond=None)``, ``x (B, H, W, C)``, ``t`` of shape ``(B,)``
    or ``()``; returns an array of ``x``'s shape and dtype.
    """

    channels: int = 32
    channel_mults: tuple = (1, 2)
    num_res_blocks: int = 1
    attention_levels: tuple = (1,)
    num_heads: int = 4
    groups: int = 8
    image_size: int | tuple | None = None
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

    # -- validation ------------------------------------------------------------------------
    def _check_fields(self):
        check_cond_fields("UNet", self.time_embedding, self.num_classes, self.cond_dim)
        check_dtype("dtype", self.dtype)
        check_dtype("param_dtype", self.param_dtype, allow_none=False)
        for name in ("channels", "num_res_blocks", "num_heads", "groups"):
            if not _is_pos_int(getattr(self, name)):
                fail(name, getattr(self, name), "a positive integer")
        if self.embed_dim is not None and (not _is_pos_int(self.embed_dim) or self.embed_dim % 2):
            fail("embed_dim", self.embed_dim, "None or a positive even integer")
        mults = tuple(self.channel_mults)
        if not mults or not all(_is_pos_int(m) for m in mults):
            fail("channel_mults", self.channel_mults, "a non-empty tuple of positive integers")
        levels = tuple(self.attention_levels)
        if not all(
            isinstance(a, int | np.integer) and not isinstance(a, bool) and 0 <= a < len(mults)
            for a in levels
        ):
            fail(
                "attention_levels",
                self.attention_levels,
                f"level indices in [0, {len(mults) - 1}] (one per channel_mults entry)",
            )
        for m in mults:
            width = self.channels * m
            if width % self.groups:
                fail(
                    "groups",
                    self.groups,
                    f"a divisor of every level's width channels*mult = {width} "
                    f"(channels={self.channels}, channel_mults={mults})",
                )
        for w in {self.channels * mults[a] for a in levels} | {self.channels * mults[-1]}:
            if w % self.num_heads:
                fail(
                    "num_heads",
                    self.num_heads,
                    f"a divisor of the width {w} of every attention level (and the middle)",
                )
        if self.image_size is not None:
            size = self._image_hw()
            if size is None:
                fail("image_size", self.image_size, "None, a positive int or a pair (H, W)")
            f = 2 ** (len(mults) - 1)
            if size[0] % f or size[1] % f:
                fail(
                    "image_size",
                    self.image_size,
                    f"sides divisible by 2**(len(channel_mults)-1) = {f}",
                )

    def _image_hw(self):
        s = self.image_size
        if _is_pos_int(s):
            return (int(s), int(s))
        if isinstance(s, tuple | list) and len(s) == 2 and all(_is_pos_int(v) for v in s):
            return (int(s[0]), int(s[1]))
        return None

    def _check_x(self, x):
        if x.ndim != 4:
            fail("x", f"shape {tuple(x.shape)}", "images of shape (B, H, W, C) (NHWC, rank 4)")
        f = 2 ** (len(self.channel_mults) - 1)
        h, w = x.shape[1], x.shape[2]
        if self.image_size is not None and (h, w) != self._image_hw():
            hh, ww = self._image_hw()
            fail(
                "x",
                f"shape {tuple(x.shape)}",
                f"wrong image size: this UNet has image_size=({hh}, {ww}), so x must be "
                f"(B, {hh}, {ww}, C)",
            )
        if h % f or w % f:
            fail(
                "x",
                f"shape {tuple(x.shape)}",
                f"H and W divisible by 2**(len(channel_mults)-1) = {f} "
                f"(channel_mults={tuple(self.channel_mults)}), e.g. {f * max(1, h // f)}",
            )

    # -- layers ----------------------------------------------------------------------------
    def _conv(self, cdt, feats, name, kernel=3, stride=1, init=None):
        kw = {} if init is None else {"kernel_init": init}
        return nn.Conv(
            feats,
            (kernel, kernel),
            strides=(stride, stride),
            padding="SAME",
            dtype=cdt,
            param_dtype=self.param_dtype,
            name=name,
            **kw,
        )

    def _gn(self, cdt, h, name):
        return norm_f32(
            h, "group", dtype=cdt, param_dtype=self.param_dtype, groups=self.groups, name=name
        )

    def _res_block(self, cdt, h, e, out_ch, name):
        r = self._conv(cdt, out_ch, f"{name}_conv1")(nn.silu(self._gn(cdt, h, f"{name}_norm1")))
        r = (
            r
            + nn.Dense(out_ch, dtype=cdt, param_dtype=self.param_dtype, name=f"{name}_emb")(
                nn.silu(e)
            )[:, None, None, :]
        )
        r = self._conv(cdt, out_ch, f"{name}_conv2", init=_zeros)(
            nn.silu(self._gn(cdt, r, f"{name}_norm2"))
        )
        if h.shape[-1] != out_ch:
            h = self._conv(cdt, out_ch, f"{name}_skip", kernel=1)(h)
        return h + r

    def _attn(self, cdt, h, name):
        b, hh, ww, c = h.shape
        y = self._gn(cdt, h, f"{name}_norm").reshape(b, hh * ww, c)
        y = self_attention(
            y, self.num_heads, dtype=cdt, param_dtype=self.param_dtype, name=name, out_init=_zeros
        )
        return h + y.reshape(b, hh, ww, c)

    @nn.compact
    def __call__(self, x, t, cond=None):
        self._check_fields()
        x = as_float_array(x)
        self._check_x(x)
        batch = x.shape[0]
        cdt = self.dtype if self.dtype is not None else x.dtype
        t = jnp.broadcast_to(jnp.asarray(t, jnp.promote_types(x.dtype, jnp.float32)), (batch,))
        ch = self.channels
        mults = tuple(self.channel_mults)
        attn = set(int(a) for a in self.attention_levels)
        emb_dim = 4 * ch

        c = cond_embedding(
            cond,
            batch,
            emb_dim,
            num_classes=self.num_classes,
            cond_dim=self.cond_dim,
            owner="UNet",
            dtype=cdt,
            param_dtype=self.param_dtype,
        )  # validates cond first
        feats = time_features(
            t,
            self.time_embedding,
            self.embed_dim or ch,
            fourier_scale=self.fourier_scale,
            time_scale=self.time_scale,
        )
        e = nn.Dense(emb_dim, dtype=cdt, param_dtype=self.param_dtype, name="time_in")(feats)
        if c is not None:
            e = e + c
        e = nn.Dense(emb_dim, dtype=cdt, param_dtype=self.param_dtype, name="time_out")(nn.silu(e))

        h = self._conv(cdt, ch, "conv_in")(x.astype(cdt))
        skips = [h]
        for lvl, m in enumerate(mults):
            for i in range(self.num_res_blocks):
                h = self._res_block(cdt, h, e, ch * m, f"down{lvl}_res{i}")
                if lvl in attn:
                    h = self._attn(cdt, h, f"down{lvl}_attn{i}")
                skips.append(h)
            if lvl < len(mults) - 1:
                h = self._conv(cdt, h.shape[-1], f"down{lvl}_downsample", stride=2)(h)
                skips.append(h)

        h = self._res_block(cdt, h, e, ch * mults[-1], "mid_res0")
        h = self._attn(cdt, h, "mid_attn")
        h = self._res_block(cdt, h, e, ch * mults[-1], "mid_res1")

        for lvl in reversed(range(len(mults))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = self._res_block(cdt, h, e, ch * mults[lvl], f"up{lvl}_res{i}")
                if lvl in attn:
                    h = self._attn(cdt, h, f"up{lvl}_attn{i}")
            if lvl > 0:
                b, hh, ww, cc = h.shape
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = self._conv(cdt, cc, f"up{lvl}_upsample")(h)

        h = nn.silu(self._gn(cdt, h, "norm_out"))
        out = self._conv(cdt, x.shape[-1], "conv_out", init=_zeros)(h)
        return out.astype(x.dtype)
