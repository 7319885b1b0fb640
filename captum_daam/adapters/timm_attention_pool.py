"""timm's attention-pool head, ``AttentionPoolLatent`` (``global_pool='map'``: SigLIP, SigLIP2,
AIMv2 and other ViT, EVA and NaFlexViT models), as the last block of the flow.

The head attends from its learned latent queries (one in every registered model) over the
final tokens, then projects, adds an MLP and (``pool_type='token'``) takes the first latent
row. Its attention output before ``proj`` is, row by row, sum_n A[h, i, n] v[h, n] over the
tokens it reads: the block map of DAAM's general formula, from every latent row. The latent
queries are no tokens; the map lies on the tokens the head reads, which are the patch tokens
(timm ``VisionTransformer`` and ``NaFlexVit`` with ``pool_include_prefix=False``) or every
token (``Eva``, and ``pool_include_prefix=True``), prefix tokens then dropped from the grid.
"""

from typing import List, Tuple

import torch
from timm.layers import AttentionPoolLatent
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockLayout, BlockRecord, Hook, watch_first_input

__all__ = ["attention_pool_hooks", "attention_pool_layout", "AttentionPoolLatent"]


def attention_pool_hooks(pool: AttentionPoolLatent, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``AttentionPoolLatent``.

    The latent queries and the keys are read after ``q_norm`` / ``k_norm`` (identities unless
    qk_norm), the values from ``kv``, the mask from the call's ``attn_mask``; the
    head-concatenated output (B, latent_len, C) is watched where it enters ``proj``. The
    record's first row is the first latent query's.
    """
    heads, width = pool.num_heads, pool.head_dim
    call: dict = {}

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        attn_mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=torch.float32).masked_fill(
                ~attn_mask, float("-inf")
            )
        call["bias"] = None if attn_mask is None else attn_mask.detach()

    def on_kv(module: nn.Module, args: tuple, kv: Tensor) -> None:
        # (B, N, 2 * H * d) -> (2, B, H, N, d), as the module's reshape(B, N, 2, H, d).permute.
        call["values"] = kv.detach().unflatten(-1, (2, heads, width)).permute(2, 0, 3, 1, 4)[1]

    def on_query(module: nn.Module, args: tuple, queries: Tensor) -> None:
        call["queries"] = queries.detach()

    def on_keys(module: nn.Module, args: tuple, keys: Tensor) -> None:
        queries, keys, bias = call.pop("queries"), keys.detach(), call.pop("bias")
        row = class_attention_row(
            queries[:, :, 0], keys, pool.scale, None if bias is None else bias[..., 0, :]
        )
        record.set_attention(
            row,
            call.pop("values"),
            SoftmaxAttention(queries, keys, pool.scale, bias),
        )

    return [
        Hook(pool, "pre_kwargs", on_call),
        Hook(pool.kv, "forward", on_kv),
        Hook(pool.q_norm, "forward", on_query),
        Hook(pool.k_norm, "forward", on_keys),
        Hook(pool.proj, "pre", watch_first_input(record)),
    ]


def attention_pool_layout(
    grid: Tuple[int, int], num_prefix_tokens: int, reads_prefix: bool
) -> BlockLayout:
    """The layout of an attention-pool head over ``grid``: its keys are the patch tokens, after
    the ``num_prefix_tokens`` prefix tokens when it ``reads_prefix`` (those placed nowhere)."""
    skipped = num_prefix_tokens if reads_prefix else 0
    positions = torch.cat(
        [torch.full((skipped,), -1, dtype=torch.long), torch.arange(grid[0] * grid[1])]
    )
    return BlockLayout(grid, 0, positions.unsqueeze(0))
