"""Reward-directed conditional diffusion (RCGDM) benchmark: data on a 16-dim subspace of R^64.

Setting (guidance.md 1.6; Yuan et al. arXiv 2307.07055): ``x = A z``, ``z ~ N(0, I_16)``, ``A``
a random 64 x 16 orthonormal basis; true reward ``f*(x) = theta^T x`` with ``theta = A beta``,
``||beta|| = 1`` (so the data's reward std is 1); ``n1 = 65536`` unlabelled points.

(a) **Exact scores.** Ridge reward on ``n2`` labelled points (label noise 0.1, ``lam = 1e-3 n2``),
pseudo-label noise ``nu = 0.1``. ``x | y_hat = a`` is Gaussian in closed form
(``rcgdm.exact_conditional``); its exact denoiser is sampled with DPM-Solver++(2M) (50 steps,
``n`` samples per target). Reported per target: mean true reward vs the closed form
``a theta^T Sigma theta_hat / (theta_hat^T Sigma theta_hat + nu^2)`` (z-score), and the relative
errors of the sample mean and covariance against ``(mu_a, Sigma_a)``. Started from ``N(0, I)``
the mean carries a small bias, ``~ 0.1 alpha(t_start) a`` (0.06% of ``a``: the prior ignores the
marginal's mean ``alpha(t_start) mu_a``), visible in the z-scores at large ``a`` with 20000
samples; started from the exact marginal at ``t_start`` the z-scores are O(1). Plus the
closed-form slope for ``n2 = 64 ... 4096`` (mean and spread over 20 labelled sets).

(b) **Trained conditional MLP.** ``MLPScoreNet(hidden=128, depth=3, cond_dim=1)``, v-prediction,
trained on the pseudo-labelled set (6000 Adam steps, cosine decay from 2e-3, batch 256, EMA
0.999), then swept over targets ``a = k std(y_hat)`` for ``k = 0.5, 1, 2, 3, 4, 6, 8`` (DDIM, 50
steps, common noise). Two label types: real-valued (ridge, ``n2 = 1024``) and pairwise preferences (``P = 4096`` comparisons among
the same 1024 points, ``P(i beats j) = sigmoid(4 (f*_i - f*_j))``, Bradley-Terry ridge fit, whose
scale is arbitrary: ``nu = 0.1 std(f_hat(x_u))`` and targets by quantiles of ``f_hat`` on the
unlabelled data, ``rcgdm.quantile_targets``, inside the reliable range, ``mean + k std`` beyond).
Reported per target: predicted reward, achieved true reward, the closed form, the off-subspace
ratio ``||x_perp|| / ||x_par||``, and whether ``a`` is inside the reliable range (0.5%-99.5%
quantiles of the pseudo-labels).

(c) **Parametrization.** The real-label run repeated with eps- and x0-prediction (same network and
steps): an ambient eps-network leaks off the subspace (guidance.md 1.7), x0-prediction stays on
it.

Usage: ``python benchmarks/rcgdm.py [--quick] [--out benchmarks/results]``; prints the tables,
writes ``rcgdm.json`` and ``rcgdm.png`` (achieved reward vs target with the closed-form line, the
off-subspace ratio on a second axis).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.stats import norm

from jaxdiff import analytic, models, samplers, schedules
from jaxdiff.optimize import rcgdm as R

DIM, SUB = 64, 16
KS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)


def problem(seed=0):
    dist = analytic.random_subspace(jax.random.key(seed), DIM, SUB)
    beta = jax.random.normal(jax.random.key(seed + 1), (SUB,))
    theta = dist.basis @ (beta / jnp.linalg.norm(beta))
    return dist, R.LinearReward(theta, jnp.zeros(()))


def labelled(dist, true, n2, seed, noise=0.1):
    x = dist.sample(jax.random.key(seed), n2)
    return x, true(x) + noise * jax.random.normal(jax.random.key(seed + 1), (n2,))


def exact_table(dist, true, n, nu=0.1) -> dict:
    sch = schedules.vp_linear()
    x_l, y_l = labelled(dist, true, 1024, seed=30)
    r_hat = R.fit_reward("ridge", None, x_l, y_l)
    cov = dist.cov()
    targets = jnp.asarray(KS)

    z0 = jax.random.normal(jax.random.key(8), (n, DIM))

    @functools.partial(jax.jit, static_argnames="exact_prior")
    def run(a, exact_prior):
        g = R.exact_conditional(dist, r_hat, nu, a)
        model, params = analytic.as_denoiser(g, sch)
        if exact_prior:  # x_T from the exact marginal at t_start instead of N(0, I)
            al, sg = sch.alpha_sigma(sch.t_start)
            lam, vec = g.evals[0], g.evecs[0]
            x_T = al * g.means[0] + ((z0 @ vec) * jnp.sqrt(al**2 * lam + sg**2)) @ vec.T
        else:
            x_T = sch.prior_std() * z0
        x = samplers.sample(
            jax.random.key(7), model, params, sch, x_T, samplers.dpm_solver_pp(2), 50,
            final_denoise=True,
        )  # fmt: skip
        mu_a, cov_a = R.linear_gaussian_conditional(
            dist.mean(), cov, r_hat.theta, nu, a, r_hat.bias
        )
        r = true(x)
        m = jnp.mean(x, 0)
        c = jnp.cov(x.T)
        err_m = jnp.linalg.norm(m - mu_a) / jnp.sqrt(jnp.trace(cov_a))
        err_c = jnp.linalg.norm(c - cov_a) / jnp.linalg.norm(cov_a)
        return jnp.mean(r), jnp.std(r) / jnp.sqrt(n), err_m, err_c

    got = [tuple(float(v) for v in run(a, False)) for a in targets]
    got_exact = [tuple(float(v) for v in run(a, True)) for a in targets]
    closed = np.asarray(R.conditional_expected_reward(dist, true, r_hat, nu, targets), np.float64)
    # the slope of the closed form as n2 grows, over 20 labelled draws each (mean, std)
    slopes = {}
    for n2 in (64, 256, 1024, 4096):
        vals = []
        for rep in range(20):
            xs, ys = labelled(dist, true, n2, seed=1000 * rep + n2)
            rh = R.fit_reward("ridge", None, xs, ys)
            vals.append(float(R.conditional_expected_reward(dist, true, rh, nu, 1.0)))
        slopes[n2] = (float(np.mean(vals)), float(np.std(vals)))
    return {
        "targets": list(KS),
        "achieved": [g[0] for g in got],
        "se": [g[1] for g in got],
        "closed_form": closed.tolist(),
        "rel_err": [g[0] / c - 1 for g, c in zip(got, closed, strict=True)],
        "z": [(g[0] - c) / g[1] for g, c in zip(got, closed, strict=True)],
        "z_exact_prior": [(g[0] - c) / g[1] for g, c in zip(got_exact, closed, strict=True)],
        "mean_rel_err": [g[2] for g in got_exact],
        "cov_rel_err": [g[3] for g in got_exact],
        "n": n,
        "slope_theory": 1.0 / (1.0 + nu**2),
        "slope_vs_n2": slopes,
    }


def preference_reward(dist, true, x_l, num_pairs=4096, kappa=4.0, seed=0):
    rng = np.random.default_rng(seed)
    n2 = x_l.shape[0]
    f = np.asarray(true(x_l))
    i = rng.integers(0, n2, num_pairs)
    j = (i + rng.integers(1, n2, num_pairs)) % n2
    o = (rng.uniform(size=num_pairs) < 1 / (1 + np.exp(-kappa * (f[i] - f[j])))).astype(np.float32)
    return R.fit_preferences("ridge", None, x_l, np.stack([i, j], 1), o)


def trained_sweep(dist, true, x_u, labels, steps, n, parametrization="v", log_every=500) -> dict:
    x_l, y_l = labelled(dist, true, 1024, seed=30)
    t0 = time.perf_counter()
    if labels == "real":
        r_hat = R.fit_reward("ridge", None, x_l, y_l)
    else:
        r_hat = preference_reward(dist, true, x_l)
    f_u = r_hat(x_u)
    scale = float(jnp.std(f_u))
    nu = 0.1 * scale if labels == "preference" else 0.1
    net = models.MLPScoreNet(hidden=128, depth=3, cond_dim=1)
    opt = optax.adam(optax.cosine_decay_schedule(2e-3, steps, alpha=0.05))
    pipe, hist = R.run(jax.random.key(5), x_u, r_hat, nu, steps=steps, net=net, optimizer=opt,
                       progress=False, log_every=log_every,
                       parametrization=parametrization)  # fmt: skip
    t_train = time.perf_counter() - t0
    ks = np.asarray(KS)
    std_y = float(pipe.scaler.std)
    if labels == "real":
        targets = jnp.asarray(ks * std_y)
    else:  # quantile targets inside the reliable range, mean + k std beyond it
        qs = norm.cdf(ks)
        inside = qs <= pipe.reliable_q[1]
        tq = np.asarray(R.quantile_targets(r_hat, x_u, qs[inside]))
        beyond = float(jnp.mean(f_u)) + ks[~inside] * scale
        targets = jnp.asarray(np.concatenate([tq, beyond]), jnp.float32)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", R.ExtrapolationWarning)
        out = R.sweep_targets(pipe, jax.random.key(6), targets, n, true_reward=true,
                              basis=dist.basis, steps=50)  # fmt: skip
    closed = np.asarray(R.conditional_expected_reward(dist, true, r_hat, nu, targets))
    res = {
        "labels": labels,
        "parametrization": parametrization,
        "k": ks.tolist(),
        "target": out["target"].tolist(),
        "in_range": out["in_range"].tolist(),
        "predicted": out["predicted"].tolist(),
        "achieved": out["achieved"].tolist(),
        "achieved_se": out["achieved_se"].tolist(),
        "closed_form": closed.tolist(),
        "rel_err": (out["achieved"] / closed - 1).tolist(),
        "off_subspace": out["off_support"].tolist(),
        "reliable_range": [out["reliable_lo"], out["reliable_hi"]],
        "nu": nu,
        "reward_scale": scale,
        "label_std": std_y,
        "label_mean": float(pipe.scaler.mean),
        "final_loss": float(hist["loss"][-1]),
        "train_steps": steps,
        "train_seconds": t_train,
        "sweep_seconds": time.perf_counter() - t0,
    }
    if labels == "preference":
        th = np.asarray(r_hat.theta)
        res["bt_cosine"] = float(th @ np.asarray(true.theta) / np.linalg.norm(th))
        res["bt_scale"] = float(np.linalg.norm(th))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test, ~1 min)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t_all = time.perf_counter()
    n1, steps, n = (16384, 2000, 512) if args.quick else (65536, 6000, 2048)

    dist, true = problem()
    ex = exact_table(dist, true, 4000 if args.quick else 20000)
    print(f"(a) exact conditional score, R^{DIM} / {SUB}-dim subspace, n2 = 1024, nu = 0.1, "
          f"{ex['n']} samples per target (DPM-Solver++(2M), 50 steps)")  # fmt: skip
    print(
        f"{'a':>5s} {'achieved':>9s} {'closed':>8s} {'rel err':>8s} {'z':>6s} "
        f"{'z exact x_T':>11s} {'mean err':>9s} {'cov err':>8s}"
    )
    for i, a in enumerate(ex["targets"]):
        print(
            f"{a:5.1f} {ex['achieved'][i]:9.4f} {ex['closed_form'][i]:8.4f} "
            f"{100 * ex['rel_err'][i]:+7.3f}% {ex['z'][i]:6.2f} {ex['z_exact_prior'][i]:11.2f} "
            f"{ex['mean_rel_err'][i]:9.4f} {ex['cov_rel_err'][i]:8.4f}"
        )
    print(
        "closed-form slope vs n2 (mean +- std over 20 labelled sets; 1/(1+nu^2) = "
        f"{ex['slope_theory']:.4f}):",
        ", ".join(f"n2={k}: {m:.4f} +- {sd:.4f}" for k, (m, sd) in ex["slope_vs_n2"].items()),
    )

    x_u = dist.sample(jax.random.key(2), n1)
    sweeps = {}
    runs = [("real", "v"), ("preference", "v"), ("real", "eps"), ("real", "x0")]
    for labels, param in runs:
        res = trained_sweep(dist, true, x_u, labels, steps, n, parametrization=param)
        name = labels if param == "v" else f"{labels}, {param}"
        sweeps[name] = res
        extra = ""
        if labels == "preference":
            extra = f", BT fit: cos {res['bt_cosine']:.4f}, scale {res['bt_scale']:.3f}"
        part = "(b)" if param == "v" else "(c)"
        print(
            f"\n{part} trained MLP ({param}-prediction), {labels} labels: n1 = {n1}, {steps} steps "
            f"({res['train_seconds']:.0f} s), nu = {res['nu']:.3g}, reliable range "
            f"[{res['reliable_range'][0]:.3g}, {res['reliable_range'][1]:.3g}]{extra}"
        )
        print(
            f"{'k':>4s} {'target a':>9s} {'in range':>8s} {'predicted':>9s} {'achieved':>9s} "
            f"{'closed':>7s} {'rel err':>8s} {'r_off':>7s}"
        )
        for i, k in enumerate(res["k"]):
            print(
                f"{k:4.1f} {res['target'][i]:9.3f} {str(res['in_range'][i]):>8s} "
                f"{res['predicted'][i]:9.3f} {res['achieved'][i]:9.3f} {res['closed_form'][i]:7.3f} "
                f"{100 * res['rel_err'][i]:+7.1f}% {res['off_subspace'][i]:7.4f}"
            )

    out = {
        "exact": ex,
        "trained": sweeps,
        "settings": {
            "dim": DIM,
            "sub_dim": SUB,
            "n1": n1,
            "n2": 1024,
            "steps": steps,
            "samples_per_target": n,
            "quick": args.quick,
        },  # fmt: skip
        "backend": jax.default_backend(),
        "total_seconds": time.perf_counter() - t_all,
    }
    with open(os.path.join(args.out, "rcgdm.json"), "w") as f:
        json.dump(out, f, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    ax = axes[0]
    ax.plot(ex["targets"], ex["closed_form"], "k-", label="closed form")
    ax.errorbar(ex["targets"], ex["achieved"], yerr=3 * np.asarray(ex["se"]), fmt="o",
                label="exact conditional score")  # fmt: skip
    ax.set_xlabel("target a")
    ax.set_ylabel("mean true reward")
    ax.set_title("(a) exact score: achieved = closed form")
    ax.legend(fontsize=8)
    for ax, labels in zip(axes[1:3], ("real", "preference"), strict=True):
        res = sweeps[labels]
        k = np.asarray(res["k"])
        ax.plot(k, res["closed_form"], "k-", label="closed form")
        ax.plot(k, res["achieved"], "o-", label="achieved (true reward)")
        lo, hi = ((v - res["label_mean"]) / res["label_std"] for v in res["reliable_range"])
        ax.axvspan(max(lo, 0.0), hi, color="g", alpha=0.08, label="reliable range")
        ax.set_xlabel("target (units of std of the pseudo-labels)")
        ax.set_ylabel("mean true reward")
        ax2 = ax.twinx()
        ax2.plot(k, res["off_subspace"], "s--", color="tab:red", label="off-subspace ratio")
        ax2.set_ylabel("off-subspace ratio", color="tab:red")
        ax.set_title(f"(b) trained MLP (v-prediction), {labels} labels")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    ax = axes[3]
    for name in ("real", "real, eps", "real, x0"):
        res = sweeps[name]
        ax.semilogy(res["k"], res["off_subspace"], "o-", label=res["parametrization"])
    ax.set_xlabel("target (units of std of the pseudo-labels)")
    ax.set_ylabel("off-subspace ratio")
    ax.set_title("(c) off-subspace ratio by parametrization")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "rcgdm.png"), dpi=110)
    print(f"\nwrote {args.out}/rcgdm.json and {args.out}/rcgdm.png ({out['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
