"""jaxdiff.parallel: meshes, sharded / pmap sampling (bitwise across device counts), pmap train
step vs make_step, multi-host helpers, bad inputs.

Multi-device runs need ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before jax starts,
so they run ``tests/_parallel_worker.py`` in subprocesses (one per device count, concurrently)
and compare the saved arrays here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxdiff import parallel, samplers, schedules
from jaxdiff._checks import JaxdiffError
from jaxdiff.models import MLPScoreNet, as_denoiser

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_parallel_worker.py")
ROOT = os.path.dirname(os.path.dirname(WORKER))


def _run_workers(counts, out_dir, slow=False, timeout=900):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = {
        n: subprocess.Popen(
            [sys.executable, WORKER, "--devices", str(n), "--out", str(out_dir)]
            + (["--slow"] if slow else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for n in counts
    }
    infos, arrays = {}, {}
    for n, p in procs.items():
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"worker with {n} devices failed:\n{err[-4000:]}"
        infos[n] = json.loads(out.strip().splitlines()[-1])
        arrays[n] = dict(np.load(os.path.join(out_dir, f"dev{n}.npz")))
    return infos, arrays


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _run_workers((1, 8), tmp_path_factory.mktemp("parallel"))


# ------------------------------------------------------------------------------------------
# multi-device (subprocesses)
# ------------------------------------------------------------------------------------------
def test_samples_bitwise_across_devices_batch_sizes_and_paths(runs):
    """Stochastic sampler (sde_dpm_solver_pp): batch 64 and the first 64 rows of batch 256, mesh
    and pmap paths, 1 and 8 devices: all bitwise equal."""
    _, arr = runs
    ref = arr[1]["mesh_sde_dpm_solver_pp_64"]
    assert ref.shape == (64, 2) and np.all(np.isfinite(ref))
    # not a degenerate output: rows differ, and rows 64.. of the big batch are new examples
    assert np.unique(ref[:, 0]).size == 64
    assert not np.allclose(arr[1]["mesh_sde_dpm_solver_pp_256"][64:128], ref)
    for n in (1, 8):
        a = arr[n]
        assert np.array_equal(a["mesh_sde_dpm_solver_pp_64"], ref), n
        assert np.array_equal(a["mesh_sde_dpm_solver_pp_256"][:64], ref), n
        assert np.array_equal(a["pmap_sde_dpm_solver_pp_64"], ref), n
    assert np.array_equal(
        arr[8]["mesh_sde_dpm_solver_pp_256"], arr[1]["mesh_sde_dpm_solver_pp_256"]
    )


def test_pmap_step_matches_make_step(runs):
    """make_pmap_step on 8 devices (global batch 64, pmean of grads) vs jaxdiff.train.make_step on
    one device with the same per-example loss: same loss trajectory and params within 1e-5
    (measured: 2.4e-7 loss, 1.2e-7 params; not bitwise, reduction order differs)."""
    info, arr = runs
    r = arr[1]
    assert np.all(np.diff(r["step_losses"]) != 0)  # the steps did something
    for n in (1, 8):
        assert info[n]["pmap_loss_device_spread"] == 0.0  # every device holds the pmean'd loss
        np.testing.assert_allclose(arr[n]["pmap_losses"], r["step_losses"], rtol=1e-5, atol=0)
        np.testing.assert_allclose(arr[n]["pmap_params"], r["step_params"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(arr[n]["pmap_ema"], r["step_ema"], rtol=0, atol=1e-5)
    # the bound is meaningful: 3 Adam steps (lr 1e-2) move params by ~3e-2
    params0 = np.asarray(ravel_pytree(_mlp()[1])[0])
    assert np.abs(r["step_params"] - params0).max() > 1e-2


def test_multi_device_bad_inputs(runs):
    info, _ = runs
    e8, e1 = info[8]["errors"], info[1]["errors"]
    assert "a batch of 9" in e8["shard_batch"] and "8 devices" in e8["shard_batch"]
    assert "batch_size=33" in e8["pmap_batch"] and "8 devices" in e8["pmap_batch"]
    assert "devices=9" in e8["make_mesh"] and "at most 8 devices" in e8["make_mesh"]
    assert "devices=2" in e1["make_mesh"] and "at most 1 devices" in e1["make_mesh"]


@pytest.mark.slow
def test_full_determinism_matrix_and_training_mesh(tmp_path):
    """Devices 1/2/8 x samplers ddim, dpm_solver_pp, ddpm, sde_dpm_solver_pp x batch 64/256 x
    mesh/pmap: bitwise; padding (20 rows) = first 20 rows; one device with chunk = batch equals
    jaxdiff.sample bitwise; tiny UNet bitwise across batch sizes, on 1 vs 2 devices and on 1/2/8-device
    meshes inside the 8-device process (8-device process vs 1-device process: within
    1e-4 of its scale); train(mesh=) on 2 and 8 devices
    gives the one-device loss trajectory within 1e-5 (measured <= 1.2e-7)."""
    info, arr = _run_workers((1, 2, 8), tmp_path, slow=True, timeout=1800)
    r = arr[1]
    names = ("ddim", "dpm_solver_pp", "ddpm", "sde_dpm_solver_pp")
    for n in (1, 2, 8):
        for s in names:
            ref = r[f"mesh_{s}_64"]
            for key in (f"mesh_{s}_64", f"pmap_{s}_64"):
                assert np.array_equal(arr[n][key], ref), (n, key)
            for key in (f"mesh_{s}_256", f"pmap_{s}_256"):
                assert np.array_equal(arr[n][key][:64], ref), (n, key)
        assert np.array_equal(arr[n]["mesh_ddim_20"], r["mesh_ddim_64"][:20])
        # UNet: bitwise across batch sizes on every count, and across 1/2/8-device meshes
        # within one process. Across processes started with different forced host-device
        # counts (XLA_FLAGS) the convolutions differ in the last bits (<= 1e-4 of the scale):
        # the process's XLA:CPU configuration, not the mesh, changes them (a 1-device mesh in
        # the 8-device process equals the 8-device mesh, not the 1-device process)
        assert np.array_equal(arr[n]["unet_mesh_32"][:16], arr[n]["unet_mesh_16"])
        if n < 8:
            assert np.array_equal(arr[n]["unet_mesh_32"], r["unet_mesh_32"])
        else:
            for m in (1, 2):
                assert np.array_equal(arr[8][f"unet_mesh{m}_32"], arr[8]["unet_mesh_32"]), m
            scale = np.abs(r["unet_mesh_32"]).max()
            np.testing.assert_allclose(arr[n]["unet_mesh_32"], r["unet_mesh_32"], atol=1e-4 * scale)
        np.testing.assert_allclose(arr[n]["train_mesh_loss"], r["train_mesh_loss"], rtol=1e-5)
    assert np.unique(r["unet_mesh_32"].reshape(32, -1), axis=0).shape[0] == 32
    for s in names:
        assert np.array_equal(r[f"whole_{s}_64"], r[f"ref_{s}_64"]), s
    assert np.all(np.diff(r["train_mesh_loss"]) != 0)
    print(json.dumps(info[1].get("row_stable_vs_256")))


# ------------------------------------------------------------------------------------------
# in-process (one device)
# ------------------------------------------------------------------------------------------
def _mlp():
    net = MLPScoreNet(hidden=16, depth=1, num_classes=3, zero_init_out=False)
    return as_denoiser(
        net,
        jax.random.key(0),
        jnp.zeros((1, 2)),
        cond_example=jnp.zeros((1,), jnp.int32),
        parametrization="eps",
    )


def test_mesh_helpers_one_device():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
    mesh1 = parallel.make_mesh([jax.devices()[0]], axis_name="x")
    assert mesh1.axis_names == ("x",)
    tree = {"a": np.arange(6.0).reshape(3, 2), "b": np.arange(3)}
    sharded = parallel.shard_batch(tree, mesh)
    assert np.array_equal(sharded["a"], tree["a"]) and sharded["a"].sharding.spec[0] == "data"
    rep = parallel.replicate({"w": np.ones(4)}, mesh)
    assert rep["w"].sharding.is_fully_replicated


def test_mesh_bad_inputs():
    n = jax.device_count()
    with pytest.raises(JaxdiffError, match=rf"devices={n + 7}: expected at most {n} devices"):
        parallel.make_mesh(n + 7)
    with pytest.raises(JaxdiffError, match="devices=0: expected an integer >= 1"):
        parallel.make_mesh(0)
    with pytest.raises(JaxdiffError, match="devices='gpu'"):
        parallel.make_mesh("gpu")
    with pytest.raises(JaxdiffError, match="axis_name=''"):
        parallel.make_mesh(axis_name="")
    mesh = parallel.make_mesh()
    with pytest.raises(JaxdiffError, match="axis_name='batch': expected one of the mesh's axes"):
        parallel.shard_batch(np.zeros((4, 2)), mesh, axis_name="batch")
    with pytest.raises(JaxdiffError, match="leading batch axis"):
        parallel.shard_batch(np.float32(1.0), mesh)
    with pytest.raises(JaxdiffError, match="mesh="):
        parallel.replicate(np.zeros(3), "mesh")


def test_sample_one_device_and_bad_inputs():
    """One device: the mesh and pmap paths agree bitwise, padding (5 rows, chunk 4) gives the
    first rows of the batch of 8; bad arguments raise JaxdiffError."""
    model, params = _mlp()
    sch = schedules.vp_linear()
    key = jax.random.key(1)
    cond = np.arange(8) % 3
    kw = dict(steps=2, chunk=4)
    s = samplers.ddpm()
    a = parallel.sample(key, model, params, sch, 8, s, cond=cond, **kw)
    b = parallel.sample_pmap(key, model, params, sch, (8, 2), s, cond=cond, **kw)
    c = parallel.sample(key, model, params, sch, 5, s, cond=cond[:5], **kw)
    assert a.shape == (8, 2) and np.array_equal(a, b) and np.array_equal(c, a[:5])
    other = parallel.sample(jax.random.key(2), model, params, sch, 8, s, cond=cond, **kw)
    assert not np.allclose(other, a)
    with pytest.raises(JaxdiffError, match="chunk=0: expected an integer >= 1"):
        parallel.sample(key, model, params, sch, 8, s, cond=cond, steps=2, chunk=0)
    with pytest.raises(JaxdiffError, match=r"cond=.*leading batch axis of size 8"):
        parallel.sample(key, model, params, sch, 8, s, cond=cond[:4], **kw)
    with pytest.raises(JaxdiffError, match=r"num_or_shape=.*\(batch, 2\)"):
        parallel.sample(key, model, params, sch, (8, 3), s, **kw)
    with pytest.raises(JaxdiffError, match="num_or_shape=0"):
        parallel.sample(key, model, params, sch, 0, s, **kw)
    with pytest.raises(JaxdiffError, match="steps=None"):
        parallel.sample(key, model, params, sch, 8, s, chunk=4)
    with pytest.raises(JaxdiffError, match="sampler="):
        parallel.sample(key, model, params, sch, 8, "ddim", steps=2)
    with pytest.raises(JaxdiffError, match="mesh="):
        parallel.sample(key, model, params, sch, 8, s, steps=2, mesh=jax.devices())
    sde = samplers.reverse_sde() if hasattr(samplers, "reverse_sde") else None
    if sde is not None:
        with pytest.raises(JaxdiffError, match="fixed-grid sampler"):
            parallel.sample(key, model, params, sch, 8, sde, steps=2)


def test_pmap_step_bad_inputs():
    model, _ = _mlp()
    import optax

    sch = schedules.vp_linear()
    with pytest.raises(JaxdiffError, match="batch_size=0"):
        parallel.make_pmap_step(model, sch, optax.sgd(0.1), 0)
    with pytest.raises(JaxdiffError, match="ema_decay=1.5"):
        parallel.make_pmap_step(model, sch, optax.sgd(0.1), 8, ema_decay=1.5)
    with pytest.raises(JaxdiffError, match="loss_fn=3"):
        parallel.per_example_loss(3)


def test_per_example_loss_is_batch_split_invariant():
    """per_example_loss(dsm_loss): loss of rows 0..7 equals the mean of the losses of rows 0..3
    (offset 0) and rows 4..7 (index_offset=4), to float32 rounding."""
    from jaxdiff.losses import dsm_loss

    model, params = _mlp()
    sch = schedules.vp_linear()
    loss = parallel.per_example_loss(dsm_loss)
    x = jax.random.normal(jax.random.key(5), (8, 2))
    c = jnp.arange(8) % 3
    k = jax.random.key(6)
    f = jax.jit(lambda x, c, off: loss(params, k, model, sch, x, c, index_offset=off))
    whole = f(x, c, 0)
    halves = 0.5 * (f(x[:4], c[:4], 0) + f(x[4:], c[4:], 4))
    wrong = f(x[4:], c[4:], 0)  # local indices: different draws for rows 4..7
    np.testing.assert_allclose(whole, halves, rtol=1e-6)
    assert abs(float(wrong) - float(f(x[4:], c[4:], 4))) > 1e-3


def test_multihost_helpers_single_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert parallel.initialize() is False  # no pod environment: a no-op
    assert parallel.process_slice(12) == slice(0, 12)
    assert parallel.process_slice(12, process_index=2, process_count=4) == slice(6, 9)
    np.testing.assert_array_equal(
        parallel.host_local_indices(12, process_index=1, process_count=3), np.arange(4, 8)
    )
    # the process slices tile the global batch exactly once
    idx = np.concatenate([parallel.host_local_indices(12, p, 4) for p in range(4)])
    np.testing.assert_array_equal(idx, np.arange(12))
    x = jnp.arange(6.0)
    np.testing.assert_array_equal(parallel.gather_samples(x), np.arange(6.0))
    with pytest.raises(JaxdiffError, match="global_batch=10: expected a batch divisible by the 4"):
        parallel.process_slice(10, process_index=0, process_count=4)
    with pytest.raises(JaxdiffError, match=r"process_index=4: expected an integer in \[0, 4\)"):
        parallel.process_slice(8, process_index=4, process_count=4)
    with pytest.raises(JaxdiffError, match="global_batch=0"):
        parallel.process_slice(0)
