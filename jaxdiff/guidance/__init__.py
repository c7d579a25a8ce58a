"""Guidance: transforms of a model into a model.

* :func:`cfg` — classifier-free guidance (a model transform, any parametrization).
* :func:`guide` — add score-space terms to any model: :func:`classifier` (noise-conditional
  classifiers, :class:`NoisyClassifier` + :func:`train_classifier`), gradient guidance
  (:func:`naive_gradient`, :func:`lookahead_gradient`, :func:`objective_gradient`) and posterior
  sampling for inverse problems (:func:`dps`, :func:`reconstruction_guidance`).

Every guided model is a :class:`~jaxdiff.denoiser.Denoiser`, so it runs under every sampler and
can be guided again; scales and targets are pytree leaves (sweeping them never recompiles).
"""

from jaxdiff.guidance.base import GuidanceContext, GuidanceTerm, Guided, guide, scale_at
from jaxdiff.guidance.cfg import CFG, cfg
from jaxdiff.guidance.classifier import (
    ClassifierGuidance,
    NoisyClassifier,
    classifier,
    classifier_from_flax,
    log_prob_and_grad,
    noisy_classifier_log_prob,
    train_classifier,
)
from jaxdiff.guidance.gradient import (
    LookaheadGradient,
    LookaheadObjectiveGradient,
    NaiveGradient,
    ObjectiveGradient,
    lookahead_gradient,
    naive_gradient,
    objective_gradient,
)
from jaxdiff.guidance.posterior import DPS, ReconstructionGuidance, dps, reconstruction_guidance

__all__ = [
    "CFG",
    "DPS",
    "ClassifierGuidance",
    "GuidanceContext",
    "GuidanceTerm",
    "Guided",
    "LookaheadGradient",
    "LookaheadObjectiveGradient",
    "NaiveGradient",
    "NoisyClassifier",
    "ObjectiveGradient",
    "ReconstructionGuidance",
    "cfg",
    "classifier",
    "classifier_from_flax",
    "dps",
    "guide",
    "log_prob_and_grad",
    "lookahead_gradient",
    "naive_gradient",
    "noisy_classifier_log_prob",
    "objective_gradient",
    "reconstruction_guidance",
    "scale_at",
    "train_classifier",
]
