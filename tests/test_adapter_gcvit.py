"""timm GCViT: DAAM over local and global-query window attention equals an explicit reference.

The reference runs the model in float64 with every attention written out: each stage grid cut
into windows by slicing, keys and values (and, in a local block, queries) from the module's
qkv weights, in a global block the stage's global query tokens (the model's own generator)
as every window's queries, softmax(q k^T * d ** -0.5 + bias) an explicit matrix with the
relative position bias looked up by hand from the module's table, and each window's projected
output put back by slicing. Stem, downsamplings, norms, MLPs and head are the model's own
modules. Gradients at every window's output before the projection come from plain autograd;
every row is split over the tokens it reads, weighted by its own gradient, summed and relu'd
(test_adapter_swin.windowed_block_maps), each token put on its cell.
"""

import copy
from typing import Dict, List

import pytest
import torch
from timm.models.gcvit import GlobalContextVit
from torch import Tensor, nn

from captum_daam.adapters import TimmGcVitAdapter
from helpers import (
    add_parameter_noise,
    assert_each_cell_in_one_window,
    assert_family_matches_reference,
    assert_refused_before_any_work,
    make_images,
    registered_layouts,
)
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 4, 0]


def bias_by_hand(attention: nn.Module) -> Tensor:
    """(H, N, N): the table's row for the offset (dr, dc) between query and key,
    (dr + wh - 1) * (2 ww - 1) + (dc + ww - 1)."""
    rows, columns = attention.window_size
    cells = [(r, c) for r in range(rows) for c in range(columns)]
    index = torch.tensor([[(r1 - r2 + rows - 1) * (2 * columns - 1) + (c1 - c2 + columns - 1)
                           for r2, c2 in cells] for r1, c1 in cells])
    return attention.rel_pos.relative_position_bias_table[index].permute(2, 0, 1)


def explicit_block(block: nn.Module, x: Tensor, global_query: Tensor) -> Dict[str, object]:
    attention = block.attn
    heads = attention.num_heads
    normed = block.norm1(x)
    batch, height, width, channels = x.shape
    side_h, side_w = block.window_size
    attended = torch.zeros_like(x)
    windows = []
    for top in range(0, height, side_h):
        for left in range(0, width, side_w):
            tokens = normed[:, top: top + side_h, left: left + side_w].flatten(1, 2)
            if attention.use_global:
                k, v = attention.qkv(tokens).unflatten(-1, (2, heads, -1)).unbind(2)
                q = global_query.reshape(batch, -1, heads, k.shape[-1])
            else:
                q, k, v = attention.qkv(tokens).unflatten(-1, (3, heads, -1)).unbind(2)
            q, k, v = (part.transpose(1, 2) for part in (q, k, v))
            logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias_by_hand(attention)
            probabilities = logits.softmax(dim=-1)
            output = (probabilities @ v).transpose(1, 2).flatten(2)
            attended[:, top: top + side_h, left: left + side_w] = attention.proj(
                output).unflatten(1, (side_h, side_w))
            windows.append(dict(attn=probabilities, v=v, pre_projection=output,
                                cells=[(top + i, left + j) for i in range(side_h)
                                       for j in range(side_w)]))
    y = x + block.ls1(attended)
    y = y + block.ls2(block.mlp(block.norm2(y)))
    return dict(out=y, windows=windows, grid=(height, width))


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = model.stem(images.double())
        for stage in model.stages:
            x = stage.downsample(x)
            global_query = stage.global_norm(stage.global_block(x).permute(0, 2, 3, 1))
            x = x.permute(0, 2, 3, 1)
            for block in stage.blocks:
                record = explicit_block(block, x, global_query)
                blocks.append(record)
                x = record["out"]
            x = stage.norm(x).permute(0, 3, 1, 2)
        return windowed_reference(blocks, model.forward_head(x), target)


def small_gcvit(seed: int = 1) -> nn.Module:
    """A narrow GCViT on 128x128 images: stage grids 32, 16, 8, 4 in windows of 4, 4, 8
    and 4 (timm's builders fix the widths: built directly)."""
    torch.manual_seed(0)
    model = GlobalContextVit(num_classes=NUM_CLASSES, img_size=128, embed_dim=16,
                             depths=(1, 2, 2, 1), num_heads=(1, 2, 2, 4))
    return add_parameter_noise(model, seed=seed)


@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(target):
    assert_family_matches_reference(small_gcvit(), make_images(3, 128, 128), target,
                                    explicit_daam, 6)


def test_global_blocks_are_among_those_checked():
    model = small_gcvit()
    assert {block.attn.use_global for stage in model.stages for block in stage.blocks} == {
        True, False}


def test_images_the_windows_do_not_divide_are_refused_before_any_work():
    assert_refused_before_any_work(small_gcvit(), make_images(1, 96, 96),
                                   r"Stage 2 .*8x8 windows .*96x96 images give 6x6")


def test_every_registered_gcvit_model_is_taken():
    for name, layouts in registered_layouts("gcvit_*", TimmGcVitAdapter):
        for layout in layouts:
            assert_each_cell_in_one_window(layout, name)
