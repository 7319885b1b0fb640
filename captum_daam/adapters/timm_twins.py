"""timm ``Twins`` (twins_pcpvt_*, twins_svt_*): attention over reduced keys and values and
locally grouped (windowed) attention, no [class] token, the head averages the last stage.

``GlobalSubSampleAttn`` lets every token attend to keys and values the block reduces with a
strided convolution and a LayerNorm (``sr_ratio``), as PVTv2 does: its map lies on the reduced
key grid. ``LocallyGroupedAttn`` (Twins-SVT's even blocks) pads the grid at the bottom and
right to whole windows and attends within each window; it merges the windows back and crops
the padding before its output projection, so the gradient at each window token before the
projection is the gradient at its cell (zero for padding). Each window's map is laid back on
the grid (:func:`~captum_daam.adapters.windows.window_positions`). The patch embeddings and the
positional convolution (PEG) are convolutions, not blocks of the flow.
"""

from typing import Dict, List, Tuple

from timm.models.swin_transformer import window_partition
from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn, Twins
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockLayout, BlockRecord, Hook, output_grid, register_adapter
from .pooled import PooledAdapter
from .timm_pvt_v2 import pvt_attention_hooks
from .windows import window_positions

__all__ = ["TimmTwinsAdapter", "grouped_attention_hooks"]


def grouped_attention_hooks(attention: LocallyGroupedAttn, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``LocallyGroupedAttn`` on (B, N, C)
    tokens of an (h, w) grid: q, k, v of every window from ``qkv``, the output watched where
    it enters ``proj`` (back on the grid, padding cropped) and its gradient taken to the
    window tokens."""
    heads, side = attention.num_heads, attention.ws
    call: Dict[str, object] = {}

    def on_call(module: nn.Module, args: tuple) -> None:
        size = tuple(args[1])
        call["positions"] = window_positions(size, (side, side), (0, 0), window_partition)

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        # (B, h', w', ws, ws, 3 * H * d) -> (3, B * W, H, N, d), windows row by row.
        parts = qkv.detach().flatten(1, 2).flatten(2, 3).unflatten(-1, (3, heads, -1))
        queries, keys, values = parts.permute(3, 0, 1, 4, 2, 5).flatten(1, 2)
        row = class_attention_row(queries[:, :, 0], keys, attention.scale)
        record.set_attention(
            row, values, SoftmaxAttention(queries, keys, attention.scale)
        )

    def to_window_tokens(gradient: Tensor, positions: Tensor) -> Tensor:
        # (B, N, C) on the grid -> (B * W, N_window, C), padding zero.
        positions = positions.to(gradient.device)
        tokens = gradient[:, positions.clamp(min=0)]  # (B, W, N_window, C)
        tokens = tokens * (positions >= 0).unsqueeze(-1).to(tokens.dtype)
        return tokens.flatten(0, 1)

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        positions = call.pop("positions")
        watched = record.watch(args[0], lambda gradient: to_window_tokens(gradient, positions))
        return (watched,) + tuple(args[1:])

    return [
        Hook(attention, "pre", on_call),
        Hook(attention.qkv, "forward", on_qkv),
        Hook(attention.proj, "pre", on_pre_projection),
    ]


@register_adapter
class TimmTwinsAdapter(PooledAdapter):
    """timm ``Twins`` with ``GlobalSubSampleAttn`` and ``LocallyGroupedAttn`` blocks: every
    query row explained (within its window for the grouped blocks), each block on its key
    grid, any image size."""

    family = "timm Twins (PCPVT, SVT)"
    examples = "twins_pcpvt_small, twins_pcpvt_base, twins_pcpvt_large, twins_svt_*"
    layer_example = "model.blocks[s][i].attn"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for stage_index, stage in enumerate(model.blocks):
            for block_index, block in enumerate(stage):
                attention = getattr(block, "attn", None)
                if not isinstance(attention, (GlobalSubSampleAttn, LocallyGroupedAttn)):
                    raise TypeError(
                        f"Block {block_index} of {type(model).__name__}.blocks[{stage_index}] "
                        f"uses {type(attention).__name__}; the {self.family} adapter supports "
                        f"timm's GlobalSubSampleAttn and LocallyGroupedAttn. Write an adapter "
                        f"for this attention type."
                    )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, Twins)

    @property
    def in_channels(self) -> int:
        return self.model.patch_embeds[0].proj.in_channels

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for stage in self.model.blocks for block in stage]

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = image_size
        layouts = []
        for embedding, stage in zip(self.model.patch_embeds, self.model.blocks):
            grid = output_grid(grid, embedding.proj)
            if min(grid) < 1:
                raise ValueError(
                    f"Expected images large enough for every stage's patch embedding, got "
                    f"{image_size[0]}x{image_size[1]}. Use larger images."
                )
            for block in stage:
                attention = block.attn
                if isinstance(attention, LocallyGroupedAttn):
                    window = (attention.ws, attention.ws)
                    positions = window_positions(grid, window, (0, 0), window_partition)
                    layouts.append(BlockLayout(grid, 0, positions))
                elif attention.sr is not None:
                    layouts.append(BlockLayout(output_grid(grid, attention.sr)))
                else:
                    layouts.append(BlockLayout(grid))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        if isinstance(attention, LocallyGroupedAttn):
            return grouped_attention_hooks(attention, record)
        return pvt_attention_hooks(attention, record)
