"""timm ``TinyVit`` (tiny_vit_*): windowed attention with attention biases after a convolution
stage, no [class] token, the head averages the last stage.

Every ``TinyVitBlock`` pads its grid at the bottom and right to whole windows (none when the
grid is one window), partitions it as Swin does and runs ``Attention`` on the B * W windows:
a LayerNorm, q, k and v from ``qkv`` (per head: key, key and value widths in a row), and a
learned bias per head and window offset (``attention_biases[:, attention_bias_idxs]``) in the
logits. Each window's token map is laid on the stage grid
(:func:`~captum_daam.adapters.windows.window_positions`, with timm's Swin partition); one grid
per stage, the flow on the finest. The patch embedding, the first stage (MBConv blocks), the
patch merging and each block's depthwise convolution between attention and MLP are
convolutions, not blocks of the flow.
"""

from typing import List, Tuple

from timm.models.swin_transformer import window_partition
from timm.models.tiny_vit import Attention as TinyVitAttention
from timm.models.tiny_vit import TinyVit, TinyVitBlock, TinyVitStage
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import (
    BlockLayout,
    BlockRecord,
    Hook,
    output_grid,
    register_adapter,
    watch_first_input,
)
from .pooled import PooledAdapter
from .windows import window_positions

__all__ = ["TimmTinyVitAdapter", "tiny_vit_attention_hooks"]


def tiny_vit_attention_hooks(attention: TinyVitAttention, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's TinyViT ``Attention`` on (B', N, C)
    window tokens: q, k, v from ``qkv``, the attention biases in the logits, the output watched
    where it enters ``proj``."""
    heads = attention.num_heads
    widths = [attention.key_dim, attention.key_dim, attention.val_dim]

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        # (B', N, H * (2 kd + vd)) -> q, k (B', H, N, kd) and v (B', H, N, vd), as the module.
        parts = qkv.detach().unflatten(-1, (heads, -1)).split(widths, dim=3)
        queries, keys, values = (part.transpose(1, 2) for part in parts)
        bias = attention.get_attention_biases(queries.device).detach()
        row = class_attention_row(queries[:, :, 0], keys, attention.scale, bias[:, 0])
        record.set_attention(
            row, values,
            SoftmaxAttention(queries, keys, attention.scale, bias.unsqueeze(0)),
        )

    return [
        Hook(attention.qkv, "forward", on_qkv),
        Hook(attention.proj, "pre", watch_first_input(record)),
    ]


@register_adapter
class TimmTinyVitAdapter(PooledAdapter):
    """timm ``TinyVit``: windowed attention with attention biases; every query row of every
    window explained, each stage on its own grid, any image size."""

    family = "timm TinyViT"
    examples = "tiny_vit_5m_224, tiny_vit_11m_224, tiny_vit_21m_224, tiny_vit_21m_512"
    layer_example = "model.stages[s].blocks[i].attn"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for stage_index, stage in enumerate(self._stages()):
            for block_index, block in enumerate(stage.blocks):
                if not isinstance(block, TinyVitBlock) or not isinstance(
                        block.attn, TinyVitAttention):
                    raise TypeError(
                        f"Block {block_index} of {type(model).__name__} stage {stage_index} is "
                        f"a {type(block).__name__}; the {self.family} adapter supports timm's "
                        f"TinyVitBlock with its Attention. Write an adapter for this block type."
                    )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, TinyVit)

    def _stages(self) -> List[nn.Module]:
        """The stages with attention (the first is a convolution stage)."""
        return [stage for stage in self.model.stages if isinstance(stage, TinyVitStage)]

    @property
    def in_channels(self) -> int:
        return self.model.patch_embed.conv1.conv.in_channels

    def attention_modules(self) -> List[nn.Module]:
        return [block.attn for stage in self._stages() for block in stage.blocks]

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = image_size
        for convolution in (self.model.patch_embed.conv1, self.model.patch_embed.conv2):
            grid = output_grid(grid, convolution.conv)
        layouts = []
        for stage in self._stages():
            if not isinstance(stage.downsample, nn.Identity):
                grid = output_grid(grid, stage.downsample.conv2.conv)
            if min(grid) < 1:
                raise ValueError(
                    f"Expected images large enough for every stage of this TinyVit, got "
                    f"{image_size[0]}x{image_size[1]}. Use larger images."
                )
            for block in stage.blocks:
                window = (block.window_size, block.window_size)
                positions = window_positions(grid, window, (0, 0), window_partition)
                layouts.append(BlockLayout(grid, 0, positions))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return tiny_vit_attention_hooks(attention, record)
