"""DiT vs MLP on Gaussian-process sequences: relative score error against the exact score.

Data: ``jaxdiff.analytic.gp_sequence(L=32, lengthscale=l, kernel="exp")`` (an Ornstein-Uhlenbeck
sequence, one channel) for a few lengthscales; the network sees ``(B, L, 1)`` sequences, the exact
score is the closed form ``-(alpha^2 K + sigma^2 I)^{-1} x_t`` on the flattened vector (motivation:
Fu et al. arXiv 2407.16134, diffusion transformers learning spatial-temporal dependence).

Models (VP-linear schedule, eps-prediction, DSM loss, Adam with cosine decay, same steps, batch
and data for both):

* ``DiT(hidden=64, depth=2, num_heads=4, patch_size=4)`` on ``(B, 32, 1)``;
* ``MLPScoreNet`` on the flattened ``(B, 32)``, its width chosen so that its parameter count is
  the closest to the DiT's (depth 3).

Metric at each ``t`` of a grid: ``E||s_theta(x_t, t) - s*(x_t, t)||^2 / E||s*(x_t, t)||^2`` over
``n_eval`` exact draws of ``x_t`` (0 = exact, 1 = as bad as predicting zero).

Usage: ``python benchmarks/dit_gp.py [--quick] [--steps N] [--out benchmarks/results]``; prints a
table, writes ``dit_gp.json`` and ``dit_gp.png``.
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

from jaxdiff import analytic, models, schedules
from jaxdiff.dit import DiT
from jaxdiff.train import train

L = 32
T_GRID = (0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)


def n_params(params) -> int:
    return int(sum(np.size(p) for p in jax.tree.leaves(params)))


def matched_mlp(target: int, x_example, key):
    """The depth-3 MLPScoreNet whose parameter count is closest to ``target``."""
    best = None
    for hidden in range(32, 513, 8):
        net = models.MLPScoreNet(hidden=hidden, depth=3)
        shapes = jax.eval_shape(net.init, key, x_example, jnp.ones(1))
        n = int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes)))
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (hidden, n)
    return models.MLPScoreNet(hidden=best[0], depth=3)


def rel_score_error(model, params, dist, sched, shape, ts, n_eval, key):
    """Relative score error at each t (exact x_t draws, the same for every model)."""
    errs = []
    for i, t in enumerate(ts):
        xt = dist.sample_t(jax.random.fold_in(key, i), n_eval, t, sched)
        s_true = dist.score(xt, t, sched)
        pred = model.predict(params, xt.reshape((n_eval, *shape)), t, None, sched, to="score")
        d = pred.reshape(xt.shape) - s_true
        errs.append(float(jnp.mean(jnp.sum(d**2, -1)) / jnp.mean(jnp.sum(s_true**2, -1))))
    return errs


def run(lengthscale, steps, batch, n_data, n_eval, seed=0):
    key = jax.random.key(seed)
    sched = schedules.vp_linear()
    dist = analytic.gp_sequence(L, lengthscale=lengthscale, kernel="exp")
    data = dist.sample(jax.random.fold_in(key, 0), n_data)
    opt = optax.adam(optax.cosine_decay_schedule(2e-3, steps, alpha=0.05))
    out = {}
    dit_net = DiT(hidden=64, depth=2, num_heads=4, patch_size=4)
    dit_model, dit_params = models.as_denoiser(
        dit_net, jax.random.fold_in(key, 1), data[:1].reshape(1, L, 1), parametrization="eps"
    )
    mlp_net = matched_mlp(n_params(dit_params), data[:1], jax.random.fold_in(key, 2))
    mlp_model, mlp_params = models.as_denoiser(
        mlp_net, jax.random.fold_in(key, 2), data[:1], parametrization="eps"
    )
    for name, model, params, shape, d in (
        ("DiT", dit_model, dit_params, (L, 1), data.reshape(-1, L, 1)),
        (f"MLP(h={mlp_net.hidden})", mlp_model, mlp_params, (L,), data),
    ):
        t0 = time.perf_counter()
        state, hist = train(
            jax.random.fold_in(key, 3),
            model,
            params,
            sched,
            d,
            opt,
            steps,
            batch_size=batch,
            ema_decay=0.0,
            progress=False,
        )
        secs = time.perf_counter() - t0
        errs = rel_score_error(
            model, state.params, dist, sched, shape, T_GRID, n_eval, jax.random.fold_in(key, 4)
        )
        out[name] = dict(params=n_params(params), rel_err=errs, train_s=secs)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few steps, one lengthscale")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    steps = args.steps or (300 if args.quick else 1500)
    lengthscales = (4.0,) if args.quick else (2.0, 8.0)
    n_eval = 512 if args.quick else 2048
    os.makedirs(args.out, exist_ok=True)

    results = {}
    for ls in lengthscales:
        results[str(ls)] = run(ls, steps, batch=128, n_data=16384, n_eval=n_eval)

    print(f"relative score error E|s - s*|^2 / E|s*|^2, L={L}, exp kernel, {steps} steps")
    head = "lengthscale  model        params  " + "  ".join(f"t={t:<6g}" for t in T_GRID)
    print(head)
    print("-" * len(head))
    for ls, res in results.items():
        for name, r in res.items():
            cells = "  ".join(f"{e:8.4f}" for e in r["rel_err"])
            print(f"{ls:>11}  {name:<11} {r['params']:>7}  {cells}")
    payload = dict(length=L, kernel="exp", steps=steps, t=list(T_GRID), results=results)
    with open(os.path.join(args.out, "dit_gp.json"), "w") as f:
        json.dump(payload, f, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for ax, (ls, res) in zip(axes[0], results.items(), strict=True):
        for name, r in res.items():
            ax.loglog(T_GRID, r["rel_err"], "o-", label=f"{name} ({r['params']} params)")
        ax.set_xlabel("t (VP-linear)")
        ax.set_ylabel("relative score error")
        ax.set_title(f"GP sequences, L={L}, exp kernel, lengthscale {ls}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "dit_gp.png"), dpi=110)
    print(f"wrote {args.out}/dit_gp.json and {args.out}/dit_gp.png")


if __name__ == "__main__":
    main()
