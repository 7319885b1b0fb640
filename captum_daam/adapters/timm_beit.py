"""timm ``Beit`` (BEiT and BEiT v2: beit_base_patch16_224, beit_large_patch16_512,
beitv2_base_patch16_224, ...), with per-block and / or shared relative position bias.

BEiT's attention adds a relative position bias to its logits and applies its q / v biases
with ``F.linear`` on the ``qkv`` weight, so no module hook sees the query, keys or values.
The hooks recompute the [class] query, the keys and the values from the block's input with
the module's own weights and biases, and add the [class] row of the same bias the module adds.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.models.beit import Attention, Beit
from torch import Tensor, nn

from ..decompose import DeferredMixing, SoftmaxAttention, class_attention_row
from .base import BlockRecord, Hook, register_adapter, watch_first_input
from .timm_vit import TimmAdapter


def qkv_weight_and_bias(attention: nn.Module) -> Tuple[Tensor, Optional[Tensor]]:
    """The weight and bias with which a BEiT / EVA attention module projects [q, k, v].

    With ``q_bias`` (and the zero ``k_bias`` buffer and ``v_bias``) the module applies their
    concatenation, in ``F.linear`` or, with ``qkv_bias_separate``, added after ``qkv``
    (which has no bias of its own then); otherwise ``qkv`` as it is.
    """
    if attention.q_bias is None:
        return attention.qkv.weight, attention.qkv.bias
    bias = torch.cat((attention.q_bias, attention.k_bias, attention.v_bias))
    return attention.qkv.weight, bias


def split_heads(tokens: Tensor, heads: int) -> Tensor:
    """(B, N, H * d) -> (B, H, N, d), the head layout of timm's attention modules."""
    return tokens.unflatten(-1, (heads, -1)).transpose(1, 2)


def beit_attention_hooks(attention: Attention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's BEiT ``Attention``.

    When the module is called, the [class] query, the keys and the values are recomputed from
    its input (under no_grad, with its weights and biases), and the [class] row of the logit
    bias it adds: its own relative position bias and the model's shared one
    (``shared_rel_pos_bias`` argument). The head-concatenated output is watched where it
    enters ``proj``.
    """
    heads = attention.num_heads

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = args[0]
        shared_bias = kwargs.get("shared_rel_pos_bias", args[1] if len(args) > 1 else None)
        with torch.no_grad():
            weight, bias = qkv_weight_and_bias(attention)
            width = weight.shape[0] // 3
            query_bias = None if bias is None else bias[:width]
            key_value_bias = None if bias is None else bias[width:]
            # Only the [class] row of the query is needed; keys and values for every token.
            class_query = F.linear(tokens[:, 0], weight[:width], query_bias)
            keys_values = F.linear(tokens, weight[width:], key_value_bias)
            keys, values = (split_heads(part, heads) for part in keys_values.chunk(2, dim=-1))
            logit_bias = None
            if attention.relative_position_bias_table is not None:
                logit_bias = attention._get_rel_pos_bias()  # (1, H, N, N)
            if shared_bias is not None:
                logit_bias = shared_bias if logit_bias is None else logit_bias + shared_bias
            bias_row = None if logit_bias is None else logit_bias[..., 0, :]
            row = class_attention_row(
                class_query.unflatten(-1, (heads, -1)), keys, attention.scale, bias_row
            )


        def every_query() -> SoftmaxAttention:  # formed when the backward pass reaches it
            queries = split_heads(F.linear(tokens, weight[:width], query_bias), heads)
            return SoftmaxAttention(queries, keys, attention.scale, logit_bias)

        record.set_attention(row, values, DeferredMixing(every_query))

    return [
        Hook(attention, "pre_kwargs", on_call),
        Hook(attention.proj, "pre", watch_first_input(record)),
    ]


@register_adapter
class TimmBeitAdapter(TimmAdapter):
    """timm ``Beit`` with BEiT's ``Attention`` in every block (a fixed image size: BEiT's
    position embedding and relative position biases are built for one patch grid)."""

    family = "timm BEiT"
    examples = "beit_base_patch16_224, beit_large_patch16_512, beitv2_base_patch16_224"
    attention_types = (Attention,)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, Beit)

    def attention_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return beit_attention_hooks(attention, record)
