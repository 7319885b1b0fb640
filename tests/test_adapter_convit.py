"""DAAM on timm ConViT equals an explicit reference over its MHSA blocks.

The reference below re-runs ConViT by hand in float64 on a deep copy: the patch and position
embedding and the GPSA blocks (patch tokens only, before the [class] token exists) through
their own modules, then the [class] token concatenated and every MHSA block with its
attention written out as a full (B, H, N, N) matrix, softmax(q k^T / sqrt(d)), from the qkv
weights (no ``MHSA.forward``, no scaled_dot_product_attention, no hooks), and the model's own
norm and head. Gradients come from plain autograd at each MHSA block's head-concatenated
output, and the maps from ``reference.maps_from_explicit_blocks``, the full (B, N, C)
contributions F[b, n, (h, e)] = A[b, h, 0, n] * v[b, h, n, e] as DESIGN.md section 1 writes
them.

timm's small random weights make the attention almost uniform, where a wrong query or key
layout would not show: the models here get their MHSA query and key weights scaled up.
"""

import copy
import warnings
from typing import Callable, Dict

import pytest
import timm
import torch
from timm.models.convit import MHSA, ConVit

import captum_daam.adapters.timm_convit  # noqa: F401  (registers the adapter)
from captum_daam import DAAM, class_token_contributions
from captum_daam.adapters import adapter_for
from captum_daam.adapters.timm_convit import TimmConvitAdapter
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


def explicit_mhsa(attention: MHSA, z: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One ConViT ``MHSA`` by hand on the normalised tokens ``z`` (B, N, C).

    Returns ``attn`` (B, H, N, N), ``v`` (B, H, N, d), the head-concatenated
    ``pre_projection`` (B, N, C), channel h * d + e, and ``out`` = proj(pre_projection).
    """
    batch, tokens, channels = z.shape
    heads = attention.num_heads
    width = channels // heads
    q, k, v = attention.qkv(z).reshape(batch, tokens, 3, heads, width).permute(2, 0, 3, 1, 4)
    probabilities = ((q @ k.transpose(-2, -1)) * width**-0.5).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, tokens, channels)
    out = attention.proj_drop(attention.proj(pre_projection))
    return {"attn": probabilities, "v": v, "pre_projection": pre_projection, "out": out}


def explicit_forward(model: ConVit, images: torch.Tensor) -> Dict[str, object]:
    """ConViT by hand, in the model's dtype: GPSA blocks as they are, MHSA blocks explicit."""
    batch = images.shape[0]
    x = model.patch_embed(images)  # (B, gh * gw, C), row-major
    if model.use_pos_embed:
        x = x + model.pos_embed
    x = model.pos_drop(x)
    records = []
    for index, block in enumerate(model.blocks):
        if index < model.local_up_to_layer:
            x = block(x)  # gated positional self-attention on the patches: not in the flow
            continue
        if index == model.local_up_to_layer:
            x = torch.cat((model.cls_token.expand(batch, -1, -1), x), dim=1)
        record = explicit_mhsa(block.attn, block.norm1(x))
        x = x + block.drop_path(record["out"])
        x = x + block.drop_path(block.mlp(block.norm2(x)))
        records.append(record)
    logits = model.forward_head(model.norm(x))
    return {"logits": logits, "blocks": records, "grid_size": tuple(model.patch_embed.grid_size)}


def explicit_convit_daam(
    model: ConVit, images: torch.Tensor, target=None, queries="class"
) -> Dict[str, object]:
    """Reference block maps and flow over the MHSA blocks, all in float64."""
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


def sharpen(model: ConVit, factor: float = 8.0) -> ConVit:
    """Scale the MHSA query and key weights, so the attention is far from uniform."""
    with torch.no_grad():
        for block in model.blocks:
            if isinstance(block.attn, MHSA):
                width = block.attn.qkv.out_features // 3
                block.attn.qkv.weight[: 2 * width].mul_(factor)
    return model.eval()


def small_convit(seed: int = 0, **kwargs) -> ConVit:
    torch.manual_seed(seed)
    config = dict(
        img_size=32,
        patch_size=8,
        embed_dim=16,  # per head: ConVit multiplies it by num_heads
        num_heads=4,
        depth=4,
        local_up_to_layer=2,
        mlp_ratio=2.0,
        num_classes=NUM_CLASSES,
    )
    return sharpen(ConVit(**{**config, **kwargs}))


MODELS: Dict[str, Callable[[], ConVit]] = {
    "convit_small": lambda: small_convit(),
    "convit_qkv_bias_no_pos_embed": lambda: small_convit(
        qkv_bias=True, use_pos_embed=False, locality_strength=2.0
    ),
    # No GPSA block: the [class] token is there from the first block.
    "convit_no_gpsa": lambda: small_convit(local_up_to_layer=0, depth=3),
    # Average pooling of the patch tokens: DAAM warns; the last block's map is zero.
    "convit_avg": lambda: small_convit(global_pool="avg"),
}


def make_daam(model, **kwargs) -> ClassRows:
    return ClassRows(model, **kwargs)


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_case(request):
    return request.param, MODELS[request.param]()


_REFERENCES: Dict[tuple, Dict[str, object]] = {}


def cached_reference(case: str, model, images, target) -> Dict[str, object]:
    key = (case, None if target is None else tuple(target))
    if key not in _REFERENCES:
        if any(cached_case != case for cached_case, _ in _REFERENCES):
            _REFERENCES.clear()  # one model's references at a time
        _REFERENCES[key] = explicit_convit_daam(model, images, target=target)
    return _REFERENCES[key]


@pytest.fixture(scope="module", autouse=True)
def free_references_after_the_module():
    yield
    _REFERENCES.clear()


def flow_blocks(model: ConVit):
    return model.blocks[model.local_up_to_layer :]


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


def test_explicit_reference_reproduces_the_models_logits(model_case):
    case, model = model_case
    images = make_images(3, 32, 32)
    with torch.no_grad():
        own = model(images)
        by_hand = explicit_forward(model, images)["logits"]
    assert_close_relative(by_hand, own, 1e-5)
    assert_close_relative(cached_reference(case, model, images, None)["logits"], own, 1e-5)


@pytest.mark.parametrize("target", [TARGETS, None], ids=["three_targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(model_case, target):
    case, model = model_case
    images = make_images(3, 32, 32)
    expected = cached_reference(case, model, images, target)
    flow = assert_attributions_match(make_daam(model), images, target, expected)
    assert flow.shape == (3, len(flow_blocks(model)), 4, 4)
    assert float(expected["flow"][:, -1].amax()) > 0  # not a vacuous comparison of zeros
    if target is None:
        assert expected["targets"].tolist() == model(images).argmax(1).tolist()


def test_full_attention_matrices_equal_explicit_ones(model_case):
    """``record.attention()``, for attention rollouts, is the whole explicit matrix."""
    case, model = model_case
    images = make_images(3, 32, 32)
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
    """MHSA (and GPSA) compute their attention one way only: there is no fused flag to test."""
    case, model = model_case
    assert not any(hasattr(module, "fused_attn") for module in model.modules())


@pytest.mark.slow
def test_smallest_registered_model_equals_explicit_reference():
    """convit_tiny at its default size: 10 GPSA blocks, then 2 MHSA blocks."""
    model = sharpen(make_model("convit_tiny", num_classes=NUM_CLASSES), factor=4.0)
    images = make_images(2, 224, 224)
    with torch.no_grad():
        own = model(images)
    expected = explicit_convit_daam(model, images, target=[7, 2])
    assert_close_relative(expected["logits"], own, 1e-5)
    daam = DAAM(model)
    maps = daam.attribute(images, target=[7, 2], return_flow=True, accumulate=False)
    flow = daam.attribute(images, target=[7, 2], return_flow=True)
    assert flow.shape == (2, 2, 14, 14)
    assert_close_relative(maps, expected["block_maps"])
    assert_close_relative(flow, expected["flow"])
    assert float(expected["flow"][:, -1].amax()) > 0


def test_contributions_sum_to_the_modules_own_class_output():
    """Sum over tokens of F, through the block's projection, is the MHSA [class] output."""
    model = small_convit()
    images = make_images(2, 32, 32)
    adapter = adapter_for(model)
    records, module_outputs = record_with_module_outputs(
        adapter, adapter.attention_modules(), lambda: model(images)
    )
    for block, record, module_output in zip(flow_blocks(model), records, module_outputs):
        contributions = class_token_contributions(record.class_attention, record.values)
        assert contributions.shape == (2, 1 + 16, 64)
        reproduced = block.attn.proj(contributions.sum(dim=1))
        assert_close_relative(reproduced, module_output[:, 0], 1e-5)


def test_daam_picks_the_convit_adapter_and_runs_over_mhsa_blocks():
    model = small_convit()
    daam = DAAM(model)
    assert isinstance(daam.adapter, TimmConvitAdapter)
    assert daam.layer == [model.blocks[2].attn, model.blocks[3].attn]
    assert daam.adapter.self_attention


def test_gpsa_block_is_refused_as_layer():
    model = small_convit()
    with pytest.raises(ValueError, match="not one of its 2 attention modules"):
        DAAM(model, layer=model.blocks[1].attn)


def test_class_rows_of_an_average_pooled_model_warn_and_the_last_map_is_zero():
    """What the warning says is true: the last block's [class] token does not reach the output."""
    model = small_convit(global_pool="avg")
    expected = explicit_convit_daam(model, make_images(2, 32, 32), target=[1, 2])
    assert float(expected["block_maps"][:, -1].abs().amax()) == 0
    assert float(expected["block_maps"][:, 0].amax()) > 0
    with pytest.warns(UserWarning, match="the last block's map is zero"):
        DAAM(model).attribute(make_images(1, 32, 32), target=0, queries="class")


def test_model_without_mhsa_blocks_is_refused_with_a_message():
    model = small_convit(depth=2, local_up_to_layer=2)
    images = make_images(1, 32, 32)
    with torch.no_grad():
        before = model(images)
        model.cls_token.add_(1.0)
        after = model(images)
    assert torch.equal(before, after)  # true: the [class] token is never used
    with pytest.raises(TypeError, match="has 2 blocks in all, so it never adds one"):
        DAAM(model)


def test_pruned_model_is_refused_with_a_message():
    model = small_convit()
    model.prune_intermediate_layers(indices=[0])
    assert model.cls_token is None
    with pytest.raises(TypeError, match="pruned by prune_intermediate_layers"):
        DAAM(model)


def test_attention_in_the_wrong_place_is_refused_with_a_message():
    model = small_convit()
    model.blocks[0].attn = MHSA(64, num_heads=4)
    with pytest.raises(TypeError, match="Block 0 of ConVit.blocks uses MHSA; .* expects GPSA"):
        DAAM(model)
    model = small_convit()
    model.blocks[3].attn = torch.nn.Identity()
    with pytest.raises(TypeError, match="Block 3 of ConVit.blocks uses Identity .* supports"):
        DAAM(model)


def test_image_size_other_than_the_models_is_refused():
    with pytest.raises(ValueError, match="takes 32x32 images"):
        DAAM(small_convit()).attribute(make_images(1, 48, 48), target=0)


def test_no_hooks_are_left_after_an_error():
    """An error in the forward pass after the MHSA blocks ran, hooks in place."""
    model = small_convit()

    def fail(module, args, output):
        raise RuntimeError("failed after the MHSA blocks")

    handle = model.norm.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="failed after the MHSA blocks"):
        DAAM(model).attribute(make_images(2, 32, 32), target=[1, 2])
    handle.remove()
    assert module_hook_count(model) == 0


@pytest.mark.parametrize("name", timm.list_models("convit*"))
def test_every_registered_convit_gets_the_adapter(name):
    """Built on the meta device (no memory, no weights): the adapter only reads structure."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    adapter = adapter_for(model)
    assert isinstance(adapter, TimmConvitAdapter)
    assert adapter.attention_modules() == [block.attn for block in model.blocks[10:]]
    assert adapter.grid_size((224, 224)) == (14, 14)


def test_an_average_pooled_model_is_explained_by_every_query_row_by_default():
    """global_pool='avg' reads the patch tokens: the default (queries='all') equals the
    explicit every-row reference, and the last block's map is no longer zero."""
    model = MODELS["convit_avg"]()
    images = make_images(3, 32, 32)
    expected = explicit_convit_daam(model, images, target=TARGETS, queries="all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_attributions_match(DAAM(model), images, TARGETS, expected)
    assert float(expected["block_maps"][:, -1].amax()) > 0
