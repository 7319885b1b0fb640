"""Procedurally generated shapes with known object masks, for the bundled model, the tests,
the tutorials and the localisation benchmarks. Nothing is downloaded.

Every image holds one (or two) objects of five shape classes on a cluttered, textured
background with small distractors (short strokes and dots) that carry no class information.
Colours, sizes and positions are random; the object masks are exact.
"""

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

__all__ = ["CLASSES", "IMAGE_SIZE", "HuggingFaceImages", "ImageFolderImages", "ShapesDataset",
           "make_shapes", "stable_repr"]

CLASSES = ("circle", "square", "triangle", "cross", "ring")
IMAGE_SIZE = 64

_DISTRACTORS = 8
_CHUNK = 512


def make_shapes(
    n: int, seed: int = 0, objects: int = 1, size: int = IMAGE_SIZE
) -> Tuple[Tensor, Tensor, Tensor]:
    """Generate ``n`` images of shapes with their labels and object masks.

    The same ``(n, seed, objects, size)`` always gives the same tensors, on any machine (all
    randomness comes from one seeded CPU generator).

    Args:
        n: number of images.
        seed: random seed.
        objects: objects per image, 1 or 2; two objects in one image always have different
            classes and do not overlap.
        size: image height and width in pixels.

    Returns:
        images (n, 3, size, size) float32 in [0, 1], labels (n, objects) int64 indexing
        :data:`CLASSES`, masks (n, objects, size, size) bool, True on each object's pixels.

    Example::

        >>> images, labels, masks = make_shapes(4, seed=1)
        >>> images.shape, labels.shape, masks.shape
        (torch.Size([4, 3, 64, 64]), torch.Size([4, 1]), torch.Size([4, 1, 64, 64]))
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"Expected n to be a non-negative integer, got {n!r}.")
    if objects not in (1, 2):
        raise ValueError(f"Expected objects to be 1 or 2, got {objects!r}.")
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ValueError(f"Expected size to be an integer of at least 32, got {size!r}.")
    generator = torch.Generator().manual_seed(seed)
    labels = _draw_labels(n, objects, generator)
    radii = size * (0.14 + 0.11 * torch.rand(n, objects, generator=generator))
    centres = _draw_centres(radii, size, generator)
    colours = _vivid_colours((n, objects), generator)
    background_noise = torch.rand(n, 3, 8, 8, generator=generator)
    grain = torch.randn(n, 3, size, size, generator=generator)
    strokes = torch.rand(n, _DISTRACTORS, 6, generator=generator)
    stroke_colours = _vivid_colours((n, _DISTRACTORS), generator)

    images = torch.empty(n, 3, size, size)
    masks = torch.empty(n, objects, size, size, dtype=torch.bool)
    for start in range(0, n, _CHUNK):
        part = slice(start, min(n, start + _CHUNK))
        canvas = _background(background_noise[part], grain[part], size)
        canvas = _paint_distractors(canvas, strokes[part], stroke_colours[part], size)
        for index in range(objects):
            mask = _shape_masks(labels[part, index], centres[part, index], radii[part, index], size)
            colour = colours[part, index].reshape(-1, 3, 1, 1)
            canvas = torch.where(mask.unsqueeze(1), colour * (0.9 + 0.1 * canvas), canvas)
            masks[part, index] = mask
        images[part] = canvas.clamp(0, 1)
    return images, labels, masks


def _draw_labels(n: int, objects: int, generator: torch.Generator) -> Tensor:
    if objects == 1:
        return torch.randint(0, len(CLASSES), (n, 1), generator=generator)
    # two distinct classes: a random permutation's first two entries
    return torch.rand(n, len(CLASSES), generator=generator).argsort(dim=1)[:, :2]


def _draw_centres(radii: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Centres that keep every object inside the image and two objects apart.

    Pairs that overlap are redrawn, a little smaller each time (``radii`` is updated).
    """
    n, objects = radii.shape
    centres = torch.zeros(n, objects, 2)
    placed = torch.zeros(n, dtype=torch.bool)
    for _ in range(200):
        margin = radii + 1
        draw = torch.rand(n, objects, 2, generator=generator)
        candidate = margin.unsqueeze(-1) + draw * (size - 2 * margin).unsqueeze(-1)
        if objects == 1:
            return candidate
        apart = (candidate[:, 0] - candidate[:, 1]).norm(dim=-1) > radii.sum(1) + 2
        newly_placed = apart & ~placed
        centres[newly_placed] = candidate[newly_placed]
        placed |= newly_placed
        if bool(placed.all()):
            return centres
        radii[~placed] *= 0.97
    raise RuntimeError("Could not place two separate objects; use a larger size.")


def _vivid_colours(shape: Tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Saturated, bright colours from random hues (HSV to RGB)."""
    hue = torch.rand(*shape, generator=generator)
    saturation = 0.65 + 0.35 * torch.rand(*shape, generator=generator)
    value = 0.7 + 0.3 * torch.rand(*shape, generator=generator)
    channel_offsets = torch.tensor([5.0, 3.0, 1.0])
    k = (channel_offsets + hue.unsqueeze(-1) * 6) % 6
    weights = (torch.minimum(k, 4 - k)).clamp(0, 1)
    return value.unsqueeze(-1) * (1 - saturation.unsqueeze(-1) * weights)


def _background(noise: Tensor, grain: Tensor, size: int) -> Tensor:
    """Muted, blotchy colour texture with fine grain."""
    blotches = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    grey = blotches.mean(dim=1, keepdim=True)
    muted = grey + 0.45 * (blotches - grey)
    return (0.15 + 0.7 * muted + 0.05 * grain).clamp(0, 1)


def _pixel_grid(size: int) -> Tuple[Tensor, Tensor]:
    coordinates = torch.arange(size, dtype=torch.float32) + 0.5
    return coordinates.reshape(1, size, 1), coordinates.reshape(1, 1, size)


def _paint_distractors(canvas: Tensor, strokes: Tensor, colours: Tensor, size: int) -> Tensor:
    """Short strokes and dots in vivid colours: clutter with no class information."""
    rows, cols = _pixel_grid(size)
    for index in range(strokes.shape[1]):
        start_y, start_x, angle, length, width, kind = strokes[:, index].unbind(-1)
        start_y, start_x = (start_y * size).reshape(-1, 1, 1), (start_x * size).reshape(-1, 1, 1)
        is_dot = (kind < 0.4).reshape(-1, 1, 1)
        length = (3 + 0.12 * size * length).reshape(-1, 1, 1)
        angle = (angle * math.pi).reshape(-1, 1, 1)
        half_width = (0.6 + 0.6 * width).reshape(-1, 1, 1)
        direction_y, direction_x = angle.sin(), angle.cos()
        offset_y, offset_x = rows - start_y, cols - start_x
        along = (offset_y * direction_y + offset_x * direction_x).clamp(min=0).minimum(length)
        across_y = offset_y - along * direction_y
        across_x = offset_x - along * direction_x
        on_stroke = (across_y**2 + across_x**2) <= half_width**2
        on_dot = (offset_y**2 + offset_x**2) <= (half_width + 0.8) ** 2
        mask = torch.where(is_dot, on_dot, on_stroke)
        canvas = torch.where(mask.unsqueeze(1), colours[:, index].reshape(-1, 3, 1, 1), canvas)
    return canvas


def _shape_masks(labels: Tensor, centres: Tensor, radii: Tensor, size: int) -> Tensor:
    """(n, size, size) masks of each example's shape, from implicit equations."""
    rows, cols = _pixel_grid(size)
    dy = rows - centres[:, 0].reshape(-1, 1, 1)
    dx = cols - centres[:, 1].reshape(-1, 1, 1)
    r = radii.reshape(-1, 1, 1)
    distance = (dx**2 + dy**2).sqrt()
    circle = distance <= r
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.82 * r
    # an upright triangle: below the two slanted edges, above the base
    triangle = (dy <= 0.75 * r) & (2 * dx.abs() <= (dy + r) * 1.05)
    bar = 0.32 * r
    cross = ((dx.abs() <= bar) & (dy.abs() <= r)) | ((dy.abs() <= bar) & (dx.abs() <= r))
    ring = (distance <= r) & (distance >= 0.55 * r)
    shapes = torch.stack([circle, square, triangle, cross, ring], dim=1)
    return shapes.gather(1, labels.reshape(-1, 1, 1, 1).expand(-1, 1, size, size)).squeeze(1)


class ShapesDataset(Dataset):
    """:func:`make_shapes` as a map-style dataset of ``(image, label, mask)``: the image
    (3, size, size) float32 in [0, 1], the label an int, the mask (1, size, size) bool.

    The images are generated once, in the constructor (about 50 kB each at size 64).

    Args:
        n: number of images.
        seed: random seed of :func:`make_shapes`.
        size: image height and width in pixels.

    Example::

        >>> dataset = ShapesDataset(8, seed=1)
        >>> image, label, mask = dataset[0]
        >>> image.shape, mask.shape
        (torch.Size([3, 64, 64]), torch.Size([1, 64, 64]))
    """

    def __init__(self, n: int, seed: int = 0, size: int = IMAGE_SIZE) -> None:
        self.n, self.seed, self.size = n, seed, size
        self.images, labels, self.masks = make_shapes(n, seed=seed, size=size)
        self.labels = labels[:, 0]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Tuple[Tensor, int, Tensor]:
        return self.images[index], int(self.labels[index]), self.masks[index]

    def __repr__(self) -> str:
        return f"ShapesDataset(n={self.n}, seed={self.seed}, size={self.size})"


class HuggingFaceImages(Dataset):
    """A Hugging Face ``datasets.Dataset`` of images and labels as a map-style dataset of
    ``(image, label)``: each PIL image converted to a float RGB tensor (3, H, W) in [0, 1]
    from its raw values, as ``captum-daam explain`` reads image files (16-bit greyscale
    divided by 65535, transparency over white; Pillow's ``convert("RGB")`` would clip 16-bit
    images to white), then passed through ``transform``.

    Labels: when the label column is a ``datasets.ClassLabel`` whose names are all class names
    of the model (``model_classes``, e.g. from ImageNet's WordNet ids or descriptions), each
    label is the model's index of its class; otherwise the dataset's own integers. Which of
    the two is in :attr:`labels`.

    Args:
        dataset: a ``datasets.Dataset`` (one split), e.g. ``load_dataset(name, split="test")``.
        transform: from a float RGB tensor (3, H, W) in [0, 1] to the model's input (for a
            timm model, its data config's resize, crop and normalisation, as
            :func:`captum_daam.explain_dataset` applies).
        image_column: the column of images. Default: None, the column whose feature is
            ``datasets.Image``.
        label_column: the column of labels. Default: None, the ``datasets.ClassLabel``
            column, else a column named ``label`` or ``labels``.
        model_classes: the names of the model's classes, one list per class index
            (``captum_daam._labels.model_class_names(model)``). Default: None (the labels
            are the dataset's integers)

    Raises:
        ValueError: when no such column is found, naming the dataset's columns.
    """

    def __init__(
        self,
        dataset: Any,
        transform: Callable[[Any], Tensor],
        image_column: Optional[str] = None,
        label_column: Optional[str] = None,
        model_classes: Optional[List[List[str]]] = None,
    ) -> None:
        import datasets

        from ._labels import LabelMeaning

        if isinstance(dataset, datasets.DatasetDict):
            raise TypeError(
                f"Expected one split of a Hugging Face dataset (a datasets.Dataset), got a "
                f"DatasetDict with the splits {list(dataset)}; pass one, e.g. "
                f"dataset[{next(iter(dataset), 'test')!r}]."
            )
        features = dataset.features
        if image_column is None:
            image_column = next(
                (name for name, feature in features.items()
                 if isinstance(feature, datasets.Image)), None)
        if label_column is None:
            label_column = next(
                (name for name, feature in features.items()
                 if isinstance(feature, datasets.ClassLabel)), None)
            if label_column is None:
                label_column = next(
                    (name for name in ("label", "labels") if name in features), None)
        for role, column in (("image", image_column), ("label", label_column)):
            if column is None or column not in features:
                raise ValueError(
                    f"Expected an {role} column in the Hugging Face dataset, got "
                    f"{column!r}; its columns are {list(features)}. Name it with "
                    f"HuggingFaceImages(dataset, transform, {role}_column=...)."
                )
        self.dataset, self.transform = dataset, transform
        self.image_column, self.label_column = image_column, label_column
        self.labels: Optional[LabelMeaning] = None
        self._relabel: Optional[List[int]] = None
        feature = features[label_column]
        if isinstance(feature, datasets.ClassLabel) and feature.names:
            self.labels = LabelMeaning(feature.names, range(len(feature.names)), model_classes,
                                       "ClassLabel names", "the dataset's ClassLabel numbering")
            self._relabel = [self.labels.class_to_index[name] for name in feature.names]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        from ._images import pil_to_rgb

        row = self.dataset[int(index)]
        rgb = pil_to_rgb(row[self.image_column], f"row {index} of the Hugging Face dataset")
        label = int(row[self.label_column])
        if self._relabel is not None and 0 <= label < len(self._relabel):
            label = self._relabel[label]  # negative: no label, kept as it is
        return self.transform(rgb), label

    def identity(self) -> Dict[str, Any]:
        """What the examples depend on, as values that are the same in every process: the
        content fingerprint of ``datasets`` (which changes with every transformation), the
        columns, the labels' meaning and the transform."""
        identity = {"class": "captum_daam.data.HuggingFaceImages",
                    "fingerprint": getattr(self.dataset, "_fingerprint", None),
                    "rows": len(self.dataset), "image_column": self.image_column,
                    "label_column": self.label_column, "transform": stable_repr(self.transform)}
        if self.labels is not None:
            identity["class_to_index"] = dict(self.labels.class_to_index)
        return identity

    def __repr__(self) -> str:
        return (f"HuggingFaceImages(fingerprint={getattr(self.dataset, '_fingerprint', None)}, "
                f"rows={len(self.dataset)}, image_column={self.image_column!r}, "
                f"label_column={self.label_column!r}, transform={stable_repr(self.transform)})")


class ImageFolderImages(ImageFolder):
    """A folder of class folders (``root/<class>/<image>``, torchvision's ``ImageFolder``),
    each image read as ``captum-daam explain`` reads files (:func:`captum_daam._images.
    load_rgb`: every Pillow mode from its raw values) and passed through ``transform``.

    Labels: when every class folder is named after a class of the model (``model_classes``:
    for ImageNet models the WordNet ids of ImageNet's own folders, ``n01440764``, or a name of
    the class, ``tench``), each image's label is the model's index of its folder's class.
    Otherwise ImageFolder's numbering: the folders in alphabetical order, 0, 1, ...; when the
    model names its classes and some folders are not among them, :attr:`labels` says that
    these labels are not the model's classes. ``labels.class_to_index`` is the mapping.

    Args:
        root: the folder of class folders.
        transform: from a float RGB tensor (3, H, W) in [0, 1] to the model's input.
        model_classes: the names of the model's classes, one list per class index. Default:
            None (ImageFolder's numbering)

    Raises:
        ValueError: when ``root`` has no class folders, or a class folder holds no image.
    """

    def __init__(self, root: Any, transform: Callable[[Any], Tensor],
                 model_classes: Optional[List[List[str]]] = None) -> None:
        from ._images import load_rgb

        self.model_classes = model_classes
        root = Path(root)
        try:
            super().__init__(str(root), transform=transform, loader=load_rgb)
        except FileNotFoundError as error:
            folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
            if not folders:
                raise ValueError(
                    f"Expected an image folder of class folders (root/<class>/<image>), got "
                    f"{str(root)!r}, which has no folders in it."
                ) from None
            empty = [name for name in folders if not _holds_an_image(root / name)]
            if not empty:
                raise ValueError(f"Cannot read the image folder {str(root)!r}: {error}") from None
            from torchvision.datasets.folder import IMG_EXTENSIONS

            raise ValueError(
                f"Expected every class folder of {str(root)!r} to hold images "
                f"({', '.join(IMG_EXTENSIONS)}), got none in {', '.join(map(repr, empty))}; "
                f"remove the empty class folders or add their images."
            ) from None

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        from ._labels import LabelMeaning

        classes, alphabetical = super().find_classes(directory)
        self.labels = LabelMeaning(classes, [alphabetical[name] for name in classes],
                                   self.model_classes, "class folder names",
                                   "ImageFolder's numbering of the class folders in "
                                   "alphabetical order")
        return classes, dict(self.labels.class_to_index)

    def identity(self) -> Dict[str, Any]:
        """What the examples depend on, as values that are the same in every process and
        wherever the command is run from: each image's path below the root, size in bytes and
        label, the class mapping and the transform."""
        files = [[Path(path).relative_to(self.root).as_posix(), os.path.getsize(path), label]
                 for path, label in self.samples]
        return {"class": "captum_daam.data.ImageFolderImages", "images": len(files),
                "files_sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest(),
                "class_to_index": dict(self.labels.class_to_index),
                "transform": stable_repr(self.transform)}

    def __repr__(self) -> str:
        return (f"ImageFolderImages(root={str(self.root)!r}, images={len(self.samples)}, "
                f"classes={len(self.classes)}, transform={stable_repr(self.transform)})")


def _holds_an_image(folder: Path) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    return any(has_file_allowed_extension(name, IMG_EXTENSIONS)
               for _, _, names in os.walk(folder, followlinks=True) for name in names)


def stable_repr(value: Any) -> str:
    """``repr(value)`` without the memory addresses Python puts in the default repr of
    functions and objects (``<function f at 0x7f...>``), which change with every process; what
    a function does inside is not seen."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def load_hugging_face_folder(path: Any) -> Any:
    """The ``datasets.Dataset`` that ``save_to_disk`` wrote to the folder ``path``, or None
    when the folder is not one (no ``state.json`` and ``dataset_info.json``).

    Raises:
        ValueError: for a folder of a ``DatasetDict`` (``dataset_dict.json``), naming its
            splits and the folder of each; for a Hugging Face folder when ``datasets`` is
            not installed.
    """
    path = Path(path)
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
        raise ValueError(
            f"Expected one split of a Hugging Face dataset, got {str(path)!r}, a DatasetDict "
            f"with the splits {', '.join(map(str, splits))}; give the folder of one split, "
            f"e.g. {str(path / str(splits[0] if splits else 'test'))!r}."
        )
    if not ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
        return None
    try:
        import datasets
    except ImportError as error:
        raise ValueError(
            f"{str(path)!r} holds a Hugging Face dataset (save_to_disk); reading it needs the "
            f'datasets package: pip install "captum-daam[hf-datasets]"'
        ) from error
    return datasets.load_from_disk(str(path))
