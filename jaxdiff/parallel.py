"""Data parallelism: meshes, sharded / ``pmap`` sampling and training steps, multi-host helpers.

Two paths run the same per-device program:

* the **mesh path** (:func:`make_mesh`, :func:`sample`): ``jax.jit`` of a ``jax.shard_map`` over a
  1-D ``Mesh``; params replicated (``P()``), the batch sharded along its leading axis
  (``P(axis)``);
* the **pmap path** (:func:`sample_pmap`, :func:`make_pmap_step`): ``jax.pmap`` for code written
  that way.

Determinism contract of sampling: example ``i`` depends only on ``(key, i)``, its index in the
*global* batch. The prior row is ``N(0, I)`` from ``fold_in(k_prior, i)`` and the sampler's noise
row at step ``s`` from ``fold_in(fold_in(k_run, s), i)`` (``(k_prior, k_run) = split(key)``),
exactly as :func:`jaxdiff.sample` draws them. Each device solves its rows in micro-batches of a
fixed ``chunk`` size (``lax.map``), so every device runs the same-shaped program whatever the
device count and batch size; XLA matmuls are not bitwise row-stable across batch shapes (measured
on XLA:CPU, see ``docs/multi_device.md``), so a fixed chunk is what makes the samples bitwise
identical on 1, 2 or 8 devices and for batch 64 or 256 (measured for an MLP and a small UNet
within one process; across processes started with different forced XLA:CPU device counts the
UNet's convolutions differ in the last bits, see the docs page).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff._checks import NonFiniteError, check_positive_int, fail, is_concrete
from jaxdiff.denoiser import Denoiser
from jaxdiff.losses import dsm_loss
from jaxdiff.samplers.base import Sampler, example_index_offset, solve
from jaxdiff.samplers.classic import ddim
from jaxdiff.samplers.grids import resolve_grid
from jaxdiff.schedules import Schedule
from jaxdiff.train import TrainState, _check_decay, apply_gradients, draw_batch

__all__ = [
    "make_mesh",
    "replicate",
    "shard_batch",
    "sample",
    "sample_pmap",
    "per_example_loss",
    "make_pmap_step",
    "replicate_state",
    "unreplicate_state",
    "initialize",
    "process_slice",
    "host_local_indices",
    "gather_samples",
]


# ------------------------------------------------------------------------------------------
# meshes and placement
# ------------------------------------------------------------------------------------------
def make_mesh(devices=None, axis_name: str = "data") -> Mesh:
    """A 1-D data-parallel ``Mesh`` with axis ``axis_name``.

    Args:
      devices: ``None`` (all of ``jax.devices()``), an int ``n`` (the first ``n`` devices) or a
        list of ``jax.Device``.
      axis_name: the mesh axis name.
    Returns:
      ``Mesh(np.array(devices), (axis_name,))``.
    """
    avail = jax.devices()
    if not isinstance(axis_name, str) or not axis_name:
        fail("axis_name", axis_name, "a non-empty string")
    if devices is None:
        devs = list(avail)
    elif isinstance(devices, int | np.integer) and not isinstance(devices, bool):
        n = check_positive_int("devices", devices)
        if n > len(avail):
            fail(
                "devices",
                n,
                f"at most {len(avail)} devices ({len(avail)} {avail[0].platform} devices "
                "available; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N "
                "before jax starts)",
            )
        devs = list(avail[:n])
    elif isinstance(devices, list | tuple | np.ndarray):
        devs = list(np.asarray(devices, dtype=object).ravel())
        if not devs or not all(isinstance(d, jax.Device) for d in devs):
            fail("devices", devices, "a non-empty list of jax.Device")
        if len(set(devs)) != len(devs):
            fail("devices", devices, "distinct devices")
        if len(devs) > len(jax.devices()):
            fail("devices", f"{len(devs)} devices", f"at most {len(avail)} devices")
    else:
        fail("devices", devices, "None, a device count or a list of jax.Device")
    return Mesh(np.array(devs, dtype=object), (axis_name,))


def _check_mesh(mesh, axis_name=None) -> str:
    if not isinstance(mesh, Mesh):
        fail("mesh", mesh, "a jax.sharding.Mesh (see jaxdiff.parallel.make_mesh)")
    axis = mesh.axis_names[0] if axis_name is None else axis_name
    if axis not in mesh.axis_names:
        fail("axis_name", axis_name, f"one of the mesh's axes {tuple(mesh.axis_names)}")
    return axis


def replicate(tree, mesh: Mesh):
    """Place every leaf of ``tree`` on all devices of ``mesh`` (``NamedSharding(mesh, P())``)."""
    _check_mesh(mesh)
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(tree, mesh: Mesh, axis_name: str = "data"):
    """Shard every leaf of ``tree`` along its leading (batch) axis over mesh axis ``axis_name``.

    Leaf shape ``(B, ...)``: device ``d`` holds rows ``d B/n .. (d+1) B/n - 1`` (``n`` devices on
    the axis); ``B`` must be divisible by ``n``.
    """
    axis = _check_mesh(mesh, axis_name)
    n = mesh.shape[axis]
    for leaf in jax.tree.leaves(tree):
        shape = np.shape(leaf)
        if len(shape) < 1:
            fail("tree", f"a leaf of shape {shape}", "leaves with a leading batch axis")
        if shape[0] % n:
            fail(
                "tree",
                f"a batch of {shape[0]}",
                f"a batch size divisible by the {n} devices on mesh axis {axis!r}",
            )
    return jax.device_put(tree, NamedSharding(mesh, P(axis)))


# ------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------
def _device_solve(
    k_prior, k_run, model, schedule, sampler, params, ts, cond, offset, *,
    n_local, chunk, event_shape, dtype, final_denoise,
):  # fmt: skip
    """One device's rows ``offset .. offset + n_local - 1``: ``lax.map`` over micro-batches of
    ``chunk`` rows; row ``i`` of the global batch uses ``fold_in(k_prior, i)`` for its prior draw
    and (via :func:`~jaxdiff.samplers.base.example_index_offset`) ``fold_in(step_key, i)`` for
    its sampler noise. Returns ``(x (n_local, *event), first_nonfinite_step per chunk)``."""
    n_chunks = n_local // chunk
    std = schedule.prior_std().astype(dtype)

    def one(args):
        j, c = args
        start = jnp.asarray(offset, jnp.int32) + j.astype(jnp.int32) * chunk
        idx = start + jnp.arange(chunk)
        z = jax.vmap(
            lambda i: jax.random.normal(jax.random.fold_in(k_prior, i), event_shape, dtype)
        )(idx)
        x_T = std * z
        with example_index_offset(start):
            x, info = solve(k_run, model, params, schedule, x_T, ts, sampler, c)
        if final_denoise:
            x, _ = model.x0_eps(params, x, ts[-1], c, schedule)
        return x, info.first_nonfinite_step

    cond_chunks = jax.tree.map(lambda a: a.reshape(n_chunks, chunk, *a.shape[1:]), cond)
    xs, bad = jax.lax.map(one, (jnp.arange(n_chunks, dtype=jnp.int32), cond_chunks))
    return xs.reshape(n_local, *event_shape), bad


@functools.lru_cache(maxsize=64)
def _mesh_program(mesh, axis, n_local, chunk, event_shape, dtype, final_denoise):
    def per_device(k_prior, k_run, model, schedule, sampler, params, ts, cond):
        offset = jax.lax.axis_index(axis) * n_local
        return _device_solve(
            k_prior, k_run, model, schedule, sampler, params, ts, cond, offset,
            n_local=n_local, chunk=chunk, event_shape=event_shape, dtype=dtype,
            final_denoise=final_denoise,
        )  # fmt: skip

    rep, row = P(), P(axis)
    f = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(rep, rep, rep, rep, rep, rep, rep, row),
        out_specs=(row, row),
        check_vma=False,
    )
    return jax.jit(f, out_shardings=(NamedSharding(mesh, row), NamedSharding(mesh, row)))


@functools.lru_cache(maxsize=64)
def _pmap_program(devices, axis, n_local, chunk, event_shape, dtype, final_denoise):
    def per_device(k_prior, k_run, model, schedule, sampler, params, ts, cond, offset):
        return _device_solve(
            k_prior, k_run, model, schedule, sampler, params, ts, cond, offset,
            n_local=n_local, chunk=chunk, event_shape=event_shape, dtype=dtype,
            final_denoise=final_denoise,
        )  # fmt: skip

    return jax.pmap(
        per_device,
        axis_name=axis,
        in_axes=(None, None, None, None, None, None, None, 0, 0),
        devices=list(devices),
    )


def _prepare(
    model, schedule, num_or_shape, sampler, steps, cond, n_dev, chunk, ts, grid, t_start,
    t_end, dtype,
):  # fmt: skip
    """Validate the sampling arguments; return ``(shape, padded, ts, cond_padded, dtype)``."""
    sampler = ddim() if sampler is None else sampler
    if not isinstance(model, Denoiser):
        fail("model", model, "a jaxdiff Denoiser (see jaxdiff.models.as_denoiser)")
    if not isinstance(sampler, Sampler):
        fail("sampler", sampler, "a jaxdiff sampler, e.g. jaxdiff.samplers.ddim()")
    if not isinstance(schedule, Schedule):
        fail("schedule", schedule, "a jaxdiff schedule, e.g. jaxdiff.schedules.vp_linear()")
    if sampler.stochastic and type(sampler).solve is not Sampler.solve:
        fail(
            "sampler",
            sampler.name,
            "a fixed-grid sampler (ddpm, sde_dpm_solver_pp, ...): samplers that own their solve "
            "(diffrax SDEs) key their noise by the local row, which breaks the global-index "
            "contract",
        )
    if isinstance(num_or_shape, int | np.integer) and not isinstance(num_or_shape, bool):
        num = check_positive_int("num_or_shape", num_or_shape)
        if model.event_shape is None:
            fail("num_or_shape", num, "a shape (batch, *event) for a model without event_shape")
        shape = (num, *model.event_shape)
    elif isinstance(num_or_shape, tuple | list):
        shape = tuple(int(s) for s in num_or_shape)
        if len(shape) < 2 or shape[0] < 1:
            fail("num_or_shape", num_or_shape, "a shape (batch >= 1, *event_shape)")
        model.check_x(shape, "num_or_shape")
    else:
        fail("num_or_shape", num_or_shape, "a number of samples or a shape (batch, *event)")
    chunk = check_positive_int("chunk", chunk)
    dtype = jnp.dtype(dtype or jnp.result_type(float))
    ts = resolve_grid(
        schedule, sampler.min_steps, sampler.default_grid, steps, ts, grid, t_start, t_end,
        dtype=dtype,
    )  # fmt: skip
    num = shape[0]
    block = n_dev * chunk
    padded = -(-num // block) * block
    if cond is not None:
        if not is_concrete(cond):
            fail("cond", "a traced value", "a concrete array (parallel.sample is not jit-able)")
        for leaf in jax.tree.leaves(cond):
            if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != num:
                fail("cond", f"shape {jnp.shape(leaf)}", f"a leading batch axis of size {num}")
        # pad by repeating the last row: padded rows are solved and dropped (rows are independent)
        cond = jax.tree.map(
            lambda a: np.concatenate(
                [np.asarray(a), np.repeat(np.asarray(a)[-1:], padded - num, 0)]
            ),
            cond,
        )
    return sampler, shape, padded, ts, cond, dtype


def _finish(x, bad, num, sampler, check_finite):
    if x.shape[0] != num:
        x = x[:num]
    if check_finite and (int(jnp.max(bad)) >= 0 or not bool(jnp.all(jnp.isfinite(x)))):
        raise NonFiniteError(
            f"parallel.sample: {sampler.name} produced non-finite values; check the model's "
            "output, the time range (t_start/t_end) and the dtype"
        )
    return x


def sample(
    key,
    model: Denoiser,
    params,
    schedule: Schedule,
    num_or_shape,
    sampler: Sampler | None = None,
    steps: int | None = None,
    *,
    cond=None,
    mesh: Mesh | None = None,
    chunk: int = 16,
    ts=None,
    grid: str | None = None,
    t_start=None,
    t_end=None,
    final_denoise: bool = False,
    check_finite: bool = True,
    dtype=None,
):
    """Data-parallel :func:`jaxdiff.sample`: the batch is sharded over ``mesh``, params replicated.

    ``jax.jit`` of a ``jax.shard_map`` over the mesh's first axis: device ``d`` of ``n`` solves
    global rows ``d m .. (d+1) m - 1`` (``m = padded / n``) as ``lax.map`` over micro-batches of
    ``chunk`` rows, with prior row ``i`` from ``fold_in(k_prior, i)`` and sampler noise row ``i``
    at step ``s`` from ``fold_in(fold_in(k_run, s), i)`` where ``(k_prior, k_run) = split(key)``
    and ``i`` is the *global* index. So example ``i`` depends only on ``(key, i)`` and ``chunk``:
    the same key gives bitwise-identical rows for any batch size and device count, on this
    path and :func:`sample_pmap` alike (measured on XLA:CPU for an MLP and a UNet; see
    ``docs/multi_device.md`` for the one exception: processes configured with different forced
    device counts). With one device and ``chunk`` equal to the batch it matches
    :func:`jaxdiff.sample` bitwise (measured; see ``docs/multi_device.md``).

    The batch is padded up to a multiple of ``n * chunk`` (cond rows by repeating the last row),
    solved, and trimmed: padding changes no real row (rows are independent).

    Args:
      key: PRNG key.
      model, params, schedule: as for :func:`jaxdiff.sample`.
      num_or_shape: the number of samples (needs ``model.event_shape``) or a shape
        ``(batch, *event)``.
      sampler: a fixed-grid sampler (default ``ddim()``); stochastic ones must draw their noise
        with :func:`~jaxdiff.samplers.base.per_example_normal` (all of jaxdiff's do; diffrax SDEs
        are rejected).
      steps, ts, grid, t_start, t_end, final_denoise, dtype: as for :func:`jaxdiff.sample`.
      cond: condition batched like the samples (leading axis ``batch``), or None.
      mesh: a 1-D mesh (default: :func:`make_mesh` over all devices); its first axis is used.
      chunk: rows per micro-batch (the shape every device computes with). Bigger is faster on
        accelerators; samples are bitwise reproducible for a fixed ``chunk``.
      check_finite: raise :class:`~jaxdiff.NonFiniteError` on NaN/inf.
    Returns:
      ``x`` of shape ``(batch, *event)``, a ``jax.Array`` sharded over the mesh (trimmed if the
      batch was padded).
    """
    mesh = make_mesh() if mesh is None else mesh
    axis = _check_mesh(mesh)
    n_dev = mesh.shape[axis]
    sampler, shape, padded, ts, cond, dtype = _prepare(
        model, schedule, num_or_shape, sampler, steps, cond, n_dev, chunk, ts, grid, t_start,
        t_end, dtype,
    )  # fmt: skip
    prog = _mesh_program(
        mesh, axis, padded // n_dev, chunk, tuple(shape[1:]), dtype, bool(final_denoise)
    )
    k_prior, k_run = jax.random.split(key)
    rep = NamedSharding(mesh, P())
    args = jax.device_put((k_prior, k_run, model, schedule, sampler, params, ts), rep)
    cond = None if cond is None else jax.device_put(cond, NamedSharding(mesh, P(axis)))
    x, bad = prog(*args, cond)
    return _finish(x, bad, shape[0], sampler, check_finite)


def sample_pmap(
    key,
    model: Denoiser,
    params,
    schedule: Schedule,
    num_or_shape,
    sampler: Sampler | None = None,
    steps: int | None = None,
    *,
    cond=None,
    devices=None,
    chunk: int = 16,
    axis_name: str = "data",
    ts=None,
    grid: str | None = None,
    t_start=None,
    t_end=None,
    final_denoise: bool = False,
    check_finite: bool = True,
    dtype=None,
):
    """:func:`sample` through ``jax.pmap`` (for code built around ``pmap``); same samples, bitwise.

    Device ``d`` (mapped argument ``offsets[d] = d m``) solves global rows ``d m .. (d+1) m - 1``; the global index
    offset ``d m`` reaches the prior draw and the sampler's noise
    (:func:`~jaxdiff.samplers.base.example_index_offset`), so a local ``arange`` never keys the
    noise. Args as :func:`sample`, with ``devices`` (None, a count or a list, as
    :func:`make_mesh`) in place of ``mesh``. Returns ``x`` of shape ``(batch, *event)``.
    """
    devs = tuple(make_mesh(devices, axis_name).devices.ravel())
    n_dev = len(devs)
    sampler, shape, padded, ts, cond, dtype = _prepare(
        model, schedule, num_or_shape, sampler, steps, cond, n_dev, chunk, ts, grid, t_start,
        t_end, dtype,
    )  # fmt: skip
    n_local = padded // n_dev
    prog = _pmap_program(
        devs, axis_name, n_local, chunk, tuple(shape[1:]), dtype, bool(final_denoise)
    )
    k_prior, k_run = jax.random.split(key)
    cond = jax.tree.map(lambda a: a.reshape(n_dev, n_local, *a.shape[1:]), cond)
    offsets = np.arange(n_dev, dtype=np.int32) * n_local  # global index of each device's row 0
    x, bad = prog(k_prior, k_run, model, schedule, sampler, params, ts, cond, offsets)
    return _finish(x.reshape(padded, *shape[1:]), bad, shape[0], sampler, check_finite)


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------
def per_example_loss(loss_fn: Callable = dsm_loss) -> Callable:
    """Wrap a batch-mean loss so example ``i`` draws its randomness from ``fold_in(key, i)``.

    ``L(params, key, model, schedule, x0, cond, *, index_offset=0, **kw) =
    mean_i loss_fn(params, fold_in(key, index_offset + i), model, schedule, x0[i:i+1],
    cond[i:i+1], **kw)`` (``vmap`` over rows). For a loss that is a batch mean of per-example
    terms (``dsm_loss``, the Monte Carlo estimate of Vincent 2011 / Ho et al. arXiv 2006.11239)
    this is the same estimator, with randomness that no longer depends on how the batch is split:
    a row's ``t`` and noise are the same on 1 or 8 devices. Pass it as ``loss_fn=`` to both
    :func:`jaxdiff.train.make_step` and :func:`make_pmap_step` to compare them.
    """
    if not callable(loss_fn):
        fail("loss_fn", loss_fn, "a loss function loss_fn(params, key, model, schedule, x0, cond)")

    def loss(params, key, model, schedule, x0, cond=None, *, index_offset=0, **kw):
        idx = jnp.arange(x0.shape[0]) + jnp.asarray(index_offset, jnp.int32)

        def one(i, x, c):
            x1 = x[None]
            c1 = None if c is None else jax.tree.map(lambda a: a[None], c)
            return loss_fn(params, jax.random.fold_in(key, i), model, schedule, x1, c1, **kw)

        if cond is None:
            return jnp.mean(jax.vmap(lambda i, x: one(i, x, None))(idx, x0))
        return jnp.mean(jax.vmap(one)(idx, x0, cond))

    loss.jaxdiff_index_offset = True  # make_pmap_step passes index_offset to it
    loss.__wrapped__ = loss_fn
    return loss


def make_pmap_step(
    model: Denoiser,
    schedule: Schedule,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    axis_name: str = "batch",
    *,
    ema_decay=0.999,
    ema_warmup: bool = True,
    loss_fn: Callable | None = None,
    **loss_kwargs,
) -> Callable:
    """A ``pmap``-able train step ``step(state, key, data) -> (state, metrics)``, the data-parallel
    twin of :func:`jaxdiff.train.make_step`.

    Per call on each of ``n`` devices (``d = lax.axis_index(axis_name)``, ``m = batch_size / n``):
    ``k_data, k_loss = split(fold_in(key, state.step))``; the *global* batch
    ``(x, cond) = draw_batch(k_data, data, batch_size)`` (the same on every device: ``data`` is
    the whole dataset, broadcast); device ``d`` takes rows ``d m .. (d+1) m - 1``; ``loss_d,
    g_d = value_and_grad(loss_fn)(params, k_loss, ..., x_d, cond_d, index_offset=d m)``;
    ``g = pmean(g_d)`` (``lax.pmean``, Goyal et al. arXiv 1706.02677: synchronous data-parallel
    SGD), then the optax update and the EMA exactly as ``make_step``. Every device ends with the
    same state.

    ``loss_fn`` defaults to ``per_example_loss(dsm_loss)``, whose randomness is keyed by the
    global row index, so the step matches ``make_step(..., loss_fn=per_example_loss(dsm_loss))``
    on one device within float tolerance (reduction order differs). A ``loss_fn`` without an
    ``index_offset`` keyword gets ``fold_in(k_loss, d)`` per device instead (same distribution,
    different draws than one device).

    Use: ``p_step = jax.pmap(step, axis_name=axis_name, in_axes=(0, None, None))`` with a state
    from :func:`replicate_state`; metrics (``loss``, ``grad_norm``) come back per device, equal.

    Args:
      model, schedule, optimizer, ema_decay, ema_warmup, loss_kwargs: as
        :func:`jaxdiff.train.make_step`.
      batch_size: the *global* batch size (divisible by the device count).
      axis_name: the pmap axis name.
      loss_fn: the loss (see above).
    """
    batch_size = check_positive_int("batch_size", batch_size)
    _check_decay(ema_decay)
    if not isinstance(axis_name, str) or not axis_name:
        fail("axis_name", axis_name, "a non-empty string")
    indexed = loss_fn is None or getattr(loss_fn, "jaxdiff_index_offset", False)
    loss_fn = per_example_loss(dsm_loss) if loss_fn is None else loss_fn

    def step(state: TrainState, key, data):
        n = jax.lax.axis_size(axis_name)
        if batch_size % n:
            fail("batch_size", batch_size, f"a global batch divisible by the {n} devices")
        m = batch_size // n
        d = jax.lax.axis_index(axis_name)
        k_data, k_loss = jax.random.split(jax.random.fold_in(key, state.step))
        x, cond = draw_batch(k_data, data, batch_size)
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, d * m, m, axis=0)  # noqa: E731
        x_d = take(x)
        cond_d = None if cond is None else jax.tree.map(take, cond)
        if indexed:
            kw = dict(loss_kwargs, index_offset=d * m)
            k = k_loss
        else:
            kw, k = loss_kwargs, jax.random.fold_in(k_loss, d)
        loss, grads = jax.value_and_grad(loss_fn)(
            state.params, k, model, schedule, x_d, cond_d, **kw
        )
        grads = jax.lax.pmean(grads, axis_name)
        loss = jax.lax.pmean(loss, axis_name)
        new = apply_gradients(state, grads, optimizer, ema_decay, ema_warmup)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


def replicate_state(state, devices=None):
    """Stack ``state`` (any pytree, e.g. a :class:`~jaxdiff.train.TrainState`) onto ``devices``
    (None: all local devices; a count or a list as :func:`make_mesh`) for ``pmap``: every leaf
    gains a leading device axis."""
    mesh = make_mesh(devices, "replica")
    n = mesh.shape["replica"]
    stack = lambda a: jnp.broadcast_to(jnp.asarray(a), (n, *jnp.shape(a)))  # noqa: E731
    return jax.device_put(jax.tree.map(stack, state), NamedSharding(mesh, P("replica")))


def unreplicate_state(state):
    """Inverse of :func:`replicate_state`: device 0's copy (leaf ``[0]``)."""
    return jax.tree.map(lambda a: a[0], state)


# ------------------------------------------------------------------------------------------
# multi-host
# ------------------------------------------------------------------------------------------
_POD_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "OMPI_MCA_orte_hnp_uri")


def _launched_on_pod() -> bool:
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env or "OMPI_MCA_orte_hnp_uri" in env:
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):  # multi-worker TPU slice
        return True
    return "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kw,
) -> bool:
    """Call ``jax.distributed.initialize`` when launched as one process of a multi-host job.

    It runs when any argument is given, or the environment shows a multi-process launch
    (``JAX_COORDINATOR_ADDRESS``; Open MPI's ``OMPI_MCA_orte_hnp_uri``; a multi-worker TPU's
    ``TPU_WORKER_HOSTNAMES``; SLURM with ``SLURM_NTASKS > 1``), where JAX's cluster detection
    fills in what is missing. Otherwise, or when already initialised, it does nothing. Call it
    first, before any other JAX call; then :func:`make_mesh` spans every host's devices.

    Returns:
      True if this call initialised ``jax.distributed``.
    """
    given = coordinator_address is not None or num_processes is not None or process_id is not None
    if jax.distributed.is_initialized():
        return False
    if not (given or kw or _launched_on_pod()):
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **kw,
    )
    return True


def process_slice(global_batch: int, process_index: int | None = None, process_count=None):
    """Rows of a global batch this process owns: ``slice(p b, (p+1) b)`` with ``b = B / P``.

    With a mesh from :func:`make_mesh` (devices ordered by process) these are the rows held by
    this host's devices. ``process_index`` / ``process_count`` default to JAX's.
    """
    global_batch = check_positive_int("global_batch", global_batch)
    count = jax.process_count() if process_count is None else process_count
    count = check_positive_int("process_count", count)
    pid = jax.process_index() if process_index is None else process_index
    if isinstance(pid, bool) or not isinstance(pid, int | np.integer) or not 0 <= pid < count:
        fail("process_index", pid, f"an integer in [0, {count})")
    if global_batch % count:
        fail("global_batch", global_batch, f"a batch divisible by the {count} processes")
    b = global_batch // count
    return slice(int(pid) * b, (int(pid) + 1) * b)


def host_local_indices(global_batch: int, process_index=None, process_count=None) -> np.ndarray:
    """Global example indices of this process's rows (``np.arange(B)[process_slice(B)]``): draw
    host-local data or noise from ``fold_in(key, i)`` for these ``i``."""
    return np.arange(global_batch)[process_slice(global_batch, process_index, process_count)]


def gather_samples(x) -> np.ndarray:
    """A host numpy copy of a (possibly multi-host) sharded array: ``np.asarray`` on one process,
    ``multihost_utils.process_allgather(x, tiled=True)`` across processes (every host gets all
    rows)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
