"""timm ``Eva`` with ``EvaAttention`` (EVA, EVA-02, DINOv3-style and other rotary-embedding
ViTs in timm's eva.py, with or without a [class] token) or timm's ``AttentionRope``
(attn_type='rope': the vit_*_rope_* RoPE-ViTs, Perception Encoder): fused or separate
q / k / v projections, grouped-query attention (``AttentionRope`` with fewer key / value
heads), qk_norm, scale_norm, gated output, register tokens, rotary position embedding (per
block for mixed RoPE), attention masks, fixed or dynamic image size.

The [class] query is a prefix token, which the rotary embedding leaves alone, but the keys of
the patch tokens are rotated: the recorded row uses the keys as the module rotates them,
with timm's own ``apply_rot_embed_cat`` (every row, for a model without a [class] token or
with a pooling head, rotates the patch queries too). An attention-pool head
(``global_pool='map'``, Perception Encoder) reads every token, prefix tokens included, and is
the last block of the flow.
"""

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.layers.attention import AttentionRope, resolve_self_attn_mask
from timm.models.eva import Eva, EvaAttention
from torch import Tensor, nn

from ..decompose import DeferredMixing, SoftmaxAttention, class_attention_row
from .base import BlockRecord, Hook, register_adapter
from .timm_beit import qkv_weight_and_bias, split_heads
from .timm_vit import TimmAdapter


def eva_attention_hooks(
    attention: Union[EvaAttention, AttentionRope], record: BlockRecord
) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``EvaAttention`` or ``AttentionRope``.

    The call's ``rope``, ``attn_mask`` and ``is_causal`` arguments are read when the module
    is called; the [class] query and the keys after ``q_norm`` / ``k_norm`` (identity unless
    qk_norm); the values from ``v_proj`` or ``qkv`` where a module gives them, and otherwise
    (EVA's q / v biases applied in ``F.linear``) recomputed from the input as the module does.
    With grouped-query attention (``AttentionRope.num_kv_groups`` > 1) each key / value head
    is repeated for its group of query heads, as the module does. The head-concatenated
    output is watched where it enters ``norm`` (identity unless scale_norm), before any gate
    and ``proj``.
    """
    heads = attention.num_heads
    groups = getattr(attention, "num_kv_groups", 1)  # AttentionRope only
    num_prefix = attention.num_prefix_tokens
    rotate_half = getattr(attention, "rotate_half", False)
    q_bias = getattr(attention, "q_bias", None)  # EvaAttention only
    values_by_linear = attention.qkv is not None and q_bias is not None
    values_by_linear = values_by_linear and not attention.qkv_bias_separate
    call: dict = {}

    def query_heads(tokens: Tensor) -> Tensor:
        # (B, H / groups, N, d) -> (B, H, N, d): head h uses key / value head h // groups.
        return tokens if groups == 1 else tokens.repeat_interleave(groups, dim=1)

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = args[0]
        call["rope"] = kwargs.get("rope", args[1] if len(args) > 1 else None)
        attn_mask = kwargs.get("attn_mask", args[2] if len(args) > 2 else None)
        is_causal = kwargs.get("is_causal", args[3] if len(args) > 3 else False)
        bias = resolve_self_attn_mask(tokens.shape[1], tokens, attn_mask, is_causal)
        call["bias"] = None if bias is None else bias.detach()
        if values_by_linear:
            with torch.no_grad():
                weight, qkv_bias = qkv_weight_and_bias(attention)
                width = weight.shape[0] // 3
                call["values"] = split_heads(
                    F.linear(tokens, weight[2 * width :], qkv_bias[2 * width :]), heads
                )

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        values = qkv.detach()[..., 2 * qkv.shape[-1] // 3 :]
        if q_bias is not None:  # qkv_bias_separate: the bias is added after qkv
            values = values + attention.v_bias.detach()
        call["values"] = split_heads(values, heads)

    def on_values(module: nn.Module, args: tuple, values: Tensor) -> None:
        call["values"] = query_heads(split_heads(values.detach(), heads // groups))

    def on_query(module: nn.Module, args: tuple, queries: Tensor) -> None:
        call["queries"] = queries.detach()

    def on_keys(module: nn.Module, args: tuple, keys: Tensor) -> None:
        call["keys"] = keys.detach()

    def rotate(tokens: Tensor, rope: Optional[Tensor]) -> Tensor:
        # As the module does: the prefix tokens (the [class] token among them) are not rotated.
        if rope is None:
            return tokens
        rotated = apply_rot_embed_cat(tokens[:, :, num_prefix:], rope, half=rotate_half)
        return torch.cat([tokens[:, :, :num_prefix], rotated], dim=2).type_as(tokens)

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        queries, keys, rope = call.pop("queries"), call.pop("keys"), call.pop("rope")
        bias = call.pop("bias")
        with torch.no_grad():
            keys = query_heads(rotate(keys, rope))
            bias_row = None if bias is None else bias[..., 0, :]
            row = class_attention_row(queries[:, :, 0], keys, attention.scale, bias_row)
        # Every query, rotated only when the backward pass reaches this block.
        full = DeferredMixing(
            lambda: SoftmaxAttention(rotate(queries, rope), keys, attention.scale, bias)
        )
        record.set_attention(row, call.pop("values"), full)
        return (record.watch(args[0]),) + tuple(args[1:])

    hooks = [Hook(attention, "pre_kwargs", on_call)]
    if attention.qkv is None:
        hooks.append(Hook(attention.v_proj, "forward", on_values))
    elif not values_by_linear:
        hooks.append(Hook(attention.qkv, "forward", on_qkv))
    return hooks + [
        Hook(attention.q_norm, "forward", on_query),
        Hook(attention.k_norm, "forward", on_keys),
        Hook(attention.norm, "pre", on_pre_projection),
    ]


@register_adapter
class TimmEvaAdapter(TimmAdapter):
    """timm ``Eva`` with, in every block, ``EvaAttention`` (attn_type='eva') or timm's
    ``AttentionRope`` (attn_type='rope': RoPE-ViT vit_*_rope_*, Perception Encoder vit_pe_*).
    Models without a [class] token (vit_*_rope_reg*_gap_*) are explained from every query
    row; an attention-pool head is the flow's last block.
    """

    family = "timm EVA"
    examples = (
        "eva02_*, eva_giant_*, vit_*_dinov3, "
        "vit_*_rope_*, vit_*_rope_reg*_gap_*, vit_pe_*, Eva with attn_type='eva' or 'rope'"
    )
    attention_types = (EvaAttention, AttentionRope)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, Eva)

    def attention_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return eva_attention_hooks(attention, record)
