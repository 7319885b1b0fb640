"""Hooks for ``torch.nn.MultiheadAttention``, shared by the families that run it: torchvision's
``VisionTransformer``, open_clip's towers and attentional pooler, transformers' SigLIP probe.

One call's queries, keys and values may come from different tensors (a latent query attending
over the tokens), through one ``in_proj_weight`` or, with ``kdim`` / ``vdim`` other than the
embedding width, through ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight``; batch first
or sequence first (``batch_first=False``, as older open_clip releases ran their blocks).
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decompose import DeferredMixing, SoftmaxAttention, class_attention_row
from .base import BlockRecord, Hook

__all__ = ["multihead_attention_hooks", "unsupported_multihead_options"]

# nn.MultiheadAttention.forward's parameters, in order, to read a call's arguments by name.
_MHA_PARAMETERS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)


def unsupported_multihead_options(attention: nn.MultiheadAttention) -> List[str]:
    """The options ``attention`` was built with that :func:`multihead_attention_hooks` cannot
    read (extra key / value rows appended to every call), as a user would write them."""
    return [
        reason
        for reason, present in (
            ("add_bias_kv=True", attention.bias_k is not None),
            ("add_zero_attn=True", attention.add_zero_attn),
        )
        if present
    ]


def _projection_weights(attention: nn.MultiheadAttention) -> Tuple[Tensor, Tensor, Tensor]:
    """The query, key and value projection weights, detached, however the module holds them."""
    if attention._qkv_same_embed_dim:
        return attention.in_proj_weight.detach().split(attention.embed_dim)
    return (
        attention.q_proj_weight.detach(),
        attention.k_proj_weight.detach(),
        attention.v_proj_weight.detach(),
    )


def _padding_bias(key_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
    """A ``key_padding_mask`` (B, N), True or -inf where a key is padding, as an additive logit
    bias (B, 1, 1, N); None for none."""
    if key_padding_mask is None:
        return None
    mask = key_padding_mask.detach()
    if mask.dtype.is_floating_point:
        return mask[:, None, None, :]
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return bias.masked_fill(mask.bool(), float("-inf"))[:, None, None, :]


def multihead_attention_hooks(attention: nn.MultiheadAttention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one unmasked call of ``nn.MultiheadAttention``.

    The head-concatenated output before ``out_proj`` is not a module boundary (the projection
    runs inside the functional attention, or the fused fast path), so the pre-hook recomputes
    the queries, keys and values from the call's ``query`` / ``key`` / ``value`` and the
    projection weights, and the forward hook watches the projected output: out = O W_out^T + b,
    so the gradient at a row of O is the gradient at that row of out times W_out. The record's
    first row is the first query's: the [class] token's in self-attention, the first latent
    query's in a pooler. Sequence-first calls (``batch_first=False``) are read batch first.
    """
    heads, width = attention.num_heads, attention.head_dim
    channels = attention.embed_dim
    batch_first = attention.batch_first

    def split_heads(projected: Tensor) -> Tensor:
        # (B, N, C) -> (B, H, N, d), channel c = h * d + e, as nn.MultiheadAttention splits it.
        return projected.unflatten(-1, (heads, width)).transpose(1, 2)

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = dict(zip(_MHA_PARAMETERS, args))
        call.update(kwargs)
        if call.get("attn_mask") is not None or call.get("is_causal", False):
            raise ValueError(
                "DAAM's nn.MultiheadAttention hooks expect attention without an attn_mask (as "
                "Vision Transformers call it; a key_padding_mask is read), got a call with "
                "one. Call the model without it, or write an adapter that reads the mask."
            )
        inputs = [call[name] for name in ("query", "key", "value")]
        if not batch_first:
            inputs = [tensor.transpose(0, 1) for tensor in inputs]
        query, key, value = inputs
        bias = _padding_bias(call.get("key_padding_mask"))
        in_bias = module.in_proj_bias
        biases = (None, None, None) if in_bias is None else in_bias.detach().split(channels)
        query_weight, key_weight, value_weight = _projection_weights(module)
        with torch.no_grad():
            first_query = F.linear(query[:, 0], query_weight, biases[0])
            keys = split_heads(F.linear(key, key_weight, biases[1]))
            values = F.linear(value, value_weight, biases[2])
            row = class_attention_row(
                first_query.unflatten(-1, (heads, width)), keys, width**-0.5,
                None if bias is None else bias[..., 0, :],
            )

        def every_query() -> SoftmaxAttention:  # formed when the backward pass reaches it
            queries = split_heads(F.linear(query, query_weight, biases[0]))
            return SoftmaxAttention(queries, keys, width**-0.5, bias)

        record.set_attention(row, split_heads(values), DeferredMixing(every_query))

    def on_output(module: nn.Module, args: tuple, output: Tuple[Tensor, Optional[Tensor]]):
        projected, attention_weights = output

        def to_pre_projection(row_gradient: Tensor) -> Tensor:
            projection = module.out_proj.weight.detach().to(row_gradient.dtype)
            return row_gradient @ projection

        if batch_first:
            return (record.watch(projected, to_pre_projection), attention_weights)
        # Watch a batch-first view, so the record reads (B, N, C) gradients; go on sequence first.
        watched = record.watch(projected.transpose(0, 1), to_pre_projection)
        return (watched.transpose(0, 1), attention_weights)

    return [
        Hook(attention, "pre_kwargs", on_call),
        Hook(attention, "forward", on_output),
    ]
