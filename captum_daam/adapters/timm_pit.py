"""timm ``PoolingVisionTransformer`` (PiT: pit_ti_224, pit_s_224, pit_b_distilled_224, ...).

PiT runs stages of ViT blocks (timm's ``Block`` with its standard ``Attention``). Between
stages a depthwise convolution (``Pooling.conv``, kernel 3, stride 2, padding 1) halves the
patch grid and a linear layer (``Pooling.fc``) maps the [class] (and distillation) tokens to
the next stage's width. The flow runs over every block of every stage; each block's [class]
query reads the patch tokens of its stage, laid out row-major (``flatten(2)``) on the grid
the convolutions give, so block maps come on three grids (27x27, 14x14 and 7x7 for a
pit_ti_224 at 224x224) and are brought to the finest one before they are added up.

The position embedding is a fixed (1, C, gh, gw) map added to the patch embedding, so the
model takes only images whose patch grid is that one (224x224 for the registered models).

Distilled PiT (``pit_*_distilled_224``) has two prefix tokens, [class] and distillation, and
averages the predictions of their two heads. DAAM follows the [class] token, as for distilled
DeiT: the distillation head's half of the output reaches the maps only through the [class]
rows of earlier blocks; ``queries='all'`` splits every query row and explains both halves.
"""

from typing import List, Optional, Sequence, Tuple

from timm.layers import Attention
from timm.models.pit import PoolingVisionTransformer
from torch import nn

from .base import BlockLayout, BlockRecord, Hook, ViTAdapter, output_grid, register_adapter
from .timm_vit import timm_attention_hooks


@register_adapter
class TimmPitAdapter(ViTAdapter):
    """timm ``PoolingVisionTransformer`` with its [class] token pooled by the head
    (``global_pool='token'``, the default) and timm ``Attention`` in every block.

    A model built with ``global_pool=''`` (its head maps every prefix token, so the output is
    (B, tokens, classes)) is refused.
    """

    family = "timm PiT"
    examples = "pit_ti_224, pit_xs_224, pit_s_224, pit_b_224, pit_*_distilled_224"
    layer_example = "model.transformers[s].blocks[i].attn"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        name = type(model).__name__
        if model.global_pool != "token":
            raise TypeError(
                f"DAAM explains class scores (B, K) read from the [class] token, but this "
                f"{name} has global_pool={model.global_pool!r}, so its head maps every prefix "
                f"token and the output is (B, tokens, K). Use global_pool='token' (the "
                f"default)."
            )
        for stage_index, stage in enumerate(model.transformers):
            for block_index, block in enumerate(stage.blocks):
                attention = getattr(block, "attn", None)
                if not isinstance(attention, Attention):
                    raise TypeError(
                        f"Block {block_index} of {name}.transformers[{stage_index}] uses "
                        f"{type(attention).__name__} (block type {type(block).__name__}); the "
                        f"{self.family} adapter supports timm.layers.attention.Attention. Write "
                        f"an adapter for this attention type."
                    )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, PoolingVisionTransformer)

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for stage in self.model.transformers for block in stage.blocks]

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_tokens  # [class], and the distillation token of distilled PiT

    @property
    def in_channels(self) -> Optional[int]:
        return self.model.in_chans

    @property
    def num_outputs(self) -> Optional[int]:
        return self.model.num_classes or self.model.num_features

    @property
    def outputs_features(self) -> bool:
        return self.model.num_classes == 0

    def stage_grids(self, image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """The patch grid of every stage for images of ``image_size``, checked against the
        position embedding's grid."""
        model = self.model
        grid = output_grid(image_size, model.patch_embed.conv)
        expected = tuple(model.pos_embed.shape[-2:])
        if grid != expected:
            height, width = model.patch_embed.img_size
            raise ValueError(
                f"This model takes {height}x{width} images (its position embedding is a fixed "
                f"{expected[0]}x{expected[1]} patch grid), got {image_size[0]}x{image_size[1]}, "
                f"which gives a {grid[0]}x{grid[1]} grid. Resize the images."
            )
        grids = []
        for stage in model.transformers:
            if stage.pool is not None:
                grid = output_grid(grid, stage.pool.conv)
            grids.append(grid)
        return grids

    def block_layouts(
        self, attention_modules: Sequence[nn.Module], image_size: Tuple[int, int]
    ) -> List[BlockLayout]:
        grid_of = {}
        for stage, grid in zip(self.model.transformers, self.stage_grids(image_size)):
            grid_of.update({id(block.attn): grid for block in stage.blocks})
        return [BlockLayout(grid_of[id(attention)]) for attention in attention_modules]

    def grid_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        return max(self.stage_grids(image_size), key=lambda grid: grid[0] * grid[1])

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return timm_attention_hooks(attention, record)
