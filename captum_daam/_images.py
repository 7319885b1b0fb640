"""Image files as RGB float tensors in [0, 1], for every image mode Pillow opens.

Pillow's ``convert("RGB")`` is wrong for several modes: it clips 16- and 32-bit greyscale, so a
16-bit PNG becomes almost all white, and it drops alpha, showing whatever colour happens to lie
under transparent pixels. Here each mode is converted from its raw values:

- ``1``: black 0, white 1. ``L``: value / 255. ``RGB``, ``RGBX``, ``YCbCr``: value / 255.
- ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit greyscale): value / 65535.
- ``I`` (32-bit integers): read as 16-bit, value / 65535, because that is what such files hold
  when Pillow opens them (16-bit PGM files, which Pillow scales to 0-65535; 16-bit greyscale
  from older Pillow versions). An ``I`` image with a value outside 0-65535 is refused: its
  white level cannot be known.
- ``F`` (32-bit float): taken as already in [0, 1]; refused if any value lies outside [0, 1]
  or is not finite, rather than guessing a scale.
- ``CMYK``: the naive conversion R = (1 - C)(1 - K), G = (1 - M)(1 - K), B = (1 - Y)(1 - K)
  (Pillow's formula, computed here without rounding to 8 bits); ICC profiles are ignored,
  so colours are approximate.
- ``P`` and ``PA`` (palette): looked up in the palette, with its transparency if any.
- Alpha (``LA``, ``RGBA``, ``PA``, and a ``transparency`` colour of ``1``,
  ``L``, ``RGB``, ``P`` or 16-bit images): composited over a white background
  (:data:`BACKGROUND`), as a page shows a transparent image, so that transparent pixels show
  the model what a viewer shows rather than the colour stored under them.

Every other mode (``LAB``, ``HSV``, ...) is refused with a message. EXIF orientation is
applied (a phone photo is explained upright, as viewers show it), and an animated file gives
its first frame. An image larger than Pillow's decompression-bomb limit
(``PIL.Image.MAX_IMAGE_PIXELS``) is refused, also in the range where Pillow only warns.
"""

import os
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["BACKGROUND", "SUPPORTED_MODES", "TimmPreprocessing", "check_image", "load_rgb",
           "pil_to_rgb", "timm_preprocessing"]

#: Grey level of the background that transparent pixels are composited over: white.
BACKGROUND = 1.0

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
SUPPORTED_MODES = (
    ("1", "L", "LA", "P", "PA", "RGB", "RGBX", "RGBA", "CMYK", "YCbCr", "I", "F")
    + _SIXTEEN_BIT_MODES
)
_EXIF_ORIENTATION = 0x0112

PathLike = Union[str, "os.PathLike[str]"]


def check_image(path: PathLike) -> Tuple[str, Tuple[int, int]]:
    """Open only the header of ``path``: whether Pillow can read it, its mode is supported and
    its size is within Pillow's decompression-bomb limit. Cheap: no pixel data is decoded.

    Returns:
        The mode and the (width, height) of the image.

    Raises:
        ValueError: with a one-line reason, when the file cannot be used.
    """
    with _opened(path) as image:
        _check_mode(path, image.mode)
        return image.mode, image.size


def load_rgb(path: PathLike):
    """Read an image file as a float32 tensor (3, H, W) in [0, 1]; see the module docstring
    for how each Pillow mode is converted.

    Raises:
        ValueError: with a one-line reason, when the file is not an image Pillow can read, its
            mode is not supported, its values are outside the range its mode implies, or it is
            larger than Pillow's decompression-bomb limit.

    Example::

        >>> from captum_daam._images import load_rgb
        >>> load_rgb("photo.png").shape  # doctest: +SKIP
        torch.Size([3, 480, 640])
    """
    with _opened(path) as image:
        return pil_to_rgb(image, path)


def pil_to_rgb(image: Image.Image, name: PathLike = "image"):
    """An opened Pillow image (of a file, or a Hugging Face ``datasets.Image`` cell) as a
    float32 tensor (3, H, W) in [0, 1], converted as :func:`load_rgb` converts files; ``name``
    is used in messages."""
    import torch

    _check_mode(name, image.mode)
    rgb = _to_rgb(name, _upright(image))
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32))


def timm_preprocessing(model, normalize: bool = True) -> "TimmPreprocessing":
    """From a float RGB image (3, H, W) in [0, 1] (:func:`load_rgb`) to the model's input:
    timm's evaluation resize and crop of the model's data config (its to-tensor step passes
    tensors through), clamped to [0, 1] (bicubic resizing overshoots a little), then, with
    ``normalize``, the config's mean and std."""
    from timm.data import resolve_data_config

    return TimmPreprocessing(resolve_data_config({}, model=model), normalize)


class TimmPreprocessing:
    """:func:`timm_preprocessing` as a picklable callable whose ``repr`` is its settings, the
    same in every process (a store's settings name the preprocessing by it)."""

    def __init__(self, config: dict, normalize: bool = True) -> None:
        from timm.data import create_transform

        self.config = {key: _plain(value) for key, value in sorted(config.items())}
        self.normalize = normalize
        self.resize_and_crop = create_transform(**config, normalize=False)

    def __call__(self, rgb):
        from torchvision.transforms.functional import normalize as normalise

        picture = self.resize_and_crop(rgb).clamp(0, 1)
        if not self.normalize:
            return picture
        return normalise(picture, self.config["mean"], self.config["std"])

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in self.config.items())
        return f"TimmPreprocessing({settings}, normalize={self.normalize})"


def _plain(value):
    """Tuples and numpy scalars of a data config as plain lists and numbers."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value.item() if hasattr(value, "item") else value


@contextmanager
def _opened(path: PathLike) -> Iterator[Image.Image]:
    """``Image.open`` with Pillow's decompression-bomb warning made an error, and every reason
    the file cannot be opened or decoded as a one-line ValueError."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _too_large(path, error) from None
        except UnidentifiedImageError as error:
            raise ValueError(
                f"cannot read image {path}: expected an image file Pillow can decode (PNG, "
                f"JPEG, TIFF, ...), got a file of another kind"
            ) from error
        except IsADirectoryError as error:
            raise ValueError(f"image {path} is a folder, expected an image file") from error
        except OSError as error:
            raise ValueError(f"cannot read image {path}: {_one_line(error)}") from error
        with image:
            try:
                yield image
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
                raise _too_large(path, error) from None
            except OSError as error:  # truncated or corrupt pixel data, found while decoding
                raise ValueError(f"cannot read image {path}: {_one_line(error)}") from error


def _check_mode(path: PathLike, mode: str) -> None:
    if mode not in SUPPORTED_MODES:
        raise ValueError(
            f"image {path} has the Pillow mode {mode!r}, which captum-daam does not convert "
            f"to RGB; expected one of {', '.join(SUPPORTED_MODES)}. Convert it to an 8- or "
            f"16-bit RGB or greyscale PNG first"
        )


def _too_large(path: PathLike, error: BaseException) -> ValueError:
    return ValueError(
        f"image {path} is too large to decode safely: {_one_line(error)} Shrink it first "
        f"(Pillow refuses images over PIL.Image.MAX_IMAGE_PIXELS pixels as possible "
        f"decompression bombs)"
    )


def _upright(image: Image.Image) -> Image.Image:
    if image.getexif().get(_EXIF_ORIENTATION, 1) == 1:  # upright already: keep the mode as is
        return image
    return ImageOps.exif_transpose(image)


def _to_rgb(path: PathLike, image: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from a Pillow image of a supported mode."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image {path} is empty ({image.width}x{image.height} pixels)")
    mode = image.mode
    transparency = image.info.get("transparency")
    if mode in ("P", "PA") or (transparency is not None and mode in ("1", "L", "RGB")):
        # Palette lookups and tRNS colours are exact in 8 bits: let Pillow resolve them.
        image, mode = image.convert("RGBA"), "RGBA"
    elif mode == "YCbCr":
        image, mode = image.convert("RGB"), "RGB"
    values = np.asarray(image)
    alpha: Optional[np.ndarray] = None

    if mode == "1":
        colour = values.astype(np.float32)[..., None]
    elif mode in ("L", "LA"):
        grey = values if mode == "L" else values[..., 0]
        colour = grey.astype(np.float32)[..., None] / 255
        alpha = None if mode == "L" else values[..., 1].astype(np.float32) / 255
    elif mode in ("RGB", "RGBX", "RGBA"):
        colour = values[..., :3].astype(np.float32) / 255
        alpha = values[..., 3].astype(np.float32) / 255 if mode == "RGBA" else None
    elif mode == "CMYK":
        cyan, magenta, yellow, black = np.moveaxis(values.astype(np.float32) / 255, -1, 0)
        colour = np.stack([(1 - cyan), (1 - magenta), (1 - yellow)], axis=-1)
        colour *= (1 - black)[..., None]
    elif mode in _SIXTEEN_BIT_MODES:
        colour = values.astype(np.float32)[..., None] / 65535
        if isinstance(transparency, int):
            alpha = (values != transparency).astype(np.float32)
    elif mode == "I":
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"image {path} holds 32-bit integers from {low} to {high}: expected 16-bit "
                f"values, 0-65535 (65535 is white), as its white level cannot be known "
                f"otherwise. Save it as a 16-bit PNG scaled to 0-65535"
            )
        colour = values.astype(np.float32)[..., None] / 65535
    else:  # "F"
        colour = values.astype(np.float32)[..., None]
        finite = np.isfinite(colour)
        if not finite.all() or colour.min() < 0 or colour.max() > 1:
            shown = colour[finite]
            value_range = (
                f"from {shown.min():g} to {shown.max():g}" if shown.size else "none finite"
            )
            extra = "" if finite.all() else ", and values that are not finite"
            raise ValueError(
                f"image {path} holds floating-point values {value_range}{extra}: expected "
                f"values in [0, 1] (1 is white). Rescale it to [0, 1], or save it as an 8- or "
                f"16-bit PNG"
            )
    colour = np.broadcast_to(colour, colour.shape[:2] + (3,))
    if alpha is not None:
        alpha = alpha[..., None]
        colour = colour * alpha + BACKGROUND * (1 - alpha)
    return np.clip(colour, 0.0, 1.0)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if text else type(error).__name__
