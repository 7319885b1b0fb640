"""timm ``GlobalContextVit`` (gcvit_*): local window attention alternating with global-query
window attention, after a convolution stem; no [class] token, the head averages the last stage.

Every block partitions its stage grid into windows (Swin's partition, no shift, no padding)
and runs ``WindowAttentionGlobal`` on the B * W windows, with a relative position bias in the
logits. In a local block the window's own tokens give q, k and v; in a global block
(``use_global``) ``qkv`` gives only keys and values, and the queries are the stage's global
query tokens (its ``global_block``, a convolution pooling of the whole grid, one window's worth
per image), the same for every window of an image. Either way the output is linear in the
window's values once the attention is held fixed, so every query row is split over the window
tokens it reads; each window's map is laid on the stage grid
(:func:`~captum_daam.adapters.windows.window_positions`). The stem, the downsamplings and the
global-query generator are convolutions, not blocks of the flow.
"""

from typing import Dict, List, Optional, Tuple

from timm.models import gcvit
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
from .windows import window_positions

__all__ = ["TimmGcVitAdapter", "global_window_attention_hooks"]


def global_window_attention_hooks(attention: nn.Module, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``WindowAttentionGlobal`` on
    (B * W, N, C) windows: keys and values (and, in a local block, queries) from ``qkv``; in a
    global block the call's ``q_global`` (B, ..., C), repeated for every window of its image as
    the module repeats it; the relative position bias from ``rel_pos.get_bias()``; the output
    watched where it enters ``proj``."""
    heads = attention.num_heads
    call: Dict[str, Optional[Tensor]] = {}

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call["q_global"] = kwargs.get("q_global", args[1] if len(args) > 1 else None)

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        q_global = call.pop("q_global")
        batch, count, _ = qkv.shape
        if attention.use_global and q_global is not None:
            keys, values = qkv.detach().reshape(batch, count, 2, heads, -1).permute(2, 0, 3, 1, 4)
            queries = q_global.detach().repeat_interleave(batch // q_global.shape[0], dim=0)
            queries = queries.reshape(batch, count, heads, -1).transpose(1, 2)
        else:
            queries, keys, values = qkv.detach().reshape(batch, count, 3, heads, -1).permute(
                2, 0, 3, 1, 4)
        bias, scale = attention.rel_pos.get_bias().detach(), attention.scale
        row = class_attention_row(queries[:, :, 0], keys, scale, bias[..., 0, :])
        record.set_attention(
            row, values, SoftmaxAttention(queries, keys, scale, bias)
        )

    return [
        Hook(attention, "pre_kwargs", on_call),
        Hook(attention.qkv, "forward", on_qkv),
        Hook(attention.proj, "pre", watch_first_input(record)),
    ]


@register_adapter
class TimmGcVitAdapter(PooledAdapter):
    """timm ``GlobalContextVit``: local and global-query window attention; every query row of
    every window explained, each stage on its own grid."""

    family = "timm GCViT"
    examples = "gcvit_xxtiny, gcvit_xtiny, gcvit_tiny, gcvit_small, gcvit_base"
    layer_example = "model.stages[s].blocks[i].attn"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, gcvit.GlobalContextVit)

    @property
    def in_channels(self) -> int:
        return self.model.stem.conv1.in_channels

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for stage in self.model.stages for block in stage.blocks]

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        stem = self.model.stem
        grid = output_grid(output_grid(image_size, stem.conv1), stem.down.reduction)
        layouts = []
        for index, stage in enumerate(self.model.stages):
            if not isinstance(stage.downsample, nn.Identity):
                grid = output_grid(grid, stage.downsample.reduction)
            for block in stage.blocks:
                window = tuple(block.window_size)
                if grid[0] % window[0] or grid[1] % window[1]:
                    raise ValueError(
                        f"Stage {index} of this GlobalContextVit attends in {window[0]}x"
                        f"{window[1]} windows with a relative position bias of that size, which "
                        f"must divide its grid; {image_size[0]}x{image_size[1]} images give "
                        f"{grid[0]}x{grid[1]}. Use the size the model was built for (its "
                        f"img_size)."
                    )
                positions = window_positions(grid, window, (0, 0), gcvit.window_partition)
                layouts.append(BlockLayout(grid, 0, positions))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return global_window_attention_hooks(attention, record)
