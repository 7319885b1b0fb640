"""timm TinyViT: DAAM over windowed attention with attention biases equals an explicit
reference.

The reference runs the model in float64 with every attention written out: the stage grid
padded with zeros at the bottom and right to whole windows and each window cut out by slicing,
the module's norm and qkv weights applied to its tokens, q, k and v split per head (key, key,
value widths), softmax(q k^T * scale + bias) an explicit matrix with the bias of each head
looked up by hand for the offset (|dr|, |dc|) between query and key (test_adapter_levit's
bias_by_hand), each window's projected output put back on its cells and the padding cropped.
The convolutions (patch embedding, MBConv stage, patch merging, local convolution), MLPs and
head are the model's own modules. Gradients at every window's output before the projection
come from plain autograd; every row is split over the tokens it reads, weighted by its own
gradient, summed and relu'd (test_adapter_swin.windowed_block_maps), each token put on its
cell; the flow lies on the finest grid.
"""

import copy
import math
from typing import Dict, List

import pytest
import timm
import torch
from torch import Tensor, nn

from captum_daam.adapters import TimmTinyVitAdapter
from helpers import (
    add_parameter_noise,
    assert_each_cell_in_one_window,
    assert_family_matches_reference,
    make_images,
    registered_layouts,
    set_fused_attention,
)
from test_adapter_levit import bias_by_hand
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 4, 0]


def explicit_windows(attention: nn.Module, x: Tensor, side: int) -> Dict[str, object]:
    """The attention of one TinyVitBlock on (B, h, w, C) by hand: the output and every
    window's record (cells None for padding)."""
    batch, height, width, channels = x.shape
    heads = attention.num_heads
    padded_h, padded_w = math.ceil(height / side) * side, math.ceil(width / side) * side
    padded = x.new_zeros(batch, padded_h, padded_w, channels)
    padded[:, :height, :width] = x
    merged = x.new_zeros(batch, padded_h, padded_w, channels)
    windows = []
    for top in range(0, padded_h, side):
        for left in range(0, padded_w, side):
            tokens = padded[:, top: top + side, left: left + side].reshape(batch, -1, channels)
            qkv = attention.qkv(attention.norm(tokens)).unflatten(-1, (heads, -1))
            q, k, v = (part.transpose(1, 2) for part in qkv.split(
                [attention.key_dim, attention.key_dim, attention.val_dim], dim=3))
            logits = q @ k.transpose(-2, -1) * attention.key_dim ** -0.5 + bias_by_hand(attention)
            probabilities = logits.softmax(dim=-1)
            pre_projection = (probabilities @ v).transpose(1, 2).flatten(2)
            merged[:, top: top + side, left: left + side] = attention.proj(
                pre_projection).reshape(batch, side, side, channels)
            windows.append(dict(
                attn=probabilities, v=v, pre_projection=pre_projection,
                cells=[(r, c) if r < height and c < width else None
                       for r in range(top, top + side) for c in range(left, left + side)]))
    return dict(out=merged[:, :height, :width], windows=windows, grid=(height, width))


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = model.stages[0](model.patch_embed(images.double()))  # the convolution stage
        for stage in model.stages[1:]:
            x = stage.downsample(x)
            y = x.permute(0, 2, 3, 1)
            for block in stage.blocks:
                record = explicit_windows(block.attn, y, block.window_size)
                blocks.append(record)
                y = y + record["out"]
                tokens = block.local_conv(y.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
                tokens = tokens + block.mlp(tokens)
                y = tokens.reshape(y.shape)
            x = y.permute(0, 3, 1, 2)
        return windowed_reference(blocks, model.forward_head(x), target)


def small_tiny_vit(seed: int = 2) -> nn.Module:
    """A narrow TinyViT with windows of 3 (2 in the last stage), every parameter given seeded
    noise (the seed chosen so that no block map of the tests' images is zero everywhere)."""
    torch.manual_seed(0)
    model = timm.create_model(
        "tiny_vit_5m_224", pretrained=False, num_classes=NUM_CLASSES,
        embed_dims=(16, 16, 32, 32), depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4),
        window_sizes=(3, 3, 3, 2),
    )
    return add_parameter_noise(model, seed=seed)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(target, fused):
    model = set_fused_attention(small_tiny_vit(), fused)
    # stage grids 8x10, 4x5 and 2x3: padded windows of 3 (and of 2 in the last stage)
    assert_family_matches_reference(model, make_images(3, 64, 80), target, explicit_daam, 4)


def test_every_registered_tiny_vit_model_is_taken():
    for name, layouts in registered_layouts("tiny_vit_*", TimmTinyVitAdapter):
        for layout in layouts:
            assert_each_cell_in_one_window(layout, name)
