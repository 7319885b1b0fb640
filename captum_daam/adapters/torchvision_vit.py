"""torchvision ``VisionTransformer`` (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14, and
models built from the class, with or without a convolutional stem), whose blocks run
``torch.nn.MultiheadAttention``."""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

from ..decompose import DeferredMixing, SoftmaxAttention, class_attention_row
from .base import BlockRecord, Hook, ViTAdapter, register_adapter

# nn.MultiheadAttention.forward's parameters, in order, to read a call's arguments by name.
_MHA_PARAMETERS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)


def multihead_attention_hooks(attention: nn.MultiheadAttention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one batch-first call of ``nn.MultiheadAttention``.

    The head-concatenated output before ``out_proj`` is not a module boundary (the projection
    runs inside the functional attention, or the fused fast path), so the pre-hook recomputes
    the [class] query, keys and values from ``in_proj_weight`` / ``in_proj_bias``, and the
    forward hook watches the projected output: out = O W_out^T + b, so the gradient at the
    [class] row of O is the gradient at the [class] row of out times W_out.
    """
    heads, width = attention.num_heads, attention.head_dim
    channels = attention.embed_dim

    def split_heads(projected: Tensor) -> Tensor:
        # (B, N, C) -> (B, H, N, d), channel c = h * d + e, as nn.MultiheadAttention splits it.
        return projected.unflatten(-1, (heads, width)).transpose(1, 2)

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = dict(zip(_MHA_PARAMETERS, args))
        call.update(kwargs)
        if (
            call.get("key_padding_mask") is not None
            or call.get("attn_mask") is not None
            or call.get("is_causal", False)
        ):
            raise ValueError(
                "DAAM's torchvision adapter expects unmasked self-attention (as torchvision's "
                "EncoderBlock calls it), got a call with an attention or key padding mask. "
                "Call the model without masks, or write an adapter that reads the mask."
            )
        weight = module.in_proj_weight.detach()
        bias = module.in_proj_bias
        biases = (None, None, None) if bias is None else bias.detach().split(channels)
        query_weight, key_weight, value_weight = weight.split(channels)
        with torch.no_grad():
            class_query = F.linear(call["query"][:, 0], query_weight, biases[0])
            keys = split_heads(F.linear(call["key"], key_weight, biases[1]))
            values = F.linear(call["value"], value_weight, biases[2])
            row = class_attention_row(class_query.unflatten(-1, (heads, width)), keys, width**-0.5)


        def every_query() -> SoftmaxAttention:  # formed when the backward pass reaches it
            queries = split_heads(F.linear(call["query"], query_weight, biases[0]))
            return SoftmaxAttention(queries, keys, width**-0.5)

        record.set_attention(row, split_heads(values), DeferredMixing(every_query))

    def on_output(module: nn.Module, args: tuple, output: Tuple[Tensor, Optional[Tensor]]):
        projected, attention_weights = output

        def to_pre_projection(class_row_gradient: Tensor) -> Tensor:
            projection = module.out_proj.weight.detach().to(class_row_gradient.dtype)
            return class_row_gradient @ projection

        watched = record.watch(projected, to_pre_projection=to_pre_projection)
        return (watched, attention_weights)

    return [
        Hook(attention, "pre_kwargs", on_call),
        Hook(attention, "forward", on_output),
    ]


@register_adapter
class TorchvisionVisionTransformerAdapter(ViTAdapter):
    """torchvision ``VisionTransformer``: a [class] token, then ``nn.MultiheadAttention`` in
    every ``EncoderBlock`` of ``model.encoder.layers``."""

    family = "torchvision VisionTransformer"
    examples = "torchvision.models.vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14"
    layer_example = "model.encoder.layers[i].self_attention"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for index, block in enumerate(model.encoder.layers):
            attention = getattr(block, "self_attention", None)
            if not isinstance(block, EncoderBlock) or not isinstance(
                attention, nn.MultiheadAttention
            ):
                raise TypeError(
                    f"Block {index} of this torchvision VisionTransformer is a "
                    f"{type(block).__name__} with attention {type(attention).__name__}; the "
                    f"torchvision adapter supports EncoderBlock with nn.MultiheadAttention. "
                    f"Write an adapter for this block type."
                )
            unsupported = [
                reason
                for reason, present in (
                    ("batch_first=False", not attention.batch_first),
                    ("separate kdim / vdim projections", not attention._qkv_same_embed_dim),
                    ("add_bias_kv=True", attention.bias_k is not None),
                    ("add_zero_attn=True", attention.add_zero_attn),
                )
                if present
            ]
            if unsupported:
                raise TypeError(
                    f"Block {index}'s nn.MultiheadAttention was built with "
                    f"{', '.join(unsupported)}; the torchvision adapter supports the "
                    f"batch-first self-attention that torchvision's EncoderBlock builds."
                )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def attention_modules(self) -> List[nn.Module]:
        return [block.self_attention for block in self.model.encoder.layers]

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return multihead_attention_hooks(attention, record)

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def in_channels(self) -> Optional[int]:
        # torchvision builds both the patch convolution and the convolutional stem for RGB.
        return 3

    @property
    def num_outputs(self) -> Optional[int]:
        heads = self.model.heads
        if isinstance(heads, nn.Identity):
            return self.model.hidden_dim
        last = heads[-1] if isinstance(heads, nn.Sequential) and len(heads) else heads
        return last.out_features if isinstance(last, nn.Linear) else None

    @property
    def outputs_features(self) -> bool:
        heads = self.model.heads
        return isinstance(heads, nn.Identity) or (isinstance(heads, nn.Sequential) and not heads)

    def grid_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        size, patch = self.model.image_size, self.model.patch_size
        if tuple(image_size) != (size, size):
            height, width = image_size
            raise ValueError(
                f"This model takes {size}x{size} images (a fixed {size // patch}x"
                f"{size // patch} patch grid), got {height}x{width}. Resize the images to "
                f"{size}x{size}."
            )
        return (size // patch, size // patch)
