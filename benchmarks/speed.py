"""Sampling speed with a real network: jaxdiff vs diffusers, and jaxdiff vs the network alone.

A fixed MLP score network (sinusoidal time embedding, 3 hidden SiLU layers of width 256), with the
SAME weights in JAX and in PyTorch, samples 4096 points in 2-D at NFE 10:

* jaxdiff: ``jaxdiff.sample`` with DPM-Solver++(2M) (one jitted scan);
* diffusers: ``DPMSolverMultistepScheduler`` (2M) driving the torch copy of the network in the
  usual Python loop (``torch.no_grad``, float32, CPU);
* the cost of the NFE network evaluations alone in JAX (the fastest of: one jitted scan of 10
  calls, the same scan unrolled, 10 separately jitted calls), and in torch (the same 10 calls in
  a Python loop).

jaxdiff is timed with the rolled step loop and with ``unroll=True``; "jaxdiff best" is the faster.

Reports seconds (best of 5 after warm-up) and the two ratios the fast-sampler issue targets,
first for the headline network (width 256), then for a sweep of widths: the speed-up over
diffusers is the ratio of the two frameworks' network costs plus diffusers' per-step Python
overhead, so it grows as the network shrinks.
Needs the ``bench`` extra (torch 2.13.0 CPU, diffusers). Writes ``speed.json`` and ``speed.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff
from jaxdiff import samplers, schedules
from jaxdiff.denoiser import Denoiser

WIDTH, EMB, DIM = 256, 32, 2


def init_params(key, width=WIDTH):
    sizes = [(DIM + EMB, width), (width, width), (width, width), (width, DIM)]
    params = []
    for k, (i, o) in zip(jax.random.split(key, len(sizes)), sizes, strict=True):
        params.append((jax.random.normal(k, (i, o)) / math.sqrt(i), jnp.zeros((o,))))
    return params


def embed(t):
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(EMB // 2) / (EMB // 2))
    arg = 1000.0 * t[:, None] * freqs
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], -1)


def mlp_apply(params, x, t, cond=None):
    h = jnp.concatenate([x, embed(t)], -1)
    for w, b in params[:-1]:
        h = jax.nn.silu(h @ w + b)
    w, b = params[-1]
    return h @ w + b


def torch_mlp(params):
    import torch

    ws = [(torch.tensor(np.asarray(w)), torch.tensor(np.asarray(b))) for w, b in params]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(EMB // 2) / (EMB // 2))

    def f(x, t):
        arg = 1000.0 * t[:, None] * freqs
        h = torch.cat([x, torch.sin(arg), torch.cos(arg)], -1)
        for w, b in ws[:-1]:
            h = torch.nn.functional.silu(h @ w + b)
        w, b = ws[-1]
        return h @ w + b

    return f


def best_of(fn, repeat=5):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--widths", type=int, nargs="*", default=[16, 64, 128, 512])
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import torch
    from diffusers import DPMSolverMultistepScheduler

    torch.set_num_threads(os.cpu_count() or 1)
    sch = schedules.vp_discrete()
    model = Denoiser(apply=mlp_apply, parametrization="eps", event_shape=(DIM,))
    x_T = jax.random.normal(jax.random.PRNGKey(1), (args.n, DIM))
    common = dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    sched = DPMSolverMultistepScheduler(
        **common, solver_order=2, final_sigmas_type="sigma_min", lower_order_final=False
    )
    sched.set_timesteps(args.nfe)
    ts = jnp.asarray(
        np.concatenate([(np.asarray(sched.timesteps, np.float64) + 1) / 1000.0, [1e-3]]),
        jnp.float32,
    )
    sampler = samplers.dpm_solver_pp(2)
    x_t = torch.tensor(np.asarray(x_T))

    def timings(params):
        def ours(unroll=1):
            def run():
                jaxdiff.sample(
                    jax.random.PRNGKey(2), model, params, sch, x_T, sampler, ts=ts, unroll=unroll
                ).block_until_ready()

            return run

        # the network alone, three ways; the fastest is the baseline
        scan_fn = jax.jit(
            lambda p, x: jax.lax.scan(lambda x, t: (x + 0.0 * model(p, x, t), None), x, ts[:-1])[0]
        )
        unrolled_fn = jax.jit(
            lambda p, x: jax.lax.scan(
                lambda x, t: (x + 0.0 * model(p, x, t), None), x, ts[:-1], unroll=True
            )[0]
        )
        one_fn = jax.jit(lambda p, x, t: model(p, x, t))

        def net_scan():
            scan_fn(params, x_T).block_until_ready()

        def net_unrolled():
            unrolled_fn(params, x_T).block_until_ready()

        def net_calls():
            for t in ts[:-1]:
                one_fn(params, x_T, t).block_until_ready()

        f = torch_mlp(params)

        def theirs():
            s = DPMSolverMultistepScheduler(
                **common, solver_order=2, final_sigmas_type="sigma_min", lower_order_final=False
            )
            s.set_timesteps(args.nfe)
            x = x_t.clone()
            with torch.no_grad():
                for t in s.timesteps:
                    tt = torch.full((x.shape[0],), (float(t) + 1.0) / 1000.0)
                    x = s.step(f(x, tt), t, x).prev_sample
            return x

        def torch_model_only():
            x = x_t.clone()
            with torch.no_grad():
                for t in np.asarray(ts[:-1]):
                    x = x + 0.0 * f(x, torch.full((x.shape[0],), float(t)))
            return x

        sec = {
            "jaxdiff DPM-Solver++(2M)": best_of(ours(1)),
            "jaxdiff DPM-Solver++(2M), unroll=True": best_of(ours(True)),
            "JAX network alone (scan)": best_of(net_scan),
            "JAX network alone (unrolled)": best_of(net_unrolled),
            "JAX network alone (10 jitted calls)": best_of(net_calls),
            "diffusers DPMSolverMultistep (torch)": best_of(theirs),
            "torch network evaluations alone": best_of(torch_model_only),
        }
        sec["JAX network evaluations alone"] = min(
            sec["JAX network alone (scan)"],
            sec["JAX network alone (unrolled)"],
            sec["JAX network alone (10 jitted calls)"],
        )
        sec["jaxdiff best"] = min(
            sec["jaxdiff DPM-Solver++(2M)"], sec["jaxdiff DPM-Solver++(2M), unroll=True"]
        )
        return sec, theirs

    params = init_params(jax.random.PRNGKey(0))
    sec, theirs = timings(params)
    # same weights, same problem: the two samples agree
    ours_x = np.asarray(
        jaxdiff.sample(jax.random.PRNGKey(2), model, params, sch, x_T, sampler, ts=ts)
    )
    diff = float(np.linalg.norm(ours_x - theirs().numpy()) / np.linalg.norm(ours_x))
    speedup = sec["diffusers DPMSolverMultistep (torch)"] / sec["jaxdiff best"]
    overhead = sec["jaxdiff best"] / sec["JAX network evaluations alone"]
    print(f"MLP 3x{WIDTH}, n={args.n}, NFE={args.nfe}, CPU threads={os.cpu_count()}")
    for k, v in sec.items():
        print(f"{k:40s} {v * 1e3:9.2f} ms")
    print(f"speed-up over diffusers: {speedup:.2f}x (target >= 3)")
    print(f"jaxdiff / network alone: {overhead:.3f} (target <= 1.15)")
    torch_net = sec["torch network evaluations alone"] / sec["JAX network evaluations alone"]
    print(f"torch network alone / JAX network alone: {torch_net:.2f}")
    print(f"relative difference of the two samples: {diff:.2e}")
    sweep = []
    print(
        f"\n{'width':>6s} {'jaxdiff ms':>11s} {'diffusers ms':>13s} {'speed-up':>9s} {'torch/JAX net':>14s}"
    )
    for width in args.widths:
        sw, _ = timings(init_params(jax.random.PRNGKey(0), width))
        row = dict(
            width=width,
            seconds=sw,
            speedup=sw["diffusers DPMSolverMultistep (torch)"] / sw["jaxdiff best"],
            net_ratio=sw["torch network evaluations alone"] / sw["JAX network evaluations alone"],
        )
        sweep.append(row)
        print(
            f"{width:6d} {sw['jaxdiff best'] * 1e3:11.2f} "
            f"{sw['diffusers DPMSolverMultistep (torch)'] * 1e3:13.2f} {row['speedup']:9.2f} "
            f"{row['net_ratio']:14.2f}"
        )
    out = dict(
        seconds=sec,
        speedup_vs_diffusers=speedup,
        overhead_vs_model=overhead,
        torch_net_over_jax_net=torch_net,
        rel_diff=diff,
        width_sweep=sweep,
    )
    with open(os.path.join(args.out, "speed.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3))
    ax.barh(list(sec), [v * 1e3 for v in sec.values()])
    ax.set_xlabel(f"ms per {args.n}-sample batch (width {WIDTH})")
    if sweep:
        ax2.semilogx(
            [r["width"] for r in sweep], [r["speedup"] for r in sweep], "-o", label="speed-up"
        )
        ax2.semilogx(
            [r["width"] for r in sweep],
            [r["net_ratio"] for r in sweep],
            "--s",
            label="torch/JAX net",
        )
        ax2.axhline(3.0, color="gray", lw=0.8)
        ax2.set_xlabel("MLP width")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "speed.png"), dpi=110)
    print(f"wrote {args.out}/speed.json and {args.out}/speed.png")


if __name__ == "__main__":
    main()
