"""timm ``CoaT`` (coat_lite_tiny, coat_lite_mini, ..., coat_tiny, coat_mini, coat_small).

CoaT runs four serial stages on four grids (patch sizes 4, 8, 16 and 32 pixels: 56x56,
28x28, 14x14 and 7x7 at 224x224). Each stage has its own [class] token, which is dropped
when the stage's patch tokens are embedded for the next. CoaT-Lite classifies from the
last stage's [class] token; CoaT (non-lite) then runs parallel blocks over stages 2-4 at
once, each with one attention per stage (``factoratt_crpe2/3/4``) whose outputs, [class]
rows included, are mixed across the stages, and classifies from the three [class] tokens
(``aggregate``).

Every block's attention is ``FactorAttnConvRelPosEnc``: factorised attention plus a
convolutional relative position encoding,

    out = scale * q @ (softmax_over_tokens(k)^T @ v) + crpe(q, v),

and ``crpe`` is zero on the [class] row (timm pads its output with a zero row there). So the
[class] row of the output is exactly sum_n a[h, n] v[h, n] with the coefficients
a[h, n] = scale * <q_cls[h], softmax_over_tokens(k)[h, n]> (not probabilities: they may be
negative and need not sum to one). Those are recorded as the [class] "attention" row, and the
DAAM block map splits the [class] output over the tokens as for softmax attention.

The flow runs over every attention in forward order: the serial blocks stage by stage, then
each parallel block's three attentions. A block is in the branch of its stage (0-3, a
parallel attention in the branch of the stage it runs on) and reads that stage's grid.

The last serial block of a stage whose [class] token is then dropped (stages 1-3 of
CoaT-Lite, stage 1 of CoaT) changes only that token after its attention, so the target score
does not depend on its [class] row: its block map is zero, exactly.
"""

from typing import List, Optional, Sequence, Tuple

from timm.models.coat import CoaT, FactorAttnConvRelPosEnc
from torch import Tensor, nn

from ..decompose import factorized_class_coefficients
from .base import (
    BlockLayout,
    BlockRecord,
    Hook,
    ViTAdapter,
    register_adapter,
    watch_first_input,
)


def factorized_attention_hooks(
    attention: FactorAttnConvRelPosEnc, record: BlockRecord
) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``FactorAttnConvRelPosEnc``: the
    [class] coefficients and the values from ``qkv``, and the head-concatenated output
    (B, N, C) watched where it enters ``proj``. There are no attention probabilities for
    the patch rows (``crpe`` mixes each channel on its own), so no full attention is given.
    """
    heads = attention.num_heads

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        # (B, N, 3 * H * d) -> (3, B, H, N, d), as timm's reshape(B, N, 3, H, d).permute.
        queries, keys, values = qkv.detach().unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
        row = factorized_class_coefficients(queries[:, :, 0], keys, attention.scale)
        record.set_attention(row, values)

    return [
        Hook(attention.qkv, "forward", on_qkv),
        Hook(attention.proj, "pre", watch_first_input(record)),
    ]


_STAGES = (1, 2, 3, 4)


@register_adapter
class TimmCoatAdapter(ViTAdapter):
    """timm ``CoaT`` and CoaT-Lite, with their [class] tokens read by the head
    (``global_pool='token'``, the default), as created (not pruned, no
    ``return_interm_layers``)."""

    family = "timm CoaT (factorised attention)"
    examples = (
        "coat_lite_tiny, coat_lite_mini, coat_lite_small, coat_lite_medium, coat_tiny, "
        "coat_mini, coat_small"
    )
    layer_example = (
        "model.serial_blocks1[i].factoratt_crpe or model.parallel_blocks[i].factoratt_crpe2"
    )
    #: False: only the [class] row of factorised attention is a weighted sum of the values;
    #: the other rows add the convolutional relative position encoding, which mixes each
    #: channel over a window, so there are no full attention matrices (no rollouts, no
    #: ``queries='all'``).
    self_attention = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        name = type(model).__name__
        if model.return_interm_layers:
            raise TypeError(
                f"DAAM explains class scores read from the [class] tokens, but this {name} was "
                f"built with return_interm_layers=True, so it returns a dict of feature maps "
                f"without them. Use a model built with return_interm_layers=False (the "
                f"default)."
            )
        pruned = [stage for stage in _STAGES if getattr(model, f"patch_embed{stage}") is None]
        if pruned or (model.parallel_blocks is not None and model.aggregate is None):
            what = f"stages {pruned}" if pruned else "the aggregation of its [class] tokens"
            raise TypeError(
                f"DAAM explains a whole CoaT's output, but this {name} was pruned "
                f"(prune_intermediate_layers removed {what}), so it no longer classifies from "
                f"the [class] tokens. Use the model as created."
            )
        if model.global_pool != "token":
            raise TypeError(
                f"DAAM explains the [class] tokens, but this {name} uses "
                f"global_pool={model.global_pool!r}, so its output is pooled from the patch "
                f"tokens, whose attention rows have no attention coefficients (the "
                f"convolutional relative position encoding mixes channels). Use "
                f"global_pool='token' (the default)."
            )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, CoaT)

    def _flow_modules(self) -> List[Tuple[nn.Module, int]]:
        """Every attention in forward order, with the index (0-3) of its stage."""
        model = self.model
        flow = [
            (block.factoratt_crpe, stage - 1)
            for stage in _STAGES
            for block in getattr(model, f"serial_blocks{stage}")
        ]
        for block in model.parallel_blocks or []:
            flow += [(getattr(block, f"factoratt_crpe{stage}"), stage - 1) for stage in (2, 3, 4)]
        return flow

    def attention_modules(self) -> List[nn.Module]:
        return [attention for attention, _ in self._flow_modules()]

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # each stage's [class] token

    @property
    def in_channels(self) -> Optional[int]:
        return self.model.in_chans

    @property
    def num_outputs(self) -> Optional[int]:
        return self.model.num_classes or self.model.num_features

    @property
    def outputs_features(self) -> bool:
        return self.model.num_classes == 0

    def stage_grids(self, image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """The patch grid of each stage: the grids of the patch embeddings, which take only
        the image size the model was built for.

        Raises:
            ValueError: for images of another size.
        """
        model = self.model
        expected = tuple(model.patch_embed1.img_size)
        if tuple(image_size) != expected:
            raise ValueError(
                f"This model takes {expected[0]}x{expected[1]} images (fixed patch grids "
                f"from {model.patch_embed1.grid_size[0]}x{model.patch_embed1.grid_size[1]} "
                f"down), got {image_size[0]}x{image_size[1]}. Resize the images."
            )
        return [tuple(getattr(model, f"patch_embed{stage}").grid_size) for stage in _STAGES]

    def block_layouts(
        self, attention_modules: Sequence[nn.Module], image_size: Tuple[int, int]
    ) -> List[BlockLayout]:
        grids = self.stage_grids(image_size)
        layout_of = {
            id(attention): BlockLayout(grids[stage], stage)
            for attention, stage in self._flow_modules()
        }
        return [layout_of[id(attention)] for attention in attention_modules]

    def grid_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        return max(self.stage_grids(image_size), key=lambda grid: grid[0] * grid[1])

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return factorized_attention_hooks(attention, record)
