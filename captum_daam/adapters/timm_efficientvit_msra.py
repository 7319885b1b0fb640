"""timm ``EfficientVitMsra`` (efficientvit_m0 ... m5): cascaded group attention in local
windows, between depthwise convolutions and feed-forward layers; no [class] token, the head
averages the last stage.

Every block's ``LocalWindowAttention`` pads its (B, C, H, W) grid at the bottom and right to
whole windows (none when the grid is one window), partitions it as Swin does and runs
``CascadedGroupAttention`` on the B * W windows. Its heads run one after another: head h reads
its channel chunk of the input plus head h - 1's output, makes q, k and v with its own 1x1
convolution (``qkvs[h]``), passes q through a depthwise convolution (``dws[h]``) and attends
with a learned bias per offset (``attention_biases``, LeViT's). Each head's output is linear in
its own values once its attention is held fixed, so every query row of every head is split
over the window tokens its values sit on; the heads' outputs are watched where they enter
``proj`` (a ReLU, then a 1x1 convolution). Each window's map is laid on the stage grid
(:func:`~captum_daam.adapters.windows.window_positions`); one grid per stage, the flow on the
finest. The patch embedding, the downsamplings, the depthwise convolutions and feed-forward
layers are not blocks of the flow.
"""

from typing import Dict, List, Tuple

import torch
from timm.models import efficientvit_msra as msra
from timm.models.swin_transformer import window_partition
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockLayout, BlockRecord, Hook, output_grid, register_adapter
from .pooled import PooledAdapter
from .windows import window_positions

__all__ = ["TimmEfficientVitMsraAdapter", "cascaded_group_attention_hooks"]


def cascaded_group_attention_hooks(attention: nn.Module, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``CascadedGroupAttention`` on
    (B', C, h, w) windows: each head's k and v from its ``qkvs[h]``, its q after ``dws[h]``,
    the attention biases in the logits; the concatenated head outputs watched, as (B', N, C)
    rows, where they enter ``proj``."""
    heads, key, value = attention.num_heads, attention.key_dim, attention.val_dim
    parts: Dict[str, List[Tensor]] = {"queries": [], "keys": [], "values": []}

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        _, keys, values = qkv.detach().flatten(2).split([key, key, value], dim=1)
        parts["keys"].append(keys.transpose(1, 2))  # (B', N, kd)
        parts["values"].append(values.transpose(1, 2))  # (B', N, vd)

    def on_query(module: nn.Module, args: tuple, queries: Tensor) -> None:
        parts["queries"].append(queries.detach().flatten(2).transpose(1, 2))
        if len(parts["queries"]) == heads:  # the last head: the call's attention is known
            queries, keys, values = (torch.stack(parts.pop(name), dim=1)
                                     for name in ("queries", "keys", "values"))
            parts.update(queries=[], keys=[], values=[])
            bias = attention.get_attention_biases(queries.device).detach()
            scale = attention.scale
            row = class_attention_row(queries[:, :, 0], keys, scale, bias[:, 0])
            record.set_attention(
                row, values,
                SoftmaxAttention(queries, keys, scale, bias.unsqueeze(0)),
            )

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        output = args[0]  # (B', H * vd, h, w)
        watched = record.watch(output.flatten(2).transpose(1, 2))
        return (watched.transpose(1, 2).reshape(output.shape),) + tuple(args[1:])

    hooks = [Hook(conv, "forward", on_qkv) for conv in attention.qkvs]
    hooks += [Hook(conv, "forward", on_query) for conv in attention.dws]
    return hooks + [Hook(attention.proj, "pre", on_pre_projection)]


@register_adapter
class TimmEfficientVitMsraAdapter(PooledAdapter):
    """timm ``EfficientVitMsra``: the cascaded group attention of every block, every query row
    of every head and window explained, each stage on its own grid."""

    family = "timm EfficientViT (MSRA)"
    examples = "efficientvit_m0 ... efficientvit_m5"
    layer_example = "model.stages[s].blocks[i].mixer.m.attn"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, msra.EfficientVitMsra)

    @property
    def in_channels(self) -> int:
        return self.model.patch_embed.conv1.conv.in_channels

    def attention_modules(self) -> List[nn.Module]:
        return [block.mixer.m.attn for stage in self.model.stages for block in stage.blocks]

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = image_size
        layouts = []
        for part in [self.model.patch_embed] + [stage for stage in self.model.stages]:
            downsampling = part if part is self.model.patch_embed else part.downsample
            for conv in downsampling.modules():  # in forward order; the 1x1 and same-padded
                if isinstance(conv, nn.Conv2d) and conv.stride != (1, 1):  # ones keep the grid
                    grid = output_grid(grid, conv)
            for block in getattr(part, "blocks", []):
                side = block.mixer.m.attn.resolution
                positions = window_positions(grid, (side, side), (0, 0), window_partition)
                layouts.append(BlockLayout(grid, 0, positions))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return cascaded_group_attention_hooks(attention, record)
