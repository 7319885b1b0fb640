"""timm Twins (PCPVT, SVT): DAAM over sub-sampled and locally grouped attention equals an
explicit reference.

The reference runs the model in float64 with every attention written out: global sub-sampled
attention from ``q`` over keys and values from ``kv`` of the tokens the block reduces (its own
strided convolution and norm), and locally grouped attention window by window, the grid padded
with zeros and each window cut out by slicing; softmax(q k^T * scale) is an explicit matrix.
Gradients at every attention output before the projection come from plain autograd. Every
row is split over the tokens it reads, weighted by its own gradient, summed and relu'd
(reference.maps_from_every_query_row for the reduced keys, test_adapter_swin.windowed_block_maps
for the windows, each token put on its cell by hand); the flow lies on the finest grid.
"""

import copy
import math
from typing import Dict, List

import pytest
import timm
import torch
from timm.models.twins import LocallyGroupedAttn
from torch import Tensor, nn

from captum_daam.adapters import TimmTwinsAdapter, adapter_for
from helpers import (
    add_parameter_noise,
    assert_close_relative,
    assert_maps_on_block_grids_match,
    make_images,
    set_fused_attention,
)
from reference import flow_on_the_finest_grid, maps_from_every_query_row, resolve_targets
from test_adapter_swin import windowed_block_maps

NUM_CLASSES = 7
TARGETS = [3, 6, 0]


def explicit_softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Dict[str, Tensor]:
    probabilities = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    batch, heads, count, width = q.shape
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, count, heads * width)
    return dict(attn=probabilities, v=v, pre_projection=pre_projection)


def explicit_subsampled(attention: nn.Module, x: Tensor, grid) -> Dict[str, object]:
    batch, count, channels = x.shape
    heads = attention.num_heads
    q = attention.q(x).reshape(batch, count, heads, -1).transpose(1, 2)
    reduced, key_grid = x, grid
    if attention.sr is not None:
        spatial = attention.sr(x.transpose(1, 2).reshape(batch, channels, *grid))
        key_grid = tuple(spatial.shape[-2:])
        reduced = attention.norm(spatial.flatten(2).transpose(1, 2))
    k, v = attention.kv(reduced).reshape(batch, -1, 2, heads, q.shape[-1]).permute(2, 0, 3, 1, 4)
    record = explicit_softmax_attention(q, k, v)
    record.update(out=attention.proj(record["pre_projection"]), key_grid=key_grid)
    return record


def explicit_grouped(attention: nn.Module, x: Tensor, grid) -> Dict[str, object]:
    """Locally grouped attention by hand: the output (B, N, C) and every window's record; the
    gradient taken at each window's output before it is put back and projected."""
    batch, count, channels = x.shape
    height, width = grid
    side, heads = attention.ws, attention.num_heads
    padded_h, padded_w = math.ceil(height / side) * side, math.ceil(width / side) * side
    padded = x.new_zeros(batch, padded_h, padded_w, channels)
    padded[:, :height, :width] = x.reshape(batch, height, width, channels)
    merged = x.new_zeros(batch, padded_h, padded_w, channels)
    windows = []
    for top in range(0, padded_h, side):
        for left in range(0, padded_w, side):
            tokens = padded[:, top : top + side, left : left + side].reshape(batch, -1, channels)
            q, k, v = attention.qkv(tokens).reshape(batch, -1, 3, heads, channels // heads).permute(
                2, 0, 3, 1, 4)
            record = explicit_softmax_attention(q, k, v)
            merged[:, top : top + side, left : left + side] = record["pre_projection"].reshape(
                batch, side, side, channels)
            record["cells"] = [
                (r, c) if r < height and c < width else None
                for r in range(top, top + side)
                for c in range(left, left + side)
            ]
            windows.append(record)
    out = attention.proj(merged[:, :height, :width].reshape(batch, count, channels))
    return dict(out=out, windows=windows, grid=grid)


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    with torch.enable_grad():
        x = images.double()
        blocks: List[Dict] = []
        for index, (embed, stage, peg) in enumerate(
                zip(model.patch_embeds, model.blocks, model.pos_block)):
            x, grid = embed(x)
            for position, block in enumerate(stage):
                attention = block.attn
                if isinstance(attention, LocallyGroupedAttn):
                    record = explicit_grouped(attention, block.norm1(x), grid)
                else:
                    record = explicit_subsampled(attention, block.norm1(x), grid)
                x = x + record["out"]
                x = x + block.mlp(block.norm2(x))
                if position == 0:
                    x = peg(x, grid)
                blocks.append(record)
            if index < len(model.blocks) - 1:
                x = x.reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2)
        logits = model.head(model.norm(x).mean(dim=1))
        targets = resolve_targets(target, logits)
        score = logits[torch.arange(len(logits)), targets].sum()
        outputs = [window["pre_projection"] for block in blocks
                   for window in block.get("windows", [block])]
        gradients = iter(torch.autograd.grad(score, outputs))
    block_maps = []
    for block in blocks:
        if "windows" in block:
            block_maps += windowed_block_maps([block], gradients)
        else:
            maps = maps_from_every_query_row([block], [next(gradients)], 0, block["key_grid"])
            block_maps.append(maps["block_maps"][:, 0])
    return dict(logits=logits.detach(), block_maps=block_maps,
                flow=flow_on_the_finest_grid(block_maps))


def small_twins(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        name, pretrained=False, num_classes=NUM_CLASSES, depths=(2, 2, 1, 1),
        embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4), wss=(3, 3, 3, 3)
        if "svt" in name else None,
    )
    return add_parameter_noise(model)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
@pytest.mark.parametrize("name", ["twins_svt_small", "twins_pcpvt_small"], ids=["svt", "pcpvt"])
def test_flow_and_block_maps_equal_explicit_reference(name, target, fused):
    model = set_fused_attention(small_twins(name), fused)
    images = make_images(3, 64, 80)  # a 16x20 grid, then 8x10: windows of 3 padded
    expected = explicit_daam(model, images, target)
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images).double(), 1e-5)
    assert len(expected["block_maps"]) == 6
    assert_maps_on_block_grids_match(model, images, target, expected)


def test_every_registered_twins_model_is_taken():
    for name in timm.list_models("twins_*"):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        adapter = adapter_for(model)
        assert isinstance(adapter, TimmTwinsAdapter) and not adapter.has_class_token, name
        for layout in adapter.block_layouts(adapter.attention_modules(), (224, 224)):
            if layout.positions is not None:  # every patch in exactly one window
                cells = layout.positions[layout.positions >= 0]
                assert sorted(cells.tolist()) == list(range(layout.grid[0] * layout.grid[1]))
