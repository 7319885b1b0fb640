"""torchvision's Swin Transformer (swin_t, swin_v2_t): DAAM over windowed attention equals an
explicit reference.

The reference runs the model in float64 with every block's attention written out window by
window, in torchvision's order: zero padding to whole windows, then the cyclic shift (none
along an axis the window covers), each window cut out by slicing, the relative position index
and the shift mask built by hand (tests/test_adapter_swin.py), softmax(q k^T * scale + bias)
as an explicit (B, H, N, N) matrix per window (V2: cosine attention, the per-head logit scale,
16 * sigmoid(MLP(table)), the key bias held at zero). Gradients at each window's output before
the projection come from plain autograd; every row is split over the tokens it reads, weighted
by its own gradient, summed and relu'd, and put back on its patch by undoing the shift and the
padding by hand. The stages' maps are brought to the finest grid by reference.area_resample.
"""

import copy
import math
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models import swin_transformer as tv_swin

from captum_daam.adapters import TorchvisionSwinAdapter, adapter_for
from helpers import (
    add_parameter_noise,
    assert_close_relative,
    assert_maps_on_block_grids_match,
    make_images,
)
from test_adapter_swin import (
    region_labels_by_hand,
    relative_index_by_hand,
    windowed_reference,
)

NUM_CLASSES = 7
TARGETS = [3, 6, 0]


def explicit_window(attention: nn.Module, tokens: Tensor, mask: Tensor) -> Dict[str, Tensor]:
    batch, count, channels = tokens.shape
    heads = attention.num_heads
    cosine = isinstance(attention, tv_swin.ShiftedWindowAttentionV2)
    bias = attention.qkv.bias
    if cosine:
        length = bias.numel() // 3
        bias = torch.cat([bias[:length], torch.zeros_like(bias[length : 2 * length]),
                          bias[2 * length :]])
    q, k, v = (tokens @ attention.qkv.weight.T + bias).reshape(
        batch, count, 3, heads, -1).permute(2, 0, 3, 1, 4)
    index = relative_index_by_hand(tuple(attention.window_size))
    if cosine:
        scale = torch.clamp(attention.logit_scale, max=math.log(100.0)).exp()
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale
        table = attention.cpb_mlp(attention.relative_coords_table).reshape(-1, heads)
        relative = 16 * torch.sigmoid(table[index].permute(2, 0, 1))
    else:
        logits = q @ k.transpose(-2, -1) * (channels // heads) ** -0.5
        relative = attention.relative_position_bias_table[index].permute(2, 0, 1)
    probabilities = (logits + relative + mask).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, count, channels)
    return dict(attn=probabilities, v=v, pre_projection=pre_projection,
                out=attention.proj(pre_projection))


def explicit_attention(attention: nn.Module, x: Tensor) -> Tuple[Tensor, List[Dict]]:
    batch, height, width, channels = x.shape
    wh, ww = attention.window_size
    padded_h, padded_w = math.ceil(height / wh) * wh, math.ceil(width / ww) * ww
    sh = 0 if wh >= padded_h else attention.shift_size[0]
    sw = 0 if ww >= padded_w else attention.shift_size[1]
    padded = x.new_zeros(batch, padded_h, padded_w, channels)
    padded[:, :height, :width] = x
    shifted = torch.roll(padded, shifts=(-sh, -sw), dims=(1, 2))
    labels = region_labels_by_hand((padded_h, padded_w), (wh, ww), (sh, sw))
    output = torch.zeros_like(padded)
    windows = []
    for top in range(0, padded_h, wh):
        for left in range(0, padded_w, ww):
            tokens = shifted[:, top : top + wh, left : left + ww].reshape(batch, -1, channels)
            mask = torch.zeros(wh * ww, wh * ww, dtype=x.dtype)
            if sh or sw:
                region = labels[top : top + wh, left : left + ww].reshape(-1)
                mask = mask.masked_fill(region[:, None] != region[None, :], -100.0)
            record = explicit_window(attention, tokens, mask)
            output[:, top : top + wh, left : left + ww] = record["out"].reshape(
                batch, wh, ww, channels)
            cells = []
            for r in range(top, top + wh):
                for c in range(left, left + ww):
                    row, column = (r + sh) % padded_h, (c + sw) % padded_w  # before the shift
                    cells.append((row, column) if row < height and column < width else None)
            record["cells"] = cells
            windows.append(record)
    output = torch.roll(output, shifts=(sh, sw), dims=(1, 2))[:, :height, :width]
    return output, windows


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    with torch.enable_grad():
        x = model.features[0](images.double())
        blocks = []
        for layer in model.features[1:]:
            if isinstance(layer, (tv_swin.PatchMerging, tv_swin.PatchMergingV2)):
                x = layer(x)
                continue
            for block in layer:
                if isinstance(block, tv_swin.SwinTransformerBlockV2):
                    attended, windows = explicit_attention(block.attn, x)
                    x = x + block.norm1(attended)
                    x = x + block.norm2(block.mlp(x))
                else:
                    attended, windows = explicit_attention(block.attn, block.norm1(x))
                    x = x + attended
                    x = x + block.mlp(block.norm2(x))
                blocks.append(dict(windows=windows, grid=tuple(x.shape[1:3])))
        logits = model.head(model.norm(x).mean(dim=(1, 2)))
        return windowed_reference(blocks, logits, target)


def small(constructor, **kwargs) -> nn.Module:
    """A narrow two-stage torchvision Swin with windows of 4, its parameters given noise."""
    torch.manual_seed(0)
    block = (tv_swin.SwinTransformerBlockV2 if constructor == "v2"
             else tv_swin.SwinTransformerBlock)
    merging = tv_swin.PatchMergingV2 if constructor == "v2" else tv_swin.PatchMerging
    model = tv_swin.SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
        num_classes=NUM_CLASSES, stochastic_depth_prob=0.0, block=block,
        downsample_layer=merging, **kwargs,
    )
    return add_parameter_noise(model)


@pytest.mark.parametrize("size", [(48, 48), (40, 56)], ids=["whole_windows", "padded"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_flow_and_block_maps_equal_explicit_reference(version, target, size):
    model = small(version)
    images = make_images(3, *size)
    expected = explicit_daam(model, images, target)
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images).double(), 1e-5)
    assert_maps_on_block_grids_match(model, images, target, expected)


@pytest.mark.parametrize("name", ["swin_t", "swin_v2_t"])
def test_the_registered_architectures_are_picked_with_their_stage_grids(name):
    model = getattr(torchvision.models, name)()
    adapter = adapter_for(model)
    assert isinstance(adapter, TorchvisionSwinAdapter) and not adapter.has_class_token
    assert adapter.stage_grids((224, 224)) == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert len(adapter.attention_modules()) == 12
    layouts = adapter.block_layouts(adapter.attention_modules(), (256, 256))
    for layout in layouts:  # every patch in exactly one window
        cells = layout.positions[layout.positions >= 0]
        assert sorted(cells.tolist()) == list(range(layout.grid[0] * layout.grid[1]))
