"""``jaxdiff.sample``: the convenience entry point (validates, builds the grid, jits, checks NaN)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxdiff._checks import NonFiniteError, SolverError, check_positive_int, fail, is_concrete
from jaxdiff.denoiser import Denoiser
from jaxdiff.samplers.base import Sampler, solve
from jaxdiff.samplers.classic import ddim
from jaxdiff.samplers.grids import GridSpec, resolve_grid
from jaxdiff.schedules import Schedule

__all__ = ["sample", "prior_sample"]


def prior_sample(key, schedule: Schedule, shape, dtype=None):
    """``x_T ~ N(0, prior_std^2 I)`` of ``shape = (batch, *event)``; row ``i`` depends only on
    ``(key, i)`` so samples do not change with the batch size.

    Always compiled (a jitted function, inlined when called under a trace): eager op-by-op
    dispatch rounds the normal transform differently from XLA's fused code, so without it a
    prior drawn outside ``jit`` would differ in the last bits from one drawn inside
    (``jaxdiff.parallel`` draws inside)."""
    dtype = jnp.dtype(dtype or jnp.result_type(float))
    return _prior_sample(key, schedule, tuple(int(s) for s in shape), dtype)


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _prior_sample(key, schedule, shape, dtype):
    draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), shape[1:], dtype)  # noqa: E731
    z = jax.vmap(draw)(jnp.arange(shape[0]))
    return schedule.prior_std().astype(dtype) * z


def _draw_prior(key, schedule, shape, dtype):
    draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), shape[1:], dtype)  # noqa: E731
    z = jax.vmap(draw)(jnp.arange(shape[0]))
    return schedule.prior_std().astype(dtype) * z


ENDPOINTS = ("t_end", "zero")


def _run(key, model, params, schedule, x_T, ts, sampler, cond, final_denoise, unroll=1,
         shape=None, dtype=None, grid=None, to_zero=False):  # fmt: skip
    """One whole sampling call: the prior draw (when ``x_T`` is None: ``shape``/``dtype``), the
    grid (when ``ts`` is a :class:`GridSpec` triple ``grid = (steps, kind)`` with ``ts = (t0,
    t1)``), the solve, the optional final denoising and the finiteness check -- traced as one
    program, so a new batch size or step count compiles once.

    ``to_zero`` (``endpoint="zero"``): the grid is ``grid[0]`` steps from ``t0`` to ``t1`` and
    one more step to ``schedule.t_min`` (``sigma = 0``), which every kernel takes as its
    ``h -> inf`` limit (:func:`~jaxdiff.samplers.base.zero_noise_guard`). Samplers that choose
    their own steps (``uses_grid = False``), and schedules whose sigma never reaches 0 (VE),
    take ``grid[0]`` steps to ``t1`` and return ``x0_hat(x, t1)`` (one more evaluation)."""
    k_prior, k_run = jax.random.split(key)
    if x_T is None:
        x_T = _draw_prior(k_prior, schedule, shape, jnp.dtype(dtype))
    t_min = None
    if to_zero:
        t_min = jnp.full((1,), schedule.t_min, x_T.dtype)
        if grid[0] == 0:
            ts = jnp.asarray(ts[0], x_T.dtype)[None]  # no sampler step: [t_start] (+ t_min)
            grid = None
    if grid is not None:
        ts = GridSpec(grid[0], grid[1], ts[0], ts[1]).build(schedule, x_T.dtype)
    # step onto sigma = 0 through the kernel, or (adaptive solvers; VE, whose sigma never
    # reaches 0) end with the denoiser's x0_hat
    via_kernel = sampler.uses_grid and schedule.reaches_zero_noise
    if to_zero and via_kernel:
        ts = jnp.concatenate([ts, t_min])
    x, info = solve(k_run, model, params, schedule, x_T, ts, sampler, cond, unroll=unroll)
    if final_denoise or (to_zero and not via_kernel):
        x, _ = model.x0_eps(params, x, ts[-1], cond, schedule)
        info = info._replace(nfe=info.nfe + 1)
        if to_zero:
            ts = jnp.concatenate([ts, t_min])
    return x, info, ts, jnp.all(jnp.isfinite(x))


_run_jit = jax.jit(
    _run, static_argnames=("final_denoise", "unroll", "shape", "dtype", "grid", "to_zero")
)


def sample(
    key,
    model: Denoiser,
    params,
    schedule: Schedule,
    x_T_or_shape,
    sampler: Sampler | None = None,
    steps: int | None = None,
    *,
    ts=None,
    cond=None,
    grid: str | None = None,
    t_start=None,
    t_end=None,
    endpoint: str = "t_end",
    final_denoise: bool = False,
    return_info: bool = False,
    check_finite: bool = True,
    dtype=None,
    unroll: int | bool = 1,
):
    """Draw samples by running ``sampler`` from noise at ``t_start`` down to ``t_end``.

    Args:
      key: PRNG key. Split into a key for the prior draw and one for the sampler's noise.
      model: a :class:`~jaxdiff.denoiser.Denoiser` ``(params, x, t, cond) -> prediction``.
      params: the model's parameters.
      schedule: the noise schedule the model was trained with.
      x_T_or_shape: an initial state ``(batch, *event_shape)`` or a shape tuple; with a shape,
        ``x_T`` is drawn from the schedule's prior (row ``i`` from ``fold_in(key, i)``).
      sampler: a sampler from :mod:`jaxdiff.samplers` (default ``ddim()``).
      steps: number of grid steps (builds a ``grid`` grid); or pass ``ts``.
      ts: an explicit decreasing grid ``(steps + 1,)``, overriding ``steps``/``grid``.
      cond: condition passed to the model, batched like ``x``.
      grid: ``"uniform" | "log_snr" | "quadratic" | "karras"`` (default: the sampler's).
      t_start, t_end: grid endpoints (default: the schedule's).
      endpoint: where the ``steps`` steps end. ``"t_end"`` (default): at ``t_end``, where
        ``sigma(t_end) > 0`` (e.g. 0.01 on the DDPM discrete schedule), so the sample keeps
        noise of that std and structure finer than it is blurred. ``"zero"``: the last step
        goes from ``t_end`` to ``sigma = 0`` (``schedule.t_min``): the grid is ``steps - 1``
        steps from ``t_start`` to ``t_end`` plus that step, which every sampler takes as its
        ``h -> inf`` limit ``x = alpha x0_hat(x, t_end)`` (the first-order step of DDIM /
        DPM-Solver(++) / UniPC / DEIS, EDM's final Euler step; a stochastic step to sigma = 0
        adds no noise) -- diffusers' ``final_sigmas_type="zero"``. Same NFE as ``"t_end"``
        (singlestep methods spend their stages on the last step too). Adaptive solvers, and
        VE (whose sigma never reaches 0), take ``steps - 1`` steps to ``t_end`` and then one
        evaluation for ``x0_hat``. Exact on point-mass data;
        structure below ``sigma(t_end)`` is shrunk toward its posterior mean instead of kept
        noisy (docs/few_step.md). Needs ``steps``, not ``ts`` (a ``ts`` may itself end at
        ``schedule.t_min``, where every kernel takes that limit step).
      final_denoise: return ``x0_hat(x_end, t_end)`` (one more model evaluation).
      return_info: also return a :class:`~jaxdiff.samplers.base.SampleInfo`.
      check_finite: raise :class:`~jaxdiff.NonFiniteError` if the result holds NaN/inf.
      dtype: dtype of the prior draw when a shape is given.
      unroll: ``lax.scan`` unrolling of the step loop (``True``: every step, a positive int: that
        many per iteration); same samples, different XLA program; compile time grows with it.
        Measure before relying on it (``benchmarks/speed.py`` times both).
    Returns:
      ``x_end`` shaped ``(batch, *event_shape)``, or ``(x_end, info)`` with ``return_info``.

    This function jits internally (compiled once per model/sampler structure, shape and step
    count; numbers such as ``eta``, grid values and params never recompile). Called with traced
    arguments (inside the user's ``jit``/``vmap``/``grad``) it skips jit and host-side checks.
    """
    sampler = ddim() if sampler is None else sampler
    if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
        fail("endpoint", endpoint, f"one of {ENDPOINTS}")
    to_zero = endpoint == "zero"
    if to_zero and ts is not None:
        fail(
            "ts",
            "an explicit grid",
            "steps=N with endpoint='zero' (or end ts at schedule.t_min with endpoint='t_end')",
        )
    if to_zero and final_denoise:
        fail(
            "final_denoise",
            final_denoise,
            "False with endpoint='zero' (its last step is the denoiser)",
        )
    if isinstance(unroll, bool):
        pass
    elif not isinstance(unroll, int) or unroll < 1:
        fail("unroll", unroll, "True, False or a positive int (scan steps unrolled per iteration)")
    if not isinstance(model, Denoiser):
        fail("model", model, "a jaxdiff Denoiser (see jaxdiff.models.as_denoiser)")
    if not isinstance(sampler, Sampler):
        fail("sampler", sampler, "a jaxdiff sampler, e.g. jaxdiff.samplers.ddim()")
    if not isinstance(schedule, Schedule):
        fail("schedule", schedule, "a jaxdiff schedule, e.g. jaxdiff.schedules.vp_linear()")
    if isinstance(x_T_or_shape, tuple | list):
        shape = tuple(int(s) for s in x_T_or_shape)
        model.check_x(shape, "shape")
        dtype = jnp.dtype(dtype or jnp.result_type(float))
        x_T, batch = None, shape[0]
    else:
        x_T = jnp.asarray(x_T_or_shape)
        model.check_x(x_T, "x_T")
        shape, dtype, batch = None, None, x_T.shape[0]
    t_dtype = x_T.dtype if x_T is not None else dtype
    run_steps = steps
    if to_zero:
        steps = check_positive_int("steps", steps)
        run_steps = steps - 1
        if run_steps >= 1 and run_steps < sampler.min_steps:
            fail(
                "steps",
                steps,
                f"1 or at least {sampler.min_steps + 1} for {sampler.name} with endpoint='zero' "
                f"({sampler.min_steps} sampler steps + the step to sigma = 0)",
            )
    if not sampler.uses_grid and ts is None and run_steps != 0:
        run_steps = 1  # an adaptive solve uses only the grid's ends: steps is not compiled in
    ts = resolve_grid(
        schedule, sampler.min_steps, sampler.default_grid, max(run_steps, 1) if to_zero else run_steps,
        ts, grid, t_start, t_end, dtype=t_dtype, deferred=True,
    )  # fmt: skip
    if to_zero and run_steps == 0:
        ts = ts._replace(steps=0)
    if isinstance(ts, GridSpec):
        grid_static, ts_arg = (ts.steps, ts.kind), (ts.t_start, ts.t_end)
    else:
        if not sampler.uses_grid:
            ts = ts[jnp.array([0, ts.shape[0] - 1])]
        grid_static, ts_arg = None, ts
    if cond is not None and is_concrete(cond):
        for leaf in jax.tree_util.tree_leaves(cond):
            if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch:
                fail(
                    "cond",
                    f"shape {jnp.shape(leaf)}",
                    f"a leading batch axis of size {batch}",
                )

    traced = not is_concrete(key, params, x_T, ts_arg, cond, sampler, schedule, model)
    run = _run if traced else _run_jit
    x, info, ts, finite = run(
        key, model, params, schedule, x_T, ts_arg, sampler, cond, final_denoise, unroll,
        shape=shape, dtype=None if dtype is None else dtype.name, grid=grid_static, to_zero=to_zero,
    )  # fmt: skip
    if not traced and isinstance(info.steps, dict) and "solver_ok" in info.steps:
        if not bool(info.steps["solver_ok"]):
            raise SolverError(
                f"sample: {sampler.name} did not reach t_end={float(ts[-1]):g} "
                f"(diffrax stopped after {int(jnp.max(info.steps['num_steps']))} steps); raise "
                "max_steps, loosen rtol/atol, or use fixed steps (adaptive=False)"
            )
    if check_finite and not traced:
        bad = int(info.first_nonfinite_step)
        if bad >= 0 or not bool(finite):
            where = ""
            inside_solve = isinstance(info.steps, dict) and "solver_ok" in info.steps
            if 0 <= bad < ts.shape[0] - 1 and not inside_solve:
                where = f" at step {bad} of {ts.shape[0] - 1} (t={float(ts[bad]):g} -> {float(ts[bad + 1]):g})"
            raise NonFiniteError(
                f"sample: {sampler.name} produced non-finite values{where}; check the model's "
                "output, the time range (t_start/t_end) and the dtype"
            )
    return (x, info) if return_info else x
