"""Model-family adapters and the registry that picks one for a model."""

from .base import (
    BlockRecord,
    Hook,
    ViTAdapter,
    adapter_for,
    register_adapter,
    supported_families,
)
from .timm_vit import TimmVisionTransformerAdapter

__all__ = [
    "BlockRecord",
    "Hook",
    "ViTAdapter",
    "adapter_for",
    "register_adapter",
    "supported_families",
    "TimmVisionTransformerAdapter",
]
