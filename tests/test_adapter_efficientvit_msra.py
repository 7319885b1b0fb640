"""timm EfficientViT (MSRA): DAAM over cascaded group attention in local windows equals an
explicit reference.

The reference runs the model in float64 with every attention written out: the grid padded
with zeros at the bottom and right to whole windows and each window cut out by slicing; the
heads run one after another as the module runs them (head h reads its channel chunk plus head
h - 1's output, makes q, k, v with its own qkv convolution and passes q through its depthwise
convolution, the model's modules), softmax(q^T k * scale + bias) an explicit matrix with the
bias looked up by hand for the offset (|dr|, |dc|) between query and key; the heads' outputs
are concatenated into one tensor, projected and put back by slicing, the padding cropped.
Gradients at that concatenated tensor (through the projection only, not through the later
heads it also feeds) come from plain autograd; every row of every head is split over the
tokens its values sit on, weighted by its own gradient, summed and relu'd
(test_adapter_swin.windowed_block_maps), each token put on its cell.
"""

import copy
import math
from typing import Dict, List

import pytest
import torch
from timm.models.efficientvit_msra import EfficientVitMsra
from torch import Tensor, nn

from captum_daam.adapters import TimmEfficientVitMsraAdapter
from helpers import (
    add_parameter_noise,
    assert_each_cell_in_one_window,
    assert_family_matches_reference,
    make_images,
    registered_layouts,
)
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 4, 0]


def bias_by_hand(attention: nn.Module) -> Tensor:
    """(H, N, N): each head's learned bias for the offset (|dr|, |dc|) of a side x side window,
    row |dr| * side + |dc| of its table."""
    side = attention.resolution
    cells = [(r, c) for r in range(side) for c in range(side)]
    index = torch.tensor([[abs(r1 - r2) * side + abs(c1 - c2) for r2, c2 in cells]
                          for r1, c1 in cells])
    return attention.attention_biases[:, index]


def explicit_window(attention: nn.Module, x: Tensor) -> Dict[str, Tensor]:
    """Cascaded group attention on one (B, C, s, s) window by hand."""
    batch, _, side, _ = x.shape
    key, value = attention.key_dim, attention.val_dim
    bias = bias_by_hand(attention)
    chunks = x.chunk(attention.num_heads, dim=1)
    feat, outputs, maps, values = chunks[0], [], [], []
    for head, (qkv, dw) in enumerate(zip(attention.qkvs, attention.dws)):
        if head:
            feat = feat + chunks[head]
        q, k, v = qkv(feat).split([key, key, value], dim=1)
        q, k, v = dw(q).flatten(2), k.flatten(2), v.flatten(2)  # (B, channels, N)
        probabilities = (q.transpose(1, 2) @ k * attention.scale + bias[head]).softmax(dim=-1)
        feat = (v @ probabilities.transpose(1, 2)).reshape(batch, value, side, side)
        outputs.append(feat)
        maps.append(probabilities)
        values.append(v.transpose(1, 2))
    pre_projection = torch.cat(outputs, dim=1).flatten(2).transpose(1, 2)  # (B, N, H * vd)
    projected = attention.proj(pre_projection.transpose(1, 2).reshape(batch, -1, side, side))
    return dict(out=projected, attn=torch.stack(maps, 1), v=torch.stack(values, 1),
                pre_projection=pre_projection)


def explicit_mixer(window_attention: nn.Module, x: Tensor) -> Dict[str, object]:
    attention = window_attention.attn
    batch, channels, height, width = x.shape
    side = attention.resolution
    padded_h, padded_w = math.ceil(height / side) * side, math.ceil(width / side) * side
    padded = x.new_zeros(batch, channels, padded_h, padded_w)
    padded[:, :, :height, :width] = x
    out = torch.zeros_like(padded)
    windows = []
    for top in range(0, padded_h, side):
        for left in range(0, padded_w, side):
            record = explicit_window(attention, padded[:, :, top: top + side, left: left + side])
            out[:, :, top: top + side, left: left + side] = record.pop("out")
            record["cells"] = [(r, c) if r < height and c < width else None
                               for r in range(top, top + side) for c in range(left, left + side)]
            windows.append(record)
    return dict(out=out[:, :, :height, :width], windows=windows, grid=(height, width))


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = model.patch_embed(images.double())
        for stage in model.stages:
            x = stage.downsample(x)
            for block in stage.blocks:
                x = block.ffn0(block.dw0(x))
                record = explicit_mixer(block.mixer.m, x)
                blocks.append(record)
                x = block.ffn1(block.dw1(x + record["out"]))
        return windowed_reference(blocks, model.forward_head(x), target)


def small_efficientvit(seed: int = 1) -> nn.Module:
    """A narrow EfficientViT with windows of 3 (timm's builders fix the widths: built
    directly)."""
    torch.manual_seed(0)
    model = EfficientVitMsra(img_size=112, embed_dim=(16, 32, 48), key_dim=(4, 4, 4),
                             depth=(1, 1, 1), num_heads=(2, 2, 2), window_size=(3, 3, 3),
                             kernels=(3, 5), num_classes=NUM_CLASSES)
    return add_parameter_noise(model, seed=seed)


@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(target):
    # 112x144 images: stage grids 7x9, 4x5 and 2x3 in padded windows of 3, 3 and 2
    assert_family_matches_reference(small_efficientvit(), make_images(3, 112, 144), target,
                                    explicit_daam, 3)


def test_every_registered_efficientvit_msra_model_is_taken():
    for name, layouts in registered_layouts("efficientvit_m*", TimmEfficientVitMsraAdapter):
        for layout in layouts:
            assert_each_cell_in_one_window(layout, name)
