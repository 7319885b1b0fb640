"""timm's VLM vision towers with RoPE attention: Qwen3-VL / Qwen3.5 (``qwen3_vit_*``) and
DeepSeek-V4 (``deepseek_vit_*``). No [class] or register tokens; the classifiers average the
patch tokens (after the tower's own projector where ``encoder_pool`` keeps it).

Every block's attention is timm's ``AttentionRope`` (one fused ``qkv``, 2-D rotary embedding
with ``rotate_half``, no mask), read by :func:`~captum_daam.adapters.timm_eva.
eva_attention_hooks`; the tokens are the patches row by row, any image size the patch
embedding takes. The towers' projectors after the last block (Qwen's 2x2 patch merger,
DeepSeek's 3x3 aligner: an unshuffle and an MLP) are part of the head, not blocks of the flow.
An encoder (``*_enc``) whose output is the projector's tokens rather than pooled features is
refused: build it with ``global_pool='avg'``, or use the classifier.
"""

from typing import ClassVar, List, Tuple, Type

from timm.models.deepseek_vit import DeepseekVitClassifier, DeepseekVitEncoder
from timm.models.qwen3_vit import Qwen3VitClassifier, Qwen3VitEncoder
from torch import nn

from .base import BlockLayout, BlockRecord, Hook, register_adapter
from .pooled import PooledAdapter, patch_grid
from .timm_eva import eva_attention_hooks

__all__ = ["VisionTowerAdapter", "TimmQwen3VitAdapter", "TimmDeepseekVitAdapter"]


class VisionTowerAdapter(PooledAdapter):
    """What timm's VLM vision towers share: an encoder (the model, or the classifier's
    ``encoder``) with ``patch_embed`` and ``blocks`` whose ``attn`` is the attention; a
    subclass names the classes (and, for the RoPE towers, the projector an encoder may end
    with). The layouts and hooks here are the RoPE towers' (timm's ``PatchEmbed``,
    ``AttentionRope``)."""

    encoder_types: ClassVar[Tuple[Type[nn.Module], ...]] = ()
    projector_name: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        encoder = self._encoder()
        projector = getattr(encoder, self.projector_name, None) if self.projector_name else None
        if encoder is model and projector is not None:
            raise TypeError(
                f"This {type(model).__name__} returns its projector's tokens (global_pool="
                f"{model.global_pool!r}), not class scores or features. Build it with "
                f"global_pool='avg' for pooled features, or use the classifier (the name "
                f"without _enc) with a head."
            )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.encoder_types)

    def _encoder(self) -> nn.Module:
        return getattr(self.model, "encoder", self.model)

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for block in self._encoder().blocks]

    @property
    def in_channels(self) -> int:
        return self._encoder().patch_embed.proj.in_channels

    @property
    def outputs_features(self) -> bool:
        return getattr(self.model, "num_classes", 0) == 0  # an encoder has no classifier

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = patch_grid(self._encoder().patch_embed, image_size)
        return [BlockLayout(grid) for _ in self.attention_modules()]

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return eva_attention_hooks(attention, record)


@register_adapter
class TimmQwen3VitAdapter(VisionTowerAdapter):
    """timm ``Qwen3VitClassifier`` / ``Qwen3VitEncoder`` (Qwen3-VL, Qwen3.5 vision towers):
    every query row of every block; any image size divisible by the patch."""

    family = "timm Qwen3-VL vision tower"
    examples = "qwen3_vit_88m, qwen3_vit_306m, qwen3_vit_416m (and _merge)"
    layer_example = "model.encoder.blocks[i].attn"
    encoder_types = (Qwen3VitClassifier, Qwen3VitEncoder)
    projector_name = "merger"


@register_adapter
class TimmDeepseekVitAdapter(VisionTowerAdapter):
    """timm ``DeepseekVitClassifier`` / ``DeepseekVitEncoder`` (DeepSeek-V4 vision tower):
    every query row of every block; any image size divisible by the patch (any size with
    ``dynamic_img_pad``)."""

    family = "timm DeepSeek-V4 vision tower"
    examples = "deepseek_vit_412m (and _align)"
    layer_example = "model.encoder.blocks[i].attn"
    encoder_types = (DeepseekVitClassifier, DeepseekVitEncoder)
    projector_name = "aligner"
