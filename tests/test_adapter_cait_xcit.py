"""DAAM on timm CaiT and XCiT equals an explicit reference over their class-attention blocks.

The references below re-run each model by hand: the patch embedding and the self-attention
(CaiT) or cross-covariance (XCiT) blocks through their own modules, then every
class-attention block with its attention row formed explicitly from q, k and v (no
``ClassAttn.forward``, no scaled_dot_product_attention). They take gradients with plain
autograd (class-attention blocks in float64) and build the full (B, N, C) contributions
F[b, n, (h, e)] = A[b, h, n] * v[b, h, n, e], as DESIGN.md section 1 writes them.
"""

import copy
import warnings
from typing import Dict, Tuple

import pytest
import torch
from timm.models.cait import Cait, ClassAttn
from timm.models.xcit import Xcit

from captum_daam import DAAM, class_token_contributions
from captum_daam.adapters import adapter_for
from captum_daam.adapters.timm_cait import TimmCaitAdapter
from captum_daam.adapters.timm_xcit import TimmXcitAdapter
from helpers import (
    assert_attributions_match,
    assert_close_relative,
    make_images,
    make_model,
    record_with_module_outputs,
    set_fused_attention,
)
from reference import maps_from_explicit_blocks, resolve_targets

# --------------------------------------------------------------------------- #
# Explicit reference
# --------------------------------------------------------------------------- #


def explicit_class_attention(attention: ClassAttn, tokens: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One ``ClassAttn`` by hand: the [class] query against all tokens [cls, patches...].

    Returns the attention ``attn`` (B, H, 1, N) = softmax(q k^T * scale), ``v`` (B, H, N, d),
    the head-concatenated ``pre_projection`` (B, 1, C) and ``out`` = proj(pre_projection).
    """
    batch, num_tokens, channels = tokens.shape
    heads = attention.num_heads
    width = channels // heads
    q = attention.q(tokens[:, :1]).reshape(batch, 1, heads, width).transpose(1, 2)
    k = attention.k(tokens).reshape(batch, num_tokens, heads, width).transpose(1, 2)
    v = attention.v(tokens).reshape(batch, num_tokens, heads, width).transpose(1, 2)
    probabilities = ((q @ k.transpose(-2, -1)) * width**-0.5).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, 1, channels)
    out = attention.proj_drop(attention.proj(pre_projection))
    return {"attn": probabilities, "v": v, "pre_projection": pre_projection, "out": out}


def cait_patch_tokens(model: Cait, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Patch tokens entering CaiT's class-attention blocks, and the patch grid."""
    x = model.pos_drop(model.patch_embed(images) + model.pos_embed)
    for block in model.blocks:  # self-attention blocks, their own modules
        x = block(x)
    return x, tuple(model.patch_embed.proj(images).shape[-2:])


def cait_class_attention_head(model: Cait, patches: torch.Tensor) -> Dict[str, object]:
    """CaiT's class-attention blocks with explicit attention, then norm and head."""
    class_token = model.cls_token.expand(patches.shape[0], -1, -1)
    records = []
    for block in model.blocks_token_only:
        tokens = block.norm1(torch.cat((class_token, patches), dim=1))
        record = explicit_class_attention(block.attn, tokens)
        class_token = class_token + block.drop_path(block.gamma_1 * record["out"])
        class_token = class_token + block.drop_path(
            block.gamma_2 * block.mlp(block.norm2(class_token))
        )
        records.append(record)
    logits = model.forward_head(model.norm(torch.cat((class_token, patches), dim=1)))
    return {"logits": logits, "blocks": records}


def xcit_patch_tokens(model: Xcit, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Patch tokens entering XCiT's class-attention blocks, and the patch grid."""
    feature_map = model.patch_embed.proj(images)  # (B, C, Hp, Wp)
    batch, _, grid_h, grid_w = feature_map.shape
    x = feature_map.flatten(2).transpose(1, 2)  # patches in row-major order
    if model.pos_embed is not None:
        x = x + model.pos_embed(batch, grid_h, grid_w).flatten(2).transpose(1, 2)
    x = model.pos_drop(x)
    for block in model.blocks:  # cross-covariance blocks, their own modules
        x = block(x, grid_h, grid_w)
    return x, (grid_h, grid_w)


def xcit_class_attention_head(model: Xcit, patches: torch.Tensor) -> Dict[str, object]:
    """XCiT's class-attention blocks with explicit attention, then norm and head."""
    x = torch.cat((model.cls_token.expand(patches.shape[0], -1, -1), patches), dim=1)
    records = []
    for block in model.cls_attn_blocks:
        normed = block.norm1(x)
        record = explicit_class_attention(block.attn, normed)
        x = x + block.drop_path1(block.gamma1 * torch.cat((record["out"], normed[:, 1:]), dim=1))
        if block.tokens_norm:
            x = block.norm2(x)
        else:
            x = torch.cat((block.norm2(x[:, :1]), x[:, 1:]), dim=1)
        class_update = block.gamma2 * block.mlp(x[:, :1])
        # As timm writes it: the residual adds the patch tokens to themselves.
        x = x + block.drop_path2(torch.cat((class_update, x[:, 1:]), dim=1))
        records.append(record)
    return {"logits": model.forward_head(model.norm(x)), "blocks": records}


def patch_tokens(model, images):
    return (cait_patch_tokens if isinstance(model, Cait) else xcit_patch_tokens)(model, images)


def class_attention_head(model, patches):
    head = cait_class_attention_head if isinstance(model, Cait) else xcit_class_attention_head
    return head(model, patches)


def explicit_forward(model, images) -> Dict[str, object]:
    """The whole forward by hand, in the model's dtype."""
    patches, grid = patch_tokens(model, images)
    return dict(class_attention_head(model, patches), grid_size=grid)


def explicit_class_attention_daam(model, images, target=None) -> Dict[str, object]:
    """Reference block maps and flow over the class-attention blocks.

    The trunk (patch embedding, self-attention or XCA blocks) runs as the model runs it, in
    float32 without gradients: DAAM needs none below the class-attention blocks, and float64
    convolutions are very slow on CPU. The class-attention blocks and the head run in float64.
    """
    with torch.no_grad():
        patches, (grid_h, grid_w) = patch_tokens(model, images)
    model = copy.deepcopy(model).double()
    with torch.enable_grad():
        result = class_attention_head(model, patches.double())
        logits = result["logits"]
        targets = resolve_targets(target, logits)
        score = logits[torch.arange(logits.shape[0]), targets].sum()
        pre_projections = [record["pre_projection"] for record in result["blocks"]]
        gradients = torch.autograd.grad(score, pre_projections)
    maps = maps_from_explicit_blocks(result["blocks"], gradients, 1, (grid_h, grid_w))
    return {
        "logits": logits.detach(),
        "targets": targets,
        "block_maps": maps["block_maps"],
        "flow": maps["flow"],
        "grid_size": (grid_h, grid_w),
    }


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #

NUM_CLASSES = 11
TARGETS = [3, 10, 0]


def small_cait(seed: int = 0) -> Cait:
    torch.manual_seed(seed)
    return Cait(
        img_size=64,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=NUM_CLASSES,
        init_values=0.1,
        depth_token_only=3,
    ).eval()


def small_xcit(tokens_norm: bool = False, seed: int = 0) -> Xcit:
    torch.manual_seed(seed)
    return Xcit(
        img_size=64,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=NUM_CLASSES,
        cls_attn_layers=3,
        eta=0.5,
        tokens_norm=tokens_norm,
    ).eval()


MODELS = {
    "cait_small": lambda: small_cait(),
    "xcit_small": lambda: small_xcit(),
    "xcit_small_tokens_norm": lambda: small_xcit(tokens_norm=True),
    "cait_xxs24_224": lambda: make_model("cait_xxs24_224", num_classes=NUM_CLASSES),
    "xcit_nano_12_p16_224": lambda: make_model("xcit_nano_12_p16_224", num_classes=NUM_CLASSES),
}


def class_blocks(model):
    return model.blocks_token_only if isinstance(model, Cait) else model.cls_attn_blocks


def image_size(model):
    return tuple(model.patch_embed.img_size)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_case(request):
    return request.param, MODELS[request.param]()


_REFERENCES: Dict[tuple, Dict[str, object]] = {}


def cached_reference(case: str, model, images: torch.Tensor, target) -> Dict[str, object]:
    """The reference does not depend on fused attention: compute it once per model and target."""
    key = (case, None if target is None else tuple(target))
    if key not in _REFERENCES:
        if any(cached_case != case for cached_case, _ in _REFERENCES):
            _REFERENCES.clear()  # one model's references at a time: they hold its float64 graph
        _REFERENCES[key] = explicit_class_attention_daam(model, images, target=target)
    return _REFERENCES[key]


@pytest.fixture(scope="module", autouse=True)
def free_references_after_the_module():
    yield
    _REFERENCES.clear()


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("fused", [True, False])
def test_explicit_reference_reproduces_the_models_logits(model_case, fused):
    case, model = model_case
    set_fused_attention(model, fused)
    images = make_images(3, *image_size(model))
    with torch.no_grad():
        own = model(images)
        by_hand = explicit_forward(model, images)["logits"]
    assert_close_relative(by_hand, own, 1e-5)
    assert_close_relative(cached_reference(case, model, images, None)["logits"], own, 1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["three_targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(model_case, target, fused):
    case, model = model_case
    set_fused_attention(model, fused)
    images = make_images(3, *image_size(model))
    expected = cached_reference(case, model, images, target)
    flow = assert_attributions_match(DAAM(model), images, target, expected)
    assert flow.shape == (3, len(class_blocks(model)), *expected["grid_size"])
    assert float(expected["flow"][:, -1].amax()) > 0  # not a vacuous comparison of zeros
    if target is None:
        assert expected["targets"].tolist() == model(images).argmax(1).tolist()


def test_daam_picks_the_family_adapter_and_runs_over_class_attention_blocks():
    cait, xcit = small_cait(), small_xcit()
    assert isinstance(DAAM(cait).adapter, TimmCaitAdapter)
    assert isinstance(DAAM(xcit).adapter, TimmXcitAdapter)
    assert isinstance(adapter_for(xcit), TimmXcitAdapter)
    assert DAAM(cait).layer == [block.attn for block in cait.blocks_token_only]
    assert DAAM(xcit).layer == [block.attn for block in xcit.cls_attn_blocks]


@pytest.mark.parametrize("make", [small_cait, small_xcit], ids=["cait", "xcit"])
def test_layer_restricts_the_flow_to_those_blocks_in_block_order(make):
    model = make()
    images = make_images(3, 64, 64, seed=2)
    expected = explicit_class_attention_daam(model, images, target=TARGETS)
    blocks = class_blocks(model)

    chosen = DAAM(model, layer=[blocks[2].attn, blocks[0].attn])
    maps = chosen.attribute(images, target=TARGETS, return_flow=True, accumulate=False)
    flow = chosen.attribute(images, target=TARGETS, return_flow=True)
    assert maps.shape == (3, 2, 8, 8)
    assert_close_relative(maps, expected["block_maps"][:, [0, 2]])
    assert_close_relative(flow, expected["block_maps"][:, [0, 2]].cumsum(dim=1))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        single = DAAM(model, layer=blocks[1].attn).attribute(images, target=TARGETS)
    assert_close_relative(single, expected["block_maps"][:, 1:2])
    # A single block's map can be zero for an example (here XCiT's): DAAM warns exactly then.
    some_map_is_zero = bool((expected["block_maps"][:, 1].flatten(1).amax(dim=1) == 0).any())
    assert some_map_is_zero == any("zero everywhere" in str(w.message) for w in caught)


@pytest.mark.parametrize("make", [small_cait, small_xcit], ids=["cait", "xcit"])
def test_self_attention_block_is_refused_as_layer(make):
    model = make()
    with pytest.raises(ValueError, match="not one of its 3 attention modules"):
        DAAM(model, layer=model.blocks[0].attn)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("make", [small_cait, small_xcit], ids=["cait", "xcit"])
def test_contributions_sum_to_the_modules_own_class_output(make, fused):
    """Sum over tokens of F, through the block's projection, is the ClassAttn output."""
    model = set_fused_attention(make(), fused)
    images = make_images(2, 64, 64)
    adapter = adapter_for(model)
    records, module_outputs = record_with_module_outputs(
        adapter, adapter.attention_modules(), lambda: model(images)
    )
    for block, record, module_output in zip(class_blocks(model), records, module_outputs):
        contributions = class_token_contributions(record.class_attention, record.values)
        assert contributions.shape == (2, 1 + 64, 64)
        reproduced = block.attn.proj(contributions.sum(dim=1))
        assert_close_relative(reproduced, module_output[:, 0], 1e-5)


@pytest.mark.parametrize("height, width, grid", [(72, 40, (9, 5)), (70, 50, (9, 7))])
def test_xcit_takes_any_image_size_with_the_grid_of_its_convolutions(height, width, grid):
    model = small_xcit()
    images = make_images(3, height, width, seed=4)
    expected = explicit_class_attention_daam(model, images, target=TARGETS)
    assert expected["grid_size"] == grid
    flow = DAAM(model).attribute(images, target=TARGETS, return_flow=True)
    assert flow.shape == (3, 3) + grid
    assert_close_relative(flow, expected["flow"])


def test_cait_rejects_an_image_size_it_was_not_built_for():
    with pytest.raises(ValueError, match="takes 64x64 images"):
        DAAM(small_cait()).attribute(make_images(1, 96, 96), target=0)


def test_frozen_model_gives_the_same_maps():
    model = small_xcit()
    images = make_images(2, 64, 64)
    unfrozen = DAAM(model).attribute(images, target=[5, 6], return_flow=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    frozen = DAAM(model).attribute(images, target=[5, 6], return_flow=True)
    assert_close_relative(frozen, unfrozen, 1e-6)


@pytest.mark.parametrize("make", [small_cait, small_xcit], ids=["cait", "xcit"])
def test_average_pooled_model_is_refused_with_a_message(make):
    model = make()
    model.reset_classifier(NUM_CLASSES, global_pool="avg")
    with pytest.raises(TypeError, match="global_pool='avg'"):
        DAAM(model)


@pytest.mark.parametrize("make", [small_cait, small_xcit], ids=["cait", "xcit"])
def test_gradient_checkpointing_gives_the_same_maps(make):
    """CaiT checkpoints its self-attention blocks, XCiT also its class-attention blocks,
    whose forward the checkpointed backward pass runs again."""
    model = make()
    images = make_images(2, 64, 64)
    plain = DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    model.set_grad_checkpointing(True)
    checkpointed = DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    assert_close_relative(checkpointed, plain, 1e-6)


def test_pruned_head_is_refused_with_a_message():
    model = small_xcit()
    model.prune_intermediate_layers(indices=1)
    with pytest.raises(TypeError, match="has none"):
        DAAM(model)
