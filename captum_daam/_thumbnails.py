"""Small RGB pictures of the images a model was given, for looking at explanations later
(the viewer): the model's input un-normalised where the dataset says how, resized to a
longest side of at most :data:`THUMBNAIL_SIZE` pixels, as uint8 (B, h, w, 3)."""

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

#: The longest side of a stored thumbnail, in pixels.
THUMBNAIL_SIZE = 96


def thumbnail_shape(image_shape: Sequence[int], size: int = THUMBNAIL_SIZE) -> Tuple[int, int]:
    """(h, w) of the thumbnail of a (C, H, W) image: the longest side ``size`` at most, the
    aspect ratio kept."""
    height, width = int(image_shape[-2]), int(image_shape[-1])
    shrink = max(1.0, max(height, width) / size)
    return max(1, round(height / shrink)), max(1, round(width / shrink))


def input_normalisation(dataset: Any) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """The (mean, std) the dataset's transform normalises its images with, where it says:
    the package's timm preprocessing (image folders, Hugging Face datasets) or a torchvision
    ``Normalize``, alone or in a ``Compose``; None otherwise."""
    transform = getattr(dataset, "transform", None)
    config = getattr(transform, "config", None)
    if isinstance(config, dict) and getattr(transform, "normalize", False):
        return tuple(config["mean"]), tuple(config["std"])
    from torchvision.transforms import Compose, Normalize

    steps = transform.transforms if isinstance(transform, Compose) else [transform]
    for step in steps:
        if isinstance(step, Normalize):
            return tuple(step.mean), tuple(step.std)
    return None


def thumbnails(images: Tensor, shape: Tuple[int, int],
               normalisation: Optional[Tuple[Sequence[float], Sequence[float]]]) -> Tensor:
    """(B, C, H, W) model inputs -> (B, h, w, 3) uint8 pictures.

    Un-normalised with ``normalisation`` (mean, std) where given; otherwise an image that
    lies in [0, 1] is taken as it is, and one that does not is stretched from its own range
    to [0, 1] (its minimum and maximum over all channels, so colours keep their relations).
    One channel is shown grey; of more than three, the first three are shown.
    """
    pictures = images.detach().float()
    if normalisation is not None and len(normalisation[0]) == pictures.shape[1]:
        mean, std = (torch.tensor(values, dtype=pictures.dtype, device=pictures.device)
                     for values in normalisation)
        pictures = pictures * std[:, None, None] + mean[:, None, None]
    else:  # each image outside [0, 1] stretched by its own range, whatever its batch
        flat = pictures.flatten(1)
        low, high = flat.amin(1), flat.amax(1)
        outside = (low < 0) | (high > 1)
        low = torch.where(outside, low, torch.zeros_like(low))[:, None, None, None]
        span = torch.where(outside, high - low[:, 0, 0, 0], torch.ones_like(high))
        pictures = (pictures - low) / span.clamp_min(1e-12)[:, None, None, None]
    if pictures.shape[1] == 1:
        pictures = pictures.expand(-1, 3, -1, -1)
    elif pictures.shape[1] != 3:
        pictures = pictures[:, :3] if pictures.shape[1] > 3 else \
            pictures.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    if tuple(pictures.shape[-2:]) != tuple(shape):
        pictures = torch.nn.functional.interpolate(pictures, size=tuple(shape),
                                                   mode="bilinear", antialias=True,
                                                   align_corners=False)
    return (pictures.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
