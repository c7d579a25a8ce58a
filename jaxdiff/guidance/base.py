"""The guidance contract: guidance rules are transforms of a model into a model.

Score-space guidance adds terms ``G_i(x_t, t)`` to the model's score,

    s~(x, t) = s(x, t) + sum_i G_i(x, t),

which for any schedule ``x_t = alpha(t) x_0 + sigma(t) eps`` (``s = -eps / sigma``) is the noise
prediction

    eps~(x, t) = eps_hat(x, t) - sigma(t) * sum_i G_i(x, t)

(Dhariwal & Nichol, arXiv 2105.05233, eq. 14; ../shared/reference/guidance.md section 0.1).
:func:`guide` returns a :class:`Guided` model, itself a :class:`~jaxdiff.denoiser.Denoiser`
predicting ``eps``, so it runs under every sampler (DDIM, DPM-Solver++, UniPC, diffrax ODE/SDE,
...) and can be wrapped again (classifier-free guidance underneath, a reward gradient on top).

A term is a pytree (``flax.struct.PyTreeNode``) with a method ``__call__(ctx) -> G`` of the shape
of ``x``; its numbers (scales, targets, classifier params) are leaves, so sweeping them under
``jit`` never recompiles. A term that needs the Jacobian of the x0-prediction sets the class
attribute ``needs_vjp = True``: :class:`Guided` then evaluates the base model once under
``jax.vjp`` and every such term shares that forward pass (``ctx.x0_vjp``), so a look-ahead step
costs one forward and one backward pass of the network.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff._checks import fail, is_concrete
from jaxdiff.denoiser import Denoiser

__all__ = ["GuidanceContext", "GuidanceTerm", "Guided", "guide", "scale_at"]


class GuidanceContext(NamedTuple):
    """What a guidance term sees at one model evaluation (all arrays have batch axis ``B``).

    Attributes:
      model, params, cond, schedule: the base model, its params, its condition and the schedule.
      x: ``(B, *event)`` the current state ``x_t``; t: ``(B,)`` its time.
      alpha, sigma: ``(B,)`` the schedule's ``alpha(t)``, ``sigma(t)``.
      x0, eps: ``(B, *event)`` the base model's (Tweedie) x0- and noise predictions at ``x``.
      x0_vjp: ``v -> v^T (d x0 / d x)`` (shape of ``x``), the VJP of the x0-prediction taken at
        ``x`` in the same forward pass, when a term declared ``needs_vjp``; otherwise ``None``.
        Per example: the Jacobian is block-diagonal over the batch, so ``v`` of shape ``(B,
        *event)`` gives each example's ``J_i^T v_i``.
    """

    model: Denoiser
    params: Any
    x: jax.Array
    t: jax.Array
    cond: Any
    schedule: Any
    alpha: jax.Array
    sigma: jax.Array
    x0: jax.Array
    eps: jax.Array
    x0_vjp: Callable | None


class GuidanceTerm(struct.PyTreeNode):
    """Base class of score-space guidance terms: ``term(ctx) -> G`` with ``G.shape == x.shape``."""

    needs_vjp = False  # class attribute, not a field

    def __call__(self, ctx: GuidanceContext) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError


def scale_at(scale, scale_fn: Callable | None, t, batch: int):
    """The guidance scale at times ``t (B,)`` as an array ``(B,)``.

    ``scale``: a number or an array of shape ``()`` or ``(B,)`` (a pytree leaf: traced, sweeping it
    never recompiles). ``scale_fn``: optional ``t (B,) -> (B,)`` multiplier (static; a schedule of
    the scale such as an interval or a ramp), so ``w(t) = scale * scale_fn(t)``.
    """
    w = jnp.asarray(scale, dtype=jnp.result_type(t))
    if w.ndim > 1 or (w.ndim == 1 and w.shape[0] not in (1, batch)):
        fail("scale", f"shape {w.shape}", f"a scalar or shape ({batch},) (one per example)")
    w = jnp.broadcast_to(w, (batch,))
    if scale_fn is not None:
        w = w * jnp.broadcast_to(scale_fn(t), (batch,))
    return w


def check_scale(scale, arg: str = "scale"):
    """Raise unless ``scale`` is a real finite number or an array of shape ``()`` or ``(B,)``."""
    if not hasattr(scale, "shape") and not isinstance(scale, numbers.Number):
        fail(arg, scale, "a number or an array of shape () or (B,)")
    s = jnp.asarray(scale)
    if not jnp.issubdtype(s.dtype, jnp.number) or jnp.issubdtype(s.dtype, jnp.complexfloating):
        fail(arg, scale, "a real guidance scale")
    if s.ndim > 1:
        fail(arg, f"shape {tuple(s.shape)}", "a scalar or shape (B,) (one per example)")
    if is_concrete(s) and not np.all(np.isfinite(np.asarray(s, np.float64))):
        fail(arg, scale, "a finite guidance scale")


def _bcast(v, x):
    """``(B,) -> (B, 1, ..., 1)`` to broadcast against ``x``."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - 1))


class Guided(Denoiser):
    """A base model with score-space guidance terms: predicts ``eps~ = eps_hat - sigma * sum G``.

    Build it with :func:`guide`. It is a pytree: ``base``, ``schedule`` and ``terms`` are children,
    so a guided model passes through ``jax.jit`` / ``vmap`` / ``grad`` like any model.
    """

    base: Denoiser = None
    schedule: Any = None
    terms: tuple = ()

    def __call__(self, params, x, t, cond=None):
        """Guided noise prediction, shape of ``x`` (``t``: shape ``()`` or ``(B,)``)."""
        t = jnp.broadcast_to(jnp.asarray(t, dtype=jnp.result_type(x.dtype, float)), x.shape[:1])
        alpha, sigma = self.schedule.alpha_sigma(t)
        vjp = None
        if any(type(term).needs_vjp for term in self.terms):
            (x0, eps), vjp_full = jax.vjp(
                lambda y: self.base.x0_eps(params, y, t, cond, self.schedule), x
            )
            zeros = jnp.zeros_like(x)

            def vjp(v):
                return vjp_full((v.astype(x0.dtype), zeros.astype(eps.dtype)))[0]

        else:
            x0, eps = self.base.x0_eps(params, x, t, cond, self.schedule)
        ctx = GuidanceContext(
            self.base, params, x, t, cond, self.schedule, alpha, sigma, x0, eps, vjp
        )
        total = None
        for term in self.terms:
            g = term(ctx)
            if jnp.shape(g) != x.shape:
                fail(
                    "guidance term",
                    f"{type(term).__name__} returned shape {jnp.shape(g)}",
                    f"a score-space term of the shape of x, {x.shape}",
                )
            total = g if total is None else total + g
        if total is None:
            return eps
        return eps - _bcast(sigma, x).astype(eps.dtype) * total.astype(eps.dtype)


def guide(model: Denoiser, schedule, *terms: GuidanceTerm) -> Guided:
    """Add score-space guidance ``terms`` to ``model`` under ``schedule``.

    Args:
      model: any :class:`~jaxdiff.denoiser.Denoiser` (including an already guided one, or a
        classifier-free-guided model from :func:`jaxdiff.guidance.cfg`).
      schedule: the noise schedule the model was trained with (needed to convert score-space
        terms into a noise prediction: ``eps~ = eps_hat - sigma(t) * sum_i G_i``).
      *terms: :class:`GuidanceTerm` instances, e.g. :func:`classifier`, :func:`naive_gradient`,
        :func:`lookahead_gradient`, :func:`dps`.

    Returns:
      A :class:`Guided` model (``parametrization="eps"``, same ``event_shape`` as ``model``); pass it
      to :func:`jaxdiff.sample` with the base model's params.
    """
    if not isinstance(model, Denoiser):
        fail("model", type(model).__name__, "a jaxdiff Denoiser")
    for i, term in enumerate(terms):
        if not isinstance(term, GuidanceTerm):
            fail(f"terms[{i}]", type(term).__name__, "a jaxdiff.guidance term (GuidanceTerm)")
    if not (hasattr(schedule, "alpha_sigma") and hasattr(schedule, "lam")):
        fail("schedule", type(schedule).__name__, "a jaxdiff schedule")
    return Guided(
        apply=_guided_apply,
        parametrization="eps",
        event_shape=model.event_shape,
        base=model,
        schedule=schedule,
        terms=tuple(terms),
    )


def _guided_apply(params, x, t, cond):  # pragma: no cover - Guided overrides __call__
    raise RuntimeError("Guided.__call__ is the entry point")
