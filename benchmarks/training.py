"""Training speed on CPU: jaxdiff's DSM train step vs an equivalent PyTorch training loop.

For each case (network, data, width, batch size) the SAME architecture (parameter counts checked
equal and printed; same initial weights), the same batch, optimizer (Adam, lr 1e-3, optax/torch
defaults otherwise), loss (eps-prediction DSM, ``weighting="none"``, VP-linear schedule,
``t ~ U[1e-3, 1]``, squared error summed over the event and averaged over the batch) and EMA
update (decay 0.999, on both sides; ``--no-ema`` drops it on both) is timed five ways:

* ``jaxdiff train``: the public API, ``jaxdiff.train.train(..., progress=False)``; the rate is
  ``steps / sum(chunk seconds)`` from its history (``steps_per_s`` excludes compilation), with
  ``log_every = min(100, steps)`` (100 is its default), so it includes the per-chunk host round
  trip, the loss average and the NaN check;
* ``jaxdiff bare``: ``jaxdiff.train.make_step`` in a jitted ``lax.fori_loop`` of ``n`` steps,
  nothing else (one dispatch);
* ``jaxdiff jit step``: ``jax.jit(make_step)`` called from a Python loop, one dispatch per step
  (shows what the compiled loop gains or loses against per-step dispatch);
* ``torch``: the PyTorch twin (``benchmarks/_torch_nets.py``) in a plain Python loop:
  batch gather, ``t``/``eps`` draws, forward, ``backward``, ``Adam.step`` (``foreach=True``) and
  the EMA (``torch._foreach_lerp_``), eager mode, float32, ``torch.set_num_threads`` = the number
  of usable cores (XLA's CPU thread pool uses the same number by default);
* ``torch 1 thread``: the same loop with ``torch.set_num_threads(1)`` (OpenMP threads can slow
  small networks down, badly so on a busy machine); ``train/best`` compares with the faster torch.

Cases: jaxdiff's ``MLPScoreNet`` (depth 3) on 2-D two-moons data and on 64-D (flattened 8x8
digits), widths 128 and 512; jaxdiff's ``UNet`` (2 levels, attention at 4x4) on 8x8x1 digits
images, channels 16 and 32; batch sizes 64 and 256 (``--quick``: batch 64, width 128 / 16).
The networks' equivalence (forward outputs, DSM loss, gradients and one Adam step agree to
float32 accuracy with the same weights) is tested in ``tests/test_torch_parity_nets.py``.

Every measurement is repeated (``--repeats``, interleaving the five ways, so that load drifts hit
them alike) and the best rate is reported (the medians are in the JSON). Timings mean something
on an idle machine only. Needs the ``bench`` extra (torch 2.13 CPU). Writes ``training.json`` and
``training.png`` to ``--out``.

    python benchmarks/training.py [--quick] [--only mlp|unet] [--no-ema] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jaxdiff  # noqa: E402
from jaxdiff import models, schedules  # noqa: E402
from jaxdiff import train as jtrain  # noqa: E402

LR = 1e-3
EMA = 0.999
T_MIN, T_MAX = 1e-3, 1.0  # vp_linear's [t_end, t_start]: dsm_loss's default time range


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def digits_images() -> np.ndarray:
    """The 1797 scikit-learn digits as ``(N, 8, 8, 1)`` float32 in ``[-1, 1]``."""
    load = getattr(jaxdiff.data, "load_digits", None)
    if load is not None:
        x, _ = load(split="all")
        return np.asarray(x, np.float32)
    from sklearn.datasets import load_digits  # fallback while jaxdiff.data.load_digits is absent

    img = load_digits().images.astype(np.float32)
    return (img / 8.0 - 1.0)[..., None]


def two_moons(n: int = 8192) -> np.ndarray:
    return np.asarray(jaxdiff.data.two_moons(jax.random.PRNGKey(0), n), np.float32)


# ------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    """One benchmark row: a Flax module, its torch twin and the data."""

    name: str
    net_kind: str  # "mlp" | "unet"
    width: int
    batch: int
    data: np.ndarray  # jaxdiff's layout (images NHWC)
    flax_net: object
    make_torch: Callable  # (variables) -> torch module with the same weights
    torch_data: np.ndarray  # the same examples in torch's layout (images NCHW)


def mlp_case(data_name: str, hidden: int, batch: int) -> Case:
    import _torch_nets as tn

    data = two_moons() if data_name == "2-D" else digits_images().reshape(-1, 64)
    net = models.MLPScoreNet(hidden=hidden, depth=3)

    def make_torch(variables):
        return tn.load_mlp_params(tn.TorchMLPScoreNet.from_flax(net, data.shape[1:]), variables)

    return Case(
        f"MLP {data_name} w{hidden} b{batch}", "mlp", hidden, batch, data, net, make_torch, data
    )


def unet_case(channels: int, batch: int) -> Case:
    import _torch_nets as tn

    from jaxdiff.unet import UNet

    data = digits_images()
    net = UNet(**unet_fields(channels))

    def make_torch(variables):
        return tn.load_unet_params(tn.TorchUNet.from_flax(net, data.shape[1:]), variables)

    nchw = np.ascontiguousarray(data.transpose(0, 3, 1, 2))
    return Case(
        f"UNet 8x8 c{channels} b{batch}", "unet", channels, batch, data, net, make_torch, nchw
    )


def unet_fields(channels: int) -> dict:
    """The benchmarked UNet: two resolutions (8x8, 4x4), attention at 4x4."""
    return dict(
        channels=channels,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
    )


def cases(quick: bool, only: str | None) -> list[Case]:
    out = []
    batches = (64,) if quick else (64, 256)
    mlp_widths = (128,) if quick else (128, 512)
    unet_widths = (16,) if quick else (16, 32)
    if only in (None, "mlp"):
        for data_name in ("2-D", "64-D"):
            for w in mlp_widths:
                for b in batches:
                    out.append(mlp_case(data_name, w, b))
    if only in (None, "unet"):
        try:
            import jaxdiff.unet  # noqa: F401
        except ImportError as e:
            print(f"(UNet cases skipped: {e})")
        else:
            for c in unet_widths:
                for b in batches:
                    out.append(unet_case(c, b))
    return out


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def n_params(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


class JaxSide:
    """jaxdiff's train step for one case, timed through ``train`` and through a bare loop."""

    def __init__(self, case: Case, ema_decay: float):
        self.case, self.ema_decay = case, ema_decay
        self.schedule = schedules.vp_linear()
        self.optimizer = optax.adam(LR)
        self.data = jnp.asarray(case.data)
        self.model, self.params = models.as_denoiser(
            case.flax_net, jax.random.PRNGKey(0), self.data[:1], parametrization="eps"
        )
        step = jtrain.make_step(
            self.model,
            self.schedule,
            self.optimizer,
            ema_decay=ema_decay,
            batch_size=case.batch,
        )

        @jax.jit
        def run(state, key, data, n):
            return jax.lax.fori_loop(0, n, lambda _, s: step(s, key, data)[0], state)

        self._run = run
        self._one = jax.jit(step)
        self.state = jtrain.init(self.params, self.optimizer, ema_decay)
        self.key = jax.random.PRNGKey(1)

    def bare(self, n: int) -> float:
        """Steps per second of the bare jitted loop (compiled on the first call)."""
        jax.block_until_ready(self._run(self.state, self.key, self.data, jnp.int32(0)))
        t0 = time.perf_counter()
        self.state = jax.block_until_ready(self._run(self.state, self.key, self.data, jnp.int32(n)))
        return n / (time.perf_counter() - t0)

    def per_step(self, n: int) -> float:
        """Steps per second of the jitted ``make_step`` called from Python, one step per call."""
        state = jax.block_until_ready(self._one(self.state, self.key, self.data)[0])
        t0 = time.perf_counter()
        for _ in range(n):
            state, _ = self._one(state, self.key, self.data)
        jax.block_until_ready(state)
        self.state = state
        return n / (time.perf_counter() - t0)

    def train(self, n: int) -> tuple[float, float]:
        """(steps per second from ``train``'s history, last chunk's mean loss); chunks of
        ``log_every = min(100, n)`` steps (100 is ``train``'s default)."""
        _, hist = jtrain.train(
            self.key,
            self.model,
            self.params,
            self.schedule,
            self.data,
            self.optimizer,
            n,
            batch_size=self.case.batch,
            ema_decay=self.ema_decay,
            progress=False,
            log_every=min(100, n),
        )
        steps = np.diff(np.concatenate([[0], hist["step"]]))
        return float(steps.sum() / np.sum(steps / hist["steps_per_s"])), float(hist["loss"][-1])


class TorchSide:
    """The PyTorch twin's training loop for one case (same initial weights as jaxdiff)."""

    def __init__(self, case: Case, jax_params, ema_decay: float, threads: int):
        import _torch_nets as tn
        import torch

        torch.manual_seed(0)
        self.threads = threads
        self.net = case.make_torch(jax_params)
        self.n_params = tn.count_params(self.net)
        self.trainer = tn.TorchDSMTrainer(
            self.net,
            torch.from_numpy(np.array(case.torch_data, np.float32)),
            case.batch,
            lr=LR,
            ema_decay=ema_decay,
            t_min=T_MIN,
            t_max=T_MAX,
        )

    def run(self, n: int, threads: int | None = None) -> tuple[float, float]:
        """(steps per second of ``n`` steps with ``threads`` intra-op threads, last loss)."""
        import torch

        torch.set_num_threads(threads or self.threads)
        try:
            t0 = time.perf_counter()
            for _ in range(n):
                loss = self.trainer.step()
            return n / (time.perf_counter() - t0), float(loss)
        finally:
            torch.set_num_threads(self.threads)


def calibrate(fn, target_s: float, lo: int, hi: int) -> int:
    """Steps so that ``fn(steps)`` takes about ``target_s`` seconds (fn returns steps/s); the
    first call also warms caches and allocators."""
    fn(lo)
    return int(np.clip(target_s * fn(lo), lo, hi))


def bench_case(case: Case, args) -> dict:
    ema = 0.0 if args.no_ema else EMA
    t0 = time.perf_counter()
    jx = JaxSide(case, ema)
    th = TorchSide(case, jx.params, ema, args.threads)
    pj, pt = n_params(jx.params), th.n_params
    if pj != pt:
        raise RuntimeError(f"{case.name}: parameter counts differ (jaxdiff {pj}, torch {pt})")
    jx.train(2)  # compiles train's chunk (train excludes it from steps_per_s anyway)
    lo = 2 if case.net_kind == "unet" else 10  # fewest steps per measurement
    n_bare = calibrate(jx.bare, args.seconds, lo, 20000)
    n_train = n_bare if n_bare < 100 else 100 * round(n_bare / 100)  # whole chunks of 100
    n_step = calibrate(jx.per_step, args.seconds, lo, 20000)
    n_torch = calibrate(lambda n: th.run(n)[0], args.seconds, lo, 20000)
    n_torch1 = (
        calibrate(lambda n: th.run(n, 1)[0], args.seconds, lo, 20000) if args.threads > 1 else 0
    )
    setup_s = time.perf_counter() - t0
    rates = {k: [] for k in KINDS}
    for _ in range(args.repeats):  # interleaved, so load drifts hit every way alike
        r, loss_j = jx.train(n_train)
        rates["jaxdiff train"].append(r)
        rates["jaxdiff bare"].append(jx.bare(n_bare))
        rates["jaxdiff jit step"].append(jx.per_step(n_step))
        r, loss_t = th.run(n_torch)
        rates["torch"].append(r)
        if n_torch1:
            rates["torch 1 thread"].append(th.run(n_torch1, 1)[0])
    rates = {k: v for k, v in rates.items() if v}
    best = {k: max(v) for k, v in rates.items()}
    best_torch = max(v for k, v in best.items() if k.startswith("torch"))
    return dict(
        case=case.name,
        net=case.net_kind,
        width=case.width,
        batch=case.batch,
        event_shape=list(case.data.shape[1:]),
        params_jaxdiff=pj,
        params_torch=pt,
        steps_per_s=best,
        steps_per_s_median={k: statistics.median(v) for k, v in rates.items()},
        all_rates=rates,
        steps_timed={
            "jaxdiff train": n_train,
            "jaxdiff bare": n_bare,
            "jaxdiff jit step": n_step,
            "torch": n_torch,
            "torch 1 thread": n_torch1,
        },
        ratio_train_over_torch=best["jaxdiff train"] / best["torch"],
        ratio_bare_over_torch=best["jaxdiff bare"] / best["torch"],
        ratio_train_over_best_torch=best["jaxdiff train"] / best_torch,
        train_over_bare=best["jaxdiff train"] / best["jaxdiff bare"],
        last_loss={"jaxdiff train": loss_j, "torch": loss_t},
        setup_and_compile_s=setup_s,
    )


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
KINDS = ("jaxdiff train", "jaxdiff bare", "jaxdiff jit step", "torch", "torch 1 thread")
COLUMNS = (  # header, width, format, value
    ("case", 24, "<24s", lambda r: r["case"]),
    ("params", 8, ">8d", lambda r: r["params_jaxdiff"]),
    ("train/s", 8, ">8.1f", lambda r: r["steps_per_s"]["jaxdiff train"]),
    ("bare/s", 8, ">8.1f", lambda r: r["steps_per_s"]["jaxdiff bare"]),
    ("step/s", 8, ">8.1f", lambda r: r["steps_per_s"]["jaxdiff jit step"]),
    ("torch/s", 8, ">8.1f", lambda r: r["steps_per_s"]["torch"]),
    ("torch1/s", 8, ">8.1f", lambda r: r["steps_per_s"].get("torch 1 thread", float("nan"))),
    ("train/torch", 11, ">11.2f", lambda r: r["ratio_train_over_torch"]),
    ("bare/torch", 10, ">10.2f", lambda r: r["ratio_bare_over_torch"]),
    ("train/best", 10, ">10.2f", lambda r: r["ratio_train_over_best_torch"]),
    ("train/bare", 10, ">10.2f", lambda r: r["train_over_bare"]),
)


def print_header():
    print(" ".join(f"{h:{'<' if i == 0 else '>'}{w}s}" for i, (h, w, _, _) in enumerate(COLUMNS)))


def print_row(r):
    print(" ".join(f"{f(r):{fmt}}" for _, _, fmt, f in COLUMNS), flush=True)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if all(k in r["steps_per_s"] for r in rows)]
    colors = dict(
        zip(KINDS, ["tab:blue", "tab:cyan", "tab:green", "tab:orange", "tab:red"], strict=True)
    )
    x = np.arange(len(rows))
    w = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(rows) + 2), 4.5))
    for i, k in enumerate(kinds):
        off = (i - (len(kinds) - 1) / 2) * w
        ax.bar(x + off, [r["steps_per_s"][k] for r in rows], w, label=k, color=colors[k])
    ax.set_xticks(x)
    ax.set_xticklabels([r["case"] for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("training steps / s (higher is better)")
    ax.set_title(
        "DSM training on CPU: jaxdiff vs PyTorch (same net, batch, Adam, EMA)", fontsize=10
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="batch 64, one width per net, short runs")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--only", choices=("mlp", "unet"), default=None)
    p.add_argument("--no-ema", action="store_true", help="drop the EMA update on both sides")
    p.add_argument("--seconds", type=float, default=None, help="target seconds per measurement")
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 0.3 if args.quick else 0.6
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    os.makedirs(args.out, exist_ok=True)
    import torch

    threads = args.threads = usable_cores()
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    print(
        f"CPU: {platform.processor() or platform.machine()}, {threads} usable cores; "
        f"XLA: default CPU thread pool ({threads} threads), torch.set_num_threads({threads}); "
        f"jax {jax.__version__}, torch {torch.__version__}; EMA "
        f"{'off' if args.no_ema else EMA} on both sides\n"
        "train = jaxdiff.train.train (public API); bare = jitted make_step in a fori_loop; "
        "step = jitted make_step called once per step from Python; "
        f"torch = Python loop with {threads} threads; torch1 = the same with 1 thread; "
        "best = the faster torch"
    )
    print_header()
    rows = []
    for case in cases(args.quick, args.only):
        rows.append(bench_case(case, args))
        print_row(rows[-1])
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s")
    meta = dict(
        threads=threads,
        jax=jax.__version__,
        torch=torch.__version__,
        machine=platform.machine(),
        processor=platform.processor(),
        quick=args.quick,
        ema_decay=0.0 if args.no_ema else EMA,
        lr=LR,
        seconds_per_measurement=args.seconds,
        repeats=args.repeats,
        total_s=total,
        torch_adam="foreach",
        torch_ema="torch._foreach_lerp_",
    )
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if rows:
        plot(rows, os.path.join(args.out, "training.png"))
    print(f"wrote {args.out}/training.json and training.png")
    return rows


if __name__ == "__main__":
    main()
