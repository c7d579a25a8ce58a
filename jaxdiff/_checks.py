"""Argument validation shared by every public entry point.

Checks run on concrete (non-traced) values only, so the same functions work inside a user's
``jit``: there they are skipped, and ``jaxdiff.sample`` / ``jaxdiff.train`` re-check results on
the host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._errors import JaxdiffError, NonFiniteError, SolverError, _short, fail  # noqa: F401

__all__ = ["JaxdiffError", "NonFiniteError", "SolverError", "fail", "is_concrete"]


def is_concrete(*xs: Any) -> bool:
    """True when no leaf of ``xs`` is a tracer (so its values can be inspected on the host)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(xs))


def check_positive_int(arg: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        fail(arg, value, f"an integer >= {minimum}")
    return int(value)


def check_in_range(arg: str, t: Any, lo: Any, hi: Any, what: str = "the schedule's range") -> None:
    """Raise if concrete ``t`` has entries outside ``[lo, hi]`` (no-op on tracers)."""
    if not is_concrete(t, lo, hi):
        return
    t_np = np.asarray(t)
    lo_f, hi_f = float(np.asarray(lo)), float(np.asarray(hi))
    tol = 1e-6 * max(1.0, abs(hi_f))
    if not np.all(np.isfinite(t_np)):
        fail(arg, t, f"finite times in {what} [{lo_f:g}, {hi_f:g}]")
    if np.any(t_np < lo_f - tol) or np.any(t_np > hi_f + tol):
        bad = t_np[(t_np < lo_f - tol) | (t_np > hi_f + tol)].ravel()[0]
        fail(arg, t, f"times in {what} [{lo_f:g}, {hi_f:g}] (found {float(bad):g})")


def check_finite(name: str, x: Any, where: str = "") -> None:
    """Raise :class:`NonFiniteError` if a concrete pytree ``x`` holds NaN or inf."""
    if not is_concrete(x):
        return
    for leaf in jax.tree_util.tree_leaves(x):
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
            n_bad = int(np.size(arr) - np.sum(np.isfinite(arr)))
            raise NonFiniteError(
                f"{name} contains {n_bad} non-finite value(s){' ' + where if where else ''}; "
                "check the model output, the time range and the dtype"
            )


def as_float_array(x: Any) -> jax.Array:
    """``jnp.asarray`` that promotes integers to the default float dtype."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    return x
