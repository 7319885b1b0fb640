"""timm ``TNT`` (Transformer in Transformer: tnt_s_patch16_224, tnt_b_patch16_224, and the
legacy tnt_s_legacy_patch16_224).

Each TNT block runs two attentions. The inner one (``attn_in``) mixes the pixel embeddings
inside each patch and has no [class] token; the outer one (``attn_out``) is self-attention
over the [class] token and the patch tokens, every token a query. The DAAM flow runs over the
outer attention of every block. TNT's ``Attention`` projects queries and keys with one
``qk`` linear layer and values with a separate ``v`` layer; the legacy variant differs only
in how pixels are embedded and projected into the patch tokens, not in its attention.
"""

from typing import List, Optional, Tuple

from timm.models.tnt import TNT, Attention
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockRecord, Hook, register_adapter
from .timm_beit import split_heads
from .timm_vit import TimmAdapter


def tnt_attention_hooks(attention: Attention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's TNT ``Attention``.

    ``qk`` gives queries and keys of every token, (B, N, 2 * H * d) laid out as (2, H, d);
    ``v`` gives the values, (B, N, H * d_v) (d_v = d for the outer attention). The hooks read
    both and watch the head-concatenated output, (B, N, H * d_v), where it enters ``proj``.
    """
    heads, width = attention.num_heads, attention.head_dim
    call: dict = {}

    def on_queries_keys(module: nn.Module, args: tuple, queries_keys: Tensor) -> None:
        # (B, N, 2 * H * d) -> (2, B, H, N, d), as TNT's reshape(B, N, 2, H, d).permute.
        queries_keys = queries_keys.detach().unflatten(-1, (2, heads, width))
        call["queries"], call["keys"] = queries_keys.permute(2, 0, 3, 1, 4)

    def on_values(module: nn.Module, args: tuple, values: Tensor) -> None:
        call["values"] = split_heads(values.detach(), heads)

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        # qk and v have both run by the time the output reaches proj.
        queries, keys = call.pop("queries"), call.pop("keys")
        row = class_attention_row(queries[:, :, 0], keys, attention.scale)
        record.set_attention(
            row, call.pop("values"), SoftmaxAttention(queries, keys, attention.scale)
        )
        return (record.watch(args[0]),) + tuple(args[1:])

    return [
        Hook(attention.qk, "forward", on_queries_keys),
        Hook(attention.v, "forward", on_values),
        Hook(attention.proj, "pre", on_pre_projection),
    ]


@register_adapter
class TimmTntAdapter(TimmAdapter):
    """timm ``TNT``: the flow runs over the outer attention of every block,
    ``model.blocks[i].attn_out`` (a fixed image size: ``pixel_embed`` asserts it)."""

    family = "timm TNT (outer attention)"
    examples = "tnt_s_patch16_224, tnt_b_patch16_224, tnt_s_legacy_patch16_224"
    layer_example = "model.blocks[i].attn_out"
    attention_types = (Attention,)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, TNT)

    def block_attention(self, block: nn.Module) -> List[Optional[nn.Module]]:
        return [getattr(block, "attn_out", None)]  # the inner attention has no [class] token

    def attention_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return tnt_attention_hooks(attention, record)

    def grid_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        pixel_embed = self.model.pixel_embed
        if tuple(image_size) != tuple(pixel_embed.img_size):
            expected_h, expected_w = pixel_embed.img_size
            raise ValueError(
                f"This model takes {expected_h}x{expected_w} images (a fixed "
                f"{pixel_embed.grid_size[0]}x{pixel_embed.grid_size[1]} patch grid), got "
                f"{image_size[0]}x{image_size[1]}. Resize the images."
            )
        return tuple(pixel_embed.grid_size)
