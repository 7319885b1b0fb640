"""timm MobileNetV4 hybrids (mobilenetv4_hybrid_medium / _large, and their _075): multi-query
attention blocks in the last two stages of a convolutional ``MobileNetV3``-class model, no
[class] token; the head averages the last map.

A ``MobileAttention`` block runs a ``MultiQueryAttention2d`` on its NCHW map: one query per
pixel (``query``: a 1x1 convolution per head, after pooling where ``query_strides`` > 1), one
key and one value head shared by all query heads, both from a strided depthwise convolution of
the map (``key`` / ``value``, ``kv_stride``), softmax(q k^T * scale), the heads' outputs
concatenated (upsampled back where the queries were pooled) and projected (``output.proj``).
Every query row is explained over the keys it reads, on the grid of the keys; the output is
watched where it enters ``output``'s first module. The convolution blocks, the stem and the
head's convolutions are not blocks of the flow; nor is each attention block's optional
depthwise positional convolution (``conv_cpe_dw``).
"""

from typing import Dict, List, Tuple

import torch
from timm.layers.attention2d import MultiQueryAttention2d
from timm.models._efficientnet_blocks import MobileAttention
from timm.models.mobilenetv3 import MobileNetV3
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import (
    BlockLayout,
    BlockRecord,
    Hook,
    register_adapter,
    tokens_first,
    watch_first_input,
)
from .pooled import PooledAdapter, conv_block_stride, strided_grid

__all__ = ["TimmMobileNetV4HybridAdapter", "multi_query_attention_hooks"]


def multi_query_attention_hooks(
    attention: MultiQueryAttention2d, record: BlockRecord
) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``MultiQueryAttention2d``: the
    queries, the shared key and the shared value from ``query`` / ``key`` / ``value``, the
    value repeated for every head, the output watched where it enters ``output``."""
    heads = attention.num_heads
    call: Dict[str, Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            call[name] = tokens_first(output.detach())  # (B, N, channels)
        return hook

    def on_values(module: nn.Module, args: tuple, output: Tensor) -> None:
        queries = call.pop("query").unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, N, k)
        keys = call.pop("key").unsqueeze(1).expand(-1, heads, -1, -1)  # one head for all
        values = tokens_first(output.detach()).unsqueeze(1).expand(-1, heads, -1, -1)
        with torch.no_grad():
            row = class_attention_row(queries[:, :, 0], keys, attention.scale)
        record.set_attention(row, values, SoftmaxAttention(queries, keys, attention.scale))

    return [
        Hook(attention.query, "forward", keep("query")),
        Hook(attention.key, "forward", keep("key")),
        Hook(attention.value, "forward", on_values),
        Hook(attention.output[0], "pre", watch_first_input(record, tokens_first)),
    ]


@register_adapter
class TimmMobileNetV4HybridAdapter(PooledAdapter):
    """timm MobileNetV4 hybrids: every query row of every multi-query attention block, each on
    the grid of its keys; any image size."""

    family = "timm MobileNetV4 hybrid"
    examples = "mobilenetv4_hybrid_medium, mobilenetv4_hybrid_large (and _075)"
    layer_example = "model.blocks[s][i].attn"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for index, block in enumerate(self._attention_blocks()):
            if not isinstance(block.attn, MultiQueryAttention2d):
                raise TypeError(
                    f"MobileAttention block {index} runs a {type(block.attn).__name__}; the "
                    f"{self.family} adapter supports timm's MultiQueryAttention2d."
                )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, MobileNetV3) and any(
            isinstance(module, MobileAttention) for module in model.modules())

    def _attention_blocks(self) -> List[MobileAttention]:
        return [block for stage in self.model.blocks for block in stage
                if isinstance(block, MobileAttention)]

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for block in self._attention_blocks()]

    @property
    def in_channels(self) -> int:
        return self.model.conv_stem.in_channels

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = strided_grid(image_size, self.model.conv_stem.stride[0])
        layouts = []
        for stage in self.model.blocks:
            for block in stage:
                if isinstance(block, MobileAttention):  # keeps its map; its keys are strided
                    layouts.append(BlockLayout(strided_grid(grid, block.attn.kv_stride)))
                else:
                    grid = strided_grid(grid, conv_block_stride(block))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return multi_query_attention_hooks(attention, record)
