"""DAAM on timm TNT equals an explicit reference over its outer attention.

The reference below re-runs TNT by hand in float64 on a deep copy: the pixel embedding, the
inner (pixel-level) attention and MLP of every block and the projection of the pixels into the
patch tokens through their own modules (the inner attention has no [class] token and is not
part of the flow), and every block's outer attention written out as a full (B, H, N, N)
matrix, softmax(q k^T / sqrt(d)), from its ``qk`` and ``v`` weights (no ``Attention.forward``,
no scaled_dot_product_attention, no hooks), then the model's own norm and head. Gradients come
from plain autograd at each outer attention's head-concatenated output, and the maps from
``reference.maps_from_explicit_blocks``, the full (B, N, C) contributions
F[b, n, (h, e)] = A[b, h, 0, n] * v[b, h, n, e] as DESIGN.md section 1 writes them.

timm's small random weights make the attention almost uniform, where a wrong query or key
layout would not show: the models here get their outer query / key weights scaled up.
"""

import copy
import warnings
from typing import Callable, Dict, Tuple

import pytest
import timm
import torch
from timm.models.tnt import TNT, Attention

import captum_daam.adapters.timm_tnt  # noqa: F401  (registers the adapter)
from captum_daam import DAAM, class_token_contributions
from captum_daam.adapters import adapter_for
from captum_daam.adapters.timm_tnt import TimmTntAdapter
from helpers import (
    ClassRows,
    assert_attributions_match,
    assert_close_relative,
    make_images,
    make_model,
    module_hook_count,
    record_with_module_outputs,
)
from reference import (
    explicit_gradients,
    maps_from_every_query_row,
    maps_from_explicit_blocks,
)

NUM_CLASSES = 11
TARGETS = [3, 10, 0]

# --------------------------------------------------------------------------- #
# Explicit reference
# --------------------------------------------------------------------------- #


def explicit_outer_attention(attention: Attention, z: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One TNT outer ``Attention`` by hand on the normalised tokens ``z`` (B, N, C).

    q and k come from ``qk``, laid out (2, H, d) per token; v from ``v``. Returns ``attn``
    (B, H, N, N), ``v`` (B, H, N, d), the head-concatenated ``pre_projection`` (B, N, C) and
    ``out`` = proj(pre_projection).
    """
    batch, tokens, _ = z.shape
    heads, width = attention.num_heads, attention.head_dim
    q, k = attention.qk(z).reshape(batch, tokens, 2, heads, width).permute(2, 0, 3, 1, 4)
    v = attention.v(z).reshape(batch, tokens, heads, -1).transpose(1, 2)
    probabilities = ((q @ k.transpose(-2, -1)) * width**-0.5).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, tokens, -1)
    out = attention.proj_drop(attention.proj(pre_projection))
    return {"attn": probabilities, "v": v, "pre_projection": pre_projection, "out": out}


def explicit_forward(model: TNT, images: torch.Tensor) -> Dict[str, object]:
    """TNT by hand, in the model's dtype: inner attention as it is, outer attention explicit."""
    batch = images.shape[0]
    num_patches = model.num_patches
    pixels = model.pixel_embed(images, model.pixel_pos)  # (B * patches, pixels, inner_dim)
    patches = model.norm2_proj(
        model.proj(model.norm1_proj(pixels.reshape(batch, num_patches, -1)))
    )
    x = torch.cat((model.cls_token.expand(batch, -1, -1), patches), dim=1) + model.patch_pos
    x = model.pos_drop(x)
    records = []
    for block in model.blocks:
        # Inner transformer, inside each patch, through its own modules: not in the flow.
        pixels = pixels + block.drop_path(block.attn_in(block.norm_in(pixels)))
        pixels = pixels + block.drop_path(block.mlp_in(block.norm_mlp_in(pixels)))
        if block.norm2_proj is None:  # legacy: norm per pixel, biased projection
            update = block.proj(block.norm1_proj(pixels).reshape(batch, num_patches, -1))
        else:
            update = block.norm2_proj(
                block.proj(block.norm1_proj(pixels.reshape(batch, num_patches, -1)))
            )
        x = torch.cat((x[:, :1], x[:, 1:] + update), dim=1)  # the [class] token gets none
        record = explicit_outer_attention(block.attn_out, block.norm_out(x))
        x = x + block.drop_path(record["out"])
        x = x + block.drop_path(block.mlp(block.norm_mlp(x)))
        records.append(record)
    logits = model.forward_head(model.norm(x))
    return {"logits": logits, "blocks": records, "grid_size": tuple(model.pixel_embed.grid_size)}


def explicit_tnt_daam(
    model: TNT, images: torch.Tensor, target=None, queries="class"
) -> Dict[str, object]:
    """Reference block maps and flow over the outer attention, all in float64."""
    result, targets, gradients = explicit_gradients(explicit_forward, model, images, target)
    logits = result["logits"]
    reduce = maps_from_explicit_blocks if queries == "class" else maps_from_every_query_row
    maps = reduce(result["blocks"], gradients, 1, result["grid_size"])
    return dict(
        maps,
        logits=logits.detach(),
        targets=targets,
        grid_size=result["grid_size"],
        blocks=result["blocks"],
    )


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #


def sharpen(model: TNT, factor: float = 8.0) -> TNT:
    """Scale the outer query / key weights, so the attention is far from uniform."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn_out.qk.weight.mul_(factor)
    return model.eval()


def small_tnt(img_size=32, seed: int = 0, **kwargs) -> TNT:
    torch.manual_seed(seed)
    config = dict(
        img_size=img_size,
        patch_size=8,
        embed_dim=64,
        inner_dim=8,
        depth=3,
        num_heads_inner=2,
        num_heads_outer=4,
        mlp_ratio=2.0,
        first_stride=4,
        num_classes=NUM_CLASSES,
    )
    return sharpen(TNT(**{**config, **kwargs}))


MODELS: Dict[str, Tuple[Callable[[], TNT], Tuple[int, int]]] = {
    "tnt_small": (lambda: small_tnt(), (32, 32)),
    # The legacy pixel embedding and projection, q / k / v biases, a non-square 4 x 6 grid.
    "tnt_legacy_non_square_qkv_bias": (
        lambda: small_tnt((32, 48), legacy=True, qkv_bias=True),
        (32, 48),
    ),
    # Average pooling of the patch tokens: DAAM warns; the last block's map is zero.
    "tnt_avg": (lambda: small_tnt(global_pool="avg"), (32, 32)),
}


def make_daam(model, **kwargs) -> ClassRows:
    return ClassRows(model, **kwargs)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_case(request):
    build, image_size = MODELS[request.param]
    return request.param, build(), image_size


_REFERENCES: Dict[tuple, Dict[str, object]] = {}


def cached_reference(case: str, model, images, target) -> Dict[str, object]:
    key = (case, None if target is None else tuple(target))
    if key not in _REFERENCES:
        if any(cached_case != case for cached_case, _ in _REFERENCES):
            _REFERENCES.clear()  # one model's references at a time
        _REFERENCES[key] = explicit_tnt_daam(model, images, target=target)
    return _REFERENCES[key]


@pytest.fixture(scope="module", autouse=True)
def free_references_after_the_module():
    yield
    _REFERENCES.clear()


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


def test_explicit_reference_reproduces_the_models_logits(model_case):
    case, model, image_size = model_case
    images = make_images(3, *image_size)
    with torch.no_grad():
        own = model(images)
        by_hand = explicit_forward(model, images)["logits"]
    assert_close_relative(by_hand, own, 1e-5)
    assert_close_relative(cached_reference(case, model, images, None)["logits"], own, 1e-5)


@pytest.mark.parametrize("target", [TARGETS, None], ids=["three_targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(model_case, target):
    case, model, image_size = model_case
    images = make_images(3, *image_size)
    expected = cached_reference(case, model, images, target)
    flow = assert_attributions_match(make_daam(model), images, target, expected)
    assert flow.shape == (3, len(model.blocks), *expected["grid_size"])
    assert float(expected["flow"][:, -1].amax()) > 0  # not a vacuous comparison of zeros
    if target is None:
        assert expected["targets"].tolist() == model(images).argmax(1).tolist()


def test_full_attention_matrices_equal_explicit_ones(model_case):
    """``record.attention()``, for attention rollouts, is the whole explicit matrix."""
    case, model, image_size = model_case
    images = make_images(3, *image_size)
    adapter = adapter_for(model)
    with adapter.record(adapter.attention_modules(), full=True) as records, torch.no_grad():
        model(images)
    with torch.no_grad():
        explicit = explicit_forward(copy.deepcopy(model).double(), images.double())["blocks"]
    for record, block in zip(records, explicit):
        assert_close_relative(record.attention(), block["attn"], 1e-5)
        assert_close_relative(record.class_attention, block["attn"][:, :, 0], 1e-5)
        assert_close_relative(record.values, block["v"], 1e-5)
        row = block["attn"][:, :, 0]
        assert float(row.amax()) > 3.0 / row.shape[-1]  # peaked: a wrong layout would show


def test_no_attention_module_has_a_fused_path(model_case):
    """TNT's Attention computes its attention one way only: there is no fused flag to test."""
    case, model, image_size = model_case
    assert not any(hasattr(module, "fused_attn") for module in model.modules())


@pytest.mark.slow
def test_smallest_registered_model_equals_explicit_reference():
    """tnt_s_patch16_224 at its default size (the legacy variant is as large)."""
    model = sharpen(make_model("tnt_s_patch16_224", num_classes=NUM_CLASSES), factor=4.0)
    images = make_images(1, 224, 224)
    with torch.no_grad():
        own = model(images)
    expected = explicit_tnt_daam(model, images, target=[7])
    assert_close_relative(expected["logits"], own, 1e-5)
    daam = DAAM(model)
    maps = daam.attribute(images, target=[7], return_flow=True, accumulate=False)
    flow = daam.attribute(images, target=[7], return_flow=True)
    assert flow.shape == (1, 12, 14, 14)
    assert_close_relative(maps, expected["block_maps"])
    assert_close_relative(flow, expected["flow"])
    assert float(expected["flow"][:, -1].amax()) > 0


def test_contributions_sum_to_the_modules_own_class_output():
    """Sum over tokens of F, through the block's projection, is the outer attention's
    [class] output."""
    model = small_tnt()
    images = make_images(2, 32, 32)
    adapter = adapter_for(model)
    records, module_outputs = record_with_module_outputs(
        adapter, adapter.attention_modules(), lambda: model(images)
    )
    for block, record, module_output in zip(model.blocks, records, module_outputs):
        contributions = class_token_contributions(record.class_attention, record.values)
        assert contributions.shape == (2, 1 + 16, 64)
        reproduced = block.attn_out.proj(contributions.sum(dim=1))
        assert_close_relative(reproduced, module_output[:, 0], 1e-5)


def test_daam_picks_the_tnt_adapter_and_runs_over_outer_attention():
    model = small_tnt()
    daam = DAAM(model)
    assert isinstance(daam.adapter, TimmTntAdapter)
    assert daam.layer == [block.attn_out for block in model.blocks]
    assert daam.adapter.self_attention
    assert daam.adapter.in_channels == 3


def test_inner_attention_is_refused_as_layer():
    model = small_tnt()
    with pytest.raises(ValueError, match="not one of its 3 attention modules"):
        DAAM(model, layer=model.blocks[1].attn_in)


def test_gradient_checkpointing_gives_the_same_maps():
    """Checkpointed blocks run their forward again in the backward pass."""
    model = small_tnt()
    images = make_images(2, 32, 32)
    plain = DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    model.set_grad_checkpointing(True)
    checkpointed = DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    assert_close_relative(checkpointed, plain, 1e-6)


def test_class_rows_of_an_average_pooled_model_warn_and_the_last_map_is_zero():
    """What the warning says is true: the last block's [class] token does not reach the output."""
    model = small_tnt(global_pool="avg")
    expected = explicit_tnt_daam(model, make_images(2, 32, 32), target=[1, 2])
    assert float(expected["block_maps"][:, -1].abs().amax()) == 0
    assert float(expected["block_maps"][:, 0].amax()) > 0
    with pytest.warns(UserWarning, match="the last block's map is zero"):
        DAAM(model).attribute(make_images(1, 32, 32), target=0, queries="class")


def test_other_outer_attention_is_refused_with_a_message():
    model = small_tnt()
    model.blocks[1].attn_out = torch.nn.Identity()
    with pytest.raises(
        TypeError, match="Block 1 of TNT.blocks uses Identity .* supports "
        "timm.models.tnt.Attention"
    ):
        DAAM(model)


def test_image_size_other_than_the_models_is_refused():
    with pytest.raises(ValueError, match="takes 32x48 images \\(a fixed 4x6 patch grid\\)"):
        DAAM(small_tnt((32, 48))).attribute(make_images(1, 48, 32), target=0)


def test_no_hooks_are_left_after_an_error():
    """An error in the forward pass after the outer attention ran, hooks in place."""
    model = small_tnt()

    def fail(module, args, output):
        raise RuntimeError("failed after the blocks")

    handle = model.norm.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="failed after the blocks"):
        DAAM(model).attribute(make_images(2, 32, 32), target=[1, 2])
    handle.remove()
    assert module_hook_count(model) == 0


@pytest.mark.parametrize("name", timm.list_models("tnt*"))
def test_every_registered_tnt_gets_the_adapter(name):
    """Built on the meta device (no memory, no weights): the adapter only reads structure."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    adapter = adapter_for(model)
    assert isinstance(adapter, TimmTntAdapter)
    assert adapter.attention_modules() == [block.attn_out for block in model.blocks]
    assert adapter.grid_size((224, 224)) == (14, 14)


def test_an_average_pooled_model_is_explained_by_every_query_row_by_default():
    """global_pool='avg' reads the patch tokens: the default (queries='all') equals the
    explicit every-row reference, and the last block's map is no longer zero."""
    build, image_size = MODELS["tnt_avg"]
    model = build()
    images = make_images(3, *image_size)
    expected = explicit_tnt_daam(model, images, target=TARGETS, queries="all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_attributions_match(DAAM(model), images, TARGETS, expected)
    assert float(expected["block_maps"][:, -1].amax()) > 0
