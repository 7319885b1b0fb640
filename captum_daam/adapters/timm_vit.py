"""timm ``VisionTransformer`` and its subclasses (ViT, DeiT, DeiT-III, DINO, distilled DeiT,
register-token models), with timm's standard ``Attention``: fused or not, qk_norm, scale_norm,
gated, with an attention mask or causal, fixed or dynamic image size."""

from typing import List, Optional, Tuple

from timm.layers import Attention
from timm.layers.attention import resolve_self_attn_mask
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..decompose import class_attention_row
from .base import BlockRecord, Hook, ViTAdapter, register_adapter


def timm_attention_hooks(attention: Attention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's ``Attention``.

    They read the values from ``qkv``, the query and keys after ``q_norm`` / ``k_norm`` (so
    qk_norm is included), the mask from the call's arguments, and watch the head-concatenated
    output where it enters ``norm`` (identity unless scale_norm), before any gate and ``proj``.
    """
    heads, width = attention.num_heads, attention.head_dim
    call: dict = {}

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = args[0]
        attn_mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
        is_causal = kwargs.get("is_causal", args[2] if len(args) > 2 else False)
        bias = resolve_self_attn_mask(tokens.shape[1], tokens, attn_mask, is_causal)
        call["bias_row"] = None if bias is None else bias[..., 0, :].detach()

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        call["values"] = qkv.detach().unflatten(-1, (3, heads, width))[:, :, 2].transpose(1, 2)

    def on_query(module: nn.Module, args: tuple, query: Tensor) -> None:
        call["class_query"] = query.detach()[:, :, 0]

    def on_keys(module: nn.Module, args: tuple, keys: Tensor) -> None:
        row = class_attention_row(
            call.pop("class_query"), keys.detach(), attention.scale, call.pop("bias_row")
        )
        record.set_attention(row, call.pop("values"))

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        return (record.watch(args[0]),) + tuple(args[1:])

    return [
        Hook(attention, "pre_kwargs", on_call),
        Hook(attention.qkv, "forward", on_qkv),
        Hook(attention.q_norm, "forward", on_query),
        Hook(attention.k_norm, "forward", on_keys),
        Hook(attention.norm, "pre", on_pre_projection),
    ]


@register_adapter
class TimmVisionTransformerAdapter(ViTAdapter):
    """timm ``VisionTransformer`` with a [class] token and timm ``Attention`` in every block."""

    family = "timm VisionTransformer"
    examples = (
        "vit_*, deit_*, deit3_*, deit_*_distilled_*, DINO vit_*.dino, vit_*_reg4_dinov2, "
        "qk_norm / scale_norm variants, dynamic_img_size"
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if getattr(model, "cls_token", None) is None:
            raise TypeError(
                "DAAM explains the [class] token, but this VisionTransformer was built with "
                "class_token=False. Use a model with a [class] token."
            )
        for index, block in enumerate(model.blocks):
            attention = getattr(block, "attn", None)
            if not isinstance(attention, Attention):
                raise TypeError(
                    f"Block {index} of this VisionTransformer uses {type(attention).__name__} "
                    f"(block type {type(block).__name__}); the timm VisionTransformer adapter "
                    f"supports timm.layers.Attention. Write an adapter for this block type."
                )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for block in self.model.blocks]

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return timm_attention_hooks(attention, record)

    @property
    def num_prefix_tokens(self) -> int:
        return self.model.num_prefix_tokens

    @property
    def in_channels(self) -> Optional[int]:
        projection = getattr(self.model.patch_embed, "proj", None)
        return getattr(projection, "in_channels", None)

    @property
    def num_outputs(self) -> Optional[int]:
        return self.model.num_classes or self.model.num_features

    def grid_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        patch_embed = self.model.patch_embed
        height, width = image_size
        if self.model.dynamic_img_size:
            patch_h, patch_w = patch_embed.patch_size
            if not patch_embed.dynamic_img_pad and (height % patch_h or width % patch_w):
                raise ValueError(
                    f"Expected image height and width divisible by the patch size "
                    f"{patch_h}x{patch_w}, got {height}x{width}. Resize or pad the images."
                )
            return tuple(patch_embed.dynamic_feat_size((height, width)))
        if tuple(patch_embed.img_size) != (height, width):
            expected_h, expected_w = patch_embed.img_size
            raise ValueError(
                f"This model takes {expected_h}x{expected_w} images (a fixed "
                f"{patch_embed.grid_size[0]}x{patch_embed.grid_size[1]} patch grid), got "
                f"{height}x{width}. Resize the images, or build the model with "
                f"dynamic_img_size=True."
            )
        return tuple(patch_embed.grid_size)
