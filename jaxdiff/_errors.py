"""The library's exception types and the standard ``arg=value: expected ...`` message.

Kept free of JAX imports so that the command line can validate a config and inspect a
checkpoint directory before paying for ``import jax``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["JaxdiffError", "NonFiniteError", "SolverError", "fail"]


class JaxdiffError(ValueError):
    """A bad argument: the message names the argument, the value and what was expected."""


class NonFiniteError(FloatingPointError):
    """A computation produced NaN or inf; the message says where."""


class SolverError(RuntimeError):
    """An ODE/SDE solve did not finish (e.g. it hit ``max_steps``)."""


def _short(value: Any) -> str:
    shape = None if isinstance(value, type) else getattr(value, "shape", None)
    if isinstance(shape, tuple) and hasattr(value, "dtype"):
        size = 1
        for d in shape:
            size *= int(d)
        if size > 6:
            return f"array of shape {shape}"
    return repr(value)


def fail(arg: str, value: Any, expected: str) -> None:
    """Raise :class:`JaxdiffError` with the standard message ``arg=value: expected ...``."""
    raise JaxdiffError(f"{arg}={_short(value)}: expected {expected}")
