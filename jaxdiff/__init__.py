"""jaxdiff: a JAX-functional toolkit for diffusion models.

Schedules, exact oracles, Flax score networks, optax training and samplers, as pure functions
over pytrees that compose with ``jit``, ``vmap`` and ``grad``.

Submodules and the names below are imported on first use (PEP 562), so ``import jaxdiff`` and the
``jaxdiff`` command start quickly: ``jaxdiff.samplers`` or ``from jaxdiff import sample`` loads
what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from jaxdiff._errors import JaxdiffError, NonFiniteError, SolverError

__version__ = "0.1.0"

_SUBMODULES = (
    "analytic",
    "checkpoint",
    "config",
    "data",
    "digits",
    "guidance",
    "likelihood",
    "losses",
    "metrics",
    "models",
    "optimize",
    "parallel",
    "parametrize",
    "samplers",
    "schedules",
    "train",
)
_ATTRIBUTES = {"Denoiser": "jaxdiff.denoiser", "Preconditioned": "jaxdiff.denoiser",
               "sample": "jaxdiff.samplers"}  # fmt: skip

__all__ = [
    "Denoiser",
    "JaxdiffError",
    "NonFiniteError",
    "Preconditioned",
    "SolverError",
    "sample",
    *_SUBMODULES,
]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxdiff.{name}")
    if name in _ATTRIBUTES:
        return getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers see the eager imports
    from jaxdiff import (  # noqa: F401
        analytic,
        checkpoint,
        config,
        data,
        digits,
        guidance,
        likelihood,
        losses,
        metrics,
        models,
        optimize,
        parallel,
        parametrize,
        samplers,
        schedules,
        train,
    )
    from jaxdiff.denoiser import Denoiser, Preconditioned  # noqa: F401
    from jaxdiff.samplers import sample  # noqa: F401
