"""timm MobileNetV4 hybrids: DAAM over the multi-query attention blocks equals an explicit
reference.

The reference runs mobilenetv4_hybrid_medium (random weights from timm's own builder) in
float64 with every MobileAttention block written out: the queries from
the module's ``query`` convolution split per head by hand, the one key and one value from its
strided ``key`` / ``value`` convolutions, softmax(q k^T * scale) an explicit matrix for every
head over the shared key, the output A v with the heads concatenated, then ``output``, the
layer scale and the shortcut as the block does. Gradients at the attention output before
``output`` come from plain autograd; every row is split over the keys it reads, weighted by
its own gradient, summed and relu'd, each key on its cell of the key grid
(test_adapter_swin.windowed_block_maps).
"""

import copy
from typing import Dict, List

import pytest
import timm
import torch
from timm.models._efficientnet_blocks import MobileAttention
from torch import Tensor, nn

from captum_daam.adapters import TimmMobileNetV4HybridAdapter
from helpers import add_parameter_noise, assert_family_matches_reference, make_images
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 4, 0]


def explicit_multi_query_attention(attention: nn.Module, x: Tensor) -> Dict[str, object]:
    batch, _, height, width = x.shape
    heads = attention.num_heads
    queries = attention.query(x)
    query_grid = tuple(queries.shape[-2:])
    queries = queries.reshape(batch, heads, attention.key_dim, -1).transpose(-1, -2)
    keys = attention.key(x)
    key_grid = tuple(keys.shape[-2:])
    keys = keys.flatten(2).transpose(1, 2)  # (B, M, k): one key head for all query heads
    values = attention.value(x).flatten(2).transpose(1, 2)  # (B, M, v)
    probabilities = (queries @ keys.unsqueeze(1).transpose(-2, -1) * attention.scale).softmax(-1)
    output = probabilities @ values.unsqueeze(1)  # (B, H, N, v)
    pre_projection = output.transpose(1, 2).reshape(batch, -1, heads * values.shape[-1])
    mixed = pre_projection.transpose(1, 2).reshape(batch, -1, *query_grid)
    cells = [(row, column) for row in range(key_grid[0]) for column in range(key_grid[1])]
    window = dict(attn=probabilities, v=values.unsqueeze(1).expand(-1, heads, -1, -1),
                  cells=cells, pre_projection=pre_projection)
    return dict(out=attention.output(mixed), windows=[window], grid=key_grid)


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = model.bn1(model.conv_stem(images.double()))
        for stage in model.blocks:
            for block in stage:
                if not isinstance(block, MobileAttention):
                    x = block(x)
                    continue
                if block.conv_cpe_dw is not None:
                    x = x + block.conv_cpe_dw(x)
                record = explicit_multi_query_attention(block.attn, block.norm(x))
                blocks.append(record)
                x = x + block.layer_scale(record["out"])
        return windowed_reference(blocks, model.forward_head(x), target)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    built = timm.create_model("mobilenetv4_hybrid_medium", pretrained=False,
                              num_classes=NUM_CLASSES)
    return add_parameter_noise(built, scale=0.1, seed=3)  # a seed with no block map all zero


@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(model, target):
    # 64x96 images: stage-3 maps 4x6 (keys 2x3, kv stride 2), stage-4 maps 2x3 (keys 2x3)
    assert_family_matches_reference(model, make_images(3, 64, 96), target, explicit_daam, 8)


def test_layouts_match_the_key_grids_at_odd_sizes(model):
    seen = []
    handles = [attention.key.register_forward_hook(
        lambda module, args, output: seen.append(tuple(output.shape[-2:])))
        for attention in TimmMobileNetV4HybridAdapter(model).attention_modules()]
    try:
        with torch.no_grad():
            model(make_images(1, 97, 161))
    finally:
        for handle in handles:
            handle.remove()
    layouts = TimmMobileNetV4HybridAdapter(model).layouts((97, 161))
    assert seen == [layout.grid for layout in layouts] and (4, 6) in seen
