"""A call keeps nothing alive: after it returns or raises, none of its tensors remain.

The autograd graph of a forward pass holds every block's saved activations; anything that
keeps one tensor of it alive past the call (a reference cycle through a tensor hook, which
Python's garbage collector cannot see through) keeps them all, and memory grows with every
call. The live tensors are counted after a first call (which may fill a model's caches) and
again after more calls: the count must not grow.
"""

import gc

import pytest
import torch
from captum.attr import LayerGradCam

import test_adapter_hf as hf
import test_adapter_torchvision as tv
from captum_daam import DAAM, AttentionRollout, GradientRollout, TokenGrid
from helpers import make_images, make_model

NUM_CLASSES = 11
TARGETS = [3, 7]


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


MODELS = {
    "timm_vit": lambda: make_model(
        "vit_small_patch16_224", img_size=64, depth=2, num_classes=NUM_CLASSES
    ),
    "timm_cait": lambda: make_model(
        "cait_xxs24_224", img_size=64, depth=2, num_classes=NUM_CLASSES
    ),
    "timm_eva": lambda: make_model(
        "eva02_tiny_patch14_224", img_size=56, depth=2, num_classes=NUM_CLASSES, global_pool="token"
    ),
    "torchvision": lambda: tv.small_model(num_layers=2),
    "hugging_face": lambda: hf.make_hf_vit("sdpa"),
}


def daam(model, images):
    return DAAM(model).attribute(images, target=TARGETS, return_flow=True)


def attention_rollout(model, images):
    return AttentionRollout(model).attribute(images)


def gradient_rollout(model, images):
    return GradientRollout(model).attribute(images, target=TARGETS)


def daam_with_a_failing_forward(model, images):
    def failing_forward(x):
        model(x)
        raise RuntimeError("the forward pass failed after the blocks ran")

    try:
        DAAM(failing_forward, adapter=DAAM(model).adapter).attribute(images, target=TARGETS)
    except RuntimeError as error:
        assert "failed after the blocks ran" in str(error)
    else:
        raise AssertionError("the failing forward did not raise")


CASES = [
    (name, method)
    for name in MODELS
    for method in (daam, daam_with_a_failing_forward, attention_rollout, gradient_rollout)
    # CaiT's decision forms in class-attention blocks, which the rollouts refuse.
    if not (name == "timm_cait" and method in (attention_rollout, gradient_rollout))
]


@pytest.mark.parametrize(
    "model_name, method", CASES, ids=[f"{name}-{method.__name__}" for name, method in CASES]
)
def test_repeated_calls_keep_no_tensors_alive(model_name, method):
    model = MODELS[model_name]()
    size = 56 if model_name == "timm_eva" else 64
    images = make_images(2, size, size)
    method(model, images)
    before = live_tensors()
    for _ in range(3):
        method(model, images)
    assert live_tensors() == before


def test_captum_layer_methods_on_a_token_grid_keep_no_tensors_alive():
    model = MODELS["timm_vit"]()
    images = make_images(2, 64, 64)

    def grad_cam():
        layer = TokenGrid(model, model.blocks[-1].norm1)
        LayerGradCam(model, layer).attribute(images, target=TARGETS, relu_attributions=True)

    grad_cam()
    before = live_tensors()
    for _ in range(3):
        grad_cam()
    assert live_tensors() == before
