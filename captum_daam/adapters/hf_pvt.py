"""Hugging Face transformers PVT (``PvtForImageClassification``, ``PvtModel``) and PVTv2
(``PvtV2ForImageClassification``, ``PvtV2Model``): attention over keys and values reduced
over the token grid.

Every query token attends to keys and values that the block first reduces: a strided
convolution (``sequence_reduction`` / ``spatial_reduction``, kernel and stride the ratio) and a
LayerNorm, or, for PVTv2's linear variant (``config.linear_attention``), an adaptive average
pooling to 7x7, a 1x1 convolution, a LayerNorm and a GELU; with ratio 1, the tokens
themselves. Each block's map therefore lies on its key / value grid, as in timm's PVTv2, and
is brought to the finest grid by area-weighted resampling. The patch embeddings are
convolutions, not blocks of the flow.

PVTv2 has no [class] token and its classifier averages the last stage: every query row is
explained. PVT (v1) appends a [class] token in front of the tokens of its last stage only (its
classifier, and the bare model's ``last_hidden_state[:, 0]``, read it): the blocks of the last
stage read it as a key that is no patch, and their [class] row is the paper's DAAM; the blocks
before have no [class] token and are explained from every query row whatever ``queries``
(:meth:`HFPvtAdapter.every_row_modules`).

transformers is never imported here: :meth:`supports` looks the classes up in ``sys.modules``.
"""

import math
from typing import Any, List, Tuple

import torch
from timm.layers import to_2tuple
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import (
    BlockLayout,
    BlockRecord,
    Hook,
    loaded_classes,
    output_grid,
    register_adapter,
    watch_first_input,
)
from .hf import TransformersHead
from .pooled import PooledAdapter

__all__ = ["HFPvtAdapter", "HFPvtV2Adapter", "hf_pvt_attention_hooks"]

_PVT_MODULE = "transformers.models.pvt.modeling_pvt"
_PVT_V2_MODULE = "transformers.models.pvt_v2.modeling_pvt_v2"


def hf_pvt_attention_hooks(
    self_attention: nn.Module, projection: nn.Module, record: BlockRecord
) -> List[Hook]:
    """Hooks that fill ``record`` from one call of transformers' ``PvtEfficientSelfAttention``
    or ``PvtV2SelfAttention``: the queries from ``query``, the (reduced) keys and values from
    ``key`` and ``value`` (split into heads as the module's ``transpose_for_scores`` does), the
    head-concatenated output watched where it enters ``projection``."""
    heads, width = self_attention.num_attention_heads, self_attention.attention_head_size
    scale = 1 / math.sqrt(width)  # the module divides the logits by sqrt(d)
    call = {}

    def split_heads(projected: Tensor) -> Tensor:
        # (B, N, H * d) -> (B, H, N, d)
        return projected.detach().unflatten(-1, (heads, width)).transpose(1, 2)

    def on_query(module: nn.Module, args: tuple, queries: Tensor) -> None:
        call["queries"] = split_heads(queries)

    def on_keys(module: nn.Module, args: tuple, keys: Tensor) -> None:
        call["keys"] = split_heads(keys)

    def on_values(module: nn.Module, args: tuple, values: Tensor) -> None:
        queries, keys = call.pop("queries"), call.pop("keys")
        row = class_attention_row(queries[:, :, 0], keys, scale)
        record.set_attention(row, split_heads(values), SoftmaxAttention(queries, keys, scale))

    return [
        Hook(self_attention.query, "forward", on_query),
        Hook(self_attention.key, "forward", on_keys),
        Hook(self_attention.value, "forward", on_values),
        Hook(projection, "pre", watch_first_input(record)),
    ]


class _HFPyramidAdapter(TransformersHead, PooledAdapter):
    """What transformers' PVT and PVTv2 share: the backbone under ``backbone_name`` in the
    classifier, the config's channels and widths, a ``classifier`` head (an ``nn.Identity``
    with ``num_labels=0``)."""

    backbone_name = ""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.backbone = getattr(model, self.backbone_name, model)

    def _feature_width(self) -> int:
        return self.backbone.config.hidden_sizes[-1]

    @staticmethod
    def _check_grid(grid: Tuple[int, int], image_size: Tuple[int, int], what: str) -> None:
        if min(grid) < 1:
            raise ValueError(
                f"Expected images large enough for every {what}, got "
                f"{image_size[0]}x{image_size[1]}. Use larger images."
            )


@register_adapter
class HFPvtV2Adapter(_HFPyramidAdapter):
    """transformers ``PvtV2ForImageClassification`` and ``PvtV2Model`` (spatial reduction or
    linear attention): every query row explained, each block on its key / value grid, any
    image size.

    The bare ``PvtV2Model`` returns the last stage as a feature map (B, C, h, w); the features
    explained are its average over the grid, what the classifier reads (:meth:`output_scores`).
    """

    family = "Hugging Face transformers PVTv2"
    examples = "PvtV2ForImageClassification, PvtV2Model, e.g. OpenGVLab/pvt_v2_b0"
    layer_example = "model.pvt_v2.encoder.layers[s].blocks[i].attention"
    backbone_name = "pvt_v2"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        classes = loaded_classes(_PVT_V2_MODULE, ("PvtV2Model", "PvtV2ForImageClassification"))
        # PvtV2Backbone subclasses PvtV2Model but returns a tuple of feature maps.
        backbones = loaded_classes(_PVT_V2_MODULE, ("PvtV2Backbone",))
        return bool(classes) and isinstance(model, classes) and not isinstance(model, backbones)

    def attention_modules(self) -> List[nn.Module]:
        return [block.attention for layer in self.backbone.encoder.layers
                for block in layer.blocks]

    def key_grids(self, image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """The key / value grid of every block, in block order, for images of
        ``image_size``: what its queries read."""
        grid, grids = tuple(image_size), []
        for layer in self.backbone.encoder.layers:
            grid = output_grid(grid, layer.patch_embedding.proj)
            self._check_grid(grid, image_size, "stage's patch embedding")
            for block in layer.blocks:
                attention = block.attention
                if attention.linear_attention:
                    key_grid = tuple(to_2tuple(attention.pool.output_size))
                elif attention.spatial_reduction_ratio > 1:
                    key_grid = output_grid(grid, attention.spatial_reduction)
                else:
                    key_grid = grid
                self._check_grid(key_grid, image_size, "block's spatial reduction")
                grids.append(key_grid)
        return grids

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        return [BlockLayout(grid) for grid in self.key_grids(image_size)]

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return hf_pvt_attention_hooks(attention, attention.proj, record)

    def output_scores(self, output: Any) -> Tensor:
        """The logits of the classifier; for the bare model, its last feature map
        ``last_hidden_state`` (B, C, h, w) averaged over the grid, as the classifier pools it."""
        if not isinstance(output, Tensor) and getattr(output, "logits", None) is None:
            last_hidden_state = getattr(output, "last_hidden_state", None)
            if isinstance(last_hidden_state, Tensor) and last_hidden_state.dim() == 4:
                return last_hidden_state.mean(dim=(-2, -1))
        return super().output_scores(output)


@register_adapter
class HFPvtAdapter(_HFPyramidAdapter):
    """transformers ``PvtForImageClassification`` and ``PvtModel`` (PVT v1): each block on its
    key / value grid; the blocks of the last stage, which has the [class] token, explained from
    its row (``queries='class'``, the default) or from every row (``queries='all'``); the
    blocks before from every row. Images of the configured ``image_size`` only: the position
    embeddings fix every stage's grid.
    """

    family = "Hugging Face transformers PVT"
    examples = "PvtForImageClassification, PvtModel, e.g. Xrenya/pvt-tiny-224"
    layer_example = "model.pvt.encoder.block[s][i].attention"
    backbone_name = "pvt"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        encoder = self.backbone.encoder
        for stage, (embedding, layers) in enumerate(zip(encoder.patch_embeddings, encoder.block)):
            reducing = [layer.attention.self.sequences_reduction_ratio > 1 for layer in layers]
            if embedding.cls_token is not None and any(reducing):
                raise TypeError(
                    f"Expected sequence reduction ratio 1 in the stage with the [class] token "
                    f"(stage {stage}), whose tokens cannot be laid on a grid to reduce, got "
                    f"{self.backbone.config.sequence_reduction_ratios[stage]}; such a PVT "
                    f"cannot run. Build it with sequence_reduction_ratios[{stage}] = 1."
                )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        classes = loaded_classes(_PVT_MODULE, ("PvtModel", "PvtForImageClassification"))
        return bool(classes) and isinstance(model, classes)

    def _stages(self) -> List[Tuple[nn.Module, List[nn.Module]]]:
        """(patch embedding, attention modules) of every stage."""
        encoder = self.backbone.encoder
        return [
            (embedding, [layer.attention for layer in layers])
            for embedding, layers in zip(encoder.patch_embeddings, encoder.block)
        ]

    def attention_modules(self) -> List[nn.Module]:
        return [attention for _, attentions in self._stages() for attention in attentions]

    def every_row_modules(self) -> List[nn.Module]:
        """The blocks of the stages before the [class] token is appended: none of their query
        rows is a [class] token, so every row is explained whatever ``queries``."""
        return [attention for embedding, attentions in self._stages()
                if embedding.cls_token is None for attention in attentions]

    @property
    def has_class_token(self) -> bool:
        return True

    @property
    def num_prefix_tokens(self) -> int:
        """0: no stage but the last has a prefix token; its blocks' layouts mark the [class]
        token among their keys."""
        return 0

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        side = self.backbone.config.image_size
        if tuple(image_size) != (side, side):
            raise ValueError(
                f"This PVT takes {side}x{side} images (its position embeddings fix every "
                f"stage's grid), got {image_size[0]}x{image_size[1]}. Resize the images."
            )
        grid, layouts = tuple(image_size), []
        for embedding, attentions in self._stages():
            grid = output_grid(grid, embedding.projection)
            self._check_grid(grid, image_size, "stage's patch embedding")
            positions = None
            if embedding.cls_token is not None:  # the [class] key first, then the grid
                positions = torch.arange(-1, grid[0] * grid[1]).unsqueeze(0)
            for attention in attentions:
                self_attention = attention.self
                key_grid = grid
                if self_attention.sequences_reduction_ratio > 1:
                    key_grid = output_grid(grid, self_attention.sequence_reduction)
                self._check_grid(key_grid, image_size, "block's sequence reduction")
                layouts.append(BlockLayout(key_grid, 0, positions))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return hf_pvt_attention_hooks(attention.self, attention.output.dense, record)
