"""torchvision MaxViT: DAAM over block and grid attention equals an explicit reference.

The reference runs the model in float64 with every attention written out: the stage grid cut
into windows by hand (test_adapter_maxxvit.window_cells: p x p squares for the window
attention, tokens a stage-size / partition-size apart for the grid attention), the module's
``to_qkv`` and ``merge`` weights applied to each window's tokens, q, k and v split as
(all queries, keys, values) x heads, softmax(q k^T * feat_dim ** -0.5 + bias) an explicit matrix
with the relative position bias looked up by hand from the module's table, and each window's
output put back on its cells. The LayerNorms and MLPs act token by token, so they run on the
whole grid; the stem, MBConv blocks and classifier are the model's own modules. Gradients at
every window's output before ``merge`` come from plain autograd; every row is split over the
tokens it reads, weighted by its own gradient, summed and relu'd, each token put on its cell.
"""

import copy
from typing import Dict, List

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import maxvit as tv_maxvit

from captum_daam.adapters import TorchvisionMaxVitAdapter, adapter_for
from helpers import (
    add_parameter_noise,
    assert_each_cell_in_one_window,
    assert_family_matches_reference,
    assert_refused_before_any_work,
    make_images,
)
from test_adapter_maxxvit import window_cells
from test_adapter_swin import windowed_reference

NUM_CLASSES = 5
TARGETS = [3, 4, 0]


def bias_by_hand(attention: nn.Module) -> Tensor:
    """(1, H, P, P) the relative position bias: for tokens (i1, j1) and (i2, j2) of a side x
    side window, the table's row (i1 - i2 + side - 1) * (2 side - 1) + (j1 - j2 + side - 1)."""
    side = attention.size
    cells = [(i, j) for i in range(side) for j in range(side)]
    index = torch.tensor([[(a[0] - b[0] + side - 1) * (2 * side - 1) + (a[1] - b[1] + side - 1)
                           for b in cells] for a in cells])
    return attention.relative_position_bias_table[index].permute(2, 0, 1).unsqueeze(0)


def explicit_partition(part: nn.Module, x: Tensor, grid) -> Dict[str, object]:
    """One PartitionAttentionLayer on NCHW ``x``: attention window by window, then the MLP."""
    norm, attention = part.attn_layer[0], part.attn_layer[1]
    heads = attention.n_heads
    scale = (heads * attention.head_dim) ** -0.5  # feat_dim ** -0.5, not the head width's
    y = x.permute(0, 2, 3, 1)
    normed = norm(y)
    attended = torch.zeros_like(y)
    windows = []
    for cells in window_cells(grid, (attention.size, attention.size),
                              part.partition_type == "grid"):
        rows, columns = torch.tensor([r for r, _ in cells]), torch.tensor([c for _, c in cells])
        tokens = normed[:, rows, columns]  # (B, N, C)
        q, k, v = attention.to_qkv(tokens).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
        probabilities = (q @ k.transpose(-2, -1) * scale + bias_by_hand(attention)).softmax(-1)
        pre_projection = (probabilities @ v).transpose(1, 2).flatten(2)
        attended[:, rows, columns] = attention.merge(pre_projection)
        windows.append(dict(attn=probabilities, v=v, pre_projection=pre_projection,
                            cells=cells))
    y = y + attended
    y = y + part.mlp_layer(y)
    return dict(out=y.permute(0, 3, 1, 2), windows=windows, grid=grid)


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = model.stem(images.double())
        for stage in model.blocks:
            for layer in stage.layers:
                x = layer.layers.MBconv(x)
                grid = tuple(x.shape[-2:])
                for part in (layer.layers.window_attention, layer.layers.grid_attention):
                    record = explicit_partition(part, x, grid)
                    blocks.append(record)
                    x = record["out"]
        logits = model.classifier(x)
        return windowed_reference(blocks, logits, target)


def small_maxvit(seed: int = 21) -> nn.Module:
    """A two-stage MaxVit with seeded noise on every parameter (the seed chosen so that no
    block map of the tests' images is zero everywhere: small random MaxViTs often predict one
    class for every image, and a block's map for it may be negative everywhere)."""
    torch.manual_seed(0)
    model = tv_maxvit.MaxVit(
        input_size=(64, 64), stem_channels=16, partition_size=2, block_channels=[16, 32],
        block_layers=[1, 2], head_dim=8, stochastic_depth_prob=0.0, num_classes=NUM_CLASSES,
    )
    return add_parameter_noise(model, seed=seed)


@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(target):
    # stage grids 16x16 and 8x8, windows and grids of 2x2
    assert_family_matches_reference(small_maxvit(), make_images(3, 64, 64), target,
                                    explicit_daam, 6)


def test_another_image_size_than_built_for_is_refused_before_any_work():
    assert_refused_before_any_work(
        small_maxvit(), make_images(1, 96, 96),
        r"built for images whose stage grids are \[\(16, 16\), \(8, 8\)\].*got 96x96 images")


def test_maxvit_t_is_taken_with_every_cell_in_one_window():
    with torch.device("meta"):
        model = torchvision.models.maxvit_t(weights=None)
    adapter = adapter_for(model)
    assert isinstance(adapter, TorchvisionMaxVitAdapter) and not adapter.has_class_token
    layouts = adapter.block_layouts(adapter.attention_modules(), (224, 224))
    assert len(layouts) == 2 * 11  # two attentions in each of 2 + 2 + 5 + 2 layers
    assert [layout.grid for layout in layouts[::2]] == [(56, 56)] * 2 + [(28, 28)] * 2 + [
        (14, 14)] * 5 + [(7, 7)] * 2
    for layout in layouts:
        assert_each_cell_in_one_window(layout)
