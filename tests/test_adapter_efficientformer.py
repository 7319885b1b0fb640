"""timm EfficientFormer: DAAM over the last stage's attention with attention biases equals an
explicit reference.

The reference runs the model in float64 with every attention written out: the last stage's
7x7 grid row by row, q, k and v from the module's qkv weights split per head (key, key and
value widths), softmax(q k^T * scale + bias) an explicit matrix with each head's bias looked
up by hand for the offset (|dr|, |dc|) between query and key. The stem, downsamplings, pooling
blocks, MLPs and the two averaged heads are the model's own modules. Gradients at every
attention output before the projection come from plain autograd; every row is split over the
tokens it reads, weighted by its own gradient, summed and relu'd
(test_adapter_swin.windowed_block_maps, one window per block).
"""

import copy
from typing import Dict, List

import pytest
import timm
import torch
from timm.models.efficientformer import MetaBlock1d
from torch import Tensor, nn

from captum_daam.adapters import TimmEfficientFormerAdapter
from helpers import (
    add_parameter_noise,
    assert_family_matches_reference,
    assert_refused_before_any_work,
    make_images,
    registered_layouts,
)
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 0]
GRID = (7, 7)  # the attention biases' resolution: 224x224 images


def explicit_attention(attention: nn.Module, tokens: Tensor) -> Dict[str, object]:
    heads, key = attention.num_heads, attention.key_dim
    q, k, v = (part.transpose(1, 2) for part in attention.qkv(tokens).unflatten(
        -1, (heads, -1)).split([key, key, attention.val_dim], dim=3))
    cells = [(r, c) for r in range(GRID[0]) for c in range(GRID[1])]
    index = torch.tensor([[abs(r1 - r2) * GRID[1] + abs(c1 - c2) for r2, c2 in cells]
                          for r1, c1 in cells])
    logits = q @ k.transpose(-2, -1) * key ** -0.5 + attention.attention_biases[:, index]
    probabilities = logits.softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).flatten(2)
    return dict(out=attention.proj(pre_projection), grid=GRID, windows=[dict(
        attn=probabilities, v=v, pre_projection=pre_projection, cells=cells)])


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = model.stem(images.double())
        for stage in model.stages:
            x = stage.downsample(x)
            for block in stage.blocks:
                if not isinstance(block, MetaBlock1d):
                    x = block(x)  # pooling blocks and the flattening of the grid, row by row
                    continue
                record = explicit_attention(block.token_mixer, block.norm1(x))
                blocks.append(record)
                x = x + block.ls1(record["out"])
                x = x + block.ls2(block.mlp(block.norm2(x)))
        logits = model.forward_head(model.norm(x))
        return windowed_reference(blocks, logits, target)


def small_efficientformer(seed: int = 1) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "efficientformer_l1", pretrained=False, num_classes=NUM_CLASSES, depths=(1, 1, 1, 3),
        embed_dims=(8, 8, 16, 16), num_vit=2,
    )
    return add_parameter_noise(model, scale=0.05, seed=seed)


@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(target):
    assert_family_matches_reference(small_efficientformer(), make_images(2, 224, 224), target,
                                    explicit_daam, 2)


def test_another_image_size_is_refused_before_any_work():
    assert_refused_before_any_work(small_efficientformer(), make_images(1, 160, 160),
                                   r"biases cover 49 tokens, but 160x160 images give a 5x5 grid")


def test_every_registered_efficientformer_model_is_taken():
    for name, layouts in registered_layouts("efficientformer_l*", TimmEfficientFormerAdapter):
        assert len(layouts) > 0 and {layout.grid for layout in layouts} == {GRID}, name
