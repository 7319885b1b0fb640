"""timm ``Hiera`` (hiera_*): mask-unit and global attention over unrolled tokens, the queries
max-pooled where a stage starts; no [class] token, the head averages the last tokens.

Hiera keeps its tokens "unrolled" (``model.unroll``): reordered so that the q_stride tokens of
each 2x2 neighbourhood lie N / q_stride apart and whole mask units lie in a fixed stride
pattern. A block that starts a stage max-pools its queries over those neighbourhoods; its keys
and values are the tokens before pooling, so its map lies on the finer grid it reads.
Mask-unit attention attends within units: of a block's N input tokens in W units, token t is
in unit t mod W. The adapter finds the cell of every token by running the model's own
``Unroll`` on a grid of cell indices, and follows each pooling block by taking, for every
pooled token, the coarse cell its neighbourhood covers. No position bias enters the logits.
The patch embedding is a convolution, not a block of the flow. Images must have the size the
model was built for (its ``img_size``): the unroll and the position embedding fix it.
"""

from typing import Dict, List, Tuple

import torch
from timm.models.hiera import Hiera, MaskUnitAttention
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockLayout, BlockRecord, Hook, output_grid, register_adapter
from .pooled import PooledAdapter

__all__ = ["TimmHieraAdapter", "mask_unit_attention_hooks"]


def mask_unit_attention_hooks(attention: MaskUnitAttention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``MaskUnitAttention`` on (B, N, C)
    unrolled tokens: q, k, v of every unit from ``qkv`` (the queries max-pooled over
    ``q_stride`` as the module pools them), laid out as B * W windows; the output watched where
    it enters ``proj`` and its gradient taken to the windows' query rows."""
    heads, stride, width = attention.heads, attention.q_stride, attention.head_dim
    call: Dict[str, int] = {}

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        batch, count, _ = qkv.shape
        qkv = qkv.detach()
        if attention.use_mask_unit_attn:
            units = count // (stride * attention.window_size)
            # (B, N, 3 H d) -> (3, B, H, W, N / W, d), token j * W + w in unit w.
            queries, keys, values = qkv.reshape(batch, -1, units, 3, heads, width).permute(
                3, 0, 4, 2, 1, 5)
            if stride > 1:
                queries = queries.view(batch, heads, units, stride, -1, width).amax(dim=3)
            queries, keys, values = (part.transpose(1, 2).flatten(0, 1)
                                     for part in (queries, keys, values))
        else:
            units = 1
            queries, keys, values = qkv.reshape(batch, count, 3, heads, width).permute(
                2, 0, 3, 1, 4)
            if stride > 1:
                queries = queries.view(batch, heads, stride, -1, width).amax(dim=2)
        call["units"] = units
        row = class_attention_row(queries[:, :, 0], keys, attention.scale)
        record.set_attention(
            row, values, SoftmaxAttention(queries, keys, attention.scale)
        )

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        units = call.pop("units")

        def to_units(gradient: Tensor) -> Tensor:
            # (B, Nq, C), query j * W + w of unit w -> (B * W, Nq / W, C)
            return gradient.unflatten(1, (-1, units)).transpose(1, 2).flatten(0, 1)

        return (record.watch(args[0], to_units),) + tuple(args[1:])

    return [
        Hook(attention.qkv, "forward", on_qkv),
        Hook(attention.proj, "pre", on_pre_projection),
    ]



def pooled_cells(
    order: Tensor, pooled: int, width: int, stride: Tuple[int, int]
) -> Tuple[Tuple[int, int], Tensor]:
    """Hiera's query pooling on cell indices: ``order`` (N,) the cell (row-major on a grid
    ``width`` wide) of each token in the order the block reads them; each pooled token takes
    the ``pooled`` tokens N / pooled apart, which lie in one ``stride`` neighbourhood. Returns
    the pooled grid's (rows, columns) and the cell of each pooled token on it.

    Raises:
        RuntimeError: when the tokens pooled together are not one neighbourhood.
    """
    stride_h, stride_w = stride
    group = order.view(pooled, -1)
    coarse = (group // width // stride_h) * (width // stride_w) + (group % width // stride_w)
    if not bool((coarse == coarse[0]).all()):
        raise RuntimeError("Hiera pooled tokens of different neighbourhoods.")
    rows = int(order.numel()) // width // stride_h
    return (rows, width // stride_w), coarse[0]

@register_adapter
class TimmHieraAdapter(PooledAdapter):
    """timm ``Hiera``: mask-unit and global attention with query pooling; every query row of
    every unit explained, each block on the grid of its keys; images of the model's
    ``img_size``."""

    family = "timm Hiera"
    examples = "hiera_tiny_224, hiera_small_224, hiera_base_224, hiera_small_abswin_256"
    layer_example = "model.blocks[i].attn"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if len(model.tokens_spatial_shape) != 2:
            raise TypeError(
                f"Expected a Hiera on 2D images, got one with a "
                f"{len(model.tokens_spatial_shape)}D token grid (video); DAAM explains images."
            )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, Hiera)

    @property
    def in_channels(self) -> int:
        return self.model.patch_embed.proj.in_channels

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for block in self.model.blocks]

    def _key_cells(self) -> List[Tuple[Tuple[int, int], Tensor]]:
        """For every block, the grid of the tokens it reads and the cell (row-major) of each
        of them in the order the block reads them (N,)."""
        height, width = self.model.tokens_spatial_shape
        cells = torch.arange(height * width, dtype=torch.float64).reshape(1, -1, 1)
        order = self.model.unroll(cells).reshape(-1).long()  # the model's own unroll
        stride_h, stride_w = self.model.q_stride
        read = []
        for block in self.model.blocks:
            read.append(((height, width), order))
            pooled = block.attn.q_stride
            if pooled > 1:
                (height, width), order = pooled_cells(order, pooled, width, (stride_h, stride_w))
        return read

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        expected = tuple(self.model.tokens_spatial_shape)
        if output_grid(image_size, self.model.patch_embed.proj) != expected:
            stride = self.model.patch_embed.proj.stride
            raise ValueError(
                f"This Hiera takes images that give its {expected[0]}x{expected[1]} token grid "
                f"({expected[0] * stride[0]}x{expected[1] * stride[1]}, its img_size; the "
                f"unroll and the position embedding fix it), got "
                f"{image_size[0]}x{image_size[1]}. Resize the images."
            )
        layouts = []
        for block, (grid, order) in zip(self.model.blocks, self._key_cells()):
            attention = block.attn
            units = (len(order) // (attention.q_stride * attention.window_size)
                     if attention.use_mask_unit_attn else 1)
            layouts.append(BlockLayout(grid, 0, order.view(-1, units).T.contiguous()))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return mask_unit_attention_hooks(attention, record)
