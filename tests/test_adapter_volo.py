"""DAAM on timm VOLO equals an explicit reference over its class-attention blocks.

The reference below re-runs VOLO by hand: the convolutional stem, the outlooker and
transformer stages through their own modules (float32, without gradients: DAAM needs none
below the class-attention blocks), the (B, H, W, C) token map flattened row-major, then every
class-attention block of ``model.post_network`` in float64 with its attention row formed
explicitly from q, k and v (no ``ClassAttention.forward``, no scaled_dot_product_attention),
and the model's own norm and head, token-labelling term included. Gradients come from plain
autograd at each block's head-concatenated output, and the maps from
``reference.maps_from_explicit_blocks``, the full (B, N, C) contributions
F[b, n, (h, e)] = A[b, h, n] * v[b, h, n, e] as DESIGN.md section 1 writes them.

timm's small random weights make the [class] attention almost uniform, where a wrong key
layout would not show: the models here get query and key / value weights scaled up.
"""

import contextlib
import copy
from typing import Callable, Dict, Tuple

import pytest
import timm
import torch
from timm.models.volo import VOLO, ClassAttention

import captum_daam.adapters.timm_volo  # noqa: F401  (registers the adapter)
from captum_daam import DAAM, AttentionRollout, class_token_contributions
from captum_daam.adapters import adapter_for
from captum_daam.adapters.timm_volo import TimmVoloAdapter
from helpers import (
    assert_attributions_match,
    assert_close_relative,
    make_images,
    make_model,
    module_hook_count,
    record_with_module_outputs,
    set_fused_attention,
)
from reference import maps_from_explicit_blocks, resolve_targets

NUM_CLASSES = 11
TARGETS = [3, 10, 0]

# --------------------------------------------------------------------------- #
# Explicit reference
# --------------------------------------------------------------------------- #


def explicit_class_attention(
    attention: ClassAttention, tokens: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """One VOLO ``ClassAttention`` by hand: the [class] query against all tokens.

    k and v come from the one ``kv`` layer, laid out (2, H, d) per token. Returns ``attn``
    (B, H, 1, N) = softmax(q k^T / sqrt(d)), ``v`` (B, H, N, d), the head-concatenated
    ``pre_projection`` (B, 1, C) and ``out`` = proj(pre_projection).
    """
    batch, num_tokens, _ = tokens.shape
    heads, width = attention.num_heads, attention.head_dim
    keys_values = attention.kv(tokens).reshape(batch, num_tokens, 2, heads, width)
    k = keys_values[:, :, 0].transpose(1, 2)
    v = keys_values[:, :, 1].transpose(1, 2)
    q = attention.q(tokens[:, :1]).reshape(batch, 1, heads, width).transpose(1, 2)
    probabilities = ((q @ k.transpose(-2, -1)) * width**-0.5).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, 1, heads * width)
    out = attention.proj_drop(attention.proj(pre_projection))
    return {"attn": probabilities, "v": v, "pre_projection": pre_projection, "out": out}


def volo_patch_tokens(model: VOLO, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Patch tokens entering VOLO's class-attention blocks, and the token grid."""
    x = model.patch_embed(images).permute(0, 2, 3, 1)  # (B, H, W, C)
    for index, stage in enumerate(model.network):  # outlooker, downsample, transformer stages
        if index == 2:  # the position embedding is added after the outlooker stage
            x = model.pos_drop(x + model.pos_embed)
        x = stage(x)
    grid = tuple(x.shape[1:3])
    return x.flatten(1, 2), grid  # row-major: token r * gw + c is grid cell (r, c)


def volo_class_attention_head(model: VOLO, patches: torch.Tensor) -> Dict[str, object]:
    """VOLO's class-attention blocks with explicit attention, then its norm and head."""
    class_token = model.cls_token.expand(patches.shape[0], -1, -1)
    records = []
    for block in model.post_network:
        tokens = block.norm1(torch.cat((class_token, patches), dim=1))
        record = explicit_class_attention(block.attn, tokens)
        class_token = class_token + block.drop_path1(record["out"])
        class_token = class_token + block.drop_path2(block.mlp(block.norm2(class_token)))
        records.append(record)  # the patch tokens pass through unchanged
    # The model's own head: [class] token (or mean) plus half the largest aux_head score.
    logits = model.forward_head(model.norm(torch.cat((class_token, patches), dim=1)))
    return {"logits": logits, "blocks": records}


def explicit_forward(model: VOLO, images: torch.Tensor) -> Dict[str, object]:
    """The whole forward by hand, in the model's dtype."""
    patches, grid = volo_patch_tokens(model, images)
    return dict(volo_class_attention_head(model, patches), grid_size=grid)


def explicit_volo_daam(model: VOLO, images: torch.Tensor, target=None) -> Dict[str, object]:
    """Reference block maps and flow; class-attention blocks and head in float64."""
    with torch.no_grad():
        patches, grid = volo_patch_tokens(model, images)
    model = copy.deepcopy(model).double()
    with torch.enable_grad():
        result = volo_class_attention_head(model, patches.double())
        logits = result["logits"]
        targets = resolve_targets(target, logits)
        score = logits[torch.arange(logits.shape[0]), targets].sum()
        pre_projections = [record["pre_projection"] for record in result["blocks"]]
        gradients = torch.autograd.grad(score, pre_projections)
    maps = maps_from_explicit_blocks(result["blocks"], gradients, 1, grid)
    return dict(
        maps, logits=logits.detach(), targets=targets, grid_size=grid, blocks=result["blocks"]
    )


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #


def sharpen(model: VOLO, factor: float = 8.0) -> VOLO:
    """Scale the class-attention query and key / value weights, so the [class] row is far
    from uniform."""
    with torch.no_grad():
        for block in model.post_network or ():
            block.attn.q.weight.mul_(factor)
            block.attn.kv.weight.mul_(factor)
    return model.eval()


def small_volo(img_size=64, seed: int = 0, **kwargs) -> VOLO:
    torch.manual_seed(seed)
    config = dict(
        layers=(1, 1),
        img_size=img_size,
        patch_size=8,
        stem_hidden_dim=16,
        embed_dims=(32, 64),
        num_heads=(2, 4),
        downsamples=(True, False),
        outlook_attention=(True, False),
        mlp_ratio=2.0,
        post_layers=("ca", "ca", "ca"),
        num_classes=NUM_CLASSES,
    )
    return sharpen(VOLO(**{**config, **kwargs}))


MODELS: Dict[str, Tuple[Callable[[], VOLO], Tuple[int, int]]] = {
    "volo_small": (lambda: small_volo(), (64, 64)),
    # A non-square token grid (4 x 6), q / kv biases, no token-labelling head.
    "volo_non_square_qkv_bias_no_aux": (
        lambda: small_volo((64, 96), qkv_bias=True, use_aux_head=False),
        (64, 96),
    ),
    # Average pooling over the [class] and patch tokens: DAAM warns and explains that part.
    "volo_avg": (lambda: small_volo(global_pool="avg"), (64, 64)),
}


def pooling_warning(model):
    if model.global_pool == "token":
        return contextlib.nullcontext()
    return pytest.warns(UserWarning, match="global_pool='avg', the mean of the \\[class\\]")


def make_daam(model, **kwargs) -> DAAM:
    with pooling_warning(model):
        return DAAM(model, **kwargs)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_case(request):
    build, image_size = MODELS[request.param]
    return request.param, build(), image_size


_REFERENCES: Dict[tuple, Dict[str, object]] = {}


def cached_reference(case: str, model, images, target) -> Dict[str, object]:
    """The reference does not depend on fused attention: compute it once per model and target."""
    key = (case, None if target is None else tuple(target))
    if key not in _REFERENCES:
        if any(cached_case != case for cached_case, _ in _REFERENCES):
            _REFERENCES.clear()  # one model's references at a time
        _REFERENCES[key] = explicit_volo_daam(model, images, target=target)
    return _REFERENCES[key]


@pytest.fixture(scope="module", autouse=True)
def free_references_after_the_module():
    yield
    _REFERENCES.clear()


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_explicit_reference_reproduces_the_models_logits(model_case, fused):
    """``fused`` switches the transformer stage's attention (ClassAttention has one path)."""
    case, model, image_size = model_case
    set_fused_attention(model, fused)
    images = make_images(3, *image_size)
    with torch.no_grad():
        own = model(images)
        by_hand = explicit_forward(model, images)["logits"]
    assert_close_relative(by_hand, own, 1e-5)
    assert_close_relative(cached_reference(case, model, images, None)["logits"], own, 1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["three_targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(model_case, target, fused):
    case, model, image_size = model_case
    set_fused_attention(model, fused)
    images = make_images(3, *image_size)
    expected = cached_reference(case, model, images, target)
    flow = assert_attributions_match(make_daam(model), images, target, expected)
    assert flow.shape == (3, len(model.post_network), *expected["grid_size"])
    assert float(expected["flow"][:, -1].amax()) > 0  # not a vacuous comparison of zeros
    if target is None:
        assert expected["targets"].tolist() == model(images).argmax(1).tolist()


def test_class_attention_rows_are_far_from_uniform(model_case):
    """The test models' [class] rows are peaked, so a wrong key layout would show."""
    case, model, image_size = model_case
    expected = cached_reference(case, model, make_images(3, *image_size), TARGETS)
    for record in expected["blocks"]:
        row = record["attn"].detach()[:, :, 0]
        assert float(row.amax()) > 5.0 / row.shape[-1]


def test_grid_is_the_token_map_of_the_stem_and_downsampling():
    model = small_volo((64, 96))
    assert adapter_for(model).grid_size((64, 96)) == (4, 6)
    assert adapter_for(model).grid_size((63, 95)) == (4, 6)  # the stem rounds up, then down
    with pytest.raises(ValueError, match="4x6 token grid \\(64x96 images\\), but 64x64"):
        DAAM(model).attribute(make_images(1, 64, 64), target=0)


@pytest.mark.slow
def test_smallest_registered_model_equals_explicit_reference():
    """volo_d1_224 at its default size, with its token-labelling head."""
    model = sharpen(make_model("volo_d1_224", num_classes=NUM_CLASSES), factor=4.0)
    images = make_images(1, 224, 224)
    with torch.no_grad():
        own = model(images)
    expected = explicit_volo_daam(model, images, target=[7])
    assert_close_relative(expected["logits"], own, 1e-5)
    daam = DAAM(model)
    maps = daam.attribute(images, target=[7], return_flow=True, accumulate=False)
    flow = daam.attribute(images, target=[7], return_flow=True)
    assert flow.shape == (1, 2, 14, 14)
    assert_close_relative(maps, expected["block_maps"])
    assert_close_relative(flow, expected["flow"])
    assert float(expected["flow"][:, -1].amax()) > 0


def test_token_labelling_term_does_not_change_the_maps():
    """What the adapter documents: the aux_head term reads patch tokens that do not pass
    through the class-attention blocks, so removing it leaves every block's gradient, and
    map, as it is."""
    model = small_volo()
    images = make_images(3, 64, 64, seed=5)
    with_aux = DAAM(model).attribute(images, target=TARGETS, return_flow=True)
    with torch.no_grad():
        patch_scores = model.aux_head(model.forward_features(images)[:, 1:]).amax(dim=1)
    assert float(patch_scores.abs().amax()) > 0  # the term is there and not zero
    model.aux_head = None
    without_aux = DAAM(model).attribute(images, target=TARGETS, return_flow=True)
    assert_close_relative(with_aux, without_aux, 1e-6)


def test_contributions_sum_to_the_modules_own_class_output():
    """Sum over tokens of F, through the block's projection, is the ClassAttention output."""
    model = small_volo()
    images = make_images(2, 64, 64)
    adapter = adapter_for(model)
    records, module_outputs = record_with_module_outputs(
        adapter, adapter.attention_modules(), lambda: model(images)
    )
    for block, record, module_output in zip(model.post_network, records, module_outputs):
        contributions = class_token_contributions(record.class_attention, record.values)
        assert contributions.shape == (2, 1 + 16, 64)
        reproduced = block.attn.proj(contributions.sum(dim=1))
        assert_close_relative(reproduced, module_output[:, 0], 1e-5)


def test_daam_picks_the_volo_adapter_and_runs_over_class_attention_blocks():
    model = small_volo()
    daam = DAAM(model)
    assert isinstance(daam.adapter, TimmVoloAdapter)
    assert daam.layer == [block.attn for block in model.post_network]
    assert daam.adapter.num_prefix_tokens == 1
    assert not daam.adapter.self_attention


def test_layer_restricts_the_flow_to_those_blocks_in_block_order():
    model = small_volo()
    images = make_images(3, 64, 64, seed=2)
    expected = explicit_volo_daam(model, images, target=TARGETS)
    blocks = model.post_network
    chosen = DAAM(model, layer=[blocks[2].attn, blocks[0].attn])
    maps = chosen.attribute(images, target=TARGETS, return_flow=True, accumulate=False)
    assert_close_relative(maps, expected["block_maps"][:, [0, 2]])


def test_transformer_stage_attention_is_refused_as_layer():
    model = small_volo()
    with pytest.raises(ValueError, match="not one of its 3 attention modules"):
        DAAM(model, layer=model.network[2][0].attn)


def test_attention_rollout_is_refused_for_class_attention_blocks():
    with pytest.raises(TypeError, match="class-attention blocks"):
        AttentionRollout(small_volo())


def test_gradient_checkpointing_gives_the_same_maps():
    """VOLO checkpoints its stages and its class-attention blocks, whose forward the
    checkpointed backward pass runs again."""
    model = small_volo()
    images = make_images(2, 64, 64)
    plain = DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    model.set_grad_checkpointing(True)
    checkpointed = DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    assert_close_relative(checkpointed, plain, 1e-6)


def test_model_without_class_attention_blocks_is_refused_with_a_message():
    model = small_volo(post_layers=None)
    assert getattr(model, "cls_token", None) is None
    with pytest.raises(TypeError, match="post_layers=None, or its head pruned"):
        DAAM(model)


def test_pruned_model_is_refused_with_a_message():
    model = small_volo()
    model.prune_intermediate_layers(indices=1)
    assert model.post_network is None and model.cls_token is None
    with pytest.raises(TypeError, match="has none \\(built with post_layers=None"):
        DAAM(model)


def test_per_token_output_is_refused_with_a_message():
    model = small_volo(global_pool="")
    with torch.no_grad():
        assert model(make_images(1, 64, 64)).shape == (1, 17, NUM_CLASSES)  # what it says
    with pytest.raises(TypeError, match="global_pool='', so it returns one output per token"):
        DAAM(model)


def test_average_pooling_reads_the_class_token_so_daam_warns_rather_than_refuses():
    """With global_pool='avg' the mean includes the [class] token: its gradient is not zero."""
    model = small_volo(global_pool="avg")
    expected = explicit_volo_daam(model, make_images(2, 64, 64), target=[1, 2])
    assert all(float(gradient.abs().amax()) > 0 for gradient in expected["class_gradients"])
    with pooling_warning(model):
        adapter_for(model)


def test_no_hooks_are_left_after_an_error():
    """An error in the forward pass after the class-attention blocks ran, hooks in place."""
    model = small_volo()

    def fail(module, args, output):
        raise RuntimeError("failed after the class-attention blocks")

    handle = model.norm.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="failed after the class-attention blocks"):
        DAAM(model).attribute(make_images(2, 64, 64), target=[1, 2])
    handle.remove()
    assert module_hook_count(model) == 0


@pytest.mark.parametrize("name", timm.list_models("volo*"))
def test_every_registered_volo_gets_the_adapter(name):
    """Built on the meta device (no memory, no weights): the adapter only reads structure."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    adapter = adapter_for(model)
    assert isinstance(adapter, TimmVoloAdapter)
    assert adapter.attention_modules() == [block.attn for block in model.post_network]
    height, width = model.pretrained_cfg["input_size"][1:]
    assert adapter.grid_size((height, width)) == (height // 16, width // 16)
