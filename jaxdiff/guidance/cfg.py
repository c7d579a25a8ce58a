"""Classifier-free guidance (CFG) as a model transform.

Ho & Salimans (arXiv 2207.12598) train one network on conditional and unconditional data (label
dropout, :func:`jaxdiff.losses.drop_cond`) and sample with the extrapolation

    out(x, t, c) = u + w(t) (c_pred - u) = c_pred + (w(t) - 1) (c_pred - u),

where ``c_pred = model(x, t, cond)`` and ``u = model(x, t, null)`` (diffusers convention: ``w = 1``
is the plain conditional model, ``w = 0`` the unconditional one; Ho & Salimans' ``1 + w``). In
score space this is ``s_u + w (s_c - s_u) = s_c + (w - 1) grad log p_t(y | x)``, i.e. classifier
guidance with the implicit classifier ``p_t(y | x) = p_t(x | y) p(y) / p_t(x)`` at scale
``eta = w - 1`` (Dhariwal & Nichol arXiv 2105.05233; ../shared/reference/guidance.md section
6.1).

**Any parametrization.** At a fixed ``(x, t)`` every parametrization jaxdiff knows (eps, x0, v,
score, velocity) is an affine function ``a(t) * pred + b(t) * x`` of any other
(:mod:`jaxdiff.parametrize`), and an affine map with the *same* ``x`` commutes with the affine
combination ``u + w (c - u)`` (the ``b x`` terms cancel in ``c - u``). So CFG computed in the base
model's own parametrization equals CFG computed in eps space, in score space or in x0 space:
:class:`CFG` combines the base model's raw predictions and keeps its parametrization.

**Guidance interval** (Kynkäänniemi et al., arXiv 2404.07724): guidance is applied only for
``t in [t_lo, t_hi]``; outside it ``w = 1`` (the plain conditional prediction). The paper states
the interval in noise levels ``sigma``; here it is in the schedule's time ``t`` (monotone in
``sigma`` for every jaxdiff schedule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff._checks import as_float_array, fail, is_concrete
from jaxdiff.denoiser import Denoiser
from jaxdiff.guidance.base import check_scale, scale_at

__all__ = ["CFG", "cfg"]


def _bcast(v, x):
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - 1))


def _check_cond(cond, batch: int):
    """``cond`` as an array with leading axis ``batch`` (CFG needs one per example)."""
    if cond is None:
        fail(
            "cond",
            None,
            "a condition with a leading batch axis (classifier-free guidance extrapolates from "
            "the unconditional towards the conditional prediction, so it needs a condition)",
        )
    if not hasattr(cond, "shape") and not isinstance(cond, int | float | np.number | list | tuple):
        fail("cond", cond, f"an array of conditions with leading axis {batch}")
    c = jnp.asarray(cond)
    if c.ndim == 0 or c.shape[0] != batch:
        fail("cond", f"shape {tuple(c.shape)}", f"a leading batch axis of size {batch} (that of x)")
    return c


def _null_like(null_cond, cond):
    """``null_cond`` (one condition) broadcast to the shape of ``cond`` (checked)."""
    null = jnp.asarray(null_cond)
    per_example = tuple(cond.shape[1:])
    if tuple(null.shape) != per_example:
        fail(
            "null_cond",
            f"shape {tuple(null.shape)}",
            f"one condition of the per-example shape of cond, {per_example}",
        )
    if jnp.issubdtype(cond.dtype, jnp.integer) and not jnp.issubdtype(null.dtype, jnp.integer):
        fail("null_cond", null_cond, f"an integer null label (cond has dtype {cond.dtype})")
    return jnp.broadcast_to(null.astype(cond.dtype), cond.shape)


class CFG(Denoiser):
    """A classifier-free-guided model: predicts ``c + (w(t) - 1) (c - u)`` in the base model's
    parametrization (build it with :func:`cfg`).

    Pytree fields: ``base`` (the model, a child), ``scale`` (leaf: scalar or ``(B,)``),
    ``null_cond`` (leaf: one null condition, or None to call the base model with ``cond=None``),
    ``interval`` (leaves ``(t_lo, t_hi)`` or None); ``scale_fn`` is static.
    """

    base: Denoiser = None
    scale: Any = 1.0
    null_cond: Any = None
    interval: Any = None
    scale_fn: Callable | None = struct.field(pytree_node=False, default=None)

    def guidance_scale(self, t, batch: int):
        """The effective ``w(t)``, shape ``(batch,)``: ``scale * scale_fn(t)`` inside the interval,
        ``1`` outside it."""
        t = jnp.broadcast_to(as_float_array(t), (batch,))
        w = scale_at(self.scale, self.scale_fn, t, batch)
        if self.interval is not None:
            lo, hi = self.interval
            inside = (t >= lo) & (t <= hi)
            w = jnp.where(inside, w, jnp.ones_like(w))
        return w

    def branches(self, params, x, t, cond):
        """``(c, u)``: the base model's conditional and unconditional predictions, each shaped
        like ``x``. With ``null_cond`` one batched call on ``concat([x, x])`` with conditions
        ``concat([cond, null])``; without it two calls (``cond`` and ``None``)."""
        x = jnp.asarray(x)
        if x.ndim < 1:
            fail("x", f"shape {tuple(x.shape)}", "shape (batch, *event_shape)")
        b = x.shape[0]
        cond = _check_cond(cond, b)
        t = jnp.broadcast_to(as_float_array(t), (b,))
        if self.null_cond is None:
            return self.base(params, x, t, cond), self.base(params, x, t, None)
        null = _null_like(self.null_cond, cond)
        both = self.base(
            params,
            jnp.concatenate([x, x], axis=0),
            jnp.concatenate([t, t], axis=0),
            jnp.concatenate([cond, null], axis=0),
        )
        return both[:b], both[b:]

    def __call__(self, params, x, t, cond=None):
        """Guided prediction ``c + (w(t) - 1)(c - u)`` (= ``u + w (c - u)``), shape of ``x``;
        ``t`` of shape ``()`` or ``(batch,)``; ``cond`` with leading axis ``batch``."""
        x = jnp.asarray(x)
        c, u = self.branches(params, x, t, cond)
        w = self.guidance_scale(t, x.shape[0])
        return c + _bcast(w - 1.0, c).astype(c.dtype) * (c - u)


def _cfg_apply(params, x, t, cond):  # pragma: no cover - CFG overrides __call__
    raise RuntimeError("CFG.__call__ is the entry point")


def _check_interval(interval):
    if interval is None:
        return None
    if not isinstance(interval, tuple | list) or len(interval) != 2:
        fail("interval", interval, "None or a pair (t_lo, t_hi)")
    lo, hi = (as_float_array(v) for v in interval)
    if lo.ndim or hi.ndim:
        fail("interval", interval, "a pair of scalar times (t_lo, t_hi)")
    if is_concrete(lo, hi) and not float(lo) <= float(hi):
        fail("interval", interval, "t_lo <= t_hi")
    return (lo, hi)


def cfg(
    model: Denoiser,
    scale=1.0,
    *,
    null_cond=None,
    scale_fn: Callable | None = None,
    interval=None,
) -> CFG:
    """Classifier-free guidance of ``model`` (Ho & Salimans, arXiv 2207.12598).

    The guided prediction at ``(x, t, cond)`` is

        ``out = u + w(t) (c - u)``,   ``c = model(x, t, cond)``,  ``u = model(x, t, null)``,

    in ``model``'s own parametrization (equal to CFG in eps or score space, see the module
    docstring). ``w = 1`` gives the conditional model, ``w = 0`` the unconditional one, ``w > 1``
    extrapolates (score ``s_c + (w - 1) grad log p_t(y | x)``: classifier guidance at scale
    ``w - 1``, guidance.md 6.1).

    Args:
      model: a conditional :class:`~jaxdiff.denoiser.Denoiser` (e.g. an ``MLPScoreNet`` trained
        with label dropout, or the exact ``analytic.as_denoiser`` of a Gaussian mixture).
      scale: ``w``, a number or an array of shape ``()`` or ``(B,)`` (one per example); a pytree
        leaf, so sweeping it under ``jit`` never recompiles and ``grad`` w.r.t. it works.
      null_cond: the value of ONE condition meaning "unconditional", of the per-example shape of
        ``cond`` (``MLPScoreNet(num_classes=K)``: ``K``; its real-vector form: the NaN vector
        ``net.null_cond``; an analytic mixture: ``jaxdiff.analytic.NULL_CLASS = -1``). Both
        branches then run in one model call on a batch of ``2B``. ``None``: the unconditional
        branch calls ``model`` with ``cond=None`` (two calls).
      scale_fn: optional static ``t (B,) -> (B,)`` multiplier: ``w(t) = scale * scale_fn(t)``.
      interval: optional ``(t_lo, t_hi)`` (leaves): guidance only for ``t_lo <= t <= t_hi``,
        ``w = 1`` outside (Kynkäänniemi et al., arXiv 2404.07724).

    Returns:
      A :class:`CFG` model (a Denoiser with ``model``'s parametrization and event shape); call
      it, or pass it to :func:`jaxdiff.sample`, with ``model``'s params and ``cond`` of leading
      axis ``B``.

    Raises:
      JaxdiffError: ``model`` not a Denoiser, ``scale`` not a real scalar / ``(B,)`` array,
      ``null_cond`` not numeric, ``interval`` not an ordered pair; at call time ``cond`` missing
      or without a leading batch axis of ``x``'s size, ``null_cond`` of the wrong shape.
    """
    if not isinstance(model, Denoiser):
        fail("model", type(model).__name__, "a jaxdiff Denoiser")
    check_scale(scale)
    if scale_fn is not None and not callable(scale_fn):
        fail("scale_fn", scale_fn, "None or a function t (B,) -> (B,)")
    if null_cond is not None:
        if isinstance(null_cond, str) or not (
            hasattr(null_cond, "shape") or isinstance(null_cond, int | float | np.number | list)
        ):
            fail("null_cond", null_cond, "None or a numeric array holding one null condition")
        null_cond = jnp.asarray(null_cond)
        if not jnp.issubdtype(null_cond.dtype, jnp.number):
            fail("null_cond", null_cond, "a numeric null condition")
    return CFG(
        apply=_cfg_apply,
        parametrization=model.parametrization,
        event_shape=model.event_shape,
        base=model,
        scale=scale,
        null_cond=null_cond,
        interval=_check_interval(interval),
        scale_fn=scale_fn,
    )
