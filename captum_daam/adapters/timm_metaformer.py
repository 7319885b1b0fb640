"""timm ``MetaFormer`` with attention (CAFormer: caformer_s18 / s36 / m36 / b36): multi-head
self-attention in the last two stages, no [class] token; the head averages the last map.

Stages whose token mixer is ``Attention`` flatten the map row by row into (B, N, C) tokens;
the ``Attention`` is timm's ViT attention (``qkv``, ``proj``), so its hooks are
:func:`~captum_daam.adapters.timm_vit.timm_attention_hooks`'. The stem, the downsampling
convolutions and the separable-convolution stages (and the pooling or identity mixers of
PoolFormer / ConvFormer, which have no attention) are not blocks of the flow.
"""

from typing import List, Tuple

from timm.models.metaformer import Attention as MetaFormerAttention
from timm.models.metaformer import MetaFormer
from torch import nn

from .base import BlockLayout, BlockRecord, Hook, output_grid, register_adapter
from .pooled import PooledAdapter
from .timm_vit import timm_attention_hooks

__all__ = ["TimmMetaFormerAdapter"]


@register_adapter
class TimmMetaFormerAdapter(PooledAdapter):
    """timm ``MetaFormer`` (CAFormer): every query row of every attention block, on its
    stage's grid; any image size."""

    family = "timm MetaFormer (CAFormer)"
    examples = "caformer_s18, caformer_s36, caformer_m36, caformer_b36"
    layer_example = "model.stages[s].blocks[i].token_mixer"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, MetaFormer) and any(
            isinstance(module, MetaFormerAttention) for module in model.modules())

    def attention_modules(self) -> List[nn.Module]:
        return [block.token_mixer for stage in self.model.stages for block in stage.blocks
                if isinstance(block.token_mixer, MetaFormerAttention)]

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = output_grid(tuple(image_size), self.model.stem.conv)
        layouts = []
        for stage in self.model.stages:
            if not isinstance(stage.downsample, nn.Identity):
                grid = output_grid(grid, stage.downsample.conv)
            layouts += [BlockLayout(grid) for block in stage.blocks
                        if isinstance(block.token_mixer, MetaFormerAttention)]
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return timm_attention_hooks(attention, record)
