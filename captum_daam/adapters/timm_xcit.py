"""timm ``Xcit`` (XCiT: xcit_nano_12_p16_224, xcit_small_12_p8_224, xcit_medium_24_p16_224, ...).

XCiT's cross-covariance blocks mix channels, not tokens, and have no [class] token; the
[class] token is prepended afterwards and reads the patches in the class-attention blocks
(``model.cls_attn_blocks``, CaiT's ``ClassAttn``). The DAAM flow runs over those blocks.

The convolutional patch embedding and the Fourier position encoding take any image size:
the grid is what the stride-2 convolutions give, row-major as ``flatten(2)`` lays it out.
"""

from typing import Tuple

from timm.models.xcit import Xcit
from torch import nn

from .base import output_grid, register_adapter
from .timm_cait import ClassAttentionAdapter


@register_adapter
class TimmXcitAdapter(ClassAttentionAdapter):
    """timm ``Xcit``: the flow runs over the class-attention blocks, ``model.cls_attn_blocks``."""

    family = "timm XCiT (class-attention blocks)"
    examples = "xcit_nano_12_p16_224, xcit_small_12_p8_224, xcit_medium_24_p16_224"
    layer_example = "model.cls_attn_blocks[i].attn"
    blocks_name = "cls_attn_blocks"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, Xcit)

    def grid_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        height, width = image_size
        for layer in self.model.patch_embed.proj.modules():
            if isinstance(layer, nn.Conv2d):
                height, width = output_grid((height, width), layer)
        if height < 1 or width < 1:
            raise ValueError(
                f"Expected images large enough for at least one patch, got "
                f"{image_size[0]}x{image_size[1]}. Use larger images."
            )
        return height, width
