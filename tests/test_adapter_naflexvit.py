"""DAAM on timm NaFlexVit with a [class] token, on image tensors, equals an explicit reference.

The reference re-runs each model by hand in float64 on a deep copy: the model's own
``NaFlexEmbeds`` (patch embedding, interpolated position embedding, then [class] and register
tokens prepended) and rotary embedding module, then every block through its own norms, MLP and
layer scales, with the attention written out as a full (B, H, N, N) matrix
softmax(q k^T / sqrt(d)) from the projections: timm's ``Attention`` (standard blocks),
``EvaAttention`` (EVA's q / v biases) or ``AttentionRope`` (grouped-query attention), with
q / k norms, the rotary embedding applied by hand to the non-prefix queries and keys, scale
norm and output gate. No attention module's forward, no scaled_dot_product_attention, no
hooks. Gradients come from plain autograd at each block's head-concatenated output, and the
maps from ``reference.maps_from_explicit_blocks``.

timm initialises the q / k / v biases to zero and its small random weights make the attention
almost uniform: the models here get seeded noise on zero biases and larger query / key
weights, so that a wrong token layout or a missing rotation shows in the maps.
"""

import math
from typing import Callable, Dict, Optional, Tuple

import pytest
import timm
import torch
from timm.models.eva import EvaBlock
from timm.models.naflexvit import NaFlexVit
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from captum_daam import DAAM, class_token_contributions
from captum_daam.adapters import adapter_for
from captum_daam.adapters.timm_naflexvit import TimmNaFlexVitAdapter
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
)

NUM_CLASSES = 11
TARGETS = [3, 10, 0]

# --------------------------------------------------------------------------- #
# Explicit reference
# --------------------------------------------------------------------------- #


def rotate_by_hand(x: Tensor, embedding: Tensor, half: bool) -> Tensor:
    """Rotary embedding: each pair of channels turned by its angle; the embedding holds
    [sin, cos]. Pairs are (2i, 2i + 1) (interleaved) or (i, i + d / 2) (rotate-half)."""
    sin, cos = embedding.chunk(2, dim=-1)
    if half:
        first, second = x.chunk(2, dim=-1)
        partner = torch.cat([-second, first], dim=-1)
    else:
        partner = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    return x * cos + partner * sin


def queries_keys_values(attention: nn.Module, z: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """q (B, H, N, d), k and v (B, H_kv, N, d) from a fused ``qkv`` (with EVA's q / v biases,
    no k bias, where the module has them) or from ``q_proj`` / ``k_proj`` / ``v_proj``."""
    batch, tokens, _ = z.shape
    heads, width = attention.num_heads, attention.head_dim
    kv_heads = getattr(attention, "num_kv_heads", heads)
    if attention.qkv is None:
        return (
            projection(z).reshape(batch, tokens, count, width).transpose(1, 2)
            for projection, count in (
                (attention.q_proj, heads),
                (attention.k_proj, kv_heads),
                (attention.v_proj, kv_heads),
            )
        )
    qkv = z @ attention.qkv.weight.T
    if getattr(attention, "q_bias", None) is not None:
        zeros = torch.zeros_like(attention.q_bias)
        qkv = qkv + torch.cat((attention.q_bias, zeros, attention.v_bias))
    elif attention.qkv.bias is not None:
        qkv = qkv + attention.qkv.bias
    return qkv.reshape(batch, tokens, 3, heads, width).permute(2, 0, 3, 1, 4)


def explicit_attention(
    attention: nn.Module, z: Tensor, rope: Optional[Tensor]
) -> Dict[str, Tensor]:
    """One ``Attention`` / ``EvaAttention`` / ``AttentionRope`` by hand; ``attn_plain`` uses
    keys without the rotary embedding."""
    batch, tokens, _ = z.shape
    heads, width = attention.num_heads, attention.head_dim
    q, k, v = queries_keys_values(attention, z)
    q, k = attention.q_norm(q), attention.k_norm(k)
    plain_k = k
    if rope is not None:
        prefix, half = attention.num_prefix_tokens, attention.rotate_half

        def rotate(t: Tensor) -> Tensor:
            return torch.cat([t[:, :, :prefix], rotate_by_hand(t[:, :, prefix:], rope, half)], 2)

        q, k = rotate(q), rotate(k)
    # Grouped-query attention: query head h reads key / value head h // (H / H_kv).
    shared = torch.arange(heads) // (heads // k.shape[1])
    k, v, plain_k = k[:, shared], v[:, shared], plain_k[:, shared]
    probabilities = (q @ k.transpose(-2, -1) * width**-0.5).softmax(dim=-1)
    plain = (q @ plain_k.transpose(-2, -1) * width**-0.5).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, tokens, heads * width)
    y = attention.norm(pre_projection)
    if attention.gate is not None:
        y = y * attention.gate(z).sigmoid()
    out = attention.proj(y)
    return dict(attn=probabilities, attn_plain=plain, v=v, pre_projection=pre_projection, out=out)


def explicit_forward(model: NaFlexVit, images: Tensor) -> Dict[str, object]:
    x, grid = model.embeds(images)  # [class], registers, then the patches row by row
    rope = None if model.rope is None else model.rope.get_embed(shape=grid)
    x = model.norm_pre(x)
    records = []
    for index, block in enumerate(model.blocks):
        block_rope = rope[index] if model.rope_is_mixed and rope is not None else rope
        record = explicit_attention(block.attn, block.norm1(x), block_rope)
        if isinstance(block, EvaBlock):
            gamma_1 = 1.0 if block.gamma_1 is None else block.gamma_1
            gamma_2 = 1.0 if block.gamma_2 is None else block.gamma_2
            x = x + gamma_1 * record["out"]
            x = x + gamma_2 * block.mlp(block.norm2(x))
        else:
            assert isinstance(block, Block)
            x = x + block.ls1(record["out"])
            x = x + block.ls2(block.mlp(block.norm2(x)))
        records.append(record)
    logits = model.forward_head(model.norm(x))
    return {"logits": logits, "blocks": records, "grid_size": tuple(int(side) for side in grid)}


def explicit_daam(model, images, target=None, queries="class") -> Dict[str, object]:
    """Reference block maps and flow in float64; ``plain_flow`` from ``attn_plain``. With
    ``queries="all"``, from every query row (reference.maps_from_every_query_row)."""
    result, targets, gradients = explicit_gradients(explicit_forward, model, images, target)
    logits = result["logits"]
    grid, prefix = result["grid_size"], model.num_prefix_tokens
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


def prepare(model: nn.Module, seed: int = 0, sharpen: float = 4.0) -> nn.Module:
    """Seeded noise on the zero-initialised biases, and query / key / value weights scaled by
    ``sharpen``, so that the token layout and rotations matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") and not parameter.any():
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
        for module in model.modules():
            for name in ("qkv", "q_proj", "k_proj", "v_proj"):
                if isinstance(getattr(module, name, None), nn.Linear):
                    getattr(module, name).weight.mul_(sharpen)
    return model.eval()


SMALL = dict(
    patch_size=8,
    embed_dim=64,
    depth=3,
    num_heads=4,
    class_token=True,
    global_pool="token",
    pos_embed_grid_size=(4, 4),
)


def small_naflexvit(**kwargs) -> NaFlexVit:
    torch.manual_seed(0)
    return prepare(NaFlexVit(num_classes=NUM_CLASSES, **{**SMALL, **kwargs}))


MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, int]]] = {
    # Linear embedding of patchified images, learned position embedding resized to 4x6.
    "standard_registers_linear_embed": (
        lambda: small_naflexvit(reg_tokens=2, init_values=0.1),
        (32, 48),
    ),
    "standard_conv_factorized_qk_norm_scale_norm": (
        lambda: small_naflexvit(
            embed_proj_type="conv",
            pos_embed="factorized",
            qk_norm=True,
            scale_attn_inner_norm=True,
            pre_norm=True,
        ),
        (40, 32),
    ),
    "eva_axial_rope_swiglu": (
        lambda: small_naflexvit(
            attn_type="eva", rope_type="axial", swiglu_mlp=True, reg_tokens=1, init_values=0.1
        ),
        (32, 32),
    ),
    # (timm's mixed RoPE has one embedding per query head: it does not run with fewer kv heads.)
    "rope_mixed_gated": (
        lambda: small_naflexvit(
            attn_type="rope", rope_type="mixed", attn_gated=True, pos_embed="none"
        ),
        (32, 32),
    ),
    # Padded to the patch size: a 36x28 image gives a 5x4 grid. Grouped-query attention.
    "rope_dinov3_gqa_dynamic_pad_map_pool": (
        lambda: small_naflexvit(
            rope_type="dinov3",
            rope_rotate_half=True,
            qkv_fused=False,
            num_kv_heads=2,
            dynamic_img_pad=True,
            reg_tokens=4,
            global_pool="map",
        ),
        (36, 28),
    ),
    # The registered C-RADIOv3 configuration ([class] + 7 registers, a 128x128 position
    # embedding resized keeping the aspect ratio, no final norm), narrowed to 64 channels and
    # 3 blocks to keep the float64 reference quick.
    "naflexvit_base_patch16_radio_v3_narrow": (
        lambda: prepare(
            make_model(
                "naflexvit_base_patch16_radio_v3",
                num_classes=NUM_CLASSES,
                embed_dim=64,
                depth=3,
                num_heads=4,
            ),
            sharpen=2,
        ),
        (64, 48),
    ),
    # A registered ViT, all 12 blocks, built as a NaFlexVit.
    "vit_tiny_patch16_224_use_naflex": (
        lambda: prepare(
            make_model("vit_tiny_patch16_224", num_classes=NUM_CLASSES, use_naflex=True),
            sharpen=1,
        ),
        (64, 64),
    ),
}
SLOW = {"vit_tiny_patch16_224_use_naflex"}
CASES = [pytest.param(case, marks=pytest.mark.slow) if case in SLOW else case for case in MODELS]
BATCH = {"vit_tiny_patch16_224_use_naflex": 2}
# Models whose rotary embedding the "plain" attention leaves out.
ROTARY = {"eva_axial_rope_swiglu", "rope_mixed_gated", "rope_dinov3_gqa_dynamic_pad_map_pool"}


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


def case_images(case: str, image_size: Tuple[int, int]) -> Tensor:
    return make_images(BATCH.get(case, 3), *image_size)


def case_targets(case: str):
    return TARGETS[: BATCH.get(case, 3)]


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_explicit_reference_reproduces_the_models_logits(model_case, fused):
    case, model, image_size = model_case
    set_fused_attention(model, fused)
    images = case_images(case, image_size)
    with torch.no_grad():
        own = model(images)
        by_hand = explicit_forward(model, images)["logits"]
    assert_close_relative(by_hand, own, 1e-5)
    assert_close_relative(cached_reference(case, model, images, None)["logits"], own, 1e-5)


@pytest.mark.parametrize(
    "target,fused",
    [("targets", True), ("targets", False), (None, True)],
    ids=["targets-fused", "targets-unfused", "predicted-fused"],
)
def test_flow_and_block_maps_equal_explicit_reference(model_case, target, fused):
    case, model, image_size = model_case
    set_fused_attention(model, fused)
    images = case_images(case, image_size)
    target = None if target is None else case_targets(case)
    expected = cached_reference(case, model, images, target)
    flow = assert_attributions_match(make_daam(model), images, target, expected)
    assert flow.shape == (images.shape[0], len(model.blocks), *expected["grid_size"])
    assert float(expected["flow"][:, -1].amax()) > 0  # not a vacuous comparison of zeros
    if target is None:
        assert expected["targets"].tolist() == model(images).argmax(1).tolist()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_full_attention_of_every_block_equals_the_explicit_attention(model_case, fused):
    case, model, image_size = model_case
    set_fused_attention(model, fused)
    images = case_images(case, image_size)
    expected = cached_reference(case, model, images, case_targets(case))["blocks"]
    adapter = adapter_for(model)
    with adapter.record(adapter.attention_modules(), full=True) as records, torch.no_grad():
        model(images)
    for record, reference in zip(records, expected):
        attention = record.attention()
        assert attention.shape == reference["attn"].shape
        assert_close_relative(attention, reference["attn"], 1e-5)
        assert_close_relative(record.class_attention, reference["attn"][:, :, 0], 1e-5)


def test_grid_and_prefix_tokens_follow_the_token_layout(model_case):
    """[class] and registers first, then the patches: (H / p, W / p), rounded up when padded."""
    case, model, image_size = model_case
    adapter = adapter_for(model)
    patch_h, patch_w = model.embeds.patch_size
    rounding = math.ceil if model.embeds.dynamic_img_pad else math.floor
    grid = (rounding(image_size[0] / patch_h), rounding(image_size[1] / patch_w))
    assert adapter.grid_size(image_size) == grid
    assert adapter.num_prefix_tokens == 1 + model.num_reg_tokens
    with torch.no_grad():
        tokens, _ = model.embeds(case_images(case, image_size))
    assert tokens.shape[1] == adapter.num_prefix_tokens + grid[0] * grid[1]
    assert torch.equal(tokens[0, 0], model.embeds.cls_token[0, 0])  # [class] first, no pos


def test_rotation_is_in_the_class_row_and_changes_the_maps():
    for case in sorted(ROTARY):
        build, image_size = MODELS[case]
        model = build()
        images = case_images(case, image_size)
        expected = explicit_daam(model, images, target=TARGETS)
        for record in expected["blocks"]:
            class_row = record["attn"].detach()[:, :, 0]
            plain_row = record["attn_plain"].detach()[:, :, 0]
            assert float((class_row - plain_row).abs().amax()) > 1e-3 * float(class_row.amax())
        flow = make_daam(model).attribute(images, target=TARGETS, return_flow=True)
        assert_close_relative(flow, expected["flow"])
        with pytest.raises(AssertionError, match="max abs error"):
            assert_close_relative(flow, expected["plain_flow"], 1e-3)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize(
    "case",
    ["standard_registers_linear_embed", "rope_mixed_gated", "rope_dinov3_gqa_dynamic_pad_map_pool"],
)
def test_contributions_sum_to_the_modules_own_class_output(case, fused):
    """Sum over tokens of F, through the module's norm, gate and projection, is its [class]
    output."""
    build, image_size = MODELS[case]
    model = set_fused_attention(build(), fused)
    images = make_images(2, *image_size)
    inputs = []
    handles = [
        block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        for block in model.blocks
    ]
    adapter = adapter_for(model)
    try:
        records, outputs = record_with_module_outputs(
            adapter, [block.attn for block in model.blocks], lambda: model(images)
        )
    finally:
        for handle in handles:
            handle.remove()
    for block, record, output, z in zip(model.blocks, records, outputs, inputs):
        contributions = class_token_contributions(record.class_attention, record.values)
        attention = block.attn
        with torch.no_grad():
            reproduced = attention.norm(contributions.sum(dim=1))
            if attention.gate is not None:
                reproduced = reproduced * attention.gate(z[:, 0]).sigmoid()
            reproduced = attention.proj(reproduced)
        assert_close_relative(reproduced, output[:, 0], 1e-5)


def test_daam_picks_the_naflexvit_adapter():
    model = MODELS["standard_registers_linear_embed"][0]()
    daam = DAAM(model)
    assert isinstance(daam.adapter, TimmNaFlexVitAdapter)
    assert daam.layer == [block.attn for block in model.blocks]
    assert daam.adapter.num_prefix_tokens == 3
    assert daam.adapter.in_channels == 3


def test_image_size_not_divisible_by_the_patch_is_refused_before_the_forward_pass():
    model = MODELS["standard_registers_linear_embed"][0]()
    ran = []
    handle = model.embeds.register_forward_pre_hook(lambda *args: ran.append(True))
    try:
        with pytest.raises(
            ValueError, match="divisible by the patch size 8x8, got 36x32.*dynamic_img_pad=True"
        ):
            DAAM(model).attribute(make_images(1, 36, 32), target=0)
    finally:
        handle.remove()
    assert not ran


def test_patch_inputs_are_refused_with_a_message():
    """NaFlex patch tensors and dictionaries are not image tensors of one grid."""
    model = MODELS["standard_registers_linear_embed"][0]()
    patches = torch.randn(2, 24, 8 * 8 * 3)
    with pytest.raises(ValueError, match="Expected images shaped \\(B, 3, H, W\\), got \\(2, 24"):
        DAAM(model).attribute(patches, target=0)
    with pytest.raises(TypeError, match="Expected inputs to be a Tensor, got dict"):
        DAAM(model).attribute({"patches": patches}, target=0)


def test_layer_restricts_the_flow_to_those_blocks_in_block_order():
    model = MODELS["eva_axial_rope_swiglu"][0]()
    images = make_images(3, 32, 32, seed=2)
    expected = explicit_daam(model, images, target=TARGETS)
    chosen = DAAM(model, layer=[model.blocks[2].attn, model.blocks[0].attn])
    maps = chosen.attribute(images, target=TARGETS, return_flow=True, accumulate=False)
    assert maps.shape == (3, 2, 4, 4)
    assert_close_relative(maps, expected["block_maps"][:, [0, 2]])


def test_gradient_checkpointing_gives_the_same_maps():
    model = MODELS["rope_mixed_gated"][0]()
    images = make_images(3, 32, 32)
    plain = DAAM(model).attribute(images, target=TARGETS, return_flow=True)
    model.set_grad_checkpointing(True)
    checkpointed = DAAM(model).attribute(images, target=TARGETS, return_flow=True)
    assert_close_relative(checkpointed, plain, 1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_naflexvit_without_class_token_is_explained_by_every_row(target, fused):
    """The naflexvit_base_patch16_gap layout: a register, no [class] token, average pooling."""
    model = small_naflexvit(class_token=False, global_pool="avg", reg_tokens=1)
    set_fused_attention(model, fused)
    assert model.embeds.cls_token is None
    images = make_images(3, 32, 48)
    expected = explicit_daam(model, images, target=target, queries="all")
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images), 1e-5)
    flow = DAAM(model).attribute(images, target=target, return_flow=True)
    assert flow.shape == (3, 3, 4, 6)
    assert_close_relative(flow, expected["flow"])


def test_foreign_attention_module_is_refused():
    model = MODELS["standard_registers_linear_embed"][0]()
    model.blocks[1].attn = nn.MultiheadAttention(64, 4)
    with pytest.raises(
        TypeError,
        match=(
            "Block 1 of NaFlexVit.blocks uses MultiheadAttention .*supports "
            "timm.layers.attention.Attention or timm.models.eva.EvaAttention or "
            "timm.layers.attention.AttentionRope"
        ),
    ):
        DAAM(model)


def test_every_registered_naflexvit_model_is_taken_by_the_naflexvit_adapter():
    """Every registered NaFlexVit model, built on the meta device: the NaFlexVit adapter takes
    it and says truly whether it has a [class] token."""
    explained, without_class_token = [], []
    for name in timm.list_models(module="naflexvit"):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        adapter = adapter_for(model)
        assert isinstance(adapter, TimmNaFlexVitAdapter), name
        assert adapter.has_class_token == (model.embeds.cls_token is not None), name
        (explained if adapter.has_class_token else without_class_token).append(name)
    assert sorted(explained) == sorted(timm.list_models("naflexvit_*_radio_*"))
    assert "naflexvit_base_patch16_siglip" in without_class_token and len(explained) == 6
