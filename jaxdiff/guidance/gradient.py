"""Gradient guidance: steer a pretrained model toward a higher objective (Guo, Yuan, Yang, Chen,
Wang, "Gradient Guidance for Diffusion Models: An Optimization Perspective", NeurIPS 2024, arXiv
2404.14743; ../shared/reference/guidance.md section 2).

All terms are score-space guidance terms for :func:`jaxdiff.guidance.guide`, written for any
schedule ``x_t = alpha x_0 + sigma eps`` (the paper's ``alpha_t = sqrt(abar_t)``,
``h_t = sigma^2``), with the Tweedie prediction ``x0_hat(x_t) = E[X_0 | X_t = x_t]`` and its
Jacobian ``J_t = d x0_hat / d x_t``:

* :func:`naive_gradient` ("G", the paper's v1): ``G = beta_t (y - g^T x0_hat) g`` with
  ``beta_t = alpha / (noise^2 + sigma^2 ||g||^2)``. For a VP schedule it is exactly
  ``grad_x log p_t(y | x_t)`` when ``x_0 ~ N(0, I)`` and ``y = g^T x_0 + N(0, noise^2)``. Its
  direction is always ``g``, so any part of ``g`` off the data's support pushes samples off it.
* :func:`lookahead_gradient` ("G_loss", v2): ``G = 2 beta_t (y - g^T x0_hat) J_t^T g`` with
  ``beta_t = (alpha^2 / 2) / (alpha^2 noise^2 + sigma^2 ||J_t^T g||^2)``; the gradient of the
  look-ahead loss ``-beta_t (y - g^T x0_hat(x_t))^2``. Through ``J_t`` it inherits the data's
  structure: for data on a linear subspace it lies in the subspace (Theorem 1).
* :func:`objective_gradient`: the same two forms for a general differentiable objective ``f``:
  ``G = w(t) J_t^T grad f(x0_hat)`` (look-ahead) or ``G = w(t) grad f(x0_hat)`` (naive).

Look-ahead terms declare ``needs_vjp``: :class:`~jaxdiff.guidance.Guided` evaluates the network
once under ``jax.vjp`` and every look-ahead term shares that pass, so one guided evaluation costs
one forward and one backward pass of the network.

Every number a user sweeps (``g``, ``y``, ``noise``, ``scale``, ``beta``, objective ``args``) is a
pytree leaf: changing it under ``jit`` never recompiles. Callables (``f``, ``scale_fn``) are
static. All reductions are per example.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff._checks import fail, is_concrete
from jaxdiff.guidance.base import GuidanceContext, GuidanceTerm, _bcast, scale_at

__all__ = [
    "NaiveGradient",
    "LookaheadGradient",
    "ObjectiveGradient",
    "LookaheadObjectiveGradient",
    "naive_gradient",
    "lookahead_gradient",
    "objective_gradient",
]


# ------------------------------------------------------------------------------------------
# helpers (shared with jaxdiff.guidance.posterior)
# ------------------------------------------------------------------------------------------
def _fn_name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _check_noise(arg: str, value, what: str = "a positive number (the observation noise std)"):
    """A positive scalar (checked when concrete), as an array."""
    v = jnp.asarray(value)
    if not jnp.issubdtype(v.dtype, jnp.inexact):
        v = v.astype(jnp.result_type(float))
    if v.ndim != 0:
        fail(arg, f"shape {v.shape}", "a positive scalar")
    if is_concrete(v) and not float(v) > 0:
        fail(arg, value, what)
    return v


def _as_leaf(arg: str, value, max_ndim: int) -> jax.Array:
    v = jnp.asarray(value)
    if not jnp.issubdtype(v.dtype, jnp.inexact):
        v = v.astype(jnp.result_type(float))
    if v.ndim > max_ndim:
        fail(arg, f"shape {v.shape}", f"an array with at most {max_ndim} dimension(s)")
    return v


def _per_example_vec(arg: str, v, x) -> jax.Array:
    """``v`` of shape ``event`` or ``(B, *event)`` -> ``(B, *event)`` in ``x``'s dtype."""
    shape = jnp.shape(v)
    if shape == x.shape[1:]:
        v = jnp.broadcast_to(v, x.shape)
    elif shape != x.shape:
        fail(
            arg,
            f"shape {shape}",
            f"shape {x.shape[1:]} (one direction) or {x.shape} (one per example) to match x",
        )
    return jnp.asarray(v, x.dtype)


def _per_example_scalar(arg: str, v, batch: int, dtype) -> jax.Array:
    """``v`` of shape ``()``, ``(1,)`` or ``(B,)`` -> ``(B,)``."""
    shape = jnp.shape(v)
    if not (shape == () or (len(shape) == 1 and shape[0] in (1, batch))):
        fail(arg, f"shape {shape}", f"a scalar or shape ({batch},) (one per example)")
    return jnp.broadcast_to(jnp.asarray(v, dtype), (batch,))


def _vdot(a, b) -> jax.Array:
    """Per-example inner product over the event axes, ``(B,)``."""
    return jnp.sum((a * b).reshape(a.shape[0], -1), axis=-1)


def _checked_vjp(fn: Callable, x, arg: str, purpose: str, out_shape=None, name=None):
    """``(out, vjp)`` of ``fn`` at ``x`` (``jax.vjp``), raising :class:`JaxdiffError` when ``fn``
    cannot be differentiated by JAX (numpy inside, integer output) or has the wrong output shape.

    ``out_shape``: the required output shape (default ``(B,)``, a per-example objective)."""
    name = _fn_name(fn) if name is None else name
    want = (x.shape[0],) if out_shape is None else tuple(out_shape)
    try:
        out, vjp = jax.vjp(fn, x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
        fail(
            arg,
            name,
            f"a JAX-differentiable function: {purpose} needs a differentiable objective, but "
            f"tracing it raised {type(e).__name__} (use jax.numpy, not numpy, inside it)",
        )
    except TypeError as e:
        fail(
            arg,
            name,
            f"a JAX-differentiable function: {purpose} needs a differentiable objective, but "
            f"jax.vjp raised TypeError: {str(e).splitlines()[0]}",
        )
    if not isinstance(out, jax.Array):
        fail(arg, name, f"a function returning one JAX array of shape {want}")
    if not jnp.issubdtype(out.dtype, jnp.inexact):
        fail(
            arg,
            f"{name} returning dtype {out.dtype}",
            f"a differentiable objective with a floating output: {purpose} needs a "
            "differentiable objective",
        )
    if tuple(out.shape) != want:
        fail(
            arg,
            f"{name} returning shape {tuple(out.shape)}",
            f"shape {want} for x of shape {x.shape}",
        )
    return out, vjp


# ------------------------------------------------------------------------------------------
# linear objective: naive and look-ahead gradient guidance
# ------------------------------------------------------------------------------------------
class NaiveGradient(GuidanceTerm):
    """Naive gradient guidance ``G = w(t) beta_t (y - g^T x0_hat) g`` (arXiv 2404.14743 "G", v1).

    ``beta_t = alpha / (noise^2 + sigma^2 ||g||^2)``. Build with :func:`naive_gradient`.
    Fields (leaves): ``g`` ``(*event)`` or ``(B, *event)``, ``y`` ``()`` or ``(B,)``, ``noise``,
    ``scale``; ``scale_fn`` static.
    """

    g: Any
    y: Any
    noise: Any
    scale: Any = 1.0
    scale_fn: Callable | None = struct.field(pytree_node=False, default=None)

    def __call__(self, ctx: GuidanceContext) -> jax.Array:
        x0 = ctx.x0
        b = x0.shape[0]
        g = _per_example_vec("g", self.g, x0)
        y = _per_example_scalar("y", self.y, b, x0.dtype)
        w = scale_at(self.scale, self.scale_fn, ctx.t, b).astype(x0.dtype)
        alpha = ctx.alpha.astype(x0.dtype)
        sigma = ctx.sigma.astype(x0.dtype)
        noise = jnp.asarray(self.noise, x0.dtype)
        beta = alpha / (noise**2 + sigma**2 * _vdot(g, g))
        return _bcast(w * beta * (y - _vdot(g, x0)), x0) * g


class LookaheadGradient(GuidanceTerm):
    """Look-ahead gradient guidance ``G = w(t) 2 beta_t (y - g^T x0_hat) J_t^T g`` (arXiv
    2404.14743 "G_loss", v2).

    ``beta_t = (alpha^2/2) / (alpha^2 noise^2 + sigma^2 ||J_t^T g||^2)``, or the constant ``beta``
    when given. Build with :func:`lookahead_gradient`. One VJP of the network per evaluation.
    """

    needs_vjp = True

    g: Any
    y: Any
    noise: Any
    scale: Any = 1.0
    beta: Any = None
    scale_fn: Callable | None = struct.field(pytree_node=False, default=None)

    def __call__(self, ctx: GuidanceContext) -> jax.Array:
        x0 = ctx.x0
        b = x0.shape[0]
        g = _per_example_vec("g", self.g, x0)
        y = _per_example_scalar("y", self.y, b, x0.dtype)
        w = scale_at(self.scale, self.scale_fn, ctx.t, b).astype(x0.dtype)
        jtg = ctx.x0_vjp(g).astype(x0.dtype)  # J_t^T g, per example
        if self.beta is None:
            alpha = ctx.alpha.astype(x0.dtype)
            sigma = ctx.sigma.astype(x0.dtype)
            noise = jnp.asarray(self.noise, x0.dtype)
            beta = 0.5 * alpha**2 / (alpha**2 * noise**2 + sigma**2 * _vdot(jtg, jtg))
        else:
            beta = _per_example_scalar("beta", self.beta, b, x0.dtype)
        return _bcast(2.0 * w * beta * (y - _vdot(g, x0)), x0) * jtg


def _check_direction(g, y):
    g = _as_leaf("g", g, max_ndim=8)
    if g.ndim < 1:
        fail("g", f"shape {g.shape}", "a direction of shape (*event) or (B, *event)")
    if is_concrete(g) and not np.all(np.isfinite(np.asarray(g))):
        fail("g", g, "a finite direction")
    y = _as_leaf("y", y, max_ndim=1)
    return g, y


def naive_gradient(g, y, *, noise=0.1, scale=1.0, scale_fn: Callable | None = None):
    """Naive gradient guidance toward ``g^T x = y`` (Guo et al., arXiv 2404.14743, "G" / v1).

    ``G(x_t, t) = w(t) * beta_t * (y - g^T x0_hat(x_t)) * g``, with
    ``beta_t = alpha(t) / (noise^2 + sigma(t)^2 ||g||^2)`` and ``w(t) = scale * scale_fn(t)``
    (guidance.md 2.1). With a VP schedule (``alpha^2 + sigma^2 = 1``), ``x_0 ~ N(0, I)`` and
    ``y = g^T x_0 + N(0, noise^2)`` this is exactly ``grad_x log p_t(y | x_t)``
    (``E[x_0 | x_t] = alpha x_t``, ``Var(g^T x_0 | x_t) = sigma^2 ||g||^2``); for other data it is
    that Gaussian surrogate. Its direction is always ``g``.

    Args:
      g: the direction (the objective's gradient at a reference point), shape ``(*event)`` (all
        examples) or ``(B, *event)`` (one per example; the paper's per-chain ``g_k^(i)``).
      y: the target value of ``g^T x``, shape ``()`` or ``(B,)``.
      noise: the paper's noise level sigma (> 0; code default 0.1): ``beta_t -> alpha/noise^2``
        as ``t -> 0``.
      scale: a multiplier (the paper's ``beta_coef``), ``()`` or ``(B,)``.
      scale_fn: optional static ``t (B,) -> (B,)`` schedule of the scale.

    Returns:
      A :class:`NaiveGradient` term for :func:`jaxdiff.guidance.guide`; ``g``, ``y``, ``noise``,
      ``scale`` are pytree leaves.
    """
    g, y = _check_direction(g, y)
    return NaiveGradient(
        g=g,
        y=y,
        noise=_check_noise("noise", noise),
        scale=_as_leaf("scale", scale, 1),
        scale_fn=scale_fn,
    )


def lookahead_gradient(g, y, *, noise=0.1, scale=1.0, beta=None, scale_fn: Callable | None = None):
    """Look-ahead (forward-prediction-loss) gradient guidance (Guo et al., arXiv 2404.14743,
    "G_loss" / v2; guidance.md 2.1).

    ``G(x_t, t) = -w(t) beta_t grad_{x_t} (y - g^T x0_hat(x_t))^2
    = 2 w(t) beta_t (y - g^T x0_hat(x_t)) J_t^T g``, ``J_t = d x0_hat / d x_t``, with the paper's
    step size ``beta_t = (alpha^2/2) / (alpha^2 noise^2 + sigma^2 ||J_t^T g||^2)``
    (``= 1/(2 Var(y | x_t))`` for Gaussian data, where ``Cov[x_0 | x_t] = (sigma^2/alpha) J_t``)
    or a constant ``beta``. ``J_t^T g`` is one VJP of the network (``ctx.x0_vjp``), per example.

    Theorem 1 of the paper: when the data lie on a linear subspace and the score has the
    subspace form, ``G`` lies in the subspace, so guided samples stay on the data's support.

    Args:
      g, y, noise, scale, scale_fn: as in :func:`naive_gradient`.
      beta: ``None`` (the step-size rule above) or a constant ``beta_t`` override, ``()`` or
        ``(B,)`` (a leaf). ``beta_t -> 1/(2 noise^2)`` as ``t -> 0``: guidance is strongest at
        the end of sampling; lower ``scale`` or fix ``beta`` if it overshoots.

    Returns:
      A :class:`LookaheadGradient` term (``needs_vjp = True``).
    """
    g, y = _check_direction(g, y)
    if beta is not None:
        beta = _as_leaf("beta", beta, 1)
        if is_concrete(beta) and not np.all(np.asarray(beta) >= 0):
            fail("beta", beta, "a nonnegative step size")
    return LookaheadGradient(
        g=g,
        y=y,
        noise=_check_noise("noise", noise),
        scale=_as_leaf("scale", scale, 1),
        beta=beta,
        scale_fn=scale_fn,
    )


# ------------------------------------------------------------------------------------------
# general objective
# ------------------------------------------------------------------------------------------
def _objective_grad(term, x0):
    f = term.f if term.args is None else (lambda z: term.f(z, term.args))
    _, vjp = _checked_vjp(f, x0, "f", "gradient guidance", name=_fn_name(term.f))
    return vjp(jnp.ones((x0.shape[0],), x0.dtype))[0]


class ObjectiveGradient(GuidanceTerm):
    """Naive objective guidance ``G = w(t) grad f(x0_hat)`` (no Jacobian). Build with
    :func:`objective_gradient` (``lookahead=False``)."""

    scale: Any = 1.0
    args: Any = None
    f: Callable = struct.field(pytree_node=False, default=None)
    scale_fn: Callable | None = struct.field(pytree_node=False, default=None)

    def _weight(self, ctx):
        return scale_at(self.scale, self.scale_fn, ctx.t, ctx.x0.shape[0]).astype(ctx.x0.dtype)

    def __call__(self, ctx: GuidanceContext) -> jax.Array:
        grad = _objective_grad(self, ctx.x0)
        return _bcast(self._weight(ctx), ctx.x0) * grad


class LookaheadObjectiveGradient(ObjectiveGradient):
    """Look-ahead objective guidance ``G = w(t) grad_{x_t} f(x0_hat(x_t)) = w(t) J_t^T grad
    f(x0_hat)``. Build with :func:`objective_gradient` (``lookahead=True``)."""

    needs_vjp = True

    def __call__(self, ctx: GuidanceContext) -> jax.Array:
        grad = _objective_grad(self, ctx.x0)
        return _bcast(self._weight(ctx), ctx.x0) * ctx.x0_vjp(grad).astype(ctx.x0.dtype)


def objective_gradient(
    f: Callable,
    scale=1.0,
    *,
    args=None,
    lookahead: bool = True,
    scale_fn: Callable | None = None,
):
    """Gradient guidance for a general differentiable objective ``f`` (arXiv 2404.14743,
    sections 2 and 4: the guidance is built from the objective's gradient).

    * ``lookahead=True``: ``G(x_t, t) = w(t) grad_{x_t} f(x0_hat(x_t)) = w(t) J_t^T grad
      f(x0_hat(x_t))`` (one VJP of the network, shared with other look-ahead terms);
    * ``lookahead=False``: ``G(x_t, t) = w(t) grad f(x0_hat(x_t))`` (the gradient at the
      prediction applied directly in ``x_t``-space, no Jacobian).

    ``w(t) = scale * scale_fn(t)``. ``G`` is the score of the tilt ``exp(w f(x0_hat(x_t)))``:
    with a linear ``f(x) = g^T x`` the look-ahead form is ``w J_t^T g``.

    Args:
      f: the objective, a per-example JAX function ``(B, *event) -> (B,)`` (``f(x0)``, or
        ``f(x0, args)`` when ``args`` is given). It is static (compared by identity under
        ``jit``): put the numbers you sweep (targets, weights) in ``args``, a pytree leaf, rather
        than closing over them, so that sweeping them never recompiles. It must be
        differentiable by JAX (jax.numpy, floating output) and must not couple examples.
      scale: ``()`` or ``(B,)`` (a leaf).
      args: optional pytree passed to ``f`` (leaves).
      lookahead: choose the form above (static).
      scale_fn: optional static ``t (B,) -> (B,)`` schedule of the scale.

    Returns:
      A :class:`LookaheadObjectiveGradient` or :class:`ObjectiveGradient` term.

    Raises:
      JaxdiffError when the guided model is evaluated, if ``f`` is not differentiable (numpy
      inside, integer output) or does not return shape ``(B,)``.
    """
    if not callable(f):
        fail("f", f, "a callable objective (B, *event) -> (B,)")
    cls = LookaheadObjectiveGradient if lookahead else ObjectiveGradient
    return cls(scale=_as_leaf("scale", scale, 1), args=args, f=f, scale_fn=scale_fn)
