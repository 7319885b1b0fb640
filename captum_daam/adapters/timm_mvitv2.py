"""timm ``MultiScaleVit`` (MViTv2: mvitv2_tiny, mvitv2_small, mvitv2_base, mvitv2_large,
without a [class] token, and mvitv2_small_cls, mvitv2_base_cls, mvitv2_large_cls,
mvitv2_huge_cls, with one).

In every block, timm's ``MultiScaleAttention`` projects the tokens to q, k and v and pools each
of them over the patch grid with its own depthwise convolution (or max / average pooling),
followed by a LayerNorm; the [class] token is kept out of the pooling and put back in front.
The query grid halves at the first block of every stage after the first; the key / value grid
is pooled harder (stride 4, 2, 1, 1 by stage in the registered models). The [class] query
therefore reads the *pooled* key / value tokens: a block's map lies on its key / value grid,
row-major, which may differ from its query grid and from its neighbours' (for a 224x224 image
in the registered models: 14x14 in stage 1; 28x28 then 14x14 in stage 2; 28x28 then 14x14 in
stage 3; 14x14 then 7x7 in stage 4). The maps are brought to the finest of those grids
(28x28 there) before they are added up. Heads and widths change from stage to stage; each
block's come from its own module.

The decomposed relative position bias (``rel_pos_type='spatial'``) is added to the logits of
patch queries over patch keys only, so it leaves the [class] row alone; the full attention
recorded for ``queries='all'`` (every query row) includes it, formed with timm's own
``cal_rel_pos_type``.

With ``residual_pooling`` (the default) the module adds the pooled query to its attention
output: the [class] row of the output before ``proj`` is sum_n A[0, n] v[n] + q[0]. The q term
is no token's contribution and is not split over the grid; the block map is still
relu(sum_h A <v, relu(g)>), with g the gradient at that output, q term included.

Models without a [class] token (mvitv2_tiny, mvitv2_small, mvitv2_base, mvitv2_large) average
their tokens and are explained from every query row, the relative position bias then in every
row. Models built with ``pool_first=True`` (timm's ``MultiScaleAttentionPoolFirst``, which no
registered model uses) are refused.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from timm.models.mvitv2 import (
    MultiScaleAttention,
    MultiScaleAttentionPoolFirst,
    MultiScaleVit,
    cal_rel_pos_type,
    reshape_post_pool,
)
from torch import Tensor, nn

from ..decompose import attention_probabilities, class_attention_row
from .base import BlockLayout, BlockRecord, Hook, ViTAdapter, output_grid, register_adapter

_PARTS = ("q", "k", "v")


def mvitv2_attention_hooks(attention: MultiScaleAttention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``MultiScaleAttention``, with or
    without a [class] token.

    The query, keys and values are read as the module uses them: from ``qkv``, then after
    ``pool_*`` (with the [class] token put back in front by timm's ``reshape_post_pool``), then
    after ``norm_*``, whichever of those the module has last. The head-concatenated output is
    watched where it enters ``proj`` (after the residual pooled query, if any).
    """
    heads = attention.num_heads
    call: Dict[str, object] = {}

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        feat_size = kwargs.get("feat_size", args[1] if len(args) > 1 else None)
        call["sizes"] = {part: tuple(feat_size) for part in _PARTS}

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        batch, tokens, _ = qkv.shape
        # (B, N, 3 * H * d) -> (3, B, H, N, d), as the module's reshape(B, N, 3, H, d).permute.
        split = qkv.detach().reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        call.update(zip(_PARTS, split))

    def on_pooled(part: str, normed_later: bool):
        def hook(module: nn.Module, args: tuple, pooled: Tensor) -> None:
            call["sizes"][part] = tuple(pooled.shape[-2:])  # (B * H, d, h, w)
            if not normed_later:
                class_token = call[part][:, :, :1] if attention.has_cls_token else None
                call[part] = reshape_post_pool(pooled.detach(), heads, class_token)[0]

        return hook

    def on_normed(part: str):
        def hook(module: nn.Module, args: tuple, normed: Tensor) -> None:
            call[part] = normed.detach()

        return hook

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        queries, keys, values = (call.pop(part) for part in _PARTS)
        sizes = call.pop("sizes")
        # The relative position bias touches patch queries only: none on the [class] row.
        row = class_attention_row(queries[:, :, 0], keys, attention.scale)

        def full_attention() -> Tensor:  # every query, formed only for queries='all'
            with torch.no_grad():
                bias = None
                if attention.rel_pos_type == "spatial":
                    dtype = torch.promote_types(queries.dtype, torch.float32)
                    zeros = queries.new_zeros(
                        (*queries.shape[:3], keys.shape[2]), dtype=dtype
                    )
                    bias = cal_rel_pos_type(
                        zeros,
                        queries.to(dtype),
                        attention.has_cls_token,
                        list(sizes["q"]),
                        list(sizes["k"]),
                        attention.rel_pos_h.detach().to(dtype),
                        attention.rel_pos_w.detach().to(dtype),
                    )
                return attention_probabilities(queries, keys, attention.scale, bias)

        if attention.residual_pooling:
            record.residual = queries  # the module adds the pooled query to its output
        record.set_attention(row, values, full_attention)
        return (record.watch(args[0]),) + tuple(args[1:])

    hooks = [Hook(attention, "pre_kwargs", on_call), Hook(attention.qkv, "forward", on_qkv)]
    for part in _PARTS:
        pool, norm = getattr(attention, f"pool_{part}"), getattr(attention, f"norm_{part}")
        if pool is not None:
            hooks.append(Hook(pool, "forward", on_pooled(part, norm is not None)))
        if norm is not None:
            hooks.append(Hook(norm, "forward", on_normed(part)))
    return hooks + [Hook(attention.proj, "pre", on_pre_projection)]


@register_adapter
class TimmMvitv2Adapter(ViTAdapter):
    """timm ``MultiScaleVit`` with ``MultiScaleAttention`` in every block: pooling by
    convolution, max or average, with or without the relative position bias and residual
    pooling; with a [class] token (``use_cls_token=True``, the *_cls models) and
    ``global_pool='token'`` (their default; the [class] rows explain it), or ``'avg'`` and
    models without a [class] token (every query row by default)."""

    family = "timm MViTv2"
    examples = "mvitv2_tiny, mvitv2_small, mvitv2_base, mvitv2_large, mvitv2_*_cls"
    layer_example = "model.stages[s].blocks[i].attn"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        name = type(model).__name__
        if not model.global_pool:
            raise TypeError(
                f"DAAM explains class scores (B, K), but this {name} has "
                f"global_pool={model.global_pool!r}, so its head maps every token and the "
                f"output is (B, tokens, K). Use global_pool='token' or 'avg'."
            )
        for stage_index, stage in enumerate(model.stages):
            for block_index, block in enumerate(stage.blocks):
                attention = getattr(block, "attn", None)
                if not isinstance(attention, MultiScaleAttention):
                    pool_first = isinstance(attention, MultiScaleAttentionPoolFirst)
                    built = " (built with pool_first=True)" if pool_first else ""
                    raise TypeError(
                        f"Block {block_index} of {name}.stages[{stage_index}] uses "
                        f"{type(attention).__name__}{built}; the {self.family} adapter "
                        f"supports timm.models.mvitv2.MultiScaleAttention (pool_first=False, "
                        f"as in every registered mvitv2_* model). Build the model with "
                        f"pool_first=False, or write an adapter for this attention type."
                    )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, MultiScaleVit)

    @property
    def has_class_token(self) -> bool:
        return self.model.cls_token is not None

    @property
    def reads_class_token(self) -> bool:
        return self.has_class_token and self.model.global_pool == "token"

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for stage in self.model.stages for block in stage.blocks]

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    @property
    def in_channels(self) -> Optional[int]:
        return self.model.in_chans

    @property
    def num_outputs(self) -> Optional[int]:
        return self.model.num_classes or self.model.num_features

    @property
    def outputs_features(self) -> bool:
        return self.model.num_classes == 0

    def key_grids(self, image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """The key / value grid of every block, in block order, for images of ``image_size``:
        what its [class] query reads. Checked against the model's position embedding and
        relative position tables."""
        model = self.model
        height, width = image_size
        grid = output_grid(image_size, model.patch_embed.proj)
        if min(grid) < 1:
            raise ValueError(
                f"Expected images large enough for at least one patch, got {height}x{width}. "
                f"Use larger images."
            )
        prefix = model.num_prefix_tokens
        if model.pos_embed is not None and model.pos_embed.shape[1] != prefix + grid[0] * grid[1]:
            raise ValueError(
                f"This model's absolute position embedding holds "
                f"{model.pos_embed.shape[1] - prefix} patch positions, but {height}x{width} images "
                f"give a {grid[0]}x{grid[1]} patch grid. Use the image size the model was "
                f"built for."
            )
        grids = []
        for index, attention in enumerate(self.attention_modules()):
            query_grid = grid if attention.pool_q is None else output_grid(grid, attention.pool_q)
            key_grid = grid if attention.pool_k is None else output_grid(grid, attention.pool_k)
            if min(query_grid + key_grid) < 1:
                raise ValueError(
                    f"Expected images large enough for every block's pooling, got "
                    f"{height}x{width}, which leaves block {index} an empty grid. Use larger "
                    f"images."
                )
            if attention.rel_pos_type == "spatial":
                _check_relative_positions(attention, index, query_grid, key_grid, image_size)
            grids.append(key_grid)
            grid = query_grid
        return grids

    def block_layouts(
        self, attention_modules: Sequence[nn.Module], image_size: Tuple[int, int]
    ) -> List[BlockLayout]:
        grid_of = {
            id(attention): grid
            for attention, grid in zip(self.attention_modules(), self.key_grids(image_size))
        }
        return [BlockLayout(grid_of[id(attention)]) for attention in attention_modules]

    def grid_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        return max(self.key_grids(image_size), key=lambda grid: grid[0] * grid[1])

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return mvitv2_attention_hooks(attention, record)


def _check_relative_positions(
    attention: MultiScaleAttention,
    index: int,
    query_grid: Tuple[int, int],
    key_grid: Tuple[int, int],
    image_size: Tuple[int, int],
) -> None:
    """A ValueError when the block's relative position tables are too short for its grids
    (timm's ``cal_rel_pos_type`` would index past them: the model cannot take the size)."""
    for axis, table in enumerate((attention.rel_pos_h, attention.rel_pos_w)):
        queries, keys = query_grid[axis], key_grid[axis]
        # The largest distance cal_rel_pos_type looks up: last query, first key.
        query_step, key_step = max(keys / queries, 1.0), max(queries / keys, 1.0)
        largest = int((queries - 1) * query_step + (keys - 1) * key_step)
        if largest >= table.shape[0]:
            raise ValueError(
                f"This model cannot take {image_size[0]}x{image_size[1]} images: the relative "
                f"position tables of block {index} hold {table.shape[0]} distances per axis, "
                f"too few for its {query_grid[0]}x{query_grid[1]} query and "
                f"{key_grid[0]}x{key_grid[1]} key grids at that size. Use the image size the "
                f"model was built for (timm's img_size, 224x224 for the registered models) "
                f"or smaller images."
            )
