"""timm EfficientFormerV2: DAAM over talking-heads attention with a local value convolution
equals an explicit reference.

The reference runs the model in float64 with every attention module written out: q, k and v
from the module's 1x1 ConvNorms (stage 3's after its strided depthwise convolution), the
logits q^T k * scale plus the bias looked up by hand for each offset (|dr|, |dc|) between a
query cell (every second cell for the downsampling attention's strided queries) and a key
cell, the heads mixed before and after the softmax by explicit sums over the talking-heads
weights; v_local's depthwise convolution is written as a matrix K[c, i, n] by hand (kernel
tap by kernel tap, times its BatchNorm's scale from the running statistics), so each value
channel c is mixed by A[c, i, n] = M[h(c), i, n] + K[c, i, n]; the output is A v plus the
convolution bias and BatchNorm shift, then the module's upsampling, activation and
projection. Gradients at that output (tokens first) come from plain autograd; every row is
split over the tokens its values sit on, weighted by its own gradient, summed and relu'd
(test_adapter_swin.windowed_block_maps).
"""

import copy
from typing import Dict, List, Tuple

import pytest
import torch
from timm.models.efficientformer_v2 import Attention2d, Attention2dDownsample, EfficientFormerV2
from torch import Tensor, nn

from captum_daam.adapters import TimmEfficientFormerV2Adapter
from captum_daam.adapters.timm_efficientformer_v2 import HeadsAndChannelsMixing
from helpers import (
    add_parameter_noise,
    assert_family_matches_reference,
    assert_refused_before_any_work,
    make_images,
    registered_layouts,
)
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 4, 0]
IMAGE_SIZE = (96, 128)  # stage 3: a 6x8 grid (3x4 after the strided convolution); stage 4: 3x4


def cells(grid: Tuple[int, int], step: int = 1) -> List[Tuple[int, int]]:
    return [(r, c) for r in range(0, grid[0], step) for c in range(0, grid[1], step)]


def bias_by_hand(attention: nn.Module, query_step: int) -> Tensor:
    """(H, Nq, N): each head's learned bias for the offset between a query cell (every
    ``query_step``-th cell of the key grid) and a key cell, entry |dr| * columns + |dc|."""
    grid = tuple(attention.resolution)
    index = torch.tensor([[abs(r1 - r2) * grid[1] + abs(c1 - c2) for r2, c2 in cells(grid)]
                          for r1, c1 in cells(grid, query_step)])
    return attention.attention_biases[:, index]


def local_mixing_by_hand(conv_norm: nn.Module, key_grid, query_grid) -> Tuple[Tensor, Tensor]:
    """v_local as a per-channel matrix K (C, Nq, N) and the constant (C,) it adds."""
    conv, norm = conv_norm.conv, conv_norm.bn
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    constant = norm.bias - norm.running_mean * scale + scale * conv.bias
    (kernel_h, kernel_w), (stride, _), (pad, _) = conv.kernel_size, conv.stride, conv.padding
    channels = conv.weight.shape[0]
    kernel = torch.zeros(channels, query_grid[0] * query_grid[1], key_grid[0] * key_grid[1],
                         dtype=conv.weight.dtype)
    for query, (row, column) in enumerate(cells(query_grid)):
        for dy in range(kernel_h):
            for dx in range(kernel_w):
                key_row, key_column = row * stride + dy - pad, column * stride + dx - pad
                if 0 <= key_row < key_grid[0] and 0 <= key_column < key_grid[1]:
                    key = key_row * key_grid[1] + key_column
                    kernel[:, query, key] += conv.weight[:, 0, dy, dx] * scale
    return kernel, constant


def heads_mixed(talking: nn.Conv2d, scores: Tensor) -> Tensor:
    """A 1x1 convolution over the heads of (B, H, Nq, N) scores, as an explicit sum."""
    weight = talking.weight[:, :, 0, 0]
    return torch.einsum("gh,bhin->bgin", weight, scores) + talking.bias.view(1, -1, 1, 1)


def explicit_attention(attention: nn.Module, x: Tensor) -> Dict[str, object]:
    downsampling = isinstance(attention, Attention2dDownsample)
    if not downsampling and attention.stride_conv is not None:
        x = attention.stride_conv(x)
    key_grid = tuple(x.shape[-2:])
    heads = attention.num_heads
    queries = attention.q(x)
    query_grid = tuple(queries.shape[-2:])
    queries = queries.flatten(2).unflatten(1, (heads, -1)).transpose(-2, -1)  # (B, H, Nq, kd)
    keys = attention.k(x).flatten(2).unflatten(1, (heads, -1))  # (B, H, kd, N)
    values = attention.v(x).flatten(2)  # (B, C, N)
    scores = queries @ keys * attention.scale + bias_by_hand(attention, 2 if downsampling else 1)
    if downsampling:
        mixing = scores.softmax(dim=-1)
    else:
        mixing = heads_mixed(attention.talking_head2,
                             heads_mixed(attention.talking_head1, scores).softmax(dim=-1))
    kernel, constant = local_mixing_by_hand(attention.v_local, key_grid, query_grid)
    channels = values.shape[1]
    full = mixing.repeat_interleave(channels // heads, dim=1) + kernel  # (B, C, Nq, N)
    output = (full @ values.unsqueeze(-1))[..., 0] + constant.view(1, -1, 1)  # (B, C, Nq)
    pre_projection = output.transpose(1, 2)  # (B, Nq, C): where the gradient is taken
    mixed = pre_projection.transpose(1, 2).reshape(x.shape[0], channels, *query_grid)
    if not downsampling and attention.upsample is not None:
        mixed = attention.upsample(mixed)
    window = dict(attn=full, v=values.unsqueeze(-1), cells=cells(key_grid),
                  pre_projection=pre_projection)
    return dict(out=attention.proj(attention.act(mixed)), windows=[window], grid=key_grid)


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = model.stem(images.double())
        for stage in model.stages:
            if not isinstance(stage.downsample, nn.Identity):
                out = stage.downsample.conv(x)
                if stage.downsample.attn is not None:
                    record = explicit_attention(stage.downsample.attn, x)
                    blocks.append(record)
                    out = out + record["out"]
                x = out
            for block in stage.blocks:
                if block.token_mixer is not None:
                    record = explicit_attention(block.token_mixer, x)
                    blocks.append(record)
                    x = x + block.ls1(record["out"])
                x = x + block.ls2(block.mlp(x))
        return windowed_reference(blocks, model.forward_head(model.norm(x)), target)


def small_efficientformer_v2(seed: int = 1) -> nn.Module:
    """Narrow stages, attention in every block of stages 3 and 4 (num_vit=2): stage 3's
    strided Attention2d twice, the downsampling Attention2dDownsample, stage 4's Attention2d
    twice."""
    torch.manual_seed(0)
    model = EfficientFormerV2(depths=(1, 1, 2, 2), embed_dims=(8, 16, 24, 32), num_vit=2,
                              img_size=IMAGE_SIZE, num_classes=NUM_CLASSES).eval()
    model = add_parameter_noise(model, seed=seed)
    for module in model.modules():  # running statistics other than (0, 1), so they matter
        if isinstance(module, nn.BatchNorm2d):
            generator = torch.Generator().manual_seed(module.num_features)
            module.running_mean.normal_(0, 0.1, generator=generator)
            module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model


@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(target):
    model = small_efficientformer_v2()
    kinds = [type(module) for module in TimmEfficientFormerV2Adapter(model).attention_modules()]
    assert kinds == [Attention2d] * 2 + [Attention2dDownsample] + [Attention2d] * 2
    assert_family_matches_reference(model, make_images(3, *IMAGE_SIZE), target, explicit_daam, 5)


def test_the_mixing_transposed_equals_its_matrix_transposed():
    generator = torch.Generator().manual_seed(0)
    heads = torch.randn(2, 2, 6, 20, generator=generator, dtype=torch.float64)  # 3x2 queries
    kernel = torch.randn(4, 1, 3, 3, generator=generator, dtype=torch.float64)
    mixing = HeadsAndChannelsMixing(heads, kernel, (2, 2), (1, 1), (4, 5), (2, 3))
    matrix = mixing()
    assert matrix.shape == (2, 4, 6, 20)
    weights = torch.randn(2, 4, 6, 1, generator=generator, dtype=torch.float64)
    expected = matrix.transpose(-2, -1) @ weights
    assert torch.allclose(mixing.transposed_mix(weights), expected, atol=1e-12)
    rows = [5, 0]
    assert torch.allclose(mixing.query_rows(rows).transposed_mix(weights[:, :, rows]),
                          matrix[:, :, rows].transpose(-2, -1) @ weights[:, :, rows], atol=1e-12)
    assert torch.equal(mixing.query_rows(rows)(), matrix[:, :, rows])


def test_other_image_sizes_are_refused_before_any_work():
    model = small_efficientformer_v2()
    assert_refused_before_any_work(model, make_images(1, 96, 96), "attention biases cover")


def test_every_registered_efficientformer_v2_model_is_taken():
    for name, layouts in registered_layouts("efficientformerv2*", TimmEfficientFormerV2Adapter):
        assert [layout.grid for layout in layouts][-1] == (7, 7), name
        assert all(layout.positions is None for layout in layouts), name

