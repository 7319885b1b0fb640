"""TokenGrid: Captum's layer methods on a ViT block's patch tokens, seen as (B, C, gh, gw).

The expected values are written out here: the block's output is kept by a plain forward hook,
its gradient taken with ``torch.autograd.grad``, and Grad-CAM, gradient x activation and the
activation are formed per patch token and laid on the grid by explicit row-major indexing.
"""

import pickle
import warnings

import pytest
import torch
from captum.attr import (
    LayerActivation,
    LayerAttribution,
    LayerGradCam,
    LayerGradientXActivation,
    LayerIntegratedGradients,
)
from torch import nn

import test_adapter_hf as hf
import test_adapter_torchvision as tv
from captum_daam.adapters import GenericAdapter
from captum_daam.token_grid import TokenGrid
from helpers import assert_close_relative, make_images, make_model, module_hook_count

TARGETS = [3, 7, 0]


@pytest.fixture(scope="module")
def vit():
    return make_model("vit_small_patch16_224", img_size=64, depth=3, num_classes=10)


@pytest.fixture(scope="module")
def images():
    return make_images(3, 64, 64)


# --------------------------------------------------------------------------- #
# The explicit computation
# --------------------------------------------------------------------------- #


def kept_tokens_and_gradient(forward, module, images, targets):
    """The output tokens (B, N, C) of ``module`` in one forward pass, kept by a plain hook, and
    the gradient of the summed target scores with respect to them."""
    kept = {}

    def keep(module, args, output):
        kept["tokens"] = output[0] if isinstance(output, tuple) else output

    handle = module.register_forward_hook(keep)
    try:
        scores = forward(images)
    finally:
        handle.remove()
    tokens = kept["tokens"]
    score = scores[torch.arange(len(targets)), torch.tensor(targets)].sum()
    (gradient,) = torch.autograd.grad(score, tokens)
    return tokens.detach(), gradient


def on_grid(per_patch, grid):
    """(B, gh * gw, K) per-patch values -> (B, K, gh, gw), patch n at row n // gw, column n % gw."""
    batch, _, channels = per_patch.shape
    rows, columns = grid
    out = per_patch.new_zeros(batch, channels, rows, columns)
    for index in range(rows * columns):
        out[:, :, index // columns, index % columns] = per_patch[:, index]
    return out


def explicit_grad_cam(forward, module, images, targets, num_prefix_tokens, grid):
    """Grad-CAM on the patch tokens: w_c = mean over patches of dS/dA_c, relu(sum_c w_c A_c)."""
    tokens, gradient = kept_tokens_and_gradient(forward, module, images, targets)
    patches, patch_gradient = tokens[:, num_prefix_tokens:], gradient[:, num_prefix_tokens:]
    weights = patch_gradient.mean(dim=1, keepdim=True)  # (B, 1, C)
    cam = torch.relu((patches * weights).sum(dim=-1, keepdim=True))  # (B, gh * gw, 1)
    return on_grid(cam, grid)


# --------------------------------------------------------------------------- #
# Grad-CAM and the other layer methods equal the explicit computation
# --------------------------------------------------------------------------- #


def test_grad_cam_at_the_last_block_input_equals_explicit_grad_cam(vit, images):
    layer = TokenGrid(vit, vit.blocks[-1].norm1)
    cam = LayerGradCam(vit, layer).attribute(images, target=TARGETS, relu_attributions=True)
    expected = explicit_grad_cam(vit, vit.blocks[-1].norm1, images, TARGETS, 1, (4, 4))
    assert cam.shape == (3, 1, 4, 4)
    assert expected.abs().max() > 0
    assert_close_relative(cam, expected, 1e-5)


def test_grad_cam_at_an_earlier_block_output_equals_explicit_grad_cam(vit, images):
    cam = LayerGradCam(vit, TokenGrid(vit, vit.blocks[1])).attribute(
        images, target=TARGETS, relu_attributions=True
    )
    expected = explicit_grad_cam(vit, vit.blocks[1], images, TARGETS, 1, (4, 4))
    assert_close_relative(cam, expected, 1e-5)


@pytest.mark.slow
def test_grad_cam_on_deit_tiny_at_224_equals_explicit_grad_cam():
    model = make_model("deit_tiny_patch16_224")
    images = make_images(2)
    module = model.blocks[-1].norm1
    cam = LayerGradCam(model, TokenGrid(model, module)).attribute(
        images, target=[11, 500], relu_attributions=True
    )
    expected = explicit_grad_cam(model, module, images, [11, 500], 1, (14, 14))
    assert cam.shape == (2, 1, 14, 14)
    assert_close_relative(cam, expected, 1e-5)
    upsampled = LayerAttribution.interpolate(cam, (224, 224), "bilinear")
    assert upsampled.shape == (2, 1, 224, 224)


def test_last_block_output_has_zero_patch_gradient_and_warns(vit, images):
    # The head reads only the [class] token after the last block: the documented trap.
    with pytest.warns(UserWarning, match="gradient at the patch tokens of blocks.2 is zero"):
        cam = LayerGradCam(vit, TokenGrid(vit, vit.blocks[-1])).attribute(images, target=TARGETS)
    assert cam.shape == (3, 1, 4, 4)
    assert not cam.any()


def test_gradient_x_activation_equals_explicit_product_on_the_grid(vit, images):
    module = vit.blocks[-1].norm1
    attributions = LayerGradientXActivation(vit, TokenGrid(vit, module)).attribute(
        images, target=TARGETS
    )
    tokens, gradient = kept_tokens_and_gradient(vit, module, images, TARGETS)
    expected = on_grid((tokens * gradient)[:, 1:], (4, 4))
    assert attributions.shape == (3, 384, 4, 4)
    assert_close_relative(attributions, expected, 1e-5)


def test_activation_is_the_patch_tokens_on_the_grid(vit, images):
    activations = LayerActivation(vit, TokenGrid(vit, vit.blocks[1])).attribute(images)
    with torch.no_grad():
        tokens = vit.blocks[1](vit.blocks[0](vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))))
    assert activations.shape == (3, 384, 4, 4)
    assert_close_relative(activations, on_grid(tokens[:, 1:], (4, 4)), 1e-6)


def test_layer_integrated_gradients_interpolate_the_patch_tokens_only(vit, images):
    module = vit.blocks[1]
    attributions = LayerIntegratedGradients(vit, TokenGrid(vit, module)).attribute(
        images, target=3, n_steps=20
    )
    baseline_tokens = {}

    def keep(module, args, output):
        baseline_tokens["tokens"] = output.detach()

    def patches_from_baseline(module, args, output):
        return torch.cat([output[:, :1], baseline_tokens["tokens"][:, 1:]], dim=1)

    with torch.no_grad(), module.register_forward_hook(keep):
        vit(torch.zeros_like(images))
    with torch.no_grad(), module.register_forward_hook(patches_from_baseline):
        from_baseline_patches = vit(images)[:, 3]
    # Completeness: the prefix tokens keep the input's values along the path.
    expected = vit(images)[:, 3].detach() - from_baseline_patches
    assert attributions.shape == (3, 384, 4, 4)
    assert_close_relative(attributions.sum(dim=(1, 2, 3)), expected, 1e-3)


def test_calling_the_token_grid_lays_patch_tokens_row_major_and_drops_prefix_tokens(vit):
    tokens = torch.randn(2, 1 + 12, 5)
    grid = TokenGrid(vit, vit.blocks[0], grid_size=(3, 4))(tokens)
    assert grid.shape == (2, 5, 3, 4)
    assert torch.equal(grid, on_grid(tokens[:, 1:], (3, 4)))
    assert grid.data_ptr() == tokens[:, 1:].data_ptr()  # a view, no copy


# --------------------------------------------------------------------------- #
# The model is untouched
# --------------------------------------------------------------------------- #


def test_model_output_and_input_gradient_are_unchanged_while_hooked(vit, images):
    inputs = images.clone().requires_grad_()
    plain = vit(inputs)
    (plain_gradient,) = torch.autograd.grad(plain[:, 3].sum(), inputs)
    layer = TokenGrid(vit, vit.blocks[1])
    # As Captum's gradient methods do: keep the grid and go on with a clone of it.
    with layer.register_forward_hook(lambda module, args, grid: grid.clone()):
        hooked = vit(inputs)
        (hooked_gradient,) = torch.autograd.grad(hooked[:, 3].sum(), inputs)
    assert torch.equal(hooked, plain)
    assert_close_relative(hooked_gradient, plain_gradient, 1e-6)


def test_no_hook_is_on_the_model_until_something_is_hooked_on_the_token_grid(vit):
    before = module_hook_count(vit)
    layer = TokenGrid(vit, vit.blocks[1])
    assert module_hook_count(vit) == before
    first = layer.register_forward_hook(lambda *args: None)
    second = layer.register_forward_pre_hook(lambda *args: None)
    assert module_hook_count(vit) == before + 1  # one hook on the block, however many listen
    first.remove()
    first.remove()  # removing twice releases once
    assert module_hook_count(vit) == before + 1
    second.remove()
    assert module_hook_count(vit) == before
    assert module_hook_count(layer) == 0


@pytest.mark.parametrize(
    "method", [LayerGradCam, LayerGradientXActivation, LayerActivation], ids=lambda m: m.__name__
)
def test_no_hooks_are_left_after_a_captum_call(vit, images, method):
    before = module_hook_count(vit)
    layer = TokenGrid(vit, vit.blocks[-1].norm1)
    attribution = method(vit, layer)
    kwargs = {} if method is LayerActivation else {"target": TARGETS}
    attribution.attribute(images, **kwargs)
    attribution.attribute(images, **kwargs)  # reusable
    assert module_hook_count(vit) == before
    assert module_hook_count(layer) == 0
    assert pickle.loads(pickle.dumps(layer)).num_prefix_tokens == 1


def test_no_hooks_are_left_after_an_error_in_the_forward_pass(vit, images):
    before = module_hook_count(vit)
    layer = TokenGrid(vit, vit.patch_embed)  # 16 tokens without the [class] token
    with pytest.raises(ValueError, match="num_prefix_tokens=0"):
        LayerGradCam(vit, layer).attribute(images, target=TARGETS)
    assert module_hook_count(vit) == before
    with pytest.raises(RuntimeError, match="out of bounds"):  # a target after the forward
        LayerGradCam(vit, TokenGrid(vit, vit.blocks[1])).attribute(images, target=[3, 7, 99])
    assert module_hook_count(vit) == before


# --------------------------------------------------------------------------- #
# Grids, prefix tokens and model families
# --------------------------------------------------------------------------- #


def test_non_square_images_with_grid_size_on_a_dynamic_size_model():
    model = make_model(
        "vit_small_patch16_224", img_size=64, depth=3, num_classes=10, dynamic_img_size=True
    )
    images = make_images(2, 64, 96)
    module = model.blocks[-1].norm1
    cam = LayerGradCam(model, TokenGrid(model, module, grid_size=(4, 6))).attribute(
        images, target=[3, 7], relu_attributions=True
    )
    expected = explicit_grad_cam(model, module, images, [3, 7], 1, (4, 6))
    assert cam.shape == (2, 1, 4, 6)
    assert_close_relative(cam, expected, 1e-5)
    with pytest.raises(ValueError, match=r"got 24 patch tokens .*give grid_size=\(rows, columns\)"):
        LayerGradCam(model, TokenGrid(model, module)).attribute(images, target=[3, 7])
    with pytest.raises(ValueError, match=r"Expected .* 5x5 = 25 patch tokens .* got 24"):
        LayerGradCam(model, TokenGrid(model, module, grid_size=(5, 5))).attribute(images, target=3)


def test_register_tokens_are_dropped_with_the_adapters_prefix_count():
    model = make_model("vit_small_patch16_224", img_size=64, depth=3, num_classes=10, reg_tokens=4)
    images = make_images(2, 64, 64)
    module = model.blocks[-1].norm1
    layer = TokenGrid(model, module)
    assert layer.num_prefix_tokens == 5
    cam = LayerGradCam(model, layer).attribute(images, target=[3, 7], relu_attributions=True)
    assert_close_relative(cam, explicit_grad_cam(model, module, images, [3, 7], 5, (4, 4)), 1e-5)


def test_cait_self_attention_blocks_take_num_prefix_tokens_zero():
    model = make_model("cait_xxs24_224", img_size=64, depth=2, num_classes=10)
    images = make_images(2, 64, 64)
    module = model.blocks[-1]  # no [class] token yet; the class-attention blocks read these
    with pytest.raises(ValueError, match="num_prefix_tokens=0"):
        LayerGradCam(model, TokenGrid(model, module)).attribute(images, target=[3, 7])
    layer = TokenGrid(model, module, num_prefix_tokens=0)
    cam = LayerGradCam(model, layer).attribute(images, target=[3, 7], relu_attributions=True)
    assert_close_relative(cam, explicit_grad_cam(model, module, images, [3, 7], 0, (4, 4)), 1e-5)


def test_a_model_without_class_token_takes_its_prefix_count_from_the_adapter():
    model = make_model(
        "vit_small_patch16_224",
        img_size=64,
        depth=3,
        num_classes=10,
        class_token=False,
        global_pool="avg",
    )
    images = make_images(2, 64, 64)
    # An average-pooled model reads every patch token, so its last block is the one to take.
    layer = TokenGrid(model, model.blocks[-1])
    assert layer.num_prefix_tokens == 0
    cam = LayerGradCam(model, layer).attribute(images, target=[3, 7], relu_attributions=True)
    expected = explicit_grad_cam(model, model.blocks[-1], images, [3, 7], 0, (4, 4))
    assert_close_relative(cam, expected, 1e-5)


def test_adapter_given_explicitly_for_a_wrapped_model(vit, images):
    adapter = GenericAdapter([block.attn for block in vit.blocks], head_queries="class")
    normalised = nn.Sequential(nn.BatchNorm2d(3).eval(), vit)
    module = vit.blocks[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DAAM pooling warning from TokenGrid
        layer = TokenGrid(vit, module, adapter=adapter)
    cam = LayerGradCam(lambda x: normalised(x), layer).attribute(
        images, target=TARGETS, relu_attributions=True
    )
    expected = explicit_grad_cam(normalised, module, images, TARGETS, 1, (4, 4))
    assert_close_relative(cam, expected, 1e-5)


def test_torchvision_vision_transformer():
    model = tv.small_model(num_layers=3)
    images = make_images(3, 64, 64)
    before = module_hook_count(model)
    plain = model(images)
    module = model.encoder.layers[-1].ln_1
    layer = TokenGrid(model, module)
    cam = LayerGradCam(model, layer).attribute(images, target=TARGETS, relu_attributions=True)
    assert_close_relative(cam, explicit_grad_cam(model, module, images, TARGETS, 1, (4, 4)), 1e-5)
    activations = LayerActivation(model, TokenGrid(model, model.encoder.layers[1])).attribute(
        images
    )
    assert activations.shape == (3, 64, 4, 4)
    with layer.register_forward_hook(lambda module, args, grid: grid.clone()):
        assert torch.equal(model(images), plain)
    assert module_hook_count(model) == before


def test_hugging_face_vit_through_a_forward_function():
    model = hf.make_hf_vit("sdpa")
    images = make_images(3, 64, 64)
    before = module_hook_count(model)
    module = model.vit.layers[-1].layernorm_before
    layer = TokenGrid(model, module)

    def logits(x):
        return model(x).logits

    cam = LayerGradCam(logits, layer).attribute(images, target=TARGETS, relu_attributions=True)
    assert_close_relative(cam, explicit_grad_cam(logits, module, images, TARGETS, 1, (4, 4)), 1e-5)
    assert module_hook_count(model) == before


class TupleBlock(nn.Module):
    """A block returning (tokens, extra), as some blocks do."""

    def __init__(self, block: nn.Module, as_dict: bool = False) -> None:
        super().__init__()
        self.block, self.as_dict = block, as_dict

    def forward(self, tokens):
        tokens = self.block(tokens)
        return {"tokens": tokens} if self.as_dict else (tokens, tokens.detach().mean())


class TupleViT(nn.Module):
    def __init__(self, vit: nn.Module, as_dict: bool = False) -> None:
        super().__init__()
        self.vit, self.wrapped = vit, TupleBlock(vit.blocks[1], as_dict)

    def forward(self, images):
        tokens = self.vit.norm_pre(self.vit._pos_embed(self.vit.patch_embed(images)))
        tokens = self.vit.blocks[0](tokens)
        out = self.wrapped(tokens)
        tokens = out["tokens"] if isinstance(out, dict) else out[0]
        return self.vit.forward_head(self.vit.norm(self.vit.blocks[2](tokens)))


def test_tuple_output_whose_first_element_is_the_tokens(vit, images):
    model = TupleViT(vit)
    plain = model(images)
    adapter = GenericAdapter([vit.blocks[0].attn], head_queries="class")
    layer = TokenGrid(model, model.wrapped, adapter=adapter)
    cam = LayerGradCam(model, layer).attribute(images, target=TARGETS, relu_attributions=True)
    expected = explicit_grad_cam(model, model.wrapped, images, TARGETS, 1, (4, 4))
    assert_close_relative(cam, expected, 1e-5)
    with layer.register_forward_hook(lambda module, args, grid: grid.clone()):
        assert torch.equal(model(images), plain)


def test_output_that_is_neither_tokens_nor_a_tuple_of_them_is_refused(vit, images):
    model = TupleViT(vit, as_dict=True)
    layer = TokenGrid(model, model.wrapped, num_prefix_tokens=1)
    with pytest.raises(TypeError, match="to be a tensor of tokens, or a tuple .* got dict"):
        LayerGradCam(model, layer).attribute(images, target=TARGETS)
    assert module_hook_count(model) == module_hook_count(vit) == 0


# --------------------------------------------------------------------------- #
# Bad arguments are refused before anything runs
# --------------------------------------------------------------------------- #


def test_module_that_is_not_in_the_model_is_refused(vit):
    other = make_model("vit_small_patch16_224", img_size=64, depth=3, num_classes=10)
    with pytest.raises(ValueError, match="not one of the VisionTransformer's modules"):
        TokenGrid(vit, other.blocks[1])
    with pytest.raises(ValueError, match="got the model itself"):
        TokenGrid(vit, vit)
    with pytest.raises(TypeError, match="Expected model to be a torch.nn.Module"):
        TokenGrid(lambda x: vit(x), vit.blocks[1])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_prefix_tokens": -1}, ValueError, "non-negative int, got -1"),
        ({"num_prefix_tokens": True}, TypeError, "non-negative int, got True"),
        ({"grid_size": (4,)}, ValueError, r"\(rows, columns\), two positive ints, got \(4,\)"),
        ({"grid_size": (4, 0)}, ValueError, r"two positive ints, got \(4, 0\)"),
        ({"adapter": "timm"}, TypeError, "Expected adapter to be a ViTAdapter, got str"),
    ],
)
def test_bad_arguments_are_refused(vit, kwargs, error, match):
    with pytest.raises(error, match=match):
        TokenGrid(vit, vit.blocks[1], **kwargs)


def test_module_whose_output_is_not_tokens_is_refused_at_its_output(vit, images):
    later = []
    handle = vit.blocks[1].register_forward_hook(lambda *args: later.append(True))
    try:
        with pytest.raises(ValueError, match=r"patch_embed.proj \(Conv2d\) to be tokens shaped"):
            LayerGradCam(vit, TokenGrid(vit, vit.patch_embed.proj)).attribute(images, target=3)
    finally:
        handle.remove()
    assert not later  # refused before the blocks after it ran
    with pytest.raises(ValueError, match=r"head \(Linear\) to be tokens shaped .* \(3, 10\)"):
        LayerGradCam(vit, TokenGrid(vit, vit.head)).attribute(images, target=3)
