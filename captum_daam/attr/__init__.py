"""Captum attribution classes for Vision Transformers."""

from .daam import DAAM
from .legrad import LeGrad
from .rollout import AttentionRollout, GradientRollout

__all__ = ["DAAM", "AttentionRollout", "GradientRollout", "LeGrad"]
