"""timm ``Visformer`` (visformer_tiny, visformer_small): attention over a whole stage grid in
NCHW, after convolution blocks; no [class] token, the head averages the last stage.

Visformer's stages are convolution blocks, or, where its ``attn_stage`` says so, blocks whose
``Attention`` takes the stage grid as (B, C, h, w): q, k and v from a 1x1 convolution (all
queries, then keys, then values), softmax(q k^T * scale), the heads merged by a 1x1 ``proj``;
no position bias in the logits. One grid per stage (each stage's patch embedding halves or
quarters it); the flow lies on the finest. The stem, the patch embeddings and the convolution
blocks (those without attention) are not blocks of the flow. The position embeddings fix the
image size to the model's ``img_size``.
"""

from typing import List, Optional, Tuple

from timm.models.visformer import Attention as VisformerAttention
from timm.models.visformer import Visformer
from torch import nn

from .base import BlockLayout, BlockRecord, Hook, output_grid, register_adapter
from .pooled import PooledAdapter
from .timm_maxxvit import maxxvit_attention_hooks

__all__ = ["TimmVisformerAdapter"]


@register_adapter
class TimmVisformerAdapter(PooledAdapter):
    """timm ``Visformer``: the attention blocks of its stages, every query row explained,
    each stage on its own grid."""

    family = "timm Visformer"
    examples = "visformer_tiny, visformer_small"
    layer_example = "model.stage2[i].attn"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if not self.attention_modules():
            raise TypeError(
                f"This {type(model).__name__} has no attention block (its attn_stage turns "
                f"attention off in every stage): a CNN, so DAAM has nothing to explain."
            )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, Visformer)

    def _stages(self) -> List[Tuple[Optional[nn.Module], nn.Module]]:
        """Each stage with the patch embedding before it (None where the stage has none)."""
        model = self.model
        return [(model.patch_embed1, model.stage1), (model.patch_embed2, model.stage2),
                (model.patch_embed3, model.stage3)]

    @property
    def in_channels(self) -> int:
        return self.model.in_chans

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for _, stage in self._stages() for block in stage
                if isinstance(block.attn, VisformerAttention)]

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = image_size
        if self.model.stem is not None:
            grid = output_grid(grid, self.model.stem[0])
        layouts = []
        for index, (embedding, stage) in enumerate(self._stages(), start=1):
            if embedding is not None:
                grid = output_grid(grid, embedding.proj)
            position = getattr(self.model, f"pos_embed{index}", None)
            if position is not None and tuple(position.shape[-2:]) != tuple(grid):
                raise ValueError(
                    f"This Visformer's position embeddings fix its image size: stage {index} "
                    f"takes a {position.shape[-2]}x{position.shape[-1]} grid, but "
                    f"{image_size[0]}x{image_size[1]} images give {grid[0]}x{grid[1]}. Resize "
                    f"the images to the size the model was built for (its img_size)."
                )
            layouts += [BlockLayout(grid) for block in stage
                        if isinstance(block.attn, VisformerAttention)]
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return maxxvit_attention_hooks(attention, record)
