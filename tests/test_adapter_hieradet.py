"""timm HieraDet (SAM2's Hiera): DAAM over windowed and global attention with query pooling
equals an explicit reference.

The reference runs the model in float64 with every attention written out, on the token grid:
the grid padded with zeros at the bottom and right to whole windows and each window cut out by
slicing (a global block: the whole grid), q, k and v from the module's qkv weights, the
queries max-pooled over aligned q_stride neighbourhoods of the window (F.max_pool2d) where the
block pools, softmax(q k^T * d ** -0.5) an explicit matrix, each window's projected output put
on its pooled cells and the padding cropped. The patch embedding, position embedding, norms,
shortcut projection and pooling, MLPs and head are the model's own modules. Gradients at every
window's output before the projection come from plain autograd; every (pooled) query row is
split over the tokens it reads, weighted by its own gradient, summed and relu'd
(test_adapter_swin.windowed_block_maps), each key token put on its cell.
"""

import copy
import math
from typing import Dict, List

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_daam.adapters import TimmHieraDetAdapter
from helpers import (
    add_parameter_noise,
    assert_each_cell_in_one_window,
    assert_family_matches_reference,
    make_images,
    registered_layouts,
    set_fused_attention,
)
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 4, 0]


def explicit_block(block: nn.Module, x: Tensor) -> Dict[str, object]:
    """One MultiScaleBlock on (B, h, w, C) by hand: the output and every window's record."""
    attention = block.attn
    heads = attention.num_heads
    normed = block.norm1(x)
    shortcut = x
    if block.dim != block.dim_out:
        shortcut = block.proj(normed)
        if block.pool is not None:
            shortcut = block.pool(shortcut.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    batch, height, width, channels = x.shape
    window = tuple(block.window_size) if block.is_windowed else (height, width)
    stride = tuple(block.q_stride) if block.q_stride else (1, 1)
    padded_h = math.ceil(height / window[0]) * window[0]
    padded_w = math.ceil(width / window[1]) * window[1]
    padded = x.new_zeros(batch, padded_h, padded_w, channels)
    padded[:, :height, :width] = normed
    pre_projection = None
    windows = []
    for top in range(0, padded_h, window[0]):
        for left in range(0, padded_w, window[1]):
            tokens = padded[:, top: top + window[0], left: left + window[1]]
            q, k, v = attention.qkv(tokens.flatten(1, 2)).unflatten(-1, (3, heads, -1)).unbind(2)
            if block.q_stride:
                q = F.max_pool2d(q.unflatten(1, window).flatten(3).permute(0, 3, 1, 2), stride)
                q = q.permute(0, 2, 3, 1).flatten(1, 2).unflatten(-1, (heads, -1))
            q, k, v = (part.transpose(1, 2) for part in (q, k, v))
            probabilities = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
            output = (probabilities @ v).transpose(1, 2).flatten(2)  # (B, Q, H * d)
            if pre_projection is None:
                pre_projection = x.new_zeros(batch, padded_h // stride[0],
                                             padded_w // stride[1], output.shape[-1])
            query_window = (window[0] // stride[0], window[1] // stride[1])
            query_top, query_left = top // stride[0], left // stride[1]
            pre_projection[:, query_top: query_top + query_window[0],
                           query_left: query_left + query_window[1]] = output.unflatten(
                1, query_window)
            windows.append(dict(
                attn=probabilities, v=v, pre_projection=output,
                cells=[(r, c) if r < height and c < width else None
                       for r in range(top, top + window[0])
                       for c in range(left, left + window[1])]))
    out_h, out_w = shortcut.shape[1:3]
    y = shortcut + block.ls1(attention.proj(pre_projection[:, :out_h, :out_w]))
    y = y + block.ls2(block.mlp(block.norm2(y)))
    return dict(out=y, windows=windows, grid=(height, width))


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = model._pos_embed(model.patch_embed(images.double()))  # (B, h, w, C)
        for block in model.blocks:
            record = explicit_block(block, x)
            blocks.append(record)
            x = record["out"]
        return windowed_reference(blocks, model.forward_head(x), target)


def small_hieradet(seed: int = 1) -> nn.Module:
    """A narrow HieraDet on 96x96 images: stage grids 24, 12, 6 and 3, windows of 8, 4, 4 and 2
    (the last two padded), block 4 global, queries pooled where stages 2-4 start."""
    torch.manual_seed(0)
    model = timm.create_model(
        "hieradet_small", pretrained=False, num_classes=NUM_CLASSES, embed_dim=16,
        num_heads=1, stages=(1, 2, 2, 1), global_att_blocks=(4,), window_spec=(8, 4, 4, 2),
    )
    return add_parameter_noise(model, seed=seed)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(target, fused):
    model = set_fused_attention(small_hieradet(), fused)
    assert_family_matches_reference(model, make_images(3, 96, 96), target, explicit_daam, 6)


def test_every_registered_hieradet_model_is_taken():
    for name, layouts in registered_layouts(["sam2_hiera_*", "hieradet_*"], TimmHieraDetAdapter):
        for layout in layouts:
            if layout.positions is not None:
                assert_each_cell_in_one_window(layout, name)
