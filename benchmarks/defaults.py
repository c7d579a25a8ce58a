"""How the training and likelihood defaults were chosen: the measurements behind them.

Every default that decides whether a new user's first model is good is measured here, each
against its alternatives, with everything else at the library's defaults:

* ``param`` -- the parametrization and loss weighting of ``as_denoiser`` / ``train``: eps, x0,
  v (each with its unweighted loss in its own space) and EDM preconditioning (Karras et al.
  arXiv 2206.00364; ``sigma_data`` 0.5 and 1, uniform times, and EDM's own lognormal times),
  on two 2-D Gaussian mixtures (the README's 8-mode ring, a 25-mode grid) and a 16-D
  correlated Gaussian, on the vp_linear, vp_cosine, ve and edm schedules, over seeds. Metric:
  sliced W2 to fresh data divided by the data-vs-data floor (DDIM-20 and the adaptive PF-ODE),
  and for the Gaussian the relative Frobenius error of the sample covariance divided by that
  of as many exact samples. The exact denoiser's row is the sampler's own error.
* ``digits`` -- the same choice for the digits U-Net (class accuracy and Frechet distance).
* ``ema`` -- the EMA: none, 0.99, 0.999, 0.9999 fixed, and 0.999 / 0.9999 with the warm-up
  ``min(d, (1 + step) / (10 + step))``, after 300 .. 10000 steps (one training run per length,
  every EMA tracked along it); and the RCGDM pipeline at its documented defaults.
* ``lr`` -- the learning-rate schedule: constant 2e-3 / 1e-3, cosine decay to 5%, linear warm-up
  then cosine, at 1000 and 3000 steps.
* ``likelihood`` -- the divergence estimator of ``log_likelihood``: the exact trace against
  Hutchinson with 1 .. 64 probes, error against the exact log-density and time, by dimension.

Usage: ``python benchmarks/defaults.py [--quick] [--only param,ema,...] [--seeds 2]``; prints one
table per section and writes ``defaults.json`` and ``defaults.png`` to ``--out``. ``--quick``
runs one seed on vp_linear only with shorter training (a smoke run; the full run takes about an
hour on a 2-core CPU).
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

import jaxdiff
from jaxdiff import analytic, likelihood, metrics, models, samplers, schedules, train

SCHEDULES = {
    "vp_linear": schedules.vp_linear,
    "vp_cosine": schedules.vp_cosine,
    "ve": schedules.ve,
    "edm": schedules.edm,
    "flow": schedules.flow,
}
PARAM_SCHEDULES = ("vp_linear", "vp_cosine", "ve", "edm")
#: name -> (as_denoiser kwargs, loss kwargs)
RECIPES = {
    "eps": (dict(parametrization="eps"), {}),
    "x0": (dict(parametrization="x0"), {}),
    "v": (dict(parametrization="v"), {}),
    "edm sd=0.5": (dict(parametrization="edm", sigma_data=0.5), {}),
    "edm sd=1": (dict(parametrization="edm", sigma_data=1.0), {}),
    "edm sd=0.5 lognormal": (
        dict(parametrization="edm", sigma_data=0.5),
        dict(t_sampling="lognormal"),
    ),
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------
def grid_mixture(k: int = 5, spacing: float = 1.5, std: float = 0.1):
    g = (np.arange(k) - (k - 1) / 2) * spacing
    means = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    n = means.shape[0]
    return analytic.gaussian_mixture(
        jnp.full((n,), 1.0 / n), jnp.asarray(means, jnp.float32), jnp.full((n,), std**2)
    )


def correlated_gaussian(dim: int = 16, seed: int = 3):
    """A 16-D Gaussian with eigenvalues from 0.01 to 4 in a random basis and a nonzero mean."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    evals = np.geomspace(0.01, 4.0, dim)
    cov = (q * evals) @ q.T
    mean = rng.standard_normal(dim) * 0.5
    return analytic.gaussian(jnp.asarray(mean, jnp.float32), jnp.asarray(cov, jnp.float32))


def problems(quick: bool):
    s = 0.4 if quick else 1.0
    return {
        # the README quickstart's data, network, batch and step count
        "ring8": dict(dist=analytic.ring_mixture(), steps=int(3000 * s), kind="2d"),
        "grid25": dict(dist=grid_mixture(), steps=int(3000 * s), kind="2d"),
        "gauss16": dict(dist=correlated_gaussian(), steps=int(1500 * s), kind="gauss"),
    }


N_EVAL = 4000
N_REFS = 4


def _evaluate(prob, model, params, sch, k_eval, which=("ddim20", "pf_ode")) -> dict:
    """Sample with DDIM-20 and the adaptive PF-ODE; score against fresh data and the floor.

    The sliced W2 of one sample against one reference has a ~30% spread (mode counts
    fluctuate), so the model's score is the mean over ``N_REFS`` fresh references and the floor
    the mean over 8 data-vs-data pairs, all at ``N_EVAL`` points."""
    dist = prob["dist"]
    d = dist.dim
    k_s, k_fresh, k_floor, k_sw, k_ref = jax.random.split(k_eval, 5)
    refs = [dist.sample(jax.random.fold_in(k_fresh, r), N_EVAL) for r in range(N_REFS)]
    floor = float(metrics.sliced_wasserstein_floor(k_floor, dist.sample, N_EVAL))
    out = {"floor": floor}
    # off-mode mass: the fraction of samples whose data log-density is below the data's own 1%
    # quantile (1% for exact samples). Sliced W2 barely sees points bridging the modes; this does.
    lp_thr = float(np.quantile(np.asarray(dist.log_prob(refs[0])), 0.01))
    for name, sampler, steps in (
        ("ddim20", samplers.ddim(), 20),
        ("pf_ode", samplers.pf_ode(), 20),
    ):
        if name not in which:
            continue
        try:
            x = jaxdiff.sample(k_s, model, params, sch, (N_EVAL, d), sampler, steps=steps)
        except (jaxdiff.NonFiniteError, jaxdiff.SolverError) as e:
            out[name] = {"sw_ratio": float("inf"), "error": type(e).__name__}
            continue
        sw = np.mean([
            float(metrics.sliced_wasserstein(jax.random.fold_in(k_sw, r), x, ref))
            for r, ref in enumerate(refs)
        ])  # fmt: skip
        r = {"sw": float(sw), "sw_ratio": float(sw) / floor,
             "off_mode": float(np.mean(np.asarray(dist.log_prob(x)) < lp_thr))}  # fmt: skip
        if prob["kind"] == "gauss":
            c_true = np.asarray(dist.cov())

            def rel(y, c_true=c_true):
                c = np.cov(np.asarray(y), rowvar=False)
                return float(np.linalg.norm(c - c_true) / np.linalg.norm(c_true))

            exact_err = np.mean(
                [rel(dist.sample(jax.random.fold_in(k_ref, i), N_EVAL)) for i in range(4)]
            )
            r["cov_err"] = rel(x)
            r["cov_ratio"] = rel(x) / exact_err
        out[name] = r
    return out


def _train(prob, sch, recipe, seed, *, steps=None, optimizer=None, **train_kw):
    make_kw, loss_kw = RECIPES[recipe]
    loss_kw = {**loss_kw, **{k: train_kw.pop(k) for k in ("t_sampling",) if k in train_kw}}
    dist = prob["dist"]
    key = jax.random.PRNGKey(100 + seed)
    k_data, k_init, k_train = jax.random.split(key, 3)
    data = dist.sample(k_data, 20_000)
    net = models.MLPScoreNet(hidden=128, depth=3)
    model, params = models.as_denoiser(net, k_init, data[:1], schedule=sch, **make_kw)
    opt = optax.adam(2e-3) if optimizer is None else optimizer
    state, hist = train.train(
        k_train,
        model,
        params,
        sch,
        data,
        opt,
        steps or prob["steps"],
        progress=False,
        **loss_kw,
        **train_kw,
    )
    return model, state, hist


def _cells(args, default_schedules):
    """The (problem, schedule) cells to run, after ``--problems`` / ``--schedules``."""
    scheds = ["vp_linear"] if args.quick else list(default_schedules)
    if args.schedules:
        scheds = [x for x in args.schedules.split(",") if x]
    probs = problems(args.quick)
    names = [x for x in args.problems.split(",") if x] if args.problems else list(probs)
    return [(pn, probs[pn], sn) for pn in names for sn in scheds]


def _merge(args, name, rows):
    """Rows of earlier runs for other cells and recipes, plus this run's rows (written after
    every cell, so a crash loses at most one cell)."""
    redone = {(r["problem"], r["schedule"], r["recipe"]) for r in rows}
    old = [r for r in args.previous.get(name, {}).get("rows", [])
           if (r["problem"], r["schedule"], r["recipe"]) not in redone]  # fmt: skip
    out = {"rows": old + rows}
    args.save_partial(name, out)
    return out


def section_param(args) -> dict:
    rows = []
    for pname, prob, sname in _cells(args, PARAM_SCHEDULES):
        sch = SCHEDULES[sname]()
        k_eval = jax.random.PRNGKey(7)
        exact, dparams = analytic.as_denoiser(prob["dist"], sch)
        ev = _evaluate(prob, exact, dparams, sch, k_eval)
        rows.append({"problem": pname, "schedule": sname, "recipe": "exact", "seed": 0, **ev})
        _log(f"param {pname:7s} {sname:9s} exact: " + "  ".join(
            f"{k} {v['sw_ratio']:.2f}" for k, v in ev.items() if k != "floor"))  # fmt: skip
        for recipe in RECIPES:
            if args.recipes and recipe not in args.recipes.split(","):
                continue
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                model, state, _ = _train(prob, sch, recipe, seed)
                ev = _evaluate(prob, model, state.ema_params, sch, k_eval)
                rows.append(dict(problem=pname, schedule=sname, recipe=recipe, seed=seed, **ev))
                _log(
                    f"param {pname:7s} {sname:9s} {recipe:21s} seed {seed}: "
                    + "  ".join(f"{k} {v['sw_ratio']:.2f}" for k, v in ev.items() if k != "floor")
                    + (f"  cov {ev['ddim20'].get('cov_ratio', 0):.2f}" if "cov_ratio" in ev["ddim20"] else "")
                    + f" ({time.perf_counter() - t0:.0f} s)"
                )  # fmt: skip
        _merge(args, "param", rows)
        jax.clear_caches()  # a long run otherwise accumulates compiled programs
    return _merge(args, "param", rows)


def _summ(rows, keyfn, metric):
    """``{key: (mean, std, n)}`` of ``metric(row)`` grouped by ``keyfn(row)``."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(keyfn(r), []).append(metric(r))
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in groups.items()}


def report_param(res) -> None:
    rows = res["rows"]
    recipes = ["exact", *RECIPES]
    cells = sorted({(r["problem"], r["schedule"]) for r in rows}, key=lambda c: (c[0], c[1]))
    for metric, label in (
        (lambda r: r["ddim20"]["sw_ratio"], "SW2 / floor, DDIM-20"),
        (lambda r: r["pf_ode"]["sw_ratio"], "SW2 / floor, adaptive PF-ODE"),
        (lambda r: r["ddim20"].get("cov_ratio", np.nan), "covariance error / exact-sample error, DDIM-20"),
    ):  # fmt: skip
        s = _summ(rows, lambda r: (r["problem"], r["schedule"], r["recipe"]), metric)
        print(f"\n{label} (mean +- std over seeds; EMA params)")
        print(f"{'problem':8s} {'schedule':9s} | " + " | ".join(f"{c:>13s}" for c in recipes))
        for p, sn in cells:
            vals = [s.get((p, sn, rc)) for rc in recipes]
            if all(v is None or np.isnan(v[0]) for v in vals):
                continue
            txt = []
            for v in vals:
                if v is None or np.isnan(v[0]):
                    txt.append(f"{'-':>13s}")
                else:
                    txt.append(f"{v[0]:>7.2f}+-{v[1]:<4.2f}")
            print(f"{p:8s} {sn:9s} | " + " | ".join(txt))


# ------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------
def section_digits(args) -> dict:
    from jaxdiff import digits
    from jaxdiff.data import load_digits
    from jaxdiff.guidance import cfg

    x_tr, y_tr = load_digits("train")
    x_te, y_te = load_digits("test")
    key = jax.random.PRNGKey(0)
    clf = digits.train_classifier(jax.random.fold_in(key, 10), x_tr, y_tr)
    steps = 300 if args.quick else 1500
    sch = schedules.vp_cosine()
    rows = []
    labels = np.repeat(np.arange(10, dtype=np.int32), 20)
    recipes = ["eps", "v", "x0", "edm sd=0.5"]
    for recipe in recipes:
        for seed in range(1 if args.quick else min(args.seeds, 2)):
            t0 = time.perf_counter()
            make_kw, loss_kw = RECIPES[recipe]
            net = models.UNet(
                channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(),
                num_heads=1, groups=8, num_classes=10,
            )  # fmt: skip
            k = jax.random.PRNGKey(200 + seed)
            model, params = models.as_denoiser(
                net, k, x_tr[:1], cond_example=y_tr[:1], schedule=sch, **make_kw
            )
            state, _ = train.train(
                jax.random.fold_in(k, 1), model, params, sch, (x_tr, y_tr),
                optax.adam(2e-3), steps, batch_size=64, progress=False,
                cond_drop_prob=0.1, null_cond=net.null_cond, **loss_kw,
            )  # fmt: skip
            out = {}
            for w in (1.0, 2.0):
                xs = jaxdiff.sample(
                    jax.random.PRNGKey(30), cfg(model, w, null_cond=net.null_cond),
                    state.ema_params, sch, (labels.size, 8, 8, 1),
                    samplers.dpm_solver_pp(), steps=20, cond=jnp.asarray(labels),
                )  # fmt: skip
                ev = digits.evaluate_samples(clf, np.asarray(xs), labels, (x_te, y_te))
                out[f"w={w:g}"] = {"accuracy": ev["accuracy"], "fd": ev["fd"]}
            rows.append({"recipe": recipe, "seed": seed, **out})
            _log(
                f"digits {recipe:12s} seed {seed}: "
                + "  ".join(f"{k}: acc {v['accuracy']:.3f} FD {v['fd']:.2f}" for k, v in out.items())
                + f" ({time.perf_counter() - t0:.0f} s)"
            )  # fmt: skip
    return {"rows": rows, "steps": steps}


def report_digits(res) -> None:
    print(f"\ndigits U-Net (16 channels, {res['steps']} steps, vp_cosine, DPM-Solver++ 20, EMA)")
    print(f"{'recipe':12s} | {'acc w=1':>8s} | {'FD w=1':>7s} | {'acc w=2':>8s} | {'FD w=2':>7s}")
    for r in res["rows"]:
        a, b = r["w=1"], r["w=2"]
        print(f"{r['recipe']:12s} | {a['accuracy']:8.3f} | {a['fd']:7.2f} | "
              f"{b['accuracy']:8.3f} | {b['fd']:7.2f}   (seed {r['seed']})")  # fmt: skip


# ------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------
EMAS = {
    "none": (0.0, False),
    "0.99": (0.99, False),
    "0.999": (0.999, False),
    "0.9999": (0.9999, False),
    "0.999 warm-up": (0.999, True),
    "0.9999 warm-up": (0.9999, True),
}


def section_ema(args) -> dict:
    lengths = (300, 1000, 3000) if args.quick else (300, 1000, 3000, 10000)
    prob = problems(False)["ring8"]
    sch = schedules.vp_linear()
    rows = []
    recipe = args.recipe
    for steps in lengths:
        for seed in range(args.seeds):
            make_kw, loss_kw = RECIPES[recipe]
            key = jax.random.PRNGKey(300 + seed)
            k_data, k_init, k_train = jax.random.split(key, 3)
            data = prob["dist"].sample(k_data, 20_000)
            model, params = models.as_denoiser(
                models.MLPScoreNet(hidden=128, depth=3), k_init, data[:1], schedule=sch, **make_kw
            )
            opt = optax.adam(2e-3)
            step = jax.jit(
                train.make_step(model, sch, opt, ema_decay=0.0, batch_size=256, **loss_kw)
            )
            state = train.init(params, opt, ema_decay=0.0)
            emas = {k: params for k in EMAS if k != "none"}

            @jax.jit
            def update(emas, params, i):
                out = {}
                for k, p_ema in emas.items():
                    d = train.ema_decay_at(i, *EMAS[k])
                    out[k] = jax.tree.map(lambda e, q, d=d: d * e + (1 - d) * q, p_ema, params)
                return out

            for i in range(steps):
                state, _ = step(state, k_train, data)
                emas = update(emas, state.params, jnp.int32(i))
            emas["none"] = state.params
            ev = {
                k: _evaluate(prob, model, p, sch, jax.random.PRNGKey(7), ("ddim20",))["ddim20"][
                    "sw_ratio"
                ]
                for k, p in emas.items()
            }
            rows.append({"steps": steps, "seed": seed, **ev})
            _log(
                f"ema {steps:5d} steps seed {seed}: "
                + "  ".join(f"{k} {v:.2f}" for k, v in ev.items())
            )
    return {"rows": rows, "recipe": recipe, "rcgdm": _ema_rcgdm(args)}


def _ema_rcgdm(args) -> list:
    """RCGDM at its documented defaults (1000 steps): achieved reward / target by EMA."""
    from jaxdiff.optimize import rcgdm

    out = []
    dim, sub = 64, 16
    key = jax.random.PRNGKey(0)
    for label, warm, decay in (("0.999", False, 0.999), ("0.99", False, 0.99),
                               ("0.999 warm-up", True, 0.999)):  # fmt: skip
        res = rcgdm_run(rcgdm, key, dim, sub, decay, warm, steps=300 if args.quick else 1000)
        out.append({"ema": label, **res})
        _log(f"rcgdm ema {label}: achieved / closed form {res['ratio']:.3f}")
    return out


def rcgdm_run(rcgdm, key, dim, sub, decay, warm, steps):
    """RCGDM with its documented defaults but the given EMA, on data on a random ``sub``-dim
    subspace of R^dim with a linear reward: mean achieved reward / target at a target of
    2 std of the reward (as in docs/reward_directed.md)."""
    k_sub, k_theta, k_data, k_lab, k_run, k_s = jax.random.split(key, 6)
    space = analytic.random_subspace(k_sub, dim, sub)
    theta = space.basis @ jax.random.normal(k_theta, (sub,))
    theta = theta / jnp.linalg.norm(theta)
    x = space.sample(k_data, 8000)
    y = x @ theta + 0.1 * jax.random.normal(k_lab, (8000,))
    r_hat = rcgdm.fit_reward("ridge", k_lab, x[:300], y[:300])
    pipe, _ = rcgdm.run(
        k_run, x, r_hat, 0.1, steps=steps, progress=False, ema_decay=decay, ema_warmup=warm
    )
    target = 2.0 * float(jnp.std(x @ theta))
    xs = rcgdm.sample(pipe, k_s, target, 2000, warn=False)
    achieved = float(jnp.mean(xs @ theta))
    expected = float(
        rcgdm.conditional_expected_reward(
            space, rcgdm.LinearReward(theta=theta, bias=jnp.zeros(())), r_hat, 0.1, target
        )
    )
    return {"achieved": achieved, "target": target, "closed_form": expected,
            "ratio": achieved / expected}  # fmt: skip


def report_ema(res) -> None:
    s = {}
    for r in res["rows"]:
        for k in EMAS:
            s.setdefault((r["steps"], k), []).append(r[k])
    lengths = sorted({r["steps"] for r in res["rows"]})
    print(f"\nEMA: SW2 / floor of DDIM-20 on ring8 (vp_linear, {res['recipe']}), mean over seeds")
    print(f"{'EMA':15s} | " + " | ".join(f"{n:>6d}" for n in lengths))
    for k in EMAS:
        print(f"{k:15s} | " + " | ".join(f"{np.mean(s[(n, k)]):6.2f}" for n in lengths))
    if res.get("rcgdm"):
        print(
            "\nRCGDM (1000 steps, documented defaults): achieved reward / closed-form expectation"
        )
        for r in res["rcgdm"]:
            print(f"{r['ema']:15s} | {r['ratio']:.3f}")


# ------------------------------------------------------------------------------------------
# learning rate
# ------------------------------------------------------------------------------------------
def _lr_schedules(steps):
    return {
        "const 2e-3": optax.adam(2e-3),
        "const 1e-3": optax.adam(1e-3),
        "cosine 2e-3": optax.adam(optax.cosine_decay_schedule(2e-3, steps, alpha=0.05)),
        "warmup+cosine 2e-3": optax.adam(
            optax.warmup_cosine_decay_schedule(0.0, 2e-3, min(100, steps // 10), steps, 1e-4)
        ),
    }


def section_lr(args) -> dict:
    rows = []
    sch = schedules.vp_linear()
    probs = problems(False)
    for pname in ("ring8", "gauss16"):
        prob = probs[pname]
        for steps in (1000,) if args.quick else (1000, 3000):
            for lname, opt in _lr_schedules(steps).items():
                for seed in range(args.seeds):
                    model, state, _ = _train(
                        prob, sch, args.recipe, seed, steps=steps, optimizer=opt
                    )
                    ev = _evaluate(prob, model, state.ema_params, sch, jax.random.PRNGKey(7))
                    rows.append(dict(problem=pname, steps=steps, lr=lname, seed=seed, **ev))
                    _log(f"lr {pname} {steps} {lname:18s} seed {seed}: "
                         f"{ev['ddim20']['sw_ratio']:.2f} / {ev['pf_ode']['sw_ratio']:.2f}")  # fmt: skip
    return {"rows": rows, "recipe": args.recipe}


def report_lr(res) -> None:
    s = _summ(res["rows"], lambda r: (r["problem"], r["steps"], r["lr"]),
              lambda r: r["ddim20"]["sw_ratio"])  # fmt: skip
    print(f"\nlearning rate: SW2 / floor, DDIM-20 ({res['recipe']}, vp_linear, EMA warm-up)")
    lrs = sorted({r["lr"] for r in res["rows"]})
    cells = sorted({(r["problem"], r["steps"]) for r in res["rows"]})
    print(f"{'problem':8s} {'steps':>5s} | " + " | ".join(f"{x:>18s}" for x in lrs))
    for p, n in cells:
        print(f"{p:8s} {n:5d} | " + " | ".join(
            f"{s[(p, n, x)][0]:>10.2f}+-{s[(p, n, x)][1]:<6.2f}" for x in lrs))  # fmt: skip


# ------------------------------------------------------------------------------------------
# likelihood trace estimator
# ------------------------------------------------------------------------------------------
def section_likelihood(args) -> dict:
    rows = []
    sch = schedules.vp_linear()
    cases = {
        "mixture 2-D": analytic.ring_mixture(),
        "gaussian 16-D": correlated_gaussian(16),
        "gaussian 64-D": correlated_gaussian(64),
    }
    n = 32 if args.quick else 128
    for cname, dist in cases.items():
        model, dparams = analytic.as_denoiser(dist, sch)
        x = dist.sample(jax.random.PRNGKey(1), n)
        # the model is exact, so the PF-ODE density at t_end is the data marginal p_{t_end}
        t_end = jnp.full((n,), sch.t_end)
        ref = dist.log_prob_t(x, t_end, sch)
        for trace, k in [("exact", 0), ("hutchinson", 1), ("hutchinson", 4),
                         ("hutchinson", 16), ("hutchinson", 64)]:  # fmt: skip
            kw = dict(trace=trace) if trace == "exact" else dict(trace=trace, num_probes=k)
            f = jax.jit(
                lambda key, x, kw=kw, m=model, p=dparams: likelihood.log_likelihood(
                    key, m, p, sch, x, **kw
                )
            )
            t0 = time.perf_counter()
            jax.block_until_ready(f(jax.random.PRNGKey(2), x))
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ll = jax.block_until_ready(f(jax.random.PRNGKey(3), x))
            run_s = time.perf_counter() - t0
            err = np.abs(np.asarray(ll) - np.asarray(ref))
            name = "exact" if trace == "exact" else f"hutchinson x{k}"
            rows.append(dict(case=cname, dim=dist.dim, estimator=name, mean_abs_err=float(err.mean()),
                             max_abs_err=float(err.max()), seconds=run_s, compile_s=compile_s))  # fmt: skip
            _log(f"likelihood {cname} {name}: mean |err| {err.mean():.3g} max {err.max():.3g} nats, "
                 f"{run_s:.2f} s (compile {compile_s:.1f} s)")  # fmt: skip
    # cost on a score network of a realistic size (errors need the exact model above)
    timing = []
    for d in (2, 16, 64, 256):
        net = models.MLPScoreNet(hidden=128, depth=3, zero_init_out=False)
        x = jax.random.normal(jax.random.PRNGKey(0), (32, d))
        model, params = models.as_denoiser(net, jax.random.PRNGKey(1), x[:1], parametrization="v")
        params = jax.tree.map(lambda p: 0.3 * p, params)
        for trace, k in (("exact", 0), ("hutchinson", 1), ("hutchinson", 16)):
            kw = dict(trace=trace) if trace == "exact" else dict(trace=trace, num_probes=k)
            f = jax.jit(
                lambda key, x, kw=kw, m=model, p=params: likelihood.log_likelihood(
                    key, m, p, sch, x, **kw
                )
            )
            jax.block_until_ready(f(jax.random.PRNGKey(2), x))
            t0 = time.perf_counter()
            jax.block_until_ready(f(jax.random.PRNGKey(3), x))
            name = "exact" if trace == "exact" else f"hutchinson x{k}"
            timing.append(dict(dim=d, estimator=name, seconds=time.perf_counter() - t0))
            _log(f"likelihood MLP D={d} {name}: {timing[-1]['seconds']:.3f} s")
    return {"rows": rows, "n": n, "mlp_timing": timing}


def report_likelihood(res) -> None:
    print(
        f"\nlog_likelihood of the exact model: error vs the exact log p_t_end ({res['n']} points), time"
    )
    print(f"{'case':14s} {'estimator':15s} | {'mean |err|':>10s} | {'max |err|':>9s} | {'s':>6s}")
    for r in res["rows"]:
        print(f"{r['case']:14s} {r['estimator']:15s} | {r['mean_abs_err']:10.3g} | "
              f"{r['max_abs_err']:9.3g} | {r['seconds']:6.2f}")  # fmt: skip
    if res.get("mlp_timing"):
        print("\nlog_likelihood cost on MLPScoreNet(128, 3), batch 32 (seconds per call)")
        for r in res["mlp_timing"]:
            print(f"D={r['dim']:4d} {r['estimator']:15s} | {r['seconds']:7.3f}")


# ------------------------------------------------------------------------------------------
def plot(res: dict, path: str) -> None:
    from matplotlib.figure import Figure

    panels = [k for k in ("param", "ema", "lr", "likelihood") if k in res]
    fig = Figure(figsize=(5 * max(len(panels), 1), 4))
    for i, name in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if name == "param":
            rows = [r for r in res["param"]["rows"] if r["schedule"] == "vp_linear"]
            s = _summ(
                rows, lambda r: (r["problem"], r["recipe"]), lambda r: r["ddim20"]["sw_ratio"]
            )
            probs = sorted({r["problem"] for r in rows})
            recipes = ["exact", *RECIPES]
            w = 0.8 / len(recipes)
            for j, rc in enumerate(recipes):
                ys = [s.get((p, rc), (np.nan,))[0] for p in probs]
                ax.bar(np.arange(len(probs)) + j * w, ys, w, label=rc)
            ax.set_xticks(np.arange(len(probs)) + 0.4 - w / 2, probs)
            ax.set_yscale("log")
            ax.axhline(1.0, c="k", lw=0.8)
            ax.set_ylabel("SW2 / floor (DDIM-20, vp_linear)")
            ax.legend(fontsize=7)
        elif name == "ema":
            rows = res["ema"]["rows"]
            lengths = sorted({r["steps"] for r in rows})
            for k in EMAS:
                ax.plot(lengths, [np.mean([r[k] for r in rows if r["steps"] == n]) for n in lengths],
                        "o-", label=k)  # fmt: skip
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("training steps")
            ax.set_ylabel("SW2 / floor (DDIM-20, ring8)")
            ax.legend(fontsize=7)
        elif name == "lr":
            rows = res["lr"]["rows"]
            s = _summ(
                rows,
                lambda r: (r["problem"], r["steps"], r["lr"]),
                lambda r: r["ddim20"]["sw_ratio"],
            )
            cells = sorted({(r["problem"], r["steps"]) for r in rows})
            lrs = sorted({r["lr"] for r in rows})
            w = 0.8 / len(lrs)
            for j, lr in enumerate(lrs):
                ax.bar(
                    np.arange(len(cells)) + j * w, [s[(p, n, lr)][0] for p, n in cells], w, label=lr
                )
            ax.set_xticks(np.arange(len(cells)) + 0.4 - w / 2, [f"{p}\n{n}" for p, n in cells])
            ax.set_ylabel("SW2 / floor (DDIM-20)")
            ax.legend(fontsize=7)
        else:
            rows = res["likelihood"]["rows"]
            for case in sorted({r["case"] for r in rows}):
                rs = [r for r in rows if r["case"] == case]
                ax.loglog(
                    [r["seconds"] for r in rs],
                    [r["mean_abs_err"] + 1e-8 for r in rs],
                    "o-",
                    label=case,
                )
                for r in rs:
                    ax.annotate(
                        r["estimator"].replace("hutchinson ", "H"),
                        (r["seconds"], r["mean_abs_err"] + 1e-8),
                        fontsize=6,
                    )
            ax.set_xlabel("seconds per call")
            ax.set_ylabel("mean |log p error| (nats)")
            ax.legend(fontsize=7)
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


TS_RECIPES = {  # training times of the default parametrization (and eps at the default times)
    "edm sd=1 uniform": ("edm sd=1", {"t_sampling": "uniform"}),
    "edm sd=1 lognormal": ("edm sd=1", {"t_sampling": "lognormal"}),
    "edm sd=1 log_snr": ("edm sd=1", {"t_sampling": "log_snr"}),
    "edm sd=1 cosine": ("edm sd=1", {"t_sampling": "cosine"}),
    "eps": ("eps", {}),
}


def section_tsampling(args) -> dict:
    """The training-time distribution of the default parametrization: uniform in t, EDM's
    lognormal, uniform in log-SNR and the cosine schedule's log-SNR (the default on every
    schedule but edm, which defaults to lognormal), and eps at the default times; SW2, the
    off-mode metric and the Gaussian's covariance error."""
    rows = []
    for pname, prob, sname in _cells(args, ("vp_linear", "vp_cosine", "ve", "flow", "edm")):
        sch = SCHEDULES[sname]()
        k_eval = jax.random.PRNGKey(7)
        exact, dparams = analytic.as_denoiser(prob["dist"], sch)
        ev = _evaluate(prob, exact, dparams, sch, k_eval)
        rows.append({"problem": pname, "schedule": sname, "recipe": "exact", "seed": 0, **ev})
        for name, (recipe, kw) in TS_RECIPES.items():
            if args.recipes and name not in args.recipes.split(","):
                continue
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                model, state, _ = _train(prob, sch, recipe, seed, **kw)
                ev = _evaluate(prob, model, state.ema_params, sch, k_eval)
                rows.append(dict(problem=pname, schedule=sname, recipe=name, seed=seed, **ev))
                _log(f"tsampling {pname:7s} {sname:9s} {name:17s} seed {seed}: " + "  ".join(
                    f"{k} {v['sw_ratio']:.2f} off {v.get('off_mode', float('nan')):.3f}"
                    for k, v in ev.items() if k != "floor")
                    + f" ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        _merge(args, "tsampling", rows)
        jax.clear_caches()
    return _merge(args, "tsampling", rows)


def report_tsampling(res) -> None:
    rows = res["rows"]
    names = ["exact", *TS_RECIPES]
    cells = sorted({(r["problem"], r["schedule"]) for r in rows})
    for metric, label in (
        (lambda r: r["ddim20"]["sw_ratio"], "SW2 / floor, DDIM-20"),
        (lambda r: r["pf_ode"]["sw_ratio"], "SW2 / floor, adaptive PF-ODE"),
        (lambda r: r["pf_ode"].get("off_mode", np.nan), "off-mode fraction, PF-ODE (data: 0.01)"),
        (lambda r: r["ddim20"].get("cov_ratio", np.nan), "covariance error / exact-sample error, DDIM-20"),
    ):  # fmt: skip
        s = _summ(rows, lambda r: (r["problem"], r["schedule"], r["recipe"]), metric)
        print(f"\ntraining times: {label} (mean +- std over seeds)")
        print(f"{'problem':8s} {'schedule':9s} | " + " | ".join(f"{c:>16s}" for c in names))
        for p, sn in cells:
            vals = [s.get((p, sn, rc)) for rc in names]
            if all(v is None or np.isnan(v[0]) for v in vals):
                continue
            print(f"{p:8s} {sn:9s} | " + " | ".join(
                f"{'-':>16s}" if v is None or np.isnan(v[0]) else f"{v[0]:>10.3f}+-{v[1]:<4.2f}"
                for v in vals))  # fmt: skip


SECTIONS = {
    "param": (section_param, report_param),
    "tsampling": (section_tsampling, report_tsampling),
    "digits": (section_digits, report_digits),
    "ema": (section_ema, report_ema),
    "lr": (section_lr, report_lr),
    "likelihood": (section_likelihood, report_likelihood),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--recipe", default="v", help="the recipe the ema / lr sections train with")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--problems", default="", help="param/tsampling: comma-separated subset")
    p.add_argument("--schedules", default="", help="param/tsampling: comma-separated subset")
    p.add_argument("--recipes", default="", help="param/tsampling: comma-separated subset")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = 1
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "defaults.json")
    res = {}
    if os.path.exists(path):  # sections run separately accumulate in one file
        with open(path) as f:
            res = json.load(f)
    args.previous = json.loads(json.dumps(res))

    def save_partial(name, payload):
        res[name] = {**payload, "quick": args.quick}
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    args.save_partial = save_partial
    t0 = time.perf_counter()
    for name in args.only.split(","):
        if name not in SECTIONS:
            p.error(f"--only: unknown section {name!r}; choose from {', '.join(SECTIONS)}")
        run, _ = SECTIONS[name]
        res[name] = run(args)
        res[name]["quick"] = args.quick
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    for name in SECTIONS:
        if name in res:
            SECTIONS[name][1](res[name])
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; wrote {path}")
    plot(res, os.path.join(args.out, "defaults.png"))
    return res


if __name__ == "__main__":
    main()
