"""DAAM on timm CrossViT equals an explicit reference, block by block on two grids.

The reference below re-runs the model by hand in float64 on a deep copy: each branch's image
rescaled (bicubic) to the branch's size, the patch embedding (the model's own convolutions),
[class] token and position embedding; then every multi-scale block with every attention
written out from its q, k and v weights: the branch blocks' self-attention as a full
(B, H, N, N) matrix, softmax(q k^T / sqrt(d)), over the branch's tokens, and each fusion's
cross-attention as the (B, H, 1, N) row of the projected [class] token over [itself, the
other branch's patch tokens]. No attention module's forward, no
scaled_dot_product_attention, no hooks. Gradients come from plain autograd at every flow
block's head-concatenated output; the block maps from ``reference.maps_from_explicit_blocks``,
each on the grid its [class] query reads; the flow from an explicit area-weighted resampling
(each coarse cell split evenly over the cells of a common multiple grid, which are then
summed into the fine cells) and a cumulative sum.

timm's small random weights make attention almost uniform: the models here get larger seeded
query and key weights, so that a wrong token order or grid shows in the maps.
"""

from typing import Dict, List, Tuple

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.crossvit import CrossAttention, CrossAttentionBlock, CrossVit, scale_image
from torch import Tensor, nn

from captum_daam import DAAM, AttentionRollout, GradientRollout
from captum_daam.adapters import adapter_for
from captum_daam.adapters.timm_crossvit import TimmCrossVitAdapter
from helpers import assert_close_relative, make_images, make_model, set_fused_attention
from reference import (
    explicit_gradients,
    flow_on_the_finest_grid,
    maps_from_explicit_blocks,
)

NUM_CLASSES = 11
TARGETS = [3, 10]

# --------------------------------------------------------------------------- #
# Explicit reference
# --------------------------------------------------------------------------- #


def explicit_self_attention(attention: Attention, tokens: Tensor) -> Dict[str, Tensor]:
    """One timm ``Attention`` (no qk_norm, no scale_norm) by hand: the full attention
    ``attn`` (B, H, N, N), ``v`` (B, H, N, d), the head-concatenated ``pre_projection``
    (B, N, C) and ``out`` = proj(pre_projection)."""
    batch, num_tokens, _ = tokens.shape
    heads = attention.num_heads
    q, k, v = attention.qkv(tokens).reshape(batch, num_tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    probabilities = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, num_tokens, -1)
    out = attention.proj_drop(attention.proj(pre_projection))
    return {"attn": probabilities, "v": v, "pre_projection": pre_projection, "out": out}


def explicit_cross_attention(attention: CrossAttention, tokens: Tensor) -> Dict[str, Tensor]:
    """One ``CrossAttention`` by hand: the first token (the projected [class] token) is the
    only query, over all tokens. ``attn`` is (B, H, 1, N), ``pre_projection`` (B, 1, C)."""
    batch, num_tokens, channels = tokens.shape
    heads = attention.num_heads
    q = attention.wq(tokens[:, :1]).reshape(batch, 1, heads, -1).transpose(1, 2)
    k = attention.wk(tokens).reshape(batch, num_tokens, heads, -1).transpose(1, 2)
    v = attention.wv(tokens).reshape(batch, num_tokens, heads, -1).transpose(1, 2)
    probabilities = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, 1, channels)
    out = attention.proj_drop(attention.proj(pre_projection))
    return {"attn": probabilities, "v": v, "pre_projection": pre_projection, "out": out}


def branch_grids(model: CrossVit) -> List[Tuple[int, int]]:
    """Each branch's grid, from its image size and patch size (square patches)."""
    return [
        (size[0] // patch_embed.patch_size[0], size[1] // patch_embed.patch_size[1])
        for size, patch_embed in zip(model.img_size_scaled, model.patch_embed)
    ]


def explicit_forward(model: CrossVit, images: Tensor) -> Dict[str, object]:
    """The whole forward pass by hand, in the model's dtype. Every flow block's record gets
    the ``name`` of the attention module it replaces and its ``grid``."""
    batch = images.shape[0]
    names = {id(module): name for name, module in model.named_modules()}
    grids = branch_grids(model)
    xs = []
    for branch, patch_embed in enumerate(model.patch_embed):
        size = tuple(model.img_size_scaled[branch])
        scaled = images
        if tuple(images.shape[-2:]) != size:
            scaled = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        patches = patch_embed.proj(scaled).flatten(2).transpose(1, 2)  # row-major grid
        class_token = getattr(model, f"cls_token_{branch}").expand(batch, -1, -1)
        xs.append(torch.cat((class_token, patches), dim=1) + getattr(model, f"pos_embed_{branch}"))
    records = []
    for multi_scale in model.blocks:
        outs = []
        for branch, vit_blocks in enumerate(multi_scale.blocks):
            x = xs[branch]
            for block in vit_blocks:
                record = explicit_self_attention(block.attn, block.norm1(x))
                record.update(name=names[id(block.attn)], grid=grids[branch])
                x = x + block.drop_path1(block.ls1(record["out"]))
                x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
                records.append(record)
            outs.append(x)
        fused = []
        for branch, (fusion, revert) in enumerate(
            zip(multi_scale.fusion, multi_scale.revert_projs)
        ):
            other = 1 - branch
            tokens = torch.cat(
                (multi_scale.projs[branch](outs[branch][:, :1]), outs[other][:, 1:]), dim=1
            )
            fusion_blocks = [fusion] if isinstance(fusion, CrossAttentionBlock) else list(fusion)
            first = fusion_blocks[0]
            record = explicit_cross_attention(first.attn, first.norm1(tokens))
            record.update(name=names[id(first.attn)], grid=grids[other])
            class_token = tokens[:, :1] + first.drop_path(record["out"])
            for later in fusion_blocks[1:]:  # the [class] token alone: not part of the flow
                class_token = later(class_token)
            fused.append(torch.cat((revert(class_token), outs[branch][:, 1:]), dim=1))
            records.append(record)
        xs = fused
    class_tokens = [norm(x)[:, 0] for norm, x in zip(model.norm, xs)]
    logits = torch.stack([head(token) for head, token in zip(model.head, class_tokens)]).mean(0)
    return {"logits": logits, "blocks": records}


def explicit_crossvit_daam(model: CrossVit, images: Tensor, target=None) -> Dict[str, object]:
    """Reference block maps on their own grids, and the flow on the finest grid, in float64."""
    result, targets, gradients = explicit_gradients(explicit_forward, model, images, target)
    logits = result["logits"]
    records = result["blocks"]
    block_maps = [
        maps_from_explicit_blocks([record], [gradient], 1, record["grid"])["block_maps"][:, 0]
        for record, gradient in zip(records, gradients)
    ]
    return {
        "logits": logits.detach(),
        "targets": targets,
        "block_maps": block_maps,
        "records": records,
        "gradients": gradients,
    }


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #


def sharpen(model: nn.Module, seed: int = 0) -> nn.Module:
    """Larger seeded query and key weights, so that attention is far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Attention):
                weight = module.qkv.weight
                width = weight.shape[0] // 3
                noise = torch.randn(2 * width, weight.shape[1], generator=generator)
                weight[: 2 * width] = noise * weight.shape[1] ** -0.5
            elif isinstance(module, CrossAttention):
                for linear in (module.wq, module.wk):
                    noise = torch.randn(linear.weight.shape, generator=generator)
                    linear.weight.copy_(noise * linear.weight.shape[1] ** -0.5)
    return model


def small_crossvit(fusion_depth: int = 0, multi_conv: bool = False, seed: int = 0, **kwargs):
    """Two branches on 6x6 and 4x4 grids (48x48 images; branch 1 rescales them to 36x36
    and cuts 9-pixel patches); with ``multi_conv``, the *_dagger embedding on 4x4 and 2x2."""
    torch.manual_seed(seed)
    if multi_conv:
        shape = dict(img_size=48, img_scale=(1.0, 32 / 48), patch_size=(12, 16), multi_conv=True)
    else:
        shape = dict(img_size=48, img_scale=(1.0, 0.75), patch_size=(8, 9))
    options = dict(
        embed_dim=(32, 48),
        depth=((1, 2, fusion_depth), (2, 3, fusion_depth)),
        num_heads=(2, 4),
        mlp_ratio=(2, 2, 1),
        num_classes=NUM_CLASSES,
    )
    options.update(kwargs)
    return sharpen(CrossVit(**shape, **options).eval(), seed)


MODELS = {
    "small": lambda: small_crossvit(),
    "small_fusion_sequence": lambda: small_crossvit(fusion_depth=1),
    "small_dagger": lambda: small_crossvit(multi_conv=True),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_case(request):
    return request.param, MODELS[request.param]()


_REFERENCES: Dict[tuple, Dict[str, object]] = {}


def cached_reference(case: str, model, images: Tensor, target) -> Dict[str, object]:
    """The reference does not depend on fused attention: once per model and target."""
    key = (case, tuple(images.shape), None if target is None else tuple(target))
    if key not in _REFERENCES:
        _REFERENCES[key] = explicit_crossvit_daam(model, images, target)
    return _REFERENCES[key]


@pytest.fixture(scope="module", autouse=True)
def free_references_after_the_module():
    yield
    _REFERENCES.clear()


def image_size(model: CrossVit) -> Tuple[int, int]:
    return tuple(model.img_size)


# --------------------------------------------------------------------------- #
# Exactness
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_explicit_reference_reproduces_the_models_logits(model_case, fused):
    case, model = model_case
    set_fused_attention(model, fused)
    images = make_images(2, *image_size(model))
    with torch.no_grad():
        own = model(images)
        by_hand = explicit_forward(model, images)["logits"]
    assert_close_relative(by_hand, own, 1e-5)
    assert_close_relative(cached_reference(case, model, images, TARGETS)["logits"], own, 1e-5)


def test_flow_runs_over_branch_blocks_then_fusions_with_their_grids(model_case):
    case, model = model_case
    images = make_images(2, *image_size(model))
    adapter = DAAM(model).adapter
    assert isinstance(adapter, TimmCrossVitAdapter)
    records = cached_reference(case, model, images, TARGETS)["records"]
    assert adapter.attention_modules() == [model.get_submodule(r["name"]) for r in records]
    layouts = adapter.block_layouts(adapter.attention_modules(), image_size(model))
    assert [layout.grid for layout in layouts] == [record["grid"] for record in records]
    grids = branch_grids(model)
    assert adapter.grid_size(image_size(model)) == max(grids, key=lambda g: g[0] * g[1])
    # Per multi-scale block: branch 0's blocks, branch 1's, then each branch's fusion.
    expected_branches = [
        branch
        for multi_scale in model.blocks
        for branch in [0] * len(multi_scale.blocks[0]) + [1] * len(multi_scale.blocks[1]) + [0, 1]
    ]
    assert [layout.branch for layout in layouts] == expected_branches


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_block_maps_on_their_own_grids_equal_explicit_reference(model_case, fused):
    case, model = model_case
    set_fused_attention(model, fused)
    images = make_images(2, *image_size(model))
    expected = cached_reference(case, model, images, TARGETS)["block_maps"]
    maps = DAAM(model).attribute(images, target=TARGETS, block_grids=True, accumulate=False)
    assert len(maps) == len(expected)
    for block_map, reference_map in zip(maps, expected):
        assert_close_relative(block_map[:, 0], reference_map)
    assert all(float(reference_map.amax()) > 0 for reference_map in expected)
    assert len({tuple(reference_map.shape[-2:]) for reference_map in expected}) == 2


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_flow_on_the_finest_grid_equals_explicit_resampled_accumulation(model_case, fused):
    case, model = model_case
    set_fused_attention(model, fused)
    images = make_images(2, *image_size(model))
    expected = cached_reference(case, model, images, TARGETS)
    expected_flow = flow_on_the_finest_grid(expected["block_maps"])
    flow = DAAM(model).attribute(images, target=TARGETS, return_flow=True)
    assert flow.shape[-2:] == max(branch_grids(model), key=lambda grid: grid[0] * grid[1])
    assert_close_relative(flow, expected_flow)
    assert_close_relative(DAAM(model).attribute(images, target=TARGETS), expected_flow[:, -1:])


def test_predicted_classes_are_explained_by_default():
    model = small_crossvit()
    images = make_images(2, 48, 48)
    expected = cached_reference("small", model, images, None)
    assert expected["targets"].tolist() == model(images).argmax(1).tolist()
    final = flow_on_the_finest_grid(expected["block_maps"])[:, -1:]
    assert_close_relative(DAAM(model).attribute(images), final)


def test_contributions_sum_to_the_modules_own_class_output(model_case):
    """sum_n F[n] of the reference is the [class] row each module itself hands to proj."""
    case, model = model_case
    images = make_images(2, *image_size(model))
    records = cached_reference(case, model, images, TARGETS)["records"]
    own: Dict[int, Tensor] = {}
    handles = [
        model.get_submodule(record["name"]).proj.register_forward_pre_hook(
            lambda module, args, key=index: own.__setitem__(key, args[0][:, 0].detach())
        )
        for index, record in enumerate(records)
    ]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    for index, record in enumerate(records):
        class_row = record["attn"][:, :, 0]  # (B, H, N)
        contributions = (class_row.unsqueeze(-1) * record["v"]).transpose(1, 2).flatten(2)
        assert_close_relative(contributions.sum(dim=1), own[index], 1e-5)


def test_full_attention_of_the_self_attention_blocks_equals_explicit(model_case):
    case, model = model_case
    images = make_images(2, *image_size(model))
    records = cached_reference(case, model, images, TARGETS)["records"]
    modules = [model.get_submodule(record["name"]) for record in records]
    self_attention = [
        (module, record) for module, record in zip(modules, records)
        if isinstance(module, Attention)
    ]
    adapter = adapter_for(model)
    with adapter.record([module for module, _ in self_attention], full=True) as recorded:
        with torch.no_grad():
            model(images)
    for block, (_, record) in zip(recorded, self_attention):
        assert_close_relative(block.attention(), record["attn"], 1e-5)
        assert_close_relative(block.class_attention, record["attn"][:, :, 0], 1e-5)


@pytest.mark.slow
def test_registered_model_at_its_default_size_equals_explicit_reference():
    model = sharpen(make_model("crossvit_tiny_240", num_classes=NUM_CLASSES))
    images = make_images(1, 240, 240, seed=5)
    expected = explicit_crossvit_daam(model, images, [7])
    daam = DAAM(model)
    maps = daam.attribute(images, target=7, block_grids=True, accumulate=False)
    assert [tuple(m.shape[-2:]) for m in maps[:5]] == [(20, 20)] + [(14, 14)] * 4
    for block_map, reference_map in zip(maps, expected["block_maps"]):
        assert_close_relative(block_map[:, 0], reference_map)
    flow = daam.attribute(images, target=7, return_flow=True)
    assert flow.shape == (1, 3 * (1 + 4 + 2), 20, 20)
    assert_close_relative(flow, flow_on_the_finest_grid(expected["block_maps"]))


def test_any_image_size_is_rescaled_to_the_branch_grids():
    model = small_crossvit()
    images = make_images(2, 40, 56, seed=3)
    expected = explicit_crossvit_daam(model, images, TARGETS)
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images), 1e-5)
    flow = DAAM(model).attribute(images, target=TARGETS, return_flow=True)
    assert flow.shape[-2:] == (6, 6)
    assert_close_relative(flow, flow_on_the_finest_grid(expected["block_maps"]))


def test_later_fusion_blocks_read_no_patches_and_stay_out_of_the_flow():
    model = small_crossvit(fusion_depth=2)
    adapter = adapter_for(model)
    fusion_attentions = {id(block.attn) for ms in model.blocks for f in ms.fusion for block in f}
    in_flow = [m for m in adapter.attention_modules() if id(m) in fusion_attentions]
    assert in_flow == [f[0].attn for ms in model.blocks for f in ms.fusion]
    images = make_images(2, 48, 48)
    expected = explicit_crossvit_daam(model, images, TARGETS)
    assert_close_relative(
        DAAM(model).attribute(images, target=TARGETS, return_flow=True),
        flow_on_the_finest_grid(expected["block_maps"]),
    )


# --------------------------------------------------------------------------- #
# Layer subsets: every hook fires whichever modules are chosen
# --------------------------------------------------------------------------- #


def _subsets(model: CrossVit) -> Dict[str, List[nn.Module]]:
    first, second = model.blocks[0], model.blocks[1]
    return {
        "branch_1_blocks": [block.attn for ms in model.blocks for block in ms.blocks[1]],
        "fusions": [fusion.attn for ms in model.blocks for fusion in ms.fusion],
        "both_fusions_of_one_block": [second.fusion[1].attn, second.fusion[0].attn],
        # branch 0's fusion does not feed branch 1's next blocks: two roots are needed
        "fusion_0_then_branch_1": [first.fusion[0].attn, second.blocks[1][0].attn],
        "one_block": [second.blocks[0][0].attn],
    }


@pytest.mark.parametrize(
    "subset",
    ["branch_1_blocks", "fusions", "both_fusions_of_one_block", "fusion_0_then_branch_1",
     "one_block"],
)
def test_layer_subsets_equal_the_reference_blocks(subset):
    model = small_crossvit()
    images = make_images(2, 48, 48)
    expected = cached_reference("subsets", model, images, TARGETS)
    position = {
        id(model.get_submodule(record["name"])): i for i, record in enumerate(expected["records"])
    }
    chosen = _subsets(model)[subset]
    indices = sorted(position[id(module)] for module in chosen)
    daam = DAAM(model, layer=chosen)
    maps = daam.attribute(images, target=TARGETS, block_grids=True, accumulate=False)
    for block_map, index in zip(maps, indices):
        assert_close_relative(block_map[:, 0], expected["block_maps"][index])
    flow = daam.attribute(images, target=TARGETS, return_flow=True)
    chosen_maps = [expected["block_maps"][i] for i in indices]
    assert_close_relative(flow, flow_on_the_finest_grid(chosen_maps))


# --------------------------------------------------------------------------- #
# Refusals
# --------------------------------------------------------------------------- #


def test_average_pooling_is_refused_with_a_message():
    model = small_crossvit(global_pool="avg")
    with pytest.raises(TypeError, match="global_pool='avg'.*Use global_pool='token'"):
        DAAM(model)


def test_a_branch_without_blocks_is_refused_with_a_message():
    model = CrossVit(
        img_size=48, patch_size=(8, 12), embed_dim=(32, 32), depth=((0, 1, 0),), num_heads=(2, 2),
        mlp_ratio=(2, 2, 1), num_classes=NUM_CLASSES,
    )
    assert len(model.blocks[0].blocks) == 1  # timm keeps one ViT stack for two branches
    with pytest.raises(TypeError, match="each of the 2 branches.*got blocks in 1"):
        DAAM(model)


def test_a_foreign_attention_module_is_refused_with_a_message():
    model = small_crossvit()
    model.blocks[1].blocks[0][0].attn = nn.Identity()
    with pytest.raises(TypeError, match=r"Expected timm.layers.attention.Attention in "
                       r"CrossVit.blocks\[1\].blocks\[0\]\[0\].attn, got Identity"):
        DAAM(model)
    model = small_crossvit()
    model.blocks[0].fusion[1].attn = nn.Identity()
    with pytest.raises(TypeError, match="CrossAttention in the fusion of branch 1 of "
                       r"CrossVit.blocks\[0\], got Identity"):
        DAAM(model)


def test_cropping_model_is_refused_before_the_forward_pass():
    model = small_crossvit(crop_scale=True)
    images = make_images(1, 48, 48)
    # timm does crop branch 1's image: the centre 36x36, not a rescaled whole image.
    assert torch.equal(scale_image(images, (36, 36), True), images[:, :, 6:42, 6:42])
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="crops 48x48 images to 36x36 for branch 1"):
            DAAM(model).attribute(images, target=0)
    finally:
        handle.remove()
    assert calls == []
    # Smaller images are rescaled, not cropped: explained as usual.
    assert DAAM(model).attribute(make_images(1, 30, 30), target=0).shape == (1, 1, 6, 6)


def test_every_query_and_rollouts_are_refused():
    model = small_crossvit()
    images = make_images(1, 48, 48)
    with pytest.raises(ValueError, match="queries='class'"):
        DAAM(model).attribute(images, target=0, queries="all")
    for method in (AttentionRollout, GradientRollout):
        with pytest.raises(TypeError, match="full self-attention matrices"):
            method(model)


def test_frozen_model_gives_the_same_maps():
    """Without parameter gradients each branch's first block starts its own graph."""
    model = small_crossvit()
    images = make_images(2, 48, 48)
    unfrozen = DAAM(model).attribute(images, target=TARGETS, return_flow=True)
    model.requires_grad_(False)
    frozen = DAAM(model).attribute(images, target=TARGETS, return_flow=True)
    assert_close_relative(frozen, unfrozen, 1e-6)


def test_a_model_without_classifier_explains_features():
    model = small_crossvit(num_classes=0)
    adapter = adapter_for(model)
    assert adapter.outputs_features and adapter.num_outputs == 32 + 48
    with torch.no_grad():
        assert model(make_images(1, 48, 48)).shape == (1, 80)


# --------------------------------------------------------------------------- #
# Every registered model
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", timm.list_models("crossvit*"))
def test_every_registered_crossvit_gets_the_adapter_with_its_grids(name):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    adapter = adapter_for(model)
    assert isinstance(adapter, TimmCrossVitAdapter)
    size = tuple(model.img_size)
    # The grids the patch embeddings produce (shape inference on the meta device).
    grids = []
    for branch, patch_embed in enumerate(model.patch_embed):
        branch_image = torch.empty(1, 3, *model.img_size_scaled[branch], device="meta")
        grids.append(tuple(patch_embed.proj(branch_image).shape[-2:]))
    layouts = adapter.block_layouts(adapter.attention_modules(), size)
    vit_blocks = sum(len(stack) for multi_scale in model.blocks for stack in multi_scale.blocks)
    assert len(layouts) == vit_blocks + 2 * len(model.blocks)
    assert {layout.grid for layout in layouts} == set(grids)
    assert adapter.grid_size(size) == grids[0]
    fusions = [layout for layout, module in zip(layouts, adapter.attention_modules())
               if isinstance(module, CrossAttention)]
    assert [(f.grid, f.branch) for f in fusions[:2]] == [(grids[1], 0), (grids[0], 1)]
