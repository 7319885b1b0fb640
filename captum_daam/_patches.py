"""Images and SigLIP 2's patch sequences, both ways.

SigLIP 2 (transformers' ``Siglip2VisionModel``) takes an image as the sequence of its patches,
as its processor makes them (transformers' ``convert_image_to_patches``): patch rows, then
patch columns, each patch's pixels row by row with the channels last, plus a mask of the real
patches and each image's (rows, columns) of patches. DAAM explains images (B, C, H, W): these
two functions turn one form into the other exactly.
"""

from typing import Dict, Mapping

import torch
from torch import Tensor

__all__ = ["images_as_patches", "patches_as_images"]


def images_as_patches(images: Tensor, patch: int) -> Dict[str, Tensor]:
    """Images (B, C, H, W), sides multiples of ``patch``, as SigLIP 2's keyword arguments:
    ``pixel_values`` (B, N, p * p * C), ``pixel_attention_mask`` (B, N) of ones and
    ``spatial_shapes`` (B, 2)."""
    batch, channels, height, width = images.shape
    rows, columns = height // patch, width // patch
    patches = images.reshape(batch, channels, rows, patch, columns, patch)
    patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * columns, -1)
    return {
        "pixel_values": patches,
        "pixel_attention_mask": images.new_ones(batch, rows * columns, dtype=torch.long),
        "spatial_shapes": torch.tensor([[rows, columns]] * batch, device=images.device),
    }


def patches_as_images(features: Mapping, channels: int = 3) -> Tensor:
    """A SigLIP 2 processor's output (``pixel_values`` (B, N, p * p * C) with
    ``spatial_shapes``) as the images (B, C, H, W) its real patches make.

    Raises:
        ValueError: when the images of the batch have different patch grids (the processor
            keeps each image's aspect ratio), which no (B, C, H, W) tensor holds.
    """
    pixel_values, shapes = features["pixel_values"], features["spatial_shapes"]
    shapes = torch.as_tensor(shapes)
    if bool((shapes != shapes[0]).any()):
        raise ValueError(
            f"Expected one patch grid for the whole batch, got spatial_shapes "
            f"{shapes.tolist()}: the processor kept each image's aspect ratio. Explain the "
            f"images one at a time, or resize them to one size first."
        )
    rows, columns = (int(side) for side in shapes[0])
    patch = int(round((pixel_values.shape[-1] / channels) ** 0.5))
    real = pixel_values[:, : rows * columns]
    images = real.reshape(-1, rows, columns, patch, patch, channels)
    return images.permute(0, 5, 1, 3, 2, 4).reshape(-1, channels, rows * patch, columns * patch)
