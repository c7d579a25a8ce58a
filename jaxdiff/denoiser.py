"""The Denoiser contract: a pure ``(params, x_t, t, cond) -> prediction`` tagged with what it predicts.

A :class:`Denoiser` is a pytree (``flax.struct.PyTreeNode``): the function and the tag are static,
anything numeric a subclass adds (a guidance scale, an analytic distribution's schedule) is a leaf,
so a Denoiser can be passed straight into ``jax.jit`` and swept over without recompiling.
Params are always passed in, never captured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from jaxdiff import parametrize
from jaxdiff._checks import as_float_array, fail
from jaxdiff.schedules import _bcast

__all__ = ["Denoiser", "Preconditioned", "Params", "Cond"]

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
    #: the loss weighting :func:`jaxdiff.losses.dsm_loss` uses when none is given
    default_weighting: ClassVar[str] = "none"

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


class Preconditioned(Denoiser):
    """EDM preconditioning (Karras et al. arXiv 2206.00364, sec. 5 and table 1) for any schedule.

    With ``x = alpha (x0 + sigma_tilde eps)``, ``sigma_tilde = sigma / alpha`` and the data std
    ``sigma_data``, the network ``F = apply(params, c_in x, t, cond)`` is wrapped as the
    x0-prediction (eq. 7)::

        D(x, t) = c_skip x / alpha + c_out F,
        c_in  = 1 / sqrt(sigma^2 + sigma_data^2 alpha^2)        (applied to x, = c_in~ / alpha)
        c_skip = sigma_data^2 / (sigma_tilde^2 + sigma_data^2)
        c_out  = sigma_tilde sigma_data / sqrt(sigma_tilde^2 + sigma_data^2)

    so the network sees unit-variance inputs and regresses a unit-variance target at every
    noise level. Its natural loss is ``||F - F_target||^2`` with unit weight, i.e. the ``"edm"``
    weighting ``(sigma_tilde^2 + sigma_data^2) / (sigma_tilde sigma_data)^2`` in x0 space
    (:func:`jaxdiff.losses.loss_weight`), which :func:`jaxdiff.losses.dsm_loss` uses by default
    for this model. The network receives the schedule time ``t`` (not EDM's ``ln(sigma)/4``).

    On a variance-preserving schedule with ``sigma_data = 1``, ``D = alpha x + sigma F``: exactly
    the v-parametrization (``F = -v``, Salimans & Ho arXiv 2202.00512) with its unweighted loss.
    Unlike ``"v"``, the input scaling keeps VE / EDM / flow schedules (``alpha = 1``,
    ``sigma`` up to 80) well conditioned.

    Attributes:
      schedule: the noise schedule (a pytree leaf).
      sigma_data: the data std (a pytree leaf; scalar).
    """

    parametrization: str = struct.field(pytree_node=False, default="x0")
    schedule: Any = None
    sigma_data: Any = 1.0
    default_weighting: ClassVar[str] = "edm"

    def coefficients(self, t):
        """``(c_in, c_skip / alpha, c_out)`` at times ``t`` (shape of ``t``): ``D = (c_skip /
        alpha) x + c_out F(c_in x)``."""
        a, s = self.schedule.alpha_sigma(t)
        sd = jnp.asarray(self.sigma_data, jnp.result_type(a))
        n2 = s**2 + (sd * a) ** 2  # alpha^2 (sigma_tilde^2 + sigma_data^2)
        r = jax.lax.rsqrt(n2)
        return r, sd**2 * a / n2, s * sd * r

    def __call__(self, params, x, t, cond=None):
        """The x0-prediction ``D(x, t)``, shape of ``x`` = ``(batch, *event_shape)``."""
        t = jnp.broadcast_to(as_float_array(t), jnp.shape(x)[:1])
        c_in, c_skip, c_out = (_bcast(c, x) for c in self.coefficients(t))
        f = self.apply(params, (c_in * x).astype(x.dtype), t, cond)
        return (c_skip * x + c_out * f).astype(x.dtype)
