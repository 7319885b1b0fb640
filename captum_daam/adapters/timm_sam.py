"""timm ``VisionTransformerSAM`` (Segment Anything's image encoder, ViTDet-style:
samvit_base_patch16, samvit_large_patch16, samvit_huge_patch16, samvit_base_patch16_224):
windowed and global attention blocks, no [class] token, the head averages the neck's output.

Most blocks attend within windows: the block pads its token grid at the bottom and right to
whole windows (no shift) and runs ``Attention`` on a batch of B * W windows; the blocks in
``global_attn_indexes`` attend over the whole grid. The logits hold the decomposed relative
position bias (timm's ``get_decomposed_rel_pos_bias``, from the query, per axis) or, with
``use_rope``, the rotary embedding of the window or the whole grid. Each window's token map is
laid back on the grid, the padding dropped
(:func:`~captum_daam.adapters.windows.window_positions`). One grid for every block. The
convolution neck is not a block of the flow.
"""

from typing import Dict, List, Tuple

import torch
from timm.layers import apply_rot_embed_cat
from timm.models.swin_transformer import window_partition
from timm.models.vision_transformer_sam import Attention as SamAttention
from timm.models.vision_transformer_sam import VisionTransformerSAM, get_decomposed_rel_pos_bias
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockLayout, BlockRecord, Hook, register_adapter
from .pooled import PooledAdapter, patch_grid
from .windows import window_positions

__all__ = ["TimmSamAdapter", "sam_attention_hooks"]


def sam_attention_hooks(attention: SamAttention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's SAM ``Attention`` on (B', h, w, C)
    tokens (B' = B * W windows, or B for a global block).

    The values are read from ``qkv``, the query and keys after ``q_norm`` / ``k_norm``
    (identities unless qk_norm), in the module's (B' * H, N, d) layout; the logit bias is the
    decomposed relative position bias the module forms from that query, or the rotary
    embedding is applied to query and keys as the module does. The head-concatenated output
    is watched where it enters ``proj``.
    """
    heads = attention.num_heads
    call: Dict[str, object] = {}

    def on_call(module: nn.Module, args: tuple) -> None:
        call["size"] = tuple(args[0].shape[1:3])

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        # (B', N, 3 * H * d) -> values (B', H, N, d), as the module's view(B', N, 3, H, d).
        call["values"] = qkv.detach().unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)[2]

    def on_query(module: nn.Module, args: tuple, queries: Tensor) -> None:
        call["queries"] = queries.detach()

    def on_keys(module: nn.Module, args: tuple, keys: Tensor) -> None:
        call["keys"] = keys.detach()

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        queries, keys, values = (call.pop(part) for part in ("queries", "keys", "values"))
        size = call.pop("size")
        with torch.no_grad():
            bias = None
            if attention.use_rel_pos:
                bias = get_decomposed_rel_pos_bias(
                    queries, attention.rel_pos_h, attention.rel_pos_w, size, size
                )
                bias = bias.unflatten(0, (-1, heads))  # (B', H, N, N)
            elif attention.rope is not None:
                rope = attention.rope.get_embed()
                queries = apply_rot_embed_cat(queries, rope).type_as(values)
                keys = apply_rot_embed_cat(keys, rope).type_as(values)
            queries = queries.unflatten(0, (-1, heads))  # (B' * H, N, d) -> (B', H, N, d)
            keys = keys.unflatten(0, (-1, heads))
            row = class_attention_row(
                queries[:, :, 0], keys, attention.scale, None if bias is None else bias[..., 0, :]
            )

        record.set_attention(
            row, values, SoftmaxAttention(queries, keys, attention.scale, bias)
        )
        return (record.watch(args[0]),) + tuple(args[1:])

    return [
        Hook(attention, "pre", on_call),
        Hook(attention.qkv, "forward", on_qkv),
        Hook(attention.q_norm, "forward", on_query),
        Hook(attention.k_norm, "forward", on_keys),
        Hook(attention.proj, "pre", on_pre_projection),
    ]


@register_adapter
class TimmSamAdapter(PooledAdapter):
    """timm ``VisionTransformerSAM`` with its ``Attention`` in every block: windowed (padded)
    and global blocks, relative position bias or rotary embedding; every query row explained,
    any image size the patch embedding takes."""

    family = "timm VisionTransformerSAM (Segment Anything's encoder)"
    examples = "samvit_base_patch16, samvit_large_patch16, samvit_huge_patch16"
    layer_example = "model.blocks[i].attn"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for index, block in enumerate(model.blocks):
            if not isinstance(getattr(block, "attn", None), SamAttention):
                raise TypeError(
                    f"Block {index} of {type(model).__name__}.blocks uses "
                    f"{type(getattr(block, 'attn', None)).__name__}; the {self.family} adapter "
                    f"supports timm.models.vision_transformer_sam.Attention. Write an adapter "
                    f"for this attention type."
                )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformerSAM)

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for block in self.model.blocks]

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = patch_grid(self.model.patch_embed, image_size)
        layouts = []
        for block in self.model.blocks:
            if block.window_size > 0:
                window = (block.window_size, block.window_size)
                positions = window_positions(grid, window, (0, 0), window_partition)
                layouts.append(BlockLayout(grid, 0, positions))
            else:
                layouts.append(BlockLayout(grid))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return sam_attention_hooks(attention, record)
