"""Hugging Face transformers ``SwinModel``, ``SwinForImageClassification``, ``Swinv2Model`` and
``Swinv2ForImageClassification`` (transformers 5.x): windowed attention, no [class] token, the
pooler averages the last stage's tokens.

Every ``SwinLayer`` / ``Swinv2Layer`` pads its token grid at the bottom and right to whole
windows, then shifts it cyclically (every other block), partitions it and runs attention on a
batch of B * W windows. The logits hold the relative position bias (Swin: a learned table;
Swinv2: 16 * sigmoid of its continuous position bias MLP) and, in shifted blocks, the mask that
keeps regions apart (Swinv2 adds it twice, as its ``Swinv2SelfAttention`` does); Swinv2's
attention is cosine attention with a clamped per-head logit scale. Each window's token map is
laid back on the stage's grid with the shift and the padding undone
(:func:`~captum_daam.adapters.windows.window_positions`, running transformers' own
``window_partition`` on a grid of cell indices). Swin's layers decide their window at the call:
a stage grid no wider than the window drops the shift (``set_shift_and_window_size``), and a
grid narrower than the window cannot run at all, so such images are refused before any work.
Swinv2's layers fix window and shift when the model is built. One grid per stage (the patch
grid, halved, rounded up, by the patch merging that ends every stage but the last); the flow
lies on the finest. Every query row is explained (no [class] token).

transformers is never imported here: :meth:`HFSwinAdapter.supports` looks the classes up in
``sys.modules``.
"""

import math
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockLayout, BlockRecord, Hook, loaded_classes, register_adapter
from .hf import TransformersHead
from .pooled import PooledAdapter
from .timm_swin import _window_bias
from .windows import window_positions

__all__ = ["HFSwinAdapter"]

_SWIN_MODULE = "transformers.models.swin.modeling_swin"
_SWINV2_MODULE = "transformers.models.swinv2.modeling_swinv2"
_CLASS_NAMES = {
    _SWIN_MODULE: ("SwinModel", "SwinForImageClassification"),
    _SWINV2_MODULE: ("Swinv2Model", "Swinv2ForImageClassification"),
}


def _swin_classes(module_name: str) -> Tuple[type, ...]:
    """The bare model and the classifier of one of the two modeling modules, if it is loaded."""
    return loaded_classes(module_name, _CLASS_NAMES[module_name])


def _partition(modeling: object) -> Callable[[Tensor, Tuple[int, int]], Tensor]:
    """transformers' ``window_partition`` (square windows given as one int) in the signature
    :func:`window_positions` calls."""
    return lambda cells, window: modeling.window_partition(cells, window[0])


def _continuous_position_bias(self_attention: nn.Module) -> Tensor:
    """Swinv2's relative position bias, 16 * sigmoid(MLP(log coordinates)), as its
    ``Swinv2SelfAttention`` forms it, (1, H, N, N)."""
    heads = self_attention.num_attention_heads
    table = self_attention.continuous_position_bias_mlp(self_attention.relative_coords_table)
    area = self_attention.window_size[0] * self_attention.window_size[1]
    bias = table.view(-1, heads)[self_attention.relative_position_index.view(-1)]
    return (16 * torch.sigmoid(bias.view(area, area, heads).permute(2, 0, 1))).unsqueeze(0)


def hf_window_attention_hooks(attention: nn.Module, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of transformers' ``SwinAttention`` or
    ``Swinv2Attention`` on B * W windows.

    The query, keys and values come from the projections (Swin's ``q_proj`` / ``k_proj`` /
    ``v_proj``; Swinv2's ``self.query`` / ``self.key`` / ``self.value``), split into heads as
    the module does; the shift mask from the call. The head-concatenated output is watched
    where it enters the output projection (``o_proj``; ``output.dense``).
    """
    cosine = not hasattr(attention, "q_proj")
    inner = attention.self if cosine else attention
    heads = inner.num_attention_heads
    projections = (inner.query, inner.key, inner.value) if cosine else (
        inner.q_proj, inner.k_proj, inner.v_proj)
    call: Dict[str, Optional[Tensor]] = {}

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    def keep(part: str) -> Callable:
        def on_projection(module: nn.Module, args: tuple, projected: Tensor) -> None:
            # (B_, N, H * d) -> (B_, H, N, d), as the module's view(...).transpose(1, 2).
            call[part] = projected.detach().unflatten(-1, (heads, -1)).transpose(1, 2)

        return on_projection

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        queries, keys, values = (call.pop(part) for part in ("queries", "keys", "values"))
        mask = call.pop("mask")
        with torch.no_grad():
            if cosine:
                logit_scale = torch.clamp(inner.logit_scale, max=math.log(1.0 / 0.01)).exp()
                queries = F.normalize(queries, dim=-1) * logit_scale
                keys, scale = F.normalize(keys, dim=-1), 1.0
                relative_bias = _continuous_position_bias(inner)
                mask = None if mask is None else 2 * mask  # Swinv2SelfAttention adds it twice
            else:
                relative_bias, scale = inner.relative_position_bias(), inner.scaling
            bias = _window_bias(relative_bias.detach(), mask, queries.shape[0])
            row = class_attention_row(queries[:, :, 0], keys, scale, bias[..., 0, :])

        record.set_attention(row, values, SoftmaxAttention(queries, keys, scale, bias))
        return (record.watch(args[0]),) + tuple(args[1:])

    output_projection = attention.output.dense if cosine else attention.o_proj
    return [Hook(inner, "pre_kwargs", on_call)] + [
        Hook(projection, "forward", keep(part))
        for projection, part in zip(projections, ("queries", "keys", "values"))
    ] + [Hook(output_projection, "pre", on_pre_projection)]


def _refuse_always_partition(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """A SwinLayer pre-hook: the layouts follow its window rule without ``always_partition``."""
    if kwargs.get("always_partition", args[2] if len(args) > 2 else False):
        raise ValueError(
            "Expected the Swin model to be called without always_partition (its layers then "
            "drop the shift on stage grids no wider than the window), got "
            "always_partition=True. Call the model without it to explain it with DAAM."
        )


@register_adapter
class HFSwinAdapter(TransformersHead, PooledAdapter):
    """transformers ``SwinModel``, ``SwinForImageClassification``, ``Swinv2Model`` and
    ``Swinv2ForImageClassification``: every query row of every window explained, each stage on
    its own grid; any image size the model takes (padded to whole patches and windows).

    Args:
        model: one of the four classes; a bare model with its pooling layer, whose
            ``pooler_output`` (the averaged tokens) is explained.
        interpolate_pos_encoding: set when a Swin with absolute position embeddings
            (``use_absolute_embeddings``) is called with ``interpolate_pos_encoding=True``, so
            that images of any size divisible by the patch size are accepted; otherwise such a
            model takes only its configured image size. Swinv2 cannot interpolate them.
    """

    family = "Hugging Face transformers Swin Transformer (Swin, Swinv2)"
    examples = (
        "SwinForImageClassification, SwinModel, Swinv2ForImageClassification, Swinv2Model, "
        "e.g. microsoft/swin-tiny-patch4-window7-224"
    )
    layer_example = (
        "model.swin.encoder.layers[s].blocks[i].attention (model.swinv2... for Swinv2, "
        "model.encoder... for a bare model)"
    )

    def __init__(self, model: nn.Module, interpolate_pos_encoding: bool = False) -> None:
        super().__init__(model)
        if not self.supports(model):
            raise TypeError(
                f"Expected a transformers {', '.join(_CLASS_NAMES[_SWIN_MODULE])}, "
                f"{' or '.join(_CLASS_NAMES[_SWINV2_MODULE])}, got a {type(model).__name__}. "
                f"Use adapter_for(model) to find the adapter of its family."
            )
        self.backbone = next(
            (getattr(model, name) for name in ("swinv2", "swin") if hasattr(model, name)), model
        )
        self.v2 = isinstance(model, _swin_classes(_SWINV2_MODULE))

        self.interpolate_pos_encoding = interpolate_pos_encoding
        if self.backbone.pooler is None:
            raise TypeError(
                f"DAAM explains class scores or pooled features (B, K), but this "
                f"{type(self.backbone).__name__} was built with add_pooling_layer=False, so it "
                f"returns token features only. Build it with add_pooling_layer=True."
            )
        absolute = self.backbone.embeddings.position_embeddings is not None
        if self.v2 and absolute and interpolate_pos_encoding:
            raise TypeError(
                "Expected a Swinv2 called at its configured image size: transformers' Swinv2 "
                "cannot interpolate its absolute position embeddings (it expects a [class] "
                "position). Build the adapter without interpolate_pos_encoding."
            )
        for stage_index, stage in enumerate(self._stages()):
            for block_index, block in enumerate(stage.blocks):
                attention = block.attention
                parts = (("self", "output") if self.v2 else
                         ("q_proj", "k_proj", "v_proj", "o_proj", "relative_position_bias"))
                missing = [name for name in parts if not hasattr(attention, name)]
                if missing:
                    raise TypeError(
                        f"Block {block_index} of stage {stage_index} of this "
                        f"{type(model).__name__} uses {type(attention).__name__} without "
                        f"{', '.join(missing)}; the {self.family} adapter supports the "
                        f"attention of transformers 5. Upgrade transformers "
                        f"(pip install -U transformers) to explain it with DAAM."
                    )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        classes = _swin_classes(_SWIN_MODULE) + _swin_classes(_SWINV2_MODULE)
        return bool(classes) and isinstance(model, classes)

    def _stages(self) -> List[nn.Module]:
        return list(self.backbone.encoder.layers)

    def attention_modules(self) -> List[nn.Module]:
        return [block.attention for stage in self._stages() for block in stage.blocks]

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        hooks = hf_window_attention_hooks(attention, record)
        if not self.v2:
            layer = next(block for stage in self._stages() for block in stage.blocks
                         if block.attention is attention)
            hooks.append(Hook(layer, "pre_kwargs", _refuse_always_partition))
        return hooks

    def _check_image_size(self, image_size: Tuple[int, int]) -> None:
        """Refuse sizes the absolute position embeddings (where there are any) cannot take."""
        if self.backbone.embeddings.position_embeddings is None:
            return
        height, width = image_size
        patch_h, patch_w = self.backbone.embeddings.patch_embeddings.patch_size
        if self.interpolate_pos_encoding:
            if height % patch_h or width % patch_w:
                raise ValueError(
                    f"Expected image height and width divisible by the patch size "
                    f"{patch_h}x{patch_w} (interpolated position embeddings), got "
                    f"{height}x{width}. Resize or pad the images."
                )
            return
        expected_h, expected_w = to_2tuple(self.backbone.config.image_size)
        if (height, width) != (expected_h, expected_w):
            advice = "" if self.v2 else (
                ", or call the model with interpolate_pos_encoding=True and build the adapter "
                "with HFSwinAdapter(model, interpolate_pos_encoding=True)"
            )
            raise ValueError(
                f"This {type(self.backbone).__name__} takes {expected_h}x{expected_w} images "
                f"(absolute position embeddings), got {height}x{width}. Resize the "
                f"images{advice}."
            )

    def stage_grids(self, image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """The token grid of every stage: the patch grid (images padded to whole patches),
        halved (rounded up) by the patch merging that ends each stage but the last.

        Raises:
            ValueError: when the model cannot take images of that size.
        """
        self._check_image_size(image_size)
        patch_h, patch_w = self.backbone.embeddings.patch_embeddings.patch_size
        grid = (-(-image_size[0] // patch_h), -(-image_size[1] // patch_w))
        grids = []
        for stage in self._stages():
            grids.append(grid)
            if stage.downsample is not None:
                grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        return grids

    def _window_and_shift(
        self, block: nn.Module, grid: Tuple[int, int], stage_index: int,
        image_size: Tuple[int, int],
    ) -> Tuple[int, int]:
        """The window and shift ``block`` runs with on ``grid``: Swinv2's as built; Swin's
        as its ``set_shift_and_window_size`` sets them, refused where they cannot run."""
        window, shift = int(block.window_size), int(block.shift_size)
        if self.v2:
            return window, shift
        if min(grid) <= window:  # transformers' set_shift_and_window_size
            window, shift = min(grid), 0
        bias_window = block.attention.relative_position_bias.window_size[0]
        if window != bias_window and min(grid) < bias_window:
            patch = max(self.backbone.embeddings.patch_embeddings.patch_size)
            smallest = patch * (bias_window - 1) * 2 ** (len(self._stages()) - 1) + 1
            raise ValueError(
                f"Expected images giving every stage a grid of at least {bias_window} tokens a "
                f"side (this Swin's windows of {bias_window}x{bias_window} cannot shrink: its "
                f"relative position bias is fixed), got {image_size[0]}x{image_size[1]}, a "
                f"{grid[0]}x{grid[1]} grid in stage {stage_index}. Use images of at least "
                f"{smallest} pixels a side."
            )
        if window != bias_window:
            raise ValueError(
                f"Expected Swin layers with windows of {bias_window} (their relative position "
                f"bias), got a layer left with windows of {window} by an earlier call on "
                f"images too small for it (transformers shrinks them in place). Build or load "
                f"the model again."
            )
        return window, shift

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        layouts = []
        partition = _partition(self.modeling)  # looked up at use: a module cannot be pickled
        for stage_index, (stage, grid) in enumerate(
            zip(self._stages(), self.stage_grids(image_size))
        ):
            for block in stage.blocks:
                window, shift = self._window_and_shift(block, grid, stage_index, image_size)
                positions = window_positions(
                    grid, (window, window), (shift, shift), partition, pad_first=True
                )
                layouts.append(BlockLayout(grid, 0, positions))
        return layouts

    @property
    def modeling(self):
        """transformers' modeling module of this Swin (V1 or V2)."""
        return sys.modules[_SWINV2_MODULE if self.v2 else _SWIN_MODULE]

    def _feature_width(self) -> int:
        return self.backbone.num_features
