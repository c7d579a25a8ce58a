"""Data sets without downloads: toy 2-D sets generated on the fly (two moons, checkerboard, swiss
roll) and scikit-learn's bundled 8x8 handwritten digits (:func:`load_digits`).

Every toy generator is a pure function ``f(key, n, ...) -> (n, 2)`` array, so it can serve directly as
the ``data(key, n)`` sampler of :func:`jaxdiff.train.train`. (The 2-D Gaussian mixture with exact
scores lives in :mod:`jaxdiff.analytic`.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff._checks import check_positive_int, fail

__all__ = [
    "two_moons",
    "checkerboard",
    "swiss_roll_2d",
    "standardize",
    "make_sampler",
    "SAMPLERS",
    "load_digits",
    "digits_split_indices",
    "to_pixels",
    "image_grid",
    "save_image_grid",
    "DIGITS_MAX",
]


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


# ---------------------------------------------------------------------------------------------
# scikit-learn's 8x8 handwritten digits (bundled with scikit-learn: no download)
# ---------------------------------------------------------------------------------------------
_DIGITS_SPLITS = ("train", "test", "all")
#: Largest pixel value of the scikit-learn digits (16 gray levels plus 0).
DIGITS_MAX = 16.0


@functools.lru_cache(maxsize=1)
def _raw_digits():
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, np.float64)  # (1797, 8, 8), integers 0..16
    labels = np.asarray(bunch.target, np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digits_split_indices(labels, test_fraction=0.2, seed: int = 0):
    """Deterministic stratified train/test split: ``(train_idx, test_idx)``, both sorted.

    For each class ``c`` in increasing order, the indices of class ``c`` are permuted with one
    ``numpy.random.RandomState(seed)`` (shared across classes, consumed in class order) and the
    first ``max(1, round(test_fraction * n_c))`` go to the test split, the rest to train, so each
    class keeps its proportion and the two splits partition ``range(N)`` (disjoint, covering).

    Args:
      labels: integer class labels, shape ``(N,)``.
      test_fraction: fraction of each class held out, in ``(0, 1)``.
      seed: seed of the permutation.
    Returns:
      ``(train_idx, test_idx)``: int64 index arrays.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        fail("labels", labels, "integer class labels of shape (N,)")
    _check_fraction(test_fraction)
    rng = np.random.RandomState(int(seed))
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        perm = rng.permutation(idx)
        n_test = max(1, int(round(float(test_fraction) * idx.size)))
        if n_test >= idx.size:
            fail(
                "test_fraction",
                test_fraction,
                f"a fraction leaving at least one training example of class {int(c)} "
                f"({idx.size} examples)",
            )
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _check_fraction(test_fraction):
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, int | float | np.number):
        fail("test_fraction", test_fraction, "a number in (0, 1)")
    if not (np.isfinite(test_fraction) and 0.0 < float(test_fraction) < 1.0):
        fail("test_fraction", test_fraction, "a number in (0, 1)")


def load_digits(split: str = "train", test_fraction=0.2, seed: int = 0, dtype=np.float32):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes) as diffusion-ready images.

    Pixels ``p in {0, ..., 16}`` are mapped to ``x = p / 8 - 1 in [-1, 1]`` (invert with
    :func:`to_pixels`). The data ship with scikit-learn (``sklearn.datasets.load_digits``; the
    UCI "Optical Recognition of Handwritten Digits" test set), so nothing is downloaded.

    The train/test split is :func:`digits_split_indices` (stratified by class, deterministic
    given ``seed``; with the defaults 1438 train and 359 test images). Rows keep the original
    order of the data set.

    Args:
      split: ``"train"``, ``"test"`` or ``"all"`` (all 1797 images; ``test_fraction`` and
        ``seed`` are still validated but unused).
      test_fraction: fraction of every class held out for ``"test"``, in ``(0, 1)``.
      seed: seed of the split.
      dtype: floating dtype of the images (a numpy dtype; default float32).
    Returns:
      ``(x, labels)``: numpy arrays ``x (N, 8, 8, 1)`` of ``dtype`` in ``[-1, 1]`` (NHWC) and
      ``labels (N,)`` int32 in ``0..9``.
    Raises:
      JaxdiffError: unknown ``split``, ``test_fraction`` outside ``(0, 1)``, a non-float
      ``dtype``.
    """
    if split not in _DIGITS_SPLITS:
        fail("split", split, f"one of {_DIGITS_SPLITS}")
    _check_fraction(test_fraction)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not np.issubdtype(dt, np.floating):
        fail("dtype", dtype, "a floating dtype such as numpy.float32")
    images, labels = _raw_digits()
    if split == "all":
        idx = np.arange(labels.shape[0])
    else:
        train_idx, test_idx = digits_split_indices(labels, test_fraction, seed)
        idx = train_idx if split == "train" else test_idx
    x = (images[idx] / (DIGITS_MAX / 2.0) - 1.0).astype(dt)[..., None]
    return x, labels[idx].copy()


def to_pixels(x, max_value=DIGITS_MAX):
    """Inverse of the :func:`load_digits` scaling: ``p = (x + 1) / 2 * max_value``, clipped to
    ``[0, max_value]``.

    ``max_value=16`` (default) gives the original 0..16 gray levels (not rounded);
    ``max_value=1`` gives ``[0, 1]`` for plotting. Returns a numpy float array shaped like ``x``.
    """
    if isinstance(max_value, bool) or not isinstance(max_value, int | float | np.number):
        fail("max_value", max_value, "a positive number")
    if not (np.isfinite(max_value) and max_value > 0):
        fail("max_value", max_value, "a positive number")
    x = np.asarray(x, dtype=np.float64)
    return np.clip((x + 1.0) * (0.5 * max_value), 0.0, max_value)


def image_grid(x, nrow: int, pad: int = 1, pad_value=1.0):
    """Tile images into one 2-D grayscale array in ``[0, 1]`` (for ``imshow``/PNG).

    Args:
      x: images in ``[-1, 1]`` of shape ``(N, H, W)`` or ``(N, H, W, 1)`` (values outside are
        clipped).
      nrow: images per grid row (torchvision's ``make_grid`` convention); the grid has
        ``ceil(N / nrow)`` rows, filled row by row, so images ordered class by class with
        ``nrow`` samples per class give one class per row.
      pad: pixels of ``pad_value`` between and around images.
      pad_value: value of the padding in ``[0, 1]`` (default white).
    Returns:
      numpy array of shape ``(rows * (H + pad) + pad, nrow * (W + pad) + pad)``; empty cells
      of the last row are ``pad_value``.
    """
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.shape[0] < 1:
        fail("x", x, "images of shape (N, H, W) or (N, H, W, 1) with N >= 1")
    nrow = check_positive_int("nrow", nrow)
    pad = check_positive_int("pad", pad, minimum=0)
    n, h, w = x.shape
    rows = -(-n // nrow)
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), float(pad_value), np.float64)
    pix = to_pixels(x, 1.0)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        out[top : top + h, left : left + w] = pix[i]
    return out


def save_image_grid(path, x, nrow: int, title: str | None = None, row_labels=None, scale=0.35):
    """Write :func:`image_grid` ``(x, nrow)`` as a PNG with matplotlib (white = 0 ink, black = 16).

    Args:
      path: output file (``.png``).
      x: images in ``[-1, 1]``, shape ``(N, H, W)`` or ``(N, H, W, 1)``.
      nrow: images per grid row.
      title: optional figure title.
      row_labels: optional labels drawn left of each grid row (e.g. the class of the row).
      scale: inches per image.
    Returns:
      ``path``.
    """
    from matplotlib.figure import Figure

    grid = image_grid(x, nrow, pad_value=0.0)
    n_rows = -(-np.shape(x)[0] // nrow)
    fig = Figure(figsize=(max(2.0, scale * nrow + 0.6), scale * n_rows + (0.5 if title else 0.2)))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    if row_labels is not None:
        h = np.shape(x)[1]
        ax.set_yticks([1 + r * (h + 1) + h / 2 - 0.5 for r in range(len(row_labels))])
        ax.set_yticklabels([str(v) for v in row_labels])
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
