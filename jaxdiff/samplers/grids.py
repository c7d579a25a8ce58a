"""Time grids for samplers: uniform in t, uniform in log-SNR, quadratic, Karras (EDM).

A grid is a strictly decreasing 1-D array of ``steps + 1`` times from ``t_start`` (noisy) to
``t_end`` (clean); every sampler takes any grid, so a grid is just data (it can be traced,
optimised or written by hand). Formulas: ``shared/reference/samplers.md`` section 1.3.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxdiff._checks import as_float_array, check_positive_int, fail, is_concrete
from jaxdiff.schedules import Schedule

__all__ = [
    "GRIDS",
    "BUDGET_GRIDS",
    "BudgetTable",
    "default_kind",
    "GridSpec",
    "budget_grid",
    "time_grid",
    "check_grid",
    "resolve_grid",
]

GRIDS = ("uniform", "log_snr", "quadratic", "karras")


def time_grid(
    schedule: Schedule,
    steps: int,
    kind: str = "uniform",
    *,
    t_start=None,
    t_end=None,
    rho: float = 7.0,
    dtype=None,
):
    """A decreasing grid of ``steps + 1`` times from ``t_start`` to ``t_end``.

    Args:
      schedule: the schedule (defines ``lambda(t)`` and its inverse).
      steps: number of steps ``N >= 1`` (a Python int: it fixes the grid's shape).
      kind: ``"uniform"`` (``t_i = T + (i/N)(eps - T)``), ``"log_snr"`` (uniform in
        ``lambda = log(alpha/sigma)``; DPM-Solver's ``logSNR``, diffusers' ``use_lu_lambdas``),
        ``"quadratic"`` (``t_i = (sqrt(T) + (i/N)(sqrt(eps) - sqrt(T)))^2``, DPM-Solver's
        ``time_quadratic``) or ``"karras"`` (``sigma_tilde_i = (s_max^(1/rho) + (i/N)
        (s_min^(1/rho) - s_max^(1/rho)))^rho`` with ``sigma_tilde = sigma/alpha``; Karras et al.
        arXiv 2206.00364 eq. 5; it ends at ``sigma_tilde(eps)``, not at 0).
      t_start, t_end: endpoints; default ``schedule.t_start`` / ``schedule.t_end``.
      rho: the Karras exponent.
    Returns:
      Array of shape ``(steps + 1,)``, ``ts[0] = t_start > ... > ts[-1] = t_end``.
    """
    steps, t0, t1 = _check_grid_args(schedule, steps, kind, t_start, t_end, dtype)
    u = jnp.linspace(0.0, 1.0, steps + 1, dtype=t0.dtype)
    if kind == "uniform":
        ts = t0 + u * (t1 - t0)
    elif kind == "log_snr":
        l0, l1 = schedule.lam(t0), schedule.lam(t1)
        ts = schedule.t_from_lam(l0 + u * (l1 - l0))
    elif kind == "quadratic":
        ts = (jnp.sqrt(t0) + u * (jnp.sqrt(t1) - jnp.sqrt(t0))) ** 2
    else:
        s0, s1 = schedule.sigma_tilde(t0), schedule.sigma_tilde(t1)
        r = 1.0 / rho
        st = (s0**r + u * (s1**r - s0**r)) ** rho
        ts = schedule.t_from_sigma_tilde(st)
    # pin the endpoints exactly (inverse maps round off)
    return ts.at[0].set(t0).at[-1].set(t1)


def _check_grid_args(schedule, steps, kind, t_start, t_end, dtype, steps_arg="steps"):
    """Host-side checks of :func:`time_grid`'s arguments; ``(steps, t0, t1)``."""
    steps = check_positive_int(steps_arg, steps)
    if kind not in GRIDS:
        fail("grid", kind, f"one of {GRIDS}")
    t0 = as_float_array(schedule.t_start if t_start is None else t_start)
    t1 = as_float_array(schedule.t_end if t_end is None else t_end)
    if dtype is not None:
        t0, t1 = t0.astype(dtype), t1.astype(dtype)
    schedule.check_t(t0, "t_start")
    schedule.check_t(t1, "t_end")
    if is_concrete(t1) and not float(t1) > float(schedule.t_min):
        fail(
            "t_end",
            float(t1),
            f"a time above {float(schedule.t_min):g}, where sigma = 0 and lambda = inf",
        )
    if is_concrete(t0, t1) and not float(t0) > float(t1):
        fail(
            "t_start",
            float(t0),
            f"a time greater than t_end={float(t1):g} (sampling runs noisy -> clean)",
        )
    return steps, t0, t1


class GridSpec(NamedTuple):
    """A grid to build inside a compiled program: ``time_grid(schedule, steps, kind,
    t_start=t_start, t_end=t_end)`` (``steps`` and ``kind`` static, the times traced), so a new
    step count compiles one program rather than several small ones."""

    steps: int
    kind: str
    t_start: Any
    t_end: Any

    def build(self, schedule: Schedule, dtype=None):
        return time_grid(
            schedule, self.steps, self.kind, t_start=self.t_start, t_end=self.t_end, dtype=dtype
        )


def check_grid(ts, schedule: Schedule, arg: str = "ts", min_steps: int = 1):
    """Validate a user grid: 1-D, at least ``min_steps + 1`` points, strictly decreasing, in range."""
    shape = jnp.shape(ts)
    if len(shape) != 1 or shape[0] < min_steps + 1:
        fail(arg, f"shape {shape}", f"a 1-D array of at least {min_steps + 1} times")
    if is_concrete(ts):
        t = np.asarray(ts)
        if not np.all(np.diff(t) < 0):
            i = int(np.argmax(np.diff(t) >= 0))
            fail(
                arg,
                ts,
                f"strictly decreasing times (noisy -> clean); ts[{i}]={t[i]:g} <= ts[{i + 1}]={t[i + 1]:g}",
            )
        schedule.check_t(ts, arg)
    return as_float_array(ts)


#: the multistep samplers' default grid per budget and schedule (``default_grid = "auto"``):
#: ``(max_steps, kind)`` rows, the first row with ``steps <= max_steps`` wins. Measured with the
#: exact noise predictor of a 64-D 8-component mixture and of a mixture on a 4-dim subspace of
#: R^64, DPM-Solver++ 2M and UniPC-3 with lower_order_final, NFE 2-20 (docs/few_step.md).
#: Schedules not listed (VE, user schedules) use "log_snr" at every budget.
BUDGET_GRIDS = {
    "VPDiscrete": ((4, "uniform"), (14, "quadratic"), (None, "log_snr")),
    "VPLinear": ((6, "uniform"), (14, "quadratic"), (None, "log_snr")),
    "VPCosine": ((14, "karras"), (None, "log_snr")),
    "EDM": ((8, "karras"), (None, "log_snr")),
    "Flow": ((14, "uniform"), (None, "log_snr")),
}


def budget_grid(schedule: Schedule, steps: int, table=None, fallback: str = "log_snr") -> str:
    """The grid kind a sampler uses by default for ``steps`` steps on ``schedule``: the first
    ``(max_steps, kind)`` row of ``table[type(schedule).__name__]`` with ``steps <= max_steps``
    (``table``: default :data:`BUDGET_GRIDS`, the multistep samplers'; ``fallback`` for
    schedules it does not list)."""
    table = BUDGET_GRIDS if table is None else table
    for max_steps, kind in table.get(type(schedule).__name__, ((None, fallback),)):
        if max_steps is None or steps <= max_steps:
            return kind
    return fallback


def default_kind(schedule: Schedule, default_grid, steps: int) -> str:
    """The grid kind of a sampler's ``default_grid`` at ``steps`` steps: ``"auto"`` is
    :func:`budget_grid`; a :class:`BudgetTable` its own table; ``"uniform"`` the schedule's own
    default spacing."""
    if isinstance(default_grid, BudgetTable):
        if type(schedule).__name__ in default_grid.table:
            return budget_grid(schedule, steps, default_grid.table)
        default_grid = default_grid.fallback
    if default_grid == "auto":
        return budget_grid(schedule, steps)
    return schedule.default_grid if default_grid == "uniform" else default_grid


class BudgetTable(NamedTuple):
    """A sampler's own budget table (a ``default_grid`` value): ``table`` as
    :data:`BUDGET_GRIDS`, ``fallback`` the kind for unlisted schedules."""

    table: dict
    fallback: str = "uniform"


def resolve_grid(
    schedule: Schedule,
    min_steps: int,
    default_grid: str,
    steps=None,
    ts=None,
    grid: str | None = None,
    t_start=None,
    t_end=None,
    dtype=None,
    steps_arg: str = "steps",
    deferred: bool = False,
):
    """The time grid of a sampling call: ``ts`` checked with :func:`check_grid`, or (when ``ts``
    is None) :func:`time_grid` of ``steps`` intervals of kind ``grid``, else the sampler's
    ``default_grid``, where ``"uniform"`` means the schedule's own default spacing
    (``schedule.default_grid``: uniform in t, Karras for the EDM schedule) and ``"auto"`` the
    budget-aware choice :func:`budget_grid` of the multistep samplers.

    Shared by :func:`jaxdiff.sample`, :func:`jaxdiff.parallel.sample` and the fine-tuning loop.
    ``min_steps`` is the sampler's fewest grid steps; ``steps_arg`` names ``steps`` in errors.
    Returns ``ts`` of shape ``(steps + 1,)``; with ``deferred`` (and no ``ts``), a validated
    :class:`GridSpec` to build inside the caller's compiled program instead.
    """
    if ts is not None:
        return check_grid(ts, schedule, "ts", max(1, min_steps))
    if steps is None:
        fail(steps_arg, steps, "an integer >= 1 (or pass ts=...)")
    steps = check_positive_int(steps_arg, steps, max(1, min_steps))
    kind = grid if grid is not None else default_kind(schedule, default_grid, steps)
    _, t0, t1 = _check_grid_args(schedule, steps, kind, t_start, t_end, dtype, steps_arg)
    if deferred:
        return GridSpec(steps, kind, t0, t1)
    return time_grid(schedule, steps, kind, t_start=t0, t_end=t1, dtype=dtype)
