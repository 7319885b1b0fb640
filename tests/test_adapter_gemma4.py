"""timm's Gemma 4 vision tower: DAAM from every query row equals an explicit reference.

The reference runs the tower (random weights from timm's own builder, narrowed) in float64:
the patch embedding and the rotary tables as the model computes them, then every block with
its attention written out: q, k, v from the projections and per-head norms (the model's
modules), the 2-D rotary embedding by hand (each head's first half turned by the column
table, its second half by the row table, x cos + rotate_half(x) sin within each half),
softmax(q k^T) with scale 1 an explicit matrix, the output A v, then ``o_proj`` and the
sandwich norms and MLP as the modules; the soft-token pool (where the classifier keeps it)
and the head as the model. Gradients at every block's attention output before ``o_proj`` come
from plain autograd; every row is split over the tokens it reads, weighted by its own gradient,
summed and relu'd (test_adapter_swin.windowed_block_maps).
"""

import copy
from typing import Dict, List

import pytest
import timm
import torch
from torch import Tensor, nn

from captum_daam import DAAM
from helpers import (
    add_parameter_noise,
    assert_family_matches_reference,
    assert_refused_before_any_work,
    make_images,
)
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 4, 0]
NARROW = dict(embed_dim=64, depth=3, num_heads=4, head_dim=16, intermediate_size=128,
              num_classes=NUM_CLASSES)


def turned(tokens: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """(B, N, H, d) turned by (B, N, d) tables: each half of every head on its own."""
    halves = []
    for part in (slice(0, tokens.shape[-1] // 2), slice(tokens.shape[-1] // 2, None)):
        x, c, s = tokens[..., part], cos[..., part].unsqueeze(2), sin[..., part].unsqueeze(2)
        first, second = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        halves.append(x * c + torch.cat([-second, first], dim=-1) * s)
    return torch.cat(halves, dim=-1)


def explicit_attention(attention: nn.Module, tokens: Tensor, cos: Tensor, sin: Tensor, grid):
    batch, count, _ = tokens.shape
    heads = attention.num_heads
    queries = attention.q_norm(attention.q_proj(tokens).view(batch, count, heads, -1))
    keys = attention.k_norm(attention.k_proj(tokens).view(batch, count, heads, -1))
    values = attention.v_norm(attention.v_proj(tokens).view(batch, count, heads, -1))
    queries, keys = turned(queries, cos, sin), turned(keys, cos, sin)
    queries, keys, values = (part.transpose(1, 2) for part in (queries, keys, values))
    probabilities = (queries @ keys.transpose(-2, -1)).softmax(dim=-1)
    pre_projection = (probabilities @ values).transpose(1, 2).reshape(batch, count, -1)
    cells = [(row, column) for row in range(grid[0]) for column in range(grid[1])]
    window = dict(attn=probabilities, v=values, cells=cells, pre_projection=pre_projection)
    return attention.o_proj(pre_projection), window


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    encoder = model.encoder
    patch_h, patch_w = encoder.patch_embed.patch_size
    grid = (images.shape[-2] // patch_h, images.shape[-1] // patch_w)
    blocks: List[Dict] = []
    with torch.enable_grad():
        x, positions, _ = encoder.patch_embed(images.double())
        cos, sin = encoder.rotary_emb(x, positions)
        for block in encoder.blocks:
            out, window = explicit_attention(block.attn, block.norm1(x), cos, sin, grid)
            blocks.append(dict(windows=[window], grid=grid))
            x = x + block.norm2(out)
            x = x + block.norm4(block.mlp(block.norm3(x)))
        if model.encoder_pool == "soft":
            x, _ = encoder.pooler(x, positions, None)
        return windowed_reference(blocks, model.forward_head(x), target)


@pytest.fixture(scope="module", params=["", "soft"], ids=["patch tokens", "soft-token pool"])
def model(request):
    torch.manual_seed(0)
    built = timm.create_model("gemma4_vit_167m", pretrained=False, encoder_pool=request.param,
                              **NARROW)
    return add_parameter_noise(built, scale=0.05, seed=1)


@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(model, target):
    # 96x144 images: a 6x9 grid of 16-pixel patches (the soft pool takes 3x3 of them)
    assert_family_matches_reference(model, make_images(3, 96, 144), target, explicit_daam, 3)


def test_an_encoder_returning_soft_tokens_is_refused():
    encoder = timm.create_model("gemma4_vit_167m_enc", pretrained=False, embed_dim=64, depth=1,
                                num_heads=4, head_dim=16, intermediate_size=128)
    with pytest.raises(TypeError, match="returns tokens"):
        DAAM(encoder)


def test_sizes_out_of_whole_patches_are_refused_before_any_work():
    torch.manual_seed(0)
    model = timm.create_model("gemma4_vit_167m", pretrained=False, **NARROW).eval()
    assert_refused_before_any_work(model, make_images(1, 64, 90), "divisible by the patch")
