"""timm ``NextViT`` (nextvit_small, _base, _large): efficient multi-head self-attention in the
transformer blocks of every stage, no [class] token; the head averages the last map.

Each ``NextTransformerBlock`` flattens its NCHW map row by row and runs an
``EfficientAttention``: q from ``q`` on every token; in the first stages (``sr_ratio`` > 1) the
keys and values come from a shorter sequence, ``AvgPool1d`` over runs of ``sr_ratio ** 2``
consecutive tokens of the flattened map (a run may wrap from one row to the next) and a
BatchNorm, then ``k`` and ``v``. So every query row is explained over the tokens its values sit
on, as for PVTv2's reduced keys; a reduced token, the average of its run, lies on the run's
cells and shares its map among them (a ``BlockLayout`` position of shape (1, M, run)). The
stem, the ``NextConvBlock``s (their ``ConvAttention`` is a grouped convolution, which mixes
no tokens by weights of its own input), each block's ``ConvAttention`` branch and the patch
embeddings are not blocks of the flow.
"""

from typing import List, Tuple

import torch
from timm.models.nextvit import EfficientAttention, NextTransformerBlock, NextViT
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockLayout, BlockRecord, Hook, output_grid, register_adapter
from .pooled import PooledAdapter

__all__ = ["TimmNextVitAdapter"]


def nextvit_attention_hooks(attention: EfficientAttention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's NextViT ``EfficientAttention``: q,
    k and v from their linear layers (k and v on the reduced tokens), the output watched where
    it enters ``proj``."""
    heads = attention.num_heads
    call = {}

    def by_heads(tokens: Tensor) -> Tensor:  # (B, N, H * d) -> (B, H, N, d)
        return tokens.detach().unflatten(-1, (heads, -1)).transpose(1, 2)

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            call[name] = by_heads(output)
        return hook

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        queries, keys, values = (call.pop(name) for name in ("q", "k", "v"))
        with torch.no_grad():
            row = class_attention_row(queries[:, :, 0], keys, attention.scale)
        record.set_attention(row, values, SoftmaxAttention(queries, keys, attention.scale))
        return (record.watch(args[0]),) + tuple(args[1:])

    return [
        Hook(attention.q, "forward", keep("q")),
        Hook(attention.k, "forward", keep("k")),
        Hook(attention.v, "forward", keep("v")),
        Hook(attention.proj, "pre", on_pre_projection),
    ]


@register_adapter
class TimmNextVitAdapter(PooledAdapter):
    """timm ``NextViT``: every query row of every transformer block's efficient attention,
    each on its stage's grid, reduced keys spread over the runs of tokens they average; any
    image size."""

    family = "timm NextViT"
    examples = "nextvit_small, nextvit_base, nextvit_large"
    layer_example = "model.stages[s].blocks[i].e_mhsa"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, NextViT)

    def _transformer_blocks(self) -> List[NextTransformerBlock]:
        return [block for stage in self.model.stages for block in stage.blocks
                if isinstance(block, NextTransformerBlock)]

    def attention_modules(self) -> List[nn.Module]:
        return [block.e_mhsa for block in self._transformer_blocks()]

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = tuple(image_size)
        for layer in self.model.stem:
            grid = output_grid(grid, layer.conv)
        layouts = []
        for stage in self.model.stages:
            for block in stage.blocks:
                if isinstance(block.patch_embed.pool, nn.AvgPool2d):
                    grid = output_grid(grid, block.patch_embed.pool)
                if isinstance(block, NextTransformerBlock):
                    layouts.append(_layout(block.e_mhsa, grid))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return nextvit_attention_hooks(attention, record)


def _layout(attention: EfficientAttention, grid: Tuple[int, int]) -> BlockLayout:
    """The block's grid; with reduced keys, each key on the run of cells it averages (a run
    the pooling leaves over at the end of the map is read by no key)."""
    run = attention.N_ratio
    if attention.sr is None or run == 1:
        return BlockLayout(grid)
    keys = grid[0] * grid[1] // run
    return BlockLayout(grid, positions=torch.arange(keys * run).view(1, keys, run))
