"""Probability-flow ODE and reverse SDE solved with diffrax (any solver, fixed or adaptive steps).

* PF-ODE (Song et al. arXiv 2011.13456, eq. 13): ``dx/dt = f(t) x - g(t)^2/2 * score(x, t)
  = f(t) x + g(t)^2/(2 sigma(t)) * eps_hat(x, t)``, integrated from ``ts[0]`` down to ``ts[-1]``.
* Reverse SDE (Anderson 1982; arXiv 2011.13456 eq. 6): ``dx = [f x - g^2 score] dt + g dW_bar``
  with ``dt < 0``. It is integrated in the increasing variable ``u = -t`` (diffrax's Brownian
  trees need ``t0 < t1``, and stochastic Runge-Kutta solvers are only tested forward in time):
  ``dx = -[f x - g^2 score](-u) du + g(-u) dW_u``. The noise is additive, so Ito and
  Stratonovich solvers agree. Each example gets its own ``VirtualBrownianTree`` keyed by
  ``fold_in(key, i)``: the same key gives the same sample whatever the batch size.

Fixed steps use ``diffrax.StepTo(ts)`` (exactly the grid); adaptive steps use a
``PIDController(rtol, atol)`` between ``ts[0]`` and ``ts[-1]``.
"""

from __future__ import annotations

from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import lineax
from flax import struct

from jaxdiff._checks import fail
from jaxdiff.samplers.base import SampleInfo, Sampler

__all__ = ["PFODE", "ReverseSDE", "pf_ode", "reverse_sde", "pf_ode_vector_field"]

_STAGES = {
    "Euler": 1,
    "Heun": 2,
    "Midpoint": 2,
    "Ralston": 2,
    "Bosh3": 3,
    "Tsit5": 6,
    "Dopri5": 6,
    "Dopri8": 12,
    "EulerHeun": 2,
    "ReversibleHeun": 1,
}


def _stages(solver) -> int:
    """Model evaluations per step of a diffrax solver; -1 when unknown (then ``nfe`` is -1)."""
    name = type(solver).__name__
    if name in _STAGES:
        return _STAGES[name]
    if name == "HalfSolver":  # one full step and two half steps
        inner = _stages(solver.solver)
        return -1 if inner < 0 else 3 * inner
    tableau = getattr(solver, "tableau", None)
    n = getattr(tableau, "num_stages", None)
    return int(n) if n is not None else -1


def _solve_info(solver, x, nsteps, ok) -> SampleInfo:
    """SampleInfo of a diffrax solve (``nsteps``/``ok`` per example or scalar): NFE from the
    slowest example, and a positive ``first_nonfinite_step`` marking a NaN inside the solve."""
    worst = jnp.max(nsteps)
    stages = _stages(solver)
    nfe = worst * stages if stages > 0 else jnp.asarray(-1)
    bad = jnp.where(jnp.all(jnp.isfinite(x)), -1, worst)
    return SampleInfo(nfe, bad, {"num_steps": nsteps, "solver_ok": jnp.all(ok)})


def pf_ode_vector_field(model, params, schedule, x, t, cond=None):
    """``dx/dt = f(t) x + g(t)^2 / (2 sigma(t)) * eps_hat(x, t)`` (PF-ODE in t), shape of x."""
    _, eps = model.x0_eps(params, x, t, cond, schedule)
    f = schedule.drift_coef(t)
    g2 = schedule.diffusion_sq(t)
    return f * x + (g2 / (2.0 * schedule.sigma(t))) * eps


def _controller(adaptive, rtol, atol, ts, jump_ts=None):
    if adaptive:
        pid = diffrax.PIDController(rtol=rtol, atol=atol)
        if jump_ts is not None:
            # the vector field is not smooth there (e.g. the DDPM discrete schedule's knots)
            pid = diffrax.ClipStepSizeController(pid, jump_ts=jump_ts)
        return pid, ts[1] - ts[0]
    return diffrax.StepTo(ts=ts), None


class PFODE(Sampler):
    """Probability-flow ODE through ``diffrax.diffeqsolve``.

    Attributes:
      solver: any diffrax ODE solver (default ``Tsit5``).
      adaptive: ``True``: PID step-size control with ``rtol``/``atol`` between the grid's ends
        (diffrax picks the first step; the grid's interior is not used, so ``steps`` neither
        changes the result nor recompiles); ``False``: exactly the grid.
      rtol, atol: tolerances (leaves: changing them does not recompile).
      max_steps: diffrax's step cap (static). With a discrete (DDPM) schedule the adaptive solve
        steps onto every knot of ``log alpha`` inside the grid (1000 by default), so it takes at
        least that many steps.
      adjoint: diffrax adjoint for ``jax.grad`` (default ``RecursiveCheckpointAdjoint``).
    """

    solver: Any = struct.field(pytree_node=False, default_factory=diffrax.Tsit5)
    adaptive: bool = struct.field(pytree_node=False, default=True)
    rtol: Any = 1e-5
    atol: Any = 1e-5
    max_steps: int = struct.field(pytree_node=False, default=4096)
    adjoint: Any = struct.field(
        pytree_node=False, default_factory=diffrax.RecursiveCheckpointAdjoint
    )

    @property
    def min_steps(self):
        return 1

    @property
    def uses_grid(self):
        return not self.adaptive

    def solve(self, key, model, params, schedule, x_T, ts, cond=None, unroll=1):  # noqa: ARG002
        def vf(t, y, args):
            p, c = args
            return pf_ode_vector_field(model, p, schedule, y, t, c)

        controller, dt0 = _controller(self.adaptive, self.rtol, self.atol, ts, schedule.kinks())
        if self.adaptive:
            dt0 = None  # diffrax's initial-step selection (Hairer et al.), independent of the grid
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf),
            self.solver,
            t0=ts[0],
            t1=ts[-1],
            dt0=dt0,
            y0=x_T,
            args=(params, cond),
            stepsize_controller=controller,
            max_steps=self.max_steps,
            adjoint=self.adjoint,
            throw=False,
        )
        x = sol.ys[-1]
        nsteps = sol.stats["num_steps"]
        return x, _solve_info(self.solver, x, nsteps, sol.result == diffrax.RESULTS.successful)


class ReverseSDE(Sampler):
    """Reverse-time SDE through ``diffrax.diffeqsolve`` with a ``VirtualBrownianTree``.

    Attributes:
      solver: a diffrax SDE solver (default ``Euler``, i.e. Euler-Maruyama; additive noise so
        ``Heun``/``EulerHeun``/``SEA``/``ShARK`` also apply; SRK solvers need
        ``levy_area=diffrax.SpaceTimeLevyArea``).
      adaptive: PID control (requires a solver with an error estimate, e.g.
        ``diffrax.HalfSolver(diffrax.Heun())``); default fixed steps on the grid.
      bm_tol: Brownian tree resolution as a fraction of the smallest grid step (static).
    """

    solver: Any = struct.field(pytree_node=False, default_factory=diffrax.Euler)
    adaptive: bool = struct.field(pytree_node=False, default=False)
    rtol: Any = 1e-3
    atol: Any = 1e-3
    max_steps: int = struct.field(pytree_node=False, default=4096)
    levy_area: Any = struct.field(pytree_node=False, default=diffrax.BrownianIncrement)
    bm_tol: float = struct.field(pytree_node=False, default=1e-3)
    stochastic = True

    def solve(self, key, model, params, schedule, x_T, ts, cond=None, unroll=1):  # noqa: ARG002
        us = -ts  # increasing
        tol = self.bm_tol * jnp.min(jnp.diff(us))

        def drift(u, y, args):
            p, c = args
            t = -u
            c1 = None if c is None else jax.tree.map(lambda a: a[None], c)
            pf = pf_ode_vector_field(model, p, schedule, y[None], t, c1)[0]
            # reverse SDE drift f x - g^2 score = 2 * PF drift - f x
            f = schedule.drift_coef(t)
            return -(2.0 * pf - f * y)

        def diffusion(u, y, args):
            return lineax.DiagonalLinearOperator(schedule.diffusion(-u) * jnp.ones_like(y))

        kinks = schedule.kinks()
        kinks = None if kinks is None else -kinks
        controller, dt0 = _controller(self.adaptive, self.rtol, self.atol, us, kinks)

        def one(i, y0, c):
            bm = diffrax.VirtualBrownianTree(
                us[0],
                us[-1],
                tol=tol,
                shape=jax.ShapeDtypeStruct(y0.shape, y0.dtype),
                key=jax.random.fold_in(key, i),
                levy_area=self.levy_area,
            )
            terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, bm))
            sol = diffrax.diffeqsolve(
                terms,
                self.solver,
                t0=us[0],
                t1=us[-1],
                dt0=dt0,
                y0=y0,
                args=(params, c),
                stepsize_controller=controller,
                max_steps=self.max_steps,
                throw=False,
            )
            ok = sol.result == diffrax.RESULTS.successful
            return sol.ys[-1], sol.stats["num_steps"], ok

        idx = jnp.arange(x_T.shape[0])
        if cond is None:
            x, nsteps, ok = jax.vmap(lambda i, y: one(i, y, None))(idx, x_T)
        else:
            x, nsteps, ok = jax.vmap(one)(idx, x_T, cond)
        return x, _solve_info(self.solver, x, nsteps, ok)


def pf_ode(
    solver=None, *, adaptive=True, rtol=1e-5, atol=1e-5, max_steps=4096, adjoint=None
) -> PFODE:
    """Probability-flow ODE sampler through diffrax (default ``Tsit5`` with PID control)."""
    solver = diffrax.Tsit5() if solver is None else solver
    if not isinstance(solver, diffrax.AbstractSolver):
        fail("solver", solver, "a diffrax solver instance, e.g. diffrax.Tsit5()")
    adjoint = diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint
    return PFODE(
        solver=solver, adaptive=adaptive, rtol=rtol, atol=atol, max_steps=max_steps, adjoint=adjoint
    )


def reverse_sde(
    solver=None,
    *,
    adaptive=False,
    rtol=1e-3,
    atol=1e-3,
    max_steps=4096,
    levy_area=None,
    bm_tol=1e-3,
) -> ReverseSDE:
    """Reverse-SDE sampler through diffrax (default Euler-Maruyama on the grid)."""
    solver = diffrax.Euler() if solver is None else solver
    if not isinstance(solver, diffrax.AbstractSolver):
        fail("solver", solver, "a diffrax solver instance, e.g. diffrax.Euler()")
    levy_area = diffrax.BrownianIncrement if levy_area is None else levy_area
    return ReverseSDE(
        solver=solver,
        adaptive=adaptive,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        levy_area=levy_area,
        bm_tol=bm_tol,
    )
