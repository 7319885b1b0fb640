"""timm FastViT with attention: DAAM over the AttentionBlocks' self-attention equals an
explicit reference.

The reference runs the model in float64, every AttentionBlock written out: its NCHW map
normed by the block's norm and flattened row by row, q, k and v from the module's ``qkv``
split by hand per head, softmax(q k^T * scale) an explicit matrix, the output A v before
``proj`` and the rest of the block (layer scales, MLP) as the module does. The stem,
RepMixer blocks, positional encodings and patch embeddings run as the model's modules.
Gradients at the output before ``proj`` come from plain autograd; every row is split over the
tokens it reads, weighted by its own gradient, summed and relu'd
(test_adapter_swin.windowed_block_maps).
"""

import copy
from functools import partial
from typing import Dict, List

import pytest
import torch
from timm.models.fastvit import AttentionBlock, FastVit, RepConditionalPosEnc
from torch import Tensor, nn

from captum_daam.adapters import TimmFastVitAdapter, adapter_for
from helpers import add_parameter_noise, assert_family_matches_reference, make_images
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 4, 0]


def explicit_self_attention(attention: nn.Module, tokens: Tensor, grid) -> Dict[str, object]:
    """timm-style attention (``qkv``, ``proj``) on (B, N, C) tokens laid row by row on
    ``grid``, written out; returns the projected output and the one 'window' of the grid as
    test_adapter_swin.windowed_block_maps takes it."""
    batch, count, _ = tokens.shape
    heads = attention.num_heads
    qkv = attention.qkv(tokens).reshape(batch, count, 3, heads, -1)
    queries, keys, values = (qkv[:, :, part].transpose(1, 2) for part in range(3))
    probabilities = (queries @ keys.transpose(-2, -1) * attention.scale).softmax(dim=-1)
    pre_projection = (probabilities @ values).transpose(1, 2).reshape(batch, count, -1)
    cells = [(row, column) for row in range(grid[0]) for column in range(grid[1])]
    window = dict(attn=probabilities, v=values, cells=cells, pre_projection=pre_projection)
    return dict(out=attention.proj(pre_projection), windows=[window], grid=tuple(grid))


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = model.stem(images.double())
        for stage in model.stages:
            x = stage.pos_emb(stage.downsample(x))
            for block in stage.blocks:
                if not isinstance(block, AttentionBlock):
                    x = block(x)
                    continue
                batch, channels, height, width = x.shape
                tokens = block.norm(x).flatten(2).transpose(1, 2)
                record = explicit_self_attention(block.token_mixer, tokens, (height, width))
                blocks.append(record)
                mixed = record["out"].transpose(1, 2).reshape(batch, channels, height, width)
                x = x + block.layer_scale_1(mixed)
                x = x + block.layer_scale_2(block.mlp(x))
        return windowed_reference(blocks, model.forward_head(model.final_conv(x)), target)


def small_fastvit(seed: int = 1) -> nn.Module:
    """Narrow stages, RepMixer in the first two, attention (after a conditional positional
    encoding) in the last two, as MobileCLIP's FastViTs have it."""
    torch.manual_seed(0)
    model = FastVit(
        layers=(1, 1, 2, 1), embed_dims=(8, 16, 32, 64), mlp_ratios=(2, 2, 2, 2),
        pos_embs=(None, None, partial(RepConditionalPosEnc, spatial_shape=(7, 7)),
                  partial(RepConditionalPosEnc, spatial_shape=(7, 7))),
        token_mixers=("repmixer", "repmixer", "attention", "attention"),
        num_classes=NUM_CLASSES,
    )
    return add_parameter_noise(model, scale=0.05, seed=seed)


@pytest.fixture(scope="module")
def model():
    return small_fastvit()


@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(model, target):
    # 112x80 images: the attention stages' grids are 7x5 and 4x3 (ceil halving)
    assert_family_matches_reference(model, make_images(3, 112, 80), target, explicit_daam, 3)


def test_a_fastvit_without_attention_is_refused_as_a_cnn():
    model = FastVit(layers=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64), num_classes=NUM_CLASSES)
    with pytest.raises(TypeError, match="no attention"):
        adapter_for(model)
    with pytest.raises(TypeError, match="no AttentionBlock"):
        TimmFastVitAdapter(model)
