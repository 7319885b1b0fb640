"""timm Hiera: DAAM over mask-unit and global attention with query pooling equals an explicit
reference.

The reference never unrolls: it keeps the tokens on their grid, row by row, the whole way
(every step but attention and pooling acts token by token, and attention without a position
bias does not depend on the order of the tokens it reads). A pooling block max-pools its
projected shortcut and its queries over aligned 2x2 neighbourhoods of the grid (F.max_pool2d);
mask-unit attention attends within aligned squares of the grid (side: the module's unit size
before pooling), global attention over the whole grid; q, k and v come from the module's qkv
weights, softmax(q k^T * d ** -0.5) is an explicit matrix, and each unit's output goes back to
its (pooled) cells. Gradients at every unit's output before the projection come from plain
autograd; every query row is split over the tokens it reads, weighted by its own gradient,
summed and relu'd (test_adapter_swin.windowed_block_maps), each key token put on its cell; a
block's map lies on the grid of the tokens it reads.
"""

import copy
import math
from typing import Dict, List

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_daam.adapters import TimmHieraAdapter
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


def max_pool(x: Tensor) -> Tensor:
    """(B, h, w, C) max-pooled over aligned 2x2 neighbourhoods."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)


def explicit_block(block: nn.Module, x: Tensor) -> Dict[str, object]:
    """One HieraBlock on grid tokens ``x`` (B, h, w, C): the output and every unit's record."""
    attention = block.attn
    heads, width = attention.heads, attention.head_dim
    pooled = attention.q_stride > 1
    normed = block.norm1(x)
    shortcut = x
    if block.do_expand:  # a wider stage: the shortcut projected (or doubled) and pooled
        if block.proj is not None:
            projected = block.proj(normed)
            shortcut = max_pool(projected) if pooled else projected
        elif pooled:
            mean = F.avg_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
            shortcut = torch.cat([max_pool(x), mean], dim=-1)
        else:
            shortcut = torch.cat([x, x], dim=-1)
    batch, height, grid_width, _ = x.shape
    q, k, v = attention.qkv(normed).unflatten(-1, (3, heads, width)).unbind(3)  # (B, h, w, H, d)
    if pooled:
        q = max_pool(q.flatten(3)).unflatten(-1, (heads, width))
    if attention.use_mask_unit_attn:  # the unit's area before pooling: q_stride * window_size
        side = math.isqrt(attention.q_stride * attention.window_size)
        sides = (side, side)
    else:
        sides = (height, grid_width)
    query_sides = tuple(s // 2 for s in sides) if pooled else sides
    pre_projection = x.new_zeros(batch, *q.shape[1:3], heads * width)
    windows = []
    for top in range(0, height, sides[0]):
        for left in range(0, grid_width, sides[1]):
            cells = [(top + i, left + j) for i in range(sides[0]) for j in range(sides[1])]
            query_top, query_left = (top // 2, left // 2) if pooled else (top, left)
            query_cells = [(query_top + i, query_left + j)
                           for i in range(query_sides[0]) for j in range(query_sides[1])]
            rows, columns = (torch.tensor(axis) for axis in zip(*cells))
            query_rows, query_columns = (torch.tensor(axis) for axis in zip(*query_cells))
            keys, values = (part[:, rows, columns].transpose(1, 2) for part in (k, v))
            queries = q[:, query_rows, query_columns].transpose(1, 2)  # (B, H, Q, d)
            probabilities = (queries @ keys.transpose(-2, -1) * width ** -0.5).softmax(-1)
            output = (probabilities @ values).transpose(1, 2).flatten(2)  # (B, Q, H * d)
            pre_projection[:, query_rows, query_columns] = output
            windows.append(dict(attn=probabilities, v=values, pre_projection=output,
                                cells=cells))
    y = shortcut + block.ls1(attention.proj(pre_projection))
    y = y + block.ls2(block.mlp(block.norm2(y)))
    return dict(out=y, windows=windows, grid=(height, grid_width))


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        patches = model.patch_embed(images.double())  # (B, N, C), the grid row by row
        x = model._pos_embed(patches).unflatten(1, tuple(model.tokens_spatial_shape))
        for block in model.blocks:
            record = explicit_block(block, x)
            blocks.append(record)
            x = record["out"]
        logits = model.forward_head(x.flatten(1, 2))
        return windowed_reference(blocks, logits, target)


def small_hiera(name: str, seed: int = 1, **overrides) -> nn.Module:
    """A narrow Hiera of ``name``'s configuration on 64x64 images (a 16x16 token grid, mask
    units of 8x8 tokens), every parameter given seeded noise (timm starts the classifier at
    zero; the ``seed`` chosen so that no block map of the tests' images is zero everywhere)."""
    torch.manual_seed(0)
    model = timm.create_model(
        name, pretrained=False, num_classes=NUM_CLASSES, img_size=64, embed_dim=16,
        num_heads=1, stages=(1, 2, 2, 1), **overrides,
    )
    return add_parameter_noise(model, seed=seed)


MODELS = {
    "hiera": ("hiera_tiny_224", {}),  # units in stages 1-2, global in 3-4, three poolings
    "abswin": ("hiera_small_abswin_256", {"global_pos_size": (8, 8)}),  # window pos embedding
    "two_poolings": ("hiera_tiny_224", {"q_pool": 2, "seed": 3,
                                        "mask_unit_attn": (True, False, True, False)}),
    "no_expand_proj": ("hiera_tiny_224", {"use_expand_proj": False, "seed": 2}),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
@pytest.mark.parametrize("key", list(MODELS))
def test_flow_and_block_maps_equal_explicit_reference(key, target, fused):
    name, overrides = MODELS[key]
    model = set_fused_attention(small_hiera(name, **overrides), fused)
    assert_family_matches_reference(model, make_images(3, 64, 64), target, explicit_daam, 6)


def test_another_image_size_is_refused_before_any_work():
    assert_refused_before_any_work(small_hiera("hiera_tiny_224"), make_images(1, 96, 96),
                                   r"16x16 token grid \(64x64, its img_size.*got 96x96")


def test_every_registered_hiera_model_is_taken():
    for name, layouts in registered_layouts("hiera_*", TimmHieraAdapter):
        for layout in layouts:
            assert_each_cell_in_one_window(layout, name)  # each cell it reads in one unit
