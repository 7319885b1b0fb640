"""timm ``SwinTransformer`` (Swin V1: swin_*), ``SwinTransformerV2`` (swinv2_*) and
``SwinTransformerV2Cr`` (swinv2_cr_*): windowed attention, no [class] token, the head averages
the last stage.

Every block attends within windows: it shifts its token grid cyclically (every other block),
pads it at the bottom and right to whole windows and runs ``WindowAttention`` on a batch of
B * W windows. The logits hold the relative position bias (V1: a learned table; V2: a
continuous bias from an MLP, 16 * sigmoid(.); V2-Cr: a bias from an MLP of log coordinates)
and, in shifted blocks, the mask that keeps regions apart; V2's and V2-Cr's attention is cosine
attention with a learned per-head scale. Each window's
token map is laid back on the stage's grid with the shift and padding undone
(:func:`~captum_daam.adapters.windows.window_positions`, which runs timm's own
``window_partition`` on a grid of cell indices). One grid per stage (the stem's patch grid,
halved by every ``PatchMerging``); the flow lies on the finest, the first stage's, by
area-weighted resampling. Every query row is explained (no [class] token). The patch embedding
and the patch merging layers are not blocks of the flow.
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.models import swin_transformer as swin_v1
from timm.models import swin_transformer_v2 as swin_v2
from timm.models import swin_transformer_v2_cr as swin_v2_cr
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockLayout, BlockRecord, Hook, register_adapter
from .pooled import PooledAdapter, patch_grid
from .windows import window_positions

__all__ = ["TimmSwinAdapter", "window_attention_hooks"]

_BLOCKS = (
    swin_v1.SwinTransformerBlock, swin_v2.SwinTransformerV2Block,
    swin_v2_cr.SwinTransformerV2CrBlock,
)
_ATTENTIONS = (
    swin_v1.WindowAttention, swin_v2.WindowAttention, swin_v2_cr.WindowMultiHeadAttention
)
#: Each family's module, for its own window partition.
_MODULE_OF_BLOCK = {
    swin_v1.SwinTransformerBlock: swin_v1,
    swin_v2.SwinTransformerV2Block: swin_v2,
    swin_v2_cr.SwinTransformerV2CrBlock: swin_v2_cr,
}


def _window_bias(
    relative_bias: Tensor, mask: Optional[Tensor], batch_windows: int
) -> Tensor:
    """The logit bias (B * W, H, N, N) of a window attention: its relative position bias
    (1, H, N, N) plus, in a shifted block, the mask (W, N, N) of each window, laid out as the
    module adds them (windows of one image consecutive)."""
    if mask is None:
        return relative_bias
    windows = mask.shape[0]
    per_window = relative_bias + mask.unsqueeze(1).to(relative_bias.dtype)  # (W, H, N, N)
    return per_window.repeat(batch_windows // windows, 1, 1, 1)


def _v2_relative_bias(attention: swin_v2.WindowAttention) -> Tensor:
    """SwinV2's continuous relative position bias, 16 * sigmoid(MLP(log coordinates)), as
    its forward forms it, (1, H, N, N)."""
    table = attention.cpb_mlp(attention.relative_coords_table).view(-1, attention.num_heads)
    area = attention.window_size[0] * attention.window_size[1]
    bias = table[attention.relative_position_index.view(-1)].view(area, area, -1)
    return (16 * torch.sigmoid(bias.permute(2, 0, 1))).unsqueeze(0)


def window_attention_hooks(attention: nn.Module, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's Swin V1 or V2 ``WindowAttention``
    or V2-Cr ``WindowMultiHeadAttention`` on B * W windows.

    The query, keys and values come from the module's qkv projection: V1's and V2-Cr's
    ``qkv`` output; V2's, recomputed from the call's input with its q / v biases as its
    forward does (it calls ``F.linear`` on ``qkv.weight``). V2's and V2-Cr's cosine attention
    is formed from the normalised query, scaled per head by the clamped ``logit_scale``, and
    the normalised keys. The logit bias is the relative position bias plus the call's
    ``mask``. The head-concatenated output is watched where it enters ``proj``.
    """
    heads = attention.num_heads
    recomputed = isinstance(attention, swin_v2.WindowAttention)  # its qkv module is not called
    cosine = recomputed or isinstance(attention, swin_v2_cr.WindowMultiHeadAttention)
    call: Dict[str, object] = {}

    def split(qkv: Tensor) -> None:
        # (B_, N, 3 * H * d) -> (3, B_, H, N, d), as the module's reshape(B_, N, 3, H, d).permute.
        queries, keys, values = qkv.detach().unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
        call.update(queries=queries, keys=keys, values=values)

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call["mask"] = kwargs.get("mask", args[1] if len(args) > 1 else None)
        if recomputed:
            with torch.no_grad():
                tokens = args[0]
                if attention.q_bias is None:
                    qkv = attention.qkv(tokens)
                else:
                    bias = torch.cat((attention.q_bias, attention.k_bias, attention.v_bias))
                    if attention.qkv_bias_separate:
                        qkv = attention.qkv(tokens) + bias
                    else:
                        qkv = F.linear(tokens, weight=attention.qkv.weight, bias=bias)
                split(qkv)

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        split(qkv)

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        queries, keys, values = (call.pop(part) for part in ("queries", "keys", "values"))
        mask = call.pop("mask")
        with torch.no_grad():
            if cosine:
                logit_scale = attention.logit_scale.reshape(heads, 1, 1)
                logit_scale = torch.clamp(logit_scale, max=math.log(1.0 / 0.01)).exp()
                queries = F.normalize(queries, dim=-1) * logit_scale
                keys = F.normalize(keys, dim=-1)
                relative_bias, scale = (
                    _v2_relative_bias(attention) if recomputed
                    else attention._relative_positional_encodings()
                ), 1.0
            else:
                relative_bias, scale = attention._get_rel_pos_bias(), attention.scale
            bias = _window_bias(relative_bias.detach(), mask, queries.shape[0])
            row = class_attention_row(queries[:, :, 0], keys, scale, bias[..., 0, :])

        record.set_attention(row, values, SoftmaxAttention(queries, keys, scale, bias))
        return (record.watch(args[0]),) + tuple(args[1:])

    hooks = [Hook(attention, "pre_kwargs", on_call)]
    if not recomputed:
        hooks.append(Hook(attention.qkv, "forward", on_qkv))
    return hooks + [Hook(attention.proj, "pre", on_pre_projection)]


@register_adapter
class TimmSwinAdapter(PooledAdapter):
    """timm ``SwinTransformer``, ``SwinTransformerV2`` and ``SwinTransformerV2Cr`` with their
    window attention in every block: shifted and unshifted windows, padding to whole windows,
    fixed (``strict_img_size``) or any image size; every query row of every window explained,
    each stage on its own grid."""

    family = "timm Swin Transformer (V1, V2, V2-Cr)"
    examples = "swin_*, swinv2_*, swinv2_cr_*"
    layer_example = "model.layers[s].blocks[i].attn"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for stage_index, stage in enumerate(self._stages()):
            for block_index, block in enumerate(stage.blocks):
                attention = getattr(block, "attn", None)
                if not isinstance(block, _BLOCKS) or not isinstance(attention, _ATTENTIONS):
                    raise TypeError(
                        f"Block {block_index} of {type(model).__name__} stage {stage_index} "
                        f"is a {type(block).__name__} with {type(attention).__name__}; the "
                        f"{self.family} adapter supports timm's SwinTransformerBlock, "
                        f"SwinTransformerV2Block and SwinTransformerV2CrBlock with their window "
                        f"attention. Write an adapter for this block type."
                    )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(
            model,
            (swin_v1.SwinTransformer, swin_v2.SwinTransformerV2, swin_v2_cr.SwinTransformerV2Cr),
        )

    def _stages(self) -> List[nn.Module]:
        """The stages in order (``layers`` in V1 and V2, ``stages`` in V2-Cr)."""
        return list(getattr(self.model, "layers", None) or self.model.stages)

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for stage in self._stages() for block in stage.blocks]

    def stage_grids(self, image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """The token grid of every stage for images of ``image_size``: the patch grid, halved
        (rounded up) by each stage that starts with patch merging.

        Raises:
            ValueError: when the model cannot take images of that size.
        """
        grid = patch_grid(self.model.patch_embed, image_size)
        grids = []
        for stage in self._stages():
            if not isinstance(stage.downsample, nn.Identity):
                grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
            grids.append(grid)
        return grids

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        layouts = []
        for stage, grid in zip(self._stages(), self.stage_grids(image_size)):
            for block in stage.blocks:
                module = _MODULE_OF_BLOCK[type(block)]
                positions = window_positions(
                    grid, tuple(block.window_size), tuple(block.shift_size),
                    module.window_partition,
                )
                layouts.append(BlockLayout(grid, 0, positions))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return window_attention_hooks(attention, record)
