"""timm MobileViT: DAAM over the transformers of the MobileViT blocks equals an explicit
reference.

The reference runs mobilevit_xxs (random weights) in float64 with every MobileViT block written
out: the map resized up to whole patches where it is not, and unfolded by hand, pixel by pixel,
into one sequence per pixel offset of a patch (token n of sequence p is patch n's pixel p);
each transformer block's attention with q, k, v split from ``qkv`` per head by hand and
softmax(q k^T * scale) an explicit matrix; folded back by hand. Gradients at every sequence's
attention output before ``proj`` come from plain autograd; every row is split over the tokens
it reads, weighted by its own gradient, summed and relu'd, and each token's value put on its
pixel (test_adapter_swin.windowed_block_maps).
"""

import copy
import math
from typing import Dict, List

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.mobilevit import MobileVitBlock
from torch import Tensor, nn

from captum_daam.adapters import TimmMobileVitAdapter
from helpers import add_parameter_noise, assert_family_matches_reference, make_images
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 4, 0]


def explicit_transformer_block(layer: nn.Module, tokens: Tensor, sequences: int):
    """A timm Block on (B * P, N, C) tokens, its attention written out; the attention output
    before proj returned per sequence p as (B, N, C) tensors the rest is computed from."""
    attention = layer.attn
    batch_sequences, count, channels = tokens.shape
    heads = attention.num_heads
    qkv = attention.qkv(layer.norm1(tokens)).reshape(batch_sequences, count, 3, heads, -1)
    queries, keys, values = (qkv[:, :, part].transpose(1, 2) for part in range(3))
    probabilities = (queries @ keys.transpose(-2, -1) * attention.scale).softmax(dim=-1)
    output = (probabilities @ values).transpose(1, 2).reshape(batch_sequences, count, channels)
    per_sequence = [output[p::sequences] for p in range(sequences)]  # (B, N, C) each
    rejoined = torch.stack(per_sequence, dim=1).flatten(0, 1)  # image by image, as before
    tokens = tokens + layer.ls1(attention.proj(rejoined))
    tokens = tokens + layer.ls2(layer.mlp(layer.norm2(tokens)))
    windows = [dict(attn=probabilities[p::sequences], v=values[p::sequences],
                    pre_projection=per_sequence[p]) for p in range(sequences)]
    return tokens, windows


def explicit_mobilevit_block(block: MobileVitBlock, x: Tensor, blocks: List[Dict]) -> Tensor:
    shortcut = x
    x = block.conv_1x1(block.conv_kxk(x))
    batch, channels, height, width = x.shape
    patch_h, patch_w = block.patch_size
    whole_h, whole_w = math.ceil(height / patch_h) * patch_h, math.ceil(width / patch_w) * patch_w
    if (whole_h, whole_w) != (height, width):
        x = F.interpolate(x, size=(whole_h, whole_w), mode="bilinear", align_corners=False)
    rows, columns = whole_h // patch_h, whole_w // patch_w
    pixels = [(dr, dc) for dr in range(patch_h) for dc in range(patch_w)]
    patches = [(r, c) for r in range(rows) for c in range(columns)]
    cells = [[(r * patch_h + dr, c * patch_w + dc) for r, c in patches] for dr, dc in pixels]
    # Sequence p of image b (batch row b * P + p): pixel p of every patch, patches row-major.
    tokens = torch.stack([torch.stack([x[:, :, row, column] for row, column in cells[p]], dim=1)
                          for p in range(len(pixels))], dim=1).flatten(0, 1)
    for layer in block.transformer:
        tokens, windows = explicit_transformer_block(layer, tokens, len(pixels))
        for window, window_cells in zip(windows, cells):
            window["cells"] = window_cells
        blocks.append(dict(windows=windows, grid=(whole_h, whole_w)))
    tokens = block.norm(tokens).unflatten(0, (batch, len(pixels)))  # (B, P, N, C)
    folded = x.new_zeros(batch, channels, whole_h, whole_w)
    for p, window_cells in enumerate(cells):
        for n, (row, column) in enumerate(window_cells):
            folded[:, :, row, column] = tokens[:, p, n]
    if (whole_h, whole_w) != (height, width):
        folded = F.interpolate(folded, size=(height, width), mode="bilinear", align_corners=False)
    x = block.conv_proj(folded)
    return block.conv_fusion(torch.cat((shortcut, x), dim=1))


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = model.stem(images.double())
        for stage in model.stages:
            for block in stage:
                x = explicit_mobilevit_block(block, x, blocks) if isinstance(
                    block, MobileVitBlock) else block(x)
        logits = model.forward_head(model.final_conv(x))
        return windowed_reference(blocks, logits, target)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=NUM_CLASSES)
    return add_parameter_noise(model, scale=0.05, seed=1)


@pytest.mark.parametrize("size", [(64, 96), (72, 40)], ids=["whole patches", "resized"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(model, target, size):
    # 64x96: maps 8x12, 4x6, 2x3; 72x40: 9x5 -> 10x6, 5x3 -> 6x4, 3x2 -> 4x2 (resized up)
    assert_family_matches_reference(model, make_images(3, *size), target, explicit_daam, 9)


def test_layouts_match_the_maps_each_mobilevit_block_unfolds(model):
    seen = []
    blocks = [module for module in model.modules() if isinstance(module, MobileVitBlock)]
    handles = [block.conv_1x1.register_forward_hook(
        lambda module, args, output: seen.append(tuple(output.shape[-2:]))) for block in blocks]
    try:
        with torch.no_grad():
            model(make_images(1, 100, 70))
    finally:
        for handle in handles:
            handle.remove()
    grids = [layout.grid for layout in TimmMobileVitAdapter(model).layouts((100, 70))]
    whole = [tuple(math.ceil(size / 2) * 2 for size in grid) for grid in seen]  # patches of 2
    assert seen == [(13, 9), (7, 5), (4, 3)]
    assert grids == [grid for grid, block in zip(whole, blocks) for _ in block.transformer]
