"""Digits experiment: a class-conditional U-Net on scikit-learn's 8x8 digits, sampled with
classifier-free guidance, scored by the project's digits classifier.

Steps:

1. Train the digits classifier (:mod:`jaxdiff.digits`) on the train split of
   :func:`jaxdiff.data.load_digits` and report its held-out accuracy (required >= 97 %).
2. Train a class-conditional ``UNet(channel_mults=(1, 2), num_classes=10)`` (eps-prediction,
   VP-cosine schedule, DSM loss, AdamW, EMA) on the train split with label dropout
   (``cond_drop_prob=0.1``, null label 10) so one network is conditional and unconditional.
3. For each guidance scale ``w`` (``jaxdiff.guidance.cfg`` convention: ``w = 0`` unconditional,
   ``w = 1`` the plain conditional model, ``w > 1`` extrapolates), draw ``n_per_class`` samples
   of every class with DPM-Solver++(2M) (``--sample-steps``, default 25) and report the class
   accuracy (required >= 90 % at some scale), the Fréchet distance of classifier features
   (samples vs the held-out split) next to the real-vs-real reference ``fd_real`` (the same
   number of real *training* digits with the same labels vs the held-out split; see
   :func:`jaxdiff.digits.evaluate_samples`), training steps/s and wall times.

Usage: ``python benchmarks/digits.py [--quick] [--out benchmarks/results]``. Prints a table and
writes ``digits.json``, ``digits_samples.png`` (rows = classes, at the best-accuracy scale) and
``digits.png`` (accuracy and FD vs scale). ``--quick`` is a smoke run (few steps: numbers are
not meaningful).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff import digits, sample, samplers, schedules
from jaxdiff.data import load_digits, save_image_grid
from jaxdiff.guidance.cfg import cfg
from jaxdiff.models import UNet, as_denoiser
from jaxdiff.train import init, make_step, train

FULL = dict(steps=3000, batch_size=64, channels=32, scales=(0.0, 1.0, 2.0, 3.0), n_per_class=36)
QUICK = dict(steps=200, batch_size=64, channels=16, scales=(1.0, 3.0), n_per_class=4)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_net(channels: int) -> UNet:
    """The experiment's U-Net: two levels (8x8, 4x4), one residual block per level, attention
    only in the middle block, 10 classes plus the null label."""
    return UNet(
        channels=channels,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_levels=(),
        num_heads=1,
        groups=8,
        num_classes=10,
    )


def train_unet(
    key, x, y, *, steps, batch_size, channels, lr=3e-3, log_every=100, python_loop=False
):
    net = make_net(channels)
    model, params = as_denoiser(
        net, jax.random.fold_in(key, 0), x[:1], parametrization="eps", cond_example=y[:1]
    )
    schedule = schedules.vp_cosine()
    opt = optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 2), steps, lr * 0.05)
    )
    t0 = time.perf_counter()
    data = (jnp.asarray(x), jnp.asarray(y))
    # a short run: an EMA window (1 / (1 - d) steps) much shorter than the run
    ema_decay = 0.995 if steps >= 2000 else 0.99
    loss_kw = dict(cond_drop_prob=0.1, null_cond=net.null_cond)
    k_train = jax.random.fold_in(key, 1)
    if python_loop:
        # one jitted make_step per Python iteration, timed by hand (train() does the same for
        # conv nets on the CPU: loop="auto"; XLA:CPU compiles convolution gradients inside
        # while loops to much slower code)
        step = jax.jit(
            make_step(model, schedule, opt, ema_decay=ema_decay, batch_size=batch_size, **loss_kw)
        )
        state = init(params, opt, ema_decay)
        state, m = step(state, k_train, data)  # compile + step 0
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        losses = []
        for _ in range(steps - 1):
            state, m = step(state, k_train, data)
            losses.append(m["loss"])
        jax.block_until_ready(state)
        rate = (steps - 1) / max(time.perf_counter() - t1, 1e-9)
        final_loss = float(np.mean(np.asarray(losses[-100:]))) if losses else float(m["loss"])
    else:
        state, hist = train(
            k_train,
            model,
            params,
            schedule,
            data,
            opt,
            steps,
            batch_size=batch_size,
            ema_decay=ema_decay,
            progress=False,
            log_every=min(log_every, steps),
            **loss_kw,
        )
        rate = float(np.median(hist["steps_per_s"]))
        final_loss = float(hist["loss"][-1])
        compile_s = float("nan")
    wall = time.perf_counter() - t0
    n_params = int(sum(np.size(p) for p in jax.tree.leaves(params)))
    info = {
        "steps": steps,
        "batch_size": batch_size,
        "channels": channels,
        "n_params": n_params,
        "final_loss": final_loss,
        "steps_per_s": rate,
        "loop": "python" if python_loop else "train",
        "compile_s": compile_s,
        "train_wall_s": wall,
    }
    return net, model, state.ema_params, schedule, info


def run(args) -> dict:
    cfg_run = dict(QUICK if args.quick else FULL)
    for k in ("steps", "batch_size", "channels", "n_per_class"):
        if getattr(args, k) is not None:
            cfg_run[k] = getattr(args, k)
    if args.scales is not None:
        cfg_run["scales"] = tuple(float(s) for s in args.scales.split(","))
    t_start = time.perf_counter()
    key = jax.random.PRNGKey(args.seed)
    x_tr, y_tr = load_digits("train")
    x_te, y_te = load_digits("test")

    t0 = time.perf_counter()
    clf = digits.train_classifier(jax.random.fold_in(key, 10), x_tr, y_tr)
    clf_acc = float(digits.accuracy(clf, x_te, y_te))
    clf_s = time.perf_counter() - t0
    _log(f"classifier: held-out accuracy {clf_acc:.4f} ({clf_s:.1f} s)")

    net, model, params, schedule, tr = train_unet(
        jax.random.fold_in(key, 20),
        x_tr,
        y_tr,
        steps=cfg_run["steps"],
        batch_size=cfg_run["batch_size"],
        channels=cfg_run["channels"],
        python_loop=args.loop == "python",
    )
    _log(
        f"U-Net trained: {tr['steps_per_s']:.2f} steps/s, {tr['train_wall_s']:.1f} s "
        f"(compile {tr['compile_s']:.1f} s)"
    )
    k = cfg_run["n_per_class"]
    labels = np.repeat(np.arange(10, dtype=np.int32), k)
    sampler = samplers.dpm_solver_pp(order=2)
    rows = []
    grids = {}
    for w in cfg_run["scales"]:
        guided = cfg(model, scale=w, null_cond=net.null_cond)
        t0 = time.perf_counter()
        xs = sample(
            jax.random.fold_in(key, 30),  # the same noise for every scale
            guided,
            params,
            schedule,
            (labels.shape[0], 8, 8, 1),
            sampler,
            steps=args.sample_steps,
            cond=jnp.asarray(labels),
        )
        xs = np.asarray(jax.block_until_ready(xs))
        sample_s = time.perf_counter() - t0
        ev = digits.evaluate_samples(clf, xs, labels, (x_te, y_te), real_ref=(x_tr, y_tr))
        rows.append({"scale": w, **ev, "sample_wall_s": sample_s})
        _log(f"w={w:g}: accuracy {ev['accuracy']:.3f}, FD {ev['fd']:.3f} ({sample_s:.1f} s)")
        grids[w] = xs
    best = max(rows, key=lambda r: r["accuracy"])
    return {
        "config": {**cfg_run, "sample_steps": args.sample_steps, "quick": args.quick},
        "device": str(jax.devices()[0]),
        "classifier": {"test_accuracy": clf_acc, "wall_s": clf_s, "n_test": int(len(y_te))},
        "train": tr,
        "scales": rows,
        "best_scale": best["scale"],
        "wall_s": time.perf_counter() - t_start,
        "_grids": grids,
    }


def report(res: dict) -> None:
    c, tr = res["classifier"], res["train"]
    print(f"device: {res['device']}")
    print(f"classifier: held-out accuracy {c['test_accuracy']:.4f} (n={c['n_test']}), "
          f"{c['wall_s']:.1f} s")  # fmt: skip
    print(f"U-Net: {tr['n_params']} params, {tr['steps']} steps x batch {tr['batch_size']}, "
          f"{tr['steps_per_s']:.1f} steps/s, {tr['train_wall_s']:.1f} s, "
          f"final loss {tr['final_loss']:.4f}")  # fmt: skip
    print(f"{'w':>5} | {'accuracy':>8} | {'FD':>8} | {'FD real':>8} | {'sample s':>8}")
    for r in res["scales"]:
        print(f"{r['scale']:>5g} | {r['accuracy']:>8.3f} | {r['fd']:>8.3f} | "
              f"{r['fd_real']:>8.3f} | {r['sample_wall_s']:>8.1f}")  # fmt: skip
    print(f"best scale {res['best_scale']:g}; total wall {res['wall_s']:.1f} s")


def plot(res: dict, path: str) -> None:
    from matplotlib.figure import Figure

    ws = [r["scale"] for r in res["scales"]]
    fig = Figure(figsize=(8, 3.2))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.plot(ws, [r["accuracy"] for r in res["scales"]], "o-", label="samples")
    ax1.axhline(res["classifier"]["test_accuracy"], ls="--", c="k", label="real held-out")
    ax1.axhline(0.9, ls=":", c="r", label="target 0.9")
    ax1.set_xlabel("guidance scale w (1 = conditional)")
    ax1.set_ylabel("class accuracy")
    ax1.legend(fontsize=8)
    ax2.plot(ws, [r["fd"] for r in res["scales"]], "o-", label="samples vs held-out")
    ax2.plot(ws, [r["fd_real"] for r in res["scales"]], "k--", label="real train vs held-out")
    ax2.set_xlabel("guidance scale w")
    ax2.set_ylabel("Fréchet distance (classifier features)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (numbers not meaningful)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="U-Net training steps")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--channels", type=int, default=None, help="U-Net base width")
    p.add_argument("--n-per-class", type=int, default=None, help="samples per class and scale")
    p.add_argument("--scales", default=None, help="comma-separated guidance scales")
    p.add_argument(
        "--loop",
        choices=("python", "train"),
        default="train",
        help="train: jaxdiff.train.train (loop='auto': one compiled step per call for this conv "
        "net on the CPU); python: a hand-written loop of jitted make_step calls",
    )
    p.add_argument("--sample-steps", type=int, default=25, help="DPM-Solver++(2M) steps")
    args = p.parse_args(argv)
    res = run(args)
    report(res)
    os.makedirs(args.out, exist_ok=True)
    grids = res.pop("_grids")
    w = res["best_scale"]
    k = min(res["config"]["n_per_class"], 10)
    xs = grids[w].reshape(10, -1, 8, 8, 1)[:, :k].reshape(-1, 8, 8, 1)
    save_image_grid(
        os.path.join(args.out, "digits_samples.png"),
        xs,
        k,
        title=f"CFG w={w:g}, DPM-Solver++(2M) {args.sample_steps} steps",
        row_labels=range(10),
    )
    plot(res, os.path.join(args.out, "digits.png"))
    with open(os.path.join(args.out, "digits.json"), "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.out}/digits.json, digits.png, digits_samples.png")
    return res


if __name__ == "__main__":
    main()
