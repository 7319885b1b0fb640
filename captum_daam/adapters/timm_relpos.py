"""timm ``VisionTransformerRelPos`` (vit_relpos_*, vit_srelpos_*, *_rpn_*; with a [class]
token: vit_relpos_medium_patch16_cls_224, vit_relpos_base_patch16_cls_224,
vit_relpos_base_patch16_clsgap_224), with ``RelPosAttention`` in every block: fused or not,
qk_norm, a per-block relative position bias (``RelPosBias`` tables or ``RelPosMlp``
log-coordinate MLP) or one shared by all blocks, pre-norm or residual post-norm blocks.

``RelPosAttention`` adds a relative position bias to its logits. With a [class] token,
``RelPosBias`` has learned [class] rows and columns in its table; ``RelPosMlp`` pads its bias
with zeros for the [class] token. The recorded [class] row includes that bias as the module
adds it: the block's own ``rel_pos.get_bias()``, or else the shared bias passed to the call.
"""

from typing import List, Optional

import torch
from timm.layers import RelPosBias, RelPosMlp
from timm.models.vision_transformer_relpos import RelPosAttention, VisionTransformerRelPos
from torch import Tensor, nn

from .base import BlockRecord, Hook, register_adapter
from .timm_vit import TimmAdapter, timm_attention_hooks

#: The relative position modules whose bias the hooks know how to read (``get_bias()``,
#: which their forward adds to the logits as it is).
RELATIVE_POSITION_TYPES = (RelPosBias, RelPosMlp)


def relpos_attention_hooks(attention: RelPosAttention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``RelPosAttention``.

    The query, keys and values are read as for timm's ``Attention`` (``qkv``, ``q_norm``,
    ``k_norm``), the output is watched where it enters ``proj``, and the logit bias is the one
    the module adds: its own relative position bias, recomputed with ``rel_pos.get_bias()``
    under no_grad (deterministic in eval mode), or, without one, the call's
    ``shared_rel_pos`` argument.
    """

    def relative_position_bias(args: tuple, kwargs: dict) -> Optional[Tensor]:
        if attention.rel_pos is not None:  # the module then ignores shared_rel_pos
            with torch.no_grad():
                return attention.rel_pos.get_bias()
        return kwargs.get("shared_rel_pos", args[1] if len(args) > 1 else None)

    return timm_attention_hooks(attention, record, call_bias=relative_position_bias)


@register_adapter
class TimmRelPosAdapter(TimmAdapter):
    """timm ``VisionTransformerRelPos`` with ``RelPosAttention`` in every block (a fixed image
    size: the relative position biases are built for one patch grid). Most relpos models
    (vit_relpos_*_224, *_rpn_*, vit_srelpos_*) have no [class] token and pool the tokens:
    every query row is explained, the bias in every row. A block whose ``rel_pos`` is not
    timm's ``RelPosBias`` or ``RelPosMlp`` is refused.
    """

    family = "timm VisionTransformerRelPos"
    examples = (
        "vit_relpos_*, vit_srelpos_*, vit_relpos_*_rpn_*, vit_relpos_*_cls_224"
    )
    attention_types = (RelPosAttention,)

    def __init__(self, model: nn.Module) -> None:
        allowed = " or ".join(
            f"{cls.__module__}.{cls.__qualname__}" for cls in RELATIVE_POSITION_TYPES
        )
        for index, block in enumerate(getattr(model, self.blocks_name, None) or []):
            attention = getattr(block, "attn", None)
            relative_position = getattr(attention, "rel_pos", None)
            if isinstance(attention, RelPosAttention) and not (
                relative_position is None or isinstance(relative_position, RELATIVE_POSITION_TYPES)
            ):
                raise TypeError(
                    f"Block {index} of {type(model).__name__}.{self.blocks_name} adds a relative "
                    f"position bias from {type(relative_position).__name__}; the "
                    f"{self.family} adapter reads the bias of {allowed}. Write an adapter for "
                    f"this relative position type."
                )
        super().__init__(model)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformerRelPos)

    def attention_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return relpos_attention_hooks(attention, record)
