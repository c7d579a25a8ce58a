"""Classifier guidance: the gradient of a noise-conditional classifier added to the score.

Dhariwal & Nichol (arXiv 2105.05233, eq. 14 and algorithm 2) sample from ``p_t(x | y)`` with an
unconditional model and a classifier ``p(y | x_t, t)`` trained on noised inputs, using

    grad log p_t(x | y) = grad log p_t(x) + grad log p_t(y | x)      (Bayes' rule),

scaled by a guidance strength ``w``: the score-space term is ``G = w(t) grad_x log p(y | x_t, t)``
and, through :func:`jaxdiff.guidance.guide`, the noise prediction becomes
``eps~ = eps_hat - sigma(t) G``. With the exact class posterior of a Gaussian mixture
(:meth:`jaxdiff.analytic.GaussianMixture.class_log_prob_t`) and ``w = 1`` the guided
unconditional model *is* the exact class-conditional model (guidance.md 0.2(b), 6.1).

This module also provides a small Flax noise-conditional classifier (:class:`NoisyClassifier`),
an optax training loop on noised data (:func:`train_classifier`) and the adapter
(:func:`noisy_classifier_log_prob`, :func:`classifier_from_flax`) turning it into a term.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxdiff._checks import as_float_array, check_positive_int, fail, is_concrete
from jaxdiff.guidance.base import GuidanceContext, GuidanceTerm, check_scale, scale_at
from jaxdiff.models import fourier_embedding, sinusoidal_embedding
from jaxdiff.schedules import Schedule

__all__ = [
    "ClassifierGuidance",
    "classifier",
    "classifier_from_flax",
    "log_prob_and_grad",
    "NoisyClassifier",
    "noisy_classifier_log_prob",
    "train_classifier",
]


def _bcast(v, x):
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - 1))


# ------------------------------------------------------------------------------------------
# how the log-prob function is called: always fn(params, x, t, y) internally
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _NoParams:
    """``(params, x, t, y) -> fn(x, t, y)`` for a plain function (hashable by ``fn``)."""

    fn: Callable

    def __call__(self, params, x, t, y):
        return self.fn(x, t, y)


def _call_pytree(params, x, t, y):
    """A pytree-valued callable (e.g. a ``flax.struct.PyTreeNode`` with ``__call__``) travels as
    ``params`` (its leaves are traced), and is called as ``params(x, t, y)``."""
    return params(x, t, y)


def _is_plain_callable(fn) -> bool:
    """True for a function jax sees as one opaque leaf; False for a pytree callable."""
    leaves = jax.tree_util.tree_leaves(fn)
    return len(leaves) == 1 and leaves[0] is fn


def _fn_name(fn) -> str:
    inner = getattr(fn, "fn", getattr(fn, "module", fn))
    return getattr(inner, "__name__", type(inner).__name__)


_NOT_DIFFERENTIABLE = (
    "a differentiable log p(y | x_t, t): classifier guidance adds w * grad_x log p(y | x_t, t) "
    "to the score, so log_prob_fn must be written in jax.numpy (no numpy, float() or Python "
    "control flow on x) and return floating-point log-probabilities"
)


def log_prob_and_grad(log_prob_fn: Callable, params, x, t, y):
    """``(log p(y | x, t) (B,), grad_x log p(y | x, t) (B, *event))`` of a per-example classifier.

    ``log_prob_fn(params, x, t, y) -> (B,)``. The gradient is that of ``sum_i log p(y_i | x_i)``:
    since example ``i``'s log-prob depends on ``x_i`` only (the Jacobian is block-diagonal over
    the batch), row ``i`` of the gradient is ``grad_{x_i} log p(y_i | x_i, t_i)``, identical for
    any batch size (valid for classifiers without batch-coupled layers such as BatchNorm in
    training mode).

    Raises:
      JaxdiffError: the output is not a floating ``(B,)`` array, or it cannot be differentiated
        w.r.t. ``x`` (numpy calls, ``float(x)``, ...).
    """
    b = x.shape[0]

    def total(z):
        lp = log_prob_fn(params, z, t, y)
        shape = jnp.shape(lp)
        if shape != (b,):
            fail(
                "log_prob_fn",
                _fn_name(log_prob_fn),
                f"per-example log-probs of shape ({b},) (one per example), got shape {shape}",
            )
        if not jnp.issubdtype(jnp.result_type(lp), jnp.floating):
            fail(
                "log_prob_fn",
                _fn_name(log_prob_fn),
                f"{_NOT_DIFFERENTIABLE} (got dtype {jnp.result_type(lp)})",
            )
        return jnp.sum(lp), lp

    try:
        grad, lp = jax.grad(total, has_aux=True)(x)
    except jax.errors.JAXTypeError as e:  # numpy on a tracer, float(x), bool(x), ...
        fail(
            "log_prob_fn",
            _fn_name(log_prob_fn),
            f"{_NOT_DIFFERENTIABLE} (jax.grad raised {type(e).__name__})",
        )
    return lp, grad


def _check_y(y, batch: int):
    """Scalar targets are broadcast to ``(batch,)``; arrays need leading axis ``batch``."""
    if y is None or not (hasattr(y, "shape") or isinstance(y, numbers.Number | list | tuple)):
        return y  # None or a structured target: handed to log_prob_fn as it is
    y = jnp.asarray(y)
    if y.ndim == 0:
        return jnp.broadcast_to(y, (batch,))
    if y.shape[0] != batch:
        fail("y", f"shape {tuple(y.shape)}", f"a scalar target or a leading batch axis of {batch}")
    return y


class ClassifierGuidance(GuidanceTerm):
    """Score-space term ``G = w(t) grad_x log p(y | x_t, t)`` (Dhariwal & Nichol arXiv 2105.05233).

    Build it with :func:`classifier` / :func:`classifier_from_flax`. Leaves: ``params`` (the
    classifier's parameters, or a pytree callable), ``scale``, ``y``; static: ``log_prob_fn``
    (called as ``log_prob_fn(params, x, t, y)``) and ``scale_fn``.
    """

    log_prob_fn: Callable = struct.field(pytree_node=False, default=None)
    params: Any = None
    scale: Any = 1.0
    y: Any = None
    scale_fn: Callable | None = struct.field(pytree_node=False, default=None)

    def target(self, ctx: GuidanceContext):
        """The class / target used: ``y`` if set, else the sampling condition ``ctx.cond``."""
        return _check_y(ctx.cond if self.y is None else self.y, ctx.x.shape[0])

    def __call__(self, ctx: GuidanceContext) -> jax.Array:
        """``w(t) grad_x log p(y | x_t, t)``, shape of ``ctx.x``."""
        x, t = ctx.x, ctx.t
        b = x.shape[0]
        _, grad = log_prob_and_grad(self.log_prob_fn, self.params, x, t, self.target(ctx))
        w = scale_at(self.scale, self.scale_fn, t, b)
        return (_bcast(w, grad) * grad).astype(x.dtype)


def classifier(
    log_prob_fn: Callable,
    scale=1.0,
    *,
    scale_fn: Callable | None = None,
    y=None,
    params=None,
) -> ClassifierGuidance:
    """Classifier guidance term ``G = w(t) grad_x log p(y | x_t, t)`` (arXiv 2105.05233, eq. 14).

    Use with :func:`jaxdiff.guidance.guide`: ``guide(model, schedule, classifier(...))`` predicts
    ``eps~ = eps_hat - sigma(t) w(t) grad_x log p(y | x_t, t)``.

    Args:
      log_prob_fn: per-example log-likelihood of the target, ``log_prob_fn(x (B, *event),
        t (B,), y) -> (B,)`` (or ``log_prob_fn(params, x, t, y)`` when ``params`` is given). It
        must be differentiable in ``x`` (jax.numpy). A plain function is a static field (jit
        caches on its identity: build the term once, not a fresh lambda per call); a pytree
        callable (e.g. a ``flax.struct.PyTreeNode`` with ``__call__``) travels as a leaf, so
        changing its numbers never recompiles.
      scale: ``w``, a number or an array ``()`` / ``(B,)`` (a leaf: sweeping it never recompiles).
      scale_fn: optional static ``t (B,) -> (B,)`` multiplier, ``w(t) = scale * scale_fn(t)``.
      y: the target (a leaf): class ids ``(B,)`` or a scalar (broadcast to ``(B,)``), or any
        array with leading axis ``B``; ``None`` uses the sampling condition ``cond`` (None for an
        unconditional model, in which case ``log_prob_fn`` must know its target).
      params: the classifier's parameters (a leaf: swapping them never recompiles).

    Returns:
      A :class:`ClassifierGuidance` term.

    Raises:
      JaxdiffError: here for a non-callable ``log_prob_fn`` or a bad ``scale``; when guiding, for
      log-probs not of shape ``(B,)`` or not differentiable in ``x`` (:func:`log_prob_and_grad`).
    """
    if not callable(log_prob_fn):
        fail("log_prob_fn", log_prob_fn, "a function log_prob_fn(x, t, y) -> (B,) log-probs")
    check_scale(scale)
    if scale_fn is not None and not callable(scale_fn):
        fail("scale_fn", scale_fn, "None or a function t (B,) -> (B,)")
    if params is not None:
        fn = log_prob_fn
    elif not _is_plain_callable(log_prob_fn):
        fn, params = _call_pytree, log_prob_fn  # a pytree callable: its leaves are traced
    else:
        fn = _NoParams(log_prob_fn)
    return ClassifierGuidance(log_prob_fn=fn, params=params, scale=scale, y=y, scale_fn=scale_fn)


# ------------------------------------------------------------------------------------------
# a Flax noise-conditional classifier
# ------------------------------------------------------------------------------------------
def time_conditioned_trunk(module: nn.Module, x, t):
    """The residual time-conditioned MLP trunk shared by :class:`NoisyClassifier` and
    :class:`jaxdiff.optimize.rcgdm.NoisyRewardMLP`; call it from a compact ``__call__``.

    ``e = Dense_h(act(Dense_h(time_features(t))))``, ``z = Dense_h(flatten(x))``, ``depth``
    pre-LayerNorm residual blocks ``z += Dense_h(act(LN(z) + e))``, then ``act(LN(z))``; returns
    features ``(B, hidden)``. Reads ``hidden, depth, time_embedding, embed_dim, fourier_scale,
    time_scale, activation`` from ``module``.
    """
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (b,))
    act = module.activation
    if module.time_embedding == "fourier":
        feats = fourier_embedding(t, module.embed_dim, module.fourier_scale)
    else:
        feats = sinusoidal_embedding(t, module.embed_dim, module.time_scale)
    e = nn.Dense(module.hidden, name="time_out")(
        act(nn.Dense(module.hidden, name="time_in")(feats))
    )
    z = nn.Dense(module.hidden, name="x_in")(x.reshape(b, -1))
    for i in range(module.depth):
        z = z + nn.Dense(module.hidden, name=f"dense_{i}")(
            act(nn.LayerNorm(name=f"norm_{i}")(z) + e)
        )
    return act(nn.LayerNorm(name="norm_out")(z))


class NoisyClassifier(nn.Module):
    """Residual MLP classifier of noised inputs ``(x_t, t) -> logits (B, num_classes)``.

    Architecture (``h = hidden``)::

        e = Dense_h(act(Dense_h(time_features(t))))
        z = Dense_h(flatten(x))
        repeat depth times:  z = z + Dense_h(act(LayerNorm(z) + e))
        logits = Dense_K(act(LayerNorm(z)))

    Time features as in :class:`jaxdiff.models.MLPScoreNet` (:func:`jaxdiff.models.fourier_embedding`
    or :func:`~jaxdiff.models.sinusoidal_embedding`). The noise-conditional classifier of
    classifier guidance (Dhariwal & Nichol arXiv 2105.05233, section 4) in MLP form.
    """

    num_classes: int
    hidden: int = 128
    depth: int = 2
    time_embedding: str = "fourier"
    embed_dim: int = 32
    fourier_scale: float = 4.0
    time_scale: float = 1000.0
    activation: Callable = nn.silu

    @nn.compact
    def __call__(self, x, t):
        """Logits, shape ``(B, num_classes)``; ``x (B, *event)``, ``t`` ``()`` or ``(B,)``."""
        if not isinstance(self.num_classes, int | np.integer) or self.num_classes < 2:
            fail("num_classes", self.num_classes, "an integer >= 2")
        if self.time_embedding not in ("fourier", "sinusoidal"):
            fail("time_embedding", self.time_embedding, "'fourier' or 'sinusoidal'")
        x = as_float_array(x)
        if x.ndim < 2:
            fail("x", f"shape {tuple(x.shape)}", "shape (batch, *event_shape)")
        return nn.Dense(self.num_classes, name="logits")(time_conditioned_trunk(self, x, t))


@dataclasses.dataclass(frozen=True)
class _FlaxClassifierLogProb:
    """``(params, x, t, y) -> log_softmax(module.apply(params, x, t))[y]``; hashable by module."""

    module: nn.Module

    def __call__(self, params, x, t, y):
        if y is None:
            fail("y", None, "integer class ids (B,) or a scalar class id (the guidance target)")
        y = jnp.asarray(y)
        if not jnp.issubdtype(y.dtype, jnp.integer):
            fail("y", y, "integer class ids")
        k = getattr(self.module, "num_classes", None)
        if k is not None and is_concrete(y):
            yy = np.asarray(y)
            if np.any(yy < 0) or np.any(yy >= k):
                fail("y", y, f"class ids in [0, {k})")
        logp = jax.nn.log_softmax(self.module.apply(params, x, t), axis=-1)
        y = jnp.broadcast_to(y, x.shape[:1])
        return jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]


def noisy_classifier_log_prob(module: nn.Module) -> Callable:
    """``log_prob_fn(params, x, t, y) = log softmax(module.apply(params, x, t))_y``, shape (B,).

    ``module``: a Linen module mapping ``(x (B, *event), t (B,))`` to logits ``(B, K)``, e.g.
    :class:`NoisyClassifier`. The returned function is hashable (by ``module``), so it is a
    static field of a :class:`ClassifierGuidance` and the params stay a leaf.
    """
    if not isinstance(module, nn.Module):
        fail("module", module, "a flax.linen Module mapping (x, t) to logits (B, K)")
    return _FlaxClassifierLogProb(module)


def classifier_from_flax(
    module: nn.Module,
    params,
    scale=1.0,
    *,
    scale_fn: Callable | None = None,
    y=None,
) -> ClassifierGuidance:
    """Classifier guidance with a Flax classifier of noised inputs (logits ``(B, K)``):
    ``G = w(t) grad_x log softmax(module.apply(params, x_t, t))_y`` (arXiv 2105.05233).
    ``params`` is a leaf of the term (swapping them never recompiles); see :func:`classifier`."""
    return classifier(
        noisy_classifier_log_prob(module), scale, scale_fn=scale_fn, y=y, params=params
    )


# ------------------------------------------------------------------------------------------
# training on noised data
# ------------------------------------------------------------------------------------------
def _ce_loss(params, module, x_t, t, labels):
    logits = module.apply(params, x_t, t)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(logits.dtype))
    return jnp.mean(nll), acc


@functools.partial(jax.jit, static_argnames=("module", "optimizer", "batch_size"))
def _classifier_chunk(
    params, opt_state, key, first, n, x, labels, schedule, t_lo, t_hi, *, module, optimizer,
    batch_size,
):  # fmt: skip
    """``n`` (traced) Adam steps on noised batches; returns the state and the chunk means."""

    def body(i, carry):
        params, opt_state, tot_loss, tot_acc = carry
        k = jax.random.fold_in(key, first + i)
        k_idx, k_t, k_eps = jax.random.split(k, 3)
        idx = jax.random.randint(k_idx, (batch_size,), 0, x.shape[0])
        x0, y = x[idx], labels[idx]
        t = jax.random.uniform(k_t, (batch_size,), x.dtype, t_lo, t_hi)
        a, s = schedule.alpha_sigma(t)
        eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
        x_t = _bcast(a, x0) * x0 + _bcast(s, x0) * eps
        (loss, acc), g = jax.value_and_grad(_ce_loss, has_aux=True)(params, module, x_t, t, y)
        updates, opt_state = optimizer.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, tot_loss + loss, tot_acc + acc

    zero = jnp.zeros((), x.dtype)
    params, opt_state, tl, ta = jax.lax.fori_loop(0, n, body, (params, opt_state, zero, zero))
    m = jnp.maximum(n, 1).astype(x.dtype)
    return params, opt_state, tl / m, ta / m


def train_classifier(
    key,
    module: nn.Module,
    data_x,
    labels,
    schedule: Schedule,
    *,
    steps: int,
    batch_size: int = 256,
    optimizer: optax.GradientTransformation = optax.adam(1e-3),
    t_min=None,
    t_max=None,
    log_every: int = 100,
    params=None,
):
    """Train a noise-conditional classifier by cross-entropy on noised data.

    Each step draws a batch ``(x0, y)`` (uniformly with replacement), ``t ~ U[t_min, t_max]``
    (default ``[schedule.t_end, schedule.t_start]``), ``eps ~ N(0, I)``, forms
    ``x_t = alpha(t) x0 + sigma(t) eps`` and takes an optax step on
    ``mean_i -log softmax(module(x_t, t))_{y_i}`` (the classifier of classifier guidance,
    Dhariwal & Nichol arXiv 2105.05233, section 4). Steps run as jitted ``fori_loop`` chunks of
    ``log_every`` steps; step ``i`` uses ``fold_in(key, i)``.

    Args:
      key: PRNG key (initialisation and training).
      module: a Linen module ``(x, t) -> logits (B, K)``, e.g. :class:`NoisyClassifier`.
      data_x: clean data ``(N, *event)``.
      labels: integer class ids ``(N,)`` in ``[0, K)``.
      schedule: the noise schedule of the diffusion model to guide.
      steps: number of optimizer steps; batch_size: examples per step.
      optimizer: an optax transformation (default Adam, lr 1e-3).
      t_min, t_max: training time range.
      log_every: steps per chunk / history entry.
      params: initial params (default ``module.init``).

    Returns:
      ``(params, history)``; ``history`` has numpy arrays ``step``, ``loss`` (mean cross-entropy
      over the chunk), ``accuracy`` (mean accuracy on the noised training batches) and ``wall_s``.
    """
    t0 = time.perf_counter()
    if not isinstance(module, nn.Module):
        fail("module", module, "a flax.linen Module mapping (x, t) to logits (B, K)")
    if not isinstance(schedule, Schedule):
        fail("schedule", type(schedule).__name__, "a jaxdiff Schedule")
    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    log_every = check_positive_int("log_every", log_every)
    x = as_float_array(data_x)
    if x.ndim < 2 or x.shape[0] < 1:
        fail("data_x", f"shape {tuple(x.shape)}", "shape (N, *event_shape) with N >= 1")
    y = jnp.asarray(labels)
    if y.shape != x.shape[:1] or not jnp.issubdtype(y.dtype, jnp.integer):
        fail(
            "labels",
            f"shape {tuple(y.shape)}, dtype {y.dtype}",
            f"integer ids of shape ({x.shape[0]},)",
        )
    k = getattr(module, "num_classes", None)
    if k is not None and (np.any(np.asarray(y) < 0) or np.any(np.asarray(y) >= k)):
        fail("labels", labels, f"class ids in [0, {k})")
    t_lo = as_float_array(schedule.t_end if t_min is None else t_min).astype(x.dtype)
    t_hi = as_float_array(schedule.t_start if t_max is None else t_max).astype(x.dtype)
    schedule.check_t(t_lo, "t_min")
    schedule.check_t(t_hi, "t_max")
    if not float(t_lo) < float(t_hi):
        fail("t_min", t_min, f"a time below t_max={float(t_hi):g}")
    k_init, k_train = jax.random.split(key)
    if params is None:
        params = jax.jit(module.init)(k_init, x[:1], jnp.full((1,), 0.5, x.dtype))
    opt_state = optimizer.init(params)
    hist = {"step": [], "loss": [], "accuracy": [], "wall_s": []}
    done = 0
    while done < steps:
        n = min(log_every, steps - done)
        params, opt_state, loss, acc = _classifier_chunk(
            params, opt_state, k_train, jnp.int32(done), jnp.int32(n), x, y, schedule, t_lo,
            t_hi, module=module, optimizer=optimizer, batch_size=batch_size,
        )  # fmt: skip
        done += n
        hist["step"].append(done)
        hist["loss"].append(float(loss))
        hist["accuracy"].append(float(acc))
        hist["wall_s"].append(time.perf_counter() - t0)
    history = {
        "step": np.asarray(hist["step"], np.int64),
        "loss": np.asarray(hist["loss"], np.float64),
        "accuracy": np.asarray(hist["accuracy"], np.float64),
        "wall_s": np.asarray(hist["wall_s"], np.float64),
    }
    return params, history
