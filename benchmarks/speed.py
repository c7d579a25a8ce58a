"""Sampling speed with a real network: jaxdiff vs diffusers, and jaxdiff vs the network alone.

A fixed MLP score network (sinusoidal time embedding, 3 hidden SiLU layers of width 256), with the
SAME weights in JAX and in PyTorch, samples 4096 points in 2-D at NFE 10:

* jaxdiff: ``jaxdiff.sample`` with DPM-Solver++(2M) (one jitted scan);
* diffusers: ``DPMSolverMultistepScheduler`` (2M) driving the torch copy of the network in the
  usual Python loop (``torch.no_grad``, float32, CPU);
* the cost of the NFE network evaluations alone in JAX (one jitted scan of 10 calls).

Reports seconds (best of 5 after warm-up) and the two ratios the fast-sampler issue targets.
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


def init_params(key):
    sizes = [(DIM + EMB, WIDTH), (WIDTH, WIDTH), (WIDTH, WIDTH), (WIDTH, DIM)]
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
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import torch
    from diffusers import DPMSolverMultistepScheduler

    torch.set_num_threads(os.cpu_count() or 1)
    params = init_params(jax.random.PRNGKey(0))
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

    def ours():
        jaxdiff.sample(
            jax.random.PRNGKey(2), model, params, sch, x_T, sampler, ts=ts
        ).block_until_ready()

    model_only_fn = jax.jit(
        lambda p, x: jax.lax.scan(lambda x, t: (x + 0.0 * model(p, x, t), None), x, ts[:-1])[0]
    )

    def model_only():
        model_only_fn(params, x_T).block_until_ready()

    f = torch_mlp(params)
    x_t = torch.tensor(np.asarray(x_T))

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

    sec = {
        "jaxdiff DPM-Solver++(2M)": best_of(ours),
        "JAX network evaluations alone": best_of(model_only),
        "diffusers DPMSolverMultistep (torch)": best_of(theirs),
    }
    # same weights, same problem: the two samples agree
    ours_x = np.asarray(
        jaxdiff.sample(jax.random.PRNGKey(2), model, params, sch, x_T, sampler, ts=ts)
    )
    diff = float(np.linalg.norm(ours_x - theirs().numpy()) / np.linalg.norm(ours_x))
    speedup = sec["diffusers DPMSolverMultistep (torch)"] / sec["jaxdiff DPM-Solver++(2M)"]
    overhead = sec["jaxdiff DPM-Solver++(2M)"] / sec["JAX network evaluations alone"]
    print(f"MLP 3x{WIDTH}, n={args.n}, NFE={args.nfe}, CPU threads={os.cpu_count()}")
    for k, v in sec.items():
        print(f"{k:40s} {v * 1e3:9.2f} ms")
    print(f"speed-up over diffusers: {speedup:.2f}x (target >= 3)")
    print(f"jaxdiff / network alone: {overhead:.3f} (target <= 1.15)")
    print(f"relative difference of the two samples: {diff:.2e}")
    out = dict(seconds=sec, speedup_vs_diffusers=speedup, overhead_vs_model=overhead, rel_diff=diff)
    with open(os.path.join(args.out, "speed.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.barh(list(sec), [v * 1e3 for v in sec.values()])
    ax.set_xlabel("ms per 4096-sample batch")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "speed.png"), dpi=110)
    print(f"wrote {args.out}/speed.json and {args.out}/speed.png")


if __name__ == "__main__":
    main()
