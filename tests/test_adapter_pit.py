"""DAAM on timm PiT equals an explicit reference, block by block on each stage's own grid.

The reference below re-runs the model by hand in float64 on a deep copy: the patch embedding
convolution and the position embedding, then stage by stage the pooling convolution of the
patch map and the linear map of the [class] (and distillation) tokens through the model's own
modules, the patch map laid out row-major by hand, and every block with its attention written
out as a full (B, H, N, N) matrix softmax(q k^T / sqrt(d)) from the qkv weights (no
``Attention.forward``, no scaled_dot_product_attention, no hooks). Gradients come from plain
autograd at each block's head-concatenated output; each block map is formed on its own stage's
grid (``reference.maps_from_explicit_blocks``, one block at a time), and the flow resamples
them to the finest grid by an explicit area-weighted split written here.
"""

import copy
from typing import Dict, List, Tuple

import pytest
import timm
import torch
from timm.layers import Attention
from timm.models.pit import PoolingVisionTransformer
from torch import Tensor, nn

import captum_daam.adapters.timm_pit  # noqa: F401  (registers the adapter)
from captum_daam import DAAM
from captum_daam.adapters import adapter_for
from captum_daam.adapters.timm_pit import TimmPitAdapter
from captum_daam.attr import AttentionRollout, GradientRollout
from helpers import assert_close_relative, make_images, make_model, set_fused_attention
from reference import (
    area_resample,
    explicit_gradients,
    maps_from_every_query_row,
    maps_from_explicit_blocks,
)

NUM_CLASSES = 11

# --------------------------------------------------------------------------- #
# Explicit reference
# --------------------------------------------------------------------------- #


def explicit_attention(attention: Attention, z: Tensor) -> Dict[str, Tensor]:
    """One timm ``Attention`` by hand (PiT's has no qk_norm, no scale_norm, no gate)."""
    assert isinstance(attention.q_norm, nn.Identity) and isinstance(attention.norm, nn.Identity)
    batch, tokens, channels = z.shape
    heads = attention.num_heads
    width = channels // heads
    qkv = z @ attention.qkv.weight.T + attention.qkv.bias
    q, k, v = qkv.reshape(batch, tokens, 3, heads, width).permute(2, 0, 3, 1, 4)
    probabilities = ((q @ k.transpose(-2, -1)) * width**-0.5).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, tokens, channels)
    out = attention.proj(pre_projection)
    return {"attn": probabilities, "v": v, "pre_projection": pre_projection, "out": out}


def row_major_tokens(patch_map: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h * w, C): token r * w + c is row r, column c."""
    batch, channels, height, width = patch_map.shape
    rows = torch.tensor([row for row in range(height) for column in range(width)])
    columns = torch.tensor([column for row in range(height) for column in range(width)])
    return patch_map[:, :, rows, columns].transpose(1, 2)


def explicit_forward(model: PoolingVisionTransformer, images: Tensor) -> Dict[str, object]:
    """PiT by hand; returns the logits, every block's record and its grid."""
    patch_map = model.patch_embed.conv(images) + model.pos_embed
    prefix = model.cls_token.expand(images.shape[0], -1, -1)
    num_prefix = prefix.shape[1]
    records, grids = [], []
    for stage in model.transformers:
        if stage.pool is not None:
            patch_map = stage.pool.conv(patch_map)
            prefix = stage.pool.fc(prefix)
        batch, channels, height, width = patch_map.shape
        x = stage.norm(torch.cat((prefix, row_major_tokens(patch_map)), dim=1))
        for block in stage.blocks:
            record = explicit_attention(block.attn, block.norm1(x))
            x = x + block.ls1(record["out"])
            x = x + block.ls2(block.mlp(block.norm2(x)))
            records.append(record)
            grids.append((height, width))
        prefix = x[:, :num_prefix]
        patch_map = x[:, num_prefix:].transpose(1, 2).reshape(batch, channels, height, width)
    logits = model.forward_head(model.norm(prefix))
    return {"logits": logits, "blocks": records, "grids": grids, "num_prefix": num_prefix}


def explicit_daam(model, images, target=None, queries="class") -> Dict[str, object]:
    """Reference block maps on their own grids, and the flow on the finest grid, in float64."""
    result, targets, gradients = explicit_gradients(explicit_forward, model, images, target)
    logits = result["logits"]
    reduce = maps_from_explicit_blocks if queries == "class" else maps_from_every_query_row
    block_maps = [
        reduce([record], [gradient], result["num_prefix"], grid)["block_maps"][:, 0]
        for record, gradient, grid in zip(result["blocks"], gradients, result["grids"])
    ]
    finest = max(result["grids"], key=lambda grid: grid[0] * grid[1])
    resampled = torch.stack([area_resample(block, finest) for block in block_maps], dim=1)
    return {
        "logits": logits.detach(),
        "targets": targets,
        "block_maps": block_maps,
        "flow": resampled.cumsum(dim=1),
        "grids": result["grids"],
        "finest": finest,
        "blocks": result["blocks"],
    }


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #

SMALL = dict(patch_size=4, stride=2, base_dims=(8, 8, 8), heads=(2, 2, 4), depth=(1, 2, 1))


def small_pit(**kwargs) -> PoolingVisionTransformer:
    torch.manual_seed(0)
    return PoolingVisionTransformer(**{**SMALL, "num_classes": NUM_CLASSES, **kwargs}).eval()


MODELS = {
    # 32x32: grids 15x15, 8x8, 4x4.
    "small": (lambda: small_pit(img_size=32), (32, 32)),
    # 32x48, two prefix tokens: grids 15x23, 8x12, 4x6.
    "distilled_non_square": (lambda: small_pit(img_size=(32, 48), distilled=True), (32, 48)),
    "pit_ti_224": (lambda: make_model("pit_ti_224", num_classes=NUM_CLASSES), (224, 224)),
}
BATCH = {"pit_ti_224": 2}
TARGETS = [3, 10, 0]


@pytest.fixture(scope="module", params=list(MODELS))
def model_case(request):
    build, image_size = MODELS[request.param]
    batch = BATCH.get(request.param, 3)
    model = build()
    images = make_images(batch, *image_size)
    return model, images, explicit_daam(model, images, TARGETS[:batch])


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_explicit_reference_reproduces_the_models_logits(model_case, fused):
    model, images, expected = model_case
    set_fused_attention(model, fused)
    with torch.no_grad():
        own = model(images)
    assert_close_relative(expected["logits"], own, 1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_block_maps_on_their_own_grids_equal_the_reference(model_case, fused):
    model, images, expected = model_case
    set_fused_attention(model, fused)
    targets = TARGETS[: len(images)]
    maps = DAAM(model).attribute(images, target=targets, block_grids=True, accumulate=False)
    assert len(maps) == len(expected["block_maps"]) == len(adapter_for(model).attention_modules())
    for block, reference, grid in zip(maps, expected["block_maps"], expected["grids"]):
        assert block.shape == (len(images), 1, *grid)
        assert_close_relative(block[:, 0], reference)
    # Not a vacuous comparison of zeros: some block on every grid has a positive map.
    for grid in set(expected["grids"]):
        on_grid = [block for block in expected["block_maps"] if tuple(block.shape[1:]) == grid]
        assert max(float(block.amax()) for block in on_grid) > 0


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_flow_on_the_finest_grid_equals_the_resampled_reference(model_case, fused):
    model, images, expected = model_case
    set_fused_attention(model, fused)
    daam = DAAM(model)
    targets = TARGETS[: len(images)]
    flow = daam.attribute(images, target=targets, return_flow=True)
    assert flow.shape == (len(images), len(expected["grids"]), *expected["finest"])
    assert tuple(daam.adapter.grid_size(tuple(images.shape[-2:]))) == expected["finest"]
    assert_close_relative(flow, expected["flow"])
    assert_close_relative(daam.attribute(images, target=targets), expected["flow"][:, -1:])
    # Area-weighted resampling keeps each block map's sum.
    total = sum(block.sum(dim=(1, 2)) for block in expected["block_maps"])
    assert_close_relative(expected["flow"][:, -1].sum(dim=(1, 2)), total, 1e-10)


@pytest.mark.parametrize("case", ["small", "distilled_non_square"])
def test_predicted_class_by_default(case):
    build, image_size = MODELS[case]
    model, images = build(), make_images(2, *image_size, seed=3)
    expected = explicit_daam(model, images, None)
    assert expected["targets"].tolist() == model(images).argmax(1).tolist()
    assert_close_relative(DAAM(model).attribute(images, return_flow=True), expected["flow"])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_recorded_full_attention_equals_the_explicit_attention(model_case, fused):
    """Recorded from the model in float64 (the reference's weights)."""
    model, images, expected = model_case
    model = set_fused_attention(copy.deepcopy(model).double(), fused)
    adapter = adapter_for(model)
    with adapter.record(adapter.attention_modules(), full=True) as records, torch.no_grad():
        model(images.double())
    for record, block in zip(records, expected["blocks"]):
        assert_close_relative(record.attention(), block["attn"], 1e-10)
        assert_close_relative(record.class_attention, block["attn"][:, :, 0], 1e-10)
        assert_close_relative(record.values, block["v"], 1e-10)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", ["small", "distilled_non_square"])
def test_every_query_row_equals_the_reference_per_block(case, fused):
    build, image_size = MODELS[case]
    model = set_fused_attention(build(), fused)
    images = make_images(2, *image_size, seed=1)
    expected = explicit_daam(model, images, [4, 5], queries="all")
    daam = DAAM(model)
    maps = daam.attribute(
        images, target=[4, 5], queries="all", block_grids=True, accumulate=False
    )
    for block, reference in zip(maps, expected["block_maps"]):
        assert_close_relative(block[:, 0], reference)
    flow = daam.attribute(images, target=[4, 5], queries="all", return_flow=True)
    assert_close_relative(flow, expected["flow"])
    class_rows = explicit_daam(model, images, [4, 5])["flow"]
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_relative(flow, class_rows, 1e-2)  # not the [class] rows under another name


def test_layer_restricts_the_flow_to_those_blocks_on_their_finest_grid():
    build, image_size = MODELS["small"]
    model = build()
    images = make_images(2, *image_size, seed=2)
    expected = explicit_daam(model, images, [1, 2])
    stages = model.transformers
    chosen = DAAM(model, layer=[stages[2].blocks[0].attn, stages[1].blocks[1].attn])
    flow = chosen.attribute(images, target=[1, 2], return_flow=True)
    # Blocks 2 (8x8) and 3 (4x4) of the flow, brought to the finer 8x8 grid.
    stacked = torch.stack(
        [expected["block_maps"][2], area_resample(expected["block_maps"][3], (8, 8))], dim=1
    )
    assert flow.shape == (2, 2, 8, 8)
    assert_close_relative(flow, stacked.cumsum(dim=1))


def test_registered_models_get_the_adapter_with_the_grids_of_their_convolutions():
    """Built on the meta device (no memory, no weights): the adapter only reads structure."""
    grids = {"pit_b": [(31, 31)] * 3 + [(16, 16)] * 6 + [(8, 8)] * 4}
    grids["pit_ti"] = grids["pit_xs"] = grids["pit_s"] = (
        [(27, 27)] * 2 + [(14, 14)] * 6 + [(7, 7)] * 4
    )
    names = timm.list_models("pit*")
    assert len(names) == 8
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name)
        adapter = adapter_for(model)
        assert isinstance(adapter, TimmPitAdapter)
        layouts = adapter.block_layouts(adapter.attention_modules(), (224, 224))
        assert [layout.grid for layout in layouts] == grids[name.replace("_distilled", "")[:-4]]
        assert adapter.grid_size((224, 224)) == layouts[0].grid
        assert adapter.num_prefix_tokens == (2 if "distilled" in name else 1)


def test_wrong_image_size_is_refused_before_the_forward_pass_and_the_model_cannot_take_it():
    model = MODELS["small"][0]()
    ran = []
    handle = model.patch_embed.register_forward_pre_hook(lambda *args: ran.append(True))
    try:
        with pytest.raises(ValueError, match="takes 32x32 images .*15x15 .* got 40x32"):
            DAAM(model).attribute(make_images(1, 40, 32), target=0)
    finally:
        handle.remove()
    assert not ran
    with pytest.raises(RuntimeError):
        model(make_images(1, 40, 32))  # the position embedding does not fit that grid


def test_an_image_size_giving_the_same_grid_is_explained():
    """33x33 images give the 15x15 grid of 32x32 ones: the model takes them, DAAM too."""
    model = MODELS["small"][0]()
    images = make_images(2, 33, 33)
    expected = explicit_daam(model, images, [1, 2])
    assert_close_relative(DAAM(model).attribute(images, target=[1, 2], return_flow=True),
                          expected["flow"])


def test_a_head_on_every_prefix_token_is_refused_with_a_true_message():
    model = small_pit(img_size=32, global_pool="")
    assert model(make_images(1, 32, 32)).shape == (1, 1, NUM_CLASSES)  # what the message says
    with pytest.raises(TypeError, match=r"global_pool=''.*\(B, tokens, K\).*global_pool='token'"):
        DAAM(model)


def test_a_foreign_attention_module_is_refused():
    model = MODELS["small"][0]()
    model.transformers[1].blocks[1].attn = nn.Identity()
    with pytest.raises(
        TypeError, match=r"Block 1 of PoolingVisionTransformer.transformers\[1\] uses Identity"
    ):
        DAAM(model)


@pytest.mark.parametrize("rollout", [AttentionRollout, GradientRollout])
def test_rollouts_refuse_the_changing_grids(rollout):
    model = MODELS["small"][0]()
    with pytest.raises(ValueError, match="different grids \\(15x15, 8x8, 4x4\\)"):
        rollout(model).attribute(make_images(1, 32, 32), target=0)


def test_recorded_blocks_follow_the_stages_and_their_widths():
    model = MODELS["distilled_non_square"][0]()
    adapter = adapter_for(model)
    with adapter.record(adapter.attention_modules()) as records, torch.no_grad():
        model(make_images(1, 32, 48))
    shapes: List[Tuple[int, ...]] = [tuple(record.values.shape) for record in records]
    # (B, H, 2 prefix tokens + grid, d): 15x23, 8x12 and 4x6 grids, heads 2, 2, 4 of width 8.
    assert shapes == [(1, 2, 347, 8), (1, 2, 98, 8), (1, 2, 98, 8), (1, 4, 26, 8)]
