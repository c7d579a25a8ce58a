"""No deprecation warnings from jaxdiff: importing every module and running the main paths
(training, the samplers, guidance, likelihood, checkpoints, fine-tuning, the device paths) in
a fresh interpreter with DeprecationWarning / FutureWarning / PendingDeprecationWarning turned
into errors.

A fresh process matters: a warning raised while a function is traced is not raised again once
the compiled program is cached, so in the test process it may already have been swallowed.
``make test-newest`` runs this file against the newest releases of every dependency.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import tempfile
    import jax, jax.numpy as jnp, optax
    import jaxdiff
    for name in jaxdiff._SUBMODULES:
        __import__("jaxdiff." + name)
    import jaxdiff.cli
    from jaxdiff import analytic, checkpoint, guidance, likelihood, models, parallel
    from jaxdiff import samplers, schedules, train
    from jaxdiff.optimize import finetune

    key = jax.random.PRNGKey(0)
    sch = schedules.vp_linear()
    dist = analytic.ring_mixture()
    data = dist.sample(key, 256)
    labels = jnp.arange(256) % 2
    net = models.MLPScoreNet(hidden=16, depth=1, embed_dim=8, num_classes=2)
    model, params = models.as_denoiser(net, key, data[:1], parametrization="v",
                                       cond_example=labels[:1])
    opt = optax.adam(1e-3)
    state, _ = train.train(key, model, params, sch, (data, labels), opt, 4, batch_size=16,
                           progress=False, log_every=2, cond_drop_prob=0.2,
                           null_cond=net.null_cond)
    d = tempfile.mkdtemp()
    checkpoint.save(d, state)
    checkpoint.restore(d, state)
    checkpoint.restore(d)
    guided = guidance.cfg(model, 2.0, null_cond=net.null_cond)
    c = labels[:8]
    for s in (samplers.ddim(), samplers.dpm_solver_pp(), samplers.sde_dpm_solver_pp(),
              samplers.pf_ode(), samplers.reverse_sde()):
        jaxdiff.sample(key, guided, state.ema_params, sch, (8, 2), s, steps=4, cond=c)
    exact, ep = analytic.as_denoiser(dist, sch)
    likelihood.log_likelihood(key, exact, ep, sch, data[:4])
    likelihood.log_likelihood(key, exact, ep, sch, data[:4], trace="hutchinson")
    umodel, uparams = models.as_denoiser(models.MLPScoreNet(hidden=16, depth=1, embed_dim=8),
                                         key, data[:1], parametrization="v")
    fs = finetune.init(key, umodel, uparams, sch, opt, sampler=samplers.ddpm(), num_steps=4,
                       k=2, batch_size=8)
    finetune.jit_step(fs, lambda x: -jnp.sum(x**2, axis=-1))
    p_step = jax.pmap(parallel.make_pmap_step(umodel, sch, opt, 16), axis_name="batch",
                      in_axes=(0, None, None))
    p_step(parallel.replicate_state(train.init(uparams, opt), 1), key, data)
    parallel.sample(key, umodel, uparams, sch, 8, samplers.ddim(), steps=4, chunk=4)
    print("OK")
    """
)


def test_no_deprecation_warnings_from_the_library():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    args = [sys.executable]
    for cat in ("DeprecationWarning", "FutureWarning", "PendingDeprecationWarning"):
        args += ["-W", f"error::{cat}"]
    res = subprocess.run(
        [*args, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-4000:]
