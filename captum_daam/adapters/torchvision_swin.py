"""torchvision ``SwinTransformer`` (swin_t, swin_s, swin_b; swin_v2_t, swin_v2_s, swin_v2_b):
windowed attention, no [class] token, the head averages the last stage.

torchvision's ``ShiftedWindowAttention`` (V1) and ``ShiftedWindowAttentionV2`` (cosine
attention with a per-head logit scale, continuous relative position bias, the key bias held at
zero) run the functional ``shifted_window_attention``, which calls no submodule: the adapter
forms the windows, q, k, v, the relative position bias and the shift mask again from the
module's own weights, without gradients, as that function does (pad to whole windows, then the
cyclic shift, dropped where the window covers the padded grid). The attention output before
the projection is reached through the module's output: the projection is linear and the
windows are a permutation of the grid's cells (padding cropped), so the gradient at a window
token before the projection is the gradient at its cell times ``proj.weight``. One grid per
stage (the stem's patch grid, halved, rounded up, by every ``PatchMerging``); the flow lies on
the finest. The patch embedding and patch merging are not blocks of the flow.
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import window_partition
from torch import Tensor, nn
from torchvision.models import swin_transformer as tv_swin

from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockLayout, BlockRecord, Hook, register_adapter
from .pooled import PooledAdapter
from .windows import shift_mask, window_positions

__all__ = ["TorchvisionSwinAdapter"]

_ATTENTIONS = (tv_swin.ShiftedWindowAttention, tv_swin.ShiftedWindowAttentionV2)


def effective_shift(
    attention: nn.Module, grid: Tuple[int, int]
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """The padded grid and the shift torchvision applies on ``grid``: none along an axis the
    window covers whole."""
    window = tuple(attention.window_size)
    padded = tuple(math.ceil(size / side) * side for size, side in zip(grid, window))
    shift = tuple(0 if side >= size else s for side, size, s in
                  zip(window, padded, attention.shift_size))
    return padded, shift


def shifted_window_hooks(attention: nn.Module, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of torchvision's ``ShiftedWindowAttention``
    or ``ShiftedWindowAttentionV2`` on (B, H, W, C) tokens."""
    heads = attention.num_heads
    window = tuple(attention.window_size)
    cosine = isinstance(attention, tv_swin.ShiftedWindowAttentionV2)
    call: Dict[str, object] = {}

    def on_call(module: nn.Module, args: tuple) -> None:
        tokens = args[0]
        batch, height, width, channels = tokens.shape
        padded, shift = effective_shift(attention, (height, width))
        with torch.no_grad():
            x = F.pad(tokens, (0, 0, 0, padded[1] - width, 0, padded[0] - height))
            if any(shift):
                x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
            windows = window_partition(x, window).flatten(1, 2)  # (B * W, N, C)
            bias = attention.qkv.bias
            if cosine and bias is not None:
                bias = bias.clone()
                bias[bias.numel() // 3 : 2 * bias.numel() // 3] = 0  # as torchvision does
            qkv = F.linear(windows, attention.qkv.weight, bias)
            queries, keys, values = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
            if cosine:
                logit_scale = torch.clamp(attention.logit_scale, max=math.log(100.0)).exp()
                queries = F.normalize(queries, dim=-1) * logit_scale
                keys, scale = F.normalize(keys, dim=-1), 1.0
            else:
                scale = (channels // heads) ** -0.5
            logit_bias = attention.get_relative_position_bias().detach()  # (1, H, N, N)
            if any(shift):
                mask = shift_mask(padded, window, shift, window_partition).to(logit_bias)
                logit_bias = (logit_bias + mask.unsqueeze(1)).repeat(batch, 1, 1, 1)
            row = class_attention_row(queries[:, :, 0], keys, scale, logit_bias[..., 0, :])
        positions = window_positions((height, width), window, shift, window_partition, True)
        call["positions"] = positions.to(tokens.device)

        record.set_attention(row, values, SoftmaxAttention(queries, keys, scale, logit_bias))

    def to_pre_projection(gradient: Tensor, positions: Tensor) -> Tensor:
        # (B, H, W, C) at the output -> (B * W, N, C) before the projection, padding zero.
        cells = gradient.flatten(1, 2)[:, positions.clamp(min=0)]  # (B, W, N, C)
        cells = cells * (positions >= 0).unsqueeze(-1).to(cells.dtype)
        return cells.flatten(0, 1) @ attention.proj.weight.detach().to(cells.dtype)

    def on_output(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        positions = call.pop("positions")
        return record.watch(output, lambda gradient: to_pre_projection(gradient, positions))

    return [Hook(attention, "pre", on_call), Hook(attention, "forward", on_output)]


@register_adapter
class TorchvisionSwinAdapter(PooledAdapter):
    """torchvision ``SwinTransformer`` (V1 and V2 blocks): every query row of every window
    explained, each stage on its own grid, any image size."""

    family = "torchvision Swin Transformer"
    examples = "swin_t, swin_s, swin_b, swin_v2_t, swin_v2_s, swin_v2_b"
    layer_example = "model.features[1][i].attn"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for index, block in enumerate(self._blocks()):
            if not isinstance(getattr(block, "attn", None), _ATTENTIONS):
                raise TypeError(
                    f"Block {index} of this {type(model).__name__} ({type(block).__name__}) "
                    f"has no ShiftedWindowAttention as .attn; the {self.family} adapter "
                    f"supports torchvision's SwinTransformerBlock and SwinTransformerBlockV2. "
                    f"Write an adapter for this block type."
                )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, tv_swin.SwinTransformer)

    def _stages(self) -> List[nn.Sequential]:
        """The stages of blocks in ``model.features`` (the patch embedding and the patch
        merging layers between them left out)."""
        return [stage for stage in self.model.features[1:]
                if not isinstance(stage, (tv_swin.PatchMerging, tv_swin.PatchMergingV2))]

    def _blocks(self) -> List[nn.Module]:
        return [block for stage in self._stages() for block in stage]

    @property
    def in_channels(self) -> Optional[int]:
        return self.model.features[0][0].in_channels

    @property
    def num_outputs(self) -> Optional[int]:
        return self.model.head.out_features

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for block in self._blocks()]

    def stage_grids(self, image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """The token grid of every stage: the patch embedding's, halved (rounded up) by each
        patch merging."""
        embedding = self.model.features[0][0]
        height, width = image_size
        grid = (height // embedding.stride[0], width // embedding.stride[1])
        if min(grid) < 1:
            raise ValueError(
                f"Expected images of at least one {embedding.stride[0]}x{embedding.stride[1]} "
                f"patch, got {height}x{width}. Use larger images."
            )
        grids = []
        for layer in self.model.features[1:]:
            if isinstance(layer, (tv_swin.PatchMerging, tv_swin.PatchMergingV2)):
                grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
            else:
                grids.append(grid)
        return grids

    @property
    def outputs_features(self) -> bool:
        return False

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        layouts = []
        for stage, grid in zip(self._stages(), self.stage_grids(image_size)):
            for block in stage:
                _, shift = effective_shift(block.attn, grid)
                positions = window_positions(
                    grid, tuple(block.attn.window_size), shift, window_partition, pad_first=True
                )
                layouts.append(BlockLayout(grid, 0, positions))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return shifted_window_hooks(attention, record)
