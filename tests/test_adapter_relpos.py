"""DAAM on timm VisionTransformerRelPos with a [class] token equals an explicit reference.

The reference re-runs each model by hand in float64 on a deep copy: the patch embedding and
[class] token, then every block (pre-norm ``RelPosBlock`` or residual post-norm
``ResPostRelPosBlock``) through its own norms, MLP and layer scales, with the attention
written out as a full (B, H, N, N) matrix softmax(q k^T / sqrt(d) + bias) from ``qkv`` and the
q / k norms. The relative position bias is formed by hand: the relative position index of
every pair of patches (with BEiT's three extra entries for [class] to patch, patch to [class]
and [class] to [class]) looked up in ``RelPosBias``'s table, or ``RelPosMlp``'s MLP applied
to log-spaced relative coordinates computed here, padded with zeros for the [class] token.
No attention module's forward, no ``get_bias()``, no scaled_dot_product_attention, no hooks.
Gradients come from plain autograd at each block's head-concatenated output, and the maps
from ``reference.maps_from_explicit_blocks``.

timm initialises the q / k / v biases to zero, its position tables and MLP small, and its
small random weights make the attention almost uniform: the models here get seeded noise on
those, and larger query / key weights, so that a missing bias shows in the maps.
"""

import math
from typing import Callable, Dict, Optional, Tuple

import pytest
import timm
import torch
from timm.layers import Attention as TimmAttention
from timm.layers import RelPosBias, RelPosMlp
from timm.models.vision_transformer_relpos import ResPostRelPosBlock, VisionTransformerRelPos
from torch import Tensor, nn

from captum_daam import DAAM, class_token_contributions
from captum_daam.adapters import adapter_for
from captum_daam.adapters.timm_relpos import TimmRelPosAdapter
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


def pair_offsets(grid: Tuple[int, int]) -> Tensor:
    """(P, P, 2): (dy, dx) from patch j to patch i, patches row-major over the grid."""
    rows, columns = grid
    coordinates = torch.tensor([(y, x) for y in range(rows) for x in range(columns)])
    return coordinates[:, None, :] - coordinates[None, :, :]


def table_bias_by_hand(module: RelPosBias, grid: Tuple[int, int], prefix: int) -> Tensor:
    """RelPosBias: (H, N, N) with table row (dy + gh - 1) * (2 gw - 1) + (dx + gw - 1) for a
    pair of patches and, with a [class] token, the last three rows of the table for [class]
    to patch, patch to [class] and [class] to [class]."""
    rows, columns = grid
    offsets = pair_offsets(grid)
    index = (offsets[..., 0] + rows - 1) * (2 * columns - 1) + offsets[..., 1] + columns - 1
    if prefix:
        distances = (2 * rows - 1) * (2 * columns - 1)
        index = nn.functional.pad(index, (1, 0, 1, 0))
        index[0, :] = distances
        index[:, 0] = distances + 1
        index[0, 0] = distances + 2
    return module.relative_position_bias_table[index].permute(2, 0, 1)


def mlp_bias_by_hand(module: RelPosMlp, grid: Tuple[int, int], prefix: int) -> Tensor:
    """RelPosMlp: its MLP on log-spaced (dy, dx) of every pair of patches, (H, P, P); 'swin'
    mode squashes it to 16 * sigmoid; zero rows and columns for the [class] token."""
    rows, columns = grid
    offsets = pair_offsets(grid).to(torch.float64)
    if module.mode == "swin":
        offsets = offsets / torch.tensor([rows - 1, columns - 1], dtype=torch.float64) * 8
        coordinates = torch.sign(offsets) * torch.log2(1 + offsets.abs()) / math.log2(8)
    else:
        coordinates = torch.sign(offsets) * torch.log(1 + offsets.abs())
    bias = module.mlp(coordinates.to(module.mlp.fc1.weight.dtype)).permute(2, 0, 1)
    if module.mode == "swin":
        bias = 16 * torch.sigmoid(bias)
    return nn.functional.pad(bias, (prefix, 0, prefix, 0))


def relative_position_bias_by_hand(
    module: Optional[nn.Module], grid: Tuple[int, int], prefix: int
) -> Optional[Tensor]:
    if module is None:
        return None
    if isinstance(module, RelPosBias):
        return table_bias_by_hand(module, grid, prefix)
    return mlp_bias_by_hand(module, grid, prefix)


def explicit_relpos_attention(
    attention: nn.Module, z: Tensor, bias: Optional[Tensor]
) -> Dict[str, Tensor]:
    """One ``RelPosAttention`` by hand; ``attn_plain`` is the attention without the bias."""
    batch, tokens, channels = z.shape
    heads = attention.num_heads
    width = channels // heads
    q, k, v = attention.qkv(z).reshape(batch, tokens, 3, heads, width).permute(2, 0, 3, 1, 4)
    q, k = attention.q_norm(q), attention.k_norm(k)
    logits = q @ k.transpose(-2, -1) * width**-0.5
    probabilities = (logits if bias is None else logits + bias).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, tokens, channels)
    return dict(
        attn=probabilities,
        attn_plain=logits.softmax(dim=-1),
        v=v,
        pre_projection=pre_projection,
        out=attention.proj(pre_projection),
    )


def explicit_forward(model: VisionTransformerRelPos, images: Tensor) -> Dict[str, object]:
    grid = tuple(model.patch_embed.grid_size)
    prefix = model.num_prefix_tokens
    x = model.patch_embed(images)
    if model.cls_token is not None:
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    shared_bias = relative_position_bias_by_hand(model.shared_rel_pos, grid, prefix)
    records = []
    for block in model.blocks:
        own_bias = relative_position_bias_by_hand(block.attn.rel_pos, grid, prefix)
        bias = own_bias if own_bias is not None else shared_bias
        if isinstance(block, ResPostRelPosBlock):
            record = explicit_relpos_attention(block.attn, x, bias)
            x = x + block.norm1(record["out"])
            x = x + block.norm2(block.mlp(x))
        else:
            record = explicit_relpos_attention(block.attn, block.norm1(x), bias)
            x = x + block.ls1(record["out"])
            x = x + block.ls2(block.mlp(block.norm2(x)))
        record["bias"] = bias
        records.append(record)
    return {"logits": model.forward_head(model.norm(x)), "blocks": records, "grid_size": grid}


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


def prepare(model: nn.Module, seed: int = 0, sharpen: float = 3.0) -> nn.Module:
    """Seeded noise on the zero-initialised biases, the relative position tables and MLPs,
    and query / key / value weights scaled by ``sharpen``, so that the biases matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "relative_position_bias_table" in name:
                parameter.add_(2.0 * noise)
            elif "rel_pos.mlp" in name:
                parameter.add_(0.5 * noise)
            elif name.endswith("bias") and not parameter.any():
                parameter.add_(0.5 * noise)
        for module in model.modules():
            if isinstance(getattr(module, "qkv", None), nn.Linear):
                module.qkv.weight.mul_(sharpen)
    return model.eval()


SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, class_token=True)
SMALL_SIZE = (32, 32)
TOKEN = dict(global_pool="token")


def small_relpos(**kwargs) -> VisionTransformerRelPos:
    torch.manual_seed(0)
    return prepare(VisionTransformerRelPos(**{**SMALL, "num_classes": NUM_CLASSES, **kwargs}))


MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, int]]] = {
    "table_bias": (lambda: small_relpos(rel_pos_type="bias", **TOKEN), SMALL_SIZE),
    "mlp_bias_qk_norm_fc_norm": (
        lambda: small_relpos(rel_pos_type="mlp", qk_norm=True, fc_norm=True, **TOKEN),
        SMALL_SIZE,
    ),
    "swin_mlp_bias_non_square": (
        lambda: small_relpos(rel_pos_type="mlp_swin", img_size=(32, 48), **TOKEN),
        (32, 48),
    ),
    "shared_table_bias_no_qkv_bias": (
        lambda: small_relpos(rel_pos_type="bias", shared_rel_pos=True, qkv_bias=False, **TOKEN),
        SMALL_SIZE,
    ),
    # As vit_relpos_base_patch16_clsgap_224: average pooling with a [class] token (DAAM warns).
    "table_bias_clsgap_post_norm": (
        lambda: small_relpos(rel_pos_type="bias", block_fn=ResPostRelPosBlock, init_values=0.5),
        SMALL_SIZE,
    ),
    # The registered model, all 12 blocks, built for 96x96 images to keep the reference quick.
    "vit_relpos_medium_patch16_cls_224": (
        lambda: prepare(
            make_model("vit_relpos_medium_patch16_cls_224", num_classes=NUM_CLASSES, img_size=96),
            sharpen=1,
        ),
        (96, 96),
    ),
}
SLOW = {"vit_relpos_medium_patch16_cls_224"}
CASES = [pytest.param(case, marks=pytest.mark.slow) if case in SLOW else case for case in MODELS]
BATCH = {"vit_relpos_medium_patch16_cls_224": 2}


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


def relative_position_modules(model):
    return [model.shared_rel_pos] + [block.attn.rel_pos for block in model.blocks]


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


def test_hand_made_relative_position_bias_equals_timms():
    """The reference's bias lookup agrees with timm's own (checked once, here only)."""
    for case in MODELS:
        if case in SLOW:
            continue
        model = MODELS[case][0]()
        grid = tuple(model.patch_embed.grid_size)
        for module in relative_position_modules(model):
            if module is not None:
                with torch.no_grad():
                    by_hand = relative_position_bias_by_hand(module, grid, 1)
                    assert_close_relative(by_hand.unsqueeze(0), module.get_bias(), 1e-6)


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


def test_relative_position_bias_is_in_the_attention_and_changes_the_maps(model_case):
    """The bias changes the attention: the [class] row with a table (learned [class] entries),
    and then maps made without it differ from DAAM's, so a missing bias would show; with an
    MLP only the patch rows (its [class] row is zero padding), and then the [class] row, and
    so the maps, are those without the bias."""
    case, model, image_size = model_case
    images = case_images(case, image_size)
    target = case_targets(case)
    expected = cached_reference(case, model, images, target)
    zero_class_rows = []
    for record in expected["blocks"]:
        attention, plain = record["attn"].detach(), record["attn_plain"].detach()
        class_change = float((attention[:, :, 0] - plain[:, :, 0]).abs().amax())
        zero_class_rows.append(bool((record["bias"][..., 0, :] == 0).all()))
        if zero_class_rows[-1]:
            assert class_change == 0
            assert float((attention - plain).abs().amax()) > 1e-2
        else:
            assert class_change > 1e-2 * float(attention[:, :, 0].amax())
    relative_position = model.shared_rel_pos or model.blocks[0].attn.rel_pos
    assert all(zero_class_rows) == isinstance(relative_position, RelPosMlp)
    flow = make_daam(model).attribute(images, target=target, return_flow=True)
    assert_close_relative(flow, expected["flow"])
    if all(zero_class_rows):
        assert_close_relative(flow, expected["plain_flow"])
    else:
        with pytest.raises(AssertionError, match="max abs error"):
            assert_close_relative(flow, expected["plain_flow"], 1e-2)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", ["table_bias", "shared_table_bias_no_qkv_bias"])
def test_contributions_sum_to_the_modules_own_class_output(case, fused):
    """Sum over tokens of F, through the module's projection, is its [class] output."""
    model = set_fused_attention(MODELS[case][0](), fused)
    images = make_images(2, *SMALL_SIZE)
    records, outputs = record_with_module_outputs(
        adapter_for(model), [block.attn for block in model.blocks], lambda: model(images)
    )
    for block, record, output in zip(model.blocks, records, outputs):
        contributions = class_token_contributions(record.class_attention, record.values)
        assert contributions.shape == (2, 1 + 16, 64)
        with torch.no_grad():
            reproduced = block.attn.proj(contributions.sum(dim=1))
        assert_close_relative(reproduced, output[:, 0], 1e-5)


def test_daam_picks_the_relpos_adapter():
    model = MODELS["table_bias"][0]()
    daam = DAAM(model)
    assert isinstance(daam.adapter, TimmRelPosAdapter)
    assert daam.layer == [block.attn for block in model.blocks]
    assert daam.adapter.num_prefix_tokens == 1


def test_average_pooling_with_a_class_token_warns_and_gives_a_zero_last_block_map():
    model = MODELS["table_bias_clsgap_post_norm"][0]()
    assert model.global_pool == "avg"
    images = make_images(3, *SMALL_SIZE)
    maps = make_daam(model).attribute(images, target=TARGETS, return_flow=True, accumulate=False)
    assert float(maps[:, -1].abs().amax()) == 0
    assert float(maps[:, 0].amax()) > 0


def test_layer_restricts_the_flow_to_those_blocks_in_block_order():
    model = MODELS["table_bias"][0]()
    images = make_images(3, *SMALL_SIZE, seed=2)
    expected = explicit_daam(model, images, target=TARGETS)
    chosen = DAAM(model, layer=[model.blocks[2].attn, model.blocks[0].attn])
    maps = chosen.attribute(images, target=TARGETS, return_flow=True, accumulate=False)
    assert maps.shape == (3, 2, 4, 4)
    assert_close_relative(maps, expected["block_maps"][:, [0, 2]])


def test_wrong_image_size_is_refused_before_the_forward_pass():
    model = MODELS["table_bias"][0]()
    ran = []
    handle = model.patch_embed.register_forward_pre_hook(lambda *args: ran.append(True))
    try:
        with pytest.raises(ValueError, match="takes 32x32 images .* got 48x32.*set_input_size"):
            DAAM(model).attribute(make_images(1, 48, 32), target=0)
    finally:
        handle.remove()
    assert not ran


def test_gradient_checkpointing_gives_the_same_maps():
    model = MODELS["shared_table_bias_no_qkv_bias"][0]()
    images = make_images(2, *SMALL_SIZE)
    plain = DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    model.set_grad_checkpointing(True)
    checkpointed = DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    assert_close_relative(checkpointed, plain, 1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_relpos_model_without_class_token_is_explained_by_every_row(target, fused):
    """The layout of most relpos models (vit_relpos_*_224, *_rpn_*): no [class] token, the
    head averages the tokens; the relative position bias is in every row."""
    torch.manual_seed(0)
    model = prepare(
        VisionTransformerRelPos(
            **{**SMALL, "class_token": False}, global_pool="avg", num_classes=NUM_CLASSES
        )
    )
    set_fused_attention(model, fused)
    assert model.cls_token is None and model.num_prefix_tokens == 0
    images = make_images(3, *SMALL_SIZE)
    expected = explicit_daam(model, images, target=target, queries="all")
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images), 1e-5)
    flow = DAAM(model).attribute(images, target=target, return_flow=True)
    assert_close_relative(flow, expected["flow"])
    plain = DAAM(model).attribute(images, target=target, return_flow=True)
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_relative(plain, expected["plain_flow"], 1e-2)  # the bias matters


class OffsetBias(nn.Module):
    """A relative position module of another kind: its forward is not attn + get_bias()."""

    def get_bias(self) -> Tensor:
        return torch.zeros(1)

    def forward(self, attn: Tensor, shared_rel_pos: Optional[Tensor] = None) -> Tensor:
        return attn * 2


def test_unknown_relative_position_module_is_refused_before_any_work():
    model = MODELS["table_bias"][0]()
    model.blocks[1].attn.rel_pos = OffsetBias()
    ran = []
    handle = model.patch_embed.register_forward_pre_hook(lambda *args: ran.append(True))
    try:
        with pytest.raises(
            TypeError,
            match=(
                "Block 1 of VisionTransformerRelPos.blocks adds a relative position bias from "
                "OffsetBias; .* reads the bias of timm.layers.pos_embed_rel.RelPosBias or "
                "timm.layers.pos_embed_rel.RelPosMlp"
            ),
        ):
            DAAM(model)
    finally:
        handle.remove()
    assert not ran


def test_foreign_attention_module_is_refused():
    model = MODELS["table_bias"][0]()
    model.blocks[2].attn = TimmAttention(64, num_heads=4)
    with pytest.raises(
        TypeError,
        match="Block 2 of VisionTransformerRelPos.blocks uses Attention .*RelPosAttention",
    ):
        DAAM(model)


def test_every_registered_relpos_model_is_taken_by_the_relpos_adapter():
    """Every registered relpos model, built on the meta device: the relpos adapter takes it and
    says truly whether it has a [class] token."""
    with_class_token, without = [], []
    for name in timm.list_models(module="vision_transformer_relpos"):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        adapter = adapter_for(model)
        assert isinstance(adapter, TimmRelPosAdapter), name
        assert adapter.has_class_token == (model.cls_token is not None), name
        (with_class_token if adapter.has_class_token else without).append(name)
    assert sorted(with_class_token) == [
        "vit_relpos_base_patch16_cls_224",
        "vit_relpos_base_patch16_clsgap_224",
        "vit_relpos_medium_patch16_cls_224",
    ]
    assert len(without) == len(timm.list_models(module="vision_transformer_relpos")) - 3
