"""DAAM's Captum surface: targets, shapes, hygiene after success and failure, clear errors."""

import pickle
import threading
import warnings

import pytest
import timm
import torch
from captum.attr import GradientAttribution, LayerAttribution
from torch import nn

import test_adapter_hf as hf
import test_adapter_torchvision as tv
from captum_daam import DAAM, AttentionRollout, GradientRollout
from captum_daam.adapters import adapter_for, supported_families
from helpers import assert_close_relative, make_images, make_model, module_hook_count
from reference import explicit_daam


@pytest.fixture(scope="module")
def model():
    return make_model("deit_tiny_patch16_224")


@pytest.fixture(scope="module")
def images():
    return make_images(3)


@pytest.fixture(scope="module")
def reference_maps(model, images):
    """Reference block maps per class for the three images, computed once."""
    return {target: explicit_daam(model, images, target=target)["flow"] for target in (11, 500)}


def test_is_a_captum_layer_and_gradient_attribution(model):
    daam = DAAM(model)
    assert isinstance(daam, LayerAttribution)
    assert isinstance(daam, GradientAttribution)
    assert daam.layer == [block.attn for block in model.blocks]
    assert daam.forward_func is model
    assert daam.multiplies_by_inputs is False


@pytest.mark.parametrize(
    "target",
    [11, torch.tensor(11), torch.tensor([11]), [11, 11, 11], (11,), torch.tensor([11, 11, 11])],
    ids=["int", "scalar_tensor", "one_element_tensor", "list", "one_tuple", "tensor"],
)
def test_every_captum_target_form_selects_the_same_class(model, images, reference_maps, target):
    flow = DAAM(model).attribute(images, target=target, return_flow=True)
    assert_close_relative(flow, reference_maps[11])


def test_per_example_targets(model, images, reference_maps):
    flow = DAAM(model).attribute(images, target=[11, 500, 11], return_flow=True)
    assert_close_relative(flow[[0, 2]], reference_maps[11][[0, 2]])
    assert_close_relative(flow[1:2], reference_maps[500][1:2])


def test_attributions_are_raw_nonnegative_detached_and_on_the_input_dtype(model, images):
    maps = DAAM(model).attribute(images, return_flow=True)
    assert maps.dtype == images.dtype and maps.device == images.device
    assert not maps.requires_grad
    assert (maps >= 0).all()
    assert maps.amax() > 0
    # raw, not normalised: the flow only grows from block to block
    assert (maps[:, 1:] - maps[:, :-1] >= 0).all()


def test_captum_interpolate_brings_maps_to_the_image(model, images):
    final = DAAM(model).attribute(images, target=0)
    upsampled = LayerAttribution.interpolate(final, (224, 224), "bilinear")
    assert upsampled.shape == (3, 1, 224, 224)


def test_calls_in_a_row_are_independent(model, images, reference_maps):
    daam = DAAM(model)
    first = daam.attribute(images, target=11, return_flow=True)
    daam.attribute(make_images(2, seed=9), target=[1, 2], return_flow=True)
    daam.attribute(images, target=500)
    again = daam.attribute(images, target=11, return_flow=True)
    assert torch.equal(first, again)
    assert_close_relative(again, reference_maps[11])


def test_works_under_no_grad(model, images, reference_maps):
    with torch.no_grad():
        flow = DAAM(model).attribute(images, target=11, return_flow=True)
        assert not torch.is_grad_enabled()
    assert_close_relative(flow, reference_maps[11])


def test_inference_mode_raises_a_clear_error(model, images):
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            DAAM(model).attribute(images, target=0)
    with torch.inference_mode():
        inference_images = images.clone()
    with pytest.raises(RuntimeError, match="inference_mode"):
        DAAM(model).attribute(inference_images, target=0)
    assert module_hook_count(model) == 0


def test_pickled_daam_gives_the_same_maps(model, images):
    daam = DAAM(model)
    expected = daam.attribute(images, target=11)
    restored = pickle.loads(pickle.dumps(daam))
    assert_close_relative(restored.attribute(images, target=11), expected, 1e-6)


def test_one_daam_shared_by_threads(model):
    daam = DAAM(model)
    batches = [make_images(2, seed=seed) for seed in range(4)]
    expected = [
        daam.attribute(batch, target=[seed, seed + 1]) for seed, batch in enumerate(batches)
    ]
    results = [None] * len(batches)
    errors = []

    def work(index):
        try:
            for _ in range(2):
                results[index] = daam.attribute(batches[index], target=[index, index + 1])
        except Exception as error:  # reported below, with the thread's error
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for result, reference in zip(results, expected):
        assert_close_relative(result, reference, 1e-5)
    assert module_hook_count(model) == 0


def test_a_wrapped_forward_with_an_explicit_adapter(model, images, reference_maps):
    mean = torch.tensor([0.2, 0.1, 0.3]).view(1, 3, 1, 1)

    def forward(x, shift):
        return model(x - shift)

    flow = DAAM(forward, adapter=adapter_for(model)).attribute(
        images + mean, target=11, additional_forward_args=(mean,), return_flow=True
    )
    assert_close_relative(flow, reference_maps[11])


# ----------------------------------------------------------------- hygiene


def _state(model):
    return {
        "training": [module.training for module in model.modules()],
        "requires_grad": [parameter.requires_grad for parameter in model.parameters()],
        "grads": [
            None if parameter.grad is None else parameter.grad.clone()
            for parameter in model.parameters()
        ],
        "hooks": module_hook_count(model),
    }


def _assert_same_state(before, after):
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"] == 0
    for grad_before, grad_after in zip(before["grads"], after["grads"]):
        if grad_before is None:
            assert grad_after is None
        else:
            assert torch.equal(grad_before, grad_after)


@pytest.fixture()
def used_model():
    """A model in a mixed state: some grads set, some parameters frozen, a block in train mode."""
    model = make_model("deit_tiny_patch16_224", seed=3)
    model.blocks[0].attn.qkv.weight.grad = torch.full_like(model.blocks[0].attn.qkv.weight, 0.5)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    model.patch_embed.proj.weight.requires_grad_(False)
    model.blocks[4].mlp.train()
    return model


def test_nothing_is_left_behind_after_a_successful_call(used_model):
    before = _state(used_model)
    DAAM(used_model).attribute(make_images(2), target=[1, 2], return_flow=True)
    DAAM(used_model).attribute(make_images(2), target=None)
    _assert_same_state(before, _state(used_model))


def test_inputs_that_require_grad_get_no_gradient(used_model):
    images = make_images(2).requires_grad_()
    DAAM(used_model).attribute(images, target=[1, 2])
    assert images.grad is None and images.requires_grad


def test_training_mode_warns_and_is_kept(used_model):
    used_model.train()
    before = _state(used_model)
    with pytest.warns(UserWarning, match="training mode") as caught:
        DAAM(used_model).attribute(make_images(2), target=[1, 2])
    _assert_same_state(before, _state(used_model))
    assert caught[0].filename == __file__  # attributed to the caller's line


def test_class_rows_of_a_pooled_model_warn_at_the_callers_line():
    model = make_model("deit_tiny_patch16_224", global_pool="avg", depth=2)
    with pytest.warns(UserWarning, match="global_pool='avg'") as caught:
        DAAM(model).attribute(make_images(1), target=0, queries="class")
    assert caught[0].filename == __file__


class _Boom(RuntimeError):
    pass


def test_nothing_is_left_behind_when_the_forward_raises(used_model):
    before = _state(used_model)

    def failing_forward(x):
        used_model(x)
        raise _Boom("forward failed after the blocks ran")

    with pytest.raises(_Boom):
        DAAM(failing_forward, adapter=adapter_for(used_model)).attribute(make_images(2), target=1)
    _assert_same_state(before, _state(used_model))


BAD_CALLS = {
    "not_4d": (lambda: torch.rand(3, 224, 224), {}, ValueError, r"\(B, 3, H, W\).*\(3, 224, 224\)"),
    "wrong_channels": (lambda: torch.rand(2, 1, 224, 224), {}, ValueError, r"\(B, 3, H, W\)"),
    "wrong_size": (lambda: torch.rand(2, 3, 160, 224), {}, ValueError, r"224x224.*160x224"),
    "nan": (
        lambda: make_images(2).index_fill(2, torch.tensor([5]), float("nan")),
        {},
        ValueError,
        "finite",
    ),
    "inf": (
        lambda: make_images(2).index_fill(3, torch.tensor([0]), float("inf")),
        {},
        ValueError,
        "finite",
    ),
    "integer_images": (
        lambda: torch.zeros(2, 3, 224, 224, dtype=torch.uint8),
        {},
        TypeError,
        "floating",
    ),
    "target_too_big": (lambda: make_images(2), {"target": 1000}, ValueError, r"0\.\.999.*1000"),
    "target_negative": (lambda: make_images(2), {"target": -1}, ValueError, "-1"),
    "target_list_too_big": (lambda: make_images(2), {"target": [3, 1200]}, ValueError, "1200"),
    "target_wrong_length": (
        lambda: make_images(2),
        {"target": [1, 2, 3]},
        ValueError,
        r"one target per example \(2\), got 3",
    ),
    "target_tensor_wrong_length": (
        lambda: make_images(2),
        {"target": torch.tensor([1, 2, 3])},
        ValueError,
        r"\(2\), got 3",
    ),
    "target_float": (
        lambda: make_images(2),
        {"target": torch.tensor([1.0, 2.0])},
        TypeError,
        "integer",
    ),
    "target_2d": (
        lambda: make_images(2),
        {"target": torch.zeros(2, 2, dtype=torch.long)},
        ValueError,
        "shape",
    ),
    "target_string": (lambda: make_images(2), {"target": "cat"}, TypeError, "target"),
    "two_inputs": (lambda: (make_images(2), make_images(2)), {}, ValueError, "one image tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_before_the_forward_and_leaves_nothing(used_model, case):
    make_inputs, kwargs, error_type, message = BAD_CALLS[case]
    before = _state(used_model)
    calls = []
    handle = used_model.patch_embed.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(error_type, match=message):
            DAAM(used_model).attribute(make_inputs(), **kwargs)
    finally:
        handle.remove()
    assert calls == [], "the model ran before the error"
    _assert_same_state(before, _state(used_model))


@pytest.mark.parametrize("method_class", [DAAM, AttentionRollout, GradientRollout])
@pytest.mark.parametrize("converts", ["transformers_vit", "forward_function"])
def test_a_model_that_converts_the_images_itself_takes_another_dtype(method_class, converts):
    """transformers' ViT casts pixel_values to its own dtype, as may a forward function in
    front of the model: float64 images give the float32 images' maps, not a dtype error."""
    model = hf.make_hf_vit("sdpa")
    if converts == "transformers_vit":
        method = method_class(model)
    else:
        method = method_class(lambda images: model(images.float()), adapter=adapter_for(model))
    images = make_images(2, 64, 64)
    maps = method.attribute(images.double(), target=[1, 2])
    assert maps.dtype == torch.float64
    assert_close_relative(maps, method.attribute(images, target=[1, 2]), 1e-6)


def test_empty_layer_list_is_rejected(model):
    with pytest.raises(ValueError, match="at least one attention module"):
        DAAM(model, layer=[])


def test_a_module_that_is_not_an_attention_module_is_rejected(model):
    with pytest.raises(ValueError, match="not one of its 12 attention modules"):
        DAAM(model, layer=[model.blocks[0].attn, model.blocks[0].mlp])
    other = make_model("deit_tiny_patch16_224", seed=1)
    with pytest.raises(ValueError, match="attention modules"):
        DAAM(model, layer=other.blocks[3].attn)
    with pytest.raises(ValueError, match="repeats"):
        DAAM(model, layer=[model.blocks[1].attn, model.blocks[1].attn])


@pytest.mark.parametrize(
    "unsupported",
    [nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()), nn.Linear(4, 2)],
    ids=["cnn", "linear"],
)
def test_an_unsupported_model_points_to_the_list_of_supported_families(unsupported):
    with pytest.raises(TypeError) as raised:
        DAAM(unsupported)
    message = str(raised.value)
    assert type(unsupported).__name__ in message
    assert "captum-daam check --list" in message and len(message.splitlines()) <= 3
    assert not any(family in message for family in supported_families())
    assert "ViTAdapter" in message and "register_adapter" in message
    assert module_hook_count(unsupported) == 0


def test_a_vit_without_class_token_is_explained_by_every_row_and_refuses_class_rows():
    model = make_model(
        "vit_small_patch16_224", img_size=64, depth=2, class_token=False, global_pool="avg"
    )
    daam = DAAM(model)
    assert daam.attribute(make_images(1, 64, 64), target=0).shape == (1, 1, 4, 4)
    with pytest.raises(ValueError, match="without one .*queries='all', its default"):
        daam.attribute(make_images(1, 64, 64), target=0, queries="class")
    assert module_hook_count(model) == 0


def test_a_callable_without_adapter_is_rejected(model):
    with pytest.raises(TypeError, match="adapter"):
        DAAM(lambda x: model(x))


def test_a_forward_that_does_not_return_class_scores_is_rejected(model):
    daam = DAAM(lambda x: model.forward_features(x), adapter=adapter_for(model))
    with pytest.raises(ValueError, match=r"\(B, K\).*got a tensor shaped \(2, 197, 192\)"):
        daam.attribute(make_images(2), target=1)
    assert module_hook_count(model) == 0


def test_a_forward_whose_scores_ignore_the_blocks_is_rejected(model):
    daam = DAAM(lambda x: model(x).detach(), adapter=adapter_for(model))
    with pytest.raises(ValueError, match="do not depend on the model's attention blocks"):
        daam.attribute(make_images(2), target=1)
    assert module_hook_count(model) == 0


def test_the_docstring_examples_run():
    import doctest
    import importlib

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for name in ("attr.daam", "ssl", "data", "zoo", "visualization"):
        module = importlib.import_module(f"captum_daam.{name}")
        examples = [test for test in finder.find(module) if test.examples]
        assert examples, f"no docstring example in captum_daam.{name}"
        for test in examples:
            runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def _headless_torchvision_vit():
    model = tv.small_model(num_layers=2)
    model.heads = nn.Identity()
    return model


BACKBONES = {  # name: (backbone without a classifier head, the same architecture with one)
    "timm": (
        lambda: make_model("vit_small_patch16_224", img_size=64, depth=2, num_classes=0),
        lambda: make_model("vit_small_patch16_224", img_size=64, depth=2, num_classes=10),
    ),
    "torchvision": (_headless_torchvision_vit, lambda: tv.small_model(num_layers=2)),
    "hugging_face": (
        lambda: hf.make_hf_vit("sdpa", with_head=False),
        lambda: hf.make_hf_vit("sdpa"),
    ),
}


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_no_target_on_a_backbone_without_head_warns_at_the_callers_line(family):
    make_backbone, make_classifier = BACKBONES[family]
    backbone, images = make_backbone(), make_images(2, 64, 64)
    assert DAAM(backbone).adapter.outputs_features
    for method in (DAAM, GradientRollout):
        with pytest.warns(UserWarning, match="no classifier head") as caught:
            method(backbone).attribute(images)
        assert caught[0].filename == __file__
    width = DAAM(backbone).adapter.num_outputs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what a backbone is explained with does not warn
        DAAM(backbone).attribute(images, target=1)
        DAAM(backbone).attribute(images, importance=torch.rand(width))
        AttentionRollout(backbone).attribute(images)
        classifier = make_classifier()  # and a model with a head predicts a class
        assert not DAAM(classifier).adapter.outputs_features
        DAAM(classifier).attribute(images)
        GradientRollout(classifier).attribute(images)


def test_maps_that_are_zero_everywhere_warn_at_the_callers_line():
    model = tv.small_model(num_layers=2)
    with torch.no_grad():
        model.heads.head.weight[1] = 0  # class 1's score no longer depends on the image
    images = make_images(3, 64, 64)
    for method in (DAAM, GradientRollout):
        with pytest.warns(
            UserWarning, match=r"zero everywhere for 2 of 3 examples \(0, 2\)"
        ) as caught:
            maps = method(model).attribute(images, target=[1, 2, 1])
        assert caught[0].filename == __file__
        assert maps[[0, 2]].abs().amax() == 0 and maps[1].amax() > 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            method(model).attribute(images, target=[2, 3, 2])


def test_a_model_without_attention_is_refused_as_such_and_one_with_unknown_attention_named():
    convolutional = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    with pytest.raises(TypeError, match="has no attention module .*a convolutional or MLP"):
        DAAM(convolutional)

    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, tokens):
            return self.mix(tokens, tokens, tokens)[0].mean(1)

    with pytest.raises(TypeError, match="Its attention modules \\(MultiheadAttention\\) are of no"):
        DAAM(Mixer())


@pytest.mark.parametrize("name", ["resnest14d", "skresnet18", "edgenext_xx_small"])
def test_a_model_whose_attention_weighs_channels_is_refused_for_mixing_no_tokens(name):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    refusal = "Its attention modules mix no tokens \\(.*Attn: .*convolutional"
    with pytest.raises(TypeError, match=refusal):
        DAAM(model)
