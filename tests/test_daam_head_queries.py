"""queries='head': the rows of the tokens the model's head reads, in every block. A distilled
DeiT's output is the mean of its [class] and [dist] heads; its default stays the paper's
[class] row, with a warning, and queries='head' explains both rows, equal to an explicit
reference (the attention formed by hand, the gradient at both rows by plain autograd, each
row's contributions weighted by its own gradient)."""

import warnings

import pytest

from captum_daam import DAAM
from helpers import (
    add_parameter_noise,
    assert_close_relative,
    make_images,
    make_model,
    set_fused_attention,
)
from reference import explicit_forward, explicit_gradients, maps_from_every_query_row

TARGETS = [3, 7, 1]


def distilled(**kwargs):
    model = make_model(
        "deit_tiny_distilled_patch16_224",
        img_size=32,
        patch_size=8,
        depth=3,
        num_classes=10,
        **kwargs,
    )
    return add_parameter_noise(model, 0.05, seed=0)  # timm starts both heads at zero


def explicit_rows(model, images, target, rows):
    """Block maps from the query ``rows`` alone, each weighted by its own gradient."""
    result, _, gradients = explicit_gradients(explicit_forward, model, images, target)
    blocks = [dict(block, attn=block["attn"][:, :, list(rows)]) for block in result["blocks"]]
    chosen = [gradient[:, list(rows)] for gradient in gradients]
    return maps_from_every_query_row(blocks, chosen, model.num_prefix_tokens, (4, 4))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_distilled_deit_explained_from_its_class_and_dist_rows(target, fused):
    model = set_fused_attention(distilled(), fused)
    images = make_images(3, 32, 32)
    expected = explicit_rows(model, images, target, (0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        flow = DAAM(model).attribute(images, target=target, return_flow=True, queries="head")
    assert_close_relative(flow, expected["flow"])


def test_distilled_deit_default_is_the_class_row_with_one_warning():
    model = distilled()
    images = make_images(3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        default = DAAM(model).attribute(images, target=TARGETS, return_flow=True)
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1 and "[dist]" in messages[0] and "queries='head'" in messages[0]
    class_row = explicit_rows(model, images, TARGETS, (0,))
    assert_close_relative(default, class_row["flow"])
    both = explicit_rows(model, images, TARGETS, (0, 1))["flow"]
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_relative(default, both, 1e-2)  # the [dist] row's share is real
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said explicitly: no warning
        DAAM(model).attribute(images, target=TARGETS, queries="class")


def test_head_is_class_or_all_for_other_heads():
    images = make_images(2, 32, 32)
    options = dict(img_size=32, patch_size=8, depth=2, num_classes=10)
    token = make_model("vit_small_patch16_224", **options)
    assert_close_relative(
        DAAM(token).attribute(images, target=[1, 2], queries="head"),
        DAAM(token).attribute(images, target=[1, 2], queries="class"),
        1e-6,
    )
    pooled = make_model("vit_small_patch16_224", global_pool="avg", **options)
    assert_close_relative(
        DAAM(pooled).attribute(images, target=[1, 2], queries="head"),
        DAAM(pooled).attribute(images, target=[1, 2], queries="all"),
        1e-6,
    )


def test_head_is_the_class_row_for_class_attention_blocks():
    model = make_model("cait_xxs24_224", img_size=32, depth=1, depth_token_only=1)
    images = make_images(2, 32, 32)
    assert_close_relative(
        DAAM(model).attribute(images, target=[1, 2], queries="head"),
        DAAM(model).attribute(images, target=[1, 2]),
        1e-6,
    )
