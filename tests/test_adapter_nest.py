"""timm NesT: DAAM over attention within image blocks equals an explicit reference.

The reference runs the model in float64 with every attention written out: each level's grid is
cut into square image blocks by slicing (blocks row by row, tokens row by row in each), the
module's qkv weights applied to each block's tokens, softmax(q k^T * d ** -0.5) an explicit
matrix, and the heads merged channel-major before the projection, as NesT does (channel
e * H + h holds head h's channel e); the blocks are put back on the grid by slicing. The patch
embedding, the convolution-and-pooling between levels, the norms, MLPs and head are the model's
own modules. Gradients at every block's attention output before the projection (heads first,
h * d + e) come from plain autograd; every row is split over the tokens it reads, weighted by
its own gradient, summed and relu'd (test_adapter_swin.windowed_block_maps), each token put on
its cell; the flow lies on the finest grid.
"""

import copy
from typing import Dict, List

import pytest
import torch
from timm.models.nest import Nest
from torch import Tensor, nn

from captum_daam.adapters import TimmNestAdapter
from helpers import (
    add_parameter_noise,
    assert_each_cell_in_one_window,
    assert_family_matches_reference,
    assert_refused_before_any_work,
    make_images,
    registered_layouts,
    set_fused_attention,
)
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 4, 0]


def explicit_level(level: nn.Module, x: Tensor, blocks: List[Dict]) -> Tensor:
    """One NesT level on NCHW ``x``, its attention by hand; appends each layer's record."""
    x = level.pool(x).permute(0, 2, 3, 1)  # (B, h, w, C)
    batch, height, width, channels = x.shape
    side = level.block_size
    corners = [(top, left) for top in range(0, height, side) for left in range(0, width, side)]
    tokens = torch.stack([x[:, top: top + side, left: left + side].reshape(batch, -1, channels)
                          for top, left in corners], dim=1)  # (B, T, N, C)
    tokens = tokens + level.pos_embed
    for layer in level.transformer_encoder:
        attention = layer.attn
        heads = attention.num_heads
        q, k, v = attention.qkv(layer.norm1(tokens)).unflatten(-1, (3, heads, -1)).unbind(-3)
        q, k, v = (part.transpose(2, 3) for part in (q, k, v))  # (B, T, H, N, d)
        probabilities = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        attended = (probabilities @ v).permute(0, 1, 3, 2, 4)  # (B, T, N, H, d)
        windows = []
        for index, (top, left) in enumerate(corners):
            windows.append(dict(
                attn=probabilities[:, index], v=v[:, index],
                pre_projection=attended[:, index].flatten(2),  # heads first: h * d + e
                cells=[(top + i, left + j) for i in range(side) for j in range(side)]))
        channel_major = torch.stack(
            [window["pre_projection"] for window in windows], dim=1
        ).unflatten(-1, (heads, -1)).transpose(-1, -2).flatten(-2)  # e * H + h, as NesT
        blocks.append(dict(windows=windows, grid=(height, width)))
        tokens = tokens + attention.proj(channel_major)
        tokens = tokens + layer.mlp(layer.norm2(tokens))
    out = x.new_zeros(batch, height, width, channels)
    for index, (top, left) in enumerate(corners):
        out[:, top: top + side, left: left + side] = tokens[:, index].reshape(
            batch, side, side, channels)
    return out.permute(0, 3, 1, 2)


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = model.patch_embed(images.double())
        for level in model.levels:
            x = explicit_level(level, x, blocks)
        x = model.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return windowed_reference(blocks, model.forward_head(x), target)


def small_nest(seed: int = 1) -> nn.Module:
    """A narrow NesT on 64x64 images (timm's builders fix the widths: built directly)."""
    torch.manual_seed(0)
    model = Nest(img_size=64, patch_size=4, num_levels=3, embed_dims=(16, 32, 32),
                 num_heads=(1, 2, 4), depths=(1, 2, 1), num_classes=NUM_CLASSES)
    return add_parameter_noise(model, seed=seed)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(target, fused):
    model = set_fused_attention(small_nest(), fused)
    # level grids 16x16, 8x8, 4x4 in image blocks of 4x4: 16, 4 and 1 blocks
    assert_family_matches_reference(model, make_images(3, 64, 64), target, explicit_daam, 4)


def test_another_image_size_is_refused_before_any_work():
    assert_refused_before_any_work(small_nest(), make_images(1, 96, 96),
                                   r"takes 64x64 images.*got 96x96")


def test_every_registered_nest_model_is_taken():
    for name, layouts in registered_layouts("nest_*", TimmNestAdapter):
        for layout in layouts:
            assert_each_cell_in_one_window(layout, name)
