"""Guidance benchmark: posterior accuracy of DPS vs exact reconstruction guidance, and the cost
of a look-ahead guided model evaluation.

(a) Accuracy. A linear-Gaussian inverse problem with a closed-form posterior (guidance.md 0.2(d)):
prior ``N(mu, S)`` in D = 8 (an exact analytic model, float64), ``y = A x + N(0, 0.1^2 I)`` with
``A`` 4 x 8 and ``x`` three prior standard deviations from ``mu`` (an informative measurement).
Each method samples with DDPM ancestral steps (10 ... 500) on the VP-linear schedule; the samples'
mean and covariance are compared with the exact law they should follow, the posterior's marginal
at ``t_end`` (``N(alpha mu_post, alpha^2 S_post + sigma^2 I)``; ``alpha ~ 1``, ``sigma ~ 0.01``).
Errors: ``||mean - target|| / sqrt(tr S_post)`` and ``||cov - target||_F / ||S_post||_F``, next to
their Monte-Carlo floors. Methods: ``reconstruction_guidance(cov="tweedie")`` (exact here: the
error is the sampler's discretisation error, it falls toward the floor), ``cov="pigdm"`` (an
isotropic ``r_t^2 I`` covariance, approximate for this non-isotropic prior) and ``dps`` (zeta = 1;
biased: the error levels off above the floor).

(b) Cost. An ``MLPScoreNet`` (hidden 256, depth 4) on D = 64, batch 1024, float32, jitted:
seconds for one unguided evaluation of the model and for one evaluation of the model guided by
``lookahead_gradient`` (one forward and one backward pass), ``dps`` with a 16 x 64 linear
operator, and ``naive_gradient`` (no backward pass); median over repeats, ratios to unguided.
The issue's target for look-ahead guidance is <= 3x.

Usage: ``python benchmarks/guidance.py [--quick] [--out benchmarks/results]``; prints two tables,
writes ``guidance.json`` and ``guidance.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import analytic, models, sample, samplers, schedules
from jaxdiff.guidance.base import guide
from jaxdiff.guidance.gradient import lookahead_gradient, naive_gradient
from jaxdiff.guidance.posterior import dps, reconstruction_guidance

STEPS = (10, 20, 50, 100, 200, 500)


def make_problem(dim=8, m=4, noise=0.1, far=3.0, seed=0):
    rng = np.random.default_rng(seed)
    mu = 0.5 * rng.normal(size=dim)
    lo = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    cov = lo @ lo.T + 0.3 * np.eye(dim)
    a = rng.normal(size=(m, dim)) / np.sqrt(dim)
    x_true = mu + far * np.linalg.cholesky(cov) @ rng.normal(size=dim)
    y = a @ x_true + noise * rng.normal(size=m)
    cov_post = np.linalg.inv(np.linalg.inv(cov) + a.T @ a / noise**2)
    mu_post = cov_post @ (np.linalg.solve(cov, mu) + a.T @ y / noise**2)
    return dict(mu=mu, cov=cov, a=a, y=y, noise=noise, mu_post=mu_post, cov_post=cov_post)


def accuracy(n: int, steps_list) -> dict:
    with jax.enable_x64(True):
        p = make_problem()
        sch = schedules.vp_linear()
        model, params = analytic.as_denoiser(analytic.gaussian(p["mu"], p["cov"]), sch)
        a = jnp.asarray(p["a"])

        def op(x):
            return x @ a.T

        y = jnp.asarray(p["y"])
        methods = {
            "reconstruction (tweedie, exact)": reconstruction_guidance(op, y, noise_std=p["noise"]),
            "reconstruction (pigdm)": reconstruction_guidance(
                op, y, noise_std=p["noise"], cov="pigdm"
            ),
            "dps (zeta=1)": dps(op, y, noise_std=p["noise"]),
        }
        alpha, sigma = (float(v) for v in sch.alpha_sigma(sch.t_end))
        d = p["mu"].shape[0]
        t_mean = alpha * p["mu_post"]
        t_cov = alpha**2 * p["cov_post"] + sigma**2 * np.eye(d)
        scale_m = np.sqrt(np.trace(p["cov_post"]))
        scale_c = np.linalg.norm(p["cov_post"])
        # Monte-Carlo floors: E||mean err||^2 = tr(C)/n; E||cov err||_F^2 ~ (||C||_F^2 + tr(C)^2)/n
        floor_m = np.sqrt(np.trace(t_cov) / n) / scale_m
        floor_c = np.sqrt((np.linalg.norm(t_cov) ** 2 + np.trace(t_cov) ** 2) / n) / scale_c
        out = {
            "n_samples": n,
            "steps": list(steps_list),
            "mc_floor": {"mean": floor_m, "cov": floor_c},
            "prior_mean_error": float(np.linalg.norm(p["mu"] - p["mu_post"]) / scale_m),
            "methods": {},
        }
        key = jax.random.PRNGKey(1)
        for name, term in methods.items():
            gm = guide(model, sch, term)
            rows = {"mean": [], "cov": [], "seconds": []}
            for steps in steps_list:
                t0 = time.perf_counter()
                xs = np.asarray(sample(key, gm, params, sch, (n, d), samplers.ddpm(), steps))
                rows["seconds"].append(time.perf_counter() - t0)
                rows["mean"].append(float(np.linalg.norm(xs.mean(0) - t_mean) / scale_m))
                rows["cov"].append(float(np.linalg.norm(np.cov(xs.T) - t_cov) / scale_c))
            out["methods"][name] = rows
    return out


def median_time(fn, *args, repeat: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def cost(batch: int, repeat: int, dim=64, hidden=256, depth=4) -> dict:
    key = jax.random.PRNGKey(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x = jax.random.normal(k1, (batch, dim), jnp.float32)
    net = models.MLPScoreNet(hidden=hidden, depth=depth, zero_init_out=False)
    model, params = models.as_denoiser(net, k2, x[:1], parametrization="eps")
    sch = schedules.vp_linear()
    t = jnp.full((batch,), 0.5, jnp.float32)
    g = jax.random.normal(k3, (dim,), jnp.float32)
    a = jax.random.normal(k4, (16, dim), jnp.float32) / np.sqrt(dim)
    y = jnp.zeros((16,), jnp.float32)

    @jax.jit
    def evaluate(m, params, x, t):
        return m(params, x, t)

    rows = {
        "unguided": model,
        "lookahead_gradient": guide(model, sch, lookahead_gradient(g, 1.0)),
        "dps (16 x 64 linear A)": guide(model, sch, dps(lambda z: z @ a.T, y, noise_std=0.1)),
        "naive_gradient": guide(model, sch, naive_gradient(g, 1.0)),
    }
    secs = {k: median_time(evaluate, m, params, x, t, repeat=repeat) for k, m in rows.items()}
    base = secs["unguided"]
    return {
        "batch": batch,
        "dim": dim,
        "hidden": hidden,
        "depth": depth,
        "repeat": repeat,
        "seconds": secs,
        "ratio_to_unguided": {k: v / base for k, v in secs.items()},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples, steps and repeats")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    n = 500 if args.quick else 4000
    steps_list = (10, 50, 200) if args.quick else STEPS
    repeat = 5 if args.quick else 30

    t_all = time.perf_counter()
    acc = accuracy(n, steps_list)
    print(
        f"(a) linear-Gaussian inverse problem, D=8, M=4, noise 0.1, DDPM, {n} samples, float64; "
        f"errors relative to the posterior's scale (prior mean error "
        f"{acc['prior_mean_error']:.2f})"
    )
    print(f"{'method':34s} {'steps':>5s} {'mean err':>9s} {'cov err':>9s}")
    for name, rows in acc["methods"].items():
        for i, steps in enumerate(acc["steps"]):
            print(f"{name:34s} {steps:5d} {rows['mean'][i]:9.4f} {rows['cov'][i]:9.4f}")
    print(
        f"{'Monte-Carlo floor':34s} {'':5s} {acc['mc_floor']['mean']:9.4f} "
        f"{acc['mc_floor']['cov']:9.4f}"
    )

    cst = cost(1024, repeat)
    print(
        f"\n(b) one model evaluation, MLPScoreNet hidden {cst['hidden']} depth {cst['depth']}, "
        f"D={cst['dim']}, batch {cst['batch']}, float32, jitted, median of {repeat}"
    )
    print(f"{'model':34s} {'ms':>9s} {'x unguided':>11s}")
    for name, sec in cst["seconds"].items():
        print(f"{name:34s} {1e3 * sec:9.3f} {cst['ratio_to_unguided'][name]:11.2f}")
    look = cst["ratio_to_unguided"]["lookahead_gradient"]
    print(
        f"look-ahead / unguided = {look:.2f}x (target <= 3x: {'met' if look <= 3 else 'NOT met'})"
    )

    out = {
        "accuracy": acc,
        "cost": cst,
        "backend": jax.default_backend(),
        "devices": [str(dv) for dv in jax.devices()],
        "total_seconds": time.perf_counter() - t_all,
    }
    with open(os.path.join(args.out, "guidance.json"), "w") as f:
        json.dump(out, f, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, rows in acc["methods"].items():
        axes[0].loglog(acc["steps"], rows["mean"], "o-", label=name)
        axes[1].loglog(acc["steps"], rows["cov"], "o-", label=name)
    for ax, which, title in [(axes[0], "mean", "mean error"), (axes[1], "cov", "covariance error")]:
        ax.axhline(acc["mc_floor"][which], color="k", ls="--", lw=1, label="Monte-Carlo floor")
        ax.set_xlabel("DDPM steps")
        ax.set_title(f"posterior {title} (relative)")
    axes[0].legend(fontsize=7)
    names = list(cst["seconds"])
    axes[2].barh(names, [cst["ratio_to_unguided"][k] for k in names])
    axes[2].axvline(3.0, color="r", ls="--", lw=1, label="target 3x")
    axes[2].set_xlabel("time / unguided model evaluation")
    axes[2].set_title(f"cost, batch {cst['batch']}, D={cst['dim']}")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "guidance.png"), dpi=110)
    print(
        f"wrote {args.out}/guidance.json and {args.out}/guidance.png ({out['total_seconds']:.0f} s)"
    )


if __name__ == "__main__":
    main()
