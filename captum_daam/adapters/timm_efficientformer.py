"""timm ``EfficientFormer`` (efficientformer_l1, _l3, _l7): attention with attention biases in
the last stage's token blocks, after pooling blocks; no [class] token, the head averages the
tokens (a distilled pair of heads, averaged at inference).

The last stage flattens its grid row by row (``Flat``) and runs ``MetaBlock1d``s whose token
mixer is an ``Attention`` as LeViT's and TinyViT's: q, k and v from ``qkv`` (per head: key,
key and value widths in a row) and a learned bias per head and offset (|dr|, |dc|) in the
logits, for a fixed resolution. The stem, the downsamplings and the ``MetaBlock2d`` pooling
blocks are not blocks of the flow. The attention biases fix the image size to the one the
model was built for.
"""

from typing import List, Tuple

from timm.models.efficientformer import Attention as EfficientFormerAttention
from timm.models.efficientformer import EfficientFormer, MetaBlock1d
from torch import nn

from .base import BlockLayout, BlockRecord, Hook, output_grid, register_adapter
from .pooled import PooledAdapter
from .timm_tiny_vit import tiny_vit_attention_hooks

__all__ = ["TimmEfficientFormerAdapter"]


def _attends(block: nn.Module) -> bool:
    return isinstance(block, MetaBlock1d) and isinstance(
        block.token_mixer, EfficientFormerAttention)


@register_adapter
class TimmEfficientFormerAdapter(PooledAdapter):
    """timm ``EfficientFormer``: the attention of the last stage's token blocks, every query
    row explained, on that stage's grid."""

    family = "timm EfficientFormer"
    examples = "efficientformer_l1, efficientformer_l3, efficientformer_l7"
    layer_example = "model.stages[-1].blocks[i].token_mixer"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, EfficientFormer)

    def attention_modules(self) -> List[nn.Module]:
        return [block.token_mixer for stage in self.model.stages for block in stage.blocks
                if _attends(block)]

    @property
    def in_channels(self) -> int:
        return self.model.stem.conv1.in_channels

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = output_grid(output_grid(image_size, self.model.stem.conv1), self.model.stem.conv2)
        layouts = []
        for stage in self.model.stages:
            if not isinstance(stage.downsample, nn.Identity):
                grid = output_grid(grid, stage.downsample.conv)
            for block in filter(_attends, stage.blocks):
                biases = block.token_mixer.attention_bias_idxs.shape[0]
                if grid[0] * grid[1] != biases:
                    raise ValueError(
                        f"This EfficientFormer's attention biases cover {biases} tokens, but "
                        f"{image_size[0]}x{image_size[1]} images give a {grid[0]}x{grid[1]} grid "
                        f"in its last stage. Resize the images to the size the model was built "
                        f"for (224x224 for the registered models)."
                    )
                layouts.append(BlockLayout(grid))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return tiny_vit_attention_hooks(attention, record)
