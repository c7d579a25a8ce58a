"""Samplers: time grids, one scan driver, DDPM/DDIM, the exponential-integrator family
(DPM-Solver, DPM-Solver++, UniPC, DEIS), EDM Heun/Euler, predictor-corrector, accelerated
samplers, momentum (GHVB, heavy ball), time shift, the diffrax bridge, x0 processing and time-grid search.

Every sampler runs through :func:`jaxdiff.sample` (convenience) or :func:`solve` (pure).
"""

from jaxdiff.samplers.accelerated import (
    AcceleratedODE,
    AcceleratedSDE,
    VanillaSDE,
    accelerated_ode,
    accelerated_sde,
    vanilla_sde,
)
from jaxdiff.samplers.api import prior_sample, sample
from jaxdiff.samplers.base import Kernel, SampleInfo, Sampler, per_example_normal, scan_solve, solve
from jaxdiff.samplers.classic import DDIM, DDPM, EulerMaruyama, ddim, ddpm, euler_maruyama
from jaxdiff.samplers.deis import DEIS, deis
from jaxdiff.samplers.diffrax_bridge import (
    PFODE,
    ReverseSDE,
    pf_ode,
    pf_ode_vector_field,
    reverse_sde,
)
from jaxdiff.samplers.dpm_solver import (
    DPMSolver,
    DPMSolverPP,
    SDEDPMSolverPP,
    dpm_solver,
    dpm_solver_pp,
    sde_dpm_solver_pp,
)
from jaxdiff.samplers.edm import EDMEuler, EDMHeun, euler, heun
from jaxdiff.samplers.grid_search import GridSearchResult, optimize_grid
from jaxdiff.samplers.grids import GRIDS, check_grid, time_grid
from jaxdiff.samplers.momentum import GHVB, HeavyBall, ghvb, heavy_ball
from jaxdiff.samplers.pc import PredictorCorrector, predictor_corrector
from jaxdiff.samplers.processing import ThresholdedDenoiser, dynamic_threshold, threshold_x0
from jaxdiff.samplers.solver_search import SolverSearchResult, search_solver
from jaxdiff.samplers.time_shift import TimeShift, time_shift
from jaxdiff.samplers.unipc import UniPC, unipc

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
    "EulerMaruyama",
    "euler_maruyama",
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
    "SolverSearchResult",
    "search_solver",
    "DEIS",
    "deis",
    "DPMSolver",
    "DPMSolverPP",
    "SDEDPMSolverPP",
    "dpm_solver",
    "dpm_solver_pp",
    "sde_dpm_solver_pp",
    "UniPC",
    "unipc",
    "AcceleratedODE",
    "AcceleratedSDE",
    "VanillaSDE",
    "accelerated_ode",
    "accelerated_sde",
    "vanilla_sde",
    "EDMEuler",
    "EDMHeun",
    "euler",
    "heun",
    "PredictorCorrector",
    "predictor_corrector",
    "GHVB",
    "HeavyBall",
    "ghvb",
    "heavy_ball",
    "TimeShift",
    "time_shift",
]
