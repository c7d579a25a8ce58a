r"""Exact log-likelihood of a diffusion model through the probability-flow ODE.

For the PF-ODE ``dx/dt = f~(x, t) = f(t) x - g(t)^2/2 score(x, t) = f(t) x + g(t)^2/(2 sigma(t))
eps_hat(x, t)`` (samplers.md 0 and 8; Song et al. arXiv 2011.13456, app. D), the instantaneous
change of variables (Chen et al., Neural ODEs, arXiv 1806.07366, thm. 1) gives the augmented ODE

.. math::

    \frac{dx}{dt} = \tilde f(x, t), \qquad \frac{d\ell}{dt} = \nabla\cdot\tilde f(x, t),
    \qquad x(t_{end}) = x,\ \ell(t_{end}) = 0,

integrated FORWARD in time from ``t_end`` (data side) to ``t_start`` (noise side), and

.. math::  \log p_{t_{end}}(x) = \log p_{t_{start}}(x(t_{start})) + \ell(t_{start}).

The divergence is either the exact trace of the per-example Jacobian (``jax.jacfwd``; the
default up to ``D = EXACT_TRACE_MAX_DIM``) or the Hutchinson-Skilling estimator
``v^T (d f~/dx) v`` (Grathwohl et al., FFJORD, arXiv 1810.01367) with forward-mode ``jax.jvp``
and probes ``v`` drawn once per solve and held fixed over time (unbiased for Rademacher or
standard Gaussian probes). Each probe's log-determinant is integrated separately, so the
estimator's standard error over the probes is returned with the estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._checks import (
    SolverError,
    as_float_array,
    check_positive_int,
    fail,
    is_concrete,
)
from jaxdiff.denoiser import Denoiser
from jaxdiff.samplers.diffrax_bridge import pf_ode_vector_field
from jaxdiff.schedules import Schedule

__all__ = ["log_likelihood", "TRACES", "PROBES", "EXACT_TRACE_MAX_DIM", "DEFAULT_NUM_PROBES"]

#: Divergence estimators accepted by :func:`log_likelihood`.
TRACES = ("auto", "hutchinson", "exact")
#: ``trace="auto"`` uses the exact trace up to this data dimension. Measured
#: (``benchmarks/defaults.py --only likelihood``): the exact trace's error is the ODE solver's
#: (2e-4 nats at D = 2, 2e-2 at D = 64 with rtol = atol = 1e-5) while 16 Hutchinson probes are
#: off by 0.2-1.8 nats on average; on an MLP score net the exact trace costs about as much as
#: 16 probes at D = 16 and 3x at D = 64, 17x at D = 256.
EXACT_TRACE_MAX_DIM = 64
#: Hutchinson probes per example when ``num_probes`` is not given.
DEFAULT_NUM_PROBES = 16
#: Hutchinson probe distributions accepted by :func:`log_likelihood`.
PROBES = ("rademacher", "gaussian")

_LOG_2PI = math.log(2.0 * math.pi)


def _one_example_field(model, params, schedule, cond_i, event_shape):
    """``z (D,) , t -> f~(z, t) (D,)`` for one example (the model sees a batch of one)."""
    c1 = jax.tree.map(lambda a: a[None], cond_i)

    def f(z, t):
        x1 = z.reshape((1, *event_shape))
        return pf_ode_vector_field(model, params, schedule, x1, t, c1).reshape(-1)

    return f


def _augmented_field(t, y, args):
    """Vector field of the augmented state ``(z (D,), ell (K,))`` of ONE example (``K`` probes;
    ``K = 1`` for the exact trace).

    Module-level (a stable Python object) so that diffrax's internal compilation cache is hit
    by repeated eager calls; everything else travels in ``args``.
    """
    model, params, schedule, cond_i, probes, event_shape, trace = args
    z, _ = y
    f = _one_example_field(model, params, schedule, cond_i, event_shape)
    if trace == "exact":
        # d f~/dz as a (D, D) matrix by forward mode; the primal comes back as aux (one pass).
        jac, fz = jax.jacfwd(lambda u: (lambda o: (o, o))(f(u, t)), has_aux=True)(z)
        div = jnp.trace(jac)[None]
    else:
        # one linearization, then a Jacobian-vector product per probe: v_k^T (d f~/dz) v_k,
        # one log-determinant per probe (their spread is the estimator's standard error).
        fz, jvp_fn = jax.linearize(lambda u: f(u, t), z)
        jv = jax.vmap(jvp_fn)(probes)  # (num_probes, D)
        div = jnp.sum(jv * probes, axis=-1)
    return fz, div.astype(z.dtype)


def _draw_probes(key, i, num_probes: int, dim: int, probe: str, dtype):
    """Probes of example ``i`` from ``fold_in(key, i)``: independent of the batch size."""
    k = jax.random.fold_in(key, i)
    if probe == "rademacher":
        return jax.random.rademacher(k, (num_probes, dim), dtype=dtype)
    return jax.random.normal(k, (num_probes, dim), dtype=dtype)


def _default_prior(schedule: Schedule, z):
    """``log N(z; 0, prior_std^2 I)`` summed over the event dims, shape (batch,)."""
    s = jnp.asarray(schedule.prior_std(), z.dtype)
    d = int(np.prod(z.shape[1:]))
    zz = z.reshape(z.shape[0], -1)
    return -0.5 * jnp.sum(zz**2, axis=-1) / s**2 - d * jnp.log(s) - 0.5 * d * _LOG_2PI


def _check_times(schedule: Schedule, t_start, t_end):
    schedule.check_t(t_start, "t_start")
    schedule.check_t(t_end, "t_end")
    for name, t in (("t_start", t_start), ("t_end", t_end)):
        if jnp.ndim(t) != 0:
            fail(name, f"shape {jnp.shape(t)}", "a scalar time")
    if is_concrete(t_start, t_end):
        ts, te = float(np.asarray(t_start)), float(np.asarray(t_end))
        if not te < ts:
            fail("t_end", te, f"a time below t_start = {ts:g} (the data side of the ODE)")
        if not float(np.asarray(schedule.sigma(t_end))) > 0.0:
            fail("t_end", te, "a time with sigma(t_end) > 0 (the PF-ODE is singular at sigma=0)")


def log_likelihood(
    key,
    model: Denoiser,
    params,
    schedule: Schedule,
    x,
    cond=None,
    *,
    t_start=None,
    t_end=None,
    solver=None,
    rtol=1e-5,
    atol=1e-5,
    trace: str = "auto",
    probe: str = "rademacher",
    num_probes: int | None = None,
    max_steps: int = 4096,
    prior: str | Callable[[jax.Array], jax.Array] = "default",
    adjoint=None,
    return_info: bool = False,
):
    r"""Per-example log-likelihood ``log p_{t_end}(x)`` (nats) by the probability-flow ODE.

    Solves, for every example separately (``vmap`` over the batch, so step sizes, probes and
    results do not depend on the batch), the augmented ODE forward in time from ``t_end`` to
    ``t_start``::

        dx/dt = f~(x, t) = f(t) x + g(t)^2 / (2 sigma(t)) * eps_hat(x, t)     (PF-ODE)
        dl/dt = div f~(x, t),          x(t_end) = x,  l(t_end) = 0
        log p_{t_end}(x) = log p_T(x(t_start)) + l(t_start)

    (Song et al. arXiv 2011.13456 app. D; Chen et al. arXiv 1806.07366; Grathwohl et al.
    FFJORD arXiv 1810.01367; samplers.md 8). Convert to bits/dim with
    :func:`jaxdiff.metrics.bits_per_dim`.

    Args:
      key: PRNG key for the Hutchinson probes (unused with ``trace="exact"``). Example ``i``
        uses ``fold_in(key, i)``, so its value does not change with the batch size.
      model: a :class:`~jaxdiff.denoiser.Denoiser`; it is called on batches of one example.
      params: the model's parameters (differentiable: ``jax.grad`` works through the solve).
      schedule: the model's noise schedule.
      x: data ``(batch, *event_shape)``, ``D = prod(event_shape)``; the solve runs in
        ``x.dtype`` (use float64 for tight tolerances).
      cond: model condition with a leading batch axis on every leaf, or ``None``.
      t_start, t_end: noise and data ends (default ``schedule.t_start`` / ``schedule.t_end``);
        ``t_end < t_start`` and ``sigma(t_end) > 0``.
      solver: a diffrax solver with an error estimate (default ``diffrax.Tsit5()``); steps are
        chosen by ``diffrax.PIDController(rtol, atol)`` (clipped onto ``schedule.kinks()``).
      rtol, atol: tolerances of the step-size controller (on the state ``(x, l)``).
      trace: ``"auto"`` (default: ``"exact"`` when ``D <= EXACT_TRACE_MAX_DIM = 64``, else
        ``"hutchinson"``), ``"hutchinson"`` (``v^T (df~/dx) v`` by ``jax.jvp``, one model
        pass per probe) or ``"exact"`` (trace of the ``D x D`` Jacobian by ``jax.jacfwd``, D
        passes; exact up to the solver's tolerance).
      probe: ``"rademacher"`` (entries +-1) or ``"gaussian"`` (N(0, 1)): drawn once per solve
        and fixed over time.
      num_probes: Hutchinson probes per example (default ``DEFAULT_NUM_PROBES = 16``; unused
        by the exact trace); the estimate is their mean, its standard error ``std / sqrt(num_probes)`` is
        ``info["stderr"]`` (needs ``num_probes >= 2``).
      max_steps: diffrax's step cap; examples that hit it get ``NaN`` (eagerly a
        :class:`~jaxdiff.SolverError` is raised).
      prior: ``"default"``: ``log N(z; 0, prior_std^2 I)`` with ``schedule.prior_std()`` (for
        VP at ``t_start = 1`` the true marginal is only close to it: ``alpha(1) ~ 0.0066`` for
        ``vp_linear``); or a callable ``prior(z) -> log p (batch,)`` with ``z`` of shape
        ``(batch, *event_shape)`` (e.g. the exact ``p_T`` of an analytic distribution).
      adjoint: diffrax adjoint (default ``RecursiveCheckpointAdjoint()``, so ``jax.grad``
        w.r.t. ``params`` and ``x`` works).
      return_info: also return a dict of per-example arrays ``(batch,)``: ``num_steps``,
        ``prior`` (``log p_T(z)``), ``delta_logdet`` (``l(t_start)``), ``stderr`` (standard
        error of the trace estimator over the probes; 0 for the exact trace, which leaves only
        the solver's error), ``solver_ok``, and ``z`` ``(batch, *event_shape)`` (the latent
        ``x(t_start)``); plus ``trace`` and ``num_probes``, the estimator used.

    Returns:
      ``log p (batch,)``, or ``(log p, info)`` with ``return_info``.

    Does not jit internally: wrap it in ``jax.jit`` (string options are then static, e.g.
    through ``functools.partial``). Host-side checks of concrete values are skipped on tracers.
    """
    if trace not in TRACES:
        fail("trace", trace, f"one of {TRACES}")
    if probe not in PROBES:
        fail("probe", probe, f"one of {PROBES}")
    if num_probes is not None:
        num_probes = check_positive_int("num_probes", num_probes)
    max_steps = check_positive_int("max_steps", max_steps)
    if not isinstance(model, Denoiser):
        fail("model", type(model).__name__, "a jaxdiff Denoiser")
    if not isinstance(schedule, Schedule):
        fail("schedule", type(schedule).__name__, "a jaxdiff Schedule")
    solver = diffrax.Tsit5() if solver is None else solver
    if not isinstance(solver, diffrax.AbstractSolver):
        fail("solver", solver, "a diffrax solver instance with an error estimate, e.g. Tsit5()")
    if not (prior == "default" if isinstance(prior, str) else callable(prior)):
        fail("prior", prior, '"default" or a callable prior(z) -> log p of shape (batch,)')
    adjoint = diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint

    x = as_float_array(x)
    model.check_x(x)
    if x.ndim < 2 or x.shape[0] < 1:
        fail("x", f"shape {tuple(x.shape)}", "shape (batch, *event_shape) with batch >= 1")
    batch, event_shape = x.shape[0], tuple(x.shape[1:])
    dim = int(np.prod(event_shape))
    dtype = x.dtype
    if trace == "auto":
        trace = "exact" if dim <= EXACT_TRACE_MAX_DIM else "hutchinson"
    if trace == "exact":
        num_probes = 1  # unused
    elif num_probes is None:
        num_probes = DEFAULT_NUM_PROBES
    if cond is not None:
        for leaf in jax.tree_util.tree_leaves(cond):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != batch:
                fail("cond", f"a leaf of shape {jnp.shape(leaf)}", f"leading batch axis {batch}")

    t_start = schedule.t_start if t_start is None else t_start
    t_end = schedule.t_end if t_end is None else t_end
    t_start, t_end = as_float_array(t_start), as_float_array(t_end)
    _check_times(schedule, t_start, t_end)
    t0, t1 = t_end.astype(dtype), t_start.astype(dtype)

    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    kinks = schedule.kinks()
    if kinks is not None:
        # the PF drift is not smooth there (e.g. vp_discrete's knots): step onto them
        controller = diffrax.ClipStepSizeController(controller, jump_ts=kinks)

    if trace == "hutchinson":
        idx = jnp.arange(batch)
        probes = jax.vmap(lambda i: _draw_probes(key, i, num_probes, dim, probe, dtype))(idx)
    else:
        probes = jnp.zeros((batch, 0, dim), dtype)  # unused

    n_ell = 1 if trace == "exact" else num_probes

    def one(z0, cond_i, probes_i):
        y0 = (z0, jnp.zeros((n_ell,), dtype))
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_augmented_field),
            solver,
            t0=t0,
            t1=t1,
            dt0=None,
            y0=y0,
            args=(model, params, schedule, cond_i, probes_i, event_shape, trace),
            stepsize_controller=controller,
            max_steps=max_steps,
            adjoint=adjoint,
            throw=False,
        )
        z, ell = sol.ys
        ok = sol.result == diffrax.RESULTS.successful
        return z[-1], ell[-1], sol.stats["num_steps"], ok

    z, ells, nsteps, ok = jax.vmap(one)(x.reshape(batch, dim), cond, probes)
    z = z.reshape(x.shape)
    delta = jnp.mean(ells, axis=-1)
    if n_ell > 1:
        stderr = jnp.std(ells, axis=-1, ddof=1) / np.sqrt(n_ell)
    else:
        stderr = jnp.zeros_like(delta) if trace == "exact" else jnp.full_like(delta, jnp.nan)
    log_pt = _default_prior(schedule, z) if isinstance(prior, str) else jnp.asarray(prior(z))
    if log_pt.shape != (batch,):
        fail("prior", prior, f"a callable returning shape ({batch},), got {log_pt.shape}")
    logp = jnp.where(ok, log_pt.astype(dtype) + delta, jnp.nan)

    if is_concrete(ok) and not bool(np.all(np.asarray(ok))):
        n_bad = int(np.sum(~np.asarray(ok)))
        raise SolverError(
            f"log_likelihood: the ODE solve failed for {n_bad} of {batch} example(s) "
            f"(max_steps={max_steps} reached or step size collapsed); raise max_steps or "
            "loosen rtol/atol"
        )
    if not return_info:
        return logp
    info = {
        "num_steps": nsteps,
        "prior": log_pt,
        "delta_logdet": delta,
        "stderr": jnp.where(ok, stderr, jnp.nan),
        "solver_ok": ok,
        "z": z,
        "trace": trace,
        "num_probes": n_ell if trace == "hutchinson" else 0,
    }
    return logp, info
