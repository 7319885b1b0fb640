"""timm ``HieraDet`` (SAM2's image encoder as a classifier: sam2_hiera_*, hieradet_small):
windowed and global attention with query pooling where a stage starts; no [class] token, the
head averages the last stage.

Every ``MultiScaleBlock`` either attends over the whole (B, H, W, C) grid or pads it at the
bottom and right to whole windows and partitions it (its module's ``window_partition``, as
SAM's). Its ``MultiScaleAttention`` takes q, k, v from ``qkv`` (all queries, keys, values) and,
where a stage starts, max-pools the queries over ``q_stride`` neighbourhoods of each window
(the module's own ``q_pool``), so its query rows lie on a coarser grid than the keys it reads;
its map lies on the grid of its keys. Each window's token map is laid on the grid
(:func:`~captum_daam.adapters.windows.window_positions`), the padding nowhere. The patch
embedding is a convolution, not a block of the flow.
"""

from typing import List, Tuple

import torch
from timm.models import hieradet_sam2
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockLayout, BlockRecord, Hook, output_grid, register_adapter
from .pooled import PooledAdapter
from .windows import window_positions

__all__ = ["TimmHieraDetAdapter", "multiscale_attention_hooks"]


def multiscale_attention_hooks(attention: nn.Module, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``MultiScaleAttention`` on
    (B', h, w, C) windows (or whole grids): q, k, v from ``qkv``, the queries pooled by the
    module's ``q_pool`` as its forward pools them; the output watched, as (B', N_q, C) rows,
    where it enters ``proj``."""
    heads = attention.num_heads

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        batch, height, width = qkv.shape[:3]
        # (B', h, w, 3 H d) -> (3, B', h * w, H, d), as the module's reshape and unbind.
        queries, keys, values = qkv.detach().reshape(batch, height * width, 3, heads, -1).unbind(2)
        if attention.q_pool is not None:
            with torch.no_grad():
                grid = queries.reshape(batch, height, width, -1).permute(0, 3, 1, 2)
                pooled = attention.q_pool(grid).permute(0, 2, 3, 1)
            queries = pooled.reshape(batch, -1, heads, queries.shape[-1])
        queries, keys, values = (part.transpose(1, 2) for part in (queries, keys, values))
        row = class_attention_row(queries[:, :, 0], keys, attention.scale)
        record.set_attention(
            row, values, SoftmaxAttention(queries, keys, attention.scale)
        )

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        output = args[0]  # (B', h_q, w_q, C)
        watched = record.watch(output.flatten(1, 2))
        return (watched.reshape(output.shape),) + tuple(args[1:])

    return [
        Hook(attention.qkv, "forward", on_qkv),
        Hook(attention.proj, "pre", on_pre_projection),
    ]


@register_adapter
class TimmHieraDetAdapter(PooledAdapter):
    """timm ``HieraDet``: windowed and global attention with query pooling; every query row of
    every window explained, each block on the grid of its keys."""

    family = "timm HieraDet (SAM2 Hiera)"
    examples = "sam2_hiera_tiny, sam2_hiera_small, sam2_hiera_base_plus, hieradet_small"
    layer_example = "model.blocks[i].attn"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, hieradet_sam2.HieraDet)

    @property
    def in_channels(self) -> int:
        return self.model.patch_embed.proj.in_channels

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for block in self.model.blocks]

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = output_grid(image_size, self.model.patch_embed.proj)
        layouts = []
        for block in self.model.blocks:
            if block.is_windowed:
                positions = window_positions(grid, tuple(block.window_size), (0, 0),
                                             hieradet_sam2.window_partition)
                layouts.append(BlockLayout(grid, 0, positions))
            else:
                layouts.append(BlockLayout(grid))
            if block.q_stride:  # MaxPool2d without padding: floor
                grid = tuple(size // stride for size, stride in zip(grid, block.q_stride))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return multiscale_attention_hooks(attention, record)
