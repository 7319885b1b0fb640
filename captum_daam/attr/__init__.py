"""Captum attribution classes for Vision Transformers."""

from .daam import DAAM

__all__ = ["DAAM"]
