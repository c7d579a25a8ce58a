"""x0-clipping and dynamic thresholding as a Denoiser -> Denoiser transform.

Because it wraps the model, it works with every sampler: the wrapped model predicts the processed
``x0_hat`` (parametrization ``"x0"``) and samplers recover ``eps_hat = (x - alpha x0_hat)/sigma``
from it (diffusers' ``use_clipped_model_output``).

* clipping: ``x0_hat <- clip(x0_hat, -c, c)`` (DDPM's ``clip_sample``);
* dynamic thresholding (Saharia et al., Imagen, arXiv 2205.11487): per example,
  ``s = max(quantile(|x0_hat|, ratio), 1)`` clipped to ``max_value``, then
  ``x0_hat <- clip(x0_hat, -s, s) / s`` (defaults ``ratio = 0.995``, ``max_value = 1``; not for
  latent-space models).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxdiff._checks import fail, is_concrete
from jaxdiff.denoiser import Denoiser
from jaxdiff.schedules import Schedule

__all__ = ["ThresholdedDenoiser", "threshold_x0", "dynamic_threshold"]


def dynamic_threshold(x0, ratio=0.995, max_value=1.0):
    """Imagen's dynamic thresholding of ``x0`` of shape ``(batch, *event)``, per example."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.quantile(flat, ratio, axis=1)
    s = jnp.clip(s, 1.0, max_value)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


def _unused_apply(params, x, t, cond):  # pragma: no cover - __call__ is overridden
    raise NotImplementedError


class ThresholdedDenoiser(Denoiser):
    """A model whose ``x0`` prediction is clipped and/or dynamically thresholded.

    Fields: the wrapped ``model`` and ``schedule`` (pytrees), ``clip`` (None or a bound, a leaf),
    ``ratio`` and ``max_value`` of dynamic thresholding (``ratio=None`` turns it off).
    """

    model: Any = None
    schedule: Any = None
    clip: Any = None
    ratio: Any = None
    max_value: Any = 1.0

    def __call__(self, params, x, t, cond=None):
        x0, _ = self.model.x0_eps(params, x, t, cond, self.schedule)
        if self.clip is not None:
            x0 = jnp.clip(x0, -self.clip, self.clip)
        if self.ratio is not None:
            x0 = dynamic_threshold(x0, self.ratio, self.max_value)
        return x0


def threshold_x0(
    model: Denoiser, schedule: Schedule, *, clip=None, ratio=None, max_value=1.0
) -> ThresholdedDenoiser:
    """Wrap ``model`` so its ``x0`` prediction is clipped to ``[-clip, clip]`` and/or
    dynamically thresholded at quantile ``ratio`` (e.g. 0.995) with bound ``max_value``."""
    if clip is None and ratio is None:
        fail("clip", clip, "a positive bound, or ratio= for dynamic thresholding")
    if clip is not None and is_concrete(clip) and not float(clip) > 0:
        fail("clip", clip, "a positive bound")
    if ratio is not None and is_concrete(ratio) and not 0.0 < float(ratio) <= 1.0:
        fail("ratio", ratio, "a quantile in (0, 1]")
    return ThresholdedDenoiser(
        apply=_unused_apply,
        parametrization="x0",
        event_shape=model.event_shape,
        model=model,
        schedule=schedule,
        clip=clip,
        ratio=ratio,
        max_value=max_value,
    )
