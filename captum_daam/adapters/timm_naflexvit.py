"""timm ``NaFlexVit``, explained on image tensors (B, C, H, W): the C-RADIO models
(naflexvit_*_radio_v3 / v4), the naflexvit_base / so150m2 / so400m models (no [class] token:
every query row; 'map' heads: an attention pool, the flow's last block) and any timm ViT or
EVA created with ``use_naflex=True`` (or TIMM_USE_NAFLEXVIT=true). Its blocks may
run timm's ``Attention`` (standard blocks), ``EvaAttention`` or ``AttentionRope`` (EVA blocks,
with rotary position embedding: axial, mixed, DINOv3); convolutional or linear (patchified)
patch embedding; learned, factorized or no absolute position embedding, interpolated to any
grid; register tokens; any image size divisible by the patch size (any size with
dynamic_img_pad).

``NaFlexEmbeds`` lays the tokens out as [class], registers, then the patch grid row by row:
for an image tensor the grid is (H // patch, W // patch), rounded up with dynamic_img_pad.
The attention hooks are those of the timm ViT and EVA adapters, which read the attention
mask and rotary embedding each block is called with.

Pre-patchified inputs and NaFlex patch dictionaries (variable resolutions packed with
padding) are not images of one grid, and DAAM takes only image tensors.
"""

from typing import List, Optional, Tuple

from timm.layers import Attention
from timm.layers.attention import AttentionRope
from timm.models.eva import EvaAttention
from timm.models.naflexvit import NaFlexVit
from torch import Tensor, nn

from .base import BlockRecord, Hook, register_adapter
from .timm_eva import eva_attention_hooks
from .timm_vit import TimmAdapter, timm_attention_hooks


@register_adapter
class TimmNaFlexVitAdapter(TimmAdapter):
    """timm ``NaFlexVit`` with timm ``Attention``, ``EvaAttention`` or ``AttentionRope`` in
    every block, on image tensors (B, C, H, W); with or without a [class] token, pooled by
    the [class] token, by averaging or by an attention pool (``global_pool='map'``)."""

    family = "timm NaFlexVit"
    examples = (
        "naflexvit_*_radio_v3, naflexvit_*_radio_v4, naflexvit_base_*, naflexvit_so400m_*, "
        "timm ViT / EVA models created with use_naflex=True"
    )
    attention_types = (Attention, EvaAttention, AttentionRope)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, NaFlexVit)

    def class_token(self) -> Optional[Tensor]:
        return self.model.embeds.cls_token

    def grid_size(self, image_size: Tuple[int, int]) -> Optional[Tuple[int, int]]:
        embeds = self.model.embeds
        height, width = image_size
        patch_h, patch_w = embeds.patch_size
        if not embeds.dynamic_img_pad and (height % patch_h or width % patch_w):
            raise ValueError(
                f"Expected image height and width divisible by the patch size "
                f"{patch_h}x{patch_w}, got {height}x{width}. Resize or pad the images, or "
                f"build the model with dynamic_img_pad=True."
            )
        return tuple(embeds.dynamic_feat_size((height, width)))

    def attention_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        if isinstance(attention, Attention):
            return timm_attention_hooks(attention, record)
        return eva_attention_hooks(attention, record)
