"""Parity with diffusers' schedulers on identical inputs (runs when the bench extra is installed).

Same exact noise prediction, the DDPM discrete schedule, and the same timesteps: diffusers'
integer timestep n is our continuous time (n + 1)/1000 (DPM-Solver's wrapper), its final
``sigma_min`` step ends at index 0 = our t_end = 1/1000. Conventional coefficients on our side
(``third_order_coef=1`` for 3M), no lower-order final steps on either side (N >= 15).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import analytic, samplers, schedules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

N = 20
COMMON = dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)


def _problem():
    sch = schedules.vp_discrete()
    dist = analytic.gaussian_mixture(
        jnp.array([0.3, 0.7]), jnp.array([[-1.0, 0.5], [0.8, 0.0]]), jnp.array([0.05, 0.1])
    )
    model, params = analytic.as_denoiser(dist, sch)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (16, 2))
    return sch, model, params, x_T


def _run_diffusers(sched, model, params, x_T):
    x = torch.from_numpy(np.asarray(x_T, np.float64))
    for t in sched.timesteps:
        tt = jnp.full((x.shape[0],), (float(t) + 1.0) / 1000.0)
        eps = np.asarray(model(params, jnp.asarray(x.numpy()), tt), np.float64)
        x = sched.step(torch.from_numpy(eps), t, x).prev_sample
    return x.numpy()


def _grid(sched):
    ts = (np.asarray(sched.timesteps, np.float64) + 1.0) / 1000.0
    return jnp.asarray(np.concatenate([ts, [1.0 / 1000.0]]))


CASES = {
    "DDIM": (
        lambda: diffusers.DDIMScheduler(
            **COMMON, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing"
        ),
        lambda: samplers.ddim(),
    ),
    "DPM-Solver++ 2M": (
        lambda: diffusers.DPMSolverMultistepScheduler(
            **COMMON, solver_order=2, final_sigmas_type="sigma_min", lower_order_final=False
        ),
        lambda: samplers.dpm_solver_pp(2),
    ),
    "DPM-Solver++ 3M": (
        lambda: diffusers.DPMSolverMultistepScheduler(
            **COMMON, solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False
        ),
        lambda: samplers.dpm_solver_pp(3, third_order_coef=1.0),
    ),
    "UniPC bh2 2": (
        lambda: diffusers.UniPCMultistepScheduler(
            **COMMON, solver_order=2, final_sigmas_type="sigma_min", lower_order_final=False
        ),
        lambda: samplers.unipc(2),
    ),
    "DEIS 3": (
        lambda: diffusers.DEISMultistepScheduler(**COMMON, solver_order=3, lower_order_final=False),
        lambda: samplers.deis(3),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers(x64, name):
    make_sched, make_ours = CASES[name]
    sch, model, params, x_T = _problem()
    sched = make_sched()
    sched.set_timesteps(N)
    theirs = _run_diffusers(sched, model, params, x_T)
    if name == "DDIM":  # trailing spacing ends at index 99 -> final alpha_bar_0
        ts = jnp.asarray(
            np.concatenate([(np.asarray(sched.timesteps, np.float64) + 1) / 1000, [1e-3]])
        )
    else:
        ts = _grid(sched)
    ours = jaxdiff.sample(jax.random.PRNGKey(0), model, params, sch, x_T, make_ours(), ts=ts)
    rel = np.linalg.norm(np.asarray(ours) - theirs) / np.linalg.norm(theirs)
    print(f"{name}: relative difference {rel:.2e}")
    assert rel < 1e-4, rel
