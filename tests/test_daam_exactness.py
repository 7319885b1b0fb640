"""DAAM block maps and flows equal the explicit reference (tests/reference.py).

The reference re-runs every block with an explicit (B, H, N, N) attention matrix in float64,
takes gradients with plain autograd and applies DESIGN.md's formulas with the full (B, N, C)
contribution tensor; the package uses hooks, fused attention and the per-head contraction.
"""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from captum_daam import DAAM, class_token_contributions
from captum_daam.adapters import adapter_for
from helpers import (
    assert_attributions_match,
    assert_close_relative,
    record_with_module_outputs,
    make_images,
    make_model,
    module_hook_count,
    set_fused_attention,
)
from reference import explicit_daam

TARGETS = [3, 401, 977]

MODELS = {
    "deit_tiny": ("deit_tiny_patch16_224", {}, True),
    "vit_small_fused": ("vit_small_patch16_224", {}, True),
    "vit_small_unfused": ("vit_small_patch16_224", {}, False),
    "deit_tiny_distilled": ("deit_tiny_distilled_patch16_224", {}, True),
    # DINOv2 with 4 register tokens (no_embed_class, LayerScale), at 224 to stay quick.
    "reg4_dinov2": ("vit_small_patch14_reg4_dinov2", {"img_size": 224, "num_classes": 1000}, True),
    "qk_norm": ("vit_small_patch16_224", {"qk_norm": True}, True),
    # DeiT-III: position embedding without the [class] token, LayerScale.
    "deit3_small": ("deit3_small_patch16_224", {}, True),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_case(request):
    name, kwargs, fused = MODELS[request.param]
    model = set_fused_attention(make_model(name, **kwargs), fused)
    return request.param, model


@pytest.mark.parametrize("target", [TARGETS, None], ids=["three_targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(model_case, target):
    case, model = model_case
    images = make_images(3, *model.patch_embed.img_size)
    expected = explicit_daam(model, images, target=target)
    flow = assert_attributions_match(DAAM(model), images, target, expected)
    assert flow.shape == (3, len(model.blocks), *model.patch_embed.grid_size)
    if target is None:
        assert expected["targets"].tolist() == model(images).argmax(1).tolist()


def test_batch_gives_the_same_maps_as_each_example_alone(model_case):
    _, model = model_case
    images = make_images(3, *model.patch_embed.img_size, seed=1)
    daam = DAAM(model)
    batched = daam.attribute(images, target=TARGETS, return_flow=True)
    for index, target in enumerate(TARGETS):
        alone = daam.attribute(images[index : index + 1], target=target, return_flow=True)
        assert_close_relative(batched[index : index + 1], alone, 1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_contributions_sum_to_the_modules_own_class_output(fused):
    """Sum over tokens of F_l, through the block's norm and projection, is the module's output."""
    model = set_fused_attention(make_model("deit_tiny_patch16_224"), fused)
    images = make_images(2)
    adapter = adapter_for(model)
    records, module_outputs = record_with_module_outputs(
        adapter, adapter.attention_modules(), lambda: model(images)
    )
    for block, record, module_output in zip(model.blocks, records, module_outputs):
        contributions = class_token_contributions(record.class_attention, record.values)
        assert contributions.shape == (2, 197, 192)
        class_output = contributions.sum(dim=1)
        reproduced = block.attn.proj(block.attn.norm(class_output))
        assert_close_relative(reproduced, module_output[:, 0], 1e-5)


def test_layer_subset_gives_those_blocks_in_block_order():
    model = make_model("deit_tiny_patch16_224")
    images = make_images(3)
    expected = explicit_daam(model, images, target=TARGETS)
    chosen = [model.blocks[9].attn, model.blocks[2].attn, model.blocks[5].attn]
    daam = DAAM(model, layer=chosen)
    block_maps = daam.attribute(images, target=TARGETS, return_flow=True, accumulate=False)
    flow = daam.attribute(images, target=TARGETS, return_flow=True)
    reference_maps = expected["block_maps"][:, [2, 5, 9]]
    assert block_maps.shape == (3, 3, 14, 14)
    assert_close_relative(block_maps, reference_maps)
    assert_close_relative(flow, reference_maps.cumsum(dim=1))
    last_only = daam.attribute(images, target=TARGETS, accumulate=False)
    assert_close_relative(last_only, expected["block_maps"][:, 9:10])


def test_single_module_as_layer():
    model = make_model("deit_tiny_patch16_224")
    images = make_images(2)
    expected = explicit_daam(model, images, target=[1, 2])
    maps = DAAM(model, layer=model.blocks[11].attn).attribute(images, target=[1, 2])
    assert_close_relative(maps, expected["block_maps"][:, 11:12])


@pytest.mark.parametrize("fused", [True, False])
def test_dynamic_image_size_takes_the_grid_from_the_input(fused):
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=64, patch_size=16, embed_dim=96, depth=4, num_heads=3, num_classes=7,
        dynamic_img_size=True,
    ).eval()
    set_fused_attention(model, fused)
    images = make_images(3, 96, 48)
    expected = explicit_daam(model, images, target=[0, 3, 6])
    flow = DAAM(model).attribute(images, target=[0, 3, 6], return_flow=True)
    assert flow.shape == (3, 4, 6, 3)
    assert_close_relative(flow, expected["flow"])


@pytest.mark.parametrize("fused", [True, False])
def test_scale_norm_qk_norm_and_layer_scale(fused):
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=64, patch_size=8, embed_dim=96, depth=3, num_heads=4, num_classes=5,
        qk_norm=True, scale_attn_norm=True, init_values=0.1, reg_tokens=2,
    ).eval()
    set_fused_attention(model, fused)
    images = make_images(3, 64, 64)
    expected = explicit_daam(model, images, target=[4, 0, 2])
    flow = DAAM(model).attribute(images, target=[4, 0, 2], return_flow=True)
    assert flow.shape == (3, 3, 8, 8)
    assert_close_relative(flow, expected["flow"])


@pytest.mark.parametrize("fused", [True, False])
def test_attention_mask_passed_through_additional_forward_args(fused):
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=4
    ).eval()
    set_fused_attention(model, fused)
    tokens = 1 + 16
    generator = torch.Generator().manual_seed(3)
    allowed = torch.rand(tokens, tokens, generator=generator) > 0.3
    allowed |= torch.eye(tokens, dtype=torch.bool)
    images = make_images(2, 32, 32)
    expected = explicit_daam(model, images, target=[1, 3], attn_mask=allowed)
    flow = DAAM(model).attribute(
        images, target=[1, 3], additional_forward_args=(allowed,), return_flow=True
    )
    assert_close_relative(flow, expected["flow"])


def test_frozen_model_gives_the_same_maps():
    model = make_model("deit_tiny_patch16_224")
    images = make_images(2)
    unfrozen = DAAM(model).attribute(images, target=[5, 6], return_flow=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    frozen = DAAM(model).attribute(images, target=[5, 6], return_flow=True)
    assert_close_relative(frozen, unfrozen, 1e-6)
    assert all(not parameter.requires_grad for parameter in model.parameters())


def test_float64_model_gives_float64_maps_equal_to_reference():
    model = make_model("deit_tiny_patch16_224").double()
    images = make_images(2).double()
    flow = DAAM(model).attribute(images, target=[7, 8], return_flow=True)
    assert flow.dtype == torch.float64
    expected = explicit_daam(model, images, target=[7, 8])
    assert_close_relative(flow, expected["flow"], 1e-9)


def test_gradient_checkpointing_gives_the_same_maps():
    """A checkpointed backward re-runs the blocks' forward: the hooks must not record twice."""
    model = make_model("deit_tiny_patch16_224")
    images = make_images(2)
    expected = explicit_daam(model, images, target=[4, 9])
    model.set_grad_checkpointing(True)
    flow = DAAM(model).attribute(images, target=[4, 9], return_flow=True)
    assert_close_relative(flow, expected["flow"])


def test_reentrant_checkpointing_is_refused_with_a_clear_error():
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    model = make_model("deit_tiny_patch16_224")
    model.set_grad_checkpointing(True)
    before = use_reentrant_ckpt()
    set_reentrant_ckpt(True)
    try:
        with pytest.raises(RuntimeError, match="set_grad_checkpointing\\(False\\)"):
            DAAM(model).attribute(make_images(2), target=1)
    finally:
        set_reentrant_ckpt(before)
    assert module_hook_count(model) == 0


def test_an_average_pooled_vit_explained_by_class_rows_warns_and_equals_the_reference():
    """global_pool='avg' with queries='class': DAAM warns, and is still exact: the [class]
    token of the last block does not reach the output, so its map is zero, while earlier
    blocks' maps are not."""
    model = make_model("vit_small_patch16_224", global_pool="avg", depth=4)
    images = make_images(2)
    expected = explicit_daam(model, images, target=[3, 401])
    daam = DAAM(model)
    with pytest.warns(UserWarning, match="global_pool='avg'"):
        assert_attributions_match(daam, images, [3, 401], expected, queries="class")
    with pytest.warns(UserWarning, match="queries='all'"):
        last_block = daam.attribute(
            images, target=[3, 401], return_flow=True, accumulate=False, queries="class"
        )[:, -1]
    assert float(last_block.abs().max()) == 0
    assert float(expected["block_maps"][:, -1].abs().max()) == 0
    assert float(expected["block_maps"][:, :-1].amax()) > 0
