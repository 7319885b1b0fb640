"""Checks of an adapter's records against the model itself, shared by ``captum-daam check`` and
the census (benchmarks/coverage.py): where an attention module's output enters its output
projection, and that output, read by a hook that is not the adapter's, laid out as the
records' rows, so that the recorded decomposition can be compared with it."""

from typing import Optional, Tuple

import torch
from timm.layers import Attention, AttentionRope
from timm.layers.attention2d import MultiQueryAttention2d
from timm.models.efficientformer_v2 import Attention2d, Attention2dDownsample
from timm.models.eva import EvaAttention
from timm.models.vision_transformer_relpos import RelPosAttention
from torch import Tensor, nn

from .base import BlockRecord
from .timm_efficientformer_v2 import mixing_output_module

__all__ = ["OUTPUT_NORMED", "output_projection_input", "as_recorded_rows"]

#: timm's attention layers whose ``norm`` takes the attention output (identity unless
#: scale_norm), before ``proj``. Other layers' ``norm`` is elsewhere (TinyViT's norms the
#: input; PVTv2's the reduced keys; an attention-pool head's follows ``proj``).
OUTPUT_NORMED = (Attention, AttentionRope, EvaAttention, RelPosAttention)


def output_projection_input(attention: nn.Module) -> nn.Module:
    """The module whose input is the attention output before the output projection:
    ``sub_norm`` in differential attention (the per-head norm before ``norm`` and ``proj``),
    ``norm`` in the layers of :data:`OUTPUT_NORMED`, else ``proj`` (``o_proj`` in Gemma 4's
    attention), or, in a block that
    computes attention itself (timm's ParallelScalingBlock), ``attn_out_proj``; in
    EfficientFormerV2, whose mixing output is upsampled and activated before ``proj``, and in
    MobileNetV4's multi-query attention, the module it enters first.

    Raises:
        LookupError: when the module has none of them.
    """
    if isinstance(attention, (Attention2d, Attention2dDownsample)):
        return mixing_output_module(attention)
    if isinstance(attention, MultiQueryAttention2d):  # output: [upsample,] proj, drop
        return attention.output[0]
    names = ("norm", "proj") if isinstance(attention, OUTPUT_NORMED) else (
        "proj", "o_proj", "attn_out_proj")
    for name in ("sub_norm",) + names:
        module = getattr(attention, name, None)
        if isinstance(module, nn.Module):
            return module
    raise LookupError(
        f"{type(attention).__name__} has no sub_norm, norm, proj or attn_out_proj module"
    )


def as_recorded_rows(
    record: BlockRecord,
    anchor: Optional[Tensor],
    read: Tensor,
    rows: Tuple[int, int],
    at_read: Optional[Tensor] = None,
    at_anchor: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The output ``read`` where it enters the projection, as the records' (B', N_q, C) rows.

    Where the adapter watched a tensor of its own making (``anchor``, the record's anchor
    during the forward pass: MaxViT's window tokens, NesT's image blocks), that tensor must
    hold the values read (the same values, reordered), and its rows are the records', taken by
    the adapter's linear map (``record.to_pre_projection``) where it has one. Otherwise an
    NCHW output gives its tokens row by row, and an output laid out otherwise than the
    ``rows`` (B', N_q) expected (Twins-SVT merges its windows onto the grid and crops the
    padding, Hiera interleaves its mask units) is taken to them by the adapter's map; rows
    that map fills from nothing (padding) are not real.

    Returns:
        The output rows, ``at_read`` or ``at_anchor`` (a gradient there) laid out alike, and
        None or a (B', N_q, 1) mask of the real rows.

    Raises:
        ValueError: when the adapter's own tensor does not hold the values read.
    """
    to_rows = record.to_pre_projection
    if anchor is not None and anchor is not read:
        if not torch.equal(anchor.detach().flatten().sort().values,
                           read.detach().flatten().sort().values):
            raise ValueError("the adapter watches a tensor that does not hold the module's output")
        output, other = anchor.detach(), at_anchor
        if to_rows is not None:
            output, other = to_rows(output), None if other is None else to_rows(other)
        return output, other, None
    output, other = read.detach(), at_read
    if output.dim() == 4:  # an NCHW attention (LeViT's conv layout): tokens row by row
        output, other = (None if tensor is None else tensor.flatten(2).transpose(1, 2)
                         for tensor in (output, other))
    if tuple(output.shape[:2]) == tuple(rows) or to_rows is None:
        return output, other, None
    real = to_rows(torch.ones_like(output)).abs().sum(-1, keepdim=True) > 0
    return to_rows(output), None if other is None else to_rows(other), real
