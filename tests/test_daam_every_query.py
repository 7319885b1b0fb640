"""DAAM for heads that pool the tokens (queries='all') equals an explicit reference.

The reference (reference.explicit_daam with queries="all") forms every block's attention as
an explicit (B, H, N, N) matrix, takes the gradient at every row of the attention output with
plain autograd, and builds the full (B, N, N, C) contributions of every query row,
F[b, i, n, (h, e)] = A[b, h, i, n] * v[b, h, n, e], before weighting and summing them.
"""

import warnings

import pytest
import torch

import captum_daam.decompose as decompose
from captum_daam import DAAM
from helpers import (
    assert_attributions_match,
    assert_close_relative,
    make_images,
    make_model,
    module_hook_count,
    set_fused_attention,
)
from reference import explicit_daam, explicit_forward

TARGETS = [3, 7, 1]


def small_vit(global_pool: str = "avg", **kwargs):
    options = dict(img_size=64, depth=3, embed_dim=96, num_heads=3, num_classes=10)
    return make_model("vit_small_patch16_224", global_pool=global_pool, **{**options, **kwargs})


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
def test_a_pooled_vit_is_explained_by_every_query_row_by_default(pool, fused):
    model = set_fused_attention(small_vit(pool), fused)
    images = make_images(3, 64, 64)
    with torch.no_grad():
        reproduced = explicit_forward(model, images)["logits"]
        assert_close_relative(reproduced, model(images), 1e-5)  # the reference is the model
    expected = explicit_daam(model, images, target=TARGETS, queries="all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default explains the pooled output: no warning
        flow = assert_attributions_match(DAAM(model), images, TARGETS, expected)
    assert float(expected["block_maps"][:, -1].amax()) > 0  # the last block reaches the output
    class_rows = explicit_daam(model, images, target=TARGETS)["flow"]
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_relative(flow, class_rows, 1e-2)  # not the [class] rows under another name


def test_every_row_contribution_sums_to_the_attention_output_of_its_row():
    """The decomposition the reference builds adds up to each row of the attention output."""
    model = small_vit()
    images = make_images(2, 64, 64)
    expected = explicit_daam(model, images, target=[1, 2], queries="all")
    blocks = explicit_forward(model.double(), images.double())["blocks"]
    for contribution, block in zip(expected["contributions"], blocks):
        assert contribution.shape == (2, 17, 17, 96)
        assert_close_relative(contribution.sum(dim=2), block["pre_projection"].detach(), 1e-10)


def test_predicted_class_and_a_vit_reading_the_class_token_explained_by_every_row():
    model = small_vit("token")
    images = make_images(3, 64, 64)
    expected = explicit_daam(model, images, target=None, queries="all")
    assert_attributions_match(DAAM(model), images, None, expected, queries="all")
    class_rows = explicit_daam(model, images, target=None)
    assert_attributions_match(DAAM(model), images, None, class_rows)  # still the default


def test_self_supervised_importance_uses_signed_gradients_of_every_row():
    model = small_vit(num_classes=0)
    images = make_images(2, 64, 64)
    weights = torch.rand(2, 96, generator=torch.Generator().manual_seed(3))
    expected = explicit_daam(
        model, images, importance=weights, relu_gradients=False, queries="all"
    )
    flow = DAAM(model).attribute(images, importance=weights, return_flow=True)
    assert_close_relative(flow, expected["flow"])


def test_internal_batch_size_gives_the_same_maps():
    model = small_vit()
    images = make_images(5, 64, 64)
    whole = DAAM(model).attribute(images, target=2, return_flow=True)
    chunked = DAAM(model).attribute(images, target=2, return_flow=True, internal_batch_size=2)
    assert_close_relative(chunked, whole, 1e-6)


@pytest.mark.parametrize("rows_per_chunk", [1, 3, None], ids=["1 row", "3 rows", "default"])
def test_no_blocks_full_attention_is_formed_and_the_maps_stay_exact(monkeypatch, rows_per_chunk):
    """Every row of softmax attention is mixed a chunk of query rows at a time: the full
    (B, H, N, N) probabilities are never formed by attention_probabilities, nor as one chunk
    when the chunk is smaller, and the maps equal the explicit reference's, which forms them."""

    def refuse(*args, **kwargs):
        raise AssertionError("a block's full attention was formed")

    monkeypatch.setattr(decompose, "attention_probabilities", refuse)
    batch, heads, tokens = 2, 3, 17  # 16 patches and the [class] token
    if rows_per_chunk is not None:
        monkeypatch.setattr(
            decompose.SoftmaxAttention, "chunk_elements", rows_per_chunk * batch * heads * tokens
        )
    chunk_shapes = []
    original_softmax = torch.Tensor.softmax

    def recording_softmax(tensor, *args, **kwargs):
        chunk_shapes.append(tuple(tensor.shape))
        return original_softmax(tensor, *args, **kwargs)

    model = small_vit(depth=4)
    images = make_images(batch, 64, 64)
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "softmax", recording_softmax)
        flow = DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    expected = explicit_daam(model, images, target=[1, 2], queries="all")
    assert_close_relative(flow, expected["flow"])
    if rows_per_chunk is not None:  # the default chunk holds all 17 rows of this small model
        assert (batch * heads, rows_per_chunk, tokens) in chunk_shapes
        assert not any(shape[-2:] == (tokens, tokens) for shape in chunk_shapes)


def test_every_row_is_refused_for_class_attention_blocks_before_any_work():
    model = make_model("cait_xxs24_224", img_size=32, depth=1, depth_token_only=1)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match="class-attention blocks.*queries='all'"):
        DAAM(model).attribute(make_images(1, 32, 32), target=0, queries="all")
    assert calls == []
    assert module_hook_count(model) == 1  # only the test's own hook


def test_an_unknown_queries_value_is_refused():
    expected = "Expected queries to be 'class', 'head' or 'all', got 'cls'"
    with pytest.raises(ValueError, match=expected):
        DAAM(small_vit()).attribute(make_images(1, 64, 64), target=0, queries="cls")


def test_block_grids_gives_the_block_maps_each_on_its_grid():
    """One grid: the list holds the block maps of return_flow=True, accumulate=False."""
    model = small_vit("token")
    images = make_images(2, 64, 64)
    daam = DAAM(model)
    blocks = daam.attribute(images, target=[1, 2], block_grids=True, accumulate=False)
    maps = daam.attribute(images, target=[1, 2], return_flow=True, accumulate=False)
    assert isinstance(blocks, list) and len(blocks) == 3
    for index, block in enumerate(blocks):
        assert block.shape == (2, 1, 4, 4)
        torch.testing.assert_close(block[:, 0], maps[:, index])
    as_tuples = daam.attribute((images,), target=[1, 2], block_grids=True, accumulate=False)
    assert all(isinstance(block, tuple) and len(block) == 1 for block in as_tuples)


@pytest.mark.parametrize(
    "options", [dict(), dict(accumulate=False, return_flow=True),
                dict(accumulate=False, input_shaped=True)], ids=["accumulate", "flow", "shaped"]
)
def test_block_grids_with_options_it_rules_out_is_refused(options):
    with pytest.raises(ValueError, match="block_grids=True"):
        DAAM(small_vit()).attribute(make_images(1, 64, 64), target=0, block_grids=True, **options)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
@pytest.mark.parametrize("registers", [0, 4], ids=["gap", "registers_gap"])
def test_a_vit_without_class_token_is_explained_by_every_query_row(registers, target, fused):
    """vit_*_gap and the register-gap ViTs: no [class] token; the registers are prefix tokens,
    read as every other token, and kept off the grid."""
    model = set_fused_attention(
        small_vit("avg", class_token=False, reg_tokens=registers, fc_norm=True), fused
    )
    assert model.num_prefix_tokens == registers
    images = make_images(3, 64, 64)
    with torch.no_grad():
        assert_close_relative(explicit_forward(model, images)["logits"], model(images), 1e-5)
    expected = explicit_daam(model, images, target=target, queries="all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow = assert_attributions_match(DAAM(model), images, target, expected)
    assert flow.shape == (3, 3, 4, 4)
    assert float(expected["block_maps"][:, -1].amax()) > 0
