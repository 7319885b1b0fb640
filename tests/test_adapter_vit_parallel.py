"""DAAM on timm ViTs with parallel blocks equals an explicit float64 reference.

``ParallelThingsBlock`` (vit_*_18x2_224) runs two timm ``Attention`` modules side by side on
the same input and adds their outputs: each is a block of the flow. ``ParallelScalingBlock``
(vit_*_xp_224) computes q, k, v and the MLP's input with one ``in_proj`` and runs attention in
the block's own forward: the block is the flow's module. The reference re-runs both by hand:
every attention formed explicitly from q, k, v (reference.explicit_attention for the
``Attention`` modules, written out here for the fused block), gradients at each attention
output before its projection with plain autograd, and the full (B, N, C) contributions of
reference.maps_from_explicit_blocks.
"""

import functools
from typing import Dict

import pytest
import torch
from timm.models.vision_transformer import (
    ParallelScalingBlock,
    ParallelThingsBlock,
    VisionTransformer,
)

from captum_daam import DAAM
from captum_daam.adapters import adapter_for
from captum_daam.attr import AttentionRollout
from helpers import (
    assert_attributions_match,
    assert_close_relative,
    make_images,
    make_model,
    set_fused_attention,
)
from reference import (
    explicit_attention,
    explicit_gradients,
    maps_from_explicit_blocks,
)

TARGETS = [3, 7, 1]
SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=10)


def explicit_parallel_scaling(block: ParallelScalingBlock, x: torch.Tensor) -> Dict[str, object]:
    """One ParallelScalingBlock by hand; returns its attention record and the block's output."""
    batch, tokens, channels = x.shape
    heads, width = block.num_heads, block.head_dim
    projected = block.in_proj(block.in_norm(x))
    x_mlp, q, k, v = torch.split(projected, block.in_split, dim=-1)
    if block.mlp_bias is not None:
        x_mlp = x_mlp + block.mlp_bias
    q = block.q_norm(q.view(batch, tokens, heads, width)).transpose(1, 2)
    k = block.k_norm(k.view(batch, tokens, heads, width)).transpose(1, 2)
    v = v.view(batch, tokens, heads, width).transpose(1, 2)
    probabilities = ((q @ k.transpose(-2, -1)) * width**-0.5).softmax(dim=-1)  # explicit A
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, tokens, channels)
    x_mlp = block.mlp_drop(block.mlp_act(x_mlp))
    if block.out_proj is not None:
        y = block.out_proj(torch.cat((pre_projection, x_mlp), dim=-1))
    else:
        y = block.attn_out_proj(pre_projection) + block.mlp_out_proj(x_mlp)
    record = {"attn": probabilities, "v": v, "pre_projection": pre_projection}
    return {"record": record, "out": x + block.drop_path(block.ls(y))}


def explicit_forward(model: VisionTransformer, images: torch.Tensor) -> Dict[str, object]:
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    records = []
    for block in model.blocks:
        if isinstance(block, ParallelThingsBlock):
            outputs = []
            for branch in block.attns:
                record = explicit_attention(branch.attn, branch.norm(x))
                outputs.append(branch.drop_path(branch.ls(record["out"])))
                records.append(record)
            x = x + sum(outputs)
            x = x + sum(ffn(x) for ffn in block.ffns)
        else:
            result = explicit_parallel_scaling(block, x)
            records.append(result["record"])
            x = result["out"]
    return {"logits": model.forward_head(model.norm(x)), "blocks": records}


def explicit_daam(model: VisionTransformer, images: torch.Tensor, target=None):
    result, targets, gradients = explicit_gradients(explicit_forward, model, images, target)
    logits = result["logits"]
    grid = tuple(model.patch_embed.grid_size)
    maps = maps_from_explicit_blocks(result["blocks"], gradients, model.num_prefix_tokens, grid)
    return dict(maps, logits=logits.detach(), blocks=result["blocks"])


def sharpen(model: VisionTransformer) -> VisionTransformer:
    """Larger query / key weights, so that attention rows are far from uniform."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ParallelScalingBlock):
                channels = module.num_heads * module.head_dim
                start = module.in_split[0]
                module.in_proj.weight[start : start + 2 * channels].mul_(6.0)
            elif hasattr(module, "qkv"):
                module.qkv.weight[: 2 * module.qkv.out_features // 3].mul_(6.0)
    return model.eval()


MODELS = {
    "things_18x2": lambda: make_model("vit_small_patch16_18x2_224", **SMALL),
    "scaling_xp_qk_norm": lambda: make_model("vit_base_patch16_xp_224", **SMALL),
    "scaling_fused_out_proj_qkv_bias": lambda: VisionTransformer(
        **SMALL, qkv_bias=True, block_fn=functools.partial(ParallelScalingBlock, fuse_out_proj=True)
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_case(request):
    torch.manual_seed(0)
    return request.param, sharpen(MODELS[request.param]())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["three_targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(model_case, target, fused):
    case, model = model_case
    set_fused_attention(model, fused)
    images = make_images(3, 32, 32)
    expected = explicit_daam(model, images, target)
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images), 1e-5)  # the reference is right
    flow = assert_attributions_match(DAAM(model), images, target, expected)
    per_block = 2 if case.startswith("things") else 1
    assert flow.shape == (3, 3 * per_block, 4, 4)
    assert float(expected["flow"][:, -1].amax()) > 0


def test_full_attention_matrices_equal_explicit_ones(model_case):
    case, model = model_case
    images = make_images(2, 32, 32)
    adapter = adapter_for(model)
    with adapter.record(adapter.attention_modules(), full=True) as records, torch.no_grad():
        model(images)
    explicit = explicit_daam(model, images, [1, 2])["blocks"]
    assert len(records) == len(explicit)
    for record, block in zip(records, explicit):
        assert_close_relative(record.attention(), block["attn"].detach(), 1e-5)
        row = block["attn"].detach()[:, :, 0]
        assert float(row.amax()) > 3.0 / row.shape[-1]  # peaked: a wrong layout would show


def test_the_two_attentions_of_a_parallel_block_are_separate_branches():
    """Neither of a block's two attentions feeds the other: the flow's backward pass starts
    from both, and a subset of the second ones alone works too."""
    model = sharpen(MODELS["things_18x2"]())
    adapter = adapter_for(model)
    layouts = adapter.block_layouts(adapter.attention_modules(), (32, 32))
    assert [layout.branch for layout in layouts] == [0, 1, 0, 1, 0, 1]
    images = make_images(3, 32, 32)
    expected = explicit_daam(model, images, TARGETS)
    second = [block.attns[1].attn for block in model.blocks]
    maps = DAAM(model, layer=second).attribute(
        images, target=TARGETS, return_flow=True, accumulate=False
    )
    assert_close_relative(maps, expected["block_maps"][:, 1::2])


def test_rollouts_refuse_parallel_branches():
    model = sharpen(MODELS["things_18x2"]())
    with pytest.raises(ValueError, match="separate branches"):
        AttentionRollout(model).attribute(make_images(1, 32, 32))


@pytest.mark.parametrize("name", ["vit_small_patch16_18x2_224", "vit_base_patch16_xp_224"])
def test_registered_parallel_models_get_the_vit_adapter(name):
    with torch.device("meta"):
        model = make_model(name)
    modules = adapter_for(model).attention_modules()
    assert len(modules) == (36 if "18x2" in name else 12)
