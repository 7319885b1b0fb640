"""timm PVTv2: DAAM over attention on reduced keys and values equals an explicit reference.

The reference runs the model in float64 with every block's attention written out: the query
from ``q``, the keys and values from ``kv`` over the tokens the block reduces (its own
strided convolution and norm, or the linear variant's 7x7 average pooling, 1x1 convolution,
norm and GELU: the reduction is the model's, the attention is by hand), softmax(q k^T * scale)
formed as an explicit (B, H, N, Nk) matrix. The gradient at the output before the projection
comes from plain autograd; every row is split over the reduced tokens it reads, weighted by
its own gradient, summed and relu'd; each block's map lies on its key grid, and the flow on
the finest grid by reference.area_resample.
"""

import copy
from typing import Dict

import pytest
import timm
import torch
from torch import Tensor, nn

from captum_daam.adapters import TimmPvtV2Adapter, adapter_for
from helpers import (
    add_parameter_noise,
    assert_close_relative,
    assert_maps_on_block_grids_match,
    make_images,
    set_fused_attention,
)
from reference import flow_on_the_finest_grid, maps_from_every_query_row, resolve_targets

NUM_CLASSES = 7
TARGETS = [3, 6, 0]


def reduced_tokens(attention: nn.Module, x: Tensor, grid) -> Tensor:
    """The tokens the keys and values are made of: the model's own reduction of ``x``."""
    batch, count, channels = x.shape
    if attention.pool is None and attention.sr is None:
        return x
    spatial = x.transpose(1, 2).reshape(batch, channels, *grid)
    if attention.pool is not None:
        spatial = attention.pool(spatial)
    reduced = attention.norm(attention.sr(spatial).flatten(2).transpose(1, 2))
    return attention.act(reduced) if attention.act is not None else reduced


def explicit_attention(attention: nn.Module, x: Tensor, grid) -> Dict[str, object]:
    batch, count, channels = x.shape
    heads = attention.num_heads
    q = attention.q(x).reshape(batch, count, heads, -1).transpose(1, 2)
    reduced = reduced_tokens(attention, x, grid)
    k, v = attention.kv(reduced).reshape(batch, -1, 2, heads, q.shape[-1]).permute(2, 0, 3, 1, 4)
    probabilities = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, count, channels)
    return dict(attn=probabilities, v=v, pre_projection=pre_projection,
                out=attention.proj(pre_projection))


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    with torch.enable_grad():
        x = model.patch_embed(images.double())  # (B, H, W, C)
        records = []
        for stage in model.stages:
            if stage.downsample is not None:
                x = stage.downsample(x)
            batch, height, width, channels = x.shape
            x = x.reshape(batch, -1, channels)
            for block in stage.blocks:
                record = explicit_attention(block.attn, block.norm1(x), (height, width))
                x = x + record["out"]
                x = x + block.mlp(block.norm2(x), (height, width))
                key_count = record["v"].shape[2]
                side = (height, width) if key_count == height * width else None
                record["key_grid"] = side or _key_grid(block.attn, (height, width), key_count)
                records.append(record)
            x = stage.norm(x).reshape(batch, height, width, -1).permute(0, 3, 1, 2)
        logits = model.head(x.mean(dim=(-1, -2)))
        targets = resolve_targets(target, logits)
        score = logits[torch.arange(len(logits)), targets].sum()
        gradients = torch.autograd.grad(score, [record["pre_projection"] for record in records])
    block_maps = [
        maps_from_every_query_row([record], [gradient], 0, record["key_grid"])["block_maps"][:, 0]
        for record, gradient in zip(records, gradients)
    ]
    return dict(logits=logits.detach(), block_maps=block_maps,
                flow=flow_on_the_finest_grid(block_maps))


def _key_grid(attention: nn.Module, grid, count: int):
    """The reduced grid: 7x7 for the linear variant, else the grid divided by sr_ratio."""
    if attention.pool is not None:
        return (7, 7)
    stride = attention.sr.stride
    reduced = (grid[0] // stride[0], grid[1] // stride[1])
    assert reduced[0] * reduced[1] == count
    return reduced


def small_pvt(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        name, pretrained=False, num_classes=NUM_CLASSES, depths=(1, 2, 1, 1),
        embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4),
    )
    return add_parameter_noise(model)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"], ids=["reduction", "linear"])
def test_flow_and_block_maps_equal_explicit_reference(name, target, fused):
    model = set_fused_attention(small_pvt(name), fused)
    images = make_images(3, 64, 96)
    expected = explicit_daam(model, images, target)
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images).double(), 1e-5)
    assert len(expected["block_maps"]) == 5
    assert_maps_on_block_grids_match(model, images, target, expected)


def test_every_registered_pvt_v2_model_is_taken_with_its_key_grids():
    for name in timm.list_models("pvt_v2_*"):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        adapter = adapter_for(model)
        assert isinstance(adapter, TimmPvtV2Adapter) and not adapter.has_class_token
        # The linear variant pools to 7x7; sr_ratio 8, 4, 2, 1 bring 56, 28, 14, 7 to 7x7.
        assert set(adapter.key_grids((224, 224))) == {(7, 7)}, name
