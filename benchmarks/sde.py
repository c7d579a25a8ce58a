"""Reverse-SDE cost: the scan-based Euler-Maruyama kernel vs diffrax's Euler with Brownian trees.

Same SDE, same grid, same exact model (a 16-D, 8-component Gaussian mixture, VP-linear), batch
4096. Reports seconds per solve (after compilation) and the ratio to the cost of the NFE model
evaluations alone (one jitted scan that only calls the model), so the numbers are ratios measured
in one run. Writes ``sde.json`` and ``sde.png``.

Usage: ``python benchmarks/sde.py [--steps 100] [--batch 4096] [--out benchmarks/results]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from jaxdiff import analytic, samplers, schedules


def timeit(fn, *args, repeat=3):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    dist = analytic.gaussian_mixture(
        jnp.full((8,), 1 / 8), jax.random.normal(k1, (8, args.dim)), jnp.full((8,), 0.1)
    )
    sch = schedules.vp_linear()
    model, params = analytic.as_denoiser(dist, sch)
    x_T = jax.random.normal(k2, (args.batch, args.dim))
    ts = samplers.time_grid(sch, args.steps)

    def model_only(params, x):
        def body(x, t):
            return x + 0.0 * model(params, x, t), None

        return jax.lax.scan(body, x, ts[:-1])[0]

    rows = {}
    rows["model evaluations alone"] = timeit(jax.jit(model_only), params, x_T)
    for name, sampler in [
        ("Euler-Maruyama scan", samplers.euler_maruyama()),
        ("DDPM ancestral scan", samplers.ddpm()),
        ("diffrax Euler + VirtualBrownianTree", samplers.reverse_sde()),
    ]:
        run = jax.jit(lambda p, x, s=sampler: samplers.solve(k3, model, p, sch, x, ts, s)[0])
        rows[name] = timeit(run, params, x_T)
    base = rows["model evaluations alone"]
    print(f"reverse SDE, {args.steps} steps, batch {args.batch}, D={args.dim}, exact GMM model")
    print(f"{'method':40s} {'seconds':>9s} {'x model-only':>13s}")
    for name, sec in rows.items():
        print(f"{name:40s} {sec:9.3f} {sec / base:13.2f}")
    out = {
        "steps": args.steps,
        "batch": args.batch,
        "dim": args.dim,
        "seconds": rows,
        "ratio_to_model_only": {k: v / base for k, v in rows.items()},
        "diffrax_over_scan": rows["diffrax Euler + VirtualBrownianTree"]
        / rows["Euler-Maruyama scan"],
    }
    print(f"diffrax / scan: {out['diffrax_over_scan']:.1f}x")
    with open(os.path.join(args.out, "sde.json"), "w") as f:
        json.dump(out, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    names = list(rows)
    ax.barh(names, [rows[n] / base for n in names])
    ax.set_xlabel("time / time of the model evaluations alone")
    ax.set_title(f"reverse SDE, {args.steps} steps, batch {args.batch}")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "sde.png"), dpi=110)
    print(f"wrote {args.out}/sde.json and {args.out}/sde.png")


if __name__ == "__main__":
    main()
