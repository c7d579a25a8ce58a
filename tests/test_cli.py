"""Tests for jaxdiff.config (schema validation, builders) and the `jaxdiff train` / `jaxdiff
sample` commands (in-process through jaxdiff.cli.main)."""

import json
import os
import pathlib

import numpy as np
import optax
import pytest

from jaxdiff import checkpoint, cli, models, samplers, schedules
from jaxdiff import config as C
from jaxdiff._checks import JaxdiffError

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples" / "configs"

TINY = """
[data]
name = "two_moons"
batch_size = 32
num_examples = 512
conditional = true

[model]
hidden = 16
depth = 1
embed_dim = 8

[optim]
lr = 1e-2
ema_decay = 0.9

[train]
steps = 40
log_every = 20
checkpoint_every = 20
cond_drop_prob = 0.2

[sample]
sampler = "ddim"
steps = 4
num = 16

[run]
out_dir = "{out}"
"""


def _write(tmp_path, text, name="cfg.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _tiny(tmp_path, **edits):
    text = TINY.format(out=tmp_path / "run")
    for old, new in edits.items():
        assert old in text
        text = text.replace(old, new)
    return _write(tmp_path, text)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("hidden = 16", "hiden = 16", r"unknown config key model\.hiden; did you mean model\.hidden\?"),
        ("[run]", "[runn]", r"unknown config key runn; did you mean run\?"),
        ("steps = 40", 'steps = "40"', r"train\.steps='40': expected an integer"),
        ("lr = 1e-2", "lr = true", r"optim\.lr=True: expected a number"),
        ('sampler = "ddim"', 'sampler = "dpm_solver_ppp"', r"sample\.sampler='dpm_solver_ppp': expected one of .*'ddim'.* \(did you mean 'dpm_solver_pp'\?\)"),
        ("hidden = 16", 'kind = "resnet"', r"model\.kind='resnet': expected one of 'mlp', 'unet', 'dit'"),
        ("steps = 40\n", "\n", r"missing required config key train\.steps \(expected an integer\)"),
        ("batch_size = 32", "batch_size = 0", r"data\.batch_size=0: expected an integer >= 1"),
        ("checkpoint_every = 20", "sample_every = 30", r"train\.sample_every=30: expected a multiple of train\.log_every=20"),
    ],
)  # fmt: skip
def test_bad_toml_configs_name_the_key(tmp_path, old, new, message):
    with pytest.raises(JaxdiffError, match=message):
        C.load_config(_tiny(tmp_path, **{old: new}))


def test_bad_yaml_config_and_exit_code(tmp_path, capsys):
    p = _write(
        tmp_path,
        "data: {name: digits, conditional: yes}\ntrain: {steps: 10}\nmodel: {dtype: float16}\n",
        "bad.yaml",
    )
    with pytest.raises(JaxdiffError, match=r"model\.dtype='float16': expected one of 'float32', 'bfloat16'"):  # fmt: skip
        C.load_config(p)
    assert cli.main(["train", "--config", str(p), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.dtype='float16'" in err and "Traceback" not in err
    with pytest.raises(JaxdiffError, match=r"\.toml, \.yaml or \.yml"):
        C.load_config(tmp_path / "cfg.json")
    with pytest.raises(JaxdiffError, match="cannot parse"):
        C.load_config(_write(tmp_path, "[data\nname=", "broken.toml"))


def test_example_configs_validate_and_round_trip():
    toy = C.load_config(EXAMPLES / "toy_moons.toml")
    digits = C.load_config(EXAMPLES / "digits_unet.yaml")
    assert (toy.data.name, toy.model.kind, toy.train.steps) == ("two_moons", "mlp", 3000)
    assert (digits.model.kind, digits.model.channel_mults, digits.run.devices) == (
        "unet",
        (1, 2),
        "all",
    )
    for cfg in (toy, digits):
        assert C.config_from_dict(C.config_to_dict(cfg)) == cfg


def test_builders(tmp_path):
    import jax
    import jax.numpy as jnp

    cfg = C.load_config(_tiny(tmp_path))
    bundle = C.build_data(cfg)
    x, labels = bundle.train
    assert x.shape == (512, 2) and labels.shape == (512,) and set(np.unique(labels)) == {0, 1}
    assert bundle.num_classes == 2 and bundle.kind == "points"
    model, params = C.build_model(cfg, jax.random.PRNGKey(0), bundle.x_example)
    ref, ref_params = models.as_denoiser(
        models.MLPScoreNet(hidden=16, depth=1, embed_dim=8, num_classes=2, dtype=jnp.float32),
        jax.random.PRNGKey(0),
        bundle.x_example,
        cond_example=np.zeros((1,), np.int32),
        parametrization="eps",
    )
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, ref_params)
    assert isinstance(C.build_schedule(cfg), type(schedules.vp_linear()))
    assert isinstance(C.build_sampler(cfg), samplers.DDIM)
    # warmup + cosine: lr(0) = 0, lr(warmup) = lr, lr(steps) = lr * end_factor
    cfg2 = C.config_from_dict(
        {**C.config_to_dict(cfg), "optim": {"lr": 0.1, "warmup": 10, "decay": "cosine"}}
    )
    lr = C.build_lr_schedule(cfg2)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.05, rel=1e-6)
    assert float(lr(10)) == pytest.approx(0.1, rel=1e-6)
    assert float(lr(25)) == pytest.approx(0.1 * (0.05 + 0.95 * 0.5), rel=1e-5)  # cosine midpoint
    assert float(lr(40)) == pytest.approx(0.1 * 0.05, rel=1e-5)
    opt = C.build_optimizer(cfg2)
    assert isinstance(opt, optax.GradientTransformation) and C.build_optimizer(cfg2) is opt


def test_train_resume_and_sample_end_to_end(tmp_path, capsys):
    cfg_path = _tiny(tmp_path)
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(cfg_path), "--no-progress"]) == 0
    assert checkpoint.CheckpointManager(run / "checkpoints").steps() == [20, 40]
    # a restart with a larger total resumes at 40 and continues the step count
    assert cli.main(["train", "--config", str(cfg_path), "--steps", "60", "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40, 60]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert sorted(os.listdir(run / "samples")) == ["step_0000040.png", "step_0000060.png"]
    assert checkpoint.CheckpointManager(run / "checkpoints").steps() == [20, 40, 60]

    out = tmp_path / "s.npz"
    args = ["sample", "--config", str(cfg_path), "--out", str(out), "--num", "8"]
    assert cli.main([*args, "--class", "1", "--guidance-scale", "2"]) == 0
    got = np.load(out)
    assert got["samples"].shape == (8, 2) and np.all(np.isfinite(got["samples"]))
    np.testing.assert_array_equal(got["labels"], np.ones(8))
    assert int(got["step"]) == 60 and (tmp_path / "s.png").stat().st_size > 1000

    # another model on the same out_dir: refused with the differing key, nothing written
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    other = _tiny(tmp_path, **{"hidden = 16": "hidden = 24"})
    assert cli.main(["train", "--config", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.hidden is 16 there, 24 now" in err and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_extending_a_finished_run_with_a_decaying_lr_and_the_fast_restart(tmp_path, capsys):
    # warmup + cosine decay over train.steps: a finished run extended with --steps continues on
    # the schedule of the new total (docs/cli.md); the fingerprint does not hold train.steps
    cfg_path = _tiny(
        tmp_path, **{"ema_decay = 0.9": 'ema_decay = 0.9\nwarmup = 5\ndecay = "cosine"'}
    )
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(cfg_path), "--no-progress"]) == 0
    fp = checkpoint.CheckpointManager(run / "checkpoints").metadata(40)["fingerprint"]["config"]
    assert fp["optim"]["decay_steps"] == "train.steps"
    assert cli.main(["train", "--config", str(cfg_path), "--steps", "60", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "step 60 / 60" in out
    cfg60 = C.load_config(cfg_path, {"train.steps": 60})
    lr = C.build_lr_schedule(cfg60)  # the schedule the extension ran on: defined over 60 steps
    assert float(lr(60)) == pytest.approx(1e-2 * 0.05, rel=1e-5)
    assert float(lr(40)) > float(C.build_lr_schedule(C.load_config(cfg_path))(40))

    # a finished run restarted: recognised from the checkpoint metadata, without importing JAX
    script = (
        "import sys, time; t0 = time.perf_counter(); from jaxdiff import cli; "
        f"rc = cli.main(['train', '--config', {str(cfg_path)!r}, '--steps', '60', "
        "'--no-progress']); "
        "print('RC', rc, 'JAX', 'jax' in sys.modules, 'S', time.perf_counter() - t0)"
    )
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert "nothing left to do" in res.stdout, res.stdout + res.stderr
    assert "RC 0 JAX False" in res.stdout, res.stdout
    # a changed model is still refused on that path, naming the key
    other = _tiny(tmp_path, **{"hidden = 16": "hidden = 24", "ema_decay = 0.9": "ema_decay = 0.9\nwarmup = 5\ndecay = \"cosine\""})  # fmt: skip
    assert cli.main(["train", "--config", str(other), "--no-progress"]) == 2
    assert "model.hidden is 16 there, 24 now" in capsys.readouterr().err


def test_path_errors_are_one_line_exit_2_before_any_work(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # no training or sampling may start before the paths are checked
    monkeypatch.setattr(cli, "_train_run", lambda *a: pytest.fail("training started"))
    monkeypatch.setattr(cli, "_setup", lambda *a: pytest.fail("a model was built"))
    cfg_path = _tiny(tmp_path)
    cases = [
        (["train", "--out-dir", str(blocker / "run")], "run.out_dir="),
        (["train", "--out-dir", str(blocker)], "run.out_dir="),
        (["sample", "--out", str(tmp_path / "x.txt")], "--out="),
        (["sample", "--out-dir", str(tmp_path / "nothing")], "run.out_dir="),
        (["sample", "--checkpoint", str(tmp_path / "nothing")], "--checkpoint="),
        (
            ["sample", "--checkpoint", str(tmp_path / "ck"), "--out", str(blocker / "s.png")],
            "--out=",
        ),
    ]
    (tmp_path / "ck" / "1").mkdir(parents=True)  # looks like a step: the --out check comes next
    for args, name in cases:
        assert cli.main([args[0], "--config", str(cfg_path), *args[1:]]) == 2, args
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "nothing").exists()
