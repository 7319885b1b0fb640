"""timm MetaFormer with attention (CAFormer): DAAM over the attention stages equals an
explicit reference.

The reference runs the model in float64, every attention block written out
(test_adapter_fastvit.explicit_self_attention: q, k, v split from ``qkv`` by hand per head,
softmax(q k^T * scale) an explicit matrix) on the stage's tokens, the map flattened row by row
as the stage does, and the rest of each block (residual and layer scales, norms, MLP) as the
module does; the stem, downsamplings and separable-convolution stages run as the model's
modules. Gradients at the output before ``proj`` come from plain autograd.
"""

import copy
from typing import Dict, List

import pytest
import torch
from timm.models.metaformer import (
    Attention,
    LayerNorm2dNoBias,
    LayerNormNoBias,
    MetaFormer,
    SepConv,
)
from torch import Tensor, nn

from helpers import add_parameter_noise, assert_family_matches_reference, make_images
from test_adapter_fastvit import explicit_self_attention
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 4, 0]


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = model.stem(images.double())
        for stage in model.stages:
            x = stage.downsample(x)
            if stage.use_nchw:
                x = stage.blocks(x)
                continue
            batch, channels, height, width = x.shape
            x = x.flatten(2).transpose(1, 2)
            for block in stage.blocks:
                record = explicit_self_attention(block.token_mixer, block.norm1(x),
                                                 (height, width))
                blocks.append(record)
                x = block.res_scale1(x) + block.layer_scale1(record["out"])
                x = block.res_scale2(x) + block.layer_scale2(block.mlp(block.norm2(x)))
            x = x.transpose(1, 2).reshape(batch, channels, height, width)
        return windowed_reference(blocks, model.forward_head(x), target)


def small_caformer(seed: int = 1) -> nn.Module:
    torch.manual_seed(0)
    # caformer_s18's own blocks and norms, fewer and narrower.
    model = MetaFormer(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64),
                       token_mixers=(SepConv, SepConv, Attention, Attention),
                       norm_layers=(LayerNorm2dNoBias,) * 2 + (LayerNormNoBias,) * 2,
                       num_classes=NUM_CLASSES)
    return add_parameter_noise(model, scale=0.05, seed=seed)


@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(target):
    # 96x128 images: the attention stages' grids are 6x8 and 3x4
    assert_family_matches_reference(small_caformer(), make_images(3, 96, 128), target,
                                    explicit_daam, 3)
