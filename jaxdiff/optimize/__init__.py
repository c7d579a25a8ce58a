"""Optimisation with diffusion models: init/step loops over pytrees.

* :mod:`jaxdiff.optimize.rcgdm` — reward-directed conditional diffusion (Yuan et al., arXiv
  2307.07055; preferences: Li et al., arXiv 2403.13219): fit a reward (or Bradley-Terry) model,
  pseudo-label, train a reward-conditioned score network, sample at a target reward; plus the
  noisy-reward-predictor guidance variant.
* :mod:`jaxdiff.optimize.gradient_guided` — gradient-guided optimisation (Guo et al., arXiv
  2404.14743): Algorithm 1 (guided sampling toward a moving target, score fixed) and Algorithm 2
  (adaptive fine-tuning of the score on the new samples).
* :mod:`jaxdiff.optimize.finetune` — reward fine-tuning by backpropagating the reward through the
  last K sampler steps (DRaFT / AlignProp) with ``jax.checkpoint`` and a KL or score-matching
  regulariser.
"""

from jaxdiff.optimize import finetune, gradient_guided, rcgdm

__all__ = ["finetune", "gradient_guided", "rcgdm"]
