"""Sampler contract and the one scan driver that runs every fixed-grid sampler.

A sampler is a small pytree (its numbers, e.g. ``eta``, are leaves, so sweeping them never
recompiles). ``sampler.kernel(model, schedule)`` binds it to a model and returns a
:class:`Kernel` of pure functions, in the style of blackjax / diffrax::

    state = kernel.init(x_T, params, cond, ts)       # ts: the whole grid (for order plans)
    state, info = kernel.step(key, state, t, t_next, params, cond)   # one interval s -> t
    x = kernel.output(state)

Kernels compute coefficients in the dtype of the times (float32 or float64, whatever the model
runs in) and keep the state in the dtype of ``x_T``.

:func:`solve` runs a kernel as a ``lax.scan`` over a time grid (any spacing); samplers that own
their whole solve (diffrax with adaptive steps) override :meth:`Sampler.solve`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jaxdiff.denoiser import Denoiser
from jaxdiff.schedules import Schedule

__all__ = [
    "Kernel",
    "Sampler",
    "SampleInfo",
    "solve",
    "per_example_normal",
    "example_index_offset",
    "zero_noise_guard",
    "LOWER_ORDER_FINAL",
    "LOWER_ORDER_FINAL_BELOW",
    "check_lower_order_final",
    "lower_order_cap",
]

#: values of the multistep samplers' ``lower_order_final`` (``"always"`` is an alias of True)
LOWER_ORDER_FINAL = (False, True, "auto")
#: ``lower_order_final="auto"`` lowers the final orders on grids shorter than this (the rule of
#: the DPM-Solver++ reference code, arXiv 2211.01095)
LOWER_ORDER_FINAL_BELOW = 10


def check_lower_order_final(value):
    """Validate ``lower_order_final``; returns it with ``"always"`` mapped to ``True``."""
    if isinstance(value, str) and value == "always":
        return True
    if not any(value is v or (isinstance(v, str) and value == v) for v in LOWER_ORDER_FINAL):
        from jaxdiff._checks import fail

        fail("lower_order_final", value, "False, True or 'auto'")
    return value


def lower_order_cap(n: int, lower_order_final) -> int:
    """The static ``cap`` of the lower-order-final rule on a grid of ``n`` steps: step ``k``
    uses order ``<= max(cap - k, 1)``, so with ``cap = n`` the last step is first order and the
    one before it at most second order. ``True``: every ``n``; ``"auto"``: ``n <
    LOWER_ORDER_FINAL_BELOW``; ``False``: never (a huge cap)."""
    lof = check_lower_order_final(lower_order_final)
    if lof is True or (lof == "auto" and n < LOWER_ORDER_FINAL_BELOW):
        return n
    return 2**30


class Kernel(NamedTuple):
    """A sampler bound to a model and schedule: three pure functions."""

    init: Callable[..., Any]
    step: Callable[..., tuple[Any, dict]]
    output: Callable[[Any], jax.Array]


class SampleInfo(NamedTuple):
    """Diagnostics of one solve.

    Attributes:
      nfe: number of model evaluations (an int array).
      first_nonfinite_step: index of the first step whose output had NaN/inf, or -1.
      steps: per-step ``info`` dicts of the kernel, stacked over steps.
    """

    nfe: jax.Array
    first_nonfinite_step: jax.Array
    steps: Any


class Sampler(struct.PyTreeNode):
    """Base class of all samplers. Subclasses implement :meth:`kernel` (or :meth:`solve`).

    Class attributes: ``nfe_per_step`` (model evaluations per grid step), ``min_steps`` (the
    fewest grid steps the method accepts), ``stochastic`` (draws noise), ``default_grid``,
    ``uses_grid`` (False for solvers that choose their own steps and read only the grid's two
    ends: :func:`jaxdiff.sample` then passes just the ends, so ``steps`` is not compiled in).
    """

    nfe_per_step = 1
    min_steps = 1
    stochastic = False
    default_grid = "uniform"
    uses_grid = True

    @property
    def name(self) -> str:
        return type(self).__name__

    def total_nfe(self, steps: int) -> int:
        """Model evaluations of a solve over ``steps`` grid steps (``steps * nfe_per_step``
        unless a method's last step is cheaper, e.g. EDM Heun's final Euler step)."""
        return steps * self.nfe_per_step

    def kernel(self, model: Denoiser, schedule: Schedule) -> Kernel:
        raise NotImplementedError

    def solve(self, key, model, params, schedule, x_T, ts, cond=None, unroll=1):
        """Run the sampler over grid ``ts``; returns ``(x_end, SampleInfo)`` (``unroll``: see
        :func:`scan_solve`)."""
        return scan_solve(key, self, model, params, schedule, x_T, ts, cond, unroll=unroll)


_INDEX_OFFSET = threading.local()


@contextlib.contextmanager
def example_index_offset(offset):
    """Trace-time context: inside it, :func:`per_example_normal` numbers the rows of ``x`` from
    ``offset`` (an int or a traced int scalar) instead of 0.

    Used by :mod:`jaxdiff.parallel` to solve a slice of a global batch (one device's rows, one
    micro-batch) with the noise that rows ``offset .. offset + n - 1`` get in the whole batch.
    It only affects code traced inside the ``with`` block; outside it nothing changes.
    """
    prev = getattr(_INDEX_OFFSET, "value", None)
    _INDEX_OFFSET.value = offset
    try:
        yield
    finally:
        _INDEX_OFFSET.value = prev


def per_example_normal(key, x):
    """Standard normal noise shaped like ``x`` whose row ``i`` depends only on ``(key, i)``.

    So a stochastic sampler gives example ``i`` the same noise whatever the batch size, and
    ``vmap`` over keys gives independent paths. Inside :func:`example_index_offset` row ``i`` is
    keyed by ``offset + i`` (its index in the global batch).
    """
    idx = jnp.arange(x.shape[0])
    offset = getattr(_INDEX_OFFSET, "value", None)
    if offset is not None:
        idx = idx + jnp.asarray(offset, idx.dtype)
    draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), x.shape[1:], x.dtype)  # noqa: E731
    return jax.vmap(draw)(idx)


def zero_noise_guard(schedule, s, t):
    """``(zero, t_safe)`` for a step ``s -> t`` that may end where ``sigma(t) = 0``.

    At ``sigma_t = 0`` (``lambda_t = inf``) the exponential-integrator steps have the limit
    ``h -> inf`` of their data-prediction form, ``x_t = alpha_t x0_hat(x_s, s)`` (the first-order
    step to sigma = 0; higher-order terms vanish or divide by ``h``). A kernel computes its
    normal update at the finite stand-in ``t_safe = t(lambda_s + 1)`` (so no branch holds NaN/inf,
    also under ``grad``) and returns ``jnp.where(zero, alpha_t * x0_hat, x_next)``.
    Scalars in, scalars out (``zero`` a bool array).
    """
    _, sig_t = schedule.alpha_sigma(t)
    zero = sig_t <= 0
    t_safe = jnp.where(zero, schedule.t_from_lam(schedule.lam(s) + 1.0), t)
    return zero, jnp.asarray(t_safe, jnp.result_type(t))


def _all_finite(x):
    return jnp.all(jnp.isfinite(x))


def scan_solve(key, sampler: Sampler, model, params, schedule, x_T, ts, cond=None, *, unroll=1):
    """The driver: ``lax.scan`` of ``kernel.step`` over consecutive grid points.

    Step ``i`` goes from ``ts[i]`` to ``ts[i+1]`` and uses the key ``fold_in(key, i)``.
    Returns ``(x_end, SampleInfo)``; x_end has the shape of ``x_T``.

    ``unroll`` (a Python int or bool, passed to ``lax.scan``): ``True`` unrolls every step into
    straight-line code, which gives XLA more room to fuse across steps; compile time grows with
    the number of steps. Whether it pays depends on the backend and the network: on this
    project's 2-core CPU it did not for a width-256 MLP at NFE 10 (``benchmarks/speed.py``
    times both), so the default is ``1`` (a rolled loop).
    """
    kernel = sampler.kernel(model, schedule)
    n = ts.shape[0] - 1
    state = kernel.init(x_T, params, cond, ts)

    def body(carry, i):
        state, bad = carry
        state, info = kernel.step(jax.random.fold_in(key, i), state, ts[i], ts[i + 1], params, cond)
        bad = jnp.where((bad < 0) & ~_all_finite(kernel.output(state)), i, bad)
        return (state, bad), info

    (state, bad), infos = jax.lax.scan(body, (state, jnp.asarray(-1)), jnp.arange(n), unroll=unroll)
    nfe = jnp.asarray(sampler.total_nfe(n))
    return kernel.output(state), SampleInfo(nfe, bad, infos)


def solve(
    key,
    model: Denoiser,
    params,
    schedule: Schedule,
    x_T,
    ts,
    sampler: Sampler,
    cond=None,
    *,
    unroll=1,
):
    """Pure, composable solve: run ``sampler`` from ``x_T`` at ``ts[0]`` down to ``ts[-1]``.

    No validation, no ``jit``: use it inside your own ``jit`` / ``vmap`` / ``grad``. The
    convenience entry point :func:`jaxdiff.sample` validates arguments, builds the grid, jits
    and checks the result for NaN.

    Args:
      key: PRNG key (used by stochastic samplers only).
      model: a :class:`~jaxdiff.denoiser.Denoiser`.
      params: the model's parameters.
      schedule: the noise schedule.
      x_T: initial state, shape ``(batch, *event_shape)``.
      ts: decreasing time grid, shape ``(steps + 1,)``.
      sampler: a :class:`Sampler`.
      cond: optional condition passed to the model.
      unroll: steps of the scan to unroll (``True``: all; see :func:`scan_solve`); ignored by
        samplers that own their solve (diffrax).
    Returns:
      ``(x_end, info)`` with ``x_end`` shaped like ``x_T`` and ``info`` a :class:`SampleInfo`.
    """
    return sampler.solve(key, model, params, schedule, x_T, ts, cond, unroll=unroll)
