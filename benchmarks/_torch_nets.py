"""PyTorch twins of jaxdiff's networks and of its eps-prediction DSM train step (bench extra).

An independent PyTorch implementation of :class:`jaxdiff.models.MLPScoreNet` and
:class:`jaxdiff.unet.UNet`, built from the Flax module's fields, with loaders that copy a
jaxdiff parameter tree into it (Flax ``Dense`` kernels are ``(in, out)``, torch ``Linear``
weights ``(out, in)``; Flax ``Conv`` kernels are ``(kh, kw, in, out)`` in NHWC, torch ``Conv2d``
weights ``(out, in, kh, kw)`` in NCHW). ``tests/test_torch_parity_nets.py`` checks that the
twins' forward passes and DSM losses agree with jaxdiff's to float32 accuracy, which is what makes
the speed ratio of ``benchmarks/training.py`` a like-for-like comparison.

Only what the benchmark needs: unconditional or class-conditional networks, float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TorchMLPScoreNet",
    "load_mlp_params",
    "vp_linear_alpha_sigma",
    "TorchUNet",
    "load_unet_params",
    "TorchDSMTrainer",
    "count_params",
]


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def count_params(module: nn.Module) -> int:
    """Number of trainable scalars of a torch module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


def _copy_dense(lin: nn.Linear, p) -> None:
    """Flax ``Dense`` ``{"kernel": (in, out), "bias": (out,)}`` into a torch ``Linear``."""
    with torch.no_grad():
        lin.weight.copy_(_t(p["kernel"]).T)
        lin.bias.copy_(_t(p["bias"]))


def _copy_norm(norm: nn.Module, p) -> None:
    """Flax ``LayerNorm`` / ``GroupNorm`` ``{"scale", "bias"}`` into the torch norm."""
    with torch.no_grad():
        norm.weight.copy_(_t(p["scale"]))
        norm.bias.copy_(_t(p["bias"]))


def _copy_conv(conv: nn.Conv2d, p) -> None:
    """Flax ``Conv`` ``{"kernel": (kh, kw, in, out), "bias": (out,)}`` into a torch ``Conv2d``."""
    with torch.no_grad():
        conv.weight.copy_(_t(p["kernel"]).permute(3, 2, 0, 1))
        conv.bias.copy_(_t(p["bias"]))


def _act(name) -> callable:
    fn = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}.get(name)
    if fn is None:
        raise ValueError(f"activation {name!r} has no torch twin here")
    return fn


def fourier_features(t: torch.Tensor, dim: int, scale: float, seed: int = 0) -> torch.Tensor:
    """``[sin(2 pi t B), cos(2 pi t B)]`` with the same frozen ``B`` as
    :func:`jaxdiff.models.fourier_embedding` (``numpy.random.default_rng(seed)``)."""
    b = np.random.default_rng(seed).standard_normal(dim // 2) * scale
    arg = 2.0 * math.pi * t[:, None] * torch.as_tensor(b, dtype=t.dtype)
    return torch.cat([torch.sin(arg), torch.cos(arg)], -1)


def sinusoidal_features(
    t: torch.Tensor, dim: int, scale: float, max_period: float = 10000.0
) -> torch.Tensor:
    """Transformer-style embedding of ``scale * t``, as :func:`jaxdiff.models.sinusoidal_embedding`."""
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half) / half)
    arg = (scale * t)[:, None] * torch.as_tensor(freqs, dtype=t.dtype)
    return torch.cat([torch.sin(arg), torch.cos(arg)], -1)


def _time_features(t, kind: str, dim: int, fourier_scale: float, time_scale: float):
    if kind == "fourier":
        return fourier_features(t, dim, fourier_scale)
    if kind == "sinusoidal":
        return sinusoidal_features(t, dim, time_scale)
    raise ValueError(f"time_embedding {kind!r} has no torch twin here")


def _activation_name(fn) -> str:
    return getattr(fn, "__name__", str(fn))


# ------------------------------------------------------------------------------------------
# MLP
# ------------------------------------------------------------------------------------------
class TorchMLPScoreNet(nn.Module):
    """The architecture of :class:`jaxdiff.models.MLPScoreNet`, in PyTorch.

    ``e = Linear(time_features(t)) [+ Embed(label)]; e = Linear(act(e)); z = Linear(flatten(x));
    z = z + Linear(act(LayerNorm(z) + e))`` (``depth`` times); ``out = Linear(act(LayerNorm(z)))``.
    LayerNorm epsilon 1e-6 (Flax's default). Build it with :meth:`from_flax`.

    Call: ``net(x, t, cond=None)``, ``x`` of shape ``(batch, *event)``, ``t`` of shape
    ``(batch,)``; returns the shape of ``x``.
    """

    def __init__(
        self,
        event_size: int,
        hidden: int = 128,
        depth: int = 3,
        time_embedding: str = "fourier",
        embed_dim: int = 64,
        time_scale: float = 1000.0,
        fourier_scale: float = 16.0,
        num_classes: int | None = None,
        activation: str = "silu",
    ):
        super().__init__()
        self.time_embedding, self.embed_dim = time_embedding, embed_dim
        self.time_scale, self.fourier_scale = time_scale, fourier_scale
        self.num_classes = num_classes
        self.act = _act(activation)
        self.time_in = nn.Linear(embed_dim, hidden)
        self.time_out = nn.Linear(hidden, hidden)
        self.label_embed = None if num_classes is None else nn.Embedding(num_classes + 1, hidden)
        self.x_in = nn.Linear(event_size, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-6) for _ in range(depth))
        self.denses = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden, eps=1e-6)
        self.out = nn.Linear(hidden, event_size)

    @classmethod
    def from_flax(cls, net, event_shape) -> TorchMLPScoreNet:
        """A twin of the Flax ``MLPScoreNet`` ``net`` for events of shape ``event_shape``."""
        if net.cond_dim is not None:
            raise ValueError("real-vector conditioning has no torch twin here")
        return cls(
            event_size=int(np.prod(event_shape)),
            hidden=net.hidden,
            depth=net.depth,
            time_embedding=net.time_embedding,
            embed_dim=net.embed_dim,
            time_scale=net.time_scale,
            fourier_scale=net.fourier_scale,
            num_classes=net.num_classes,
            activation=_activation_name(net.activation),
        )

    def forward(self, x, t, cond=None):
        batch = x.shape[0]
        e = self.time_in(
            _time_features(
                t, self.time_embedding, self.embed_dim, self.fourier_scale, self.time_scale
            )
        )
        if self.label_embed is not None:
            labels = (
                torch.full((batch,), self.num_classes, dtype=torch.long)
                if cond is None
                else cond.long()
            )
            e = e + self.label_embed(labels)
        e = self.time_out(self.act(e))
        z = self.x_in(x.reshape(batch, -1))
        for norm, dense in zip(self.norms, self.denses, strict=True):
            z = z + dense(self.act(norm(z) + e))
        return self.out(self.act(self.norm_out(z))).reshape(x.shape)


def load_mlp_params(tnet: TorchMLPScoreNet, variables) -> TorchMLPScoreNet:
    """Copy a jaxdiff ``MLPScoreNet`` parameter tree (``{"params": ...}`` or the inner dict) into
    ``tnet``; returns ``tnet``."""
    p = variables.get("params", variables)
    _copy_dense(tnet.time_in, p["time_in"])
    _copy_dense(tnet.time_out, p["time_out"])
    _copy_dense(tnet.x_in, p["x_in"])
    for i, (norm, dense) in enumerate(zip(tnet.norms, tnet.denses, strict=True)):
        _copy_norm(norm, p[f"norm_{i}"])
        _copy_dense(dense, p[f"dense_{i}"])
    _copy_norm(tnet.norm_out, p["norm_out"])
    _copy_dense(tnet.out, p["out"])
    if tnet.label_embed is not None:
        with torch.no_grad():
            tnet.label_embed.weight.copy_(_t(p["label_embed"]["embedding"]))
    return tnet


# ------------------------------------------------------------------------------------------
# U-Net
# ------------------------------------------------------------------------------------------
class _SameConv(nn.Module):
    """3x3 (or 1x1) convolution with Flax/XLA ``padding="SAME"``: for stride 2 on an even size
    the padding is ``(0, 1)`` per spatial axis (torch's symmetric ``padding=1`` would shift the
    sampling grid by one pixel)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=0)
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        k, s = self.kernel, self.stride
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last axis first
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return self.conv(x)


class TorchUNet(nn.Module):
    """The architecture of :class:`jaxdiff.unet.UNet` (DDPM/ADM-style, Ho et al. arXiv
    2006.11239, Dhariwal & Nichol arXiv 2105.05233), in PyTorch, on **NCHW** images.

    Same layers, in the same order, under the Flax module's layer names (``self.layers``, a
    ``ModuleDict``: ``"down0_res0_conv1"``, ``"mid_attn_qkv"``, ...); GroupNorm epsilon 1e-6
    (Flax's default); attention via ``F.scaled_dot_product_attention`` (``softmax(q k^T /
    sqrt(d_head)) v``, Vaswani et al. arXiv 1706.03762). Build it with :meth:`from_flax`.

    Call: ``net(x, t, cond=None)``, ``x`` of shape ``(B, C, H, W)``, ``t`` of shape ``(B,)``;
    returns the shape of ``x``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 32,
        channel_mults=(1, 2),
        num_res_blocks: int = 1,
        attention_levels=(1,),
        num_heads: int = 4,
        groups: int = 8,
        num_classes: int | None = None,
        time_embedding: str = "sinusoidal",
        embed_dim: int | None = None,
        time_scale: float = 1000.0,
        fourier_scale: float = 16.0,
    ):
        super().__init__()
        self.channels, self.mults = channels, tuple(channel_mults)
        self.num_res_blocks, self.attn = num_res_blocks, {int(a) for a in attention_levels}
        self.num_heads, self.groups, self.num_classes = num_heads, groups, num_classes
        self.time_embedding, self.embed_dim = time_embedding, embed_dim or channels
        self.time_scale, self.fourier_scale = time_scale, fourier_scale
        emb = 4 * channels
        L = nn.ModuleDict()
        L["time_in"] = nn.Linear(self.embed_dim, emb)
        L["time_out"] = nn.Linear(emb, emb)
        if num_classes is not None:
            L["label_embed"] = nn.Embedding(num_classes + 1, emb)
        L["conv_in"] = _SameConv(in_channels, channels)
        skips, c = [channels], channels

        def res(name, cin, cout):
            L[f"{name}_norm1"] = nn.GroupNorm(groups, cin, eps=1e-6)
            L[f"{name}_conv1"] = _SameConv(cin, cout)
            L[f"{name}_emb"] = nn.Linear(emb, cout)
            L[f"{name}_norm2"] = nn.GroupNorm(groups, cout, eps=1e-6)
            L[f"{name}_conv2"] = _SameConv(cout, cout)
            if cin != cout:
                L[f"{name}_skip"] = _SameConv(cin, cout, kernel=1)
            return cout

        def attn(name, c):
            L[f"{name}_norm"] = nn.GroupNorm(groups, c, eps=1e-6)
            L[f"{name}_qkv"] = nn.Linear(c, 3 * c)
            L[f"{name}_out"] = nn.Linear(c, c)

        for lvl, m in enumerate(self.mults):
            for i in range(num_res_blocks):
                c = res(f"down{lvl}_res{i}", c, channels * m)
                if lvl in self.attn:
                    attn(f"down{lvl}_attn{i}", c)
                skips.append(c)
            if lvl < len(self.mults) - 1:
                L[f"down{lvl}_downsample"] = _SameConv(c, c, stride=2)
                skips.append(c)
        c = res("mid_res0", c, channels * self.mults[-1])
        attn("mid_attn", c)
        c = res("mid_res1", c, c)
        for lvl in reversed(range(len(self.mults))):
            for i in range(num_res_blocks + 1):
                c = res(f"up{lvl}_res{i}", c + skips.pop(), channels * self.mults[lvl])
                if lvl in self.attn:
                    attn(f"up{lvl}_attn{i}", c)
            if lvl > 0:
                L[f"up{lvl}_upsample"] = _SameConv(c, c)
        L["norm_out"] = nn.GroupNorm(groups, c, eps=1e-6)
        L["conv_out"] = _SameConv(c, in_channels)
        self.layers = L

    @classmethod
    def from_flax(cls, net, event_shape) -> TorchUNet:
        """A twin of the Flax ``UNet`` ``net`` for NHWC events ``(H, W, C)`` (float32 only)."""
        if net.cond_dim is not None:
            raise ValueError("real-vector conditioning has no torch twin here")
        if net.dtype not in (None, np.float32) or net.param_dtype != np.float32:
            raise ValueError("only float32 UNets have a torch twin here")
        return cls(
            in_channels=int(event_shape[-1]),
            channels=net.channels,
            channel_mults=net.channel_mults,
            num_res_blocks=net.num_res_blocks,
            attention_levels=net.attention_levels,
            num_heads=net.num_heads,
            groups=net.groups,
            num_classes=net.num_classes,
            time_embedding=net.time_embedding,
            embed_dim=net.embed_dim,
            time_scale=net.time_scale,
            fourier_scale=net.fourier_scale,
        )

    def _res(self, name, h, e):
        L = self.layers
        r = L[f"{name}_conv1"](F.silu(L[f"{name}_norm1"](h)))
        r = r + L[f"{name}_emb"](F.silu(e))[:, :, None, None]
        r = L[f"{name}_conv2"](F.silu(L[f"{name}_norm2"](r)))
        if f"{name}_skip" in L:
            h = L[f"{name}_skip"](h)
        return h + r

    def _attn(self, name, h):
        L = self.layers
        b, c, hh, ww = h.shape
        nh = self.num_heads
        y = L[f"{name}_norm"](h).reshape(b, c, hh * ww).transpose(1, 2)  # (b, n, c)
        qkv = L[f"{name}_qkv"](y).reshape(b, hh * ww, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (b, heads, n, dh)
        o = L[f"{name}_out"](o.transpose(1, 2).reshape(b, hh * ww, c))
        return h + o.transpose(1, 2).reshape(b, c, hh, ww)

    def forward(self, x, t, cond=None):
        L = self.layers
        batch = x.shape[0]
        feats = _time_features(
            t, self.time_embedding, self.embed_dim, self.fourier_scale, self.time_scale
        )
        e = L["time_in"](feats)
        if self.num_classes is not None:
            labels = (
                torch.full((batch,), self.num_classes, dtype=torch.long)
                if cond is None
                else cond.long()
            )
            e = e + L["label_embed"](labels)
        e = L["time_out"](F.silu(e))
        h = L["conv_in"](x)
        skips = [h]
        for lvl, _ in enumerate(self.mults):
            for i in range(self.num_res_blocks):
                h = self._res(f"down{lvl}_res{i}", h, e)
                if lvl in self.attn:
                    h = self._attn(f"down{lvl}_attn{i}", h)
                skips.append(h)
            if lvl < len(self.mults) - 1:
                h = L[f"down{lvl}_downsample"](h)
                skips.append(h)
        h = self._res("mid_res0", h, e)
        h = self._attn("mid_attn", h)
        h = self._res("mid_res1", h, e)
        for lvl in reversed(range(len(self.mults))):
            for i in range(self.num_res_blocks + 1):
                h = self._res(f"up{lvl}_res{i}", torch.cat([h, skips.pop()], 1), e)
                if lvl in self.attn:
                    h = self._attn(f"up{lvl}_attn{i}", h)
            if lvl > 0:
                h = L[f"up{lvl}_upsample"](F.interpolate(h, scale_factor=2, mode="nearest"))
        return L["conv_out"](F.silu(L["norm_out"](h)))


def load_unet_params(tnet: TorchUNet, variables) -> TorchUNet:
    """Copy a jaxdiff ``UNet`` parameter tree into ``tnet`` layer by layer (same names); raises
    if a layer is missing on either side. Returns ``tnet``."""
    p = dict(variables.get("params", variables))
    L = tnet.layers
    if set(p) != set(L.keys()):
        raise ValueError(
            f"layer names differ: only in jaxdiff {sorted(set(p) - set(L.keys()))}, "
            f"only in torch {sorted(set(L.keys()) - set(p))}"
        )
    for name, layer in L.items():
        if isinstance(layer, _SameConv):
            _copy_conv(layer.conv, p[name])
        elif isinstance(layer, nn.Linear):
            _copy_dense(layer, p[name])
        elif isinstance(layer, nn.GroupNorm):
            _copy_norm(layer, p[name])
        else:  # nn.Embedding
            with torch.no_grad():
                layer.weight.copy_(_t(p[name]["embedding"]))
    return tnet


# ------------------------------------------------------------------------------------------
# DSM train step
# ------------------------------------------------------------------------------------------
def vp_linear_alpha_sigma(t: torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0):
    """``(alpha(t), sigma(t))`` of the continuous VP-linear schedule (Song et al. arXiv
    2011.13456): ``log alpha = -t^2 (beta_max - beta_min)/4 - t beta_min/2``,
    ``sigma = sqrt(1 - alpha^2)`` (computed as ``exp(log(-expm1(2 log alpha))/2)``, as
    :class:`jaxdiff.schedules.VPLinear` does)."""
    log_a = -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min
    log_s = 0.5 * torch.log(-torch.expm1(2.0 * log_a))
    return torch.exp(log_a), torch.exp(log_s)


def dsm_eps_loss(net, x0, t, eps, cond=None, beta_min=0.1, beta_max=20.0):
    """``mean_b ||net(alpha x0 + sigma eps, t) - eps||^2`` (sum over the event dims): jaxdiff's
    :func:`~jaxdiff.losses.dsm_loss` with an eps network, ``weighting="none"``, ``reduce="sum"``
    (Ho et al. arXiv 2006.11239, eq. 14)."""
    a, s = vp_linear_alpha_sigma(t, beta_min, beta_max)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    x_t = a.reshape(shape) * x0 + s.reshape(shape) * eps
    err = (net(x_t, t, cond) - eps).square().reshape(x0.shape[0], -1).sum(-1)
    return err.mean()


class TorchDSMTrainer:
    """The PyTorch train step matching :func:`jaxdiff.train.make_step` with ``dsm_loss``:
    a batch drawn uniformly with replacement from ``data``, ``t ~ U[t_min, t_max]``,
    ``eps ~ N(0, I)``, the eps-DSM loss, ``torch.optim.Adam`` (optax.adam's defaults) and the EMA
    ``ema <- d ema + (1 - d) params`` (skipped when ``ema_decay == 0``).

    Args:
      net: a torch module ``net(x, t, cond)``.
      data: float32 tensor ``(N, *event)``.
      batch_size, lr, ema_decay: as in jaxdiff.
      t_min, t_max: the training time range (jaxdiff's default is
        ``[schedule.t_end, schedule.t_start]``).
      adam_impl: ``"foreach"`` (multi-tensor), ``"fused"`` or ``"for-loop"``.
    """

    def __init__(
        self,
        net: nn.Module,
        data: torch.Tensor,
        batch_size: int,
        lr: float = 1e-3,
        ema_decay: float = 0.999,
        t_min: float = 1e-3,
        t_max: float = 1.0,
        adam_impl: str = "foreach",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
    ):
        self.net, self.data, self.batch_size = net, data, batch_size
        self.t_min, self.t_max = t_min, t_max
        self.beta_min, self.beta_max = beta_min, beta_max
        self.params = [p for p in net.parameters() if p.requires_grad]
        kw = {
            "foreach": dict(foreach=True),
            "fused": dict(fused=True),
            "for-loop": dict(foreach=False),
        }[adam_impl]
        self.opt = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8, **kw)
        self.ema_decay = ema_decay
        self.ema = [p.detach().clone() for p in self.params] if ema_decay > 0 else None

    def step(self) -> torch.Tensor:
        """One optimizer step; returns the loss (before the update) as a 0-d tensor."""
        n, b = self.data.shape[0], self.batch_size
        x0 = self.data[torch.randint(0, n, (b,))]
        t = torch.rand(b) * (self.t_max - self.t_min) + self.t_min
        eps = torch.randn_like(x0)
        loss = dsm_eps_loss(self.net, x0, t, eps, None, self.beta_min, self.beta_max)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)
        return loss.detach()
