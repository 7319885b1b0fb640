"""timm's Gemma 4 vision tower (``gemma4_vit_167m``, ``gemma4_vit_570m``): no [class] token;
the classifier averages the patch tokens (after the tower's 3x3 soft-token pool where
``encoder_pool='soft'``).

Every ``Gemma4Block`` runs a ``Gemma4Attention`` between sandwich norms: q, k and v from
``q_proj`` / ``k_proj`` / ``v_proj``, each head normalised (``q_norm``, ``k_norm`` and a plain
``v_norm``), a 2-D rotary embedding on q and k (the first half of each head turned by the
column, the second by the row: timm's ``apply_multidimensional_rope``), softmax(q k^T) with
scale 1 and the call's padding mask, then ``o_proj``. The hooks read the normed q, k and v
and the call's cos, sin and mask, and watch the output where it enters ``o_proj`` (before
its clamp). Tokens are the patches row by row. An encoder (``*_enc``) whose output is the
soft-token pool's tokens rather than pooled features is refused: build it with
``global_pool='avg'``, or use the classifier.
"""

from typing import Dict, List, Optional, Tuple

import torch
from timm.models.gemma4_vit import (
    Gemma4Attention,
    Gemma4VitClassifier,
    Gemma4VitEncoder,
    apply_multidimensional_rope,
)
from torch import Tensor, nn

from ..decompose import DeferredMixing, SoftmaxAttention, class_attention_row
from .base import BlockLayout, BlockRecord, Hook, register_adapter
from .timm_vlm_towers import VisionTowerAdapter

__all__ = ["TimmGemma4VitAdapter", "gemma4_attention_hooks"]


def gemma4_attention_hooks(attention: Gemma4Attention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``Gemma4Attention``."""
    groups = attention.num_kv_groups
    call: Dict[str, Optional[Tensor]] = {}

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call["cos"] = kwargs.get("rope_cos", args[1] if len(args) > 1 else None)
        call["sin"] = kwargs.get("rope_sin", args[2] if len(args) > 2 else None)
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        call["mask"] = None if mask is None else mask.detach()

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            call[name] = output.detach()  # (B, N, heads, d), normed
        return hook

    def rotated(tokens: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # As the module: (B, N, heads, d) turned, then (B, heads, N, d).
        return apply_multidimensional_rope(tokens, cos, sin, ndim=2, unsqueeze_dim=2).transpose(
            1, 2)

    def per_query_head(tokens: Tensor) -> Tensor:  # key / value heads for their query heads
        return tokens if groups == 1 else tokens.repeat_interleave(groups, dim=1)

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        queries, keys, values, mask = (call.pop(name) for name in ("q", "k", "v", "mask"))
        cos, sin = call.pop("cos").detach(), call.pop("sin").detach()
        with torch.no_grad():
            keys = per_query_head(rotated(keys, cos, sin))
            first_query = rotated(queries[:, :1], cos[:, :1], sin[:, :1])[:, :, 0]
            row = class_attention_row(
                first_query, keys, 1.0, None if mask is None else mask[..., 0, :])

        def every_query() -> SoftmaxAttention:  # rotated when the backward pass reaches it
            return SoftmaxAttention(rotated(queries, cos, sin), keys, 1.0, mask)

        values = per_query_head(values.transpose(1, 2))
        record.set_attention(row, values, DeferredMixing(every_query))
        return (record.watch(args[0]),) + tuple(args[1:])

    return [
        Hook(attention, "pre_kwargs", on_call),
        Hook(attention.q_norm, "forward", keep("q")),
        Hook(attention.k_norm, "forward", keep("k")),
        Hook(attention.v_norm, "forward", keep("v")),
        Hook(attention.o_proj, "pre", on_pre_projection),
    ]


@register_adapter
class TimmGemma4VitAdapter(VisionTowerAdapter):
    """timm ``Gemma4VitClassifier`` / ``Gemma4VitEncoder``: every query row of every block;
    image sizes in whole patches."""

    family = "timm Gemma 4 vision tower"
    examples = "gemma4_vit_167m, gemma4_vit_570m"
    layer_example = "model.encoder.blocks[i].attn"
    encoder_types = (Gemma4VitClassifier, Gemma4VitEncoder)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if model.global_pool != "avg":
            other = "" if isinstance(model, Gemma4VitClassifier) else (
                " for pooled features, or the classifier (the name without _enc) with a head")
            raise TypeError(
                f"This {type(model).__name__} returns tokens (global_pool="
                f"{model.global_pool!r}), not class scores or features. Build it with "
                f"global_pool='avg'{other}."
            )

    @property
    def in_channels(self) -> int:
        return self.model.in_chans

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        encoder = self._encoder()
        patch_h, patch_w = encoder.patch_embed.patch_size
        height, width = image_size
        if height % patch_h or width % patch_w:
            raise ValueError(
                f"Expected image height and width divisible by the patch size "
                f"{patch_h}x{patch_w}, got {height}x{width}. Resize or pad the images."
            )
        grid = (height // patch_h, width // patch_w)
        return [BlockLayout(grid) for _ in self.attention_modules()]

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return gemma4_attention_hooks(attention, record)
