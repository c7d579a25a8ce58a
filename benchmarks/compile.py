"""First-call compile time of ``jaxdiff.sample`` per sampler, as a ratio to DDIM's, in one run.

For each network (the MLP score net on 2-D data; a small U-Net on 16x16x1 images) and each step
count (10, 50), every sampler is called twice through ``jaxdiff.sample`` with its defaults on a
batch of 64, after ``jax.clear_caches()``: the first call traces, compiles and runs, the second
only runs. Compile seconds = first - second. Reported as seconds and as a ratio to DDIM's at the
same network and step count (the issue's bound: no sampler above 2x DDIM). Each step count
compiles once, as a user's first call does.

Usage: ``python benchmarks/compile.py [--quick] [--repeats 3] [--out benchmarks/results]`` (the median of ``--repeats`` compiles per entry); prints a table,
writes ``compile.json`` and ``compile.png``. ``--quick``: the MLP, 10 steps, five samplers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

import jaxdiff
from jaxdiff import models, samplers, schedules
from jaxdiff.unet import UNet

SAMPLERS = {
    "DDIM": samplers.ddim,
    "DDPM": samplers.ddpm,
    "DPM-Solver++(2M)": lambda: samplers.dpm_solver_pp(2),
    "DPM-Solver++(3M)": lambda: samplers.dpm_solver_pp(3),
    "DPM-Solver++(2S)": lambda: samplers.dpm_solver_pp(2, variant="singlestep"),
    "DPM-Solver-2": lambda: samplers.dpm_solver(2),
    "DPM-Solver-3": lambda: samplers.dpm_solver(3),
    "SDE-DPM-Solver++(2M)": samplers.sde_dpm_solver_pp,
    "UniPC-3": lambda: samplers.unipc(3),
    "DEIS-3": lambda: samplers.deis(3),
    "EDM Euler": samplers.euler,
    "EDM Heun": samplers.heun,
    "Li accelerated ODE": samplers.accelerated_ode,
    "Li accelerated SDE": samplers.accelerated_sde,
    "GHVB 2.8": samplers.ghvb,
    "HB DPM-Solver++(2M)": samplers.heavy_ball,
    "Time-shift DDIM": samplers.time_shift,
}
QUICK = ("DDIM", "DPM-Solver++(2M)", "UniPC-3", "DPM-Solver-3", "EDM Heun")


def networks(quick):
    key = jax.random.PRNGKey(0)
    out = {}
    x = jnp.zeros((64, 2))
    model, params = models.as_denoiser(models.MLPScoreNet(), key, x, parametrization="eps")
    out["MLP (2-D)"] = (model, params, x.shape)
    if not quick:
        x = jnp.zeros((64, 16, 16, 1))
        net = UNet(channels=16, channel_mults=(1, 2), groups=4, num_heads=2, attention_levels=(1,))
        model, params = models.as_denoiser(net, key, x, parametrization="eps")
        out["UNet (16x16x1)"] = (model, params, x.shape)
    return out


def compile_seconds(model, params, schedule, shape, sampler, steps, repeats=1):
    """Median over ``repeats`` of (first-call minus second-call seconds, second-call seconds)."""
    runs = [_compile_once(model, params, schedule, shape, sampler, steps) for _ in range(repeats)]
    comps, secs = zip(*runs, strict=True)
    return statistics.median(comps), statistics.median(secs)


def _compile_once(model, params, schedule, shape, sampler, steps):
    jax.clear_caches()
    key = jax.random.PRNGKey(1)
    t0 = time.perf_counter()
    jaxdiff.sample(key, model, params, schedule, shape, sampler, steps).block_until_ready()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jaxdiff.sample(key, model, params, schedule, shape, sampler, steps).block_until_ready()
    second = time.perf_counter() - t0
    return first - second, second


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--repeats", type=int, default=3, help="median of this many compiles (noise ~20-30%%)"
    )
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    schedule = schedules.vp_discrete()
    names = QUICK if args.quick else tuple(SAMPLERS)
    step_counts = (10,) if args.quick else (10, 50)
    rows = []
    print(
        f"{'network':16s} {'sampler':22s} {'steps':>5s} {'compile s':>10s} {'/DDIM':>6s} {'run s':>7s}"
    )
    for net_name, (model, params, shape) in networks(args.quick).items():
        for steps in step_counts:
            base = None
            for name in names:
                comp, run = compile_seconds(
                    model, params, schedule, shape, SAMPLERS[name](), steps, args.repeats
                )
                base = comp if name == "DDIM" else base
                rows.append(dict(network=net_name, sampler=name, steps=steps, compile=comp,
                                 run=run, ratio=comp / base))  # fmt: skip
                print(f"{net_name:16s} {name:22s} {steps:5d} {comp:10.2f} {comp / base:6.2f} "
                      f"{run:7.3f}", flush=True)  # fmt: skip
    worst = max(rows, key=lambda r: r["ratio"])
    print(
        f"\nworst compile ratio to DDIM: {worst['ratio']:.2f} ({worst['sampler']}, "
        f"{worst['network']}, {worst['steps']} steps); bound 2.0"
    )
    with open(os.path.join(args.out, "compile.json"), "w") as f:
        json.dump(dict(rows=rows, worst=worst), f, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    labels = sorted({(r["network"], r["steps"]) for r in rows})
    width = 0.8 / len(labels)
    for j, (net_name, steps) in enumerate(labels):
        rs = [r for r in rows if r["network"] == net_name and r["steps"] == steps]
        ax.bar([i + j * width for i in range(len(rs))], [r["ratio"] for r in rs], width,
               label=f"{net_name}, {steps} steps")  # fmt: skip
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.axhline(2.0, color="k", ls="--", lw=1)
    ax.set_ylabel("compile seconds / DDIM's")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "compile.png"), dpi=110)
    print(f"wrote {args.out}/compile.json and {args.out}/compile.png")


if __name__ == "__main__":
    main()
