"""torchvision ``MaxVit`` (maxvit_t): block and grid attention between MBConv blocks, no [class]
token, the classifier averages the last stage.

Every ``MaxVitLayer`` runs an MBConv, then a ``PartitionAttentionLayer`` over windows of the
stage grid (``partition_type='window'``) and one over sparse grids strided over it
(``'grid'``: the partition of the blocks of the grid, its two window axes swapped, so that the
tokens of one window lie a stage-size / partition-size apart). Each calls a
``RelativePositionalMultiHeadAttention`` on (B, windows, tokens, C): q, k, v from ``to_qkv``
(all queries, then keys, then values), the keys scaled by ``feat_dim ** -0.5`` (the module's
``scale_factor``), a learned relative position bias in the logits, the heads merged by
``merge``. These are timm's ``window_partition`` and ``grid_partition`` layouts, so each
window's token map is laid on the stage grid by
:func:`~captum_daam.adapters.windows.window_positions`. torchvision fixes every layer's grid
when the model is built: the model takes only images of the size it was built for (224x224
for maxvit_t). The stem and the MBConv blocks are not blocks of the flow.
"""

from typing import List, Optional, Tuple

from timm.models.maxxvit import grid_partition, window_partition
from torch import Tensor, nn
from torchvision.models import maxvit as tv_maxvit

from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockLayout, BlockRecord, Hook, register_adapter
from .pooled import PooledAdapter
from .windows import window_positions

__all__ = ["TorchvisionMaxVitAdapter"]


def relative_attention_hooks(attention: nn.Module, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of torchvision's
    ``RelativePositionalMultiHeadAttention`` on (B, G, P, C): B * G windows of P tokens."""
    heads = attention.n_heads

    def on_qkv(module: nn.Module, args: tuple, qkv: Tensor) -> None:
        # (B, G, P, 3 * H * d) -> (3, B * G, H, P, d), as the module's chunk and reshapes.
        parts = qkv.detach().flatten(0, 1).unflatten(-1, (3, heads, -1))
        queries, keys, values = parts.permute(2, 0, 3, 1, 4)
        bias, scale = attention.get_relative_positional_bias().detach(), attention.scale_factor
        row = class_attention_row(queries[:, :, 0], keys, scale, bias[..., 0, :])
        record.set_attention(
            row, values, SoftmaxAttention(queries, keys, scale, bias)
        )

    def on_merge(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        output = args[0]  # (B, G, P, H * d)
        watched = record.watch(output.flatten(0, 1))
        return (watched.reshape(output.shape),) + tuple(args[1:])

    return [
        Hook(attention.to_qkv, "forward", on_qkv),
        Hook(attention.merge, "pre", on_merge),
    ]


@register_adapter
class TorchvisionMaxVitAdapter(PooledAdapter):
    """torchvision ``MaxVit``: block and grid attention in every layer, every query row of
    every window explained, each stage on its own grid; images of the size the model was built
    for."""

    family = "torchvision MaxViT"
    examples = "maxvit_t"
    layer_example = "model.blocks[s].layers[i].layers.grid_attention.attn_layer[1]"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, tv_maxvit.MaxVit)

    def _partitions(self) -> List[Tuple[nn.Module, Tuple[int, int]]]:
        """Every ``PartitionAttentionLayer`` in forward order, with its stage grid."""
        return [
            (part, tuple(block.grid_size))
            for block in self.model.blocks
            for layer in block.layers
            for part in (layer.layers.window_attention, layer.layers.grid_attention)
        ]

    def attention_modules(self) -> List[nn.Module]:
        return [part.attn_layer[1] for part, _ in self._partitions()]

    @property
    def in_channels(self) -> Optional[int]:
        return self.model.stem[0][0].in_channels

    @property
    def num_outputs(self) -> Optional[int]:
        return self.model.classifier[-1].out_features

    @property
    def outputs_features(self) -> bool:
        return False

    def stage_grids(self, image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """The grid of every stage for images of ``image_size``, as torchvision computes it
        (3x3 convolutions of stride 2 and padding 1: the stem's, then each stage's first)."""
        def halved(grid: Tuple[int, int]) -> Tuple[int, int]:
            return tuple((size - 1) // 2 + 1 for size in grid)

        grid, grids = halved(image_size), []
        for _ in self.model.blocks:
            grid = halved(grid)
            grids.append(grid)
        return grids

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        built = [tuple(block.grid_size) for block in self.model.blocks]
        if self.stage_grids(image_size) != built:
            raise ValueError(
                f"This MaxVit was built for images whose stage grids are {built} (torchvision "
                f"fixes them when it builds the model: maxvit_t takes 224x224 images), got "
                f"{image_size[0]}x{image_size[1]} images. Resize the images, or build the "
                f"model with input_size={tuple(image_size)}."
            )
        layouts = []
        for part, grid in self._partitions():
            size = (part.attn_layer[1].size,) * 2  # the partition size
            partition = grid_partition if part.partition_type == "grid" else window_partition
            layouts.append(BlockLayout(grid, 0, window_positions(grid, size, (0, 0), partition)))
        return layouts

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return relative_attention_hooks(attention, record)
