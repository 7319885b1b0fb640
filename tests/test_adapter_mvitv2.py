"""DAAM on timm MViTv2 with a [class] token equals an explicit reference, block by block on
each block's own key / value grid.

The reference below re-runs the model by hand in float64 on a deep copy: the patch embedding
and the blocks' norms, shortcuts and MLPs through the model's own modules, and every attention
written out: q, k, v from the qkv weights, each pooled over its row-major patch grid with the
module's own pooling layer and norm (the [class] token kept out of the pooling), the
decomposed relative position bias looked up by hand in its tables for patch queries over patch
keys, the full (B, H, Nq, Nk) matrix softmax(q k^T / sqrt(d) + bias), and the residual pooled
query added to the output. No attention forward, no timm helper for the pooling layout or the
bias, no hooks. Gradients come from plain autograd at each block's output before ``proj``;
each block map is formed on that block's key / value grid (``reference.maps_from_explicit_blocks``
one block at a time), and the flow resamples them to the finest grid by an explicit
area-weighted split written here.

timm initialises the weights small (trunc_normal std 0.02), which makes the attention almost
uniform and the relative position bias negligible: the models here get larger q / k weights
and seeded noise on the position tables, so that a missing bias or pooling shows in the maps.
"""

import copy
import warnings
from typing import Dict, Optional, Tuple

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.mvitv2 import MultiScaleAttention, MultiScaleVit, MultiScaleVitCfg
from torch import Tensor, nn

import captum_daam.adapters.timm_mvitv2  # noqa: F401  (registers the adapter)
from captum_daam import DAAM, class_token_contributions
from captum_daam.adapters import adapter_for
from captum_daam.adapters.timm_mvitv2 import TimmMvitv2Adapter
from captum_daam.attr import AttentionRollout, GradientRollout
from helpers import assert_close_relative, make_images, make_model
from reference import (
    area_resample,
    explicit_gradients,
    maps_from_every_query_row,
    maps_from_explicit_blocks,
)

NUM_CLASSES = 11

# --------------------------------------------------------------------------- #
# Explicit reference
# --------------------------------------------------------------------------- #


def depthwise_convolution(patch_map: Tensor, conv: nn.Conv2d) -> Tensor:
    """A depthwise ``conv`` (no bias, no dilation) by hand: every output cell is the sum of its
    zero-padded input window, channel by channel, weighted by the kernel."""
    assert conv.groups == conv.in_channels == conv.out_channels and conv.bias is None
    assert conv.dilation == (1, 1) and conv.padding_mode == "zeros"
    (kernel_h, kernel_w), (stride_h, stride_w) = conv.kernel_size, conv.stride
    pad_h, pad_w = conv.padding
    padded = F.pad(patch_map, (pad_w, pad_w, pad_h, pad_h))
    rows = (padded.shape[-2] - kernel_h) // stride_h + 1
    columns = (padded.shape[-1] - kernel_w) // stride_w + 1
    output = 0
    for i in range(kernel_h):
        for j in range(kernel_w):
            window = padded[
                :, :, i : i + stride_h * (rows - 1) + 1 : stride_h,
                j : j + stride_w * (columns - 1) + 1 : stride_w
            ]
            output = output + window * conv.weight[:, 0, i, j][None, :, None, None]
    return output


def pooled(
    tokens: Tensor,
    grid: Tuple[int, int],
    pool: Optional[nn.Module],
    norm: Optional[nn.Module],
    prefix: int = 1,
) -> Tuple[Tensor, Tuple[int, int]]:
    """(B, H, prefix + h * w, d) tokens, the [class] token first (``prefix`` 1, or 0 without
    one) then row-major patches, pooled over the grid by ``pool`` (per head, channels = d; a
    convolution written out by hand) and normed: the [class] token passes unpooled."""
    if pool is not None:
        batch, heads, _, width = tokens.shape
        rows, columns = grid
        # Patch r * columns + c is row r, column c: lay them out as (B * H, d, rows, columns).
        index = torch.tensor([[r * columns + c for c in range(columns)] for r in range(rows)])
        patch_map = tokens[:, :, prefix:][:, :, index].permute(0, 1, 4, 2, 3)
        patch_map = patch_map.reshape(batch * heads, width, rows, columns)
        if isinstance(pool, nn.Conv2d):
            patch_map = depthwise_convolution(patch_map, pool)
        else:  # max or average pooling, parameter-free: the module itself
            patch_map = pool(patch_map)
        grid = tuple(patch_map.shape[-2:])
        patches = patch_map.reshape(batch, heads, width, grid[0] * grid[1]).transpose(-2, -1)
        tokens = torch.cat((tokens[:, :, :prefix], patches), dim=2)
    if norm is not None:
        tokens = norm(tokens)
    return tokens, grid


def relative_position_bias(
    attention: MultiScaleAttention, q: Tensor, query_grid, key_grid, prefix: int = 1
) -> Tensor:
    """The decomposed relative position bias (B, H, Nq - 1, Nk - 1) of patch query (i, j) over
    patch key (m, n): <q[(i, j)], R_h[d_h(i, m)]> + <q[(i, j)], R_w[d_w(j, n)]>, with
    d(i, m) = floor(i * max(k / q, 1) - m * max(q / k, 1) + (k - 1) * max(q / k, 1))."""
    batch, heads, _, width = q.shape
    per_axis = []
    for axis, table in enumerate((attention.rel_pos_h, attention.rel_pos_w)):
        queries, keys = query_grid[axis], key_grid[axis]
        query_step, key_step = max(keys / queries, 1.0), max(queries / keys, 1.0)
        distance = torch.tensor(
            [
                [int(i * query_step - m * key_step + (keys - 1) * key_step) for m in range(keys)]
                for i in range(queries)
            ]
        )
        per_axis.append(table[distance])  # (queries, keys, d)
    q_grid = q[:, :, prefix:].reshape(batch, heads, query_grid[0], query_grid[1], width)
    rows = torch.einsum("bhijc,imc->bhijm", q_grid, per_axis[0])  # by query row i, key row m
    columns = torch.einsum("bhijc,jnc->bhijn", q_grid, per_axis[1])  # by column j, key column n
    bias = rows[..., :, None] + columns[..., None, :]  # (B, H, qh, qw, kh, kw)
    return bias.reshape(batch, heads, query_grid[0] * query_grid[1], key_grid[0] * key_grid[1])


def explicit_attention(
    attention: MultiScaleAttention, z: Tensor, grid: Tuple[int, int]
) -> Dict[str, object]:
    batch, tokens, _ = z.shape
    heads = attention.num_heads
    qkv = z @ attention.qkv.weight.T
    if attention.qkv.bias is not None:
        qkv = qkv + attention.qkv.bias
    q, k, v = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    prefix = int(attention.has_cls_token)
    q, query_grid = pooled(q, grid, attention.pool_q, attention.norm_q, prefix)
    k, key_grid = pooled(k, grid, attention.pool_k, attention.norm_k, prefix)
    v, _ = pooled(v, grid, attention.pool_v, attention.norm_v, prefix)
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    plain = logits.softmax(dim=-1)
    if attention.rel_pos_type == "spatial":
        bias = relative_position_bias(attention, q, query_grid, key_grid, prefix)
        logits = logits + F.pad(bias, (prefix, 0, prefix, 0))  # none on [class] row, column
    probabilities = logits.softmax(dim=-1)
    output = probabilities @ v
    if attention.residual_pooling:
        output = output + q
    pre_projection = output.transpose(1, 2).reshape(batch, q.shape[2], -1)
    return {
        "attn": probabilities,
        "attn_plain": plain,
        "q": q,
        "v": v,
        "pre_projection": pre_projection,
        "out": attention.proj(pre_projection),
        "query_grid": query_grid,
        "key_grid": key_grid,
    }


def explicit_forward(model: MultiScaleVit, images: Tensor) -> Dict[str, object]:
    patch_map = model.patch_embed.proj(images)
    grid = tuple(patch_map.shape[-2:])
    x = patch_map.flatten(2).transpose(1, 2)
    if model.cls_token is not None:
        x = torch.cat((model.cls_token.expand(len(images), -1, -1), x), dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    records = []
    for stage in model.stages:
        for block in stage.blocks:
            x_norm = block.norm1(x)
            shortcut = x if block.shortcut_proj_attn is None else block.shortcut_proj_attn(x_norm)
            shortcut = block._shortcut_pool(shortcut, grid)
            record = explicit_attention(block.attn, x_norm, grid)
            x = shortcut + record["out"]
            x_norm = block.norm2(x)
            shortcut = x if block.shortcut_proj_mlp is None else block.shortcut_proj_mlp(x_norm)
            x = shortcut + block.mlp(x_norm)
            grid = record["query_grid"]
            records.append(record)
    return {"logits": model.forward_head(model.norm(x)), "blocks": records}


def explicit_daam(model, images, target=None, queries="class") -> Dict[str, object]:
    """Reference block maps on their own key / value grids, and the flow on the finest grid."""
    result, targets, gradients = explicit_gradients(explicit_forward, model, images, target)
    logits = result["logits"]
    reduce = maps_from_explicit_blocks if queries == "class" else maps_from_every_query_row
    grids = [record["key_grid"] for record in result["blocks"]]
    prefix = model.num_prefix_tokens
    block_maps = [
        reduce([record], [gradient], prefix, grid)["block_maps"][:, 0]
        for record, gradient, grid in zip(result["blocks"], gradients, grids)
    ]
    finest = max(grids, key=lambda grid: grid[0] * grid[1])
    resampled = torch.stack([area_resample(block, finest) for block in block_maps], dim=1)
    return {
        "logits": logits.detach(),
        "targets": targets,
        "block_maps": block_maps,
        "flow": resampled.cumsum(dim=1),
        "grids": grids,
        "finest": finest,
        "blocks": result["blocks"],
    }


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #


def prepare(model: nn.Module, sharpen: float = 10.0, seed: int = 0) -> nn.Module:
    """Larger q / k weights and seeded noise on the position tables (see the module doc)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "rel_pos" in name:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, MultiScaleAttention):
                width = module.qkv.out_features // 3
                module.qkv.weight[: 2 * width].mul_(sharpen)
    return model.eval()


def small_mvit(image_size=64, global_pool=None, **config) -> MultiScaleVit:
    """Three stages (heads 1, 2, 4; widths 16, 32, 64) of 1, 2, 2 blocks. At 64x64: a 16x16
    patch grid; the [class] query reads 4x4 | 8x8, 4x4 | 8x8, 4x4 key / value grids."""
    torch.manual_seed(0)
    config = dict(
        dict(
            depths=(1, 2, 2),
            embed_dim=16,
            num_heads=1,
            use_cls_token=True,
            stride_q=((1, 1), (2, 2), (2, 2)),
        ),
        **config,
    )
    model = MultiScaleVit(
        MultiScaleVitCfg(**config), img_size=image_size, num_classes=NUM_CLASSES,
        global_pool=global_pool,
    )
    return prepare(model)


def real_mvit(**kwargs) -> MultiScaleVit:
    return prepare(make_model("mvitv2_small_cls", num_classes=NUM_CLASSES, **kwargs), sharpen=3.0)


MODELS = {
    "conv_rel_pos_residual": (lambda: small_mvit(), (64, 64)),
    "no_residual_pooling_abs_pos_no_rel_pos": (
        lambda: small_mvit(residual_pooling=False, use_abs_pos=True, rel_pos_type=""),
        (64, 64),
    ),
    "max_pool_no_expand_attn": (lambda: small_mvit(mode="max", expand_attn=False), (64, 64)),
    "avg_pool_non_square": (lambda: small_mvit((64, 48), mode="avg", rel_pos_type=""), (64, 48)),
    # Built for 64x64, run at 48x32: the relative position tables cover the smaller grids.
    "rel_pos_smaller_non_square_image": (lambda: small_mvit(), (48, 32)),
    "mvitv2_small_cls": (real_mvit, (224, 224)),
}
BATCH = {"mvitv2_small_cls": 1}
SLOW = {"mvitv2_small_cls"}
TARGETS = [3, 10, 0]
EXPECTED_GRIDS = {
    "conv_rel_pos_residual": [(4, 4), (8, 8), (4, 4), (8, 8), (4, 4)],
    "rel_pos_smaller_non_square_image": [(3, 2), (6, 4), (3, 2), (6, 4), (3, 2)],
    "avg_pool_non_square": [(4, 3), (8, 6), (4, 3), (8, 6), (4, 3)],
    "mvitv2_small_cls": [(14, 14), (28, 28), (14, 14), (28, 28)] + [(14, 14)] * 11 + [(7, 7)],
}


CASES = [pytest.param(case, marks=pytest.mark.slow) if case in SLOW else case for case in MODELS]


@pytest.fixture(scope="module", params=CASES)
def model_case(request):
    build, image_size = MODELS[request.param]
    batch = BATCH.get(request.param, 3)
    model = build()
    images = make_images(batch, *image_size)
    return request.param, model, images, explicit_daam(model, images, TARGETS[:batch])


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


def test_explicit_reference_reproduces_the_models_logits(model_case):
    case, model, images, expected = model_case
    with torch.no_grad():
        own = model(images)
    assert_close_relative(expected["logits"], own, 1e-5)
    if case in EXPECTED_GRIDS:
        assert expected["grids"] == EXPECTED_GRIDS[case]
    layouts = adapter_for(model).block_layouts(
        adapter_for(model).attention_modules(), tuple(images.shape[-2:])
    )
    assert [layout.grid for layout in layouts] == expected["grids"]


def test_block_maps_on_their_own_grids_equal_the_reference(model_case):
    _, model, images, expected = model_case
    targets = TARGETS[: len(images)]
    maps = DAAM(model).attribute(images, target=targets, block_grids=True, accumulate=False)
    assert len(maps) == len(expected["block_maps"])
    for block, reference, grid in zip(maps, expected["block_maps"], expected["grids"]):
        assert block.shape == (len(images), 1, *grid)
        assert_close_relative(block[:, 0], reference)
    # Not a vacuous comparison of zeros: some block on every grid has a positive map.
    for grid in set(expected["grids"]):
        on_grid = [block for block in expected["block_maps"] if tuple(block.shape[1:]) == grid]
        assert max(float(block.amax()) for block in on_grid) > 0


def test_flow_on_the_finest_grid_equals_the_resampled_reference(model_case):
    _, model, images, expected = model_case
    daam = DAAM(model)
    targets = TARGETS[: len(images)]
    flow = daam.attribute(images, target=targets, return_flow=True)
    assert flow.shape == (len(images), len(expected["grids"]), *expected["finest"])
    assert tuple(daam.adapter.grid_size(tuple(images.shape[-2:]))) == expected["finest"]
    assert_close_relative(flow, expected["flow"])
    assert_close_relative(daam.attribute(images, target=targets), expected["flow"][:, -1:])
    total = sum(block.sum(dim=(1, 2)) for block in expected["block_maps"])
    assert_close_relative(expected["flow"][:, -1].sum(dim=(1, 2)), total, 1e-10)


def test_recorded_full_attention_equals_the_explicit_attention(model_case):
    """Every query row, relative position bias included, recorded from the model in float64
    (the reference's weights); the bias leaves the [class] row alone."""
    _, model, images, expected = model_case
    model = copy.deepcopy(model).double()
    adapter = adapter_for(model)
    with adapter.record(adapter.attention_modules(), full=True) as records, torch.no_grad():
        model(images.double())
    for record, block, attention in zip(records, expected["blocks"], adapter.attention_modules()):
        assert_close_relative(record.attention(), block["attn"], 1e-10)
        assert_close_relative(record.class_attention, block["attn"][:, :, 0], 1e-10)
        assert_close_relative(record.values, block["v"], 1e-10)
        plain = block["attn_plain"]
        assert_close_relative(block["attn"][:, :, 0], plain[:, :, 0], 1e-12)
        if attention.rel_pos_type == "spatial":  # the bias shows on the patch rows
            with pytest.raises(AssertionError, match="max abs error"):
                assert_close_relative(record.attention()[:, :, 1:], plain[:, :, 1:], 1e-2)


@pytest.mark.parametrize(
    "case", ["conv_rel_pos_residual", "max_pool_no_expand_attn", "avg_pool_non_square"]
)
def test_every_query_row_equals_the_reference_per_block(case):
    build, image_size = MODELS[case]
    model = build()
    images = make_images(2, *image_size, seed=1)
    expected = explicit_daam(model, images, [4, 5], queries="all")
    daam = DAAM(model)
    maps = daam.attribute(
        images, target=[4, 5], queries="all", block_grids=True, accumulate=False
    )
    for block, reference in zip(maps, expected["block_maps"]):
        assert_close_relative(block[:, 0], reference)
    flow = daam.attribute(images, target=[4, 5], queries="all", return_flow=True)
    assert_close_relative(flow, expected["flow"])
    class_rows = explicit_daam(model, images, [4, 5])["flow"]
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_relative(flow, class_rows, 1e-2)  # not the [class] rows under another name


def test_average_pooled_head_is_explained_by_every_query_row_by_default():
    model = small_mvit(global_pool="avg")
    images = make_images(2, 64, 64, seed=2)
    expected = explicit_daam(model, images, [1, 2], queries="all")
    assert_close_relative(DAAM(model).attribute(images, target=[1, 2], return_flow=True),
                          expected["flow"])
    assert float(expected["block_maps"][-1].amax()) > 0  # the last block reaches the output


def test_residual_pooled_query_is_in_the_output_but_not_in_the_token_contributions():
    model = MODELS["conv_rel_pos_residual"][0]()
    images = make_images(2, 64, 64)
    adapter = adapter_for(model)
    with adapter.record(adapter.attention_modules()) as records, torch.no_grad():
        model(images)
    blocks = explicit_daam(model, images, [1, 2])["blocks"]
    for record, block in zip(records, blocks):
        summed = class_token_contributions(record.class_attention, record.values).sum(dim=1)
        class_query = block["q"][:, :, 0].flatten(1)
        assert_close_relative(summed + class_query, block["pre_projection"][:, 0], 1e-5)
        assert_close_relative(record.residual, block["q"], 1e-5)  # the record names the term


def test_without_residual_pooling_the_record_names_no_residual():
    model = MODELS["no_residual_pooling_abs_pos_no_rel_pos"][0]()
    adapter = adapter_for(model)
    with adapter.record(adapter.attention_modules()) as records, torch.no_grad():
        model(make_images(1, 64, 64))
    assert all(record.residual is None for record in records)


def test_layer_restricts_the_flow_to_those_blocks_on_their_finest_grid():
    model = MODELS["conv_rel_pos_residual"][0]()
    images = make_images(2, 64, 64, seed=2)
    expected = explicit_daam(model, images, [1, 2])
    stages = model.stages
    chosen = DAAM(model, layer=[stages[2].blocks[1].attn, stages[0].blocks[0].attn])
    flow = chosen.attribute(images, target=[1, 2], return_flow=True)
    # Blocks 0 and 4 of the flow, both on 4x4 grids.
    stacked = torch.stack([expected["block_maps"][0], expected["block_maps"][4]], dim=1)
    assert flow.shape == (2, 2, 4, 4)
    assert_close_relative(flow, stacked.cumsum(dim=1))


def test_every_registered_model_gets_the_adapter():
    """Built on the meta device (no memory, no weights): the adapter only reads structure."""
    names = timm.list_models("mvitv2*")
    assert len(names) == 8
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name)
        adapter = adapter_for(model)
        assert isinstance(adapter, TimmMvitv2Adapter)
        assert adapter.has_class_token == name.endswith("_cls")
        layouts = adapter.block_layouts(adapter.attention_modules(), (224, 224))
        assert {layout.grid for layout in layouts} == {(28, 28), (14, 14), (7, 7)}
        assert adapter.grid_size((224, 224)) == (28, 28)


@pytest.mark.parametrize("target", [[4, 5, 1], None], ids=["targets", "predicted"])
@pytest.mark.parametrize("relative", ["spatial", ""], ids=["relative_bias", "no_bias"])
def test_without_class_token_every_row_equals_the_reference(relative, target):
    """mvitv2_tiny / small / base / large: no [class] token, the head averages; the relative
    position bias is in every row."""
    model = small_mvit(use_cls_token=False, rel_pos_type=relative, global_pool="avg")
    images = make_images(3, 64, 64)
    expected = explicit_daam(model, images, target, queries="all")
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images), 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        daam = DAAM(model)
        blocks = daam.attribute(images, target=target, block_grids=True, accumulate=False)
        flow = daam.attribute(images, target=target, return_flow=True)
    for block, reference_map in zip(blocks, expected["block_maps"]):
        assert_close_relative(block[:, 0], reference_map)
    assert_close_relative(flow, expected["flow"])
    assert float(expected["block_maps"][-1].amax()) > 0


def test_pool_first_attention_is_refused():
    model = small_mvit(pool_first=True)
    with pytest.raises(
        TypeError,
        match=r"Block 0 of MultiScaleVit.stages\[0\] uses MultiScaleAttentionPoolFirst \(built "
        r"with pool_first=True\)",
    ):
        DAAM(model)


def test_a_head_on_every_token_is_refused_with_a_true_message():
    model = small_mvit(global_pool="")
    assert model(make_images(1, 64, 64)).shape == (1, 17, NUM_CLASSES)  # (B, tokens, K)
    with pytest.raises(TypeError, match=r"global_pool=''.*\(B, tokens, K\)"):
        DAAM(model)


def test_an_image_larger_than_the_position_tables_is_refused_before_the_forward_pass():
    model = MODELS["conv_rel_pos_residual"][0]()
    ran = []
    handle = model.patch_embed.register_forward_pre_hook(lambda *args: ran.append(True))
    try:
        with pytest.raises(ValueError, match="cannot take 96x64 images: the relative position"):
            DAAM(model).attribute(make_images(1, 96, 64), target=0)
    finally:
        handle.remove()
    assert not ran
    with pytest.raises(IndexError):
        model(make_images(1, 96, 64))  # the model itself cannot


def test_a_model_built_for_a_size_its_own_tables_do_not_cover_is_refused_at_that_size():
    """timm sizes the tables from img_size // stride, the convolutions give ceil: at 112x112
    the last stage pools a 7x7 grid to 4x4, not 3x3, and timm's own forward fails."""
    model = make_model("mvitv2_small_cls", img_size=112)
    with pytest.raises(ValueError, match="cannot take 112x112 images.* block 15 hold 5 "):
        DAAM(model).attribute(make_images(1, 112, 112), target=0)
    with pytest.raises(IndexError):
        model(make_images(1, 112, 112))


def test_an_image_size_the_absolute_position_embedding_does_not_fit_is_refused():
    model = MODELS["no_residual_pooling_abs_pos_no_rel_pos"][0]()
    with pytest.raises(ValueError, match="holds 256 patch positions, but 48x64 images"):
        DAAM(model).attribute(make_images(1, 48, 64), target=0)
    with pytest.raises(RuntimeError):
        model(make_images(1, 48, 64))


@pytest.mark.parametrize("rollout", [AttentionRollout, GradientRollout])
def test_rollouts_refuse_the_changing_grids(rollout):
    model = MODELS["conv_rel_pos_residual"][0]()
    with pytest.raises(ValueError, match="different grids \\(4x4, 8x8\\)"):
        rollout(model).attribute(make_images(1, 64, 64), target=0)


@pytest.mark.parametrize("rollout", [AttentionRollout, GradientRollout])
def test_rollouts_refuse_a_model_that_pools_whichever_blocks_are_chosen(rollout):
    """Two blocks reading the same key grid from different numbers of queries: the rollout
    matrices would not be square, so the model is refused before any work."""
    model = MODELS["conv_rel_pos_residual"][0]()
    chosen = [model.stages[1].blocks[1].attn, model.stages[2].blocks[1].attn]
    layouts = adapter_for(model).block_layouts(chosen, (64, 64))
    assert len({layout.grid for layout in layouts}) == 1
    with pytest.raises(ValueError, match="different grids"):
        rollout(model, layer=chosen).attribute(make_images(1, 64, 64), target=0)


def test_gradient_checkpointing_gives_the_same_maps():
    model = MODELS["conv_rel_pos_residual"][0]()
    images = make_images(2, 64, 64)
    plain = DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    model.set_grad_checkpointing(True)
    checkpointed = DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    assert_close_relative(checkpointed, plain, 1e-6)
