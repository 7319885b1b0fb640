"""timm MobileViT (mobilevit_xxs, _xs, _s): transformers over the patches of a feature map in
three stages of a convolutional ``ByobNet``, no [class] token; the head averages the last map.

A ``MobileVitBlock`` cuts its (H, W) map (resized up to whole patches where it is not) into
n_h x n_w patches of p_h x p_w pixels and runs timm ``Block``s on B * P sequences of N = n_h *
n_w tokens: sequence p of an image holds, for every patch, its pixel at offset p (row-major in
the patch), so each attention mixes the same pixel of every patch. Those P sequences are the
block's windows: every row of each is explained (timm's ViT attention hooks) and its tokens
laid back on their pixels of the map. The convolutions around the transformers (``conv_kxk``,
``conv_1x1``, ``conv_proj``, ``conv_fusion``) and the MobileNetV2 blocks are not blocks of the
flow. MobileViT-V2's separable linear attention is not softmax attention over tokens and is
not taken.
"""

import math
from typing import List, Tuple

import torch
from timm.models.byobnet import ByobNet
from timm.models.mobilevit import MobileVitBlock
from torch import Tensor, nn

from .base import BlockLayout, BlockRecord, Hook, register_adapter
from .pooled import PooledAdapter, conv_block_stride, strided_grid
from .timm_vit import timm_attention_hooks

__all__ = ["TimmMobileVitAdapter"]


def patch_positions(grid: Tuple[int, int], patch: Tuple[int, int]) -> Tensor:
    """(P, N): the cell of the (whole-patch) grid of token n of sequence p, as MobileViT
    unfolds it: patch n row-major over the patches, pixel p row-major within the patch."""
    rows, columns = grid[0] // patch[0], grid[1] // patch[1]
    patch_row, patch_column = torch.arange(rows * columns).div(columns, rounding_mode="floor"), (
        torch.arange(rows * columns) % columns)
    offsets = torch.arange(patch[0] * patch[1])
    row = patch_row * patch[0] + offsets.div(patch[1], rounding_mode="floor")[:, None]
    column = patch_column * patch[1] + (offsets % patch[1])[:, None]
    return row * grid[1] + column


@register_adapter
class TimmMobileVitAdapter(PooledAdapter):
    """timm MobileViT: every query row of every transformer block, in each of its P
    pixel-offset sequences, on the map the MobileViT block unfolds; any image size."""

    family = "timm MobileViT"
    examples = "mobilevit_xxs, mobilevit_xs, mobilevit_s"
    layer_example = "model.stages[s][1].transformer[i].attn"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, ByobNet) and any(
            isinstance(module, MobileVitBlock) for module in model.modules())

    def _mobilevit_blocks(self) -> List[MobileVitBlock]:
        return [module for module in self.model.modules() if isinstance(module, MobileVitBlock)]

    def attention_modules(self) -> List[nn.Module]:
        return [layer.attn for block in self._mobilevit_blocks() for layer in block.transformer]

    @property
    def in_channels(self) -> int:
        return next(module for module in self.model.stem.modules()
                    if isinstance(module, nn.Conv2d)).in_channels

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = tuple(image_size)
        layouts = []
        for block in [self.model.stem] + [block for stage in self.model.stages for block in stage]:
            if isinstance(block, MobileVitBlock):
                grid = strided_grid(grid, block.conv_kxk.conv.stride[0])
                patch = block.patch_size
                whole = tuple(math.ceil(size / side) * side for size, side in zip(grid, patch))
                layout = BlockLayout(whole, positions=patch_positions(whole, patch))
                layouts += [layout] * len(block.transformer)
            else:
                grid = strided_grid(grid, conv_block_stride(block))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return timm_attention_hooks(attention, record)
