"""What the families without a [class] token whose head averages the last tokens share
(Swin, SAM's encoder, PVTv2): no prefix tokens, every query row explained, a layout per
attention module computed from the image size, the flow on the finest of their grids."""

from abc import abstractmethod
from typing import List, Optional, Sequence, Tuple

from torch import nn

from .base import BlockLayout, ViTAdapter

__all__ = ["PooledAdapter", "patch_grid", "strided_grid", "conv_block_stride"]


def strided_grid(grid: Tuple[int, int], stride: int) -> Tuple[int, int]:
    """The grid an odd kernel with half-kernel padding makes of ``grid`` at ``stride``:
    ceil(size / stride) per side."""
    return tuple(-(-size // stride) for size in grid)


def conv_block_stride(block: nn.Module) -> int:
    """The stride of a block of convolutions (a strided main path and its strided shortcut
    count once): the largest stride of its Conv2d layers, 1 for none."""
    strides = [max(module.stride) for module in block.modules() if isinstance(module, nn.Conv2d)]
    return max(strides, default=1)


def patch_grid(patch_embed: nn.Module, image_size: Tuple[int, int]) -> Tuple[int, int]:
    """The patch grid timm's ``PatchEmbed`` makes of images of ``image_size``.

    Raises:
        ValueError: when it cannot take them: another size than its ``img_size`` with
            ``strict_img_size``, or a size not divisible by the patch without
            ``dynamic_img_pad``.
    """
    height, width = image_size
    patch_h, patch_w = patch_embed.patch_size
    if patch_embed.strict_img_size and tuple(patch_embed.img_size) != (height, width):
        expected_h, expected_w = patch_embed.img_size
        raise ValueError(
            f"This model takes {expected_h}x{expected_w} images (strict_img_size), got "
            f"{height}x{width}. Resize the images, or build the model with "
            f"strict_img_size=False (or call its set_input_size where it has one)."
        )
    padded = getattr(patch_embed, "dynamic_img_pad", False)
    if not padded and (height % patch_h or width % patch_w):
        raise ValueError(
            f"Expected image height and width divisible by the patch size "
            f"{patch_h}x{patch_w}, got {height}x{width}. Resize or pad the images."
        )
    return (-(-height // patch_h), -(-width // patch_w)) if padded else (
        height // patch_h, width // patch_w
    )


class PooledAdapter(ViTAdapter):
    """Base class of the adapters of models without a [class] token whose head pools the
    tokens. A subclass implements :meth:`layouts` (and the :class:`ViTAdapter` methods that
    find the modules and hook them); the channels, output width and pooling are read from
    timm's attributes (``in_chans`` or ``patch_embed.proj``, ``num_classes``,
    ``num_features``, ``global_pool``) where the model has them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if not getattr(model, "global_pool", "avg"):
            raise TypeError(
                f"DAAM explains class scores or features (B, K), but this "
                f"{type(model).__name__} has global_pool={model.global_pool!r}, so it returns "
                f"a feature map. Use global_pool='avg'."
            )

    @abstractmethod
    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        """The layout of every module of :meth:`attention_modules`, in that order, for
        images of ``image_size``.

        Raises:
            ValueError: when the model cannot take images of that size.
        """

    def block_layouts(
        self, attention_modules: Sequence[nn.Module], image_size: Tuple[int, int]
    ) -> List[BlockLayout]:
        layout_of = {
            id(attention): layout
            for attention, layout in zip(self.attention_modules(), self.layouts(image_size))
        }
        return [layout_of[id(attention)] for attention in attention_modules]

    def grid_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        grids = [layout.grid for layout in self.layouts(image_size)]
        return max(grids, key=lambda grid: grid[0] * grid[1])

    @property
    def has_class_token(self) -> bool:
        return False

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    @property
    def in_channels(self) -> Optional[int]:
        channels = getattr(self.model, "in_chans", None)
        if channels is None:
            projection = getattr(getattr(self.model, "patch_embed", None), "proj", None)
            channels = getattr(projection, "in_channels", None)
        return channels

    @property
    def num_outputs(self) -> Optional[int]:
        classes = getattr(self.model, "num_classes", None)
        return classes or getattr(self.model, "num_features", None)

    @property
    def outputs_features(self) -> bool:
        return getattr(self.model, "num_classes", None) == 0
