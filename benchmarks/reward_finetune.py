"""Reward fine-tuning benchmark (DRaFT-K / AlignProp with a KL or score-matching regulariser).

(a) Trade-off. An ``MLPScoreNet`` (hidden 64, depth 2) pretrained with DSM on 8 Gaussians (means
on the radius-2 circle, std 0.1) is fine-tuned to push its samples right, ``r(x) = x_1``, by
backpropagating through all ``N = 10`` steps of a sampler (``K = N``, ``jax.checkpoint``),
batch 64, adam 1e-4. Regularisers: the path KL with ``lambda`` in {0, 0.1, 1} for DDIM
(deterministic: the eps-gap surrogate) and DDPM (the exact KL of the Gaussian transitions), and
the score-matching loss on the data with ``lambda = 10``. Per step: the batch's mean reward and
mean distance to the nearest mode. At the end, on 2048 fresh samples: mean reward, mean distance
to the nearest mode, and the sliced W2 to the KL-regularised optimum ``p(x) exp(r(x)/lambda) / Z``
(for a linear reward and a Gaussian mixture, again a Gaussian mixture: components shifted by
``Sigma_k beta / lambda``, weights ``pi_k exp(beta.mu_k/lambda + beta' Sigma_k beta / (2
lambda^2))``), next to the sliced-W2 floor of two samples of the same law.

(b) Cost. Seconds per fine-tuning step versus K (N = 20 DDIM steps, MLPScoreNet hidden 128
depth 3, batch 256, no regulariser), with and without ``jax.checkpoint``, and the compiled
program's temp memory (``memory_analysis()``).

Usage: ``python benchmarks/reward_finetune.py [--quick] [--out benchmarks/results]``; prints two
tables, writes ``reward_finetune.json`` and ``reward_finetune.png``.
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

from jaxdiff import analytic, metrics, models, sample, samplers, schedules, train
from jaxdiff.optimize import finetune as ft

RADIUS, STD = 2.0, 0.1


def mixture():
    ang = np.arange(8) * 2 * np.pi / 8
    means = (RADIUS * np.stack([np.cos(ang), np.sin(ang)], -1)).astype(np.float32)
    return means, analytic.gaussian_mixture(None, means, STD**2)


def tilted(means, beta, lam):
    """p(x) exp(beta.x / lam) / Z for the isotropic mixture: shifted, reweighted components."""
    logw = means @ beta / lam + STD**2 * float(beta @ beta) / (2 * lam**2)
    w = np.exp(logw - logw.max())
    return analytic.gaussian_mixture(w / w.sum(), means + STD**2 * beta / lam, STD**2)


def pretrain(steps: int):
    means, mix = mixture()
    sch = schedules.vp_linear()
    data = mix.sample(jax.random.key(1), 8192)
    net = models.MLPScoreNet(hidden=64, depth=2)
    model, params = models.as_denoiser(
        net, jax.random.key(0), jnp.zeros((1, 2)), parametrization="eps"
    )
    params = train.fit(
        jax.random.key(2), model, params, sch, data, optax.adam(2e-3), steps,
        batch_size=256, ema_decay=0.0, progress=False,
    )  # fmt: skip
    return sch, model, params, data, means, mix


class Linear:
    """r(x) = x @ beta (a plain function object; beta fixed)."""

    def __init__(self, beta):
        self.beta = jnp.asarray(beta)

    def __call__(self, x):
        return x @ self.beta


def tradeoff(iters: int, pre_steps: int) -> dict:
    t0 = time.perf_counter()
    sch, model, params, data, means, mix = pretrain(pre_steps)
    t_pre = time.perf_counter() - t0
    beta = np.array([1.0, 0.0], np.float32)
    reward = Linear(beta)
    opt = optax.adam(1e-4)
    runs = [
        ("ddim", "kl", 0.0),
        ("ddim", "kl", 0.1),
        ("ddim", "kl", 1.0),
        ("ddpm", "kl", 0.0),
        ("ddpm", "kl", 0.1),
        ("ddpm", "kl", 1.0),
        ("ddim", "score_matching", 10.0),
    ]
    smps = {"ddim": samplers.ddim(), "ddpm": samplers.ddpm()}
    n_eval = 2048
    key_eval = jax.random.key(7)
    out = {"pretrain_steps": pre_steps, "pretrain_seconds": t_pre, "iters": iters, "runs": {}}

    def evaluate(p, smp, lam):
        x = sample(key_eval, model, p, sch, (n_eval, 2), smps[smp], 10)
        row = {
            "reward": float(jnp.mean(reward(x))),
            "dist_to_mode": float(jnp.mean(ft.nearest_distance(x, means))),
        }
        if lam > 0:
            target = tilted(means, beta, lam).sample(jax.random.key(8), n_eval)
            row["sw2_to_tilted"] = float(metrics.sliced_wasserstein(jax.random.key(9), x, target))
        return row

    for smp in smps:
        out[f"pretrained_{smp}"] = evaluate(params, smp, 0.0)
    for smp, reg, lam in runs:
        st = ft.init(
            jax.random.key(3), model, params, sch, opt, sampler=smps[smp], num_steps=10,
            batch_size=64, regularizer=reg, reg_weight=lam,
        )  # fmt: skip
        t0 = time.perf_counter()
        st, h = ft.run(st, reward, iters, data=data, eval_data=means, progress=False)
        name = f"{smp} {reg} lambda={lam:g}"
        row = evaluate(st.params, smp, lam if reg == "kl" else 0.0)
        row.update(
            sampler=smp,
            regularizer=reg,
            reg_weight=lam,
            seconds=time.perf_counter() - t0,
            history={k: h[k].tolist() for k in ("reward", "dist_to_data", "regularizer")},
        )
        out["runs"][name] = row
    floor = metrics.sliced_wasserstein_floor(jax.random.key(10), mixture()[1].sample, n_eval)
    out["sw2_floor"] = float(floor)
    out["tilted_mean_reward"] = {
        lam: float(jnp.mean(reward(tilted(means, beta, lam).sample(jax.random.key(8), 20000))))
        for lam in (0.1, 1.0)
    }
    return out


def cost(ks, repeat: int) -> dict:
    sch = schedules.vp_linear()
    net = models.MLPScoreNet(hidden=128, depth=3)
    model, params = models.as_denoiser(
        net, jax.random.key(0), jnp.zeros((1, 2)), parametrization="eps"
    )
    opt = optax.adam(1e-4)
    reward = Linear(np.array([1.0, 0.0], np.float32))
    rows = {"k": list(ks), "checkpoint": {}, "no_checkpoint": {}}
    for ck, name in ((True, "checkpoint"), (False, "no_checkpoint")):
        secs, temp = [], []
        for k in ks:
            st = ft.init(
                jax.random.key(1), model, params, sch, opt, num_steps=20, k=k, batch_size=256,
                regularizer="none", checkpoint=ck,
            )  # fmt: skip
            parts = [ft._partition(a) for a in (reward, None, None)]
            lowered = ft._step_jit.lower(st, tuple(p[0] for p in parts), tuple(p[1] for p in parts))
            mem = lowered.compile().memory_analysis()
            temp.append(None if mem is None else int(mem.temp_size_in_bytes))
            st, m = ft.jit_step(st, reward)  # compile + warm up
            jax.block_until_ready(m)
            ts = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                st, m = ft.jit_step(st, reward)
                jax.block_until_ready(m)
                ts.append(time.perf_counter() - t0)
            secs.append(float(np.median(ts)))
        rows[name] = {"seconds_per_step": secs, "temp_bytes": temp}
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    iters = 60 if args.quick else 300
    pre_steps = 1000 if args.quick else 3000
    ks = (1, 5, 20) if args.quick else (1, 2, 5, 10, 20)
    repeat = 3 if args.quick else 10

    t_all = time.perf_counter()
    tr = tradeoff(iters, pre_steps)
    print(
        f"(a) push right r(x) = x_1 on 8 Gaussians (radius {RADIUS}, std {STD}); MLPScoreNet "
        f"pretrained {pre_steps} DSM steps; N = K = 10, batch 64, adam 1e-4, {iters} steps; "
        f"2048 fresh samples (sliced-W2 floor {tr['sw2_floor']:.3f})"
    )
    print(f"{'run':32s} {'reward':>7s} {'dist':>7s} {'SW2 tilt':>8s} {'s':>6s}")
    for smp in ("ddim", "ddpm"):
        row = tr[f"pretrained_{smp}"]
        print(f"{'pretrained (' + smp + ')':32s} {row['reward']:7.3f} {row['dist_to_mode']:7.3f}")
    for name, row in tr["runs"].items():
        sw = row.get("sw2_to_tilted")
        sws = f"{sw:8.3f}" if sw is not None else f"{'':8s}"
        print(
            f"{name:32s} {row['reward']:7.3f} {row['dist_to_mode']:7.3f} {sws} "
            f"{row['seconds']:6.1f}"
        )
    for lam, v in tr["tilted_mean_reward"].items():
        print(f"  KL optimum p exp(r/lambda)/Z, lambda={lam:g}: mean reward {v:.3f}")

    cs = cost(ks, repeat)
    print(
        "\n(b) one fine-tuning step: N = 20 DDIM steps, MLPScoreNet hidden 128 depth 3, "
        f"batch 256, float32, median of {repeat}"
    )
    print(
        f"{'K':>3s} {'ms (ckpt)':>10s} {'ms (no ckpt)':>13s} {'temp MB ckpt':>13s} {'no ckpt':>8s}"
    )
    for i, k in enumerate(cs["k"]):
        a, b = cs["checkpoint"], cs["no_checkpoint"]
        ta = a["temp_bytes"][i]
        tb = b["temp_bytes"][i]
        print(
            f"{k:3d} {1e3 * a['seconds_per_step'][i]:10.1f} {1e3 * b['seconds_per_step'][i]:13.1f} "
            f"{(ta or 0) / 1e6:13.2f} {(tb or 0) / 1e6:8.2f}"
        )

    out = {
        "tradeoff": tr,
        "cost": cs,
        "backend": jax.default_backend(),
        "devices": [str(dv) for dv in jax.devices()],
        "total_seconds": time.perf_counter() - t_all,
    }
    with open(os.path.join(args.out, "reward_finetune.json"), "w") as f:
        json.dump(out, f, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(v, w=10):
        v = np.asarray(v)
        return np.convolve(v, np.ones(w) / w, mode="valid") if v.size >= w else v

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, row in tr["runs"].items():
        axes[0].plot(smooth(row["history"]["reward"]), label=name)
        axes[1].semilogy(smooth(row["history"]["dist_to_data"]), label=name)
    axes[0].set_yscale("symlog", linthresh=3.0)
    axes[0].set_title("batch reward (moving average; symlog)")
    axes[1].set_title("distance to the nearest mode")
    for ax in axes[:2]:
        ax.set_xlabel("fine-tuning step")
    axes[0].legend(fontsize=7)
    for name, ls in (("checkpoint", "o-"), ("no_checkpoint", "s--")):
        axes[2].plot(cs["k"], [1e3 * s for s in cs[name]["seconds_per_step"]], ls, label=name)
    axes[2].set_xlabel("K (differentiable steps of N = 20)")
    axes[2].set_ylabel("ms per step")
    axes[2].set_title("cost of a step vs K")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "reward_finetune.png"), dpi=110)
    print(
        f"wrote {args.out}/reward_finetune.json and {args.out}/reward_finetune.png "
        f"({out['total_seconds']:.0f} s)"
    )


if __name__ == "__main__":
    main()
