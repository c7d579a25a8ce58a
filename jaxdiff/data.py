"""Toy 2-D data sets generated on the fly (no downloads): two moons, checkerboard, swiss roll.

Every generator is a pure function ``f(key, n, ...) -> (n, 2)`` array, so it can serve directly as
the ``data(key, n)`` sampler of :func:`jaxdiff.train.train`. (The 2-D Gaussian mixture with exact
scores lives in :mod:`jaxdiff.analytic`.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff._checks import check_positive_int, fail

__all__ = ["two_moons", "checkerboard", "swiss_roll_2d", "standardize", "make_sampler", "SAMPLERS"]


def two_moons(key, n: int, noise=0.05, return_labels: bool = False):
    """Two interleaving half circles (the scikit-learn ``make_moons`` shape).

    Upper moon ``(cos s, sin s)``, lower moon ``(1 - cos s, 1/2 - sin s)``, ``s ~ U[0, pi]``,
    each example on either moon with probability 1/2, plus ``N(0, noise^2 I)``.

    Args:
      key: PRNG key.
      n: number of points.
      noise: standard deviation of the added Gaussian noise.
      return_labels: also return the moon index (int32, shape ``(n,)``), e.g. as a class label.
    Returns:
      points of shape ``(n, 2)`` (and labels of shape ``(n,)``).
    """
    n = check_positive_int("n", n)
    k_s, k_lab, k_noise = jax.random.split(key, 3)
    s = jax.random.uniform(k_s, (n,), minval=0.0, maxval=math.pi)
    lab = jax.random.bernoulli(k_lab, 0.5, (n,))
    upper = jnp.stack([jnp.cos(s), jnp.sin(s)], -1)
    lower = jnp.stack([1.0 - jnp.cos(s), 0.5 - jnp.sin(s)], -1)
    x = jnp.where(lab[:, None], lower, upper) + noise * jax.random.normal(k_noise, (n, 2))
    return (x, lab.astype(jnp.int32)) if return_labels else x


def checkerboard(key, n: int, squares: int = 4, size=4.0):
    """Uniform points on the dark squares of a ``squares x squares`` board (``squares`` even).

    The board covers ``[-size/2, size/2]^2``; a point lies in cell ``(i, j)`` with ``i + j`` even.
    (The toy density of FFJORD, Grathwohl et al. arXiv 1810.01367, for ``squares=4``.)

    Returns:
      points of shape ``(n, 2)``.
    """
    n = check_positive_int("n", n)
    squares = check_positive_int("squares", squares, minimum=2)
    if squares % 2:
        fail("squares", squares, "an even number of squares per side")
    k_row, k_col, k_pos = jax.random.split(key, 3)
    i = jax.random.randint(k_row, (n,), 0, squares)
    # each row holds squares/2 dark cells, at columns j = 2m + (i mod 2).
    j = 2 * jax.random.randint(k_col, (n,), 0, squares // 2) + i % 2
    cell = jnp.stack([i, j], -1).astype(jnp.result_type(float))
    u = jax.random.uniform(k_pos, (n, 2))
    return (cell + u) * (size / squares) - size / 2


def swiss_roll_2d(key, n: int, noise=0.25, scale=0.2):
    """The 2-D swiss roll: ``s ~ U[1.5 pi, 4.5 pi]``, ``x = scale ((s cos s, s sin s) + noise z)``.

    (The scikit-learn ``make_swiss_roll`` spiral projected to its (x, z) plane, scaled by
    ``scale = 1/5`` as in FFJORD, Grathwohl et al. arXiv 1810.01367.)

    Returns:
      points of shape ``(n, 2)``.
    """
    n = check_positive_int("n", n)
    k_s, k_noise = jax.random.split(key)
    s = 1.5 * math.pi * (1.0 + 2.0 * jax.random.uniform(k_s, (n,)))
    x = jnp.stack([s * jnp.cos(s), s * jnp.sin(s)], -1)
    return scale * (x + noise * jax.random.normal(k_noise, (n, 2)))


def standardize(x, axis=0, eps=1e-8, return_stats: bool = False):
    """``(x - mean) / std`` per feature along ``axis`` (``std`` floored at ``eps``).

    Returns:
      the standardized array (shape of ``x``), or ``(x_std, mean, std)`` with
      ``return_stats=True`` (undo with ``x_std * std + mean``).
    """
    x = jnp.asarray(x)
    mean = jnp.mean(x, axis=axis, keepdims=True)
    std = jnp.maximum(jnp.std(x, axis=axis, keepdims=True), eps)
    z = (x - mean) / std
    return (z, mean, std) if return_stats else z


SAMPLERS = {
    "two_moons": two_moons,
    "moons": two_moons,
    "checkerboard": checkerboard,
    "swiss_roll": swiss_roll_2d,
    "swiss_roll_2d": swiss_roll_2d,
}


def make_sampler(name: str, **kwargs) -> Callable:
    """``sample_fn(key, n) -> (n, 2)`` for the toy data set ``name`` (a key of :data:`SAMPLERS`),
    with ``kwargs`` (e.g. ``noise=0.1``) bound."""
    if name not in SAMPLERS:
        fail("name", name, f"one of {tuple(SAMPLERS)}")
    return functools.partial(SAMPLERS[name], **kwargs)
