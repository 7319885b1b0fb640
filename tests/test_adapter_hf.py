"""DAAM on Hugging Face transformers' ViTForImageClassification / ViTModel equals an explicit
reference, with eager and sdpa attention.

The reference below re-runs the HF model by hand from its own submodules with an explicit
(B, H, N, N) attention matrix built from q_proj / k_proj / v_proj, in float64, takes plain
autograd gradients at every block's pre-projection output and applies DESIGN.md's formulas
with the full (B, N, C) contribution tensor. It uses no hooks and no package code.

transformers is in the ``test`` extra (and the ``hf`` extra for users), so these tests run in CI.
"""

import copy
from typing import Dict, Optional

import pytest
import torch

import transformers

from captum_daam import DAAM, class_token_contributions
from captum_daam.adapters import adapter_for
from captum_daam.adapters.hf import HFViTAdapter
from helpers import (
    assert_attributions_match,
    assert_close_relative,
    make_images,
    module_hook_count,
    record_with_module_outputs,
)
from reference import maps_from_explicit_blocks, resolve_targets

TARGETS = [3, 7, 0]
IMPLEMENTATIONS = ["eager", "sdpa"]


def make_hf_vit(attn_implementation: str, with_head: bool = True, seed: int = 0):
    """A small random ViT (no download) in eval mode."""
    config = transformers.ViTConfig(
        image_size=64,
        patch_size=16,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    model_class = transformers.ViTForImageClassification if with_head else transformers.ViTModel
    model = model_class(config).eval()
    assert model.config._attn_implementation == attn_implementation
    return model


# --------------------------------------------------------------------------- #
# The explicit reference
# --------------------------------------------------------------------------- #


def explicit_hf_forward(
    model: torch.nn.Module,
    images: torch.Tensor,
    token_mask: Optional[torch.Tensor] = None,
    interpolate_pos_encoding: bool = False,
) -> Dict[str, object]:
    """Run an HF ViT by hand with explicit attention matrices.

    ``token_mask`` (B, N), 1 = may be attended to, is applied to every query as HF does with
    its 2-D ``attention_mask``.
    """
    backbone = getattr(model, "vit", model)
    x = backbone.embeddings(images, interpolate_pos_encoding=interpolate_pos_encoding)
    batch, tokens, _ = x.shape
    bias = None
    if token_mask is not None:
        bias = torch.zeros(batch, 1, 1, tokens, dtype=x.dtype)
        bias = bias.masked_fill(token_mask.reshape(batch, 1, 1, tokens) == 0, float("-inf"))
    blocks = []
    for layer in backbone.layers:
        attention = layer.attention
        heads, head_dim = attention.num_attention_heads, attention.head_dim
        z = layer.layernorm_before(x)

        def split(projected: torch.Tensor) -> torch.Tensor:
            return projected.reshape(batch, tokens, heads, head_dim).permute(0, 2, 1, 3)

        q, k, v = split(attention.q_proj(z)), split(attention.k_proj(z)), split(attention.v_proj(z))
        scores = (q @ k.transpose(-2, -1)) * head_dim**-0.5  # (B, H, N, N), explicit
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(dim=-1)
        pre_projection = (probs @ v).permute(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)
        x = x + attention.o_proj(pre_projection)
        x = x + layer.mlp(layer.layernorm_after(x))
        blocks.append({"attn": probs, "v": v, "pre_projection": pre_projection})
    sequence = backbone.layernorm(x)
    outputs = {"class_token": sequence[:, 0]}
    if hasattr(model, "classifier"):
        outputs["logits"] = model.classifier(sequence[:, 0])
    if getattr(backbone, "pooler", None) is not None:
        outputs["pooler_output"] = backbone.pooler(sequence)
    return {"outputs": outputs, "blocks": blocks}


def explicit_hf_daam(
    model: torch.nn.Module,
    images: torch.Tensor,
    target=None,
    output: str = "logits",
    token_mask: Optional[torch.Tensor] = None,
    interpolate_pos_encoding: bool = False,
) -> Dict[str, object]:
    """Reference block maps and flow, in float64 on a copy of the model."""
    model = copy.deepcopy(model).to(torch.float64)
    images = images.detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        result = explicit_hf_forward(model, images, token_mask, interpolate_pos_encoding)
        scores = result["outputs"][output]
        targets = resolve_targets(target, scores)
        score = scores[torch.arange(scores.shape[0]), targets].sum()
        pre_projections = [block["pre_projection"] for block in result["blocks"]]
        gradients = torch.autograd.grad(score, pre_projections)

    height, width = images.shape[-2:]
    patch = model.config.patch_size
    maps = maps_from_explicit_blocks(
        result["blocks"],
        gradients,
        num_prefix_tokens=1,
        grid_size=(height // patch, width // patch),
    )
    return {
        "outputs": {name: value.detach() for name, value in result["outputs"].items()},
        "targets": targets,
        "block_maps": maps["block_maps"],
        "flow": maps["flow"],
    }


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def classifier(request):
    return make_hf_vit(request.param)


@pytest.fixture(scope="module")
def images():
    return make_images(3, 64, 64)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_explicit_reference_reproduces_the_models_outputs(implementation, images):
    for with_head in (True, False):
        model = make_hf_vit(implementation, with_head=with_head)
        with torch.no_grad():
            output = model(images)
            explicit = explicit_hf_forward(model, images)["outputs"]
        if with_head:
            assert_close_relative(explicit["logits"], output.logits, 1e-5)
        else:
            assert_close_relative(explicit["pooler_output"], output.pooler_output, 1e-5)
            assert_close_relative(explicit["class_token"], output.last_hidden_state[:, 0], 1e-5)


@pytest.mark.parametrize("target", [TARGETS, None], ids=["three_targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(classifier, images, target):
    expected = explicit_hf_daam(classifier, images, target=target)
    assert_close_relative(expected["outputs"]["logits"], classifier(images).logits)
    daam = DAAM(classifier)  # the registered adapter; DAAM reads .logits through it
    flow = assert_attributions_match(daam, images, target, expected)
    assert flow.shape == (3, 4, 4, 4)
    if target is None:
        assert expected["targets"].tolist() == classifier(images).logits.argmax(1).tolist()


def test_attention_mask_is_applied_to_the_class_row(classifier, images):
    token_mask = torch.ones(3, 17, dtype=torch.long)
    token_mask[0, [2, 5]] = 0
    token_mask[2, 9:] = 0
    expected = explicit_hf_daam(classifier, images, target=TARGETS, token_mask=token_mask)
    daam = DAAM(classifier)
    # Positional arguments after the images: labels, interpolate_pos_encoding, attention_mask.
    flow = daam.attribute(
        images, target=TARGETS, return_flow=True, additional_forward_args=(None, None, token_mask)
    )
    assert_close_relative(flow, expected["flow"])
    assert bool((flow[0, :, 0, 1] == 0).all())  # token 2, patch (0, 1), is masked for image 0


def test_interpolated_position_encoding_gives_the_larger_grid(classifier):
    images = make_images(2, 96, 64, seed=1)
    expected = explicit_hf_daam(classifier, images, target=[1, 2], interpolate_pos_encoding=True)
    adapter = HFViTAdapter(classifier, interpolate_pos_encoding=True)
    daam = DAAM(lambda x: classifier(x, interpolate_pos_encoding=True).logits, adapter=adapter)
    flow = daam.attribute(images, target=[1, 2], return_flow=True)
    assert flow.shape == (2, 4, 6, 4)
    assert_close_relative(flow, expected["flow"])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("output", ["pooler_output", "class_token"])
def test_backbone_without_head_equals_explicit_reference(implementation, images, output):
    model = make_hf_vit(implementation, with_head=False)
    if output == "pooler_output":
        daam = DAAM(lambda x: model(x).pooler_output, adapter=HFViTAdapter(model))
    else:  # DAAM's default for a ViTModel: the final [class] token, through the adapter
        daam = DAAM(model)
    expected = explicit_hf_daam(model, images, target=[5, 40, 63], output=output)
    flow = daam.attribute(images, target=[5, 40, 63], return_flow=True)
    assert_close_relative(flow, expected["flow"])


def test_output_scores_takes_logits_or_the_final_class_token(images):
    classifier = make_hf_vit("sdpa")
    backbone = make_hf_vit("sdpa", with_head=False)
    with torch.no_grad():
        classifier_output, backbone_output = classifier(images), backbone(images)
    assert HFViTAdapter(classifier).output_scores(classifier_output) is classifier_output.logits
    assert torch.equal(
        HFViTAdapter(backbone).output_scores(backbone_output),
        backbone_output.last_hidden_state[:, 0],
    )
    plain = torch.zeros(3, 10)
    assert HFViTAdapter(classifier).output_scores(plain) is plain
    as_tuple = DAAM(lambda x: (classifier(x).logits,), adapter=HFViTAdapter(classifier))
    with pytest.raises(ValueError, match="pooler_output or last_hidden_state, got a tuple"):
        as_tuple.attribute(images, target=0)
    assert module_hook_count(classifier) == 0


def test_contributions_sum_to_the_modules_own_class_output(classifier, images):
    adapter = HFViTAdapter(classifier)
    layers = classifier.vit.layers
    records, module_outputs = record_with_module_outputs(
        adapter, adapter.attention_modules(), lambda: classifier(images)
    )
    for layer, record, module_output in zip(layers, records, module_outputs):
        contributions = class_token_contributions(record.class_attention, record.values)
        assert contributions.shape == (3, 17, 64)
        reproduced = layer.attention.o_proj(contributions.sum(dim=1))
        assert_close_relative(reproduced, module_output[:, 0], 1e-5)


def test_registry_picks_the_hf_adapter_and_reports_the_model_shape(classifier):
    adapter = adapter_for(classifier)
    assert isinstance(adapter, HFViTAdapter)
    assert adapter.attention_modules() == [layer.attention for layer in classifier.vit.layers]
    assert adapter.num_prefix_tokens == 1
    assert adapter.in_channels == 3
    assert adapter.num_outputs == 10
    assert adapter.grid_size((64, 64)) == (4, 4)
    assert isinstance(adapter_for(make_hf_vit("eager", with_head=False)), HFViTAdapter)
    assert HFViTAdapter(make_hf_vit("eager", with_head=False)).num_outputs == 64


def test_supports_only_transformers_models_of_a_known_family(classifier):
    class LookAlike(torch.nn.Module):  # a transformers-like model from another library
        def __init__(self):
            super().__init__()
            self.config = classifier.config
            self.vit = classifier.vit

    assert HFViTAdapter.supports(classifier) is True
    assert HFViTAdapter.supports(LookAlike()) is False
    assert HFViTAdapter.supports(torch.nn.Linear(2, 2)) is False
    detector = transformers.YolosModel(
        transformers.YolosConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, image_size=[32, 32], patch_size=16)
    )
    assert HFViTAdapter.supports(detector) is False


def test_other_image_sizes_fail_before_the_forward_pass(classifier):
    calls = []

    def forward(images):
        calls.append(images)
        return classifier(images).logits

    daam = DAAM(forward, adapter=HFViTAdapter(classifier))
    with pytest.raises(ValueError, match="takes 64x64 images"):
        daam.attribute(make_images(1, 96, 64), target=0)
    interpolating = DAAM(forward, adapter=HFViTAdapter(classifier, interpolate_pos_encoding=True))
    with pytest.raises(ValueError, match="divisible by the patch size"):
        interpolating.attribute(make_images(1, 72, 64), target=0)
    assert calls == []


def test_hooks_are_removed_after_success_and_failure(classifier, images):
    before = module_hook_count(classifier)
    daam = DAAM(classifier)
    daam.attribute(images, target=TARGETS)
    assert module_hook_count(classifier) == before
    with pytest.raises(ValueError, match="target classes below"):
        DAAM(lambda x: classifier(x).logits[:, :5], adapter=HFViTAdapter(classifier)).attribute(
            images, target=7
        )
    assert module_hook_count(classifier) == before


@pytest.mark.slow
def test_the_vit_base_patch16_224_architecture_equals_explicit_reference():
    """transformers' default ViTConfig is google/vit-base-patch16-224's architecture."""
    config = transformers.ViTConfig(num_labels=10)
    assert (config.image_size, config.patch_size, config.num_hidden_layers) == (224, 16, 12)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    images = make_images(2, 224, 224)
    expected = explicit_hf_daam(model, images, target=[3, 7])
    flow = DAAM(model).attribute(images, target=[3, 7], return_flow=True)
    assert flow.shape == (2, 12, 14, 14)
    assert_close_relative(flow, expected["flow"])


def test_layer_takes_attention_modules_in_block_order_and_names_them_in_errors(classifier, images):
    expected = explicit_hf_daam(classifier, images, target=TARGETS)
    layers = classifier.vit.layers
    daam = DAAM(classifier, layer=[layers[3].attention, layers[1].attention])
    block_maps = daam.attribute(images, target=TARGETS, return_flow=True, accumulate=False)
    assert_close_relative(block_maps, expected["block_maps"][:, [1, 3]])
    with pytest.raises(ValueError, match=r"model\.vit\.layers\[i\]\.attention"):
        DAAM(classifier, layer=layers[0].attention.q_proj)
