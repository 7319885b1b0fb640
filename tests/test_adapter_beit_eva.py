"""DAAM on timm BEiT and EVA equals an explicit reference.

The references below re-run each model by hand in float64 on a deep copy: the patch
embedding and position embedding (for EVA, the model's own ``_pos_embed``, which also gives
the rotary embedding), then every block with its attention written out as a full
(B, H, N, N) matrix, softmax(q k^T * scale + bias), from the qkv weights and biases: BEiT's
relative position bias looked up by hand in its tables, EVA's rotary embedding applied to
the non-prefix queries and keys with timm's ``apply_rot_embed_cat``. No attention module's
forward, no scaled_dot_product_attention, no hooks. Gradients come from plain autograd at
each block's head-concatenated output, and the maps from ``reference.maps_from_explicit_blocks``.

timm initialises the relative position tables and the q / v biases to zero, and its small
random weights make the attention almost uniform: the models here get seeded noise on those
biases and larger query / key weights, so that a missing bias or rotation shows in the maps.
"""

import warnings
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
from timm.layers import Attention as TimmAttention
from timm.layers import apply_rot_embed_cat
from timm.models.beit import Beit
from timm.models.eva import Eva, EvaBlockPostNorm
from torch import Tensor, nn

from captum_daam import DAAM, class_token_contributions
from captum_daam.adapters import adapter_for
from captum_daam.adapters.timm_beit import TimmBeitAdapter
from captum_daam.adapters.timm_eva import TimmEvaAdapter
from helpers import (
    ClassRows,
    assert_attributions_match,
    assert_close_relative,
    make_images,
    make_model,
    record_with_module_outputs,
    set_fused_attention,
)
from reference import (
    explicit_gradients,
    maps_from_every_query_row,
    maps_from_explicit_blocks,
    patch_grid_size,
)

NUM_CLASSES = 11
TARGETS = [3, 10, 0]

# --------------------------------------------------------------------------- #
# Explicit reference
# --------------------------------------------------------------------------- #


def explicit_softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d) + bias), (B, H, N, N), and the head-concatenated A @ v."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    probabilities = scores.softmax(dim=-1)
    return probabilities, (probabilities @ v).transpose(1, 2).flatten(2)


def table_bias(table: Tensor, index: Tensor) -> Tensor:
    """A relative position bias (H, N, N): row i, column j is table[index[i, j]]."""
    return table[index].permute(2, 0, 1)


def fused_qkv(attention: nn.Module, z: Tensor) -> Tensor:
    """q, k, v (B, H, N, d) from a fused qkv weight, with BEiT's q / v biases (no k bias)."""
    batch, tokens, _ = z.shape
    qkv = z @ attention.qkv.weight.T
    if attention.q_bias is not None:
        zeros = torch.zeros_like(attention.q_bias)
        qkv = qkv + torch.cat((attention.q_bias, zeros, attention.v_bias))
    return qkv.reshape(batch, tokens, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)


def explicit_beit_attention(
    attention: nn.Module, z: Tensor, shared_bias: Optional[Tensor]
) -> Dict[str, Tensor]:
    """One BEiT attention by hand; ``attn_plain`` is the attention without the position bias."""
    q, k, v = fused_qkv(attention, z)
    bias = 0.0
    if attention.relative_position_bias_table is not None:
        bias = table_bias(attention.relative_position_bias_table, attention.relative_position_index)
    if shared_bias is not None:
        bias = bias + shared_bias
    probabilities, pre_projection = explicit_softmax_attention(q, k, v, bias)
    plain, _ = explicit_softmax_attention(q, k, v)
    out = attention.proj(pre_projection)
    return dict(attn=probabilities, attn_plain=plain, v=v, pre_projection=pre_projection, out=out)


def explicit_beit_forward(model: Beit, images: torch.Tensor, attn_mask=None) -> Dict[str, object]:
    x = model.patch_embed(images)
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    shared = model.rel_pos_bias
    shared_bias = None
    if shared is not None:
        shared_bias = table_bias(
            shared.relative_position_bias_table, shared.relative_position_index
        )
    records = []
    for block in model.blocks:
        record = explicit_beit_attention(block.attn, block.norm1(x), shared_bias)
        gamma_1 = 1.0 if block.gamma_1 is None else block.gamma_1
        gamma_2 = 1.0 if block.gamma_2 is None else block.gamma_2
        x = x + gamma_1 * record["out"]
        x = x + gamma_2 * block.mlp(block.norm2(x))
        records.append(record)
    return {"logits": model.forward_head(model.norm(x)), "blocks": records}


def explicit_eva_attention(
    attention: nn.Module, z: Tensor, rope: Optional[Tensor], mask_bias: Optional[Tensor]
) -> Dict[str, Tensor]:
    """One EvaAttention by hand; ``attn_plain`` uses keys without the rotary embedding."""
    if attention.qkv is not None:
        q, k, v = fused_qkv(attention, z)
    else:
        q, k, v = (
            projection(z).unflatten(-1, (attention.num_heads, -1)).transpose(1, 2)
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj)
        )
    q, k = attention.q_norm(q), attention.k_norm(k)
    plain_k = k
    if rope is not None:
        prefix = attention.num_prefix_tokens

        def rotate(t):
            rotated = apply_rot_embed_cat(t[:, :, prefix:], rope, half=attention.rotate_half)
            return torch.cat([t[:, :, :prefix], rotated], dim=2)

        q, k = rotate(q), rotate(k)
    probabilities, pre_projection = explicit_softmax_attention(q, k, v, mask_bias)
    plain, _ = explicit_softmax_attention(q, plain_k, v, mask_bias)
    y = attention.norm(pre_projection)
    if attention.gate is not None:
        y = y * attention.gate(z).sigmoid()
    out = attention.proj(y)
    return dict(attn=probabilities, attn_plain=plain, v=v, pre_projection=pre_projection, out=out)


def explicit_eva_forward(model: Eva, images: torch.Tensor, attn_mask=None) -> Dict[str, object]:
    x, rope = model._pos_embed(model.patch_embed(images))  # [class], registers, rope: timm's
    x = model.norm_pre(x)
    mask_bias = None
    if attn_mask is not None:  # timm's boolean mask: True = may attend
        mask_bias = torch.zeros(attn_mask.shape, dtype=x.dtype).masked_fill(
            ~attn_mask, float("-inf")
        )
    records = []
    for index, block in enumerate(model.blocks):
        block_rope = rope[index] if model.rope_mixed and rope is not None else rope
        if isinstance(block, EvaBlockPostNorm):
            record = explicit_eva_attention(block.attn, x, block_rope, mask_bias)
            x = x + block.norm1(record["out"])
            x = x + block.norm2(block.mlp(x))
        else:
            record = explicit_eva_attention(block.attn, block.norm1(x), block_rope, mask_bias)
            gamma_1 = 1.0 if block.gamma_1 is None else block.gamma_1
            gamma_2 = 1.0 if block.gamma_2 is None else block.gamma_2
            x = x + gamma_1 * record["out"]
            x = x + gamma_2 * block.mlp(block.norm2(x))
        records.append(record)
    return {"logits": model.forward_head(model.norm(x)), "blocks": records}


def explicit_forward(model, images, attn_mask=None) -> Dict[str, object]:
    forward = explicit_beit_forward if isinstance(model, Beit) else explicit_eva_forward
    return forward(model, images, attn_mask)


def explicit_daam(model, images, target=None, attn_mask=None, queries="class") -> Dict[str, object]:
    """Reference block maps and flow in float64; ``plain_flow`` from ``attn_plain``. With
    ``queries="all"``, from every query row (reference.maps_from_every_query_row)."""
    result, targets, gradients = explicit_gradients(
        explicit_forward, model, images, target, attn_mask
    )
    logits = result["logits"]
    grid = patch_grid_size(model, images)
    prefix = model.num_prefix_tokens
    reduce = maps_from_explicit_blocks if queries == "class" else maps_from_every_query_row
    maps = reduce(result["blocks"], gradients, prefix, grid)
    plain_blocks = [dict(record, attn=record["attn_plain"]) for record in result["blocks"]]
    plain = reduce(plain_blocks, gradients, prefix, grid)
    return dict(
        maps,
        logits=logits.detach(),
        targets=targets,
        grid_size=grid,
        plain_flow=plain["flow"],
        blocks=result["blocks"],
    )


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #


def prepare(model: torch.nn.Module, seed: int = 0, sharpen: float = 8.0) -> torch.nn.Module:
    """Seeded noise on the zero-initialised biases and relative position tables, and query /
    key / value weights scaled by ``sharpen``, so that biases and rotations matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "relative_position_bias_table" in name:
                parameter.add_(2.0 * noise)
            elif name.endswith("_bias") or (name.endswith("bias") and not parameter.any()):
                parameter.add_(0.5 * noise)
        for module in model.modules():
            for name in ("qkv", "q_proj", "k_proj", "v_proj"):
                if isinstance(getattr(module, name, None), torch.nn.Linear):
                    getattr(module, name).weight.mul_(sharpen)
    return model.eval()


SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4)
SMALL_SIZE = (32, 32)


def small_beit(bias_separate: bool = False, **kwargs) -> Beit:
    torch.manual_seed(0)
    model = prepare(Beit(**{**SMALL, "num_classes": NUM_CLASSES, **kwargs}))
    for block in model.blocks:
        block.attn.qkv_bias_separate = bias_separate  # Beit does not pass it to its blocks
    return model


def small_eva(bias_separate: bool = False, **kwargs) -> Eva:
    torch.manual_seed(0)
    kwargs = {**SMALL, "num_classes": NUM_CLASSES, "use_rot_pos_emb": True, **kwargs}
    model = prepare(Eva(**kwargs))
    for block in model.blocks:
        block.attn.qkv_bias_separate = bias_separate  # Eva does not pass it to its blocks
    return model


TOKEN = dict(global_pool="token")
MODELS: Dict[str, Tuple[Callable[[], torch.nn.Module], Tuple[int, int]]] = {
    "beit_rel_pos": (
        lambda: small_beit(use_rel_pos_bias=True, use_abs_pos_emb=False, init_values=0.1, **TOKEN),
        SMALL_SIZE,
    ),
    "beit_shared_rel_pos": (lambda: small_beit(use_shared_rel_pos_bias=True, **TOKEN), SMALL_SIZE),
    # Both biases, BEiT's default average pooling (DAAM warns), q / v biases added separately.
    "beit_both_biases_avg_bias_separate": (
        lambda: small_beit(True, use_rel_pos_bias=True, use_shared_rel_pos_bias=True),
        SMALL_SIZE,
    ),
    "beit_no_qkv_bias": (
        lambda: small_beit(qkv_bias=False, use_rel_pos_bias=True, **TOKEN),
        SMALL_SIZE,
    ),
    "eva_rope": (lambda: small_eva(ref_feat_shape=(4, 4), **TOKEN), SMALL_SIZE),
    "eva_separate_qkv_qk_norm_scale_norm": (
        lambda: small_eva(
            qkv_fused=False,
            qk_norm=True,
            scale_attn_inner=True,
            swiglu_mlp=True,
            init_values=0.1,
            **TOKEN,
        ),
        SMALL_SIZE,
    ),
    "eva_registers_rotate_half_no_qkv_bias": (
        lambda: small_eva(
            num_reg_tokens=2, no_embed_class=True, rope_rotate_half=True, qkv_bias=False, **TOKEN
        ),
        SMALL_SIZE,
    ),
    "eva_bias_separate_avg": (lambda: small_eva(True), SMALL_SIZE),
    "eva_mixed_rope": (lambda: small_eva(rope_type="mixed", **TOKEN), SMALL_SIZE),
    "eva_post_norm": (lambda: small_eva(use_post_norm=True, **TOKEN), SMALL_SIZE),
    "eva_dinov3_dynamic_non_square": (
        lambda: small_eva(
            rope_type="dinov3",
            rope_rotate_half=True,
            dynamic_img_size=True,
            num_reg_tokens=4,
            use_abs_pos_emb=False,
            init_values=0.1,
            **TOKEN,
        ),
        (48, 24),
    ),
    "beit_base_patch16_224": (
        lambda: prepare(make_model("beit_base_patch16_224", num_classes=NUM_CLASSES), sharpen=1),
        (224, 224),
    ),
    "eva02_tiny_patch14_224": (
        lambda: prepare(
            make_model("eva02_tiny_patch14_224", num_classes=NUM_CLASSES, **TOKEN), sharpen=1
        ),
        (224, 224),
    ),
}
SLOW = {"beit_base_patch16_224"}
CASES = [pytest.param(case, marks=pytest.mark.slow) if case in SLOW else case for case in MODELS]


def make_daam(model, **kwargs) -> ClassRows:
    return ClassRows(model, **kwargs)


@pytest.fixture(scope="module", params=CASES)
def model_case(request):
    build, image_size = MODELS[request.param]
    return request.param, build(), image_size


_REFERENCES: Dict[tuple, Dict[str, object]] = {}


def cached_reference(case: str, model, images, target) -> Dict[str, object]:
    """The reference does not depend on fused attention: compute it once per model and target."""
    key = (case, None if target is None else tuple(target))
    if key not in _REFERENCES:
        if any(cached_case != case for cached_case, _ in _REFERENCES):
            _REFERENCES.clear()  # one model's references at a time: they hold its float64 graph
        _REFERENCES[key] = explicit_daam(model, images, target=target)
    return _REFERENCES[key]


@pytest.fixture(scope="module", autouse=True)
def free_references_after_the_module():
    yield
    _REFERENCES.clear()


def record_blocks(model, images, attn_mask=None):
    """The adapter's records of every block, and each attention module's own output."""
    adapter = adapter_for(model)
    return record_with_module_outputs(
        adapter,
        adapter.attention_modules(),
        lambda: model(images) if attn_mask is None else model(images, attn_mask),
    )


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_explicit_reference_reproduces_the_models_logits(model_case, fused):
    case, model, image_size = model_case
    set_fused_attention(model, fused)
    images = make_images(3, *image_size)
    with torch.no_grad():
        own = model(images)
        by_hand = explicit_forward(model, images)["logits"]
    assert_close_relative(by_hand, own, 1e-5)
    assert_close_relative(cached_reference(case, model, images, None)["logits"], own, 1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["three_targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(model_case, target, fused):
    case, model, image_size = model_case
    set_fused_attention(model, fused)
    images = make_images(3, *image_size)
    expected = cached_reference(case, model, images, target)
    flow = assert_attributions_match(make_daam(model), images, target, expected)
    assert flow.shape == (3, len(model.blocks), *expected["grid_size"])
    assert float(expected["flow"][:, -1].amax()) > 0  # not a vacuous comparison of zeros
    if target is None:
        assert expected["targets"].tolist() == model(images).argmax(1).tolist()


def test_bias_and_rotation_are_in_the_class_row_and_change_the_maps(model_case):
    """The reference's position bias (BEiT) or key rotation (EVA) changes the [class] row,
    and maps made without it differ from DAAM's: a missing bias or rotation would show."""
    case, model, image_size = model_case
    images = make_images(3, *image_size)
    expected = cached_reference(case, model, images, TARGETS)
    for record in expected["blocks"]:
        class_row = record["attn"].detach()[:, :, 0]
        plain_row = record["attn_plain"].detach()[:, :, 0]
        assert float((class_row - plain_row).abs().amax()) > 1e-2 * float(class_row.amax())
    flow = make_daam(model).attribute(images, target=TARGETS, return_flow=True)
    assert_close_relative(flow, expected["flow"])
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_relative(flow, expected["plain_flow"], 1e-2)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", ["beit_both_biases_avg_bias_separate", "eva_rope"])
def test_contributions_sum_to_the_modules_own_class_output(case, fused):
    """Sum over tokens of F, through the module's norm and projection, is its [class] output."""
    model = set_fused_attention(MODELS[case][0](), fused)
    records, outputs = record_blocks(model, make_images(2, *SMALL_SIZE))
    for block, record, output in zip(model.blocks, records, outputs):
        contributions = class_token_contributions(record.class_attention, record.values)
        assert contributions.shape == (2, 1 + 16, 64)
        output_norm = getattr(block.attn, "norm", torch.nn.Identity())
        reproduced = block.attn.proj(output_norm(contributions.sum(dim=1)))
        assert_close_relative(reproduced, output[:, 0], 1e-5)


def test_daam_picks_the_family_adapters():
    beit, eva = MODELS["beit_rel_pos"][0](), MODELS["eva_rope"][0]()
    assert isinstance(DAAM(beit).adapter, TimmBeitAdapter)
    assert isinstance(DAAM(eva).adapter, TimmEvaAdapter)
    assert DAAM(beit).layer == [block.attn for block in beit.blocks]
    assert adapter_for(eva).num_prefix_tokens == 1
    registers = MODELS["eva_registers_rotate_half_no_qkv_bias"][0]()
    assert adapter_for(registers).num_prefix_tokens == 3


@pytest.mark.parametrize("case", ["beit_rel_pos", "eva_separate_qkv_qk_norm_scale_norm"])
def test_layer_restricts_the_flow_to_those_blocks_in_block_order(case):
    model = MODELS[case][0]()
    images = make_images(3, *SMALL_SIZE, seed=2)
    expected = explicit_daam(model, images, target=TARGETS)
    chosen = DAAM(model, layer=[model.blocks[1].attn, model.blocks[0].attn])
    maps = chosen.attribute(images, target=TARGETS, return_flow=True, accumulate=False)
    flow = chosen.attribute(images, target=TARGETS, return_flow=True)
    assert maps.shape == (3, 2, 4, 4)
    assert_close_relative(maps, expected["block_maps"][:, :2])
    assert_close_relative(flow, expected["block_maps"][:, :2].cumsum(dim=1))


@pytest.mark.parametrize("case", ["beit_rel_pos", "eva_rope"])
def test_wrong_image_size_is_refused_before_the_forward_pass(case):
    model = MODELS[case][0]()
    ran = []
    handle = model.patch_embed.register_forward_pre_hook(lambda *args: ran.append(True))
    try:
        with pytest.raises(ValueError, match="takes 32x32 images .* got 48x32"):
            DAAM(model).attribute(make_images(1, 48, 32), target=0)
    finally:
        handle.remove()
    assert not ran


def test_dynamic_eva_refuses_a_size_that_is_not_a_multiple_of_the_patch():
    model = MODELS["eva_dinov3_dynamic_non_square"][0]()
    with pytest.raises(ValueError, match="divisible by the patch size 8x8, got 44x24"):
        DAAM(model).attribute(make_images(1, 44, 24), target=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_eva_attention_mask_passed_through_additional_forward_args(fused):
    model = set_fused_attention(MODELS["eva_rope"][0](), fused)
    generator = torch.Generator().manual_seed(3)
    allowed = torch.rand(17, 17, generator=generator) > 0.3
    allowed |= torch.eye(17, dtype=torch.bool)
    images = make_images(3, *SMALL_SIZE)
    expected = explicit_daam(model, images, target=TARGETS, attn_mask=allowed)
    flow = DAAM(model).attribute(
        images, target=TARGETS, additional_forward_args=(allowed,), return_flow=True
    )
    assert_close_relative(flow, expected["flow"])
    unmasked = explicit_daam(model, images, target=TARGETS)["flow"]
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_relative(flow, unmasked, 1e-2)


@pytest.mark.parametrize("pool", ["avg", "map"])
def test_eva_pooling_other_than_the_class_token_warns_for_class_rows_only(pool):
    model = Eva(**SMALL, num_classes=NUM_CLASSES, global_pool=pool).eval()
    images = make_images(1, *SMALL_SIZE)
    with pytest.warns(UserWarning, match=f"global_pool='{pool}'"):
        DAAM(model).attribute(images, target=0, queries="class")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DAAM(model).attribute(images, target=0)  # every query row: nothing to warn about


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", ["beit_both_biases_avg_bias_separate", "eva_bias_separate_avg"])
def test_average_pooled_models_are_explained_by_every_query_row_by_default(case, fused):
    """Their default (queries='all') equals the explicit every-row reference, bias and
    rotation included, and differs from the maps made without them."""
    model = set_fused_attention(MODELS[case][0](), fused)
    images = make_images(3, *SMALL_SIZE)
    expected = explicit_daam(model, images, target=TARGETS, queries="all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow = assert_attributions_match(DAAM(model), images, TARGETS, expected)
    assert float(expected["block_maps"][:, -1].amax()) > 0  # the last block counts now
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_relative(flow, expected["plain_flow"], 1e-2)


def test_beit_default_average_pooling_warns_and_gives_a_zero_last_block_map():
    model = MODELS["beit_both_biases_avg_bias_separate"][0]()
    assert model.global_pool == "avg"
    images = make_images(3, *SMALL_SIZE)
    maps = make_daam(model).attribute(images, target=TARGETS, return_flow=True, accumulate=False)
    assert float(maps[:, -1].abs().amax()) == 0
    assert float(maps[:, 0].amax()) > 0


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_eva_without_class_token_is_explained_by_every_row(fused):
    torch.manual_seed(0)
    model = Eva(**SMALL, num_classes=NUM_CLASSES, class_token=False, num_reg_tokens=1)
    set_fused_attention(prepare(model), fused)
    images = make_images(3, *SMALL_SIZE)
    expected = explicit_daam(model, images, target=TARGETS, queries="all")
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images), 1e-5)
    flow = DAAM(model).attribute(images, target=TARGETS, return_flow=True)
    assert_close_relative(flow, expected["flow"])


def test_beit_with_a_foreign_attention_module_is_refused():
    model = MODELS["beit_rel_pos"][0]()
    model.blocks[1].attn = TimmAttention(64, num_heads=4)
    with pytest.raises(TypeError, match="Block 1 of Beit.blocks uses Attention "):
        DAAM(model)


def test_frozen_eva_gives_the_same_maps():
    model = MODELS["eva_separate_qkv_qk_norm_scale_norm"][0]()
    images = make_images(2, *SMALL_SIZE)
    unfrozen = DAAM(model).attribute(images, target=[5, 6], return_flow=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    frozen = DAAM(model).attribute(images, target=[5, 6], return_flow=True)
    assert_close_relative(frozen, unfrozen, 1e-6)


@pytest.mark.parametrize("case", ["beit_shared_rel_pos", "eva_mixed_rope"])
def test_gradient_checkpointing_gives_the_same_maps(case):
    model = MODELS[case][0]()
    images = make_images(2, *SMALL_SIZE)
    plain = DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    model.set_grad_checkpointing(True)
    checkpointed = DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    assert_close_relative(checkpointed, plain, 1e-6)
