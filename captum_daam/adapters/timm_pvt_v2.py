"""timm ``PyramidVisionTransformerV2`` (pvt_v2_b0 ... pvt_v2_b5, pvt_v2_b2_li): attention over
reduced keys and values, no [class] token, the head averages the last stage.

Every query token attends to keys and values that the block first reduces over the token
grid: a strided convolution (``sr``, kernel and stride ``sr_ratio``) and a LayerNorm, or, for
the linear variant (``linear_attn``, pvt_v2_b2_li), an adaptive average pooling to 7x7, a 1x1
convolution, a LayerNorm and a GELU; with ``sr_ratio`` 1, the tokens themselves. Each block's
map therefore lies on its key / value grid, as MViTv2's pooled keys do, and is brought to the
finest grid by area-weighted resampling. The overlapping patch embeddings (the stem and each
stage's downsampling) are convolutions, not blocks of the flow.
"""

from typing import Dict, List, Tuple

from timm.layers import to_2tuple
from timm.models.pvt_v2 import Attention as PvtAttention
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import (
    BlockLayout,
    BlockRecord,
    Hook,
    output_grid,
    register_adapter,
    watch_first_input,
)
from .pooled import PooledAdapter

__all__ = ["TimmPvtV2Adapter", "pvt_attention_hooks"]


def pvt_attention_hooks(attention: PvtAttention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's PVTv2 ``Attention``: the queries from
    ``q``, the (reduced) keys and values from ``kv``, the head-concatenated output watched
    where it enters ``proj``."""
    heads = attention.num_heads
    call: Dict[str, Tensor] = {}

    def on_query(module: nn.Module, args: tuple, queries: Tensor) -> None:
        call["queries"] = queries.detach().unflatten(-1, (heads, -1)).transpose(1, 2)

    def on_keys_values(module: nn.Module, args: tuple, kv: Tensor) -> None:
        # (B, Nk, 2 * H * d) -> (2, B, H, Nk, d), as the module's reshape(B, -1, 2, H, d).permute.
        keys, values = kv.detach().unflatten(-1, (2, heads, -1)).permute(2, 0, 3, 1, 4)
        queries = call.pop("queries")
        row = class_attention_row(queries[:, :, 0], keys, attention.scale)
        record.set_attention(
            row, values, SoftmaxAttention(queries, keys, attention.scale)
        )

    return [
        Hook(attention.q, "forward", on_query),
        Hook(attention.kv, "forward", on_keys_values),
        Hook(attention.proj, "pre", watch_first_input(record)),
    ]


@register_adapter
class TimmPvtV2Adapter(PooledAdapter):
    """timm ``PyramidVisionTransformerV2`` with its ``Attention`` in every block (spatial
    reduction or linear attention): every query row explained, each block on its key / value
    grid, any image size."""

    family = "timm PVTv2"
    examples = "pvt_v2_b0, pvt_v2_b1, pvt_v2_b2, pvt_v2_b2_li, pvt_v2_b3, pvt_v2_b4, pvt_v2_b5"
    layer_example = "model.stages[s].blocks[i].attn"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, PyramidVisionTransformerV2)

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for stage in self.model.stages for block in stage.blocks]

    def key_grids(self, image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """The key / value grid of every block, in block order, for images of
        ``image_size``: what its queries read."""
        grid = output_grid(image_size, self.model.patch_embed.proj)
        grids = []
        for stage in self.model.stages:
            if stage.downsample is not None:
                grid = output_grid(grid, stage.downsample.proj)
            if min(grid) < 1:
                raise ValueError(
                    f"Expected images large enough for every stage's patch embedding, got "
                    f"{image_size[0]}x{image_size[1]}. Use larger images."
                )
            for block in stage.blocks:
                attention = block.attn
                if attention.pool is not None:
                    grids.append(tuple(to_2tuple(attention.pool.output_size)))
                elif attention.sr is not None:
                    grids.append(output_grid(grid, attention.sr))
                else:
                    grids.append(grid)
        return grids

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        return [BlockLayout(grid) for grid in self.key_grids(image_size)]

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return pvt_attention_hooks(attention, record)
