"""Subprocess worker for tests/test_parallel.py: runs jaxdiff.parallel on N forced host devices.

Usage: python tests/_parallel_worker.py --devices N --out DIR [--slow]

``XLA_FLAGS=--xla_force_host_platform_device_count=N`` must be set before jax starts, hence a
subprocess per device count. Writes the arrays to ``DIR/dev{N}.npz`` and prints one JSON line
(error messages of bad inputs, timings, row-stability measurements).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--slow", action="store_true")
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    t_start = time.perf_counter()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.flatten_util import ravel_pytree

    import jaxdiff
    from jaxdiff import parallel, samplers, schedules
    from jaxdiff._checks import JaxdiffError
    from jaxdiff.losses import dsm_loss
    from jaxdiff.models import MLPScoreNet, as_denoiser
    from jaxdiff.train import init, make_step

    n = args.devices
    assert jax.device_count() == n, (jax.device_count(), n)
    arrays: dict[str, np.ndarray] = {}
    info: dict = {"devices": n}
    errors: dict[str, str] = {}

    def expect_error(name, fn):
        try:
            fn()
        except JaxdiffError as e:
            errors[name] = str(e)
        else:
            errors[name] = "NO ERROR"

    sch = schedules.vp_linear()
    net = MLPScoreNet(hidden=16, depth=1, num_classes=3, zero_init_out=False)
    model, params = as_denoiser(
        net,
        jax.random.key(0),
        jnp.zeros((1, 2)),
        cond_example=jnp.zeros((1,), jnp.int32),
        parametrization="eps",
    )
    key = jax.random.key(7)
    mesh = parallel.make_mesh(n)
    labels = lambda b: (np.arange(b) % 3).astype(np.int32)  # noqa: E731

    slow = args.slow
    if slow:
        sampler_set = {
            "ddim": samplers.ddim(),
            "dpm_solver_pp": samplers.dpm_solver_pp(),
            "ddpm": samplers.ddpm(),
            "sde_dpm_solver_pp": samplers.sde_dpm_solver_pp(),
        }
    else:
        sampler_set = {"sde_dpm_solver_pp": samplers.sde_dpm_solver_pp()}
    t0 = time.perf_counter()
    for name, s in sampler_set.items():
        for b in (64, 256):
            kw = dict(steps=3, cond=labels(b), chunk=8)
            x = parallel.sample(key, model, params, sch, b, s, mesh=mesh, **kw)
            assert x.shape == (b, 2) and len(x.sharding.device_set) == n
            arrays[f"mesh_{name}_{b}"] = np.asarray(x)
            if slow or b == 64:
                arrays[f"pmap_{name}_{b}"] = np.asarray(
                    parallel.sample_pmap(key, model, params, sch, b, s, devices=n, **kw)
                )
    if slow:  # padding: 20 rows (not a multiple of n * chunk) = the first 20 rows of 64
        arrays["mesh_ddim_20"] = np.asarray(
            parallel.sample(
                key,
                model,
                params,
                sch,
                20,
                samplers.ddim(),
                steps=3,
                cond=labels(20),
                mesh=mesh,
                chunk=8,
            )  # fmt: skip
        )
    info["sample_s"] = time.perf_counter() - t0

    if n == 1 and slow:
        # one device, chunk = batch: equals jaxdiff.sample bitwise
        for name, s in sampler_set.items():
            kw = dict(steps=3, cond=labels(64))
            ref = jaxdiff.sample(key, model, params, sch, (64, 2), s, **kw)
            arrays[f"ref_{name}_64"] = np.asarray(ref)
            arrays[f"whole_{name}_64"] = np.asarray(
                parallel.sample(key, model, params, sch, 64, s, mesh=mesh, chunk=64, **kw)
            )
        # are XLA:CPU matmuls row-stable across batch sizes? f(x[:b]) vs f(x)[:b]
        f = jax.jit(lambda p, x, t, c: model(p, x, t, c))
        xb = jax.random.normal(jax.random.key(1), (256, 2))
        tb, cb = jnp.full((256,), 0.5), jnp.asarray(labels(256))
        full = np.asarray(f(params, xb, tb, cb))
        stab = {}
        for b in (1, 8, 64, 128):
            part = np.asarray(f(params, xb[:b], tb[:b], cb[:b]))
            stab[str(b)] = [
                bool(np.array_equal(part, full[:b])),
                float(np.abs(part - full[:b]).max()),
            ]
        info["row_stable_vs_256"] = stab

    # training: pmap step (global batch 64) vs make_step, same per-example loss randomness
    t0 = time.perf_counter()
    data = jax.random.normal(jax.random.key(2), (512, 2)) * jnp.asarray([1.0, 0.5]) + 1.0
    data_c = (data, jnp.asarray(labels(512)))
    opt = optax.adam(1e-2)
    loss_fn = parallel.per_example_loss(dsm_loss)
    n_steps = 3
    state0 = init(params, opt, ema_decay=0.9)
    step = parallel.make_pmap_step(model, sch, opt, 64, ema_decay=0.9, loss_fn=loss_fn)
    p_step = jax.pmap(step, axis_name="batch", in_axes=(0, None, None))
    st = parallel.replicate_state(state0, n)
    losses = []
    for _ in range(n_steps):
        st, m = p_step(st, key, data_c)
        losses.append(np.asarray(m["loss"]))
    losses = np.stack(losses)  # (steps, n): every device reports the same pmean'd loss
    info["pmap_loss_device_spread"] = float(np.max(np.ptp(losses, axis=1)))
    arrays["pmap_losses"] = losses[:, 0]
    final = parallel.unreplicate_state(st)
    arrays["pmap_params"] = np.asarray(ravel_pytree(final.params)[0])
    arrays["pmap_ema"] = np.asarray(ravel_pytree(final.ema_params)[0])
    if n == 1:
        s_step = jax.jit(make_step(model, sch, opt, batch_size=64, ema_decay=0.9, loss_fn=loss_fn))
        st, ref_losses = state0, []
        for _ in range(n_steps):
            st, m = s_step(st, key, data_c)
            ref_losses.append(float(m["loss"]))
        arrays["step_losses"] = np.asarray(ref_losses)
        arrays["step_params"] = np.asarray(ravel_pytree(st.params)[0])
        arrays["step_ema"] = np.asarray(ravel_pytree(st.ema_params)[0])

    # jaxdiff.train(..., mesh=): loss trajectory on this many devices
    if slow and "mesh" in jaxdiff.train.train.__code__.co_varnames:
        _, hist = jaxdiff.train.train(
            key, model, params, sch, data_c, opt, 40, batch_size=64, progress=False,
            log_every=5, mesh=mesh,
        )  # fmt: skip
        arrays["train_mesh_loss"] = np.asarray(hist["loss"])
    info["train_s"] = time.perf_counter() - t0

    if slow:
        from jaxdiff.models import UNet

        unet = UNet(channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,),
                    num_heads=2, groups=4)  # fmt: skip
        umodel, uparams = as_denoiser(
            unet, jax.random.key(3), jnp.zeros((1, 8, 8, 1)), parametrization="eps"
        )
        leaves, tdef = jax.tree.flatten(uparams)
        ks = jax.random.split(jax.random.key(4), len(leaves))
        uparams = tdef.unflatten(
            [
                p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
                for p, k in zip(leaves, ks, strict=True)
            ]
        )  # the output layer is zero-initialised: perturb so samples depend on the net
        if n == 8:  # within one process: 1- and 2-device meshes vs the 8-device mesh
            for m in (1, 2):
                arrays[f"unet_mesh{m}_32"] = np.asarray(
                    parallel.sample(
                        key,
                        umodel,
                        uparams,
                        sch,
                        32,
                        samplers.sde_dpm_solver_pp(),
                        steps=3,
                        mesh=parallel.make_mesh(m),
                        chunk=8,
                    )  # fmt: skip
                )
        for b in (16, 32):
            arrays[f"unet_mesh_{b}"] = np.asarray(
                parallel.sample(
                    key,
                    umodel,
                    uparams,
                    sch,
                    b,
                    samplers.sde_dpm_solver_pp(),
                    steps=3,
                    mesh=mesh,
                    chunk=8,
                )  # fmt: skip
            )

    # bad inputs that need several devices
    if n > 1:
        expect_error("shard_batch", lambda: parallel.shard_batch(np.zeros((n + 1, 2)), mesh))
        bad_step = parallel.make_pmap_step(model, sch, opt, 4 * n + 1, loss_fn=loss_fn)
        expect_error(
            "pmap_batch",
            lambda: jax.pmap(bad_step, axis_name="batch", in_axes=(0, None, None))(
                parallel.replicate_state(state0, n), key, data_c
            ),
        )
    expect_error("make_mesh", lambda: parallel.make_mesh(n + 1))

    np.savez(os.path.join(args.out, f"dev{n}.npz"), **arrays)
    info["errors"] = errors
    info["total_s"] = time.perf_counter() - t_start
    print(json.dumps(info))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
