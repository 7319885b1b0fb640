"""Hugging Face transformers PVT (v1) and PVTv2: DAAM over attention on reduced keys and values
equals an explicit reference.

The reference runs the model in float64 with every block's attention written out: q, k and v
from the module's query / key / value weights (F.linear), the keys and values over the tokens
reduced by hand with the module's own weights (the strided convolution by F.conv2d at the
ratio, the LayerNorm by F.layer_norm; PVTv2's linear variant: F.adaptive_avg_pool2d to 7x7,
the 1x1 convolution, the LayerNorm and F.gelu), softmax(q k^T * d ** -0.5) formed as an
explicit (B, H, N, Nk) matrix. The gradient at the output before the projection comes from
plain autograd; every row explained is split over the keys it reads, weighted by its own
gradient, summed and relu'd (reference.maps_from_every_query_row); each block's map lies on
its key grid, and the flow on the finest grid by reference.area_resample. PVT v1's last stage
reads its [class] token as its first key, which is no patch; by default its blocks are
explained from the [class] row alone, the blocks before (no [class] token) from every row.
"""

import copy
import sys
import warnings
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from captum_daam import DAAM
from captum_daam.adapters import HFPvtAdapter, HFPvtV2Adapter, adapter_for
from helpers import (
    add_parameter_noise,
    assert_close_relative,
    assert_maps_on_block_grids_match,
    assert_refused_before_any_work,
    make_images,
    module_hook_count,
)
from reference import flow_on_the_finest_grid, maps_from_every_query_row, resolve_targets

NUM_CLASSES = 5
TARGETS = [3, 4, 0]
PVT_SIZE = 64
PVT_V2_SIZE = (64, 96)


# --------------------------------------------------------------------------- #
# Explicit reference
# --------------------------------------------------------------------------- #


def split_heads(projected: Tensor, heads: int) -> Tensor:
    """(B, N, H * d) -> (B, H, N, d)."""
    return projected.unflatten(-1, (heads, -1)).transpose(1, 2)


def reduced_by_hand(attention: nn.Module, tokens: Tensor, grid, ratio: int, linear: bool):
    """The tokens the keys and values are made of, and their grid: ``tokens`` (B, N, C) on
    ``grid`` reduced with the module's own weights (``linear``: PVTv2's linear variant)."""
    batch, count, channels = tokens.shape
    if not linear and ratio == 1:
        return tokens, grid
    spatial = tokens.transpose(1, 2).reshape(batch, channels, *grid)
    if linear:
        spatial = F.adaptive_avg_pool2d(spatial, 7)
    convolution = attention.spatial_reduction if hasattr(attention, "spatial_reduction") else (
        attention.sequence_reduction)
    spatial = F.conv2d(spatial, convolution.weight, convolution.bias, stride=1 if linear else ratio)
    key_grid = (7, 7) if linear else (grid[0] // ratio, grid[1] // ratio)
    assert tuple(spatial.shape[-2:]) == key_grid
    norm = attention.layer_norm
    reduced = F.layer_norm(spatial.flatten(2).transpose(1, 2), (channels,), norm.weight,
                           norm.bias, norm.eps)
    return (F.gelu(reduced) if linear else reduced), key_grid


def explicit_attention(attention: nn.Module, projection: nn.Module, tokens: Tensor, grid,
                       ratio: int, linear: bool = False) -> Dict[str, object]:
    heads = attention.num_attention_heads
    reduced, key_grid = reduced_by_hand(attention, tokens, grid, ratio, linear)
    q = split_heads(F.linear(tokens, attention.query.weight, attention.query.bias), heads)
    k = split_heads(F.linear(reduced, attention.key.weight, attention.key.bias), heads)
    v = split_heads(F.linear(reduced, attention.value.weight, attention.value.bias), heads)
    probabilities = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).flatten(2)
    return dict(attn=probabilities, v=v, pre_projection=pre_projection, key_grid=key_grid,
                out=projection(pre_projection), class_token=False)


def pvt_forward(model: nn.Module, images: Tensor):
    """PVT v1 by hand: (scores, block records). The scores are the logits, or for the bare
    model the final [class] token."""
    backbone = getattr(model, "pvt", model)
    encoder = backbone.encoder
    x, records = images, []
    for stage, (embedding, layers) in enumerate(zip(encoder.patch_embeddings, encoder.block)):
        x, height, width = embedding(x)  # the [class] token put in front in the last stage
        for layer in layers:
            attention = layer.attention.self
            record = explicit_attention(
                attention, layer.attention.output.dense, layer.layer_norm_1(x), (height, width),
                backbone.config.sequence_reduction_ratios[stage])
            record["class_token"] = embedding.cls_token is not None
            x = x + record["out"]
            x = x + layer.mlp(layer.layer_norm_2(x))
            records.append(record)
        if stage < len(encoder.block) - 1:
            x = x.reshape(x.shape[0], height, width, -1).permute(0, 3, 1, 2)
    class_token = encoder.layer_norm(x)[:, 0]
    classifier = getattr(model, "classifier", None)
    return (class_token if classifier is None else classifier(class_token)), records


def pvt_v2_forward(model: nn.Module, images: Tensor):
    """PVTv2 by hand: (scores, block records). The scores are the logits, or for the bare
    model the last feature map averaged over the grid."""
    backbone = getattr(model, "pvt_v2", model)
    config = backbone.config
    x, records = images, []
    for stage, layer in enumerate(backbone.encoder.layers):
        x, height, width = layer.patch_embedding(x)
        for block in layer.blocks:
            attention = block.attention
            record = explicit_attention(
                attention, attention.proj, block.layer_norm_1(x), (height, width),
                config.sr_ratios[stage], config.linear_attention)
            x = x + record["out"]
            x = x + block.mlp(block.layer_norm_2(x), height, width)
            records.append(record)
        x = layer.layer_norm(x).reshape(x.shape[0], height, width, -1).permute(0, 3, 1, 2)
    features = x.mean(dim=(-2, -1))
    classifier = getattr(model, "classifier", None)
    return (features if classifier is None else classifier(features)), records


def explicit_daam(forward, model: nn.Module, images: Tensor, target, queries=None):
    """Block maps on their key grids and the flow: ``queries`` None (the [class] row in the
    blocks that have a [class] token, every row elsewhere) or "all"."""
    model = copy.deepcopy(model).double()
    with torch.enable_grad():
        scores, records = forward(model, images.double())
        targets = resolve_targets(target, scores)
        score = scores[torch.arange(len(scores)), targets].sum()
        gradients = torch.autograd.grad(score, [record["pre_projection"] for record in records])
    block_maps: List[Tensor] = []
    for record, gradient in zip(records, gradients):
        prefix = 1 if record["class_token"] else 0
        rows = [0] if record["class_token"] and queries is None else slice(None)
        rows_record = dict(attn=record["attn"][:, :, rows], v=record["v"])
        block_maps.append(maps_from_every_query_row(
            [rows_record], [gradient[:, rows]], prefix, record["key_grid"])["block_maps"][:, 0])
    return dict(logits=scores.detach(), block_maps=block_maps,
                flow=flow_on_the_finest_grid(block_maps))


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #


def small_pvt(classifier: bool = True, seed: int = 1, **overrides) -> nn.Module:
    """A narrow PVT v1 on 64x64 images: grids 16, 8, 4, 2 (with the [class] token), keys
    reduced 2, 2, 1, 1 (key grids 8, 4, 4, 2)."""
    options = dict(
        image_size=PVT_SIZE, hidden_sizes=[16, 32, 32, 64], num_attention_heads=[1, 2, 2, 4],
        depths=[1, 1, 1, 2], sequence_reduction_ratios=[2, 2, 1, 1], mlp_ratios=[2, 2, 2, 2],
        num_labels=NUM_CLASSES,
    )
    options.update(overrides)
    torch.manual_seed(0)
    config = transformers.PvtConfig(**options)
    model_class = transformers.PvtForImageClassification if classifier else transformers.PvtModel
    return add_parameter_noise(model_class(config), seed=seed)


def small_pvt_v2(linear: bool, classifier: bool = True, seed: int = 1) -> nn.Module:
    """A narrow PVTv2 (ratios 8, 4, 2, 1; or the linear variant's 7x7 pooling)."""
    torch.manual_seed(0)
    config = transformers.PvtV2Config(
        hidden_sizes=[16, 32, 32, 64], num_attention_heads=[1, 2, 2, 4], depths=[1, 2, 1, 1],
        mlp_ratios=[2, 2, 2, 2], linear_attention=linear, num_labels=NUM_CLASSES,
    )
    model_class = (transformers.PvtV2ForImageClassification if classifier
                   else transformers.PvtV2Model)
    return add_parameter_noise(model_class(config), seed=seed)


CASES = [("classifier", TARGETS), ("classifier", None), ("bare", TARGETS)]
CASE_IDS = ["classifier-targets", "classifier-predicted", "bare-targets"]


def assert_queries_all_match(model: nn.Module, images: Tensor, target, expected) -> None:
    """DAAM with queries='all', no warning: block maps on their grids and the flow equal the
    reference's; no hook left."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        daam = DAAM(model)
        blocks = daam.attribute(images, target=target, queries="all", block_grids=True,
                                accumulate=False)
        flow = daam.attribute(images, target=target, queries="all", return_flow=True)
    for block, reference_map in zip(blocks, expected["block_maps"], strict=True):
        assert_close_relative(block[:, 0], reference_map)
        assert float(reference_map.amax()) > 0
    assert_close_relative(flow, expected["flow"])
    assert module_hook_count(model) == 0


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind, target", CASES, ids=CASE_IDS)
def test_pvt_class_rows_in_the_last_stage_and_every_row_before_equal_reference(kind, target):
    model = small_pvt(classifier=kind == "classifier")
    images = make_images(3, PVT_SIZE, PVT_SIZE)
    expected = explicit_daam(pvt_forward, model, images, target)
    with torch.no_grad():
        assert_close_relative(expected["logits"], adapter_for(model).output_scores(
            model(images)).double(), 1e-5)
    assert [tuple(block.shape[-2:]) for block in expected["block_maps"]] == [
        (8, 8), (4, 4), (4, 4), (2, 2), (2, 2)]
    assert_maps_on_block_grids_match(model, images, target, expected)


@pytest.mark.parametrize("kind, target", CASES, ids=CASE_IDS)
def test_pvt_every_query_row_equals_reference(kind, target):
    model = small_pvt(classifier=kind == "classifier")
    images = make_images(3, PVT_SIZE, PVT_SIZE)
    assert_queries_all_match(model, images, target,
                             explicit_daam(pvt_forward, model, images, target, queries="all"))


@pytest.mark.parametrize("kind, target", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("linear", [False, True], ids=["reduction", "linear"])
def test_pvt_v2_flow_and_block_maps_equal_explicit_reference(linear, kind, target):
    model = small_pvt_v2(linear, classifier=kind == "classifier")
    images = make_images(3, *PVT_V2_SIZE)
    expected = explicit_daam(pvt_v2_forward, model, images, target)
    with torch.no_grad():
        assert_close_relative(expected["logits"], adapter_for(model).output_scores(
            model(images)).double(), 1e-5)
    grids = [tuple(block.shape[-2:]) for block in expected["block_maps"]]
    assert grids == ([(7, 7)] * 5 if linear else [(2, 3)] * 5)
    assert_maps_on_block_grids_match(model, images, target, expected)


def test_pvt_v2_bare_model_is_explained_through_its_pooled_feature_map():
    model = small_pvt_v2(False, classifier=False)
    images = make_images(2, *PVT_V2_SIZE)
    with torch.no_grad():
        output = model(images)
    assert output.last_hidden_state.shape == (2, 64, 2, 3)
    adapter = adapter_for(model)
    assert_close_relative(adapter.output_scores(output), output.last_hidden_state.mean((2, 3)))
    assert adapter.num_outputs == 64 and adapter.outputs_features


def test_registry_picks_the_adapters_and_reports_the_model_shape():
    pvt, bare_pvt = small_pvt(), small_pvt(classifier=False)
    adapter = adapter_for(pvt)
    assert isinstance(adapter, HFPvtAdapter) and isinstance(adapter_for(bare_pvt), HFPvtAdapter)
    layers = [layer.attention for stage in pvt.pvt.encoder.block for layer in stage]
    assert adapter.attention_modules() == layers
    # the stages without a [class] token: every row, though they are no latent queries
    assert adapter.every_row_modules() == layers[:3] and not adapter.latent_query_modules()
    assert adapter.has_class_token and adapter.head_queries == (0,)
    assert (adapter.in_channels, adapter.num_outputs, adapter.outputs_features) == (
        3, NUM_CLASSES, False)
    assert (adapter_for(bare_pvt).num_outputs, adapter_for(bare_pvt).outputs_features) == (
        64, True)
    assert adapter.grid_size((PVT_SIZE, PVT_SIZE)) == (8, 8)
    pvt_v2 = adapter_for(small_pvt_v2(False))
    assert isinstance(pvt_v2, HFPvtV2Adapter) and not pvt_v2.has_class_token
    assert (pvt_v2.in_channels, pvt_v2.num_outputs, pvt_v2.outputs_features) == (
        3, NUM_CLASSES, False)


@pytest.mark.parametrize("model_class, config", [
    (transformers.PvtForImageClassification, transformers.PvtConfig()),
    (transformers.PvtV2ForImageClassification, transformers.PvtV2Config()),
    (transformers.PvtV2Model, transformers.PvtV2Config(linear_attention=True)),
], ids=["pvt_tiny", "pvt_v2_b0", "pvt_v2_linear"])
def test_default_architectures_are_taken_with_their_key_grids(model_class, config):
    with torch.device("meta"):
        model = model_class(config)
    adapter = adapter_for(model)
    layouts = adapter.block_layouts(adapter.attention_modules(), (224, 224))
    # ratios 8, 4, 2, 1 bring the stages' 56, 28, 14, 7 to 7x7; the linear variant pools to 7x7
    assert {layout.grid for layout in layouts} == {(7, 7)}
    assert len(layouts) == sum(config.depths)


def test_pvt_v2_backbone_is_not_taken():
    config = transformers.PvtV2Config(hidden_sizes=[16, 32, 32, 64],
                                      num_attention_heads=[1, 2, 2, 4], depths=[1, 1, 1, 1])
    assert not HFPvtV2Adapter.supports(transformers.PvtV2Backbone(config))


@pytest.mark.parametrize("module_name", ["transformers.models.pvt.modeling_pvt",
                                         "transformers.models.pvt_v2.modeling_pvt_v2"])
def test_supports_is_false_while_transformers_pvt_is_not_loaded(module_name, monkeypatch):
    models = [small_pvt(), small_pvt_v2(False)]
    monkeypatch.delitem(sys.modules, module_name)
    adapter = HFPvtAdapter if module_name.endswith("modeling_pvt") else HFPvtV2Adapter
    assert not any(adapter.supports(model) for model in models)
    assert not adapter.supports(nn.Linear(2, 2))


def test_pvt_other_image_size_is_refused_before_any_work():
    assert_refused_before_any_work(small_pvt(), make_images(1, 96, 96),
                                   r"takes 64x64 images .*got 96x96")


def test_pvt_v2_too_small_image_is_refused_before_any_work():
    assert_refused_before_any_work(small_pvt_v2(False), make_images(1, 16, 16),
                                   r"large enough for every block's spatial reduction, got 16x16")


def test_pvt_reducing_the_class_token_stage_is_refused():
    with pytest.raises(TypeError, match=r"ratio 1 in the stage with the \[class\] token"):
        adapter_for(small_pvt(sequence_reduction_ratios=[2, 2, 1, 2]))
