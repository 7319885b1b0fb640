"""Pictures of the attention flow: a figure of overlays, an animation, and the overlay itself.

Every function takes one image, (3, H, W) (or (1, 3, H, W)) with values in [0, 1], and the raw
flow of that image, (L, gh, gw) (or (1, L, gh, gw)), as returned by
``DAAM(model).attribute(images, return_flow=True)[i]``. The display scaling
(``captum_daam.decompose.scale_flow``) is applied to the whole flow first, so that a subset of
blocks is shown on the same scale as in the full flow.

Nothing here touches pyplot's global state: figures are ``matplotlib.figure.Figure`` objects,
rendered with Agg, so the module works on machines without a display.
"""

import operator
import os
import pathlib
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution
from matplotlib import colormaps
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .decompose import scale_flow

__all__ = ["overlay", "flow_figure", "save_flow_animation"]

_VIDEO_INSTALL_HINT = 'pip install "captum-daam[video]"'
_MIN_FRAME_SIDE = 256
_DEFAULT_MAX_COLUMNS = 7


def overlay(
    image: Tensor,
    attribution_map: Tensor,
    alpha: float = 0.5,
    cmap: Union[str, Colormap] = "jet",
) -> np.ndarray:
    r"""
    Blend an image with a colour-mapped attribution map.

    The map is upsampled bilinearly to the image (``LayerAttribution.interpolate``), coloured
    with ``cmap`` (0 and 1 are the two ends of the colour map) and blended:
    ``(1 - alpha) * image + alpha * cmap(map)``.

    Args:
        image (Tensor): (3, H, W) or (1, 3, H, W), float in [0, 1] or uint8.
        attribution_map (Tensor): (gh, gw), (1, gh, gw) or (1, 1, gh, gw), already scaled
                    to [0, 1] (e.g. one map of ``captum_daam.scale_flow(flow)``). Any grid
                    size: it is resized to (H, W).
        alpha (float, optional): Weight of the colour-mapped map, in [0, 1].
                    Default: 0.5
        cmap (str or matplotlib.colors.Colormap, optional): The colour map.
                    Default: "jet"

    Returns:
        *numpy.ndarray* of dtype uint8, shaped (H, W, 3): the blended RGB image.

    Examples::

        >>> import torch
        >>> from captum_daam.visualization import overlay
        >>> image = torch.rand(3, 64, 64)
        >>> heat = torch.rand(8, 8)
        >>> overlay(image, heat).shape
        (64, 64, 3)
    """
    image = _as_image(image)
    attribution_map = _as_attribution_map(attribution_map)
    return _blend(image, attribution_map, _check_alpha(alpha), _as_colormap(cmap))


def flow_figure(
    image: Tensor,
    flow: Tensor,
    blocks: Optional[Union[int, Sequence[int]]] = None,
    scaling: str = "paper",
    block_numbers: Optional[Sequence[int]] = None,
    alpha: float = 0.5,
    cmap: Union[str, Colormap] = "jet",
    title: Optional[str] = None,
    columns: Optional[int] = None,
) -> Figure:
    r"""
    A figure of the attention flow: the image, then one overlay per shown block.

    Each accumulated map D_l is scaled (``scaling``, over the whole flow), upsampled
    bilinearly to the image and blended with it (``overlay``). Panels are titled
    "block k" with k the 1-based block number.

    Args:
        image (Tensor): (3, H, W) or (1, 3, H, W), float in [0, 1] or uint8: the image
                    as seen before the model's normalisation.
        flow (Tensor): (L, gh, gw) or (1, L, gh, gw): the raw accumulated maps of this
                    image, e.g. ``DAAM(model).attribute(x, return_flow=True)[i]``.
        blocks (int or sequence of int, optional): Which maps of the flow to show,
                    0-based indices into the flow (negative ones count from the end).
                    Default: None, all of them.
        scaling (str, optional): The display scaling of ``captum_daam.scale_flow``,
                    applied to the whole flow before ``blocks`` are picked: "paper" (the
                    paper's mapping), "shared" (one linear scale for the flow) or
                    "per_map" (each map on its own).
                    Default: "paper"
        block_numbers (sequence of int, optional): The block number to print for each
                    of the L maps, e.g. ``[9, 10, 11, 12]`` for a flow computed with
                    ``DAAM(model, layer=[model.blocks[i].attn for i in (8, 9, 10, 11)])``.
                    Default: None, 1..L.
        alpha (float, optional): Weight of the colour-mapped map in the overlay, in [0, 1].
                    Default: 0.5
        cmap (str or matplotlib.colors.Colormap, optional): The colour map.
                    Default: "jet"
        title (str, optional): A title above all panels.
                    Default: None
        columns (int, optional): Panels per row.
                    Default: None, all panels in one row up to 7, else rows of 7.

    Returns:
        *matplotlib.figure.Figure*: one axis for the image and one per shown block, in
        that order. It is not registered with pyplot: save it with ``fig.savefig(path)``,
        or display it in a notebook.

    Examples::

        >>> import torch
        >>> from captum_daam.visualization import flow_figure
        >>> image = torch.rand(3, 64, 64)
        >>> flow = torch.rand(4, 8, 8).cumsum(0)        # D_1..D_4
        >>> fig = flow_figure(image, flow, blocks=[0, 3], block_numbers=[9, 10, 11, 12])
        >>> [ax.get_title() for ax in fig.axes]
        ['image', 'block 9', 'block 12']
        >>> fig.savefig("flow.png")  # doctest: +SKIP
    """
    image, maps, labels = _prepare_flow(image, flow, blocks, scaling, block_numbers)
    alpha, colormap = _check_alpha(alpha), _as_colormap(cmap)
    panels = 1 + len(labels)
    if columns is None:
        columns = min(panels, _DEFAULT_MAX_COLUMNS)
    elif isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"Expected columns to be a positive int, got {columns!r}.")
    columns = min(columns, panels)
    rows = -(-panels // columns)

    height, width = image.shape[-2:]
    panel_width = 2.2
    panel_height = panel_width * height / width + 0.3  # room for the panel title
    figure = Figure(
        figsize=(columns * panel_width, rows * panel_height + (0.4 if title else 0.0)),
        layout="constrained",
    )
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    pictures = [_to_uint8(image.permute(1, 2, 0).numpy())]
    # Not Captum's visualize_image_attr: it rescales each map by its own percentile, undoing ours.
    pictures += [_blend(image, attribution_map, alpha, colormap) for attribution_map in maps]
    for axis, picture, panel_title in zip(axes, pictures, ["image"] + labels):
        axis.imshow(picture)
        axis.set_title(panel_title)
        axis.set_axis_off()
    for axis in axes[panels:]:
        figure.delaxes(axis)
    if title:
        figure.suptitle(title)
    return figure


def save_flow_animation(
    image: Tensor,
    flow: Tensor,
    path: Union[str, "os.PathLike[str]"],
    blocks: Optional[Union[int, Sequence[int]]] = None,
    scaling: str = "paper",
    block_numbers: Optional[Sequence[int]] = None,
    duration_ms: float = 600,
    alpha: float = 0.5,
    cmap: Union[str, Colormap] = "jet",
    size: Optional[Tuple[int, int]] = None,
) -> pathlib.Path:
    r"""
    Save the attention flow as an animation: one labelled overlay frame per shown block.

    The frames are the overlays of ``flow_figure`` (same scaling, blocks and numbering),
    each with its label "block k" drawn in the top-left corner. A path ending in ".gif"
    gives an animated GIF that loops forever (Pillow); one ending in ".mp4" gives an
    H.264 video, which needs the optional ``imageio`` and ``imageio-ffmpeg`` packages
    (``pip install "captum-daam[video]"``).

    Args:
        image (Tensor): (3, H, W) or (1, 3, H, W), float in [0, 1] or uint8.
        flow (Tensor): (L, gh, gw) or (1, L, gh, gw): the raw accumulated maps.
        path (str or os.PathLike): Where to write; must end in ".gif" or ".mp4".
        blocks (int or sequence of int, optional): Which maps of the flow to show,
                    0-based indices into the flow. Default: None, all of them.
        scaling (str, optional): "paper", "shared" or "per_map", applied to the whole
                    flow before ``blocks`` are picked (see ``flow_figure``).
                    Default: "paper"
        block_numbers (sequence of int, optional): The block number to print for each of
                    the L maps. Default: None, 1..L.
        duration_ms (float, optional): How long each frame is shown, in milliseconds.
                    Default: 600
        alpha (float, optional): Weight of the colour-mapped map, in [0, 1].
                    Default: 0.5
        cmap (str or matplotlib.colors.Colormap, optional): The colour map.
                    Default: "jet"
        size (tuple of int, optional): Frame size (width, height) in pixels; the image is
                    resized bilinearly and the map upsampled to it. For MP4 an odd width
                    or height is rounded up to an even one, as H.264 requires.
                    Default: None, the image's size, enlarged (keeping its aspect ratio)
                    until the short side is at least 256 pixels so labels stay readable.

    Returns:
        *pathlib.Path*: the path written.

    Examples::

        >>> import torch
        >>> from captum_daam.visualization import save_flow_animation
        >>> image = torch.rand(3, 64, 64)
        >>> flow = torch.rand(4, 8, 8).cumsum(0)
        >>> save_flow_animation(image, flow, "flow.gif")  # doctest: +SKIP
        PosixPath('flow.gif')
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(
            f"Expected a path ending in .gif or .mp4, got {str(path)!r}: the format is "
            f"chosen by the file extension."
        )
    image, maps, labels = _prepare_flow(image, flow, blocks, scaling, block_numbers)
    alpha, colormap = _check_alpha(alpha), _as_colormap(cmap)
    if (
        isinstance(duration_ms, bool)
        or not isinstance(duration_ms, (int, float))
        or not (duration_ms > 0 and np.isfinite(duration_ms))
    ):
        raise ValueError(f"Expected duration_ms to be a positive number, got {duration_ms!r}.")
    width, height = _frame_size(image.shape[-2:], size)
    if suffix == ".mp4":
        imageio = _import_video_writer()
        width, height = width + width % 2, height + height % 2

    frame_image = _resize_image(image, (height, width))
    font = _label_font(max(12, height // 14))
    frames = []
    for attribution_map, label in zip(maps, labels):
        frame = Image.fromarray(_blend(frame_image, attribution_map, alpha, colormap))
        _draw_label(frame, label, font)
        frames.append(frame)

    if suffix == ".gif":
        frames[0].save(
            path,
            format="GIF",
            save_all=True,
            append_images=frames[1:],
            duration=int(round(duration_ms)),
            loop=0,
        )
    else:
        with imageio.get_writer(
            path,
            format="FFMPEG",
            mode="I",
            fps=1000.0 / duration_ms,
            codec="libx264",
            pixelformat="yuv420p",
            macro_block_size=2,
        ) as writer:
            for frame in frames:
                writer.append_data(np.asarray(frame))
    return path


def _prepare_flow(
    image: Tensor,
    flow: Tensor,
    blocks: Optional[Union[int, Sequence[int]]],
    scaling: str,
    block_numbers: Optional[Sequence[int]],
) -> Tuple[Tensor, Tensor, List[str]]:
    """Check the inputs; return the image, the scaled maps of the shown blocks, their labels."""
    image = _as_image(image)
    flow = _as_flow(flow)
    num_maps = flow.shape[0]
    indices = _block_indices(blocks, num_maps)
    numbers = _block_numbers(block_numbers, num_maps)
    # Scale the whole flow first: a subset of blocks keeps the scale it has in the full flow.
    scaled = scale_flow(flow.unsqueeze(0), scaling)[0]
    return image, scaled[indices], [f"block {numbers[index]}" for index in indices]


def _one_example(tensor: Tensor, expected: str, hint: str) -> Tensor:
    """Drop a batch axis of size one; refuse a real batch."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"Expected {expected} as a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.dim() == 4 and tensor.shape[0] == 1:
        return tensor[0]
    if tensor.dim() == 4:
        raise ValueError(
            f"Expected {expected}, got a batch of shape {tuple(tensor.shape)}: pass {hint} "
            f"for the i-th example."
        )
    return tensor


def _as_image(image: Tensor) -> Tensor:
    image = _one_example(image, "one image, (3, H, W) or (1, 3, H, W)", "images[i] and flow[i]")
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"Expected an RGB image shaped (3, H, W), got shape {tuple(image.shape)}.")
    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        return image.to(torch.float32) / 255.0
    if not image.is_floating_point():
        raise ValueError(f"Expected a float image in [0, 1] or a uint8 image, got {image.dtype}.")
    image = image.to(torch.float32)
    low, high = image.min().item(), image.max().item()
    if not (low >= -1e-6 and high <= 1.0 + 1e-6):
        raise ValueError(
            f"Expected image values in [0, 1], got values in [{low:.4g}, {high:.4g}]: pass the "
            f"image before the model's normalisation (undo the mean / std)."
        )
    return image.clamp(0.0, 1.0)


def _as_flow(flow: Tensor) -> Tensor:
    flow = _one_example(flow, "the flow of one image, (L, gh, gw) or (1, L, gh, gw)", "flow[i]")
    if flow.dim() != 3 or 0 in flow.shape:
        raise ValueError(
            f"Expected a flow shaped (L, gh, gw), one map per block, got shape "
            f"{tuple(flow.shape)}. DAAM(model).attribute(x, return_flow=True)[i] has that shape."
        )
    flow = flow.detach().cpu().to(torch.float32)
    if not torch.isfinite(flow).all():
        raise ValueError("Expected a finite flow, got NaN or infinite values.")
    return flow


def _as_attribution_map(attribution_map: Tensor) -> Tensor:
    if not isinstance(attribution_map, Tensor):
        raise TypeError(
            f"Expected the attribution map as a torch.Tensor, got {type(attribution_map).__name__}."
        )
    shape = tuple(attribution_map.shape)
    while attribution_map.dim() > 2 and attribution_map.shape[0] == 1:
        attribution_map = attribution_map[0]
    if attribution_map.dim() != 2 or 0 in attribution_map.shape:
        raise ValueError(
            f"Expected one attribution map shaped (gh, gw), (1, gh, gw) or (1, 1, gh, gw), "
            f"got shape {shape}."
        )
    attribution_map = attribution_map.detach().cpu().to(torch.float32)
    low, high = attribution_map.min().item(), attribution_map.max().item()
    if not (low >= -1e-6 and high <= 1.0 + 1e-6):
        raise ValueError(
            f"Expected an attribution map scaled to [0, 1], got values in [{low:.4g}, "
            f"{high:.4g}]: scale raw maps first, e.g. with captum_daam.scale_flow."
        )
    return attribution_map


def _block_indices(blocks: Optional[Union[int, Sequence[int]]], num_maps: int) -> List[int]:
    if blocks is None:
        return list(range(num_maps))
    if isinstance(blocks, Tensor) and blocks.dim() == 0:
        blocks = blocks.item()
    items = [blocks] if isinstance(blocks, int) else list(blocks)
    if not items:
        raise ValueError("Expected at least one block to show, got an empty blocks.")
    indices = []
    for item in items:
        try:
            if isinstance(item, bool):
                raise TypeError
            index = operator.index(item)
        except TypeError:
            raise TypeError(
                f"Expected blocks to be 0-based int indices into the flow, got {item!r}."
            ) from None
        if not -num_maps <= index < num_maps:
            raise ValueError(
                f"Block index {index} is out of range for a flow of {num_maps} maps: blocks are "
                f"0-based indices into the flow, 0..{num_maps - 1} (use block_numbers to print "
                f"other block numbers)."
            )
        indices.append(index % num_maps)
    return indices


def _block_numbers(block_numbers: Optional[Sequence[int]], num_maps: int) -> List[int]:
    if block_numbers is None:
        return list(range(1, num_maps + 1))
    numbers = list(block_numbers)
    if len(numbers) != num_maps:
        raise ValueError(
            f"Expected one block number per map of the flow ({num_maps}), got {len(numbers)}."
        )
    try:
        return [operator.index(number) for number in numbers]
    except TypeError:
        raise TypeError(f"Expected block_numbers to be ints, got {numbers!r}.") from None


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"Expected alpha to be a number in [0, 1], got {alpha!r}.")
    return float(alpha)


def _as_colormap(cmap: Union[str, Colormap]) -> Colormap:
    if isinstance(cmap, Colormap):
        return cmap
    try:
        return colormaps[cmap]
    except (KeyError, TypeError):
        raise ValueError(
            f"Expected cmap to be a matplotlib colour map or the name of one (e.g. 'jet', "
            f"'viridis'), got {cmap!r}."
        ) from None


def _blend(image: Tensor, attribution_map: Tensor, alpha: float, colormap: Colormap) -> np.ndarray:
    """(3, H, W) image in [0, 1] and a (gh, gw) map in [0, 1] -> (H, W, 3) uint8 overlay."""
    height, width = image.shape[-2:]
    upsampled = LayerAttribution.interpolate(
        attribution_map[None, None], (height, width), "bilinear"
    )[0, 0]
    colours = colormap(upsampled.clamp(0.0, 1.0).numpy())[..., :3]
    blended = (1.0 - alpha) * image.permute(1, 2, 0).numpy() + alpha * colours
    return _to_uint8(blended)


def _to_uint8(picture: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(picture * 255.0), 0, 255).astype(np.uint8)


def _frame_size(image_size: Tuple[int, int], size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """The frame's (width, height): ``size``, or the image enlarged to a short side of 256."""
    if size is not None:
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or any(isinstance(side, bool) or not isinstance(side, int) or side < 1 for side in size)
        ):
            raise ValueError(f"Expected size to be (width, height) in positive ints, got {size!r}.")
        return int(size[0]), int(size[1])
    height, width = int(image_size[0]), int(image_size[1])
    factor = max(1.0, _MIN_FRAME_SIDE / min(height, width))
    return max(1, round(width * factor)), max(1, round(height * factor))


def _resize_image(image: Tensor, height_width: Tuple[int, int]) -> Tensor:
    if tuple(image.shape[-2:]) == tuple(height_width):
        return image
    resized = F.interpolate(
        image[None], height_width, mode="bilinear", align_corners=False, antialias=True
    )
    return resized[0].clamp(0.0, 1.0)


def _label_font(size: int) -> Union[ImageFont.ImageFont, ImageFont.FreeTypeFont]:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small fixed-size bitmap font
        return ImageFont.load_default()


def _draw_label(
    frame: Image.Image, label: str, font: Union[ImageFont.ImageFont, ImageFont.FreeTypeFont]
) -> None:
    draw = ImageDraw.Draw(frame)
    margin = max(2, frame.height // 64)
    left, top, right, bottom = draw.textbbox((2 * margin, 2 * margin), label, font=font)
    draw.rectangle((left - margin, top - margin, right + margin, bottom + margin), fill=(0, 0, 0))
    draw.text((2 * margin, 2 * margin), label, fill=(255, 255, 255), font=font)


def _import_video_writer():
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the FFMPEG plugin of imageio needs it)
    except ImportError as error:
        raise ImportError(
            f"Writing MP4 needs the imageio and imageio-ffmpeg packages: {_VIDEO_INSTALL_HINT} "
            f"(or save a .gif, which needs nothing more)."
        ) from error
    return imageio
