"""timm LeViT (linear and NCHW convolutional layouts, distilled heads): DAAM over attention
with learned attention biases and over shrinking attention equals an explicit reference.

The reference runs the model in float64 with every attention written out: q, k and v from the
module's own projections (a linear or 1x1 convolution with batch norm), split per head into key
and value widths; the attention bias looked up by hand, bias[h, (i, j), (k, l)] =
attention_biases[h, |s i - k| * w + |s j - l|] (s the query stride of shrinking attention);
softmax(q k^T * scale + bias) formed as an explicit (B, H, Nq, Nk) matrix. Gradients at the
attention output before ``proj`` come from plain autograd; every row is split over the keys it
reads, weighted by its own gradient, summed and relu'd (reference.maps_from_every_query_row),
each map on its key grid and the flow on the finest by reference.area_resample.
"""

import copy
from typing import Dict, List, Tuple

import pytest
import timm
import torch
from timm.models.levit import AttentionDownsample
from torch import Tensor, nn

from captum_daam import DAAM
from captum_daam.adapters import TimmLevitAdapter, adapter_for
from helpers import (
    add_parameter_noise,
    assert_close_relative,
    assert_maps_on_block_grids_match,
    make_images,
)
from reference import flow_on_the_finest_grid, maps_from_every_query_row, resolve_targets

NUM_CLASSES = 7
TARGETS = [3, 6, 0]


def bias_by_hand(module: nn.Module) -> Tensor:
    """(H, Nq, Nk): the learned bias of each head for the offset between query and key."""
    rows, columns = module.resolution
    stride = getattr(module, "stride", 1)
    keys = [(r, c) for r in range(rows) for c in range(columns)]
    queries = [(r, c) for r in range(0, rows, stride) for c in range(0, columns, stride)]
    index = torch.tensor([[abs(qr - kr) * columns + abs(qc - kc) for kr, kc in keys]
                          for qr, qc in queries])
    return module.attention_biases[:, index]


def heads_of(tokens: Tensor, heads: int, use_conv: bool) -> Tensor:
    """The module's per-head split: (B, N, H * w) or (B, H * w, h, w') -> (B, H, N, w)."""
    if use_conv:
        batch = tokens.shape[0]
        return tokens.reshape(batch, heads, -1, tokens.shape[2] * tokens.shape[3]).transpose(-2, -1)
    batch, count = tokens.shape[:2]
    return tokens.reshape(batch, count, heads, -1).transpose(1, 2)


def explicit_attention(module: nn.Module, x: Tensor) -> Dict[str, object]:
    heads, key_dim, val_dim = module.num_heads, module.key_dim, module.val_dim
    if isinstance(module, AttentionDownsample):
        k, v = heads_of(module.kv(x), heads, module.use_conv).split([key_dim, val_dim], dim=-1)
        q = heads_of(module.q(x), heads, module.use_conv)
    else:
        q, k, v = heads_of(module.qkv(x), heads, module.use_conv).split(
            [key_dim, key_dim, val_dim], dim=-1)
    logits = q @ k.transpose(-2, -1) * key_dim**-0.5 + bias_by_hand(module)
    probabilities = logits.softmax(dim=-1)
    output = probabilities @ v  # (B, H, Nq, val_dim)
    batch, _, count, _ = output.shape
    tokens = output.transpose(1, 2).reshape(batch, count, heads * val_dim)
    if module.use_conv:
        side = [(size - 1) // getattr(module, "stride", 1) + 1 for size in module.resolution]
        pre_projection = tokens.transpose(1, 2).reshape(batch, -1, *side)
    else:
        pre_projection = tokens
    return dict(attn=probabilities, v=v, pre_projection=pre_projection,
                out=module.proj(pre_projection), key_grid=tuple(module.resolution))


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    with torch.enable_grad():
        x = model.stem(images.double())
        if not model.use_conv:
            x = x.flatten(2).transpose(1, 2)
        records: List[Dict] = []
        for stage in model.stages:
            if hasattr(stage.downsample, "attn_downsample"):
                record = explicit_attention(stage.downsample.attn_downsample, x)
                x = record["out"]
                x = x + stage.downsample.mlp(x)
                records.append(record)
            for block in stage.blocks:
                record = explicit_attention(block.attn, x)
                x = x + record["out"]
                x = x + block.mlp(x)
                records.append(record)
        pooled = x.mean(dim=(-2, -1)) if model.use_conv else x.mean(dim=1)
        logits = model.head(pooled)
        if hasattr(model, "head_dist"):
            logits = (logits + model.head_dist(pooled)) / 2
        targets = resolve_targets(target, logits)
        score = logits[torch.arange(len(logits)), targets].sum()
        gradients = torch.autograd.grad(score, [record["pre_projection"] for record in records])
    block_maps = []
    for record, gradient in zip(records, gradients):
        if model.use_conv:  # (B, C, h, w) -> (B, N, C), the tokens row by row
            gradient = gradient.flatten(2).transpose(1, 2)
        maps = maps_from_every_query_row([record], [gradient], 0, record["key_grid"])
        block_maps.append(maps["block_maps"][:, 0])
    return dict(logits=logits.detach(), block_maps=block_maps,
                flow=flow_on_the_finest_grid(block_maps))


def small_levit(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, img_size=96,
                              **kwargs)
    return add_parameter_noise(model)


CASES = {
    "linear": ("levit_128s", False),
    "convolutional": ("levit_conv_128s", False),
    "distilled": ("levit_128s", True),
    "convolutional_distilled": ("levit_conv_128s", True),
}


@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_flow_and_block_maps_equal_explicit_reference(case, target):
    name, distilled = CASES[case]
    model = small_levit(name, distilled=distilled)
    assert hasattr(model, "head_dist") == distilled
    images = make_images(3, 96, 96)  # a 6x6 grid, then 3x3 and 2x2
    expected = explicit_daam(model, images, target)
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images).double(), 1e-5)
    assert_maps_on_block_grids_match(model, images, target, expected)


def test_another_image_size_is_refused_before_any_work():
    model = small_levit("levit_128s", distilled=False)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match="built for a 6x6 grid, but 128x128 images give a 8x8"):
        DAAM(model).attribute(make_images(1, 128, 128), target=0)
    assert calls == []


def test_every_registered_levit_model_is_taken_with_its_grids():
    names = timm.list_models("levit_*")
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        adapter = adapter_for(model)
        assert isinstance(adapter, TimmLevitAdapter) and not adapter.has_class_token, name
        grids: List[Tuple[int, int]] = [
            layout.grid for layout in adapter.block_layouts(adapter.attention_modules(), (224, 224))
        ]
        assert grids[0] in {(14, 14), (28, 28)} and grids[-1] in {(4, 4), (7, 7)}, name
    assert len(names) == 20
