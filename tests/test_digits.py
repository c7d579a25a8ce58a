"""Digits data, the digits classifier, the Fréchet distance and the sample evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jaxdiff import digits
from jaxdiff._checks import JaxdiffError
from jaxdiff.data import (
    digits_split_indices,
    image_grid,
    load_digits,
    save_image_grid,
    to_pixels,
)
from jaxdiff.metrics import frechet_distance, gaussian_w2


# ---------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------
def test_load_digits_shapes_ranges_and_inverse():
    from sklearn.datasets import load_digits as sk_load

    sk = sk_load()
    x, y = load_digits("all")
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int32
    assert x.min() == -1.0 and x.max() == 1.0
    # the 17 gray levels map exactly onto p / 8 - 1, and to_pixels inverts it
    np.testing.assert_array_equal(to_pixels(x)[..., 0], sk.images)
    np.testing.assert_array_equal(y, sk.target)
    np.testing.assert_allclose(to_pixels(x, 1.0)[..., 0], sk.images / 16.0, atol=1e-7)
    x64, _ = load_digits("test", dtype=np.float64)
    assert x64.dtype == np.float64
    for bad in (0.0, -1.0, "16", float("inf")):
        with pytest.raises(JaxdiffError, match="max_value"):
            to_pixels(x[:2], bad)


def test_split_disjoint_stratified_deterministic():
    x_all, y_all = load_digits("all")
    x_tr, y_tr = load_digits("train")
    x_te, y_te = load_digits("test")
    tr, te = digits_split_indices(y_all, 0.2, 0)
    assert len(np.intersect1d(tr, te)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.arange(1797))
    np.testing.assert_array_equal(x_tr, x_all[tr])
    np.testing.assert_array_equal(x_te, x_all[te])
    np.testing.assert_array_equal(y_te, y_all[te])
    assert (len(y_tr), len(y_te)) == (1438, 359)
    # stratified: every class holds out round(0.2 n_c) examples
    counts = np.bincount(y_all)
    np.testing.assert_array_equal(np.bincount(y_te), np.round(0.2 * counts).astype(int))
    # no image row of the test split is a row of the train split (by index: disjoint)
    np.testing.assert_array_equal(load_digits("test")[0], x_te)  # deterministic
    other = load_digits("test", seed=1)[1]
    tr1, te1 = digits_split_indices(y_all, 0.2, 1)
    assert not np.array_equal(te1, te) and np.array_equal(np.bincount(other), np.bincount(y_te))
    _, te_half = digits_split_indices(y_all, 0.5, 0)
    np.testing.assert_array_equal(np.bincount(y_all[te_half]), np.round(0.5 * counts))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(split="valid"), "split='valid'"),
        (dict(test_fraction=0.0), "test_fraction=0.0"),
        (dict(test_fraction=1.0), "test_fraction=1.0"),
        (dict(test_fraction=-0.1), "test_fraction"),
        (dict(test_fraction="0.2"), "test_fraction"),
        (dict(test_fraction=True), "test_fraction"),
        (dict(test_fraction=0.999), "at least one training example"),
        (dict(dtype=np.int32), "dtype"),
    ],
)
def test_load_digits_bad_input(kwargs, match):
    with pytest.raises(JaxdiffError, match=match):
        load_digits(**kwargs)


def test_image_grid_layout(tmp_path):
    x = np.linspace(-1, 1, 5 * 4 * 3).reshape(5, 4, 3, 1)
    g = image_grid(x, nrow=2, pad=1, pad_value=0.25)
    assert g.shape == (3 * 5 + 1, 2 * 4 + 1)
    # image i sits at row i // 2, column i % 2, in [0, 1]
    for i in range(5):
        r, c = divmod(i, 2)
        np.testing.assert_allclose(g[1 + 5 * r : 5 + 5 * r, 1 + 4 * c : 4 + 4 * c],
                                   (x[i, ..., 0] + 1) / 2)  # fmt: skip
    assert np.all(g[-5:-1, 5:8] == 0.25)  # the empty last cell
    path = save_image_grid(tmp_path / "g.png", x, 2, title="t", row_labels=[0, 1, 2])
    assert path.stat().st_size > 500
    with pytest.raises(JaxdiffError, match="nrow"):
        image_grid(x, 0)
    with pytest.raises(JaxdiffError, match="x="):
        image_grid(np.zeros((2, 4, 4, 3)), 2)


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------
def _gauss(rng, n, mean, cov):
    return mean + rng.standard_normal((n, len(mean))) @ np.linalg.cholesky(cov).T


def test_frechet_distance_closed_form(x64):
    rng = np.random.default_rng(0)
    d = 4
    la, lb = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    ca, cb = la @ la.T + 0.5 * np.eye(d), lb @ lb.T + 0.2 * np.eye(d)
    ma, mb = rng.normal(size=d), rng.normal(size=d)
    a, b = _gauss(rng, 40_000, ma, ca), _gauss(rng, 30_000, mb, cb)
    fd = float(frechet_distance(a, b))
    # exact identity: FD is W2^2 between the fitted Gaussians; independent computation with
    # numpy moments and scipy's sqrtm of C_a C_b
    ea, eb = np.cov(a.T), np.cov(b.T)
    cross = scipy.linalg.sqrtm(ea @ eb).real
    fitted = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ea + eb - 2 * cross)
    np.testing.assert_allclose(fd, fitted, rtol=1e-9)
    np.testing.assert_allclose(
        fd, float(gaussian_w2(a.mean(0), ea, b.mean(0), eb, squared=True)), rtol=1e-8
    )
    # population closed form W2^2 of the true Gaussians, within the sampling error (~1 %)
    truth = float(gaussian_w2(ma, ca, mb, cb, squared=True))
    assert abs(fd - truth) < 0.03 * truth, (fd, truth)
    # identical sets: 0; the same law: small against the distance between the two laws
    assert float(frechet_distance(a, a)) < 1e-9 * np.trace(ca)
    assert float(frechet_distance(a[:20_000], a[20_000:])) < 0.01 * truth


def test_frechet_distance_float32_rank_deficient():
    # 64-d features of rank 12 (like dead/ correlated units): float32 matches float64
    rng = np.random.default_rng(1)
    basis = rng.normal(size=(64, 12))
    a = rng.normal(size=(600, 12)) @ basis.T + 0.5
    b = 1.3 * rng.normal(size=(500, 12)) @ basis.T
    with jax.enable_x64(True):
        ref = float(frechet_distance(a, b))
        ea, eb = np.cov(a.T), np.cov(b.T)
        # closed form on the fitted moments via the rank-12 eigenbasis (well conditioned)
        cross = scipy.linalg.sqrtm(ea @ eb).real
        np.testing.assert_allclose(
            ref, np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ea + eb - 2 * cross), rtol=1e-6
        )
    f32 = float(frechet_distance(a.astype(np.float32), b.astype(np.float32)))
    np.testing.assert_allclose(f32, ref, rtol=1e-4)
    same = float(frechet_distance(a.astype(np.float32), a.astype(np.float32)))
    assert same < 1e-6 * np.trace(ea)
    # composes with jit
    jit_fd = jax.jit(frechet_distance)(a.astype(np.float32), b.astype(np.float32))
    np.testing.assert_allclose(float(jit_fd), ref, rtol=1e-4)


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros(10), np.zeros((10, 1)), "feats_a"),
        (np.zeros((10, 2, 2)), np.zeros((10, 4)), "feats_a"),
        (np.zeros((10, 3)), np.zeros((10, 4)), "dimension 3"),
        (np.zeros((1, 3)), np.zeros((10, 3)), "n >= 2"),
        (np.zeros((10, 3)), np.zeros((1, 3)), "feats_b"),
    ],
)
def test_frechet_distance_bad_input(a, b, match):
    with pytest.raises(JaxdiffError, match=match):
        frechet_distance(a, b)


# ---------------------------------------------------------------------------------------------
# classifier and evaluation
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clf():
    x, y = load_digits("train")
    return digits.train_classifier(jax.random.PRNGKey(0), x, y)


def test_classifier_accuracy(clf):
    x, y = load_digits("test")
    acc = float(digits.accuracy(clf, x, y))
    assert acc >= 0.97, acc  # measured 0.992 (seeds 0-2: 0.989-0.992)
    pred = np.asarray(digits.classify(clf, x))
    assert pred.dtype == np.int32 and np.isclose(np.mean(pred == y), acc)
    assert digits.logits(clf, x).shape == (359, 10)
    f8 = digits.features(clf, x[:8])
    assert f8.shape == (8, 64)
    # per-example: a batch of one gives the same row as a batch of eight
    np.testing.assert_allclose(digits.features(clf, x[3:4])[0], f8[3], rtol=1e-5, atol=1e-6)


def test_train_classifier_deterministic_and_checks():
    x, y = load_digits("train")
    k = jax.random.PRNGKey(3)
    p1 = digits.train_classifier(k, x, y, steps=3)
    p2 = digits.train_classifier(k, x, y, steps=3)
    p3 = digits.train_classifier(jax.random.PRNGKey(4), x, y, steps=3)
    for u, v in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(jax.tree.leaves(p1)[0], jax.tree.leaves(p3)[0])
    with pytest.raises(JaxdiffError, match="steps"):
        digits.train_classifier(k, x, y, steps=0)
    with pytest.raises(JaxdiffError, match="x="):
        digits.train_classifier(k, x[..., 0], y)
    with pytest.raises(JaxdiffError, match="y="):
        digits.train_classifier(k, x, y[:-1])
    with pytest.raises(JaxdiffError, match=r"labels in \[0, 9\]"):
        digits.train_classifier(k, x, y + 1)


def test_shift_augment_oracle():
    x = jnp.arange(2 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 1)
    out = np.asarray(digits.shift_augment(jax.random.PRNGKey(0), x, 1))
    for i in range(2):
        # out equals x shifted by some (di, dj) in {-1, 0, 1}^2 with -1 filled in
        padded = np.pad(np.asarray(x[i]), ((1, 1), (1, 1), (0, 0)), constant_values=-1.0)
        hits = [
            (a, b)
            for a in range(3)
            for b in range(3)
            if np.array_equal(padded[a : a + 4, b : b + 4], out[i])
        ]
        assert len(hits) == 1
    # per-example keys: row 0 does not depend on the batch
    np.testing.assert_array_equal(digits.shift_augment(jax.random.PRNGKey(0), x[:1], 1)[0], out[0])


def test_evaluate_samples(clf):
    x_tr, y_tr = load_digits("train")
    x_te, y_te = load_digits("test")
    real_acc = float(digits.accuracy(clf, x_te, y_te))
    # the held-out digits themselves as "samples": accuracy = classifier accuracy, FD = 0
    ev = digits.evaluate_samples(clf, x_te, y_te, (x_te, y_te), real_ref=(x_tr, y_tr))
    assert ev["accuracy"] == pytest.approx(real_acc) and ev["real_accuracy"] == pytest.approx(
        real_acc
    )
    assert ev["fd"] < 1e-3 * ev["fd_real"], ev
    assert ev["n_samples"] == ev["n_real"] == 359
    # samples drawn exactly like the reference (first per-class training digits): fd == fd_real
    ref = digits.reference_indices(y_te, y_tr)
    np.testing.assert_array_equal(np.bincount(y_tr[ref]), np.bincount(y_te))
    ev_ref = digits.evaluate_samples(clf, x_tr[ref], y_tr[ref], x_te, real_ref=(x_tr, y_tr))
    assert ev_ref["fd"] == pytest.approx(ev_ref["fd_real"], rel=1e-6)
    assert "real_accuracy" not in ev_ref
    # other real training digits (the last ones per class): FD comparable to the reference
    # (as many per class as the test split, so every FD here has one shape: one compilation)
    counts = np.bincount(y_te)
    last = np.concatenate([np.flatnonzero(y_tr == c)[-counts[c] :] for c in range(10)])
    ev_other = digits.evaluate_samples(clf, x_tr[last], y_tr[last], x_te, real_ref=(x_tr, y_tr))
    assert 0.5 < ev_other["fd"] / ev_other["fd_real"] < 2.0, ev_other
    assert ev_other["accuracy"] == pytest.approx(
        float(digits.accuracy(clf, x_tr[last], y_tr[last]))
    )
    # corrupted digits: much farther than real digits, and wrong labels lower the accuracy
    noisy = np.clip(
        x_tr[last] + 0.8 * np.random.default_rng(0).standard_normal(x_tr[last].shape), -1, 1
    )
    ev_noisy = digits.evaluate_samples(clf, noisy, y_tr[last], x_te, real_ref=(x_tr, y_tr))
    assert ev_noisy["fd"] > 3 * ev_noisy["fd_real"], ev_noisy
    ev_wrong = digits.evaluate_samples(
        clf, x_tr[last], (y_tr[last] + 1) % 10, x_te, real_ref=(x_tr, y_tr)
    )
    assert ev_wrong["accuracy"] < 0.05


def test_evaluate_samples_bad_input(clf):
    x_te, y_te = load_digits("test")
    with pytest.raises(JaxdiffError, match="samples="):
        digits.evaluate_samples(clf, x_te[:, :4], y_te, x_te)
    with pytest.raises(JaxdiffError, match="labels="):
        digits.evaluate_samples(clf, x_te, y_te[:10], x_te)
    with pytest.raises(JaxdiffError, match=r"labels in \[0, 9\]"):
        digits.evaluate_samples(clf, x_te, y_te + 1, x_te)
    with pytest.raises(JaxdiffError, match="at least 2 samples"):
        digits.evaluate_samples(clf, x_te[:1], y_te[:1], x_te)
    with pytest.raises(JaxdiffError, match="real_ref"):
        digits.evaluate_samples(clf, x_te, y_te, x_te, real_ref=(x_te[:50], y_te[:50]))


# ---------------------------------------------------------------------------------------------
# slow: the full diffusion pipeline
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_classifier_accuracy_seeds():
    x, y = load_digits("train")
    xt, yt = load_digits("test")
    for seed in (1, 2):
        p = digits.train_classifier(jax.random.PRNGKey(seed), x, y)
        assert float(digits.accuracy(p, xt, yt)) >= 0.97


@pytest.mark.slow
def test_digits_cfg_pipeline(clf):
    import optax

    from jaxdiff import sample, samplers, schedules
    from jaxdiff.guidance.cfg import cfg
    from jaxdiff.models import UNet, as_denoiser
    from jaxdiff.train import train

    x_tr, y_tr = load_digits("train")
    x_te, y_te = load_digits("test")
    net = UNet(
        channels=32,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_levels=(),
        num_heads=1,
        groups=8,
        num_classes=10,
    )
    key = jax.random.PRNGKey(0)
    model, params = as_denoiser(net, key, x_tr[:1], cond_example=y_tr[:1], parametrization="eps")
    sch = schedules.vp_cosine()
    steps = 3000
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 100, steps, 1.5e-4))
    # train() runs this conv net one compiled step per call on the CPU (loop="auto")
    state, _ = train(
        jax.random.fold_in(key, 1), model, params, sch, (x_tr, y_tr), opt, steps,
        batch_size=64, ema_decay=0.995, cond_drop_prob=0.1, null_cond=net.null_cond,
        progress=False,
    )  # fmt: skip
    labels = np.repeat(np.arange(10, dtype=np.int32), 20)
    # benchmarks/digits.py uses the same settings (36 per class)
    guided = cfg(model, scale=3.0, null_cond=net.null_cond)
    xs = sample(
        jax.random.fold_in(key, 2),
        guided,
        state.ema_params,
        sch,
        (200, 8, 8, 1),
        samplers.dpm_solver_pp(order=2),
        steps=25,
        cond=jnp.asarray(labels),
    )
    ev = digits.evaluate_samples(clf, np.asarray(xs), labels, (x_te, y_te))
    assert ev["accuracy"] >= 0.9, ev
    assert ev["fd"] < 3 * ev["fd_real"], ev
