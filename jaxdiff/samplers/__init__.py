"""Samplers: time grids, one scan driver, DDPM/DDIM kernels and the diffrax bridge.

Every sampler runs through :func:`jaxdiff.sample` (convenience) or :func:`solve` (pure).
"""

from jaxdiff.samplers.api import prior_sample, sample
from jaxdiff.samplers.base import Kernel, SampleInfo, Sampler, per_example_normal, scan_solve, solve
from jaxdiff.samplers.classic import DDIM, DDPM, ddim, ddpm
from jaxdiff.samplers.diffrax_bridge import (
    PFODE,
    ReverseSDE,
    pf_ode,
    pf_ode_vector_field,
    reverse_sde,
)
from jaxdiff.samplers.grid_search import GridSearchResult, optimize_grid
from jaxdiff.samplers.grids import GRIDS, check_grid, time_grid
from jaxdiff.samplers.processing import ThresholdedDenoiser, dynamic_threshold, threshold_x0

__all__ = [
    "DDIM",
    "DDPM",
    "GRIDS",
    "PFODE",
    "Kernel",
    "ReverseSDE",
    "SampleInfo",
    "Sampler",
    "check_grid",
    "ddim",
    "ddpm",
    "per_example_normal",
    "pf_ode",
    "pf_ode_vector_field",
    "prior_sample",
    "reverse_sde",
    "sample",
    "scan_solve",
    "solve",
    "time_grid",
    "ThresholdedDenoiser",
    "dynamic_threshold",
    "threshold_x0",
    "GridSearchResult",
    "optimize_grid",
]
