"""Hugging Face transformers ``HieraForImageClassification`` and ``HieraModel``: mask-unit and
global attention over unrolled tokens, the queries max-pooled where a stage starts; no
[class] token, the head averages the last tokens.

transformers' ``HieraMaskUnitAttention`` computes what timm's ``MaskUnitAttention`` does (the
same qkv layout, unit t mod W of a block's W units for token t, queries max-pooled over
``query_stride`` tokens N / query_stride apart), so timm's hooks serve it
(:func:`~captum_daam.adapters.timm_hiera.mask_unit_attention_hooks`). The cell of every token
comes from running the model's own ``unroll`` on a grid of cell indices, followed through each
pooling block as in timm's adapter; each block's map lies on the grid of the tokens it reads
and the flow on the finest grid by area-weighted resampling. The patch embedding is a
convolution, not a block of the flow.

transformers is never imported here: :meth:`HFHieraAdapter.supports` looks the classes up in
``sys.modules``.
"""

import math
import sys
from types import SimpleNamespace
from typing import Any, List, Tuple

import torch
from torch import Tensor, nn

from .base import (
    BlockLayout,
    BlockRecord,
    Hook,
    loaded_classes,
    output_grid,
    register_adapter,
)
from .hf import TransformersHead
from .pooled import PooledAdapter
from .timm_hiera import mask_unit_attention_hooks, pooled_cells

__all__ = ["HFHieraAdapter", "hf_mask_unit_attention_hooks"]

_HIERA_MODULE = "transformers.models.hiera.modeling_hiera"


def hf_mask_unit_attention_hooks(attention: nn.Module, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of transformers' ``HieraMaskUnitAttention``:
    timm's hooks, given the module's parts under timm's names (the hooks go on its own ``qkv``
    and ``proj``)."""
    timm_names = SimpleNamespace(
        heads=attention.num_heads,
        q_stride=attention.query_stride,
        head_dim=attention.head_dim,
        use_mask_unit_attn=attention.use_mask_unit_attn,
        window_size=attention.window_size,
        scale=attention.scale,
        qkv=attention.qkv,
        proj=attention.proj,
    )
    return mask_unit_attention_hooks(timm_names, record)


@register_adapter
class HFHieraAdapter(TransformersHead, PooledAdapter):
    """transformers ``HieraForImageClassification`` and ``HieraModel``: mask-unit and global
    attention with query pooling; every query row of every unit explained, each block on the
    grid of its keys.

    Args:
        model: a ``HieraForImageClassification`` or ``HieraModel`` (not in MAE mode).
        interpolate_pos_encoding: set when the model is called with
            ``interpolate_pos_encoding=True``, so that images of other sizes are accepted
            (their token grid a whole number of mask units); otherwise only the configured
            ``image_size`` is.
    """

    family = "Hugging Face transformers Hiera"
    examples = "HieraForImageClassification, HieraModel, e.g. facebook/hiera-tiny-224-hf"
    layer_example = "model.hiera.encoder.stages[s].layers[i].attn"

    def __init__(self, model: nn.Module, interpolate_pos_encoding: bool = False) -> None:
        super().__init__(model)
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.backbone = getattr(model, "hiera", model)
        if self.backbone.embeddings.is_mae:
            raise TypeError(
                "Expected a Hiera without MAE masking, got a HieraModel built with "
                "is_mae=True, whose forward drops random mask units. Build it with "
                "is_mae=False (the default) to explain it with DAAM."
            )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        classes = loaded_classes(_HIERA_MODULE, ("HieraModel", "HieraForImageClassification"))
        return bool(classes) and isinstance(model, classes)

    def _feature_width(self) -> int:
        return self.backbone.num_features

    def attention_modules(self) -> List[nn.Module]:
        return [layer.attn for stage in self.backbone.encoder.stages for layer in stage.layers]

    def output_scores(self, output: Any) -> Tensor:
        """The logits, or the bare model's ``pooler_output``; a ``HieraModel`` built without
        its pooler is refused: its first token is a patch, no [class] token."""
        unpooled = all(getattr(output, name, None) is None for name in ("logits", "pooler_output"))
        if unpooled and getattr(output, "last_hidden_state", None) is not None:
            raise ValueError(
                "Expected the Hiera to return logits or pooler_output, got a HieraModel "
                "output without pooler_output (built with add_pooling_layer=False), whose "
                "first token is a patch, not a [class] token. Build it with its pooler, or "
                "explain a forward function that returns the features (B, K) to explain."
            )
        return super().output_scores(output)

    def _token_grid(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """The token grid of images of ``image_size``, checked as the model needs it."""
        config = self.backbone.config
        height, width = image_size
        if not self.interpolate_pos_encoding:
            expected = tuple(config.image_size)
            if (height, width) != expected:
                raise ValueError(
                    f"This Hiera takes {expected[0]}x{expected[1]} images (its position "
                    f"embedding fixes them), got {height}x{width}. Resize the images, or call "
                    f"the model with interpolate_pos_encoding=True and build the adapter with "
                    f"HFHieraAdapter(model, interpolate_pos_encoding=True)."
                )
        stride = tuple(config.patch_stride)
        unit = [
            math.lcm(side, query ** len(self.backbone.unroll_schedule))
            for side, query in zip(config.masked_unit_size, config.query_stride)
        ]
        grid = output_grid(image_size, self.backbone.embeddings.patch_embeddings.projection)
        if grid != (height // stride[0], width // stride[1]) or grid[0] % unit[0] or (
                grid[1] % unit[1]):
            raise ValueError(
                f"Expected images whose height and width are multiples of "
                f"{unit[0] * stride[0]}x{unit[1] * stride[1]} (a whole number of "
                f"{unit[0]}x{unit[1]}-token mask units at patch stride "
                f"{stride[0]}x{stride[1]}), got {height}x{width}. Resize or pad the images."
            )
        return grid

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        height, width = self._token_grid(image_size)
        config = self.backbone.config
        # The model's own unroll, on a grid of cell indices: the cell of every token it reads.
        unroll = sys.modules[type(self.backbone).__module__].unroll
        cells = torch.arange(height * width, dtype=torch.float64).reshape(1, -1, 1)
        order = unroll(cells, image_shape=tuple(image_size), patch_stride=config.patch_stride,
                       schedule=self.backbone.unroll_schedule).reshape(-1).long()
        stride_h, stride_w = config.query_stride
        layouts = []
        for attention in self.attention_modules():
            pooled = attention.query_stride
            units = (len(order) // (pooled * attention.window_size)
                     if attention.use_mask_unit_attn else 1)
            # Token j * W + w lies in unit w.
            layouts.append(BlockLayout((height, width), 0, order.view(-1, units).T.contiguous()))
            if pooled > 1:
                (height, width), order = pooled_cells(order, pooled, width, (stride_h, stride_w))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return hf_mask_unit_attention_hooks(attention, record)
