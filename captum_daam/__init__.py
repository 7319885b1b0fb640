"""captum-daam: the Dynamic Accumulated Attention Map (DAAM) for Vision Transformers, in Captum.

>>> from captum_daam import DAAM
>>> flow = DAAM(model).attribute(images, target=None, return_flow=True)  # doctest: +SKIP
"""

from .adapters import (
    GenericAdapter,
    ViTAdapter,
    adapter_for,
    register_adapter,
    supported_families,
)
from .attr import DAAM, AttentionRollout, GradientRollout
from . import metrics
from .ssl import MemoryBank
from .dataset import explain_dataset
from .token_grid import TokenGrid
from .decompose import (
    accumulate,
    block_map,
    class_token_contributions,
    paper_display_mapping,
    per_map_scaling,
    scale_flow,
    shared_linear_scaling,
)

__version__ = "0.1.0"

__all__ = [
    "DAAM",
    "AttentionRollout",
    "GradientRollout",
    "MemoryBank",
    "explain_dataset",
    "TokenGrid",
    "metrics",
    "GenericAdapter",
    "ViTAdapter",
    "adapter_for",
    "register_adapter",
    "supported_families",
    "accumulate",
    "block_map",
    "class_token_contributions",
    "paper_display_mapping",
    "per_map_scaling",
    "scale_flow",
    "shared_linear_scaling",
]
