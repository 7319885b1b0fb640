"""Hugging Face transformers Hiera: DAAM over mask-unit and global attention with query pooling
equals an explicit reference.

The reference never unrolls: it keeps the tokens on their grid, row by row, the whole way
(every step but attention and pooling acts token by token, and attention without a position
bias does not depend on the order of the tokens it reads). A pooling layer max-pools its
projected shortcut and its queries over aligned neighbourhoods of the grid (F.max_pool2d at the
config's query stride); mask-unit attention attends within aligned squares of the grid (side:
the module's unit size before pooling), global attention over the whole grid; q, k and v come
from the module's qkv weights, softmax(q k^T * d ** -0.5) is an explicit matrix per unit, and
each unit's output goes back to its (pooled) cells. Gradients at every unit's output before
the projection come from plain autograd; every query row is split over the tokens it reads,
weighted by its own gradient, summed and relu'd (test_adapter_swin.windowed_block_maps), each
key token put on its cell; a block's map lies on the grid of the tokens it reads. The order
the model reads its tokens in (the unroll) and its mask units are built by hand on cell
indices and checked against the adapter's layouts.
"""

import copy
import math
import sys
import warnings
from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from captum_daam import DAAM
from captum_daam.adapters import HFHieraAdapter, adapter_for
from helpers import (
    add_parameter_noise,
    assert_close_relative,
    assert_each_cell_in_one_window,
    assert_maps_on_block_grids_match,
    assert_refused_before_any_work,
    make_images,
    module_hook_count,
)
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 4, 0]


# --------------------------------------------------------------------------- #
# Explicit reference
# --------------------------------------------------------------------------- #


def max_pool(x: Tensor, stride) -> Tensor:
    """(B, h, w, C) max-pooled over aligned ``stride`` neighbourhoods."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), tuple(stride)).permute(0, 2, 3, 1)


def explicit_layer(layer: nn.Module, x: Tensor, stride) -> Dict[str, object]:
    """One HieraLayer on grid tokens ``x`` (B, h, w, C): the output and every unit's record."""
    attention = layer.attn
    heads, width = attention.num_heads, attention.head_dim
    pooled = attention.query_stride > 1
    normed = layer.layernorm_before(x)
    shortcut = x
    if layer.hidden_size != layer.hidden_size_output:  # a wider stage: projected, pooled
        shortcut = layer.proj(normed)
        shortcut = max_pool(shortcut, stride) if pooled else shortcut
    batch, height, grid_width, _ = x.shape
    qkv = F.linear(normed, attention.qkv.weight, attention.qkv.bias)
    q, k, v = qkv.unflatten(-1, (3, heads, width)).unbind(3)  # (B, h, w, H, d)
    if pooled:
        q = max_pool(q.flatten(3), stride).unflatten(-1, (heads, width))
    if attention.use_mask_unit_attn:  # the unit's area before pooling
        side = math.isqrt(attention.query_stride * attention.window_size)
        sides = (side, side)
    else:
        sides = (height, grid_width)
    steps = tuple(stride) if pooled else (1, 1)
    query_sides = (sides[0] // steps[0], sides[1] // steps[1])
    pre_projection = x.new_zeros(batch, *q.shape[1:3], heads * width)
    windows = []
    for top in range(0, height, sides[0]):
        for left in range(0, grid_width, sides[1]):
            cells = [(top + i, left + j) for i in range(sides[0]) for j in range(sides[1])]
            query_top, query_left = top // steps[0], left // steps[1]
            query_cells = [(query_top + i, query_left + j)
                           for i in range(query_sides[0]) for j in range(query_sides[1])]
            rows, columns = (torch.tensor(axis) for axis in zip(*cells))
            query_rows, query_columns = (torch.tensor(axis) for axis in zip(*query_cells))
            keys, values = (part[:, rows, columns].transpose(1, 2) for part in (k, v))
            queries = q[:, query_rows, query_columns].transpose(1, 2)  # (B, H, Q, d)
            probabilities = (queries @ keys.transpose(-2, -1) * width ** -0.5).softmax(-1)
            output = (probabilities @ values).transpose(1, 2).flatten(2)  # (B, Q, H * d)
            pre_projection[:, query_rows, query_columns] = output
            windows.append(dict(attn=probabilities, v=values, pre_projection=output,
                                cells=cells))
    y = shortcut + F.linear(pre_projection, attention.proj.weight, attention.proj.bias)
    y = y + layer.mlp(layer.layernorm_after(y))
    return dict(out=y, windows=windows, grid=(height, grid_width))


def explicit_daam(model: nn.Module, images: Tensor, target=None,
                  interpolate_pos_encoding: bool = False) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    backbone = getattr(model, "hiera", model)
    stride = backbone.config.query_stride
    blocks: List[Dict] = []
    with torch.enable_grad():
        tokens, _, _ = backbone.embeddings(  # (B, N, C), the grid row by row
            images.double(), interpolate_pos_encoding=interpolate_pos_encoding)
        patch_stride = backbone.config.patch_stride
        grid = (images.shape[-2] // patch_stride[0], images.shape[-1] // patch_stride[1])
        x = tokens.unflatten(1, grid)
        for stage in backbone.encoder.stages:
            for layer in stage.layers:
                record = explicit_layer(layer, x, stride)
                blocks.append(record)
                x = record["out"]
        scores = backbone.pooler(x.flatten(1, 2))  # the mean of the tokens, in any order
        classifier = getattr(model, "classifier", None)
        logits = scores if classifier is None else classifier(scores)
        return windowed_reference(blocks, logits, target)


def unrolled_cells_by_hand(grid, stride, levels: int) -> Tensor:
    """(N,) the cell (row-major) of each token in the order ``levels`` unrolls at ``stride``
    leave them: each unroll moves the offset within a stride neighbourhood in front of the
    coarser grid, so token t = ((o_1 * S + o_2) * S + ...) * n + c, with o_l the offset at
    level l (S = stride area) and c the cell on the grid left after all levels (n cells)."""
    height, width = grid
    step_h, step_w = stride
    coarse_h, coarse_w = height // step_h ** levels, width // step_w ** levels
    cells = torch.empty(height * width, dtype=torch.long)
    for row in range(height):
        for column in range(width):
            token = 0
            for level in range(levels):
                offset = (row // step_h ** level % step_h) * step_w + (
                    column // step_w ** level % step_w)
                token = token * step_h * step_w + offset
            coarse = (row // step_h ** levels) * coarse_w + column // step_w ** levels
            cells[token * coarse_h * coarse_w + coarse] = row * width + column
    return cells


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #


def small_hiera(classifier: bool = True, seed: int = 2, **overrides) -> nn.Module:
    """A narrow Hiera on 64x64 images (a 16x16 token grid, mask units of 8x8 tokens); the
    noise ``seed`` chosen so that no block map of the tests' images is zero everywhere."""
    options = dict(image_size=[64, 64], embed_dim=16, depths=[1, 2, 2, 1],
                   num_heads=[1, 1, 2, 2], mlp_ratio=2.0, num_labels=NUM_CLASSES)
    options.update(overrides)
    torch.manual_seed(0)
    config = transformers.HieraConfig(**options)
    model = (transformers.HieraForImageClassification(config) if classifier
             else transformers.HieraModel(config))
    return add_parameter_noise(model, seed=seed)


MODELS = {
    # units in stages 1-2 and the first layer of 3, global after; three poolings
    "three_poolings": {},
    # two poolings: the last stage keeps a level of the unroll; units in stage 3 and, lagging,
    # in the first layer of stage 4 (units of one token)
    "two_poolings": dict(num_query_pool=2, masked_unit_attention=[True, False, True, False]),
}
CASES = [("classifier", TARGETS), ("classifier", None), ("bare", TARGETS)]
CASE_IDS = ["classifier-targets", "classifier-predicted", "bare-targets"]


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind, target", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("key", list(MODELS))
def test_flow_and_block_maps_equal_explicit_reference(key, kind, target):
    model = small_hiera(classifier=kind == "classifier", **MODELS[key])
    images = make_images(3, 64, 64)
    expected = explicit_daam(model, images, target)
    with torch.no_grad():
        assert_close_relative(expected["logits"], adapter_for(model).output_scores(
            model(images)).double(), 1e-5)
    assert len(expected["block_maps"]) == 6
    assert_maps_on_block_grids_match(model, images, target, expected)


def test_interpolated_position_encoding_takes_another_image_size():
    model = small_hiera()
    images = make_images(2, 64, 96)  # a 16x24 token grid: 2x3 mask units
    expected = explicit_daam(model, images, TARGETS[:2], interpolate_pos_encoding=True)
    with torch.no_grad():
        logits = model(images, interpolate_pos_encoding=True).logits
    assert_close_relative(expected["logits"], logits.double(), 1e-5)
    adapter = HFHieraAdapter(model, interpolate_pos_encoding=True)
    daam = DAAM(lambda x: model(x, interpolate_pos_encoding=True), adapter=adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blocks = daam.attribute(images, target=TARGETS[:2], block_grids=True, accumulate=False)
        flow = daam.attribute(images, target=TARGETS[:2], return_flow=True)
    for block, reference_map in zip(blocks, expected["block_maps"], strict=True):
        assert_close_relative(block[:, 0], reference_map)
        assert float(reference_map.amax()) > 0
    assert tuple(flow.shape) == (2, 6, 16, 24)
    assert_close_relative(flow, expected["flow"])
    assert module_hook_count(model) == 0


@pytest.mark.parametrize("key", list(MODELS))
def test_layouts_follow_the_unroll_and_mask_units_built_by_hand(key):
    model = small_hiera(**MODELS[key])
    adapter = adapter_for(model)
    config = model.config
    layouts = adapter.block_layouts(adapter.attention_modules(), (64, 64))
    grid, levels = (16, 16), len(config.depths) - 1  # HieraModel unrolls once per stage but one
    for attention, layout in zip(adapter.attention_modules(), layouts, strict=True):
        cells = unrolled_cells_by_hand(grid, config.query_stride, levels)
        unit_area = attention.query_stride * attention.window_size
        units = len(cells) // unit_area if attention.use_mask_unit_attn else 1
        # token j * units + u lies in unit u
        expected = torch.stack([cells[unit::units] for unit in range(units)])
        assert layout.grid == grid and torch.equal(layout.positions, expected)
        assert_each_cell_in_one_window(layout)
        if attention.use_mask_unit_attn:  # every unit an aligned square of the grid
            side = math.isqrt(unit_area)
            for unit_cells in expected.tolist():
                rows = {cell // grid[1] // side for cell in unit_cells}
                columns = {cell % grid[1] // side for cell in unit_cells}
                assert len(rows) == len(columns) == 1
        if attention.query_stride > 1:
            grid, levels = (grid[0] // 2, grid[1] // 2), levels - 1


def test_default_architecture_is_taken_with_a_unit_for_every_cell():
    with torch.device("meta"):  # facebook/hiera-tiny-224-hf's architecture
        model = transformers.HieraForImageClassification(transformers.HieraConfig())
    adapter = adapter_for(model)
    layouts = adapter.block_layouts(adapter.attention_modules(), (224, 224))
    assert [layout.grid[0] for layout in layouts] == [56] * 3 + [28] * 3 + [14] * 16 + [7] * 2
    for layout in layouts:
        assert_each_cell_in_one_window(layout)


def test_registry_picks_the_adapter_and_reports_the_model_shape():
    model, bare = small_hiera(), small_hiera(classifier=False)
    adapter = adapter_for(model)
    assert isinstance(adapter, HFHieraAdapter) and isinstance(adapter_for(bare), HFHieraAdapter)
    assert adapter.attention_modules() == [
        layer.attn for stage in model.hiera.encoder.stages for layer in stage.layers]
    assert not adapter.has_class_token and adapter.head_queries is None
    assert (adapter.in_channels, adapter.num_outputs, adapter.outputs_features) == (
        3, NUM_CLASSES, False)
    assert (adapter_for(bare).num_outputs, adapter_for(bare).outputs_features) == (128, True)
    assert adapter.grid_size((64, 64)) == (16, 16)


def test_supports_is_false_while_transformers_hiera_is_not_loaded(monkeypatch):
    model = small_hiera()
    monkeypatch.delitem(sys.modules, "transformers.models.hiera.modeling_hiera")
    assert HFHieraAdapter.supports(model) is False
    assert HFHieraAdapter.supports(nn.Linear(2, 2)) is False


def test_other_image_sizes_are_refused_before_any_work():
    model = small_hiera()
    assert_refused_before_any_work(model, make_images(1, 64, 96),
                                   r"takes 64x64 images .*got 64x96.*interpolate_pos_encoding")
    calls = []

    def forward(images):
        calls.append(images)
        return model(images, interpolate_pos_encoding=True).logits

    daam = DAAM(forward, adapter=HFHieraAdapter(model, interpolate_pos_encoding=True))
    with pytest.raises(ValueError, match=r"multiples of 32x32 .*got 64x80"):
        daam.attribute(make_images(1, 64, 80), target=0)
    assert calls == [] and module_hook_count(model) == 0


def test_mae_model_is_refused():
    config = transformers.HieraConfig(image_size=[64, 64], embed_dim=16, depths=[1, 1, 1, 1],
                                      num_heads=[1, 1, 1, 1])
    with pytest.raises(TypeError, match="is_mae=True"):
        adapter_for(transformers.HieraModel(config, is_mae=True))


def test_bare_model_without_pooler_is_refused_and_leaves_no_hook():
    torch.manual_seed(0)
    config = transformers.HieraConfig(image_size=[64, 64], embed_dim=16, depths=[1, 1, 1, 1],
                                      num_heads=[1, 1, 1, 1])
    model = transformers.HieraModel(config, add_pooling_layer=False).eval()
    with pytest.raises(ValueError, match="without pooler_output"):
        DAAM(model).attribute(make_images(1, 64, 64), target=0)
    assert module_hook_count(model) == 0
