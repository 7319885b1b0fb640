"""timm ``FastVit`` with attention (fastvit_sa12 / _sa24 / _sa36 / _ma36 and MobileCLIP's
fastvit_mci0 ... mci4): multi-head self-attention in the last stage's (MobileCLIP's last two
stages') ``AttentionBlock``s, no [class] token; the head averages the last map.

The ``Attention`` flattens its NCHW map row by row and is timm's ViT attention otherwise (one
``qkv`` layer, ``proj``), so its hooks are :func:`~captum_daam.adapters.timm_vit.
timm_attention_hooks`'. The convolutional stem, the ``RepMixerBlock``s, the conditional
positional encodings (``RepConditionalPosEnc``) and the strided patch embeddings are
convolutions, not blocks of the flow.
"""

from typing import List, Tuple

from timm.models.fastvit import Attention as FastVitAttention
from timm.models.fastvit import AttentionBlock, FastVit
from torch import nn

from .base import BlockLayout, BlockRecord, Hook, register_adapter
from .pooled import PooledAdapter, strided_grid
from .timm_vit import timm_attention_hooks

__all__ = ["TimmFastVitAdapter"]


@register_adapter
class TimmFastVitAdapter(PooledAdapter):
    """timm ``FastVit``: every query row of every ``AttentionBlock``'s attention, on its
    stage's grid; any image size."""

    family = "timm FastViT"
    examples = "fastvit_sa12, fastvit_sa24, fastvit_sa36, fastvit_ma36, fastvit_mci0 ... mci4"
    layer_example = "model.stages[s].blocks[i].token_mixer"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if not self.attention_modules():
            raise TypeError(
                "This FastVit has no AttentionBlock (fastvit_t8 / t12 / s12 mix their tokens "
                "with RepMixer convolutions only): a CNN, no attention for DAAM to explain."
            )
        for index, attention in enumerate(self.attention_modules()):
            if not isinstance(attention, FastVitAttention):
                raise TypeError(
                    f"AttentionBlock {index}'s token mixer is a {type(attention).__name__}; the "
                    f"{self.family} adapter supports timm's FastViT Attention."
                )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, FastVit) and any(
            isinstance(module, AttentionBlock) for module in model.modules())

    def attention_modules(self) -> List[nn.Module]:
        return [block.token_mixer for stage in self.model.stages for block in stage.blocks
                if isinstance(block, AttentionBlock)]

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = tuple(image_size)
        for block in self.model.stem:
            grid = strided_grid(grid, block.stride)  # odd kernels, half-kernel padding
        layouts = []
        for stage in self.model.stages:
            if not isinstance(stage.downsample, nn.Identity):
                grid = strided_grid(grid, 2)
            layouts += [BlockLayout(grid) for block in stage.blocks
                        if isinstance(block, AttentionBlock)]
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        # The module takes no mask; its NCHW input is flattened before qkv.
        return timm_attention_hooks(attention, record, call_bias=lambda args, kwargs: None)
