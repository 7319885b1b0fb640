"""timm ``Nest`` (nest_*): attention within the image blocks of each level, the levels joined by
convolution and pooling; no [class] token, the head averages the last level.

Every level cuts its grid into square image blocks (``blockify``, Swin's window partition)
and its ``Attention`` runs on (B, T blocks, N tokens, C): q, k, v from ``qkv``, softmax(q k^T *
scale), no position bias in the logits. Its heads are merged channel-major: before ``proj``
channel e * H + h holds head h's channel e, which the adapter takes back to the usual h * d + e
when it reads the gradient. Each block's token map is laid on the level grid
(:func:`~captum_daam.adapters.windows.window_positions`); one grid per level, the flow on the
finest. The patch embedding and the convolution-and-pooling between levels are not blocks of
the flow; the position embeddings fix the image size to the model's ``img_size``.
"""

import math
from typing import List, Tuple

from timm.models.nest import Attention as NestAttention
from timm.models.nest import Nest
from timm.models.swin_transformer import window_partition
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockLayout, BlockRecord, Hook, register_adapter
from .pooled import PooledAdapter, patch_grid
from .windows import window_positions

__all__ = ["TimmNestAdapter", "nest_attention_hooks"]


def nest_attention_hooks(attention: NestAttention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's Nest ``Attention`` on (B, T, N, C):
    the T image blocks of each image as B * T windows; the output watched where it enters
    ``proj``, its channels taken from (d, H) to (H, d) order."""
    heads = attention.num_heads

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        # (B, T, N, 3 C) -> (3, B * T, H, N, d), as the module's reshape and permute.
        queries, keys, values = qkv.detach().flatten(0, 1).unflatten(-1, (3, heads, -1)).permute(
            2, 0, 3, 1, 4)
        row = class_attention_row(queries[:, :, 0], keys, attention.scale)
        record.set_attention(
            row, values, SoftmaxAttention(queries, keys, attention.scale)
        )

    def heads_first(gradient: Tensor) -> Tensor:  # (..., d * H) -> (..., H * d)
        return gradient.unflatten(-1, (-1, heads)).transpose(-1, -2).flatten(-2)

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        output = args[0]  # (B, T, N, C)
        watched = record.watch(output.flatten(0, 1), heads_first)
        return (watched.reshape(output.shape),) + tuple(args[1:])

    return [
        Hook(attention.qkv, "forward", on_qkv),
        Hook(attention.proj, "pre", on_pre_projection),
    ]


@register_adapter
class TimmNestAdapter(PooledAdapter):
    """timm ``Nest``: the attention of every level's transformer layers, every query row of
    every image block explained, each level on its own grid; images of the model's
    ``img_size``."""

    family = "timm NesT"
    examples = "nest_tiny, nest_small, nest_base, nest_*_jx"
    layer_example = "model.levels[l].transformer_encoder[i].attn"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, Nest)

    @property
    def in_channels(self) -> int:
        return self.model.patch_embed.proj.in_channels

    def attention_modules(self) -> List[nn.Module]:
        return [layer.attn for level in self.model.levels for layer in level.transformer_encoder]

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = patch_grid(self.model.patch_embed, image_size)
        layouts = []
        for index, level in enumerate(self.model.levels):
            if not isinstance(level.pool, nn.Identity):
                grid = tuple((size + 1) // 2 for size in grid)  # 'same'-padded, stride 2
            blocks, tokens = level.pos_embed.shape[1:3]
            side = math.isqrt(blocks) * math.isqrt(tokens)
            if grid != (side, side):
                raise ValueError(
                    f"Level {index} of this Nest takes a {side}x{side} grid (its position "
                    f"embedding), but {image_size[0]}x{image_size[1]} images give "
                    f"{grid[0]}x{grid[1]}. Use the model's img_size."
                )
            positions = window_positions(grid, (level.block_size,) * 2, (0, 0), window_partition)
            layouts += [BlockLayout(grid, 0, positions) for _ in level.transformer_encoder]
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return nest_attention_hooks(attention, record)
