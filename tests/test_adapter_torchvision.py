"""DAAM on torchvision's VisionTransformer equals an explicit, independent reference.

The reference below re-runs the torchvision model by hand in float64, with each block's
attention written out from ``in_proj_weight`` as a full (B, H, N, N) matrix, takes gradients
of the target score with respect to each block's head-concatenated output O (before
``out_proj``) with plain autograd, and applies DESIGN.md's formulas with the full (B, N, C)
contribution tensor. The adapter instead hooks ``nn.MultiheadAttention``, recomputes only
the [class] attention row and maps the gradient after ``out_proj`` back through W_out.
"""

import copy

import pytest
import torch
import torchvision
from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer


from captum_daam import DAAM, class_token_contributions
from captum_daam.adapters import adapter_for
from captum_daam.adapters.torchvision_vit import TorchvisionVisionTransformerAdapter
from helpers import (
    assert_attributions_match,
    assert_close_relative,
    make_images,
    module_hook_count,
    record_with_module_outputs,
)
from reference import maps_from_explicit_blocks, resolve_targets

SMALL = dict(
    image_size=64,
    patch_size=16,
    num_layers=4,
    num_heads=4,
    hidden_dim=64,
    mlp_dim=128,
    num_classes=10,
)
TARGETS = [3, 7, 0]


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter: torchvision zero-initialises the head, the [class] token and
    the biases, which would make every gradient, and so every map, zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(0.05 * noise)
    return model.eval()


def small_model(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    return randomise(VisionTransformer(**{**SMALL, **overrides}))


def explicit_forward(model: VisionTransformer, images: torch.Tensor) -> dict:
    """torchvision's forward written out, with explicit attention and O kept per block."""
    batch = images.shape[0]
    tokens = model.conv_proj(images).flatten(2).transpose(1, 2)  # (B, gh*gw, C)
    class_token = model.class_token.expand(batch, -1, -1)
    x = torch.cat([class_token, tokens], dim=1) + model.encoder.pos_embedding
    blocks = []
    for block in model.encoder.layers:
        attention = block.self_attention
        heads, channels = attention.num_heads, attention.embed_dim
        width = channels // heads
        z = block.ln_1(x)
        q, k, v = (z @ attention.in_proj_weight.T + attention.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, -1, heads, width).permute(0, 2, 1, 3) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-2, -1) / width**0.5, dim=-1)  # (B, H, N, N)
        pre_projection = (attn @ v).permute(0, 2, 1, 3).reshape(batch, -1, channels)
        out = pre_projection @ attention.out_proj.weight.T + attention.out_proj.bias
        x = x + out
        x = x + block.mlp(block.ln_2(x))
        blocks.append({"attn": attn, "v": v, "pre_projection": pre_projection})
    x = model.encoder.ln(x)
    return {"logits": model.heads(x[:, 0]), "blocks": blocks}


def explicit_daam(model: VisionTransformer, images: torch.Tensor, target=None) -> dict:
    model = copy.deepcopy(model).double()
    images = images.double().requires_grad_(True)
    with torch.enable_grad():
        result = explicit_forward(model, images)
        logits = result["logits"]
        targets = resolve_targets(target, logits)
        score = logits[torch.arange(logits.shape[0]), targets].sum()
        pre_projections = [block["pre_projection"] for block in result["blocks"]]
        gradients = torch.autograd.grad(score, pre_projections)
    grid = model.image_size // model.patch_size
    maps = maps_from_explicit_blocks(result["blocks"], gradients, 1, (grid, grid))
    return {
        "logits": logits.detach(),
        "targets": targets,
        "block_maps": maps["block_maps"],
        "flow": maps["flow"],
    }


MODELS = {
    "small": lambda: small_model(),
    "conv_stem_representation": lambda: small_model(
        conv_stem_configs=[ConvStemConfig(out_channels=16, kernel_size=3, stride=4)] * 2,
        representation_size=32,
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def test_explicit_reference_reproduces_the_models_logits(model):
    images = make_images(3, 64, 64)
    expected = model(images)
    assert_close_relative(explicit_daam(model, images)["logits"], expected, 1e-5)


@pytest.mark.parametrize("target", [TARGETS, None], ids=["three_targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(model, target):
    images = make_images(3, 64, 64)
    expected = explicit_daam(model, images, target=target)
    assert expected["block_maps"].amax() > 0
    flow = assert_attributions_match(DAAM(model), images, target, expected)
    assert flow.shape == (3, 4, 4, 4)
    if target is None:
        assert expected["targets"].tolist() == model(images).argmax(1).tolist()


@pytest.mark.slow
def test_vit_b_16_equals_explicit_reference():
    torch.manual_seed(0)
    model = randomise(torchvision.models.vit_b_16(weights=None))
    images = make_images(3, 224, 224)
    expected = explicit_daam(model, images, target=[1, 500, 999])
    flow = DAAM(model).attribute(images, target=[1, 500, 999], return_flow=True)
    assert flow.shape == (3, 12, 14, 14)
    assert_close_relative(flow, expected["flow"])


def test_daam_picks_the_torchvision_adapter():
    model = small_model()
    assert isinstance(adapter_for(model), TorchvisionVisionTransformerAdapter)
    adapter = DAAM(model).adapter
    assert isinstance(adapter, TorchvisionVisionTransformerAdapter)
    assert adapter.num_prefix_tokens == 1
    assert adapter.num_outputs == 10
    assert adapter.in_channels == 3
    assert adapter.grid_size((64, 64)) == (4, 4)


def test_layer_takes_multihead_attention_modules_in_block_order():
    model = small_model()
    images = make_images(3, 64, 64)
    expected = explicit_daam(model, images, target=TARGETS)
    layers = model.encoder.layers
    daam = DAAM(model, layer=[layers[3].self_attention, layers[1].self_attention])
    block_maps = daam.attribute(images, target=TARGETS, return_flow=True, accumulate=False)
    assert_close_relative(block_maps, expected["block_maps"][:, [1, 3]])
    single = DAAM(model, layer=layers[2].self_attention).attribute(
        images, target=TARGETS, accumulate=False
    )
    assert_close_relative(single, expected["block_maps"][:, 2:3])
    with pytest.raises(ValueError, match=r"model\.encoder\.layers\[i\]\.self_attention"):
        DAAM(model, layer=layers[0].ln_1)


def test_contributions_sum_to_the_modules_own_class_output():
    """Sum over tokens of F_l, through out_proj, is nn.MultiheadAttention's [class] output."""
    model = small_model()
    images = make_images(2, 64, 64)
    adapter = adapter_for(model)
    records, module_outputs = record_with_module_outputs(
        adapter, adapter.attention_modules(), lambda: model(images)
    )
    for block, record, module_output in zip(model.encoder.layers, records, module_outputs):
        contributions = class_token_contributions(record.class_attention, record.values)
        assert contributions.shape == (2, 17, 64)
        reproduced = block.self_attention.out_proj(contributions.sum(dim=1))
        assert_close_relative(reproduced, module_output[:, 0], 1e-5)


def test_frozen_model_gives_the_same_maps():
    # Frozen, the first block's nn.MultiheadAttention takes its fused fast path.
    model = small_model()
    images = make_images(2, 64, 64)
    unfrozen = DAAM(model).attribute(images, target=[5, 6], return_flow=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    frozen = DAAM(model).attribute(images, target=[5, 6], return_flow=True)
    assert_close_relative(frozen, unfrozen, 1e-5)


def test_wrong_image_size_raises_before_the_forward():
    model = small_model()
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="64x64"):
            DAAM(model).attribute(make_images(1, 96, 96), target=0)
        with pytest.raises(ValueError, match="64x64"):
            DAAM(model).attribute(make_images(1, 64, 80), target=0)
    finally:
        handle.remove()
    assert calls == []
    assert module_hook_count(model) == 0


def test_no_hooks_left_after_attribute_or_a_failing_forward():
    model = small_model()
    images = make_images(2, 64, 64)
    DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    assert module_hook_count(model) == 0

    def failing_forward(inputs):
        model(inputs)
        raise RuntimeError("forward failed")

    daam = DAAM(failing_forward, adapter=adapter_for(model))
    with pytest.raises(RuntimeError, match="forward failed"):
        daam.attribute(images, target=[1, 2])
    assert module_hook_count(model) == 0
