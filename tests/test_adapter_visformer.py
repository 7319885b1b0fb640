"""timm Visformer: DAAM over its NCHW attention blocks equals an explicit reference.

The reference runs the model in float64 with every attention written out: the stage grid's
tokens row by row, the module's 1x1 qkv and proj convolutions applied as matrices, q, k and v
split as (all queries, keys, values) x heads, softmax(q k^T * d ** -0.5) an explicit matrix.
The stem, patch embeddings, norms, convolution blocks, MLPs and head are the model's own
modules. Gradients at every attention output before the projection come from plain autograd;
every row is split over the tokens it reads, weighted by its own gradient, summed and relu'd
(test_adapter_swin.windowed_block_maps, one window per block); the flow lies on the finest
grid.
"""

import copy
from typing import Dict, List

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_daam.adapters import TimmVisformerAdapter
from helpers import (
    add_parameter_noise,
    assert_family_matches_reference,
    assert_refused_before_any_work,
    make_images,
    registered_layouts,
    set_fused_attention,
)
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 4, 0]


def explicit_attention(attention: nn.Module, x: Tensor) -> Dict[str, object]:
    """Visformer's attention on (B, C, h, w) by hand: the output and its one window."""
    batch, _, height, width = x.shape
    heads = attention.num_heads
    tokens = x.flatten(2).transpose(1, 2)  # (B, N, C), row by row
    qkv = F.linear(tokens, attention.qkv.weight.flatten(1))
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    probabilities = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).flatten(2)
    out = F.linear(pre_projection, attention.proj.weight.flatten(1))
    cells = [(r, c) for r in range(height) for c in range(width)]
    return dict(out=out.transpose(1, 2).reshape(batch, -1, height, width), grid=(height, width),
                windows=[dict(attn=probabilities, v=v, pre_projection=pre_projection,
                              cells=cells)])


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = images.double() if model.stem is None else model.stem(images.double())
        for index in (1, 2, 3):
            embedding = getattr(model, f"patch_embed{index}")
            if embedding is not None:
                x = embedding(x)
                position = getattr(model, f"pos_embed{index}")
                x = x if position is None else x + position
            for block in getattr(model, f"stage{index}"):
                if block.attn is None:
                    x = block(x)  # a convolution block
                    continue
                record = explicit_attention(block.attn, block.norm1(x))
                blocks.append(record)
                x = x + record["out"]
                x = x + block.mlp(block.norm2(x))
        logits = model.forward_head(model.norm(x))
        return windowed_reference(blocks, logits, target)


def small_visformer(attn_stage: str, seed: int = 1) -> nn.Module:
    """A narrow Visformer on 64x64 images with seeded noise on every parameter, of 0.05 (at
    the helpers' 0.1 its logits reach about 900, where float32 keeps no 1e-4)."""
    torch.manual_seed(0)
    model = timm.create_model(
        "visformer_small", pretrained=False, num_classes=NUM_CLASSES, img_size=64,
        init_channels=16, embed_dim=32, depth=(1, 2, 1), num_heads=2, attn_stage=attn_stage,
    )
    return add_parameter_noise(model, scale=0.05, seed=seed)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
@pytest.mark.parametrize("attn_stage", ["011", "111"])
def test_flow_and_block_maps_equal_explicit_reference(attn_stage, target, fused):
    model = set_fused_attention(small_visformer(attn_stage), fused)
    blocks = attn_stage.count("1") + (attn_stage[1] == "1")  # depths (1, 2, 1)
    # stage grids 8x8, 4x4, 2x2
    assert_family_matches_reference(model, make_images(3, 64, 64), target, explicit_daam, blocks)


def test_another_image_size_is_refused_before_any_work():
    assert_refused_before_any_work(small_visformer("011"), make_images(1, 96, 96),
                                   r"stage 1 takes a 8x8 grid, but 96x96 images give 12x12")


def test_every_registered_visformer_model_is_taken():
    for name, layouts in registered_layouts("visformer*", TimmVisformerAdapter):
        assert [layout.grid for layout in layouts][-1] == (7, 7), name
