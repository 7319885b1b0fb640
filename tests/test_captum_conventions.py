"""Captum's generic attribution properties, ported to DAAM, AttentionRollout and GradientRollout.

Captum checks every attribution method against the same properties: the forms of ``target``
(tests/attr/test_targets.py), no hook left behind after an error (test_hook_removal.py), the
same attributions through DataParallel and JIT (test_data_parallel.py, test_jit.py), the
splitting of inputs, targets and additional forward arguments into internal batches
(captum/attr/_utils/batching.py), and a tuple of inputs answered with a tuple. Here the same
ideas run on small timm models with random weights, for each of the package's three
attribution classes where the property applies (AttentionRollout has no target dependence).

Where this package deliberately differs from Captum (target=None, negative targets), the test
says so. Every expected value is either an explicit computation in the test or the same
attribution obtained another way (batch vs single example, split vs unsplit, wrapped vs plain).
"""

import copy
import re
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from captum.metrics import infidelity, sensitivity_max
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from captum_daam import DAAM, AttentionRollout, GradientRollout
from captum_daam.adapters import adapter_for
from helpers import assert_close_relative, make_images, make_model, module_hook_count

NUM_CLASSES = 10
TARGETS = [3, 7, 1]  # one class per example of the three-image batch

METHODS = {"DAAM": DAAM, "GradientRollout": GradientRollout, "AttentionRollout": AttentionRollout}
TARGETED = ["DAAM", "GradientRollout"]  # the methods whose maps depend on the target


def tiny_vit(**kwargs) -> nn.Module:
    """A three-block ViT on 32x32 images, a 4x4 patch grid, ten classes, random weights."""
    return make_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        depth=3,
        num_classes=NUM_CLASSES,
        **kwargs,
    )


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


@pytest.fixture(scope="module")
def cait():
    """CaiT decides in class-attention blocks: DAAM only (the rollouts refuse it)."""
    return make_model(
        "cait_xxs24_224", img_size=32, patch_size=8, depth=2, num_classes=NUM_CLASSES
    )


@pytest.fixture(scope="module")
def images():
    return make_images(3, 32, 32)


class _Probe:
    """Counts forward passes (at the patch embedding) and backward passes (at the final
    norm's output) of a timm ViT; its own hooks are removed by :meth:`remove`."""

    def __init__(self, model: nn.Module) -> None:
        self.forward_batches = []
        self.backward_calls = 0

        def on_forward(module, args):
            self.forward_batches.append(args[0].shape[0])

        def on_norm(module, args, output):
            if output.requires_grad:
                output.register_hook(self._on_backward)

        self.handles = [
            model.patch_embed.register_forward_pre_hook(on_forward),
            model.norm.register_forward_hook(on_norm),
        ]

    def _on_backward(self, gradient):
        self.backward_calls += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# --------------------------------------------------------------------------- #
# 1. Targets (Captum: tests/attr/test_targets.py)
# --------------------------------------------------------------------------- #

SAME_CLASS_FORMS = {
    "int": 7,
    "zero_dim_tensor": torch.tensor(7),
    "one_element_tensor": torch.tensor([7]),
    "one_d_tensor": torch.tensor([7, 7, 7]),
    "one_d_int32_tensor": torch.tensor([7, 7, 7], dtype=torch.int32),
}


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("form", sorted(SAME_CLASS_FORMS))
def test_every_target_form_equals_explicit_per_example_targets(vit, images, method_name, form):
    method = METHODS[method_name](vit)
    explicit = method.attribute(images, target=[7, 7, 7])
    assert_close_relative(method.attribute(images, target=SAME_CLASS_FORMS[form]), explicit, 1e-6)


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_a_per_example_tensor_target_equals_the_same_list(vit, images, method_name):
    method = METHODS[method_name](vit)
    assert_close_relative(
        method.attribute(images, target=torch.tensor(TARGETS)),
        method.attribute(images, target=TARGETS),
        1e-6,
    )


@pytest.mark.parametrize("method_name", TARGETED)
def test_the_target_changes_the_maps(vit, images, method_name):
    """Makes the target tests above able to fail: another class gives other maps."""
    method = METHODS[method_name](vit)
    first, second = method.attribute(images, target=2), method.attribute(images, target=7)
    for example in range(images.shape[0]):
        assert not torch.allclose(first[example], second[example], rtol=1e-3, atol=0)


def test_attention_rollout_does_not_depend_on_the_target(vit, images):
    rollout = AttentionRollout(vit)
    untargeted = rollout.attribute(images)
    assert torch.equal(rollout.attribute(images, target=2), untargeted)
    assert torch.equal(rollout.attribute(images, target=TARGETS), untargeted)


@pytest.mark.parametrize("method_name", TARGETED)
def test_target_none_means_the_predicted_class_unlike_captum(vit, images, method_name):
    """In Captum, target=None is for a model with one scalar output per example. Here a
    classifier always has several outputs, and None explains each example's predicted class:
    it must equal passing ``model(x).argmax(1)`` explicitly."""
    with torch.no_grad():
        predicted = vit(images).argmax(dim=1)
    assert predicted.unique().numel() > 1, "the test needs examples predicted differently"
    method = METHODS[method_name](vit)
    untargeted = method.attribute(images)
    assert_close_relative(untargeted, method.attribute(images, target=predicted), 1e-6)
    assert_close_relative(untargeted, method.attribute(images, target=predicted.tolist()), 1e-6)


# A negative class is refused, not counted from the end as Python indexing would: a negative
# label is usually a data set's "unlabelled" mark (-1, or an ignore_index such as -100), and
# explaining the last class instead would silently explain the wrong thing.
NEGATIVE_TARGETS = {
    "int": (-1, -1),
    "list": ([2, -3, 1], -3),
    "tensor": (torch.tensor([0, -100, 4]), -100),
    "one_element_tensor": (torch.tensor([-2]), -2),
}
TOO_LARGE_TARGETS = {
    "int": (NUM_CLASSES, NUM_CLASSES),
    "list": ([1, 12, 0], 12),
    "tensor": (torch.tensor([NUM_CLASSES + 5, 0, 0]), NUM_CLASSES + 5),
}


def _assert_refused_before_the_forward(model, method, images, target, given_value):
    probe = _Probe(model)
    try:
        with pytest.raises(ValueError, match=rf"{re.escape(str(given_value))}(?!\d)"):
            method.attribute(images, target=target)
    finally:
        probe.remove()
    assert probe.forward_batches == [], "the model ran before the target was refused"
    assert module_hook_count(model) == 0


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("case", sorted(NEGATIVE_TARGETS))
def test_negative_targets_are_refused_naming_the_value(vit, images, method_name, case):
    target, given_value = NEGATIVE_TARGETS[case]
    _assert_refused_before_the_forward(vit, METHODS[method_name](vit), images, target, given_value)


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("case", sorted(TOO_LARGE_TARGETS))
def test_targets_beyond_the_classes_are_refused_naming_the_value(vit, images, method_name, case):
    target, given_value = TOO_LARGE_TARGETS[case]
    _assert_refused_before_the_forward(vit, METHODS[method_name](vit), images, target, given_value)


# --------------------------------------------------------------------------- #
# 2. Nothing is left behind after an error (Captum: tests/attr/test_hook_removal.py)
# --------------------------------------------------------------------------- #


class _Boom(RuntimeError):
    """The error the failure cases raise, told apart from any error of the package."""


class _RaisingModule(nn.Module):
    """Stands in for a block's MLP: the model itself raises midway through its forward pass."""

    def forward(self, tokens):
        raise _Boom("the model raised midway")


class _FailsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        return tensor.clone()

    @staticmethod
    def backward(ctx, gradient):
        raise _Boom("an autograd Function raised in the backward pass")


def _call(method_class, model, images, **kwargs):
    return method_class(model).attribute(images, target=TARGETS, **kwargs)


def _fail_in_a_forward_hook(method_class, model, images):
    def boom(module, args, output):
        raise _Boom("a forward hook raised")

    handle = model.blocks[1].register_forward_hook(boom)
    try:
        _call(method_class, model, images)
    finally:
        handle.remove()


def _fail_in_the_model_midway(method_class, model, images):
    block = model.blocks[1]
    mlp, block.mlp = block.mlp, _RaisingModule()
    try:
        _call(method_class, model, images)
    finally:
        block.mlp = mlp


def _fail_in_the_scoring(method_class, model, images):
    # The forward function returns the tokens (B, N, C), not class scores (B, K).
    method_class(lambda x: model.forward_features(x), adapter=adapter_for(model)).attribute(
        images, target=TARGETS
    )


def _fail_in_a_tensor_hook_in_backward(method_class, model, images):
    def boom(gradient):
        raise _Boom("a tensor hook raised in the backward pass")

    def hook_the_output(module, args, output):
        output.register_hook(boom)

    handle = model.blocks[-1].register_forward_hook(hook_the_output)
    try:
        _call(method_class, model, images)
    finally:
        handle.remove()


def _fail_in_an_autograd_function_in_backward(method_class, model, images):
    handle = model.norm.register_forward_hook(
        lambda module, args, output: _FailsInBackward.apply(output)
    )
    try:
        _call(method_class, model, images)
    finally:
        handle.remove()


def _importance(weights_of):
    def fail(method_class, model, images):
        method_class(model).attribute(images, importance=weights_of)

    return fail


def _raise_from_importance(features):
    raise _Boom("the importance callable raised")


def _bad_images(make_bad_images):
    def fail(method_class, model, images):
        _call(method_class, model, make_bad_images(images))

    return fail


def _float64_images_under_autocast(method_class, model, images):
    # autocast casts float32 and lower precisions to bfloat16, but leaves float64 as it is
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _call(method_class, model, images.double())


INDEX, INF = torch.tensor([2]), float("inf")  # where a non-finite value is put, and one

# name: (how the call fails, the methods it applies to, the error, where the call must stop:
# "forward" refused before the model ran, "backward" refused before the backward pass, None
# wherever the failure happens).
FAILURES = {
    "forward_hook_raises": (_fail_in_a_forward_hook, sorted(METHODS), _Boom, None),
    "model_raises_midway": (_fail_in_the_model_midway, sorted(METHODS), _Boom, None),
    "scores_of_the_wrong_shape": (_fail_in_the_scoring, sorted(METHODS), ValueError, None),
    "tensor_hook_raises_in_backward": (_fail_in_a_tensor_hook_in_backward, TARGETED, _Boom, None),
    "autograd_function_raises_in_backward": (
        _fail_in_an_autograd_function_in_backward,
        TARGETED,
        _Boom,
        None,
    ),
    "importance_callable_raises": (_importance(_raise_from_importance), ["DAAM"], _Boom, None),
    "importance_callable_returns_nan": (
        _importance(lambda features: torch.full_like(features, float("nan"))),
        ["DAAM"],
        ValueError,
        "backward",
    ),
    "importance_callable_returns_inf": (
        _importance(lambda features: torch.ones_like(features).index_fill(1, INDEX, INF)),
        ["DAAM"],
        ValueError,
        "backward",
    ),
    "importance_tensor_with_nan": (
        _importance(torch.ones(3, NUM_CLASSES).index_fill(1, INDEX, float("nan"))),
        ["DAAM"],
        ValueError,
        "forward",
    ),
    "images_not_4d": (
        _bad_images(lambda images: images[0]), sorted(METHODS), ValueError, "forward"
    ),
    "images_of_the_wrong_size": (
        _bad_images(lambda images: F.pad(images, (0, 8, 0, 8))),
        sorted(METHODS),
        ValueError,
        "forward",
    ),
    "images_with_nan": (
        _bad_images(lambda images: images.index_fill(2, INDEX, float("nan"))),
        sorted(METHODS),
        ValueError,
        "forward",
    ),
    "images_with_inf": (
        _bad_images(lambda images: images.index_fill(3, INDEX, -INF)),
        sorted(METHODS),
        ValueError,
        "forward",
    ),
    **{  # a float32 model given images of another floating dtype
        f"images_in_{str(dtype).split('.')[-1]}": (
            _bad_images(lambda images, dtype=dtype: images.to(dtype)),
            sorted(METHODS),
            ValueError,
            "forward",
        )
        for dtype in (torch.float64, torch.bfloat16, torch.float16)
    },
    "float64_images_under_autocast": (
        _float64_images_under_autocast, sorted(METHODS), ValueError, "forward"
    ),
}
FAILURE_CASES = [
    (case, method_name) for case in sorted(FAILURES) for method_name in FAILURES[case][1]
]


def _prepared_model(base: nn.Module, state: str) -> nn.Module:
    """A copy of ``base`` in eval mode, except two submodules whose train-mode flag changes
    nothing (a norm and the head), and with some parameters frozen in the frozen state."""
    model = copy.deepcopy(base)
    model.blocks[0].norm1.train()
    model.head.train()
    if state == "partly_frozen":
        for parameter in [*model.patch_embed.parameters(), *model.blocks[0].parameters()]:
            parameter.requires_grad_(False)
    return model


def _snapshot(model: nn.Module) -> dict:
    return {
        "training": {name: module.training for name, module in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
    }


def _assert_left_as_it_was(model: nn.Module, before: dict) -> None:
    assert module_hook_count(model) == 0
    assert _snapshot(model) == before
    with_grad = [name for name, parameter in model.named_parameters() if parameter.grad is not None]
    assert with_grad == [], f"parameters given a .grad: {with_grad}"


@pytest.mark.parametrize("state", ["trainable", "partly_frozen"])
@pytest.mark.parametrize("case, method_name", FAILURE_CASES)
def test_a_failed_call_leaves_the_model_as_it_was(vit, images, case, method_name, state):
    fail, _, error, stops_before = FAILURES[case]
    method_class = METHODS[method_name]
    model = _prepared_model(vit, state)
    before = _snapshot(model)
    expected = _call(method_class, model, images)

    probe = _Probe(model)
    try:
        with pytest.raises(error):
            fail(method_class, model, images)
    finally:
        probe.remove()
    if stops_before == "forward":
        assert probe.forward_batches == [], "the model ran before the error"
    if stops_before == "backward":
        assert probe.forward_batches and probe.backward_calls == 0, "the backward pass ran"

    _assert_left_as_it_was(model, before)
    assert_close_relative(_call(method_class, model, images), expected, 1e-6)
    _assert_left_as_it_was(model, before)


OTHER_DTYPES = [torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("dtype", OTHER_DTYPES, ids=str)
def test_images_of_another_dtype_than_the_model_are_refused_naming_both(
    vit, images, method_name, dtype
):
    probe = _Probe(vit)
    try:
        with pytest.raises(
            ValueError,
            match=rf"model's dtype torch\.float32, got {re.escape(str(dtype))}\. Convert them "
            rf"with images\.to\(torch\.float32\)",
        ):
            _call(METHODS[method_name], vit, images.to(dtype))
    finally:
        probe.remove()
    assert probe.forward_batches == [], "the model ran before the dtype was refused"
    assert module_hook_count(vit) == 0


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_half_precision_model_takes_images_of_its_own_dtype(vit, images, method_name, dtype):
    """The same maps as the float32 model, up to half precision's rounding."""
    half_model = copy.deepcopy(vit).to(dtype)
    maps = _call(METHODS[method_name], half_model, images.to(dtype))
    assert maps.dtype == dtype
    assert_close_relative(maps, _call(METHODS[method_name], vit, images), 5e-2)


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_images_of_another_dtype_are_taken_under_autocast(vit, images, method_name):
    """Mixed precision: autocast casts the bfloat16 images and the float32 weights inside
    the model, so the dtypes differ on purpose."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = _call(METHODS[method_name], vit, images.to(torch.bfloat16))
    assert_close_relative(maps, _call(METHODS[method_name], vit, images), 5e-2)


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_a_model_on_the_meta_device_is_built_but_refused_by_attribute(vit, images, method_name):
    """Built on the meta device, the model has shapes but no values: the constructor takes it
    (only its structure is read), attribute() refuses it before any work, and the same object
    explains the model once its weights are loaded."""
    with torch.device("meta"):
        model = tiny_vit()
    method = METHODS[method_name](model)
    before = _snapshot(model)
    probe = _Probe(model)
    try:
        with pytest.raises(
            ValueError,
            match=r"meta device and have no values\. Load its weights first, e\.g\. "
            r"model\.to_empty\(device='cpu'\) then model\.load_state_dict",
        ):
            method.attribute(images, target=TARGETS)
    finally:
        probe.remove()
    assert probe.forward_batches == [], "the model ran before it was refused"
    _assert_left_as_it_was(model, before)

    model.to_empty(device="cpu").load_state_dict(vit.state_dict())
    assert_close_relative(
        method.attribute(images, target=TARGETS), _call(METHODS[method_name], vit, images), 1e-6
    )


# --------------------------------------------------------------------------- #
# 3. A batch equals its examples one at a time (Captum: tests/attr/test_targets.py)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_a_batch_equals_each_example_alone(vit, images, method_name):
    method = METHODS[method_name](vit)
    batch = method.attribute(images, target=TARGETS)
    for example, target in enumerate(TARGETS):
        alone, row = images[example : example + 1], batch[example : example + 1]
        assert_close_relative(method.attribute(alone, target=target), row)
        assert_close_relative(method.attribute(alone, target=[target]), row)


@pytest.mark.parametrize("model_name", ["vit", "cait"])
def test_a_batch_equals_each_example_alone_for_the_whole_daam_flow(
    request, images, model_name
):
    daam = DAAM(request.getfixturevalue(model_name))
    batch = daam.attribute(images, target=TARGETS, return_flow=True)
    for example, target in enumerate(TARGETS):
        alone = daam.attribute(images[example : example + 1], target=target, return_flow=True)
        assert_close_relative(alone, batch[example : example + 1])


# --------------------------------------------------------------------------- #
# 4. Wrapped models (Captum: tests/attr/test_data_parallel.py, test_jit.py)
# --------------------------------------------------------------------------- #


class _Normalize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images):
        return (images - self.mean) / self.std


def _compiled(model):
    # backend="eager": the same OptimizedModule wrapper torch.compile always returns, but its
    # first forward takes about a second, where inductor takes about 40 s on a 2-core CPU.
    return torch.compile(model, backend="eager")


WRAPPERS = {  # name: (wrap a model, the images the plain model must see for the same maps)
    "data_parallel": (nn.DataParallel, lambda images: images),
    "distributed_data_parallel": (DistributedDataParallel, lambda images: images),
    "torch_compile": (_compiled, lambda images: images),
    "sequential_with_normalization": (
        lambda model: nn.Sequential(_Normalize(), model).eval(),
        _Normalize(),
    ),
}


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_a_wrapped_model_gives_the_plain_models_maps(request, vit, images, method_name, wrapper):
    if wrapper == "distributed_data_parallel":
        request.getfixturevalue("process_group")
    wrap, seen_by_the_model = WRAPPERS[wrapper]
    method_class = METHODS[method_name]
    model = copy.deepcopy(vit)
    wrapped = wrap(model)
    hooks_before = module_hook_count(wrapped)
    expected = method_class(vit).attribute(seen_by_the_model(images), target=TARGETS)
    explainer = method_class(wrapped)
    for _ in range(2):  # twice: a second call must find the wrapper as the first left it
        assert_close_relative(explainer.attribute(images, target=TARGETS), expected, 1e-5)
    assert module_hook_count(wrapped) == hooks_before
    assert all(parameter.grad is None for parameter in wrapped.parameters())


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("wrapper", ["data_parallel", "distributed_data_parallel"])
def test_a_parallel_wrapper_of_a_model_in_eval_mode_does_not_warn_of_training_mode(
    request, vit, images, method_name, wrapper
):
    if wrapper == "distributed_data_parallel":
        request.getfixturevalue("process_group")
    wrapped = WRAPPERS[wrapper][0](copy.deepcopy(vit))
    assert wrapped.training and not wrapped.module.training  # the wrapper's own flag is on
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        METHODS[method_name](wrapped).attribute(images, target=TARGETS)
    training_warnings = [str(w.message) for w in caught if "training mode" in str(w.message)]
    assert training_warnings == []


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_data_parallel_of_a_model_in_training_mode_still_warns(vit, images, method_name):
    wrapped = nn.DataParallel(copy.deepcopy(vit).train())
    with pytest.warns(UserWarning, match="training mode"):
        METHODS[method_name](wrapped).attribute(images, target=TARGETS)


AMBIGUOUS = {  # name: (a container of two ViTs, how the message must name each candidate)
    "named_sequential": (
        lambda first, second: nn.Sequential(OrderedDict(teacher=first, student=second)),
        [r"\bteacher\b", r"\bstudent\b"],
    ),
    "module_list": (lambda first, second: nn.ModuleList([first, second]), [r"\b0\b", r"\b1\b"]),
}


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("container", sorted(AMBIGUOUS))
def test_a_container_of_two_vits_is_refused_naming_both(vit, method_name, container):
    build, candidate_names = AMBIGUOUS[container]
    ambiguous = build(vit, tiny_vit(seed=1))
    with pytest.raises(TypeError) as raised:
        METHODS[method_name](ambiguous)
    for name in candidate_names:
        assert re.search(name, str(raised.value)), str(raised.value)
    assert module_hook_count(ambiguous) == 0


@pytest.fixture(scope="module")
def jit_models(vit, images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer warnings
        return {
            "traced": torch.jit.trace(copy.deepcopy(vit), images),
            "scripted": torch.jit.script(copy.deepcopy(vit)),
        }


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("kind", ["traced", "scripted"])
def test_a_jit_model_is_refused_with_a_message_naming_jit(jit_models, method_name, kind):
    with pytest.raises(TypeError, match=r"(?i)\bjit\b"):
        METHODS[method_name](jit_models[kind])


# --------------------------------------------------------------------------- #
# 5. internal_batch_size (Captum: captum/attr/_utils/batching.py, _batched_generator)
# --------------------------------------------------------------------------- #

EXTRA_KWARGS = {"DAAM": {"return_flow": True}, "GradientRollout": {}, "AttentionRollout": {}}


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize(
    "internal_batch_size, chunks",
    [(1, [1, 1, 1]), (2, [2, 1]), (3, [3])],
    ids=["one_at_a_time", "two_at_a_time", "whole_batch"],
)
def test_internal_batch_size_runs_chunks_and_keeps_the_maps(
    vit, images, method_name, internal_batch_size, chunks
):
    method = METHODS[method_name](vit)
    kwargs = EXTRA_KWARGS[method_name]
    unsplit = method.attribute(images, target=TARGETS, **kwargs)
    probe = _Probe(vit)
    try:
        split = method.attribute(
            images, target=TARGETS, internal_batch_size=internal_batch_size, **kwargs
        )
    finally:
        probe.remove()
    assert probe.forward_batches == chunks
    assert_close_relative(split, unsplit, 1e-5)


@pytest.mark.parametrize("method_name", TARGETED)
@pytest.mark.parametrize(
    "target",
    [None, 7, torch.tensor([7]), torch.tensor(TARGETS)],
    ids=["none", "int", "one_element_tensor", "tensor"],
)
def test_internal_batch_size_keeps_every_target_form(vit, images, method_name, target):
    method = METHODS[method_name](vit)
    assert_close_relative(
        method.attribute(images, target=target, internal_batch_size=2),
        method.attribute(images, target=target),
        1e-5,
    )


def test_internal_batch_size_on_class_attention_blocks(cait, images):
    daam = DAAM(cait)
    assert_close_relative(
        daam.attribute(images, target=TARGETS, return_flow=True, internal_batch_size=2),
        daam.attribute(images, target=TARGETS, return_flow=True),
        1e-5,
    )


class _ScaledViT(nn.Module):
    """A forward taking per-example extra arguments: a (B,) scale tensor and a shared float."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images, scale, offset):
        return self.vit(images * scale.view(-1, 1, 1, 1) + offset)


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_internal_batch_size_splits_tensor_forward_arguments_with_the_inputs(
    vit, images, method_name
):
    method_class = METHODS[method_name]
    scale, offset = torch.tensor([0.5, 1.0, 2.0]), 0.25
    explainer = method_class(_ScaledViT(vit).eval(), adapter=adapter_for(vit))
    unsplit = explainer.attribute(images, target=TARGETS, additional_forward_args=(scale, offset))
    # the arguments reach the model, each example with its own scale
    expected = method_class(vit).attribute(
        images * scale.view(-1, 1, 1, 1) + offset, target=TARGETS
    )
    assert_close_relative(unsplit, expected, 1e-5)
    for internal_batch_size in (1, 2):
        split = explainer.attribute(
            images,
            target=TARGETS,
            additional_forward_args=(scale, offset),
            internal_batch_size=internal_batch_size,
        )
        assert_close_relative(split, unsplit, 1e-5)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


IMPORTANCE = {
    "per_example_rows": lambda: torch.rand(3, NUM_CLASSES, generator=_seeded(1)),
    "shared_row": lambda: torch.rand(NUM_CLASSES, generator=_seeded(2)),
    "callable": lambda: (lambda features: features.softmax(dim=1)),
}


@pytest.mark.parametrize("importance", sorted(IMPORTANCE))
def test_internal_batch_size_splits_per_example_importance(vit, images, importance):
    weights = IMPORTANCE[importance]()
    daam = DAAM(vit)
    unsplit = daam.attribute(images, importance=weights, return_flow=True)
    for internal_batch_size in (1, 2):
        split = daam.attribute(
            images, importance=weights, return_flow=True, internal_batch_size=internal_batch_size
        )
        assert_close_relative(split, unsplit, 1e-5)


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("internal_batch_size", [0, -1, 1.5], ids=["zero", "negative", "float"])
def test_an_invalid_internal_batch_size_is_refused_before_the_forward(
    vit, images, method_name, internal_batch_size
):
    probe = _Probe(vit)
    try:
        with pytest.raises((ValueError, TypeError), match="internal_batch_size"):
            METHODS[method_name](vit).attribute(
                images, target=TARGETS, internal_batch_size=internal_batch_size
            )
    finally:
        probe.remove()
    assert probe.forward_batches == []
    assert module_hook_count(vit) == 0


# --------------------------------------------------------------------------- #
# 6. A tuple in gives a tuple out; input-shaped attributions for captum.metrics
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_a_tuple_of_inputs_gives_a_one_tuple_of_attributions(vit, images, method_name):
    method = METHODS[method_name](vit)
    kwargs = EXTRA_KWARGS[method_name]
    as_tuple = method.attribute((images,), target=TARGETS, **kwargs)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert_close_relative(as_tuple[0], method.attribute(images, target=TARGETS, **kwargs), 1e-6)
    assert isinstance(method.attribute(images, target=TARGETS, **kwargs), torch.Tensor)


def _same_shift_for_every_sample(inputs, radius):
    """A perturbation that depends only on the input, so that sensitivity_max's samples are
    the same however they are batched (captum's default draws them at random per batch)."""
    return inputs + radius * torch.sin(37.0 * inputs)


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_sensitivity_max_does_not_depend_on_max_examples_per_batch(vit, images, method_name):
    explain = METHODS[method_name](vit).attribute
    inputs, targets = (images[:2],), TARGETS[:2]
    torch.manual_seed(0)
    with_random_perturbations = sensitivity_max(
        explain, inputs, target=targets, n_perturb_samples=3, max_examples_per_batch=2
    )
    assert with_random_perturbations.shape == (2,)
    assert torch.isfinite(with_random_perturbations).all()

    results = [
        sensitivity_max(
            explain,
            inputs,
            perturb_func=_same_shift_for_every_sample,
            target=targets,
            n_perturb_samples=3,
            max_examples_per_batch=max_examples_per_batch,
        )
        for max_examples_per_batch in (2, 4, None)
    ]
    assert results[0].shape == (2,) and (results[0] > 0).all()
    for result in results[1:]:
        assert_close_relative(result, results[0], 1e-5)


@pytest.fixture(scope="module")
def wide_vit():
    """Takes 32x48 images (a 4x6 grid), so that height and width cannot be mixed up."""
    return tiny_vit(dynamic_img_size=True)


@pytest.mark.parametrize("method_name", sorted(METHODS))
@pytest.mark.parametrize("interpolate_mode", [None, "bilinear", "nearest"])
def test_input_shaped_is_the_final_map_interpolated_and_repeated_over_channels(
    wide_vit, method_name, interpolate_mode
):
    images = make_images(2, 32, 48)
    method = METHODS[method_name](wide_vit)
    final = method.attribute(images, target=TARGETS[:2])
    assert final.shape == (2, 1, 4, 6)
    mode = {} if interpolate_mode is None else {"interpolate_mode": interpolate_mode}
    input_shaped = method.attribute(images, target=TARGETS[:2], input_shaped=True, **mode)
    expected = F.interpolate(final, size=(32, 48), mode=interpolate_mode or "bilinear")
    assert_close_relative(input_shaped, expected.expand(2, 3, 32, 48), 1e-6)


def test_input_shaped_modes_differ(wide_vit):
    """Makes the test above able to fail on interpolate_mode: the two modes differ."""
    daam, images = DAAM(wide_vit), make_images(2, 32, 48)
    bilinear = daam.attribute(images, target=3, input_shaped=True, interpolate_mode="bilinear")
    nearest = daam.attribute(images, target=3, input_shaped=True, interpolate_mode="nearest")
    assert not torch.allclose(bilinear, nearest)


def test_input_shaped_with_return_flow_is_refused(vit, images):
    with pytest.raises(ValueError, match="input_shaped"):
        DAAM(vit).attribute(images, target=TARGETS, input_shaped=True, return_flow=True)
    assert module_hook_count(vit) == 0


def _noise_perturbation(inputs):
    noise = 0.03 * torch.randn(inputs.shape, generator=_seeded(3))
    return noise, inputs - noise


@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_infidelity_runs_on_input_shaped_attributions(vit, images, method_name):
    method = METHODS[method_name](vit)
    attributions = method.attribute((images,), target=TARGETS, input_shaped=True)
    assert isinstance(attributions, tuple) and attributions[0].shape == images.shape
    scores = infidelity(
        vit,
        _noise_perturbation,
        (images,),
        attributions,
        target=TARGETS,
        n_perturb_samples=2,
        max_examples_per_batch=3,
    )
    assert scores.shape == (3,)
    assert torch.isfinite(scores).all() and (scores >= 0).all()
