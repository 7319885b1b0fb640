"""timm Swin Transformer V1, V2 and V2-Cr: DAAM over windowed attention equals an explicit
reference.

The reference runs the model in float64 with every block's attention written out window by
window: the cyclic shift (torch.roll), the zero padding to whole windows, each window cut out
by slicing, the relative position index and the shift mask built by hand from their
definitions, softmax(q k^T * scale + bias) formed as an explicit (B, H, N, N) matrix per window
(V2: cosine attention, normalised q and k, the clamped per-head logit scale, the bias
16 * sigmoid(MLP(table)); V2-Cr: the same cosine attention, the bias its MLP gives for the log
relative coordinates of each pair). The gradient at every window's output before the projection is
taken with plain autograd; every row of a window is split over the tokens it reads,
F[i, n, (h, e)] = A[h, i, n] v[h, n, e], weighted by its own gradient, summed and relu'd, and
each token's value is put back on its patch by undoing the padding and the shift by hand. No
timm window helper and no package code are used; the stages' maps are brought to the finest
grid by reference.area_resample.
"""

import copy
import math
from typing import Dict, List, Tuple

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import swin_transformer_v2 as swin_v2
from timm.models import swin_transformer_v2_cr as swin_v2_cr
from torch import Tensor, nn

from captum_daam import DAAM, AttentionRollout
from captum_daam.adapters import TimmSwinAdapter, adapter_for
from helpers import (
    add_parameter_noise,
    assert_close_relative,
    assert_maps_on_block_grids_match,
    make_images,
    set_fused_attention,
)
from reference import flow_on_the_finest_grid, resolve_targets

NUM_CLASSES = 7
TARGETS = [3, 6, 0]


# --------------------------------------------------------------------------- #
# Explicit reference
# --------------------------------------------------------------------------- #


def relative_index_by_hand(window: Tuple[int, int]) -> Tensor:
    """(N, N): index of the relative offset (dy + wh - 1) * (2 ww - 1) + (dx + ww - 1)."""
    wh, ww = window
    rows = torch.arange(wh).repeat_interleave(ww)
    columns = torch.arange(ww).repeat(wh)
    dy = rows[:, None] - rows[None, :] + wh - 1
    dx = columns[:, None] - columns[None, :] + ww - 1
    return dy * (2 * ww - 1) + dx


def region_labels_by_hand(padded: Tuple[int, int], window, shift) -> Tensor:
    """(Hp, Wp): Swin's regions of the shifted, padded grid, which a window's tokens may only
    attend within: along each axis [0, P - w), [P - w, P - s), [P - s, P)."""
    labels = []
    for size, w, s in zip(padded, window, shift):
        axis = torch.zeros(size, dtype=torch.long)
        axis[size - w : size - s] = 1
        axis[size - s :] = 2
        labels.append(axis)
    return labels[0][:, None] * 3 + labels[1][None, :]


def explicit_window_attention(attention: nn.Module, tokens: Tensor, bias_mask: Tensor):
    """One window (B, N, C) by hand; ``bias_mask`` (N, N) is 0 or -100 (the shift mask)."""
    batch, count, channels = tokens.shape
    heads = attention.num_heads
    window = tuple(attention.window_size)
    if isinstance(attention, swin_v2.WindowAttention):
        bias = None
        if attention.q_bias is not None:
            bias = torch.cat((attention.q_bias, attention.k_bias, attention.v_bias))
        qkv = F.linear(tokens, attention.qkv.weight, bias)
    else:
        qkv = attention.qkv(tokens)
    q, k, v = qkv.reshape(batch, count, 3, heads, -1).permute(2, 0, 3, 1, 4)
    index = relative_index_by_hand(window)
    if isinstance(attention, (swin_v2.WindowAttention, swin_v2_cr.WindowMultiHeadAttention)):
        scale = attention.logit_scale.reshape(heads, 1, 1)
        scale = torch.clamp(scale, max=math.log(100.0)).exp()  # (H, 1, 1)
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * scale
        if isinstance(attention, swin_v2.WindowAttention):
            table = attention.cpb_mlp(attention.relative_coords_table).reshape(-1, heads)
            relative = 16 * torch.sigmoid(table[index].permute(2, 0, 1))
        else:  # one bias per (query, key) pair, from the log of their relative coordinates
            pairs = attention.meta_mlp(attention.relative_coordinates_log)  # (N * N, H)
            relative = pairs.transpose(0, 1).reshape(heads, count, count)
    else:
        logits = q @ k.transpose(-2, -1) * attention.scale
        relative = attention.relative_position_bias_table[index].permute(2, 0, 1)
    probabilities = (logits + relative + bias_mask).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, count, -1)
    return dict(attn=probabilities, v=v, pre_projection=pre_projection,
                out=attention.proj(pre_projection))


def explicit_swin_attention(block: nn.Module, x: Tensor) -> Tuple[Tensor, List[Dict]]:
    """A block's windowed attention on (B, H, W, C) by hand. Returns the output (B, H, W, C)
    and, per window, its record with ``cells``: the (row, column) of each of its tokens on the
    block's grid, or None for padding."""
    batch, height, width, channels = x.shape
    (wh, ww), (sh, sw) = tuple(block.window_size), tuple(block.shift_size)
    shifted = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2)) if sh or sw else x
    padded_h, padded_w = math.ceil(height / wh) * wh, math.ceil(width / ww) * ww
    padded = x.new_zeros(batch, padded_h, padded_w, channels)
    padded[:, :height, :width] = shifted
    labels = region_labels_by_hand((padded_h, padded_w), (wh, ww), (sh, sw))
    output = torch.zeros_like(padded)
    windows = []
    for top in range(0, padded_h, wh):
        for left in range(0, padded_w, ww):
            tokens = padded[:, top : top + wh, left : left + ww].reshape(batch, wh * ww, channels)
            mask = torch.zeros(wh * ww, wh * ww, dtype=x.dtype)
            if sh or sw:
                region = labels[top : top + wh, left : left + ww].reshape(-1)
                mask = mask.masked_fill(region[:, None] != region[None, :], -100.0)
            record = explicit_window_attention(block.attn, tokens, mask)
            output[:, top : top + wh, left : left + ww] = record["out"].reshape(
                batch, wh, ww, channels
            )
            record["cells"] = [
                ((r + sh) % height, (c + sw) % width) if r < height and c < width else None
                for r in range(top, top + wh)
                for c in range(left, left + ww)
            ]
            windows.append(record)
    output = output[:, :height, :width]
    output = torch.roll(output, shifts=(sh, sw), dims=(1, 2)) if sh or sw else output
    return output, windows


def explicit_forward(model: nn.Module, images: Tensor) -> Dict[str, object]:
    cr = isinstance(model, swin_v2_cr.SwinTransformerV2Cr)
    x = model.patch_embed(images)  # (B, H, W, C); V2-Cr: (B, C, H, W)
    if cr:
        x = x.permute(0, 2, 3, 1)
    post_norm = (swin_v2.SwinTransformerV2Block, swin_v2_cr.SwinTransformerV2CrBlock)
    blocks = []
    for stage in model.stages if cr else model.layers:
        x = stage.downsample(x)
        for block in stage.blocks:
            batch, height, width, channels = x.shape
            if isinstance(block, post_norm):
                attended, windows = explicit_swin_attention(block, x)
                x = x + block.norm1(attended)
                x = x + block.norm2(block.mlp(x))
                if cr:
                    x = block.norm3(x)
            else:
                attended, windows = explicit_swin_attention(block, block.norm1(x))
                x = x + attended
                x = x + block.mlp(block.norm2(x))
            blocks.append(dict(windows=windows, grid=(height, width)))
    if cr:
        return {"logits": model.forward_head(x.permute(0, 3, 1, 2)), "blocks": blocks}
    return {"logits": model.forward_head(model.norm(x)), "blocks": blocks}


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, Tensor]:
    model = copy.deepcopy(model).double()
    with torch.enable_grad():
        result = explicit_forward(model, images.double())
        return windowed_reference(result["blocks"], result["logits"], target)


def windowed_block_maps(blocks: List[Dict], gradients) -> List[Tensor]:
    """Each block's map (B, h, w) from its windows: ``blocks`` holds per block its ``grid``
    and ``windows`` (each with ``attn`` (B, H, Q, N), ``v`` (B, H, N, d) and the ``cells`` of
    its N tokens, None for padding); ``gradients`` yields, window after window, the gradient
    (B, Q, C) at its Q query rows' output before the projection. Every row is split over the
    tokens it reads, F[b, i, n, (h, e)] = A[b, h, i, n] v[b, h, n, e], weighted by the gradient
    at its own row, summed over rows and channels and relu'd; each token's value goes to its
    cell."""
    block_maps = []
    for block in blocks:
        height, width = block["grid"]
        cam = None
        covered = torch.zeros(height, width, dtype=torch.long)
        for window in block["windows"]:
            gradient = next(gradients).detach()  # (B, Q, C), every row's own
            attention, values = window["attn"].detach(), window["v"].detach()
            batch, heads, _, width_per_head = values.shape
            contributions = attention.unsqueeze(-1) * values.unsqueeze(2)  # (B, H, Q, N, d)
            weights = gradient.clamp(min=0).reshape(batch, -1, heads, width_per_head)  # Q rows
            weights = weights.permute(0, 2, 1, 3).unsqueeze(3)  # (B, H, Q, 1, d)
            per_token = (contributions * weights).sum(dim=(1, 2, 4)).clamp(min=0)  # (B, N)
            if cam is None:
                cam = torch.zeros(batch, height, width, dtype=per_token.dtype)
            for token, cell in enumerate(window["cells"]):
                if cell is not None:
                    cam[:, cell[0], cell[1]] += per_token[:, token]
                    covered[cell] += 1
        assert bool((covered == 1).all())  # each patch in exactly one window of the block
        block_maps.append(cam)
    return block_maps


def windowed_reference(blocks: List[Dict], logits: Tensor, target) -> Dict[str, object]:
    """The reference's result from its windowed ``blocks`` (as windowed_block_maps takes them)
    and the ``logits`` they led to, under enabled gradients: autograd's gradient of the target
    scores at every window's output before the projection, the block maps (a list of
    (B, h, w)) and the flow on the finest grid."""
    targets = resolve_targets(target, logits)
    score = logits[torch.arange(len(logits)), targets].sum()
    outputs = [window["pre_projection"] for block in blocks for window in block["windows"]]
    block_maps = windowed_block_maps(blocks, iter(torch.autograd.grad(score, outputs)))
    return dict(logits=logits.detach(), block_maps=block_maps,
                flow=flow_on_the_finest_grid(block_maps))


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #


def prepare(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded noise on every parameter (timm starts biases, tables and V2's post-norms at
    constants), so that every window, bias and mask matters."""
    return add_parameter_noise(model, seed=seed)


SMALL = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=NUM_CLASSES)

MODELS = {
    # 48x48 images, patch 4: a 12x12 grid then 6x6, windows of 4 (3x3 windows, shifted by 2).
    "v1": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=48, window_size=4, **SMALL
    ),
    # 10x10 then 5x5: windows of 4 padded to 12x12 and 8x8, shifted; a non-square image.
    "v1_padded_non_square": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=(40, 48), window_size=4, **SMALL
    ),
    "v2": lambda: timm.create_model(
        "swinv2_tiny_window8_256", img_size=48, window_size=4, **SMALL
    ),
    # Any image size (strict_img_size=False: masks made at the call), padded windows.
    "v2_dynamic": lambda: timm.create_model(
        "swinv2_tiny_window8_256", img_size=48, window_size=4, strict_img_size=False, **SMALL
    ),
    "v2_cr": lambda: timm.create_model("swinv2_cr_tiny_224", img_size=48, window_size=4, **SMALL),
}
IMAGE_SIZES = {"v1_padded_non_square": (40, 48), "v2_dynamic": (40, 56)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_case(request):
    torch.manual_seed(0)
    return request.param, prepare(MODELS[request.param]())


def case_images(case: str) -> Tensor:
    return make_images(3, *IMAGE_SIZES.get(case, (48, 48)))


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


def test_explicit_reference_reproduces_the_models_logits(model_case):
    case, model = model_case
    images = case_images(case)
    expected = explicit_daam(model, images, TARGETS)
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images).double(), 1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(model_case, target, fused):
    case, model = model_case
    set_fused_attention(model, fused)
    images = case_images(case)
    expected = explicit_daam(model, images, target)
    assert len(expected["block_maps"]) == 4
    assert_maps_on_block_grids_match(model, images, target, expected)


def test_the_shift_and_the_mask_matter():
    """Maps laid on the grid without undoing the shift would differ: the reference is not
    blind to it (a check of the test's own sensitivity)."""
    model = prepare(MODELS["v1"]())
    images = case_images("v1")
    expected = explicit_daam(model, images, TARGETS)["block_maps"][1]  # a shifted block
    unshifted = torch.roll(expected, shifts=(-2, -2), dims=(1, 2))
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_relative(unshifted, expected, 1e-2)
    assert tuple(model.layers[0].blocks[1].shift_size) == (2, 2)


def test_adapter_is_picked_and_says_what_it_reads():
    model = MODELS["v1"]()
    adapter = adapter_for(model)
    assert isinstance(adapter, TimmSwinAdapter)
    assert not adapter.has_class_token and adapter.num_prefix_tokens == 0
    assert adapter.grid_size((48, 48)) == (12, 12)
    layouts = adapter.block_layouts(adapter.attention_modules(), (48, 48))
    assert [tuple(layout.positions.shape) for layout in layouts] == [(9, 16)] * 2 + [(4, 16)] * 2


def test_a_wrong_image_size_is_refused_before_any_work():
    model = MODELS["v1"]()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match="takes 48x48 images .*got 64x64"):
        DAAM(model).attribute(make_images(1, 64, 64), target=0)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        DAAM(prepare(MODELS["v2_dynamic"]())).attribute(make_images(1, 42, 48), target=0)
    with pytest.raises(ValueError, match="Expected a model with a \\[class\\] token"):
        DAAM(model).attribute(make_images(1, 48, 48), target=0, queries="class")
    assert calls == []


def test_rollouts_are_refused_for_windowed_attention():
    with pytest.raises(TypeError, match="has no \\[class\\] token"):
        AttentionRollout(MODELS["v1"]())


def test_every_registered_swin_model_is_taken_by_the_swin_adapter():
    names = timm.list_models("swin_*") + timm.list_models("swinv2_*")
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        adapter = adapter_for(model)
        assert isinstance(adapter, TimmSwinAdapter), name
        size = tuple(model.patch_embed.img_size)
        layouts = adapter.block_layouts(adapter.attention_modules(), size)
        for layout in layouts:  # every patch of the stage lies in exactly one window
            cells = layout.positions[layout.positions >= 0]
            assert sorted(cells.tolist()) == list(range(layout.grid[0] * layout.grid[1])), name
    assert len(names) >= 37
