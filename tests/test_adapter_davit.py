"""timm DaViT: DAAM over the spatial blocks' window attention equals an explicit reference.

The reference runs the model in float64 with every spatial attention written out: the stage
grid padded with zeros at the bottom and right to whole windows and each window cut out by
slicing, q, k, v from the module's qkv weights, softmax(q k^T * d ** -0.5) an explicit matrix,
each window's projected output put back by slicing and the padding cropped. The channel
blocks (channel attention mixes no tokens: not blocks of the flow), the convolutional position
encodings, stem, downsamplings, MLPs and head are the model's own modules. Gradients at every
window's output before the projection come from plain autograd; every row is split over the
tokens it reads, weighted by its own gradient, summed and relu'd
(test_adapter_swin.windowed_block_maps), each token put on its cell.
"""

import copy
import math
from typing import Dict, List

import pytest
import torch
from timm.models.davit import DaVit, SpatialBlock
from torch import Tensor, nn

from captum_daam.adapters import TimmDaVitAdapter
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


def explicit_spatial_block(block: nn.Module, x: Tensor) -> Dict[str, object]:
    """A SpatialBlock on NCHW ``x`` by hand: the output and every window's record."""
    batch, channels, height, width = x.shape
    attention, heads = block.attn, block.attn.num_heads
    side_h, side_w = block.window_size
    shortcut = block.cpe1(x).flatten(2).transpose(1, 2)
    normed = block.norm1(shortcut).reshape(batch, height, width, channels)
    padded_h, padded_w = math.ceil(height / side_h) * side_h, math.ceil(width / side_w) * side_w
    padded = x.new_zeros(batch, padded_h, padded_w, channels)
    padded[:, :height, :width] = normed
    attended = x.new_zeros(batch, padded_h, padded_w, channels)
    windows = []
    for top in range(0, padded_h, side_h):
        for left in range(0, padded_w, side_w):
            tokens = padded[:, top: top + side_h, left: left + side_w].flatten(1, 2)
            q, k, v = attention.qkv(tokens).unflatten(-1, (3, heads, -1)).unbind(2)
            q, k, v = (part.transpose(1, 2) for part in (q, k, v))
            probabilities = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
            output = (probabilities @ v).transpose(1, 2).flatten(2)
            attended[:, top: top + side_h, left: left + side_w] = attention.proj(
                output).unflatten(1, (side_h, side_w))
            windows.append(dict(attn=probabilities, v=v, pre_projection=output, cells=[
                (r, c) if r < height and c < width else None
                for r in range(top, top + side_h) for c in range(left, left + side_w)]))
    y = shortcut + attended[:, :height, :width].flatten(1, 2)
    y = block.cpe2(y.transpose(1, 2).reshape(batch, channels, height, width))
    tokens = y.flatten(2).transpose(1, 2)
    tokens = tokens + block.mlp(block.norm2(tokens))
    out = tokens.transpose(1, 2).reshape(batch, channels, height, width)
    return dict(out=out, windows=windows, grid=(height, width))


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = model.stem(images.double())
        for stage in model.stages:
            x = stage.downsample(x)
            for pair in stage.blocks:
                for block in pair:
                    if isinstance(block, SpatialBlock):
                        record = explicit_spatial_block(block, x)
                        blocks.append(record)
                        x = record["out"]
                    else:
                        x = block(x)  # channel attention: no token mixing
        logits = model.forward_head(model.norm_pre(x))
        return windowed_reference(blocks, logits, target)


def small_davit(seed: int = 1) -> nn.Module:
    """A narrow DaViT with windows of 3 (timm's builders fix the widths: built directly)."""
    torch.manual_seed(0)
    model = DaVit(depths=(1, 1, 2, 1), embed_dims=(16, 16, 32, 32), num_heads=(1, 2, 2, 4),
                  window_size=3, num_classes=NUM_CLASSES)
    return add_parameter_noise(model, seed=seed)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(target, fused):
    model = set_fused_attention(small_davit(), fused)
    # 70x90 images: stage grids 18x23, 9x12, 5x6, 3x3, windows of 3 padded
    assert_family_matches_reference(model, make_images(3, 70, 90), target, explicit_daam, 5)


def test_every_registered_davit_model_is_taken():
    for name, layouts in registered_layouts("davit_*", TimmDaVitAdapter):
        for layout in layouts:
            assert_each_cell_in_one_window(layout, name)
