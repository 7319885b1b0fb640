"""torchvision ``VisionTransformer`` (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14, and
models built from the class, with or without a convolutional stem), whose blocks run
``torch.nn.MultiheadAttention``."""

from typing import List, Optional, Tuple

from torch import nn
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

from .base import BlockRecord, Hook, ViTAdapter, register_adapter
from .multihead import multihead_attention_hooks


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
