"""timm MaxViT, MaxxViT-V2 and CoAtNet (MaxxVit): DAAM over block, grid and whole-stage
attention equals an explicit reference.

The reference runs the model in float64 and writes every attention out: the stage grid is cut
into windows by hand (block attention: p x p squares; grid attention: the tokens a stage-size /
grid-size apart; CoAtNet: the whole grid), the module's qkv and proj weights applied to each
window's tokens, q, k and v split per head as the module's layout says, softmax(q k^T * scale
+ bias) an explicit matrix with the module's relative position bias, and each window's output
put back on its cells by hand. The convolution blocks, norms, MLPs and the head are the
model's own modules. Gradients at every window's output before the projection come from plain
autograd; every row is split over the tokens it reads, weighted by its own gradient, summed
and relu'd (test_adapter_swin.windowed_block_maps), each token put on its cell; the flow lies
on the finest grid.
"""

import copy
from typing import Dict, List, Tuple

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import maxxvit
from torch import Tensor, nn

from captum_daam.adapters import TimmMaxxVitAdapter, adapter_for
from helpers import (
    add_parameter_noise,
    assert_each_cell_in_one_window,
    assert_family_matches_reference,
    assert_refused_before_any_work,
    make_images,
    registered_layouts,
    set_fused_attention,
)
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 4, 0]

Cells = List[Tuple[int, int]]


def window_cells(grid: Tuple[int, int], size: Tuple[int, int], by_grid: bool) -> List[Cells]:
    """The cells of every window, windows row by row, tokens row by row in each: block
    attention's p x p squares, or grid attention's windows of tokens ``stride`` apart (the
    window at offset (a, b) holds cells (i * stride + a, j * stride + b))."""
    (height, width), (size_h, size_w) = grid, size
    if not by_grid:
        return [[(top + i, left + j) for i in range(size_h) for j in range(size_w)]
                for top in range(0, height, size_h) for left in range(0, width, size_w)]
    stride_h, stride_w = height // size_h, width // size_w
    return [[(i * stride_h + a, j * stride_w + b) for i in range(size_h) for j in range(size_w)]
            for a in range(stride_h) for b in range(stride_w)]


def linear(layer: nn.Module, tokens: Tensor) -> Tensor:
    """A Linear, or a 1x1 Conv2d applied to (B, N, C) tokens."""
    return F.linear(tokens, layer.weight.flatten(1), layer.bias)


def explicit_windows(attention: nn.Module, x: Tensor, windows: List[Cells]) -> Dict[str, object]:
    """Attention in each window of channels-last ``x`` (B, h, w, C) by hand: the output
    (B, h, w, C') and every window's record (attn, v, pre_projection, cells)."""
    batch, height, width, _ = x.shape
    heads, scale = attention.num_heads, attention.scale
    bias = 0.0 if attention.rel_pos is None else attention.rel_pos.get_bias()
    out = None
    records = []
    for cells in windows:
        rows = torch.tensor([r for r, _ in cells])
        columns = torch.tensor([c for _, c in cells])
        tokens = x[:, rows, columns]  # (B, N, C)
        qkv = linear(attention.qkv, tokens)
        if attention.head_first:  # per head: its q, k, v in a row
            q, k, v = qkv.unflatten(-1, (heads, 3, -1)).permute(3, 0, 2, 1, 4)
        else:  # all heads' q, then k, then v
            q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
        probabilities = (q @ k.transpose(-2, -1) * scale + bias).softmax(dim=-1)
        pre_projection = (probabilities @ v).transpose(1, 2).flatten(2)  # (B, N, H * d)
        projected = linear(attention.proj, pre_projection)
        if out is None:
            out = x.new_zeros(batch, height, width, projected.shape[-1])
        out[:, rows, columns] = projected
        records.append(dict(attn=probabilities, v=v, pre_projection=pre_projection,
                            cells=cells))
    return dict(out=out, windows=records, grid=(height, width))


def explicit_partition(part: nn.Module, attention: nn.Module, x: Tensor, by_grid: bool,
                       channels_first: bool) -> Dict[str, object]:
    """One partition attention of a MaxViT block on ``x`` (already normed), in its layout."""
    x = x.permute(0, 2, 3, 1) if channels_first else x
    grid = tuple(x.shape[1:3])
    record = explicit_windows(attention, x, window_cells(grid, part.partition_size, by_grid))
    if channels_first:
        record["out"] = record["out"].permute(0, 3, 1, 2)
    return record


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = model.stem(images.double())
        for stage in model.stages:
            for block in stage.blocks:
                if isinstance(block, (maxxvit.MbConvBlock, maxxvit.ConvNeXtBlock)):
                    x = block(x)
                elif isinstance(block, maxxvit.TransformerBlock2d):
                    normed = block.norm1(x).permute(0, 2, 3, 1)  # after any strided pooling
                    whole = window_cells(tuple(normed.shape[1:3]), normed.shape[1:3], False)
                    record = explicit_windows(block.attn, normed, whole)
                    blocks.append(record)
                    x = block.shortcut(x) + block.ls1(record["out"].permute(0, 3, 1, 2))
                    x = x + block.ls2(block.mlp(block.norm2(x)))
                elif isinstance(block, maxxvit.MaxxVitBlock):
                    x = block.conv(x)
                    first = block.nchw_attn
                    y = x if first else x.permute(0, 2, 3, 1)
                    for part, by_grid in ((block.attn_block, False), (block.attn_grid, True)):
                        if part is None:
                            continue
                        record = explicit_partition(part, part.attn, part.norm1(y), by_grid,
                                                    first)
                        blocks.append(record)
                        y = y + part.ls1(record["out"])
                        y = y + part.ls2(part.mlp(part.norm2(y)))
                    x = y if first else y.permute(0, 3, 1, 2)
                else:  # ParallelMaxxVitBlock: block and grid attention on one input
                    x = block.conv(x)
                    y, part = x.permute(0, 2, 3, 1), block.attn
                    normed = part.norm1(y)
                    records = [explicit_partition(part, attention, normed, by_grid, False)
                               for attention, by_grid in ((part.attn_block, False),
                                                          (part.attn_grid, True))]
                    blocks += records
                    y = y + part.ls1(torch.cat([record["out"] for record in records], dim=-1))
                    y = y + part.ls2(part.mlp(part.norm2(y)))
                    x = y.permute(0, 3, 1, 2)
        logits = model.forward_head(model.norm(x))
        return windowed_reference(blocks, logits, target)


def small_maxxvit(name: str, image_size: int, seed: int = 1, **overrides) -> nn.Module:
    """A small model of ``name``'s configuration with seeded noise on every parameter (the
    ``seed`` chosen so that no block map of the tests' images is zero everywhere)."""
    torch.manual_seed(0)
    model = timm.create_model(
        name, pretrained=False, num_classes=NUM_CLASSES, img_size=image_size,
        embed_dim=(16, 16, 32, 32), depths=(1, 2, 1, 1), stem_width=16,
        transformer_dim_head=8, **overrides,
    )
    return add_parameter_noise(model, seed=seed)


MODELS = {
    # name, image size, overrides: each covers a layout of qkv, a bias or a block type
    "maxvit_tf": ("maxvit_base_tf_224", 64, {}),  # AttentionCl, q k v apart, RelPosBiasTf
    "maxvit_rw": ("maxvit_nano_rw_256", 64, {}),  # AttentionCl, heads first, RelPosBias
    "maxvit_nchw": ("maxvit_nano_rw_256", 64, {"transformer_use_nchw_attn": True}),
    "maxvit_rmlp": ("maxvit_rmlp_base_rw_224", 64, {}),  # RelPosMlp
    "maxxvitv2_parallel": ("maxvit_tiny_pm_256", 64, {"seed": 2}),  # block and grid side by side
    "coatnet": ("coatnet_0_224", 64, {"seed": 3}),  # Attention2d over whole stages, strided pooling
    "coatnet_rmlp": ("coatnet_rmlp_0_rw_224", 64, {}),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
@pytest.mark.parametrize("key", list(MODELS))
def test_flow_and_block_maps_equal_explicit_reference(key, target, fused):
    name, size, overrides = MODELS[key]
    model = set_fused_attention(small_maxxvit(name, size, **overrides), fused)
    blocks = len(adapter_for(model).attention_modules())
    assert_family_matches_reference(model, make_images(3, size, size), target, explicit_daam,
                                    blocks)


def test_parallel_block_and_grid_attention_are_two_branches():
    name, size, overrides = MODELS["maxxvitv2_parallel"]
    adapter = adapter_for(small_maxxvit(name, size, **overrides))
    layouts = adapter.block_layouts(adapter.attention_modules(), (size, size))
    assert [layout.branch for layout in layouts] == [0, 1] * (len(layouts) // 2)


def test_images_the_windows_do_not_divide_are_refused_before_any_work():
    name, size, overrides = MODELS["maxvit_rw"]
    assert_refused_before_any_work(small_maxxvit(name, size, **overrides), make_images(1, 72, 72),
                                   r"2x2 windows and grids.*72x72 images.*multiples of 64x64")
    name, size, overrides = MODELS["coatnet"]
    assert_refused_before_any_work(
        small_maxxvit(name, size, **overrides), make_images(1, 96, 96),
        r"Stage 2 .*whole 4x4 grid.*96x96 images give a 6x6 grid.*64x64 images")


def test_every_registered_maxxvit_model_is_taken():
    patterns = ["maxvit*", "maxxvit*", "coatnet*", "coatnext*"]
    for name, layouts in registered_layouts(patterns, TimmMaxxVitAdapter):
        assert len(layouts) > 0, name
        for layout in layouts:
            if layout.positions is not None:
                assert_each_cell_in_one_window(layout, name)
