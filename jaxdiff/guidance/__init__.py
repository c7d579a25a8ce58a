"""Guidance: transforms of a model into a model (see :mod:`jaxdiff.guidance.base`)."""

from jaxdiff.guidance.base import GuidanceContext, GuidanceTerm, Guided, guide, scale_at

__all__ = ["GuidanceContext", "GuidanceTerm", "Guided", "guide", "scale_at"]
