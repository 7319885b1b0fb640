"""Targets and importance weights are checked against what the forward function returns, not
against the width of the backbone inside it; and a processor's output is taken as inputs.

The width of the scores is known before the forward pass when the forward module is the
adapter's model (or an nn.Sequential ending in it), declares ``num_outputs``, or is an
nn.Sequential whose last module has ``out_features``; otherwise targets and importance weights
are checked right after the forward pass, before the backward pass. Each explained case is
compared with an explicit float64 reference (tests/reference.py: attention formed by hand,
plain autograd) whose scores equal the forward's own.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from captum_daam import DAAM, AttentionRollout, GradientRollout
from captum_daam.adapters import adapter_for
from helpers import (
    add_parameter_noise,
    assert_attributions_match,
    assert_close_relative,
    make_images,
    make_model,
    module_hook_count,
)
from reference import explicit_daam, explicit_forward, explicit_gradients, maps_from_explicit_blocks

NUM_CLASSES = 1000  # wider than the backbone's 64 features
EMBED_DIM = 64
TARGETS = [500, 7, 999]


def vit(num_classes: int) -> nn.Module:
    """A small timm ViT (64x64 images, a 4x4 grid, two blocks), its weights noised so that
    every block map has a positive value."""
    model = make_model(
        "vit_small_patch16_224", img_size=64, depth=2, embed_dim=EMBED_DIM, num_heads=2,
        num_classes=num_classes,
    )
    return add_parameter_noise(model, 0.05, seed=2)


def backbone_and_head(model: nn.Module):
    """``model`` as a headless backbone and its head: nn.Sequential(backbone, head) is model."""
    backbone = copy.deepcopy(model)
    backbone.reset_classifier(0)
    return backbone.eval(), copy.deepcopy(model.head)


def state(model: nn.Module) -> dict:
    return {
        "hooks": module_hook_count(model),
        "grads": [parameter.grad for parameter in model.parameters()],
        "requires_grad": [parameter.requires_grad for parameter in model.parameters()],
        "training": [module.training for module in model.modules()],
    }


def assert_nothing_left(model: nn.Module) -> None:
    """No hook, no gradient, no changed flag on ``model`` (every state() starts clean here)."""
    after = state(model)
    assert after["hooks"] == 0
    assert all(grad is None for grad in after["grads"])
    assert all(after["requires_grad"]) and not any(after["training"])


def forward_counter(model: nn.Module):
    calls = []
    handle = model.patch_embed.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def assert_every_block_positive(block_maps: torch.Tensor) -> None:
    assert bool((block_maps.flatten(2).amax(-1) > 0).all()), "a block map is zero everywhere"


# ----------------------------------------------------------------------------- the head


def test_a_sequential_with_a_linear_head_is_explained_for_the_heads_classes():
    """nn.Sequential(headless ViT, nn.Linear(64, 1000)): targets up to 999, not the
    backbone's 64 features; the maps are those of the ViT with that head."""
    model = vit(NUM_CLASSES)
    backbone, head = backbone_and_head(model)
    sequential = nn.Sequential(backbone, head).eval()
    images = make_images(3, 64, 64)
    expected = explicit_daam(model, images, TARGETS)
    with torch.no_grad():
        assert_close_relative(expected["logits"], sequential(images).double(), 1e-5)
    assert_every_block_positive(expected["block_maps"])

    flow = assert_attributions_match(DAAM(sequential), images, TARGETS, expected)
    assert_close_relative(flow, DAAM(model).attribute(images, target=TARGETS, return_flow=True))
    for method in (GradientRollout, AttentionRollout):
        maps = method(sequential).attribute(images, target=TARGETS)
        assert maps.shape == (3, 1, 4, 4) and bool(torch.isfinite(maps).all())
        assert bool((maps.flatten(1).amax(1) > 0).all())
        assert_close_relative(maps, method(model).attribute(images, target=TARGETS), 1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DAAM(sequential).attribute(images)  # the head predicts classes: no feature warning
    assert not [warning for warning in caught if "no classifier head" in str(warning.message)]

    calls, handle = forward_counter(backbone)
    try:
        for method in (DAAM, GradientRollout, AttentionRollout):
            with pytest.raises(ValueError, match="below the model's 1000 outputs .*got 1000"):
                method(sequential).attribute(images, target=[1, 2, NUM_CLASSES])
    finally:
        handle.remove()
    assert calls == []  # refused before the forward pass
    assert_nothing_left(sequential)


class TextScores(nn.Module):
    """Zero-shot scores over texts, as an image-text similarity module declares them."""

    def __init__(self, backbone: nn.Module, texts: torch.Tensor) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("texts", texts)
        self.num_outputs = texts.shape[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return zero_shot_scores(self.backbone(images), self.texts)


def zero_shot_scores(features: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    return 10 * F.normalize(features, dim=-1) @ F.normalize(texts.to(features.dtype), dim=-1).T


def explicit_zero_shot(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> dict:
    """The backbone run by hand (tests/reference.py), then the zero-shot scores."""
    result = explicit_forward(model, images)
    return dict(result, logits=zero_shot_scores(result["logits"], texts))


@pytest.mark.parametrize("forward", ["function", "module_declaring_num_outputs"])
def test_zero_shot_scores_over_more_texts_than_features_are_explained(forward):
    """A forward returning (B, 1000) zero-shot scores of a 64-feature backbone: target 900
    is explained; 1000 is refused, before the forward pass where the module declares its
    width, right after it otherwise, leaving nothing behind."""
    model = vit(NUM_CLASSES)
    backbone, _ = backbone_and_head(model)
    texts = torch.randn(NUM_CLASSES, EMBED_DIM, generator=torch.Generator().manual_seed(4))
    if forward == "function":
        daam = DAAM(lambda x: zero_shot_scores(backbone(x), texts), adapter=adapter_for(backbone))
    else:
        daam = DAAM(TextScores(backbone, texts).eval())
    images, targets = make_images(3, 64, 64), [900, 3, 512]
    result, _, gradients = explicit_gradients(explicit_zero_shot, backbone, images, targets, texts)
    with torch.no_grad():
        own = zero_shot_scores(backbone(images), texts)
    assert_close_relative(result["logits"], own.double(), 1e-5)
    expected = maps_from_explicit_blocks(
        result["blocks"], gradients, result["num_prefix_tokens"], result["grid_size"]
    )
    assert_every_block_positive(expected["block_maps"])
    assert_attributions_match(daam, images, targets, expected)

    calls, handle = forward_counter(backbone)
    try:
        with pytest.raises(ValueError, match="below the model's 1000 outputs .*got 1000"):
            daam.attribute(images, target=[900, 3, NUM_CLASSES])
    finally:
        handle.remove()
    assert calls == ([1] if forward == "function" else [])
    assert_nothing_left(backbone)


def test_importance_weights_of_a_projectors_width_are_explained():
    """nn.Sequential(ViT backbone, projector): importance weights of the projector's width
    (32), not the backbone's (64); the maps are those of the ViT with that head."""
    model = vit(32)
    backbone, projector = backbone_and_head(model)
    sequential = nn.Sequential(backbone, projector).eval()
    images = make_images(3, 64, 64)
    weights = torch.rand(3, 32, generator=torch.Generator().manual_seed(5))
    expected = explicit_daam(model, images, importance=weights, relu_gradients=False)
    with torch.no_grad():
        assert_close_relative(expected["logits"], sequential(images).double(), 1e-5)
    assert_every_block_positive(expected["block_maps"])
    assert_attributions_match(DAAM(sequential), images, None, expected, importance=weights)
    assert_attributions_match(
        DAAM(sequential), images, None, expected, importance=lambda features: weights
    )

    calls, handle = forward_counter(backbone)
    try:
        with pytest.raises(ValueError, match="output width 32, got width 64"):
            DAAM(sequential).attribute(images, importance=torch.ones(EMBED_DIM))
        assert calls == []  # the Sequential's width is known: refused before the forward
        through_function = DAAM(lambda x: sequential(x), adapter=adapter_for(backbone))
        with pytest.raises(ValueError, match="output width 32, got width 64"):
            through_function.attribute(images, importance=torch.ones(EMBED_DIM))
        assert calls == [1]  # known only from the forward pass, refused before the backward
    finally:
        handle.remove()
    assert_nothing_left(sequential)


@pytest.mark.parametrize("method", [DAAM, GradientRollout, AttentionRollout])
def test_out_of_range_targets_of_a_forward_function_leave_nothing_behind(method):
    """The width of a forward function's scores is known only from the forward pass: an
    out-of-range target is refused right after it, before the backward pass, and the model
    keeps no hook and gets no gradient."""
    model = vit(10)
    images = make_images(2, 64, 64)
    explained = method(lambda x: model(x)[:, :5], adapter=adapter_for(model))
    assert explained.attribute(images, target=[4, 0]).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"below the model's 5 outputs \(0..4\), got 7"):
        explained.attribute(images, target=[4, 7])
    assert_nothing_left(model)


# ----------------------------------------------------------------------------- the inputs


def small_hf_vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=10,
    )
    torch.manual_seed(0)
    return add_parameter_noise(transformers.ViTForImageClassification(config), 0.05, seed=2)


def processed_images(return_tensors: str = "pt"):
    """What a transformers image processor returns: a BatchFeature holding pixel_values."""
    generator = np.random.default_rng(0)
    images = [generator.integers(0, 256, (80, 72, 3), dtype=np.uint8) for _ in range(2)]
    processor = transformers.ViTImageProcessor(size={"height": 64, "width": 64})
    return processor(images=images, return_tensors=return_tensors)


@pytest.mark.parametrize("method", [DAAM, AttentionRollout, GradientRollout])
def test_a_processors_output_is_explained_by_its_pixel_values(method):
    model = small_hf_vit()
    batch = processed_images()
    assert isinstance(batch, transformers.BatchFeature)
    expected = method(model).attribute(batch["pixel_values"], target=[1, 2])
    assert expected.shape == (2, 1, 4, 4)
    assert torch.equal(method(model).attribute(batch, target=[1, 2]), expected)
    timm_model, images = vit(10), make_images(2, 64, 64)
    given = transformers.BatchFeature({"pixel_values": images, "pixel_mask": torch.ones(2, 64, 64)})
    assert torch.equal(
        method(timm_model).attribute(given, target=[1, 2]),
        method(timm_model).attribute(images, target=[1, 2]),
    )
    assert module_hook_count(model) == module_hook_count(timm_model) == 0


def test_other_mappings_are_refused_naming_their_keys():
    model = vit(10)
    calls, handle = forward_counter(model)
    try:
        with pytest.raises(TypeError, match="got dict with keys 'patches', 'mask' and no "
                                            "'pixel_values' tensor"):
            DAAM(model).attribute({"patches": torch.rand(2, 16, 768), "mask": None}, target=0)
        with pytest.raises(TypeError, match="pixel_values .* got ndarray.*return_tensors='pt'"):
            GradientRollout(model).attribute(processed_images("np"), target=0)
    finally:
        handle.remove()
    assert calls == []
    assert_nothing_left(model)
