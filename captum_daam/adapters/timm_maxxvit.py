"""timm ``MaxxVit`` (maxvit_*, maxxvit_*, maxxvitv2_*, coatnet_*, coatnext_*): block and grid
attention, or attention over a whole stage, between convolution blocks; no [class] token, the
head averages the last stage.

MaxViT's blocks attend twice after their MBConv (or ConvNeXt) convolution: within
non-overlapping windows of the stage grid (block attention, timm's ``window_partition``) and
within sparse grids strided over it (grid attention, ``grid_partition``: the tokens of one grid
window lie a stage-size / grid-size apart). MaxxViT-V2 runs the two side by side on one input
(``ParallelPartitionAttention``), each with its own projection, and concatenates them: the
block attention is branch 0 of the flow, the grid attention branch 1. CoAtNet's transformer
stages (``TransformerBlock2d``) attend over the whole stage grid, after the first block's
strided pooling. The logits hold the module's relative position bias (``RelPosBias``,
``RelPosBiasTf`` or ``RelPosMlp``), formed by its own ``get_bias``. Channels-last
(``AttentionCl``) and NCHW (``Attention2d``) attention, heads first or not, fused or not. Each
window's token map is laid on the stage grid
(:func:`~captum_daam.adapters.windows.window_positions`, which runs timm's own partition on a
grid of cell indices); one grid per stage, the flow on the finest by area-weighted
resampling. The stem and the convolution blocks (MBConv, ConvNeXt; CoAtNet's first stages)
are not blocks of the flow.
"""

from typing import Dict, List, Optional, Tuple

from timm.layers import to_2tuple
from timm.models import maxxvit
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockLayout, BlockRecord, Hook, register_adapter
from .pooled import PooledAdapter
from .windows import window_positions

__all__ = ["TimmMaxxVitAdapter", "maxxvit_attention_hooks"]

_PARTITIONS = (maxxvit.PartitionAttentionCl, maxxvit.PartitionAttention2d)
_CONVOLUTIONS = (maxxvit.MbConvBlock, maxxvit.ConvNeXtBlock)


def _to_tokens(x: Tensor, channels_first: bool) -> Tensor:
    """(B', C, h, w) or (B', h, w, C) -> (B', h * w, C), a view where the layout allows."""
    return x.flatten(2).transpose(1, 2) if channels_first else x.flatten(1, -2)


def maxxvit_attention_hooks(attention: nn.Module, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``Attention2d`` or ``AttentionCl``,
    or of an attention laid out as they are (Visformer's), on B' windows (or whole grids) of N
    tokens: q, k, v from ``qkv`` (a 1x1 convolution on NCHW tokens or a Linear on channels-last
    ones; per head, q k v in a row with ``head_first``, else all queries, then keys, then
    values), the logit bias from the module's ``rel_pos.get_bias()`` or the call's
    ``shared_rel_pos`` where it has them, the output watched, as (B', N, C) tokens, where it
    enters ``proj``."""
    heads, channels_first = attention.num_heads, isinstance(attention.qkv, nn.Conv2d)
    head_first = getattr(attention, "head_first", False)
    relative = getattr(attention, "rel_pos", None)
    split = (heads, 3, -1) if head_first else (3, heads, -1)
    order = (3, 0, 2, 1, 4) if head_first else (2, 0, 3, 1, 4)
    call: Dict[str, Optional[Tensor]] = {}

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        shared = kwargs.get("shared_rel_pos", args[1] if len(args) > 1 else None)
        bias = relative.get_bias() if relative is not None else shared
        call["bias"] = None if bias is None else bias.detach()

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        # (B', N, 3 * H * d) -> (3, B', H, N, d), as the module's view and chunk (or unbind).
        parts = _to_tokens(qkv.detach(), channels_first).unflatten(-1, split).permute(order)
        queries, keys, values = parts
        bias, scale = call.pop("bias"), attention.scale
        row = class_attention_row(
            queries[:, :, 0], keys, scale, None if bias is None else bias[..., 0, :]
        )
        record.set_attention(
            row, values, SoftmaxAttention(queries, keys, scale, bias)
        )

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        output = args[0]
        watched = record.watch(_to_tokens(output, channels_first))
        if channels_first:
            restored = watched.transpose(1, 2).reshape(output.shape)
        else:
            restored = watched.reshape(output.shape)
        return (restored,) + tuple(args[1:])

    return [
        Hook(attention, "pre_kwargs", on_call),
        Hook(attention.qkv, "forward", on_qkv),
        Hook(attention.proj, "pre", on_pre_projection),
    ]


def _partitions(block: nn.Module) -> List[Tuple[nn.Module, int]]:
    """The partition attentions of a MaxViT block, each with its flow branch."""
    if isinstance(block, maxxvit.MaxxVitBlock):
        return [(part, 0) for part in (block.attn_block, block.attn_grid) if part is not None]
    if isinstance(block, maxxvit.ParallelMaxxVitBlock):
        return [(block.attn, 0), (block.attn, 1)]
    return []


@register_adapter
class TimmMaxxVitAdapter(PooledAdapter):
    """timm ``MaxxVit``: MaxViT's block and grid attention (sequential or parallel),
    CoAtNet's whole-grid attention; every query row of every window explained, each stage on
    its own grid. Images must give stage grids that the windows and grids divide (and, where a
    relative position bias covers a whole stage, the model's own image size)."""

    family = "timm MaxViT / CoAtNet (MaxxVit)"
    examples = "maxvit_*, maxxvit_*, maxxvitv2_*, coatnet_*, coatnext_*"
    layer_example = "model.stages[s].blocks[i].attn_grid.attn"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for stage_index, stage in enumerate(model.stages):
            for block_index, block in enumerate(stage.blocks):
                if isinstance(block, (*_CONVOLUTIONS, maxxvit.TransformerBlock2d)):
                    continue
                parts = [part for part, _ in _partitions(block)]
                if not parts or not all(
                    isinstance(part, (*_PARTITIONS, maxxvit.ParallelPartitionAttention))
                    for part in parts
                ):
                    raise TypeError(
                        f"Block {block_index} of {type(model).__name__} stage {stage_index} is "
                        f"a {type(block).__name__}; the {self.family} adapter supports timm's "
                        f"MbConvBlock, ConvNeXtBlock, TransformerBlock2d, MaxxVitBlock and "
                        f"ParallelMaxxVitBlock. Write an adapter for this block type."
                    )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, maxxvit.MaxxVit)

    def attention_modules(self) -> List[nn.Module]:
        modules = []
        for stage in self.model.stages:
            for block in stage.blocks:
                if isinstance(block, maxxvit.TransformerBlock2d):
                    modules.append(block.attn)
                for part, branch in _partitions(block):
                    if isinstance(part, maxxvit.ParallelPartitionAttention):
                        modules.append(part.attn_grid if branch else part.attn_block)
                    else:
                        modules.append(part.attn)
        return modules

    def stage_grids(self, image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """The token grid of every stage for images of ``image_size``: the stem halves the
        image, and every stage halves its input (rounded up), as the model computes its
        feature sizes."""
        grid = tuple(size // stride for size, stride in
                     zip(image_size, to_2tuple(self.model.stem.stride)))
        grids = []
        for _ in self.model.stages:
            grid = tuple((size - 1) // 2 + 1 for size in grid)
            grids.append(grid)
        return grids

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        layouts = []
        for index, (stage, grid) in enumerate(
                zip(self.model.stages, self.stage_grids(image_size))):
            for block in stage.blocks:
                if isinstance(block, maxxvit.TransformerBlock2d):
                    self._check_whole_grid(block.attn, grid, index, image_size)
                    layouts.append(BlockLayout(grid))
                for part, branch in _partitions(block):
                    layouts.append(self._partition_layout(part, branch, grid, image_size))
        return layouts

    def _check_whole_grid(
        self, attention: nn.Module, grid: Tuple[int, int], stage: int,
        image_size: Tuple[int, int],
    ) -> None:
        covered = getattr(attention.rel_pos, "window_size", None)
        if covered is not None and tuple(covered) != tuple(grid):
            expected_h, expected_w = self.model.img_size
            raise ValueError(
                f"Stage {stage} of this {type(self.model).__name__} attends over its whole "
                f"{covered[0]}x{covered[1]} grid with a relative position bias of that size, "
                f"but {image_size[0]}x{image_size[1]} images give a {grid[0]}x{grid[1]} grid. "
                f"Use {expected_h}x{expected_w} images (the model's img_size)."
            )

    def _partition_layout(
        self, part: nn.Module, branch: int, grid: Tuple[int, int], image_size: Tuple[int, int]
    ) -> BlockLayout:
        size = tuple(part.partition_size)
        reduction = 2 ** (len(self.model.stages) + 1)  # the stem's and every stage's
        if grid[0] % size[0] or grid[1] % size[1]:
            raise ValueError(
                f"This {type(self.model).__name__} attends in {size[0]}x{size[1]} windows and "
                f"grids, which must divide every stage grid; {image_size[0]}x{image_size[1]} "
                f"images give a {grid[0]}x{grid[1]} stage grid. Use images whose sides are "
                f"multiples of {reduction * size[0]}x{reduction * size[1]} (e.g. the model's "
                f"img_size {self.model.img_size[0]}x{self.model.img_size[1]})."
            )
        by_grid = branch == 1 or (
            isinstance(part, _PARTITIONS) and not part.partition_block
        )
        partition = maxxvit.grid_partition if by_grid else maxxvit.window_partition
        return BlockLayout(grid, branch, window_positions(grid, size, (0, 0), partition))

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return maxxvit_attention_hooks(attention, record)
