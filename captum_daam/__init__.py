"""captum-daam: the Dynamic Accumulated Attention Map (DAAM) for Vision Transformers, in Captum.

>>> from captum_daam import DAAM
>>> flow = DAAM(model).attribute(images, target=None, return_flow=True)  # doctest: +SKIP

The public names are imported on first use (PEP 562), so that ``import captum_daam`` and
``captum_daam.__version__`` do not import torch: the ``captum-daam --help`` command stays fast.
"""

import importlib
from typing import TYPE_CHECKING, Any, Dict, List

__version__ = "0.1.0"

# Public name -> the submodule that defines it, imported when the name is first used.
_PUBLIC: Dict[str, str] = {
    "DAAM": ".attr",
    "AttentionRollout": ".attr",
    "GradientRollout": ".attr",
    "LeGrad": ".attr",
    "MemoryBank": ".ssl",
    "ImageTextSimilarity": ".image_text",
    "explain_dataset": ".dataset",
    "compare": ".comparison",
    "view": ".viewer",
    "FlowView": ".viewer",
    "TokenGrid": ".token_grid",
    "GenericAdapter": ".adapters",
    "ViTAdapter": ".adapters",
    "adapter_for": ".adapters",
    "register_adapter": ".adapters",
    "supported_families": ".adapters",
    "accumulate": ".decompose",
    "block_map": ".decompose",
    "class_token_contributions": ".decompose",
    "paper_display_mapping": ".decompose",
    "per_map_scaling": ".decompose",
    "scale_flow": ".decompose",
    "shared_linear_scaling": ".decompose",
}

# Submodules reachable as attributes of the package, as when it imported them eagerly.
_SUBMODULES = (
    "adapters", "attr", "cli", "comparison", "data", "dataset", "decompose", "image_text",
    "metrics", "ssl", "token_grid", "viewer", "visualization", "zoo",
)

__all__ = [
    "DAAM",
    "AttentionRollout",
    "GradientRollout",
    "LeGrad",
    "MemoryBank",
    "ImageTextSimilarity",
    "explain_dataset",
    "compare",
    "view",
    "FlowView",
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

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names come from __getattr__
    from . import metrics
    from .adapters import (
        GenericAdapter,
        ViTAdapter,
        adapter_for,
        register_adapter,
        supported_families,
    )
    from .attr import DAAM, AttentionRollout, GradientRollout, LeGrad
    from .comparison import compare
    from .dataset import explain_dataset
    from .image_text import ImageTextSimilarity
    from .decompose import (
        accumulate,
        block_map,
        class_token_contributions,
        paper_display_mapping,
        per_map_scaling,
        scale_flow,
        shared_linear_scaling,
    )
    from .ssl import MemoryBank
    from .token_grid import TokenGrid
    from .viewer import FlowView, view


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later look-ups find it directly
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_PUBLIC) | set(_SUBMODULES))
