"""timm ``Levit`` and ``LevitDistilled`` (levit_128s ... levit_384_s8, and the levit_conv_*
models that run in NCHW): attention with learned attention biases and shrinking attention,
no [class] token, the head averages the last stage.

LeViT's ``Attention`` adds a learned bias per head and relative offset to its logits
(``attention_biases`` at ``attention_bias_idxs``) and reads values narrower or wider than its
keys; its projection starts with an activation, so the attention output is watched where it
enters ``proj`` (before the activation). ``AttentionDownsample`` (between stages) is
shrinking attention: its queries come from the subsampled grid, its keys and values from the
whole grid, so its map lies on the grid it reads. The attention biases are built for one
resolution: the model takes the image size it was built for. The convolution stem is not a
block of the flow. ``LevitDistilled`` averages two heads on the same pooled tokens.
"""

from typing import Dict, List, Optional, Tuple

import torch
from timm.models.levit import AttentionDownsample, Levit
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import (
    BlockLayout,
    BlockRecord,
    Hook,
    output_grid,
    register_adapter,
    tokens_first,
)
from .pooled import PooledAdapter

__all__ = ["TimmLevitAdapter", "levit_attention_hooks"]


def _by_heads(tokens: Tensor, heads: int, use_conv: bool) -> Tensor:
    """(B, N, H * w) or, NCHW, (B, H * w, h, w') -> (B, H, N, w), as LeViT splits its heads."""
    if use_conv:
        return tokens.flatten(2).unflatten(1, (heads, -1)).transpose(-2, -1)
    return tokens.unflatten(-1, (heads, -1)).transpose(1, 2)


def levit_attention_hooks(attention: nn.Module, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's LeViT ``Attention`` or
    ``AttentionDownsample``: q, k, v from ``qkv`` (or q from ``q`` and k, v from ``kv``), split
    per head into key and value widths as the module does, the logit bias its
    ``attention_biases`` at ``attention_bias_idxs``, the output watched where it enters
    ``proj``."""
    heads, key_dim, val_dim = attention.num_heads, attention.key_dim, attention.val_dim
    use_conv = attention.use_conv
    shrinking = isinstance(attention, AttentionDownsample)
    call: Dict[str, Tensor] = {}

    def on_query(module: nn.Module, args: tuple, queries: Tensor) -> None:
        call["queries"] = _by_heads(queries.detach(), heads, use_conv)

    def on_projected(module: nn.Module, args: tuple, projected: Tensor) -> None:
        parts = _by_heads(projected.detach(), heads, use_conv)
        if shrinking:  # the module projects the keys and values before the query
            call["keys"], call["values"] = parts.split([key_dim, val_dim], dim=-1)
        else:
            call["queries"], call["keys"], call["values"] = parts.split(
                [key_dim, key_dim, val_dim], dim=-1
            )

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        queries, keys, values = (call.pop(part) for part in ("queries", "keys", "values"))
        with torch.no_grad():
            bias = attention.get_attention_biases(queries.device).detach()
            row = class_attention_row(queries[:, :, 0], keys, attention.scale, bias[:, 0])
        record.set_attention(
            row, values, SoftmaxAttention(queries, keys, attention.scale, bias)
        )
        return (record.watch(args[0], tokens_first if use_conv else None),) + tuple(args[1:])

    hooks = [Hook(attention.q, "forward", on_query)] if shrinking else []
    projection = attention.kv if shrinking else attention.qkv
    return hooks + [
        Hook(projection, "forward", on_projected),
        Hook(attention.proj, "pre", on_pre_projection),
    ]


@register_adapter
class TimmLevitAdapter(PooledAdapter):
    """timm ``Levit`` / ``LevitDistilled`` (linear or NCHW convolutional layout): every query
    row of every attention and shrinking attention explained, each on the grid its keys lie
    on, at the image size the model was built for."""

    family = "timm LeViT"
    examples = "levit_128s, levit_128, levit_192, levit_256, levit_384, levit_conv_*"
    layer_example = "model.stages[s].blocks[i].attn"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, Levit)

    @property
    def in_channels(self) -> Optional[int]:
        return self.model.stem.conv1.linear.in_channels

    def attention_modules(self) -> List[nn.Module]:
        modules = []
        for stage in self.model.stages:
            if hasattr(stage.downsample, "attn_downsample"):
                modules.append(stage.downsample.attn_downsample)
            modules += [block.attn for block in stage.blocks]
        return modules

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = tuple(image_size)
        for module in self.model.stem.modules():
            if isinstance(module, nn.Conv2d):
                grid = output_grid(grid, module)
        first = self.attention_modules()[0]
        if grid != tuple(first.resolution):
            built = tuple(first.resolution)
            raise ValueError(
                f"This model's attention biases are built for a {built[0]}x{built[1]} grid, "
                f"but {image_size[0]}x{image_size[1]} images give a {grid[0]}x{grid[1]} grid. "
                f"Use the image size the model was built for (img_size, 224x224 for the "
                f"registered models)."
            )
        return [BlockLayout(tuple(module.resolution)) for module in self.attention_modules()]

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return levit_attention_hooks(attention, record)
