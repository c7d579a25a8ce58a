import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import parametrize, schedules
from jaxdiff._checks import JaxdiffError

NAMES = ["vp_linear", "vp_cosine", "vp_discrete", "ve", "edm", "flow"]


@pytest.mark.parametrize("name", NAMES)
def test_round_trips_are_exact(x64, name):
    s = getattr(schedules, name)()
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x0 = jax.random.normal(k1, (5, 3))
    eps = jax.random.normal(k2, (5, 3))
    t = jnp.linspace(float(s.t_end), float(s.t_start), 5)
    x = s.marginal(x0, eps, t)
    for p in parametrize.PARAMETRIZATIONS:
        pred = parametrize.from_x0_eps(x0, eps, p, x, t, s)
        x0b, epsb = parametrize.to_x0_eps(pred, p, x, t, s)
        np.testing.assert_allclose(x0b, x0, rtol=1e-7, atol=1e-9 * float(s.prior_std()), err_msg=p)
        np.testing.assert_allclose(epsb, eps, rtol=1e-7, atol=1e-9, err_msg=p)
        for q in parametrize.PARAMETRIZATIONS:
            direct = parametrize.from_x0_eps(x0, eps, q, x, t, s)
            conv = parametrize.convert(pred, p, q, x, t, s)
            np.testing.assert_allclose(conv, direct, rtol=1e-6, atol=1e-8, err_msg=f"{p}->{q}")


def test_definitions(x64):
    s = schedules.flow()
    x0 = jnp.array([[1.0, -2.0]])
    eps = jnp.array([[0.5, 0.25]])
    t = jnp.array([0.3])
    x = s.marginal(x0, eps, t)
    # rectified-flow velocity is eps - x0
    np.testing.assert_allclose(parametrize.from_x0_eps(x0, eps, "velocity", x, t, s), eps - x0)
    vp = schedules.vp_linear()
    a, sg = vp.alpha_sigma(t)
    np.testing.assert_allclose(
        parametrize.from_x0_eps(x0, eps, "v", x, t, vp), a * eps - sg * x0, rtol=1e-12
    )
    np.testing.assert_allclose(
        parametrize.from_x0_eps(x0, eps, "score", x, t, vp), -eps / sg, rtol=1e-12
    )


def test_unknown_parametrization():
    s = schedules.vp_linear()
    x = jnp.zeros((1, 2))
    with pytest.raises(JaxdiffError, match="parametrization='noise'"):
        parametrize.to_x0_eps(x, "noise", x, 0.5, s)
    with pytest.raises(JaxdiffError, match="to="):
        parametrize.convert(x, "eps", "epsilon", x, 0.5, s)
