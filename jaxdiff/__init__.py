"""jaxdiff: a JAX-functional toolkit for diffusion models.

Schedules, exact oracles, Flax score networks, optax training and samplers, as pure functions
over pytrees that compose with ``jit``, ``vmap`` and ``grad``.
"""

from jaxdiff import (
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
from jaxdiff._checks import JaxdiffError, NonFiniteError, SolverError
from jaxdiff.denoiser import Denoiser
from jaxdiff.samplers import sample

__version__ = "0.1.0"

__all__ = [
    "Denoiser",
    "JaxdiffError",
    "NonFiniteError",
    "SolverError",
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
    "sample",
    "samplers",
    "schedules",
    "train",
]
