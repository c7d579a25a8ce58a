"""Sampler benchmark: endpoint error, sliced W2 and seconds vs NFE, against diffusers' schedulers.

Problem (identical for every row): a 64-dimensional, 8-component Gaussian mixture with its
EXACT noise prediction (``jaxdiff.analytic``), the DDPM discrete schedule (1000 linear betas),
sampling from index 999 (t = 1) to index 0 (t = 1/1000). Errors compare each endpoint with a
high-accuracy reference solve of the same PF-ODE from the same x_T (diffrax Tsit5, rtol = atol =
1e-9, float64, stepping onto the schedule's knots), per dimension: ``e_i = ||x_i - ref_i|| /
sqrt(D)``. Reported: the RMSE ``sqrt(mean e_i^2)``, the median ``e_i``, the number of mode flips
(endpoints whose most likely mixture component differs from the reference's: draws near a
decision boundary between well-separated modes, each carrying an error of the order of the
distance between means, which dominate the RMSE at low NFE), the RMSE over the draws that kept
their mode, and the sliced W2 of the endpoints to exact samples of the marginal at t_end next to
its floor. Our rows try the log-SNR and the quadratic grid and keep the better (by RMSE); the
tuned-grid row runs :func:`jaxdiff.samplers.optimize_grid` (200 Adam steps, 1024 calibration
draws independent of the evaluation draws, ``loss="l2"``) for the best sampler at NFE 10.

diffusers rows (DDIM, DPMSolverMultistep 2M/3M, UniPC, DEIS, Euler) run when the ``bench``
extra is installed (``pip install -e .[bench]``: torch==2.13.0 CPU build and diffusers), in
float64, configured to end at index 0 (``final_sigmas_type="sigma_min"``,
``set_alpha_to_one=False``), with ``clip_sample`` off, each with its default spacing and with
Karras sigmas (and DPMSolverMultistep with Lu's lambdas); the best configuration per scheduler
(by RMSE) is kept.

Usage: ``python benchmarks/samplers.py [--quick] [--out benchmarks/results]``; prints a table,
writes ``samplers.json`` and ``samplers.png`` (error vs NFE).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxdiff  # noqa: E402
from jaxdiff import analytic, metrics, samplers, schedules  # noqa: E402

NFES = (5, 10, 20, 50)


def make_problem(key, dim=64, k=8, n=1024):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    means = 1.5 * jax.random.normal(k1, (k, dim)) / math.sqrt(1.0)
    scales = 0.05 + 0.3 * jax.random.uniform(k2, (k, dim))
    weights = jax.nn.softmax(0.5 * jax.random.normal(k3, (k,)))
    dist = analytic.gaussian_mixture(weights, means, scales**2)
    schedule = schedules.vp_discrete()
    model, params = analytic.as_denoiser(dist, schedule, parametrization="eps")
    x_T = jax.random.normal(k4, (n, dim))
    return dist, schedule, model, params, x_T


def our_rows(quick: bool):
    s = samplers
    rows = [("DDIM", lambda: s.ddim(), 1, "log_snr")]
    if hasattr(s, "dpm_solver_pp"):
        rows += [
            ("DPM-Solver++(2M)", lambda: s.dpm_solver_pp(2), 1, "log_snr"),
            ("DPM-Solver++(3M)", lambda: s.dpm_solver_pp(3), 1, "log_snr"),
            (
                "DPM-Solver++(3M) c=1",
                lambda: s.dpm_solver_pp(3, third_order_coef=1.0),
                1,
                "log_snr",
            ),
        ]
    if hasattr(s, "unipc"):
        rows += [
            ("UniPC-2 bh2", lambda: s.unipc(2), 1, "log_snr"),
            ("UniPC-3 bh2", lambda: s.unipc(3), 1, "log_snr"),
            (
                "UniPC-3 bh2 lower-order final",
                lambda: s.unipc(3, lower_order_final=True),
                1,
                "log_snr",
            ),
        ]
    if hasattr(s, "deis"):
        rows += [("DEIS-3", lambda: s.deis(3), 1, "log_snr")]
    if hasattr(s, "heun"):
        rows += [("EDM Heun", lambda: s.heun(), 2, "karras")]
    if hasattr(s, "accelerated_ode"):
        rows += [("Li accelerated ODE", lambda: s.accelerated_ode(), 1, "log_snr")]
    return rows[:3] if quick else rows


def run_ours(schedule, model, params, x_T, ref, sampler, nfe_per_step, grid, nfe, ts=None):
    steps = max(1, nfe // nfe_per_step)
    key = jax.random.PRNGKey(0)
    kw = {"ts": ts} if ts is not None else {"steps": steps, "grid": grid}
    x = jaxdiff.sample(key, model, params, schedule, x_T, sampler, **kw)  # compile + warm-up
    t0 = time.perf_counter()
    x = jaxdiff.sample(key, model, params, schedule, x_T, sampler, **kw)
    x.block_until_ready()
    sec = time.perf_counter() - t0
    return x, sec, steps * nfe_per_step


# ----------------------------------------------------------------------------------------------
# diffusers
# ----------------------------------------------------------------------------------------------
def diffusers_available():
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run_diffusers(name, make_sched, nfe, dist, schedule, x_T, eps_fn):
    import torch

    sched = make_sched()
    heun_like = name.startswith("Heun")
    steps = (nfe + 1) // 2 if heun_like else nfe
    sched.set_timesteps(steps)
    abar = np.asarray(schedule.alphas_cumprod())
    x_np = np.asarray(x_T, np.float64)
    sigma_space = hasattr(sched, "sigmas") and type(sched).__name__.startswith(("Euler", "Heun"))
    if sigma_space:
        s0 = float(sched.sigmas[0])
        x_np = x_np * math.sqrt(1.0 + s0**2)  # x_tilde = x / alpha
    sample = torch.from_numpy(x_np)
    calls = 0
    t0 = time.perf_counter()
    for t in sched.timesteps:
        inp = sched.scale_model_input(sample, t) if sigma_space else sample
        tc = float(t)
        out = eps_fn(inp.numpy(), (tc + 1.0) / 1000.0)
        calls += 1
        sample = sched.step(torch.from_numpy(out), t, sample).prev_sample
    sec = time.perf_counter() - t0
    x = sample.numpy()
    if sigma_space:
        x = x / math.sqrt(1.0 + float(sched.sigmas[-1]) ** 2)
    del abar
    return jnp.asarray(x), sec, calls


def diffusers_rows():
    from diffusers import (
        DDIMScheduler,
        DEISMultistepScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    common = dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)
    rows = {
        "diffusers DDIM": [
            lambda: DDIMScheduler(
                **common, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing"
            )
        ],
        "diffusers DPMSolverMultistep 2M": [],
        "diffusers DPMSolverMultistep 3M": [],
        "diffusers UniPC (bh2, 2)": [],
        "diffusers DEIS (3)": [],
        "diffusers Euler": [],
    }
    for extra in ({}, {"use_karras_sigmas": True}, {"use_lu_lambdas": True}):
        for order in (2, 3):
            rows[f"diffusers DPMSolverMultistep {order}M"].append(
                lambda o=order, e=extra: DPMSolverMultistepScheduler(
                    **common, solver_order=o, final_sigmas_type="sigma_min", **e
                )
            )
    for extra in ({}, {"use_karras_sigmas": True}):
        rows["diffusers UniPC (bh2, 2)"].append(
            lambda e=extra: UniPCMultistepScheduler(
                **common, solver_order=2, final_sigmas_type="sigma_min", **e
            )
        )
        rows["diffusers DEIS (3)"].append(
            lambda e=extra: DEISMultistepScheduler(**common, solver_order=3, **e)
        )
        rows["diffusers Euler"].append(
            lambda e=extra: EulerDiscreteScheduler(**common, final_sigmas_type="sigma_min", **e)
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and samples (CI smoke)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--no-diffusers", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    n = 256 if args.quick else 1024
    dist, schedule, model, params, x_T = make_problem(jax.random.PRNGKey(0), n=n)
    t_end = float(schedule.t_end)
    print(
        f"problem: 64-D 8-component GMM, exact eps, DDPM discrete schedule, n={n}, t: 1 -> {t_end}"
    )
    ref_sampler = samplers.pf_ode(rtol=1e-9, atol=1e-9, max_steps=100_000)
    t0 = time.perf_counter()
    ref = jaxdiff.sample(jax.random.PRNGKey(0), model, params, schedule, x_T, ref_sampler, 8)
    print(f"reference solve: {time.perf_counter() - t0:.1f} s")
    exact = dist.sample_t(jax.random.PRNGKey(1), n, t_end, schedule)
    exact2 = dist.sample_t(jax.random.PRNGKey(2), n, t_end, schedule)
    ksw = jax.random.PRNGKey(3)
    floor = float(metrics.sliced_wasserstein(ksw, exact, exact2))

    t_end_b = jnp.full((n,), t_end)
    ref_mode = jnp.argmax(dist.responsibilities(ref, t_end_b, schedule), axis=-1)

    def score(x):
        """RMSE, median per-sample error, mode flips, RMSE over the samples that kept their mode."""
        e2 = jnp.sum((x - ref) ** 2, axis=-1) / x.shape[-1]
        flip = jnp.argmax(dist.responsibilities(x, t_end_b, schedule), axis=-1) != ref_mode
        keep = jnp.sum(~flip)
        return dict(
            err=float(jnp.sqrt(jnp.mean(e2))),
            median=float(jnp.sqrt(jnp.median(e2))),
            flips=int(jnp.sum(flip)),
            err_same_mode=float(jnp.sqrt(jnp.sum(jnp.where(flip, 0.0, e2)) / keep)),
            sw2=float(metrics.sliced_wasserstein(ksw, x, exact)),
        )

    results = []
    nfes = NFES[:2] if args.quick else NFES
    for name, make, per_step, grid in our_rows(args.quick):
        for nfe in nfes:
            if nfe < per_step:
                continue
            best = None
            for g in (grid, "quadratic") if grid == "log_snr" else (grid,):
                x, sec, used = run_ours(schedule, model, params, x_T, ref, make(), per_step, g, nfe)
                row = dict(lib="jaxdiff", sampler=name, nfe=used, grid=g, seconds=sec, **score(x))
                if best is None or row["err"] < best["err"]:
                    best = row
            results.append(best)

    # a tuned grid for the best of our samplers at NFE 10
    best10 = min((r for r in results if r["nfe"] == 10), key=lambda r: r["err"], default=None)
    if best10 is not None and not args.quick:
        name = best10["sampler"]
        make, per_step = next((m, p) for nm, m, p, _ in our_rows(False) if nm == name)
        t0 = time.perf_counter()
        res = samplers.optimize_grid(
            jax.random.PRNGKey(7),
            model,
            params,
            schedule,
            make(),
            10 // per_step,
            (1024, 64),
            iterations=200,
            loss="l2",
        )
        print(f"grid search ({name}, 1024 calibration draws): {time.perf_counter() - t0:.0f} s")
        x, sec, used = run_ours(
            schedule, model, params, x_T, ref, make(), per_step, None, 10, ts=res.ts
        )
        results.append(
            dict(lib="jaxdiff", sampler=name + " (tuned grid)", nfe=used, seconds=sec, **score(x))
        )

    if diffusers_available() and not args.no_diffusers:
        eps_jit = jax.jit(lambda x, t: model(params, x, t))

        def eps_fn(x, t):
            return np.asarray(eps_jit(jnp.asarray(x), jnp.full((x.shape[0],), t)))

        for name, makers in diffusers_rows().items():
            for nfe in nfes:
                best = None
                for mk in makers:
                    try:
                        x, sec, used = run_diffusers(name, mk, nfe, dist, schedule, x_T, eps_fn)
                    except Exception as e:  # a configuration diffusers rejects at this NFE
                        print(f"  skipped {name} nfe={nfe}: {type(e).__name__}: {e}")
                        continue
                    sc = score(x)
                    if best is None or sc["err"] < best["err"]:
                        best = dict(lib="diffusers", sampler=name, nfe=used, seconds=sec, **sc)
                if best is not None:
                    results.append(best)
    else:
        print("diffusers rows skipped (install the bench extra: pip install -e '.[bench]')")

    print(f"\nSW2 floor (exact vs exact, n={n}): {floor:.4f}")
    print(
        f"{'library':10s} {'sampler':34s} {'NFE':>4s} {'RMSE':>10s} {'median':>10s} "
        f"{'flips':>6s} {'RMSE kept':>10s} {'SW2':>8s} {'s':>7s}"
    )
    for r in results:
        print(
            f"{r['lib']:10s} {r['sampler']:34s} {r['nfe']:4d} {r['err']:10.3e} {r['median']:10.3e} "
            f"{r['flips']:6d} {r['err_same_mode']:10.3e} {r['sw2']:8.4f} {r['seconds']:7.3f}"
        )
    summary = {}
    ours10 = [r for r in results if r["lib"] == "jaxdiff" and r["nfe"] == 10]
    theirs10 = [r for r in results if r["lib"] == "diffusers" and r["nfe"] == 10]
    if ours10 and theirs10:
        print("\nNFE 10, best jaxdiff / best diffusers (each minimised separately per metric):")
        for metric in ("err", "median", "err_same_mode"):
            plain = [r[metric] for r in ours10 if "tuned" not in r["sampler"]]
            tuned = [r[metric] for r in ours10 if "tuned" in r["sampler"]]
            best_theirs = min(r[metric] for r in theirs10)
            summary[f"nfe10_{metric}_best_ours_over_best_diffusers"] = min(plain) / best_theirs
            line = f"  {metric:14s} untuned {min(plain) / best_theirs:.3f}"
            if tuned:
                summary[f"nfe10_{metric}_tuned_ours_over_best_diffusers"] = tuned[0] / best_theirs
                line += f"   tuned grid {tuned[0] / best_theirs:.3f}"
            print(line)
        summary["nfe10_flips"] = {
            f"{r['lib']} {r['sampler']}": r["flips"] for r in ours10 + theirs10
        }
    with open(os.path.join(args.out, "samplers.json"), "w") as f:
        json.dump({"floor_sw2": floor, "n": n, "results": results, "summary": summary}, f, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for lib, name in sorted({(r["lib"], r["sampler"]) for r in results}):
        rs = sorted(
            (r for r in results if r["sampler"] == name and r["lib"] == lib), key=lambda r: r["nfe"]
        )
        ax.loglog(
            [r["nfe"] for r in rs],
            [r["err"] for r in rs],
            ("-o" if lib == "jaxdiff" else "--s"),
            label=f"{name}",
            ms=4,
        )
    ax.set_xlabel("NFE")
    ax.set_ylabel("endpoint RMSE vs reference")
    ax.set_title("64-D GMM, exact eps, DDPM discrete schedule")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "samplers.png"), dpi=110)
    print(f"wrote {args.out}/samplers.json and {args.out}/samplers.png")


if __name__ == "__main__":
    main()
