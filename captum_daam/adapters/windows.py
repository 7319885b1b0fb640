"""What windowed-attention families share: where each token of every window lies on the grid.

A windowed block (Swin, SwinV2, torchvision's Swin) shifts its token grid cyclically, pads it
at the bottom and right to whole windows, partitions it into windows and runs attention on a
batch of B * W windows of N tokens each. :func:`window_positions` runs the same steps on a grid
of cell indices, so the block's token maps land on their patches
(:func:`~captum_daam.decompose.place_on_grid`), the padding nowhere.
"""

from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["window_positions", "shift_mask"]


def window_positions(
    grid: Tuple[int, int],
    window_size: Tuple[int, int],
    shift_size: Tuple[int, int],
    partition: Callable[[Tensor, Tuple[int, int]], Tensor],
    pad_first: bool = False,
) -> Tensor:
    """(W, N) the grid cell (row-major) of each token of each window, -1 for padding.

    Args:
        grid: (H, W) the block's token grid.
        window_size: (wh, ww) the window.
        shift_size: the cyclic shift the block applies before partitioning, as
            ``torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))``; (0, 0) for none.
        partition: the family's window partition, (1, Hp, Wp, 1) -> (W, wh, ww, 1).
        pad_first: whether the block pads before it shifts (torchvision) rather than after
            (timm).
    """
    height, width = grid
    cells = torch.arange(height * width, dtype=torch.float64).reshape(1, height, width, 1)
    pad_h = (window_size[0] - height % window_size[0]) % window_size[0]
    pad_w = (window_size[1] - width % window_size[1]) % window_size[1]
    if pad_first:
        cells = F.pad(cells, (0, 0, 0, pad_w, 0, pad_h), value=-1.0)
    if any(shift_size):
        cells = torch.roll(cells, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    if not pad_first:
        cells = F.pad(cells, (0, 0, 0, pad_w, 0, pad_h), value=-1.0)
    windows = partition(cells, tuple(window_size))
    return windows.reshape(windows.shape[0], -1).long()


def shift_mask(
    padded_grid: Tuple[int, int],
    window_size: Tuple[int, int],
    shift_size: Tuple[int, int],
    partition: Callable[[Tensor, Tuple[int, int]], Tensor],
) -> Tensor:
    """(W, N, N) Swin's attention mask of a shifted block: 0 between tokens of one region of
    the shifted, padded grid, -100 between regions (the regions along each axis being
    [0, P - w), [P - w, P - s) and [P - s, P)), as Swin's own code forms it."""
    labels = torch.zeros(1, *padded_grid, 1)
    (window_h, window_w), (shift_h, shift_w) = window_size, shift_size
    count = 0
    for top, bottom in ((0, -window_h), (-window_h, -shift_h), (-shift_h, None)):
        for left, right in ((0, -window_w), (-window_w, -shift_w), (-shift_w, None)):
            labels[:, top:bottom, left:right, :] = count
            count += 1
    windows = partition(labels, tuple(window_size)).flatten(1)  # (W, N)
    differs = windows.unsqueeze(1) != windows.unsqueeze(2)
    return torch.zeros(differs.shape).masked_fill(differs, -100.0)
