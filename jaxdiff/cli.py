"""The ``jaxdiff`` command.

* ``jaxdiff demo``: trains a small score network on a 2-D toy mixture, samples it with DDIM and
  the diffrax probability-flow ODE, and reports sliced W2 to fresh data.
* ``jaxdiff train --config F``: a batch training job from a TOML/YAML config
  (:mod:`jaxdiff.config`), with preemption-safe checkpoints in ``out_dir/checkpoints``
  (:mod:`jaxdiff.checkpoint`), ``metrics.jsonl`` and periodic sample plots; restarting it on the
  same ``out_dir`` resumes.
* ``jaxdiff sample --config F``: restores the EMA params and writes samples (``.npz``) and a
  plot (``.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _demo(args) -> int:
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import optax

    import jaxdiff
    from jaxdiff import analytic, metrics, models, samplers, schedules, train

    t_begin = time.perf_counter()
    key = jax.random.PRNGKey(args.seed)
    k_data, k_init, k_train, k_ddim, k_ode, k_eval = jax.random.split(key, 6)
    # the README quickstart's data, network and defaults, with a longer run
    dist = analytic.ring_mixture()
    data = dist.sample(k_data, args.num_data)
    schedule = schedules.vp_linear()
    net = models.MLPScoreNet(hidden=args.hidden, depth=3)
    model, params = models.as_denoiser(net, k_init, data[:1], schedule=schedule)
    print(f"jaxdiff demo: {args.train_steps} training steps on an 8-component 2-D Gaussian mixture")
    params = train.fit(
        k_train,
        model,
        params,
        schedule,
        data,
        optax.adam(args.lr),
        steps=args.train_steps,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    n = args.num_samples
    x_ddim = jaxdiff.sample(k_ddim, model, params, schedule, (n, 2), samplers.ddim(), steps=20)
    x_ode, info = jaxdiff.sample(
        k_ode, model, params, schedule, (n, 2), samplers.pf_ode(), return_info=True
    )
    # the sliced W2 of one sample against one reference varies by ~30% for this mixture: the
    # model's score is the mean over 4 fresh references, the floor the mean over 8 data pairs
    floor = float(metrics.sliced_wasserstein_floor(k_eval, dist.sample, n))
    refs = [dist.sample(jax.random.fold_in(k_eval, 100 + r), n) for r in range(4)]

    def score(x):
        return float(
            np.mean(
                [
                    metrics.sliced_wasserstein(jax.random.fold_in(k_eval, r), x, ref)
                    for r, ref in enumerate(refs)
                ]
            )
        )

    sw_ddim, sw_ode = score(x_ddim), score(x_ode)
    # points between the modes, which sliced W2 barely sees: the fraction of samples whose data
    # log-density is below the 1% quantile of the data's own (1% for exact samples)
    thr = float(np.quantile(np.asarray(dist.log_prob(refs[0])), 0.01))
    off_ddim, off_ode = (
        float(np.mean(np.asarray(dist.log_prob(x)) < thr)) for x in (x_ddim, x_ode)
    )
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
    panels = [
        (refs[0], "data (exact samples)"),
        (x_ddim, f"DDIM, 20 steps: SW2 {sw_ddim / floor:.2f} x floor, off-mode {off_ddim:.1%}"),
        (
            x_ode,
            f"PF-ODE ({int(info.nfe)} NFE): SW2 {sw_ode / floor:.2f} x, off-mode {off_ode:.1%}",
        ),
    ]
    for ax, (pts, title) in zip(axes, panels, strict=True):
        pts = np.asarray(pts)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
    fig.suptitle(f"jaxdiff demo (data-vs-data SW2 floor {floor:.3f}, n = {n}; off-mode: data 1%)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"wrote {args.out}")
    print(
        f"quality: sliced W2 to fresh data  DDIM-20 {sw_ddim:.4f} ({sw_ddim / floor:.2f} x floor)  "
        f"PF-ODE {sw_ode:.4f} ({sw_ode / floor:.2f} x floor)  (data-vs-data floor {floor:.4f}, "
        f"n={n})"
    )
    print(
        f"off-mode fraction (data log-density below the data's 1% quantile): DDIM-20 "
        f"{off_ddim:.1%}  PF-ODE {off_ode:.1%}  (exact samples: 1%)"
    )
    print(f"total {time.perf_counter() - t_begin:.1f} s")
    return 0


# ------------------------------------------------------------------------------------------
# train / sample from a config
# ------------------------------------------------------------------------------------------
def _load(args):
    from jaxdiff import config as C

    overrides = {}
    if getattr(args, "out_dir", None) is not None:
        overrides["run.out_dir"] = args.out_dir
    if getattr(args, "steps", None) is not None:
        overrides["train.steps"] = args.steps
    if getattr(args, "num", None) is not None:
        overrides["sample.num"] = args.num
    if getattr(args, "guidance_scale", None) is not None:
        overrides["sample.guidance_scale"] = args.guidance_scale
    if getattr(args, "label", None) is not None:
        overrides["sample.class"] = args.label
    return C.load_config(args.config, overrides)


def _mesh(cfg):
    import jax
    import numpy as np

    from jaxdiff._checks import fail

    devs = jax.devices()
    n = len(devs) if cfg.run.devices == "all" else cfg.run.devices
    if n > len(devs):
        fail("run.devices", cfg.run.devices, f"at most the {len(devs)} available device(s)")
    if n == 1:
        return None
    if cfg.data.batch_size % n:
        fail("data.batch_size", cfg.data.batch_size, f"a multiple of the {n} devices")
    return jax.sharding.Mesh(np.array(devs[:n]), ("data",))


def _setup(cfg):
    """``(bundle, model, params, schedule, optimizer)`` for ``cfg`` (same keys every time)."""
    import jax

    from jaxdiff import config as C

    key = jax.random.PRNGKey(cfg.train.seed)
    bundle = C.build_data(cfg)
    model, params = C.build_model(cfg, jax.random.fold_in(key, 1), bundle.x_example)
    return bundle, model, params, C.build_schedule(cfg), C.build_optimizer(cfg)


def _draw(cfg, bundle, model, params, schedule, num=None, seed_offset=0):
    """``(samples (num, *event), labels or None)`` with ``cfg.sample``'s sampler and guidance."""
    import jax
    import jax.numpy as jnp

    import jaxdiff
    from jaxdiff import config as C
    from jaxdiff.guidance import cfg as cfg_guidance

    s = cfg.sample
    num = s.num if num is None else num
    labels = None
    if bundle.num_classes is not None:
        k = bundle.num_classes
        if s.label is not None:
            if not 0 <= s.label < k:
                from jaxdiff._checks import fail

                fail("sample.class", s.label, f"a label in [0, {k})")
            labels = jnp.full((num,), s.label, jnp.int32)
        else:
            labels = jnp.arange(num, dtype=jnp.int32) % k
        if s.guidance_scale != 1.0:
            model = cfg_guidance(model, s.guidance_scale, null_cond=k)
    key = jax.random.fold_in(jax.random.PRNGKey(s.seed), seed_offset)
    x = jaxdiff.sample(
        key,
        model,
        params,
        schedule,
        (num, *bundle.x_example.shape[1:]),
        C.build_sampler(cfg),
        steps=s.steps,
        cond=labels,
    )
    return x, labels


def _plot(path, x, labels, bundle, title):
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib.figure import Figure

    x = np.asarray(x, np.float32)
    if bundle.kind == "image":
        from jaxdiff.data import save_image_grid

        n = x.shape[0]
        if labels is not None:  # one row per class when labels cycle
            order = np.argsort(np.asarray(labels), kind="stable")
            x = x[order]
        save_image_grid(path, np.clip(x, -1.0, 1.0), nrow=int(np.ceil(np.sqrt(n))), title=title)
        return
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    if bundle.kind == "points":
        ref = np.asarray(bundle.reference)
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.8", label="data")
        c = None if labels is None else np.asarray(labels)
        ax.scatter(x[:, 0], x[:, 1], s=3, c=c, cmap="tab10" if c is not None else None)
        ax.set_aspect("equal")
    else:
        for row in x[:8]:
            ax.plot(row.reshape(row.shape[0], -1)[:, 0], lw=1)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _writable_dir(arg: str, path: str, value=None) -> str:
    """Create directory ``path`` if needed; a one-line error naming ``arg`` (and ``value``,
    default ``path``) if it cannot be created or written. Checked before any work."""
    from jaxdiff._errors import fail

    path = os.path.abspath(path)
    what = "a directory" if value is None else f"a file in a directory ({path})"
    value = path if value is None else value
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        fail(arg, value, f"{what} that can be created ({e.strerror or e})")
    if not os.path.isdir(path):
        fail(arg, value, f"{what} that is a directory, not a file")
    if not os.access(path, os.W_OK | os.X_OK):
        fail(arg, value, f"{what} that is writable (permission denied)")
    return path


def _train_cmd(args) -> int:
    from jaxdiff import config as C
    from jaxdiff._ckpt_meta import _jsonable, check_fingerprint, latest_readable

    t0 = time.perf_counter()
    cfg = _load(args)
    out = _writable_dir("run.out_dir", cfg.run.out_dir)
    ckpt_dir = os.path.join(out, "checkpoints")
    if os.path.exists(ckpt_dir):
        _writable_dir("run.out_dir", ckpt_dir)
    # a finished (or another model's) run is recognised from the metadata alone, before JAX
    # is imported: restarting a finished job costs well under a second
    fp = _jsonable(C.checkpoint_fingerprint(cfg))
    start, meta = latest_readable(ckpt_dir)
    if meta is not None:
        check_fingerprint(
            {"config": meta["fingerprint"].get("config")},
            {"config": fp},
            where=f"checkpoint directory {ckpt_dir} (step {start})",
        )
        if start >= cfg.train.steps:
            print(
                f"jaxdiff train: step {start} / {cfg.train.steps}: nothing left to do; outputs "
                f"in {out} ({time.perf_counter() - t0:.2f} s)"
            )
            return 0
    return _train_run(args, cfg, out, ckpt_dir, start or 0)


def _train_run(args, cfg, out, ckpt_dir, start) -> int:
    import jax
    import jax.numpy as jnp

    from jaxdiff import checkpoint as ckpt
    from jaxdiff import config as C
    from jaxdiff import train as T

    mesh = _mesh(cfg)
    bundle, model, params, schedule, optimizer = _setup(cfg)
    every = cfg.train.checkpoint_every or cfg.train.log_every
    manager = ckpt.CheckpointManager(
        ckpt_dir,
        every=every,
        keep=cfg.train.keep,
        config=C.checkpoint_fingerprint(cfg),
    )
    # refuse another model's directory before writing anything
    manager.check_compatible(T.init(params, optimizer, cfg.optim.ema_decay))
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(C.config_to_dict(cfg), f, indent=1)
    if start:
        print(f"jaxdiff train: resuming from {ckpt_dir} (latest step {start})")
    metrics_path = os.path.join(out, "metrics.jsonl")

    def callback(state, row):
        step = int(row["step"])
        rec = {"step": step, "loss": float(row["loss"]), "steps_per_s": float(row["steps_per_s"])}
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        se = cfg.train.sample_every
        if (se is not None and step % se == 0) or step == cfg.train.steps:
            p = state.params if state.ema_params is None else state.ema_params
            x, labels = _draw(cfg, bundle, model, p, schedule, seed_offset=step)
            _plot(
                os.path.join(out, "samples", f"step_{step:07d}.png"),
                x,
                labels,
                bundle,
                f"step {step}",
            )

    kw = {}
    if cfg.train.cond_drop_prob > 0:
        kw = {
            "cond_drop_prob": cfg.train.cond_drop_prob,
            "null_cond": jnp.int32(bundle.num_classes),
        }
    state, hist = T.train(
        jax.random.PRNGKey(cfg.train.seed),
        model,
        params,
        schedule,
        bundle.train,
        optimizer,
        cfg.train.steps,
        batch_size=cfg.data.batch_size,
        ema_decay=cfg.optim.ema_decay,
        ema_warmup=cfg.optim.ema_warmup,
        progress=not args.no_progress,
        log_every=cfg.train.log_every,
        checkpoint_dir=manager,
        keep=cfg.train.keep,
        mesh=mesh,
        callback=callback,
        **kw,
    )
    manager.close()
    last = f"loss {hist['loss'][-1]:.4g}" if len(hist["loss"]) else "nothing left to do"
    print(f"jaxdiff train: step {int(state.step)} / {cfg.train.steps} ({last}); outputs in {out}")
    return 0


def _sample_cmd(args) -> int:
    from jaxdiff import config as C
    from jaxdiff._ckpt_meta import committed_steps
    from jaxdiff._errors import fail

    cfg = _load(args)
    out_dir = os.path.abspath(cfg.run.out_dir)
    directory = os.path.abspath(args.checkpoint or os.path.join(out_dir, "checkpoints"))
    out = os.path.abspath(args.out or os.path.join(out_dir, "samples.npz"))
    stem, ext = os.path.splitext(out)
    # every path is checked before JAX is imported or anything is restored or sampled
    if ext not in (".npz", ".png"):
        fail("--out", out, "a .npz or .png file")
    if os.path.isdir(out):
        fail("--out", out, "a file name, not a directory")
    if not committed_steps(directory):
        arg = "--checkpoint" if args.checkpoint else "run.out_dir"
        fail(arg, directory, "a checkpoint directory written by jaxdiff train (no step found)")
    _writable_dir("--out", os.path.dirname(out), value=out)

    import numpy as np

    from jaxdiff import checkpoint as ckpt
    from jaxdiff import train as T

    bundle, model, params, schedule, optimizer = _setup(cfg)
    with ckpt.CheckpointManager(directory, config=C.checkpoint_fingerprint(cfg)) as m:
        restored = m.restore(T.init(params, optimizer, cfg.optim.ema_decay))
    st = restored.state
    p = st.params if st.ema_params is None else st.ema_params
    x, labels = _draw(cfg, bundle, model, p, schedule)
    arrays = {"samples": np.asarray(x, np.float32), "step": np.int64(restored.step)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    np.savez(stem + ".npz", **arrays)
    title = f"{cfg.sample.sampler}, {cfg.sample.steps} steps, checkpoint step {restored.step}"
    if cfg.sample.guidance_scale != 1.0:
        title += f", w={cfg.sample.guidance_scale:g}"
    _plot(stem + ".png", x, labels, bundle, title)
    print(
        f"jaxdiff sample: {x.shape[0]} samples from step {restored.step} -> {stem}.npz, {stem}.png"
    )
    return 0


def main(argv=None) -> int:
    """Entry point of the ``jaxdiff`` console script."""
    parser = argparse.ArgumentParser(prog="jaxdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train on a 2-D mixture, sample, write samples.png")
    d.add_argument("--train-steps", type=int, default=10000)
    d.add_argument("--batch-size", type=int, default=256)
    d.add_argument("--hidden", type=int, default=128)
    d.add_argument("--lr", type=float, default=2e-3)
    d.add_argument("--num-data", type=int, default=20000)
    d.add_argument("--num-samples", type=int, default=4000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="samples.png")
    d.add_argument("--no-progress", action="store_true")
    t = sub.add_parser("train", help="train from a TOML/YAML config, with checkpoints")
    t.add_argument("--config", required=True, help="a .toml or .yaml file (see docs/cli.md)")
    t.add_argument("--out-dir", help="override run.out_dir")
    t.add_argument("--steps", type=int, help="override train.steps (the total)")
    t.add_argument("--no-progress", action="store_true")
    s = sub.add_parser("sample", help="sample a trained run (EMA params)")
    s.add_argument("--config", required=True)
    s.add_argument("--out-dir", help="override run.out_dir")
    s.add_argument("--checkpoint", help="checkpoint directory (default run.out_dir/checkpoints)")
    s.add_argument("--num", type=int, help="override sample.num")
    s.add_argument("--out", help="output .npz or .png (both are written; default out_dir)")
    s.add_argument("--guidance-scale", type=float, help="override sample.guidance_scale")
    s.add_argument("--class", dest="label", type=int, help="override sample.class")
    args = parser.parse_args(argv)
    from jaxdiff._errors import JaxdiffError

    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "train":
            return _train_cmd(args)
        if args.command == "sample":
            return _sample_cmd(args)
    except JaxdiffError as e:
        print(f"jaxdiff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that went bad after the checks (disk full, removed, ...)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"jaxdiff {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
