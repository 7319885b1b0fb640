"""DAAM on timm CoaT and CoaT-Lite equals an explicit reference, block by block on four grids.

CoaT's attention is factorised: out = scale * q @ (softmax_over_tokens(k)^T @ v) + crpe(q, v),
with crpe a convolutional relative position encoding that is zero on the [class] row. So the
[class] row is sum_n a[h, n] v[h, n] with a[h, n] = scale * <q_cls[h], softmax_n(k)[h, n]>,
and DAAM splits it over the tokens with those coefficients.

The reference below re-runs the model by hand in float64 on a deep copy: the patch
embeddings, [class] tokens, convolutional position encodings, MLPs, the parallel blocks'
resampling and the head through the model's own modules; every attention written out from
q, k and v: the factorised product for all rows, the module's own ``crpe`` for the position
term (checked to be zero on the [class] row), and the [class] coefficients a formed
explicitly. No attention module's forward, no hooks. Gradients come from plain autograd at
every block's head-concatenated output; the block maps from
``reference.maps_from_explicit_blocks``, each on its stage's grid; the flow from an explicit
area-weighted resampling and a cumulative sum.

timm's small random weights make softmax_n(k) almost uniform: the models here get larger
seeded query and key weights, so that the coefficients vary over the tokens.
"""

from typing import Dict, List, Tuple

import pytest
import timm
import torch
from timm.models.coat import CoaT, FactorAttnConvRelPosEnc
from torch import Tensor, nn

from captum_daam import DAAM, AttentionRollout, GradientRollout
from captum_daam.adapters import TimmMaxxVitAdapter, adapter_for
from captum_daam.adapters.timm_coat import TimmCoatAdapter
from helpers import assert_close_relative, make_images, make_model
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


def explicit_factor_attention(
    attention: FactorAttnConvRelPosEnc, tokens: Tensor, size: Tuple[int, int]
) -> Dict[str, Tensor]:
    """One ``FactorAttnConvRelPosEnc`` by hand.

    Returns ``attn`` (B, H, 1, N), the [class] row's coefficients over the tokens, ``v``
    (B, H, N, d), the head-concatenated ``pre_projection`` (B, N, C), ``out`` =
    proj(pre_projection) and ``crpe_class_row`` (B, H, d), the position term's [class] row.
    """
    batch, num_tokens, channels = tokens.shape
    heads = attention.num_heads
    q, k, v = attention.qkv(tokens).reshape(batch, num_tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    scale = q.shape[-1] ** -0.5
    token_softmax = k.softmax(dim=2)  # over the tokens, for each channel
    # a[b, h, n] = scale * sum_e q[b, h, 0, e] * softmax_n(k)[b, h, n, e]
    coefficients = scale * (q[:, :, :1] * token_softmax).sum(dim=-1)  # (B, H, N)
    factorised = scale * (q @ (token_softmax.transpose(-2, -1) @ v))  # every row
    position = attention.crpe(q, v, size=size)  # the module's own conv position encoding
    pre_projection = (factorised + position).transpose(1, 2).reshape(batch, num_tokens, channels)
    out = attention.proj_drop(attention.proj(pre_projection))
    return {
        "attn": coefficients.unsqueeze(2),
        "v": v,
        "pre_projection": pre_projection,
        "out": out,
        "crpe_class_row": position[:, :, 0],
    }


def explicit_forward(model: CoaT, images: Tensor) -> Dict[str, object]:
    """The whole forward pass by hand, in the model's dtype. Every block's record gets the
    ``name`` of the attention module it replaces and its ``grid``."""
    batch = images.shape[0]
    names = {id(module): name for name, module in model.named_modules()}
    records = []
    xs, sizes = [], []
    x = images
    for stage in (1, 2, 3, 4):
        patch_embed = getattr(model, f"patch_embed{stage}")
        if stage > 1:  # the previous stage's patch tokens, [class] dropped, as an image
            x = xs[-1][:, 1:].reshape(batch, *sizes[-1], -1).permute(0, 3, 1, 2)
        x = patch_embed(x)
        size = tuple(patch_embed.grid_size)
        class_token = getattr(model, f"cls_token{stage}").expand(batch, -1, -1)
        x = torch.cat((class_token, x), dim=1)
        for block in getattr(model, f"serial_blocks{stage}"):
            x = block.cpe(x, size)
            record = explicit_factor_attention(block.factoratt_crpe, block.norm1(x), size)
            record.update(name=names[id(block.factoratt_crpe)], grid=size)
            x = x + block.drop_path(record["out"])
            x = x + block.drop_path(block.mlp(block.norm2(x)))
            records.append(record)
        xs.append(x)
        sizes.append(size)
    if model.parallel_blocks is None:
        pooled = model.norm4(xs[3])[:, 0]
    else:
        x2, x3, x4 = xs[1:]
        size2, size3, size4 = sizes[1:]
        for block in model.parallel_blocks:
            x2, x3, x4 = model.cpe2(x2, size2), model.cpe3(x3, size3), model.cpe4(x4, size4)
            stage_records = []
            for stage, tokens, size in ((2, x2, size2), (3, x3, size3), (4, x4, size4)):
                attention = getattr(block, f"factoratt_crpe{stage}")
                normed = getattr(block, f"norm1{stage}")(tokens)
                record = explicit_factor_attention(attention, normed, size)
                record.update(name=names[id(attention)], grid=size)
                stage_records.append(record)
            records += stage_records
            out2, out3, out4 = (record["out"] for record in stage_records)
            # Every scale adds the others' outputs, resampled ([class] rows passed as they are).
            mixed2 = out2 + block.upsample(out3, 2.0, size3) + block.upsample(out4, 4.0, size4)
            mixed3 = out3 + block.upsample(out4, 2.0, size4) + block.downsample(out2, 2.0, size2)
            mixed4 = out4 + block.downsample(out3, 2.0, size3) + block.downsample(out2, 4.0, size2)
            x2, x3, x4 = x2 + mixed2, x3 + mixed3, x4 + mixed4
            x2 = x2 + block.mlp2(block.norm22(x2))
            x3 = x3 + block.mlp3(block.norm23(x3))
            x4 = x4 + block.mlp4(block.norm24(x4))
        class_tokens = [model.norm2(x2)[:, 0], model.norm3(x3)[:, 0], model.norm4(x4)[:, 0]]
        pooled = model.aggregate(torch.stack(class_tokens, dim=1)).squeeze(1)
    return {"logits": model.head(pooled), "blocks": records}


def explicit_coat_daam(model: CoaT, images: Tensor, target=None) -> Dict[str, object]:
    """Reference block maps on their own grids, in float64."""
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
    """Larger seeded query and key weights, so that softmax_n(k) and the [class]
    coefficients vary over the tokens."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FactorAttnConvRelPosEnc):
                weight = module.qkv.weight
                width = weight.shape[0] // 3
                noise = torch.randn(2 * width, weight.shape[1], generator=generator)
                weight[: 2 * width] = 2 * noise * weight.shape[1] ** -0.5
    return model


def small_coat(parallel_depth: int = 2, seed: int = 0, **kwargs) -> CoaT:
    """Four stages on 16x16, 8x8, 4x4 and 2x2 grids (64x64 images); with ``parallel_depth``,
    CoaT's parallel blocks over stages 2-4, else CoaT-Lite."""
    torch.manual_seed(seed)
    options = dict(
        img_size=64,
        patch_size=4,
        embed_dims=(16, 24, 24, 24),
        serial_depths=(2, 2, 2, 2),
        parallel_depth=parallel_depth,
        num_heads=2,
        mlp_ratios=(2, 2, 2, 2),
        crpe_window={3: 1, 5: 1},
        num_classes=NUM_CLASSES,
    )
    options.update(kwargs)
    return sharpen(CoaT(**options).eval(), seed)


MODELS = {
    "coat_small": lambda: small_coat(),
    "coat_lite_small": lambda: small_coat(parallel_depth=0),
}

STAGE_GRIDS = [(16, 16), (8, 8), (4, 4), (2, 2)]


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_case(request):
    return request.param, MODELS[request.param]()


_REFERENCES: Dict[tuple, Dict[str, object]] = {}


def cached_reference(case: str, model, images: Tensor, target) -> Dict[str, object]:
    key = (case, tuple(images.shape), None if target is None else tuple(target))
    if key not in _REFERENCES:
        _REFERENCES[key] = explicit_coat_daam(model, images, target)
    return _REFERENCES[key]


@pytest.fixture(scope="module", autouse=True)
def free_references_after_the_module():
    yield
    _REFERENCES.clear()


# --------------------------------------------------------------------------- #
# Exactness
# --------------------------------------------------------------------------- #


def test_explicit_reference_reproduces_the_models_logits(model_case):
    case, model = model_case
    images = make_images(2, 64, 64)
    with torch.no_grad():
        own = model(images)
        by_hand = explicit_forward(model, images)["logits"]
    assert_close_relative(by_hand, own, 1e-5)
    assert_close_relative(cached_reference(case, model, images, TARGETS)["logits"], own, 1e-5)


def test_position_encoding_is_zero_on_the_class_row_and_the_coefficients_not_probabilities(
    model_case,
):
    case, model = model_case
    records = cached_reference(case, model, make_images(2, 64, 64), TARGETS)["records"]
    for record in records:
        assert torch.equal(record["crpe_class_row"], torch.zeros_like(record["crpe_class_row"]))
    coefficients = torch.cat([record["attn"].detach().flatten() for record in records])
    assert float(coefficients.min()) < 0  # signed weights, not attention probabilities


def test_flow_runs_over_serial_then_parallel_attentions_with_their_grids(model_case):
    case, model = model_case
    images = make_images(2, 64, 64)
    adapter = DAAM(model).adapter
    assert isinstance(adapter, TimmCoatAdapter)
    records = cached_reference(case, model, images, TARGETS)["records"]
    assert adapter.attention_modules() == [model.get_submodule(r["name"]) for r in records]
    layouts = adapter.block_layouts(adapter.attention_modules(), (64, 64))
    assert [layout.grid for layout in layouts] == [record["grid"] for record in records]
    serial = [stage for stage in range(4) for _ in range(2)]
    parallel = [1, 2, 3] * model.parallel_depth
    assert [layout.branch for layout in layouts] == serial + parallel
    assert [layout.grid for layout in layouts] == [STAGE_GRIDS[b] for b in serial + parallel]
    assert adapter.grid_size((64, 64)) == (16, 16)


def test_block_maps_on_their_own_grids_equal_explicit_reference(model_case):
    case, model = model_case
    images = make_images(2, 64, 64)
    expected = cached_reference(case, model, images, TARGETS)["block_maps"]
    maps = DAAM(model).attribute(images, target=TARGETS, block_grids=True, accumulate=False)
    assert len(maps) == len(expected)
    for block_map, reference_map in zip(maps, expected):
        assert_close_relative(block_map[:, 0], reference_map)
    # Most blocks contribute; the zero ones are the last blocks of stages whose [class] token
    # is then dropped (see the test below).
    assert sum(float(reference_map.amax()) > 0 for reference_map in expected) >= len(expected) - 3


def test_flow_on_the_finest_grid_equals_explicit_resampled_accumulation(model_case):
    case, model = model_case
    images = make_images(2, 64, 64)
    expected = cached_reference(case, model, images, TARGETS)
    expected_flow = flow_on_the_finest_grid(expected["block_maps"])
    flow = DAAM(model).attribute(images, target=TARGETS, return_flow=True)
    assert flow.shape == (2, len(expected_flow[0]), 16, 16)
    assert_close_relative(flow, expected_flow)
    assert_close_relative(DAAM(model).attribute(images, target=TARGETS), expected_flow[:, -1:])


def test_predicted_classes_are_explained_by_default():
    model = small_coat()
    images = make_images(2, 64, 64)
    expected = cached_reference("coat_small", model, images, None)
    assert expected["targets"].tolist() == model(images).argmax(1).tolist()
    final = flow_on_the_finest_grid(expected["block_maps"])[:, -1:]
    assert_close_relative(DAAM(model).attribute(images), final)


def test_last_block_of_a_stage_whose_class_token_is_dropped_has_a_zero_map(model_case):
    """Its [class] row only changes a token that is dropped: the gradient there is zero."""
    case, model = model_case
    images = make_images(2, 64, 64)
    expected = cached_reference(case, model, images, TARGETS)
    dropped = [1] if model.parallel_depth else [1, 3, 5]  # last serial block of stages 1 (-3)
    maps = DAAM(model).attribute(images, target=TARGETS, block_grids=True, accumulate=False)
    for index in range(len(maps)):
        gradient_row = expected["gradients"][index][:, 0]
        assert bool((gradient_row == 0).all()) == (index in dropped)
        if index in dropped:
            assert bool((maps[index] == 0).all())


def test_contributions_sum_to_the_modules_own_class_output(model_case):
    """sum_n a[n] v[n] of the reference is the [class] row each module itself hands to proj."""
    case, model = model_case
    images = make_images(2, 64, 64)
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
        assert_close_relative(contributions.sum(dim=1), record["pre_projection"][:, 0], 1e-10)


def test_recorded_class_coefficients_equal_explicit(model_case):
    case, model = model_case
    images = make_images(2, 64, 64)
    records = cached_reference(case, model, images, TARGETS)["records"]
    adapter = adapter_for(model)
    with adapter.record(adapter.attention_modules()) as recorded, torch.no_grad():
        model(images)
    for block, record in zip(recorded, records):
        assert_close_relative(block.class_attention, record["attn"][:, :, 0], 1e-5)
        assert_close_relative(block.values, record["v"], 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coat_lite_tiny", "coat_tiny"])
def test_registered_model_at_its_default_size_equals_explicit_reference(name):
    model = sharpen(make_model(name, num_classes=NUM_CLASSES))
    images = make_images(1, 224, 224, seed=5)
    expected = explicit_coat_daam(model, images, [7])
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images), 1e-5)
    daam = DAAM(model)
    maps = daam.attribute(images, target=7, block_grids=True, accumulate=False)
    grids = [(56, 56), (28, 28), (14, 14), (7, 7)]
    serial = [grid for grid in grids for _ in range(2)]  # both models: 2 blocks per stage
    assert [tuple(m.shape[-2:]) for m in maps] == serial + grids[1:] * model.parallel_depth
    for block_map, reference_map in zip(maps, expected["block_maps"]):
        assert_close_relative(block_map[:, 0], reference_map)
    flow = daam.attribute(images, target=7, return_flow=True)
    assert flow.shape == (1, len(maps), 56, 56)
    assert_close_relative(flow, flow_on_the_finest_grid(expected["block_maps"]))


# --------------------------------------------------------------------------- #
# Layer subsets: every hook fires whichever modules are chosen
# --------------------------------------------------------------------------- #


def _subsets(model: CoaT) -> Dict[str, List[nn.Module]]:
    parallel = model.parallel_blocks
    return {
        "parallel_only": [
            getattr(block, f"factoratt_crpe{stage}") for block in parallel for stage in (2, 3, 4)
        ],
        "stage_3": [block.factoratt_crpe for block in model.serial_blocks3],
        # the first parallel block's stage-2 attention does not depend on stage 3
        "stage_3_then_parallel_stage_2": [
            model.serial_blocks3[0].factoratt_crpe, parallel[0].factoratt_crpe2,
        ],
        "one_parallel_block": [parallel[1].factoratt_crpe4, parallel[1].factoratt_crpe3],
    }


@pytest.mark.parametrize(
    "subset", ["parallel_only", "stage_3", "stage_3_then_parallel_stage_2", "one_parallel_block"]
)
def test_layer_subsets_equal_the_reference_blocks(subset):
    model = small_coat()
    images = make_images(2, 64, 64)
    expected = cached_reference("coat_small", model, images, TARGETS)
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
    with pytest.raises(TypeError, match="global_pool='avg'.*Use global_pool='token'"):
        DAAM(small_coat(global_pool="avg"))


def test_intermediate_layer_output_is_refused_with_a_message():
    model = small_coat(return_interm_layers=True, out_features=["x4_nocls"])
    with torch.no_grad():
        assert isinstance(model(make_images(1, 64, 64)), dict)
    with pytest.raises(TypeError, match="return_interm_layers=True.*returns a dict"):
        DAAM(model)


def test_pruned_models_are_refused_with_a_message():
    lite = small_coat(parallel_depth=0)
    lite.prune_intermediate_layers(indices=[1])
    assert lite.patch_embed3 is None and lite.patch_embed4 is None
    with pytest.raises(TypeError, match=r"removed stages \[3, 4\]"):
        DAAM(lite)
    coat = small_coat()
    coat.prune_intermediate_layers(indices=1)
    assert coat.aggregate is None
    with pytest.raises(TypeError, match="removed the aggregation of its \\[class\\] tokens"):
        DAAM(coat)


def test_other_image_size_is_refused_before_the_forward_pass():
    model = small_coat()
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="takes 64x64 images .* got 96x96"):
            DAAM(model).attribute(make_images(1, 96, 96), target=0)
    finally:
        handle.remove()
    assert calls == []


def test_every_query_and_rollouts_are_refused():
    model = small_coat()
    with pytest.raises(ValueError, match="queries='class'"):
        DAAM(model).attribute(make_images(1, 64, 64), target=0, queries="all")
    for method in (AttentionRollout, GradientRollout):
        with pytest.raises(TypeError, match="full self-attention matrices"):
            method(model)


def test_frozen_model_gives_the_same_maps():
    model = small_coat()
    images = make_images(2, 64, 64)
    unfrozen = DAAM(model).attribute(images, target=TARGETS, return_flow=True)
    model.requires_grad_(False)
    frozen = DAAM(model).attribute(images, target=TARGETS, return_flow=True)
    assert_close_relative(frozen, unfrozen, 1e-6)


def test_a_backbone_without_classifier_explains_features():
    model = small_coat(parallel_depth=0, num_classes=0)
    adapter = adapter_for(model)
    assert adapter.outputs_features and adapter.num_outputs == 24
    images = make_images(1, 64, 64)
    weights = torch.rand(24, generator=torch.Generator().manual_seed(0))
    maps = DAAM(model).attribute(images, importance=weights, return_flow=True)
    assert maps.shape == (1, 8, 16, 16) and float(maps[:, -1].amax()) > 0


# --------------------------------------------------------------------------- #
# Every registered model
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", timm.list_models("coat*"))
def test_every_registered_coat_gets_its_adapter(name):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    if not isinstance(model, CoaT):  # coatnet_*, coatnext_*: timm MaxxVit (test_adapter_maxxvit)
        assert isinstance(adapter_for(model), TimmMaxxVitAdapter)
        return
    adapter = adapter_for(model)
    assert isinstance(adapter, TimmCoatAdapter)
    size = tuple(model.patch_embed1.img_size)
    # The grids the patch embeddings produce (shape inference on the meta device).
    grids, x = [], torch.empty(1, 3, *size, device="meta")
    for stage in (1, 2, 3, 4):
        x = getattr(model, f"patch_embed{stage}").proj(x)
        grids.append(tuple(x.shape[-2:]))
    layouts = adapter.block_layouts(adapter.attention_modules(), size)
    serial = [stage for stage in range(4) for _ in getattr(model, f"serial_blocks{stage + 1}")]
    parallel = [1, 2, 3] * model.parallel_depth
    assert [(layout.grid, layout.branch) for layout in layouts] == [
        (grids[branch], branch) for branch in serial + parallel
    ]
    assert adapter.grid_size(size) == grids[0]
