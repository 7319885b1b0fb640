"""DAAM on timm Eva with ``AttentionRope`` (attn_type='rope') equals an explicit reference.

The reference re-runs each model by hand in float64 on a deep copy: the patch embedding and
the model's own ``_pos_embed`` (which prepends the [class] and register tokens and gives the
rotary embedding), then every block through its own norms, MLP and layer scales, with the
attention written out as a full (B, H, N, N) matrix softmax(q k^T / sqrt(d) + mask) from the
projections' outputs: q / k norms, the rotary embedding applied by hand to the non-prefix
queries and keys (interleaved or rotate-half pairs), and grouped-query attention by indexing
each query head's key / value head. No attention module's forward, no
scaled_dot_product_attention, no hooks. Gradients come from plain autograd at each block's
head-concatenated output, and the maps from ``reference.maps_from_explicit_blocks``.

timm initialises the q / k / v biases to zero and its small random weights make the
attention almost uniform: the models here get seeded noise on zero biases and larger query /
key weights, so that a missing rotation or a wrong head grouping shows in the maps.
"""

import warnings
from typing import Callable, Dict, Optional, Tuple

import pytest
import timm
import timm.models.eva
import torch
from timm.layers import Attention as TimmAttention
from timm.layers.attention import AttentionRope
from timm.models.eva import Eva, EvaBlockPostNorm
from torch import Tensor, nn

from captum_daam import DAAM, class_token_contributions
from captum_daam.adapters import adapter_for
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


def explicit_rope_attention(
    attention: AttentionRope, z: Tensor, rope: Optional[Tensor], mask_bias: Optional[Tensor]
) -> Dict[str, Tensor]:
    """One ``AttentionRope`` by hand; ``attn_plain`` uses keys without the rotary embedding."""
    batch, tokens, _ = z.shape
    heads, kv_heads, width = attention.num_heads, attention.num_kv_heads, attention.head_dim
    if attention.qkv is not None:
        qkv = attention.qkv(z).reshape(batch, tokens, 3, heads, width)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
    else:
        q = attention.q_proj(z).reshape(batch, tokens, heads, width).transpose(1, 2)
        k = attention.k_proj(z).reshape(batch, tokens, kv_heads, width).transpose(1, 2)
        v = attention.v_proj(z).reshape(batch, tokens, kv_heads, width).transpose(1, 2)
    q, k = attention.q_norm(q), attention.k_norm(k)
    plain_k = k
    if rope is not None:
        prefix = attention.num_prefix_tokens
        half = attention.rotate_half

        def rotate(t: Tensor) -> Tensor:
            return torch.cat([t[:, :, :prefix], rotate_by_hand(t[:, :, prefix:], rope, half)], 2)

        q, k = rotate(q), rotate(k)
    # Grouped-query attention: query head h reads key / value head h // (heads / kv_heads).
    shared = torch.arange(heads) // (heads // kv_heads)
    k, v, plain_k = k[:, shared], v[:, shared], plain_k[:, shared]
    scale = width**-0.5
    logits = q @ k.transpose(-2, -1) * scale
    plain_logits = q @ plain_k.transpose(-2, -1) * scale
    if mask_bias is not None:
        logits, plain_logits = logits + mask_bias, plain_logits + mask_bias
    probabilities = logits.softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, tokens, heads * width)
    y = attention.norm(pre_projection)
    if attention.gate is not None:
        y = y * attention.gate(z).sigmoid()
    out = attention.proj(y)
    return dict(
        attn=probabilities,
        attn_plain=plain_logits.softmax(dim=-1),
        v=v,
        pre_projection=pre_projection,
        out=out,
    )


def explicit_forward(model: Eva, images: Tensor, attn_mask=None) -> Dict[str, object]:
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
            record = explicit_rope_attention(block.attn, x, block_rope, mask_bias)
            x = x + block.norm1(record["out"])
            x = x + block.norm2(block.mlp(x))
        else:
            record = explicit_rope_attention(block.attn, block.norm1(x), block_rope, mask_bias)
            gamma_1 = 1.0 if block.gamma_1 is None else block.gamma_1
            gamma_2 = 1.0 if block.gamma_2 is None else block.gamma_2
            x = x + gamma_1 * record["out"]
            x = x + gamma_2 * block.mlp(block.norm2(x))
        records.append(record)
    return {"logits": model.forward_head(model.norm(x)), "blocks": records}


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


def prepare(model: nn.Module, seed: int = 0, sharpen: float = 8.0) -> nn.Module:
    """Seeded noise on the zero-initialised biases, and query / key / value weights scaled by
    ``sharpen``, so that rotations and head groupings matter."""
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


SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4)
SMALL_SIZE = (32, 32)
ROPE = dict(attn_type="rope", use_rot_pos_emb=True)
TOKEN = dict(global_pool="token")


def small_rope_eva(**kwargs) -> Eva:
    torch.manual_seed(0)
    return prepare(Eva(**{**SMALL, "num_classes": NUM_CLASSES, **ROPE, **kwargs}))


def gated_rope_eva() -> Eva:
    """AttentionRope with its sigmoid output gate (Eva does not pass gated to its blocks)."""
    torch.manual_seed(0)
    model = Eva(**{**SMALL, "num_classes": NUM_CLASSES, **ROPE, **TOKEN, "init_values": 0.1})
    for block in model.blocks:
        block.attn = AttentionRope(64, num_heads=4, num_prefix_tokens=1, gated=True)
        for linear in (block.attn.qkv, block.attn.gate, block.attn.proj):
            nn.init.trunc_normal_(linear.weight, std=0.02)  # timm's initialisation
    return prepare(model)


MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, int]]] = {
    "rope_cat": (
        lambda: small_rope_eva(use_abs_pos_emb=False, init_values=0.1, **TOKEN),
        SMALL_SIZE,
    ),
    # Grouped-query attention with a per-block number of key / value heads (as Sapiens2).
    "rope_gqa_separate_qkv_qk_norm_scale_norm": (
        lambda: small_rope_eva(
            qkv_fused=False,
            num_kv_heads=(2, 1, 4),
            qk_norm=True,
            scale_attn_inner=True,
            swiglu_mlp=True,
            init_values=0.1,
            attn_only_layer_scale=True,
            **TOKEN,
        ),
        SMALL_SIZE,
    ),
    "rope_mixed_registers_no_qkv_bias": (
        lambda: small_rope_eva(
            rope_type="mixed", num_reg_tokens=2, no_embed_class=True, qkv_bias=False, **TOKEN
        ),
        SMALL_SIZE,
    ),
    "rope_gated": (gated_rope_eva, SMALL_SIZE),
    "rope_post_norm_avg": (lambda: small_rope_eva(use_post_norm=True), SMALL_SIZE),
    # Perception Encoder's layout: pre-transformer norm, attention pooling (DAAM warns).
    "rope_pe_map_pool": (
        lambda: small_rope_eva(
            use_pre_transformer_norm=True,
            global_pool="map",
            rope_grid_offset=1.0,
            rope_grid_indexing="xy",
            ref_feat_shape=(4, 4),
        ),
        SMALL_SIZE,
    ),
    "rope_dinov3_dynamic_non_square": (
        lambda: small_rope_eva(
            rope_type="dinov3",
            rope_rotate_half=True,
            dynamic_img_size=True,
            num_reg_tokens=4,
            use_abs_pos_emb=False,
            qk_norm=True,
            **TOKEN,
        ),
        (48, 24),
    ),
    # The registered model, all 12 blocks, built for 96x96 images to keep the reference quick.
    "vit_small_patch16_rope_224": (
        lambda: prepare(
            make_model("vit_small_patch16_rope_224", num_classes=NUM_CLASSES, img_size=96),
            sharpen=1,
        ),
        (96, 96),
    ),
}
SLOW = {"vit_small_patch16_rope_224"}
CASES = [pytest.param(case, marks=pytest.mark.slow) if case in SLOW else case for case in MODELS]
BATCH = {"vit_small_patch16_rope_224": 2}


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


def test_rotation_is_in_the_class_row_and_changes_the_maps(model_case):
    """The rotation of the patch keys changes the [class] row, and maps made without it
    differ from DAAM's: a missing rotation would show."""
    case, model, image_size = model_case
    images = case_images(case, image_size)
    target = case_targets(case)
    expected = cached_reference(case, model, images, target)
    for record in expected["blocks"]:
        class_row = record["attn"].detach()[:, :, 0]
        plain_row = record["attn_plain"].detach()[:, :, 0]
        assert float((class_row - plain_row).abs().amax()) > 1e-3 * float(class_row.amax())
    flow = make_daam(model).attribute(images, target=target, return_flow=True)
    assert_close_relative(flow, expected["flow"])
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_relative(flow, expected["plain_flow"], 1e-3)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", ["rope_gqa_separate_qkv_qk_norm_scale_norm", "rope_gated"])
def test_contributions_sum_to_the_modules_own_class_output(case, fused):
    """Sum over tokens of F, through the module's norm, gate and projection, is its [class]
    output, also with grouped-query attention."""
    model = set_fused_attention(MODELS[case][0](), fused)
    images = make_images(2, *SMALL_SIZE)
    inputs = []
    handles = [
        block.attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        for block in model.blocks
    ]
    try:
        records, outputs = record_with_module_outputs(
            adapter_for(model), [block.attn for block in model.blocks], lambda: model(images)
        )
    finally:
        for handle in handles:
            handle.remove()
    for block, record, output, z in zip(model.blocks, records, outputs, inputs):
        contributions = class_token_contributions(record.class_attention, record.values)
        assert contributions.shape == (2, 1 + 16, 64)
        attention = block.attn
        with torch.no_grad():
            reproduced = attention.norm(contributions.sum(dim=1))
            if attention.gate is not None:
                reproduced = reproduced * attention.gate(z[:, 0]).sigmoid()
            reproduced = attention.proj(reproduced)
        assert_close_relative(reproduced, output[:, 0], 1e-5)


def test_daam_picks_the_eva_adapter_for_rope_attention():
    model = MODELS["rope_cat"][0]()
    assert isinstance(DAAM(model).adapter, TimmEvaAdapter)
    assert DAAM(model).layer == [block.attn for block in model.blocks]
    registers = MODELS["rope_mixed_registers_no_qkv_bias"][0]()
    assert adapter_for(registers).num_prefix_tokens == 3


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_attention_mask_passed_through_additional_forward_args(fused):
    model = set_fused_attention(MODELS["rope_gqa_separate_qkv_qk_norm_scale_norm"][0](), fused)
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


def test_layer_restricts_the_flow_to_those_blocks_in_block_order():
    model = MODELS["rope_gqa_separate_qkv_qk_norm_scale_norm"][0]()
    images = make_images(3, *SMALL_SIZE, seed=2)
    expected = explicit_daam(model, images, target=TARGETS)
    chosen = DAAM(model, layer=[model.blocks[2].attn, model.blocks[1].attn])
    maps = chosen.attribute(images, target=TARGETS, return_flow=True, accumulate=False)
    assert maps.shape == (3, 2, 4, 4)
    assert_close_relative(maps, expected["block_maps"][:, 1:])


def test_gradient_checkpointing_gives_the_same_maps():
    model = MODELS["rope_mixed_registers_no_qkv_bias"][0]()
    images = make_images(2, *SMALL_SIZE)
    plain = DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    model.set_grad_checkpointing(True)
    checkpointed = DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    assert_close_relative(checkpointed, plain, 1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_rope_eva_without_class_token_is_explained_by_every_row(target, fused):
    """The vit_*_rope_reg*_gap layout: registers first, no [class] token, the head averages
    the patch tokens. Every row of every block, the registers unrotated and off the grid."""
    torch.manual_seed(0)
    model = prepare(
        Eva(**SMALL, num_classes=NUM_CLASSES, **ROPE, class_token=False, num_reg_tokens=2)
    )
    set_fused_attention(model, fused)
    assert model.cls_token is None and model.global_pool == "avg"
    images = make_images(3, *SMALL_SIZE)
    expected = explicit_daam(model, images, target=target, queries="all")
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images), 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow = DAAM(model).attribute(images, target=target, return_flow=True)
    assert_close_relative(flow, expected["flow"])
    assert float(expected["block_maps"][:, -1].amax()) > 0


def test_foreign_attention_module_in_a_rope_eva_is_refused():
    model = MODELS["rope_cat"][0]()
    model.blocks[1].attn = TimmAttention(64, num_heads=4)
    with pytest.raises(
        TypeError,
        match=(
            "Block 1 of Eva.blocks uses Attention .*supports timm.models.eva.EvaAttention or "
            "timm.layers.attention.AttentionRope"
        ),
    ):
        DAAM(model)


def test_every_registered_rope_attention_model_is_taken_by_the_eva_adapter(monkeypatch):
    """Every registered Eva model with AttentionRope blocks, built on the meta device: the EVA
    adapter takes it, and says truly whether it has a [class] token."""
    # Random initialisation is meaningless on the meta device and slow there; skip it.
    monkeypatch.setattr(timm.models.eva, "trunc_normal_", lambda tensor, *args, **kwargs: tensor)
    explained, without_class_token = [], []
    for name in timm.list_models(module="eva"):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        if not any(isinstance(block.attn, AttentionRope) for block in model.blocks):
            continue
        assert all(isinstance(block.attn, AttentionRope) for block in model.blocks), name
        adapter = adapter_for(model)
        assert isinstance(adapter, TimmEvaAdapter), name
        assert adapter.has_class_token == (model.cls_token is not None), name
        (explained if adapter.has_class_token else without_class_token).append(name)
    assert "vit_small_patch16_rope_224" in explained and "vit_base_patch16_sapiens2" in explained
    assert "vit_pe_core_tiny_patch16_384" in explained
    assert "vit_pe_core_gigantic_patch14_448" in without_class_token
    assert len(explained) >= 25
