"""timm ``DaVit`` (davit_*): spatial window attention alternating with channel attention; no
[class] token, the head averages the last stage.

A ``SpatialBlock`` pads its grid at the bottom and right to whole windows, partitions it as
Swin does and runs ``WindowAttention`` (q, k, v from ``qkv``, no position bias) on the B * W
windows: every query row is split over the window tokens it reads and each window's map is
laid on the stage grid (:func:`~captum_daam.adapters.windows.window_positions`). A
``ChannelBlock``'s channel attention mixes no tokens: each token's output is its own query
vector times a channel-by-channel matrix (formed from all tokens), so it has no map over the
tokens a row reads and is not a block of the flow, as the MLPs are not. The stem, the
downsamplings and the convolutional position encodings are convolutions, not blocks of the
flow.
"""

from typing import List, Tuple

from timm.models import davit
from timm.models.swin_transformer import window_partition
from torch import nn

from .base import BlockLayout, BlockRecord, Hook, output_grid, register_adapter
from .pooled import PooledAdapter
from .timm_vit import timm_attention_hooks
from .windows import window_positions

__all__ = ["TimmDaVitAdapter"]


def _padded_output_grid(grid: Tuple[int, int], conv: nn.Conv2d, multiple) -> Tuple[int, int]:
    """The grid ``conv`` makes of ``grid`` after DaViT pads it at the bottom and right to a
    multiple of ``multiple`` (its stem's stride, an even downsampling kernel)."""
    padded = tuple(-(-size // step) * step for size, step in zip(grid, multiple))
    return output_grid(padded, conv)


@register_adapter
class TimmDaVitAdapter(PooledAdapter):
    """timm ``DaVit``: the window attention of its spatial blocks, every query row of every
    window explained, each stage on its own grid, any image size."""

    family = "timm DaViT"
    examples = "davit_tiny, davit_small, davit_base, davit_large, davit_huge, davit_giant"
    layer_example = "model.stages[s].blocks[i].spatial_block.attn"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, davit.DaVit)

    @property
    def in_channels(self) -> int:
        return self.model.stem.conv.in_channels

    def _spatial_blocks(self, stage: nn.Module) -> List[nn.Module]:
        return [module for module in stage.blocks.modules()
                if isinstance(module, davit.SpatialBlock)]

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for stage in self.model.stages for block in self._spatial_blocks(stage)]

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        stem = self.model.stem
        grid = _padded_output_grid(image_size, stem.conv, stem.stride)
        layouts = []
        for stage in self.model.stages:
            downsample = stage.downsample
            if not isinstance(downsample, nn.Identity):
                kernel = downsample.conv.kernel_size
                grid = _padded_output_grid(
                    grid, downsample.conv, kernel if downsample.even_k else (1, 1))
            for block in self._spatial_blocks(stage):
                window = tuple(block.window_size)
                positions = window_positions(grid, window, (0, 0), window_partition)
                layouts.append(BlockLayout(grid, 0, positions))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return timm_attention_hooks(attention, record)
