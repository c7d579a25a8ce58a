"""The Denoiser contract: a pure ``(params, x_t, t, cond) -> prediction`` tagged with what it predicts.

A :class:`Denoiser` is a pytree (``flax.struct.PyTreeNode``): the function and the tag are static,
anything numeric a subclass adds (a guidance scale, an analytic distribution's schedule) is a leaf,
so a Denoiser can be passed straight into ``jax.jit`` and swept over without recompiling.
Params are always passed in, never captured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import struct

from jaxdiff import parametrize
from jaxdiff._checks import as_float_array, fail

__all__ = ["Denoiser", "Params", "Cond"]

Params = Any
Cond = Any


class Denoiser(struct.PyTreeNode):
    """A model ``(params, x, t, cond) -> prediction`` with ``x`` of shape ``(batch, *event_shape)``.

    Attributes:
      apply: the pure function; receives ``t`` broadcast to shape ``(batch,)``.
      parametrization: what ``apply`` predicts: ``"eps" | "x0" | "v" | "score" | "velocity"``.
      event_shape: the per-example shape the model accepts, or ``None`` if any shape goes.
    """

    apply: Callable = struct.field(pytree_node=False)
    parametrization: str = struct.field(pytree_node=False, default="eps")
    event_shape: tuple | None = struct.field(pytree_node=False, default=None)

    def __call__(self, params, x, t, cond=None):
        """Raw prediction, shape of ``x``. ``t`` of shape ``()`` or ``(batch,)``."""
        t = jnp.broadcast_to(as_float_array(t), x.shape[:1])
        return self.apply(params, x, t, cond)

    def check_x(self, x, arg: str = "x") -> None:
        """Raise if ``x`` (an array or a shape tuple) is not ``(batch, *event_shape)``; when
        ``event_shape`` is None only the batch axis is required."""
        shape = tuple(int(d) for d in x) if isinstance(x, tuple | list) else tuple(jnp.shape(x))
        if self.event_shape is None:
            if len(shape) < 2:
                fail(arg, f"shape {shape}", "shape (batch, *event_shape) with a batch axis")
            return
        want = (None, *self.event_shape)
        if len(shape) != len(want) or shape[1:] != tuple(self.event_shape):
            fail(arg, f"shape {shape}", f"shape (batch, {', '.join(map(str, self.event_shape))})")

    def x0_eps(self, params, x, t, cond, schedule):
        """``(x0_hat, eps_hat)`` at ``(x, t)`` under ``schedule`` (see :mod:`jaxdiff.parametrize`)."""
        return parametrize.to_x0_eps(self(params, x, t, cond), self.parametrization, x, t, schedule)

    def predict(self, params, x, t, cond, schedule, to: str = "x0"):
        """The prediction converted to parametrization ``to``."""
        return parametrize.convert(
            self(params, x, t, cond), self.parametrization, to, x, t, schedule
        )
