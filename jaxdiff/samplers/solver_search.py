"""Solver search: a per-step UniPC plan (order, corrector) and its time grid, fitted to a model.

In the spirit of USF (Liu et al., "Unified Sampling Framework", arXiv 2312.07243, sec. 4): the
solver at each step is a choice, and the best choice depends on the model and the budget. The
search space here is UniPC's (Zhao et al. arXiv 2302.04867): at step ``k`` the predictor order
``1 .. min(order, k + 1)`` (the history available) and whether UniC corrects the step, plus
the time grid (continuous, by gradient: :func:`jaxdiff.samplers.optimize_grid`). It alternates
a greedy coordinate pass over the per-step choices (forward solves only: every plan runs through
one compiled program, the plan being traced arrays) and a gradient fit of the grid for the
current plan, for ``rounds`` rounds, and returns the best stage by its loss on held-out
calibration draws. Calibration noise comes from the caller's key: keep it independent of the
noise you evaluate with.

Not included (yet): USF's per-step coefficient search and DPM-Solver-v3's empirical model
statistics (Zheng et al. arXiv 2310.13268).
"""

from __future__ import annotations

import json
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._checks import check_positive_int, fail
from jaxdiff.samplers.base import solve
from jaxdiff.samplers.grid_search import (
    _check_search_args,
    _fit_grid,
    _selection_loss,
    _start_grids,
    calibration,
    endpoint_loss,
    grid_from_logits,
    logits_from_grid,
)
from jaxdiff.samplers.unipc import UniPC, unipc

__all__ = ["SolverSearchResult", "search_solver"]


class SolverSearchResult(NamedTuple):
    """Result of :func:`search_solver`.

    Attributes:
      sampler: the UniPC sampler with the found per-step plan (``orders``, ``correctors``).
      ts: its grid ``(steps + 1,)``: ``jaxdiff.sample(..., result.sampler, ts=result.ts)``.
      initial_loss / final_loss: held-out loss of the default UniPC (its default plan on the best
        starting grid) and of the result.
      history: ``[(stage, held-out loss), ...]`` of every stage.
      calibration_nfe: model evaluations per calibration draw (forward and backward passes).
      seconds: wall-clock seconds of the search (reference solve and compilation included).
    """

    sampler: UniPC
    ts: jax.Array
    initial_loss: float
    final_loss: float
    history: list
    calibration_nfe: int
    seconds: float

    def to_dict(self) -> dict:
        """A JSON-serialisable dict; :meth:`from_dict` rebuilds the result."""
        s = self.sampler
        return {
            "sampler": {
                "order": s.order,
                "solver_type": s.solver_type,
                "predict_x0": s.predict_x0,
                "orders": np.asarray(s.orders).tolist(),
                "correctors": np.asarray(s.correctors).tolist(),
            },
            "ts": np.asarray(self.ts).tolist(),
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "history": [[a, float(b)] for a, b in self.history],
            "calibration_nfe": int(self.calibration_nfe),
            "seconds": float(self.seconds),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> SolverSearchResult:
        if not isinstance(d, dict) or "sampler" not in d or "ts" not in d:
            fail("d", type(d).__name__, "a dict written by SolverSearchResult.to_dict")
        return cls(
            unipc(**d["sampler"]),
            jnp.asarray(d["ts"]),
            float(d["initial_loss"]),
            float(d["final_loss"]),
            [tuple(h) for h in d["history"]],
            int(d["calibration_nfe"]),
            float(d["seconds"]),
        )


def _default_plan(order, steps):
    """UniPC's default plan (warm-up, lower_order_final=True, every step corrected)."""
    orders = np.array([max(1, min(order, k + 1, steps - k)) for k in range(steps)], np.int32)
    return orders, np.ones((steps,), np.int32)


def search_solver(
    key,
    model,
    params,
    schedule,
    steps: int,
    shape,
    *,
    order: int = 3,
    solver_type: str = "bh2",
    cond=None,
    rounds: int = 2,
    iterations: int = 100,
    learning_rate: float = 0.05,
    loss: str = "l2",
    holdout: float = 0.25,
    init="auto",
    reference=None,
    reference_steps: int = 64,
    t_start=None,
    t_end=None,
) -> SolverSearchResult:
    """Search a per-step UniPC plan and its grid for ``model`` at ``steps`` model evaluations.

    Args:
      key: PRNG key of the calibration draws (independent of your evaluation noise).
      model, params, schedule, cond: the model to sample.
      steps: steps = NFE (UniPC evaluates the model once per step), a Python int >= 1.
      shape: calibration batch shape ``(n, *event_shape)``.
      order: the highest predictor order considered (1-3); ``solver_type``: UniPC's B(h).
      rounds: alternations of (greedy plan pass, grid fit); ``iterations``, ``learning_rate``:
        of each grid fit (see :func:`optimize_grid`).
      loss, holdout, init, reference, reference_steps, t_start, t_end: as in
        :func:`optimize_grid`.
    Returns:
      :class:`SolverSearchResult`; never worse on the held-out draws than the default UniPC
      (``unipc(order)``) on the best starting grid.
    Raises:
      JaxdiffError naming the argument for steps < 1, a shape without batch axis, a bad
      order, loss, holdout or init.
    """
    t_wall = time.perf_counter()
    steps = check_positive_int("steps", steps)
    rounds = check_positive_int("rounds", rounds)
    iterations = check_positive_int("iterations", iterations)
    base = unipc(order, solver_type)
    shape, _ = _check_search_args(model, base, shape, loss, holdout)
    cal = calibration(
        key, model, params, schedule, shape, cond=cond, holdout=holdout, reference=reference,
        reference_steps=reference_steps, t_start=t_start, t_end=t_end,
    )  # fmt: skip
    orders, corr = _default_plan(order, steps)

    def planned(o, c):
        return base.replace(orders=jnp.asarray(o, jnp.int32), correctors=jnp.asarray(c, jnp.int32))

    starts, start_loss = _start_grids(
        model, params, schedule, cal, planned(orders, corr), steps, init, loss, cond
    )
    name = min(start_loss, key=start_loss.get)
    ts = starts[name]
    held_out = _selection_loss(model, params, schedule, cal, loss, cond)
    k_run = jax.random.PRNGKey(0)
    fit_loss = jax.jit(
        lambda smp, ts: endpoint_loss(
            solve(k_run, model, params, schedule, cal.x_fit, ts, smp, cond)[0], cal.ref_fit, loss
        )
    )
    initial = start_loss[name]
    history = [(f"default plan, {name} grid", initial)]
    best = (initial, orders.copy(), corr.copy(), ts)
    n_forward = len(starts)
    for r in range(rounds):
        # greedy coordinate pass over the per-step choices, on the fit draws
        cur = float(fit_loss(planned(orders, corr), ts))
        for k in range(steps):
            options = [
                (q, c) for q in range(1, min(order, k + 1) + 1) for c in ((0, 1) if k < steps - 1 else (1,))
            ]  # fmt: skip
            for q, c in options:
                o2, c2 = orders.copy(), corr.copy()
                o2[k], c2[k] = q, c
                val = float(fit_loss(planned(o2, c2), ts))
                n_forward += 1
                if val < cur:
                    cur, orders, corr = val, o2, c2
        hold = float(held_out(planned(orders, corr), ts))
        history.append((f"round {r + 1}: plan", hold))
        if hold < best[0]:
            best = (hold, orders.copy(), corr.copy(), ts)
        # the grid for this plan (warm start from the current grid)
        theta, hold, _, _ = _fit_grid(
            model, params, schedule, cal, planned(orders, corr),
            logits_from_grid(ts, schedule), iterations, learning_rate, loss, cond,
        )  # fmt: skip
        ts = grid_from_logits(theta, schedule, cal.t_start, cal.t_end)
        history.append((f"round {r + 1}: grid", hold))
        if hold < best[0]:
            best = (hold, orders.copy(), corr.copy(), ts)
    final, orders, corr, ts = best
    cal_nfe = cal.reference_nfe + steps * (n_forward + 2 * iterations * rounds + 2 * rounds)
    return SolverSearchResult(
        planned(orders, corr), ts, initial, final, history, cal_nfe, time.perf_counter() - t_wall
    )
