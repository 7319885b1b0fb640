"""timm ``ConVit`` (ConViT: convit_tiny, convit_small, convit_base).

ConViT's first ``local_up_to_layer`` blocks use gated positional self-attention (``GPSA``) on
the patch tokens alone; the [class] token is concatenated after them, and the later blocks
use plain multi-head self-attention (``MHSA``: a ``qkv`` and a ``proj`` linear layer, as
timm's ``Attention`` without the fused path), every token a query. The DAAM flow runs over
those MHSA blocks, the ones that have a [class] token.
"""

from typing import List

from timm.models.convit import GPSA, MHSA, ConVit
from torch import nn

from .base import BlockRecord, Hook, register_adapter
from .timm_vit import TimmAdapter, timm_attention_hooks


@register_adapter
class TimmConvitAdapter(TimmAdapter):
    """timm ``ConVit``: the flow runs over the MHSA blocks,
    ``model.blocks[model.local_up_to_layer:]``, after the [class] token is added.

    A ConViT without such blocks (``depth <= local_up_to_layer``, or pruned by
    ``prune_intermediate_layers``) is refused: its [class] token is never added.
    """

    family = "timm ConViT (MHSA blocks)"
    examples = "convit_tiny, convit_small, convit_base"
    layer_example = "model.blocks[i].attn with i >= model.local_up_to_layer"
    #: The constructor accepts both; the blocks of the flow must be MHSA (checked there).
    attention_types = (GPSA, MHSA)

    def __init__(self, model: nn.Module) -> None:
        name = type(model).__name__
        local = model.local_up_to_layer
        if model.cls_token is None or len(model.blocks) <= local:
            raise TypeError(
                f"DAAM explains the [class] token, which ConViT adds after its "
                f"{local} GPSA blocks, but this {name} has {len(model.blocks)} blocks in all, "
                f"so it never adds one (built with depth <= local_up_to_layer, or pruned by "
                f"prune_intermediate_layers). Use a ConViT with blocks after the GPSA blocks."
            )
        super().__init__(model)
        for index, block in enumerate(model.blocks):
            if isinstance(block.attn, MHSA) != (index >= local):
                raise TypeError(
                    f"Block {index} of {name}.blocks uses {type(block.attn).__name__}; the "
                    f"{self.family} adapter expects GPSA in the first local_up_to_layer={local} "
                    f"blocks and timm.models.convit.MHSA after them."
                )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, ConVit)

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for block in self.model.blocks[self.model.local_up_to_layer :]]

    def attention_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        # MHSA has timm Attention's qkv / proj / num_heads / scale layout, without norms.
        return timm_attention_hooks(attention, record)
