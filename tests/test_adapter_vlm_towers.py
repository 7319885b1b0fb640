"""timm's Qwen3-VL and DeepSeek-V4 vision towers: DAAM from every query row equals an explicit
reference.

The reference runs each tower (random weights from timm's own builders, narrowed) in float64:
the patch embedding and position embedding as the model computes them, then every block with
its attention written out: q, k, v split from ``qkv`` per head by hand, the 2-D rotary
embedding applied by hand (x cos + rotate_half(x) sin, rotate_half swapping the halves with a
sign, sin and cos the two halves of the tower's table), softmax(q k^T * scale) an explicit
matrix; the rest of each block (norms, layer scale, MLP), the projector (Qwen's merger,
DeepSeek's aligner) and the head as the model's modules. Gradients at every block's attention
output before ``proj`` come from plain autograd; every row is split over the tokens it reads,
weighted by its own gradient, summed and relu'd (test_adapter_swin.windowed_block_maps).
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
NARROW = dict(embed_dim=64, depth=3, num_heads=4, num_classes=NUM_CLASSES)


def rotated(tokens: Tensor, table: Tensor) -> Tensor:
    """(B, H, N, d) tokens turned by a (N, 2d) [sin, cos] table, halves rotated."""
    sin, cos = table[:, : table.shape[1] // 2], table[:, table.shape[1] // 2 :]
    first, second = tokens[..., : tokens.shape[-1] // 2], tokens[..., tokens.shape[-1] // 2 :]
    return tokens * cos + torch.cat([-second, first], dim=-1) * sin


def explicit_attention(attention: nn.Module, tokens: Tensor, rope: Tensor, grid):
    batch, count, channels = tokens.shape
    heads = attention.num_heads
    qkv = attention.qkv(tokens).reshape(batch, count, 3, heads, -1)
    queries, keys, values = (qkv[:, :, part].transpose(1, 2) for part in range(3))
    queries, keys = rotated(queries, rope), rotated(keys, rope)
    probabilities = (queries @ keys.transpose(-2, -1) * attention.scale).softmax(dim=-1)
    pre_projection = (probabilities @ values).transpose(1, 2).reshape(batch, count, channels)
    cells = [(row, column) for row in range(grid[0]) for column in range(grid[1])]
    window = dict(attn=probabilities, v=values, cells=cells, pre_projection=pre_projection)
    return attention.proj(pre_projection), window


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    encoder = model.encoder
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = encoder.patch_embed(images.double())
        batch, height, width, _ = x.shape
        x, rope = encoder._pos_embed(x)  # the tokens row by row, the [sin, cos] table
        for block in encoder.blocks:
            out, window = explicit_attention(block.attn, block.norm1(x), rope.double(),
                                             (height, width))
            blocks.append(dict(windows=[window], grid=(height, width)))
            if getattr(block, "gamma_1", None) is not None:  # Qwen's EvaBlock
                out = block.gamma_1 * out
            x = x + out
            mlp = block.mlp(block.norm2(x))
            x = x + (mlp if getattr(block, "gamma_2", None) is None else block.gamma_2 * mlp)
        x = encoder.norm(x) if hasattr(encoder, "norm") else x
        x = x.reshape(batch, height, width, -1)
        projector = getattr(encoder, "merger", None) or getattr(encoder, "aligner", None)
        if projector is not None:
            x = projector(x)
        return windowed_reference(blocks, model.forward_head(x), target)


MODELS = {
    # 64x96 images: a 4x6 grid of 16-pixel patches (the merger takes 2x2 of them)
    "qwen3": ("qwen3_vit_88m", (64, 96)),
    "qwen3 merge": ("qwen3_vit_88m_merge", (64, 96)),
    # 56x70 images: a 4x5 grid of 14-pixel patches (the aligner pads it to 6x6)
    "deepseek": ("deepseek_vit_412m", (56, 70)),
    "deepseek align": ("deepseek_vit_412m_align", (56, 70)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def tower(request):
    name, size = MODELS[request.param]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **NARROW)
    return add_parameter_noise(model, scale=0.05, seed=1), size


@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(tower, target):
    model, size = tower
    assert_family_matches_reference(model, make_images(3, *size), target, explicit_daam, 3)


def test_an_encoder_returning_its_projectors_tokens_is_refused():
    encoder = timm.create_model("qwen3_vit_88m_enc", pretrained=False, embed_dim=64, depth=1,
                                num_heads=4)
    with pytest.raises(TypeError, match="returns its projector's tokens"):
        DAAM(encoder)


def test_sizes_the_patch_embedding_refuses_are_refused_before_any_work():
    torch.manual_seed(0)
    model = timm.create_model("qwen3_vit_88m", pretrained=False, **NARROW).eval()
    assert_refused_before_any_work(model, make_images(1, 64, 90), "divisible by the patch")
