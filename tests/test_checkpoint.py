"""Tests for jaxdiff.checkpoint and train(checkpoint_dir=...): a SIGKILLed run resumes to the
bitwise-identical result, corrupt/partial steps fall back, incompatible models are refused."""

import hashlib
import os
import signal
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import checkpoint, data, models, schedules, train
from jaxdiff._checks import JaxdiffError

KEY = jax.random.PRNGKey(0)
SCHED = schedules.vp_linear()
DATA = jax.jit(data.two_moons, static_argnums=1)(jax.random.PRNGKey(1), 512)
OPT = optax.adam(1e-2)


def _linear(params, x, t, cond):
    return x @ params["w"] + params["b"] * t[:, None]


def _linear_model(width=2):
    params = {"w": 0.1 * jnp.eye(2, width), "b": jnp.zeros(width)}
    return models.as_denoiser(_linear, params=params, parametrization="eps")


def _state(width=2, shift=0.0, step=0):
    _, params = _linear_model(width)
    st = train.init(params, OPT)
    return st.replace(step=jnp.int32(step), params=jax.tree.map(lambda a: a + shift, st.params))


def _tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb, strict=True)
    )


def _snapshot(root):
    """{relative path: sha256 of bytes} of every file (directories as None)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _save_steps(path, steps, keep=3):
    with checkpoint.CheckpointManager(path, every=2, keep=keep) as m:
        for s in steps:
            m.save(s, _state(shift=float(s), step=s), examples_seen=10 * s)


# ------------------------------------------------------------------------------------------
# the preemption test
# ------------------------------------------------------------------------------------------
_RUN_DEF = r"""
import time
import jax, optax
from jaxdiff import data, models, schedules, train


def run(ckpt, steps, every, delay):
    x = jax.jit(data.two_moons, static_argnums=1)(jax.random.PRNGKey(1), 256)
    net = models.MLPScoreNet(hidden=16, depth=1, embed_dim=8)
    model, params = models.as_denoiser(net, jax.random.PRNGKey(2), x[:1], parametrization="eps")
    cb = (lambda state, row: time.sleep(delay)) if delay > 0 else None
    return train.train(
        jax.random.PRNGKey(3), model, params, schedules.vp_linear(), x, optax.adam(1e-2), steps,
        batch_size=16, progress=False, log_every=1, checkpoint_dir=ckpt, checkpoint_every=every,
        keep=2, callback=cb,
    )
"""
_SCRIPT = (
    _RUN_DEF
    + r"""
import sys
import numpy as np
ckpt, out, steps, every, delay = sys.argv[1:6]
state, hist = run(ckpt, int(steps), int(every), float(delay))
np.savez(out, *[np.asarray(leaf) for leaf in jax.tree.leaves(state)])
print("ROWS", len(hist["step"]), int(hist["step"][0]), flush=True)
"""
)


def _launch(ckpt, out, steps, every, delay):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    args = [sys.executable, "-c", _SCRIPT, str(ckpt), str(out), str(steps), str(every), str(delay)]
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_sigkill_mid_training_then_resume_is_bitwise_identical(tmp_path):
    """Train in a subprocess, SIGKILL it at a random time after its first checkpoint, restart
    it on the same directory, and compare with an uninterrupted run, leaf by leaf, bitwise."""
    steps, every = 40, 4
    ckpt = tmp_path / "ckpt"
    victim = _launch(ckpt, tmp_path / "victim.npz", steps, every, 0.03)
    seed = int(time.time())
    delay = np.random.default_rng(seed).uniform(0.0, 0.3)
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:
        if os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt)):
            break
        time.sleep(0.01)
    time.sleep(delay)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, (seed, victim.stderr.read()[-2000:])
    done = checkpoint.CheckpointManager(ckpt).steps()
    assert done and done[-1] < steps and all(s % every == 0 for s in done), (seed, done)
    assert not (tmp_path / "victim.npz").exists()

    resumed = _launch(ckpt, tmp_path / "resumed.npz", steps, every, 0.0)
    ns = {}
    exec(_RUN_DEF, ns)  # the uninterrupted reference, in this process meanwhile
    ref, _ = ns["run"](None, steps, every, 0.0)
    out_r, err_r = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err_r[-2000:]
    # the restart began after the newest checkpoint: only the remaining steps ran
    rows, first = map(int, out_r.split("ROWS")[1].split())
    assert (rows, first) == (steps - done[-1], done[-1] + 1), seed
    got = np.load(tmp_path / "resumed.npz")
    want = [np.asarray(leaf) for leaf in jax.tree.leaves(ref)]
    assert len(got.files) == len(want) > 10  # step, params, EMA params, Adam mu/nu/count
    for i, w in enumerate(want):
        g = got[f"arr_{i}"]
        assert g.dtype == w.dtype and np.array_equal(g, w), (seed, i)
    assert int(ref.step) == steps
    assert checkpoint.CheckpointManager(ckpt).steps() == [steps - every, steps]  # keep=2


# ------------------------------------------------------------------------------------------
# fallback, partial directories, incompatible models
# ------------------------------------------------------------------------------------------
def _truncate_state(step_dir):
    for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "r+b") as fh:
                fh.truncate(os.path.getsize(p) // 2)


def _delete_array_files(step_dir):
    for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            if os.path.basename(dirpath) == "d":
                os.remove(os.path.join(dirpath, f))


def _garbage_meta(step_dir):
    with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
        f.write('{"format": 1, "step": ')


def _delete_meta(step_dir):
    os.remove(os.path.join(step_dir, "meta", "metadata"))


# orbax's failed read of a damaged step leaves an asyncio callback that fires after its event
# loop closed (an "unraisable" RuntimeError at garbage collection); harmless here
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "corrupt", [_truncate_state, _delete_array_files, _garbage_meta, _delete_meta]
)
def test_corrupt_latest_step_warns_and_falls_back(tmp_path, corrupt):
    _save_steps(tmp_path, [2, 4, 6])
    corrupt(os.path.join(tmp_path, "6"))
    m = checkpoint.CheckpointManager(tmp_path)
    with pytest.warns(checkpoint.CheckpointWarning, match=r"step 6 .*restored step 4"):
        r = m.restore(_state())
    assert r.step == 4 and r.examples_seen == 40
    assert _tree_equal(r.state, _state(shift=4.0, step=4))
    # every step corrupt: an error, not a silent fresh start
    corrupt(os.path.join(tmp_path, "4"))
    corrupt(os.path.join(tmp_path, "2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(JaxdiffError, match="no readable checkpoint"):
            m.restore(_state())
    m.close()


def test_leftover_temporary_and_partial_directories_are_ignored(tmp_path):
    _save_steps(tmp_path, [2, 4])
    # a save killed before its commit (orbax's temporary name), and an empty step directory
    os.makedirs(tmp_path / "8.orbax-checkpoint-tmp" / "state")
    (tmp_path / "8.orbax-checkpoint-tmp" / "state" / "junk").write_bytes(b"\0" * 10)
    os.makedirs(tmp_path / "6")
    m = checkpoint.CheckpointManager(tmp_path, every=2)
    assert m.steps() == [2, 4, 6]  # the temporary directory is never a step
    with pytest.warns(checkpoint.CheckpointWarning, match=r"step 6 .*restored step 4"):
        r = m.restore(_state())
    assert r.step == 4 and _tree_equal(r.state, _state(shift=4.0, step=4))
    # continuing: saving step 6 replaces the partial directory, step 8 the temporary one
    m.save(6, _state(shift=6.0, step=6))
    m.save(8, _state(shift=8.0, step=8))
    assert sorted(os.listdir(tmp_path)) == ["4", "6", "8"]  # keep=3
    assert m.restore(_state()).step == 8
    m.close()


def test_incompatible_model_raises_and_touches_nothing(tmp_path):
    _save_steps(tmp_path, [2, 4])
    before = _snapshot(tmp_path)
    m = checkpoint.CheckpointManager(tmp_path, every=2)
    with pytest.raises(JaxdiffError, match=r"\['b'\] has saved shape \(2,\) float32, expected shape \(3,\)"):  # fmt: skip
        m.restore(_state(width=3))
    with pytest.raises(JaxdiffError, match=r"\['b'\]"):
        m.save(6, _state(width=3, step=6))
    wrong_dtype = jax.tree.map(lambda a: a.astype(jnp.float16), _state().params)
    with pytest.raises(JaxdiffError, match=r"float16"):
        m.restore(_state().replace(params=wrong_dtype, ema_params=wrong_dtype))
    # train() with another model on the same directory: refused before anything is written
    model3, params3 = _linear_model(3)
    model3 = model3.replace(apply=lambda p, x, t, c: _linear(p, x, t, c)[:, :2])
    with pytest.raises(JaxdiffError, match="incompatible model"):
        train.train(KEY, model3, params3, SCHED, DATA, OPT, 8, batch_size=8, progress=False,
                    log_every=2, checkpoint_dir=tmp_path, resume=False)  # fmt: skip
    m.close()
    assert _snapshot(tmp_path) == before


def test_config_mismatch_names_the_key(tmp_path):
    with checkpoint.CheckpointManager(tmp_path, config={"model": {"hidden": 32}}) as m:
        m.save(1, _state(step=1), force=True)
    m2 = checkpoint.CheckpointManager(tmp_path, config={"model": {"hidden": 64}})
    with pytest.raises(JaxdiffError, match=r"model.hidden is 32 there, 64 now"):
        m2.restore(_state())
    m2.close()


def test_data_position_and_keep(tmp_path):
    pos = {"epoch": np.int64(3), "index": np.int64(17), "perm": np.arange(5, dtype=np.int32)}
    with checkpoint.CheckpointManager(tmp_path, every=1, keep=2) as m:
        for s in range(1, 6):
            assert m.save(s, _state(step=s), examples_seen=8 * s, data_state={**pos, "index": s})
        assert m.steps() == [4, 5]  # keep=2
        r = m.restore(_state(), data_state=pos)
        assert r.step == 5 and r.examples_seen == 40
        assert int(r.data_state["index"]) == 5 and int(r.data_state["epoch"]) == 3
        np.testing.assert_array_equal(r.data_state["perm"], np.arange(5))
        r4 = m.restore(_state(), step=4, data_state=pos)
        assert int(r4.data_state["index"]) == 4 and r4.examples_seen == 32
        with pytest.raises(JaxdiffError, match="step"):
            m.restore(_state(), step=2)
    with checkpoint.CheckpointManager(tmp_path, every=3) as m:
        assert not m.save(4, _state(step=4))  # not a multiple of every
    with pytest.raises(JaxdiffError, match="directory"):
        checkpoint.CheckpointManager(tmp_path / "empty").restore(_state())


def test_train_writes_every_n_steps_and_resumes_to_the_total(tmp_path):
    model, params = _linear_model()
    run = dict(batch_size=8, progress=False, log_every=5, checkpoint_every=3, keep=10)
    rows = []
    s1, h1 = train.train(KEY, model, params, SCHED, DATA, OPT, 10, checkpoint_dir=tmp_path,
                         callback=lambda st, row: rows.append((int(st.step), row["step"])), **run)  # fmt: skip
    m = checkpoint.CheckpointManager(tmp_path)
    assert m.steps() == [3, 6, 9, 10]  # every 3 steps and at the end
    assert m.metadata(9)["examples_seen"] == 9 * 8
    np.testing.assert_array_equal(h1["step"], [5, 10])
    assert rows == [(5, 5), (10, 10)]
    # a restart asks for 16 steps in total: resumes at 10, runs 6 more
    s2, h2 = train.train(KEY, model, params, SCHED, DATA, OPT, 16, checkpoint_dir=tmp_path, **run)
    np.testing.assert_array_equal(h2["step"], [15, 16])
    full, _ = train.train(KEY, model, params, SCHED, DATA, OPT, 16, **{**run, "log_every": 7})
    assert _tree_equal(s2, full) and int(s2.step) == 16
    # restarting a finished run does nothing
    s3, h3 = train.train(KEY, model, params, SCHED, DATA, OPT, 16, checkpoint_dir=tmp_path, **run)
    assert _tree_equal(s3, full) and h3["step"].shape == (0,)
    with pytest.raises(JaxdiffError, match="checkpoint_every"):
        train.train(KEY, model, params, SCHED, DATA, OPT, 4, **{**run, "checkpoint_every": 0})


def test_mesh_single_device_matches_default(tmp_path):
    model, params = _linear_model()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    run = dict(batch_size=8, progress=False, log_every=5)
    s0, _ = train.train(KEY, model, params, SCHED, DATA, OPT, 10, **run)
    s1, _ = train.train(KEY, model, params, SCHED, DATA, OPT, 10, mesh=mesh, **run)
    s2, _ = train.train(KEY, model, params, SCHED, DATA, OPT, 10, mesh=(mesh, "data"), **run)
    assert _tree_equal(s0, s1) and _tree_equal(s0, s2)
    with pytest.raises(JaxdiffError, match="mesh"):
        train.train(KEY, model, params, SCHED, DATA, OPT, 10, mesh=(mesh, "model"), **run)
    with pytest.raises(JaxdiffError, match="mesh"):
        train.train(KEY, model, params, SCHED, DATA, OPT, 10, mesh="data", **run)


_MESH_SCRIPT = r"""
import numpy as np, jax, jax.numpy as jnp, optax
from jaxdiff import data, models, schedules, train
assert len(jax.devices()) == 4
x = data.two_moons(jax.random.PRNGKey(1), 256)
model, params = models.as_denoiser(models.MLPScoreNet(hidden=16, depth=1), jax.random.PRNGKey(2), x[:1], parametrization="eps")
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
run = dict(batch_size=16, progress=False, log_every=10)
a, _ = train.train(jax.random.PRNGKey(3), model, params, schedules.vp_linear(), x, optax.adam(1e-2), 20, **run)
b, _ = train.train(jax.random.PRNGKey(3), model, params, schedules.vp_linear(), x, optax.adam(1e-2), 20, mesh=mesh, **run)
assert len(b.params["params"]["x_in"]["kernel"].sharding.device_set) == 4
err = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
print("MAXERR", err)
"""


@pytest.mark.slow
def test_mesh_four_cpu_devices_matches_one_device():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    out = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split("MAXERR")[1]) < 1e-4


# ------------------------------------------------------------------------------------------
# one format, one API: every writer is readable by every reader
# ------------------------------------------------------------------------------------------
def test_one_api_reads_what_every_writer_wrote(tmp_path):
    model, params = _linear_model()
    target = train.init(params, OPT)
    # 1. train(checkpoint_dir=...) -> checkpoint.restore, train.restore_checkpoint, the manager
    run = tmp_path / "run"
    state, _ = train.train(KEY, model, params, SCHED, DATA, OPT, 6, batch_size=8, progress=False,
                           checkpoint_dir=run, checkpoint_every=3)  # fmt: skip
    assert _tree_equal(checkpoint.restore(run, target), state)
    assert _tree_equal(train.restore_checkpoint(run, target), state)
    assert _tree_equal(checkpoint.CheckpointManager(run).restore(target).state, state)
    assert _tree_equal(checkpoint.restore(run, target, step=3), train.restore_checkpoint(run, target, step=3))  # fmt: skip
    # 2. checkpoint.save / train.save_checkpoint -> train(checkpoint_dir=...) resumes from it
    one = tmp_path / "one"
    assert checkpoint.save(one, state) == str(one)
    assert checkpoint.CheckpointManager(one).steps() == [6]
    resumed, hist = train.train(KEY, model, params, SCHED, DATA, OPT, 10, batch_size=8,
                                progress=False, checkpoint_dir=one)  # fmt: skip
    full, _ = train.train(KEY, model, params, SCHED, DATA, OPT, 10, batch_size=8, progress=False)
    assert _tree_equal(resumed, full) and list(hist["step"]) == [10]
    # 3. no target: nested dicts of the saved leaves, keyed by their path components
    raw = checkpoint.restore(one)
    np.testing.assert_array_equal(raw["params"]["w"], resumed.params["w"])
    assert int(raw["step"]) == 10 and set(raw) == {"step", "params", "opt_state", "ema_params"}
    # 4. the standalone restore falls back from a corrupt newest step like train(resume=) does
    newest = one / "10" / "meta" / "metadata"
    newest.write_text("{not json")
    with pytest.warns(checkpoint.CheckpointWarning, match="step 10"):
        back = checkpoint.restore(one, target)
    assert int(back.step) == 6


def test_save_to_a_bad_path_names_the_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for bad in (blocker, blocker / "sub"):
        with pytest.raises(JaxdiffError, match=r"^directory="):
            checkpoint.save(bad, _state())
    with pytest.raises(JaxdiffError, match=r"^directory="):
        checkpoint.restore(tmp_path / "missing", _state())
    with pytest.raises(JaxdiffError, match=r"^directory="):
        checkpoint.save(3, _state())
    with pytest.raises(JaxdiffError, match=r"^step="):
        checkpoint.save(tmp_path / "ok", _state(), step=-1)
