"""timm VisionTransformerSAM (Segment Anything's encoder): DAAM over windowed and global
attention equals an explicit reference.

The reference runs the model in float64 with every block's attention written out: a windowed
block pads its grid with zeros to whole windows and cuts each window out by slicing; a global
block takes the whole grid. softmax(q k^T * scale + bias) is formed as an explicit
(B, H, N, N) matrix per window, the decomposed relative position bias built by hand from its
definition, bias[(i, j), (k, l)] = <q_(i, j), R_h[i - k + h - 1]> + <q_(i, j), R_w[j - l + w - 1]>,
or the rotary embedding applied by hand (tests/test_adapter_eva_rope.rotate_by_hand). The
gradient at every window's output before the projection comes from plain autograd; every row
is split over the tokens it reads, weighted by its own gradient, summed and relu'd, and put on
its patch, the padding dropped. No timm window or bias helper and no package code are used.
"""

import copy
import math
import warnings
from typing import Dict, List, Tuple

import pytest
import timm
import torch
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import Tensor, nn

from captum_daam import DAAM
from captum_daam.adapters import TimmSamAdapter, adapter_for
from helpers import (
    add_parameter_noise,
    assert_close_relative,
    make_images,
    module_hook_count,
    set_fused_attention,
)
from reference import resolve_targets
from test_adapter_eva_rope import rotate_by_hand
from test_adapter_swin import windowed_block_maps

NUM_CLASSES = 7
TARGETS = [3, 6, 0]


def relative_bias_by_hand(q: Tensor, size: Tuple[int, int], attention: nn.Module) -> Tensor:
    """(B, H, N, N) decomposed relative position bias of the query q (B, H, N, d)."""
    height, width = size
    rows = torch.arange(height).repeat_interleave(width)
    columns = torch.arange(width).repeat(height)
    along_h = attention.rel_pos_h[rows[:, None] - rows[None, :] + height - 1]  # (N, N, d)
    along_w = attention.rel_pos_w[columns[:, None] - columns[None, :] + width - 1]
    return torch.einsum("bhnd,nmd->bhnm", q, along_h) + torch.einsum("bhnd,nmd->bhnm", q, along_w)


def explicit_window(attention: nn.Module, tokens: Tensor, size: Tuple[int, int]) -> Dict:
    batch, count, channels = tokens.shape
    heads = attention.num_heads
    q, k, v = attention.qkv(tokens).reshape(batch, count, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attention.q_norm(q), attention.k_norm(k)
    bias = 0.0
    if attention.use_rel_pos:
        bias = relative_bias_by_hand(q, size, attention)
    elif attention.rope is not None:
        embedding = attention.rope.get_embed()
        q, k = rotate_by_hand(q, embedding, False), rotate_by_hand(k, embedding, False)
    probabilities = (q @ k.transpose(-2, -1) * attention.head_dim**-0.5 + bias).softmax(-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, count, channels)
    return dict(attn=probabilities, v=v, pre_projection=pre_projection,
                out=attention.proj(pre_projection))


def explicit_block_attention(block: nn.Module, x: Tensor) -> Tuple[Tensor, List[Dict]]:
    batch, height, width, channels = x.shape
    side = block.window_size or max(height, width)
    windows_h = (height, width) if not block.window_size else (side, side)
    padded_h = math.ceil(height / windows_h[0]) * windows_h[0]
    padded_w = math.ceil(width / windows_h[1]) * windows_h[1]
    padded = x.new_zeros(batch, padded_h, padded_w, channels)
    padded[:, :height, :width] = x
    output = torch.zeros_like(padded)
    windows = []
    for top in range(0, padded_h, windows_h[0]):
        for left in range(0, padded_w, windows_h[1]):
            piece = padded[:, top : top + windows_h[0], left : left + windows_h[1]]
            record = explicit_window(block.attn, piece.reshape(batch, -1, channels), windows_h)
            output[:, top : top + windows_h[0], left : left + windows_h[1]] = record[
                "out"].reshape(piece.shape)
            record["cells"] = [
                (r, c) if r < height and c < width else None
                for r in range(top, top + windows_h[0])
                for c in range(left, left + windows_h[1])
            ]
            windows.append(record)
    return output[:, :height, :width], windows


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, Tensor]:
    model = copy.deepcopy(model).double()
    with torch.enable_grad():
        x = model.patch_embed(images.double())
        if model.pos_embed is not None:
            x = x + model.pos_embed  # built for this image size: no resampling
        blocks = []
        for block in model.blocks:
            attended, windows = explicit_block_attention(block, block.norm1(x))
            x = x + block.ls1(attended)
            x = x + block.ls2(block.mlp(block.norm2(x)))
            blocks.append(dict(windows=windows, grid=tuple(x.shape[1:3])))
        logits = model.forward_head(model.neck(x.permute(0, 3, 1, 2)))
        targets = resolve_targets(target, logits)
        score = logits[torch.arange(len(logits)), targets].sum()
        outputs = [window["pre_projection"] for block in blocks for window in block["windows"]]
        gradients = iter(torch.autograd.grad(score, outputs))
    maps = torch.stack(windowed_block_maps(blocks, gradients), dim=1)
    return dict(logits=logits.detach(), block_maps=maps, flow=maps.cumsum(dim=1))


def small_sam(**kwargs) -> VisionTransformerSAM:
    """A 40x40 image in 8x8 patches: a 5x5 grid, windows of 3 (padded to 6x6), blocks 1 and 3
    global."""
    torch.manual_seed(0)
    model = timm.create_model(
        "samvit_base_patch16_224", pretrained=False, img_size=40, patch_size=8, embed_dim=32,
        depth=4, num_heads=2, window_size=3, global_attn_indexes=(1, 3),
        num_classes=NUM_CLASSES, **kwargs,
    )
    return add_parameter_noise(model)


MODELS = {
    "relative_position": lambda: small_sam(use_rel_pos=True),
    "rope": lambda: small_sam(use_rel_pos=False, use_rope=True),
    "qk_norm": lambda: small_sam(use_rel_pos=True, qk_norm=True),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
@pytest.mark.parametrize("case", sorted(MODELS))
def test_flow_and_block_maps_equal_explicit_reference(case, target, fused):
    model = set_fused_attention(MODELS[case](), fused)
    images = make_images(3, 40, 40)
    expected = explicit_daam(model, images, target)
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images).double(), 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow = DAAM(model).attribute(images, target=target, return_flow=True)
    assert flow.shape == (3, 4, 5, 5)
    assert_close_relative(flow, expected["flow"])
    maps = DAAM(model).attribute(images, target=target, return_flow=True, accumulate=False)
    assert_close_relative(maps, expected["block_maps"])
    assert float(expected["block_maps"].flatten(2).amax(2).min()) > 0  # every block, example
    assert module_hook_count(model) == 0


def test_every_registered_sam_model_is_taken_with_whole_windows():
    for name in timm.list_models("samvit_*"):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        adapter = adapter_for(model)
        assert isinstance(adapter, TimmSamAdapter) and not adapter.has_class_token, name
        size = tuple(model.patch_embed.img_size)
        for layout in adapter.block_layouts(adapter.attention_modules(), size):
            if layout.positions is not None:
                cells = layout.positions[layout.positions >= 0]
                assert sorted(cells.tolist()) == list(range(layout.grid[0] * layout.grid[1]))
