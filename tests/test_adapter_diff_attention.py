"""timm ViTs with differential attention (DiffAttention: vit_dwee / vit_dlittle): DAAM equals
an explicit reference.

The reference runs the model in float64 with every attention written out: q, k and v from the
module's qkv weights (2 H query and key heads of width d after q_norm / k_norm, H value heads
of width 2 d), each head's two softmax maps from its pair of query and key heads (heads 2h and
2h + 1), A = softmax(q1 k1^T * d ** -0.5) - lambda * softmax(q2 k2^T * d ** -0.5) an explicit
matrix with the module's lambda, the output A @ v, then the module's sub_norm, scaling, norm
and projection. Gradients at every A @ v (as rows of H * 2 d channels) come from plain
autograd; every row is split over the tokens it reads, weighted by its own gradient, summed
and relu'd (reference.maps_from_every_query_row), the register token left out of the grid.
"""

import copy
from typing import Dict, List

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from captum_daam.adapters import TimmVisionTransformerAdapter, adapter_for
from helpers import (
    add_parameter_noise,
    assert_family_matches_reference,
    make_images,
    set_fused_attention,
)
from reference import maps_from_every_query_row, resolve_targets

NUM_CLASSES = 5
TARGETS = [3, 4, 0]
GRID = (4, 4)


def explicit_attention(attention: nn.Module, x: Tensor) -> Dict[str, Tensor]:
    batch, count, _ = x.shape
    heads = attention.num_heads
    q, k, v = attention.qkv(x).chunk(3, dim=-1)
    q = attention.q_norm(q.reshape(batch, count, 2 * heads, -1).transpose(1, 2))
    k = attention.k_norm(k.reshape(batch, count, 2 * heads, -1).transpose(1, 2))
    v = v.reshape(batch, count, heads, -1).transpose(1, 2)  # (B, H, N, 2 d)
    scale = q.shape[-1] ** -0.5
    first = (q[:, 0::2] @ k[:, 0::2].transpose(-2, -1) * scale).softmax(dim=-1)
    second = (q[:, 1::2] @ k[:, 1::2].transpose(-2, -1) * scale).softmax(dim=-1)
    probabilities = first - attention._compute_lambda() * second
    attended = probabilities @ v
    out = attention.sub_norm(attended) * (1 - attention.lambda_init)
    out = attention.proj(attention.norm(out.transpose(1, 2).flatten(2)))
    return dict(attn=probabilities, v=v, pre_projection=attended, out=out)


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    records: List[Dict] = []
    with torch.enable_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images.double())))
        for block in model.blocks:
            record = explicit_attention(block.attn, block.norm1(x))
            records.append(record)
            x = x + block.ls1(record["out"])
            x = x + block.ls2(block.mlp(block.norm2(x)))
        logits = model.forward_head(model.norm(x))
        targets = resolve_targets(target, logits)
        score = logits[torch.arange(len(logits)), targets].sum()
        gradients = torch.autograd.grad(score, [record["pre_projection"] for record in records])
    rows = [gradient.transpose(1, 2).flatten(2) for gradient in gradients]  # (B, N, H * 2 d)
    maps = maps_from_every_query_row(records, rows, model.num_prefix_tokens, GRID)
    return dict(logits=logits.detach(), block_maps=list(maps["block_maps"].unbind(1)),
                flow=maps["flow"])


def small_diff_vit(seed: int = 1, **overrides) -> nn.Module:
    """A two-block ViT with differential attention as vit_dwee_patch16_reg1_gap_256 is built:
    no [class] token, one register, the head averaging the patch tokens."""
    torch.manual_seed(0)
    settings = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                    init_values=1e-1, class_token=False, no_embed_class=True, reg_tokens=1,
                    global_pool="avg", attn_layer="diff", num_classes=NUM_CLASSES)
    model = VisionTransformer(**{**settings, **overrides})
    return add_parameter_noise(model, seed=seed)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_flow_and_block_maps_equal_explicit_reference(qk_norm, target, fused):
    model = set_fused_attention(small_diff_vit(qk_norm=qk_norm), fused)
    assert isinstance(adapter_for(model), TimmVisionTransformerAdapter)
    assert_family_matches_reference(model, make_images(3, 32, 32), target, explicit_daam, 2)
