"""timm NextViT: DAAM over efficient multi-head self-attention with keys and values averaged
over runs of tokens equals an explicit reference.

The reference runs the model in float64 with each transformer block's attention written out:
the block's map flattened row by row, q from the module's ``q``; where the block reduces its
keys (``sr_ratio`` > 1), the tokens cut into runs of ``sr_ratio ** 2`` consecutive tokens by
hand (the tokens after the last whole run dropped, as the pooling drops them) and each run
averaged, then the module's BatchNorm, ``k`` and ``v``; softmax(q k^T * scale) an explicit
matrix. Gradients at the attention output before ``proj`` come from plain autograd; every row
is split over the (reduced) tokens it reads, weighted by its own gradient, summed over rows
and channels and relu'd, and each reduced token's value shared equally by the cells of its
run (a run may wrap from one row of the grid to the next).
"""

import copy
from typing import Dict, List

import pytest
import torch
from timm.models.nextvit import NextTransformerBlock, NextViT
from torch import Tensor, nn

from captum_daam.adapters import TimmNextVitAdapter
from helpers import (
    add_parameter_noise,
    assert_family_matches_reference,
    make_images,
    registered_layouts,
)
from reference import flow_on_the_finest_grid, resolve_targets

NUM_CLASSES = 5
TARGETS = [3, 4, 0]
# 80x112 images: stage grids 20x28, 10x14 (runs of 16: 8 keys, 12 tokens left over), 5x7
# (runs of 4 wrapping rows: 8 keys, 3 left over) and 3x4 (every token a key).
IMAGE_SIZE = (80, 112)


def explicit_attention(attention: nn.Module, tokens: Tensor) -> Dict[str, object]:
    batch, count, channels = tokens.shape
    heads = attention.num_heads

    def by_heads(part: Tensor) -> Tensor:
        return part.reshape(batch, -1, heads, channels // heads).permute(0, 2, 1, 3)

    if attention.sr is not None:
        run = attention.N_ratio
        keys_count = count // run
        runs = tokens[:, : keys_count * run].reshape(batch, keys_count, run, channels)
        reduced = attention.norm(runs.mean(dim=2).transpose(1, 2)).transpose(1, 2)
        cells = [list(range(key * run, (key + 1) * run)) for key in range(keys_count)]
    else:
        reduced, cells = tokens, [[token] for token in range(count)]
    queries = by_heads(attention.q(tokens))
    keys, values = by_heads(attention.k(reduced)), by_heads(attention.v(reduced))
    probabilities = (queries @ keys.transpose(-2, -1) * attention.scale).softmax(dim=-1)
    pre_projection = (probabilities @ values).transpose(1, 2).reshape(batch, count, channels)
    return dict(out=attention.proj(pre_projection), attn=probabilities, v=values, cells=cells,
                pre_projection=pre_projection)


def explicit_transformer_block(block: nn.Module, x: Tensor) -> Dict[str, object]:
    x = block.patch_embed(x)
    batch, channels, height, width = x.shape
    tokens = block.norm1(x).flatten(2).transpose(1, 2)
    record = explicit_attention(block.e_mhsa, tokens)
    x = x + record["out"].transpose(1, 2).reshape(batch, channels, height, width)
    out = block.projection(x)
    x = torch.cat([x, out + block.mhca(out)], dim=1)
    record["x"] = x + block.mlp(block.norm2(x))
    record["grid"] = (height, width)
    return record


def block_maps_by_hand(blocks: List[Dict], gradients) -> List[Tensor]:
    maps = []
    for block, gradient in zip(blocks, gradients):
        attention, values = block["attn"].detach(), block["v"].detach()
        batch, heads, rows, _ = attention.shape
        weights = gradient.detach().clamp(min=0).reshape(batch, rows, heads, -1).transpose(1, 2)
        contributions = attention.unsqueeze(-1) * values.unsqueeze(2)  # (B, H, Nq, M, d)
        per_token = (contributions * weights.unsqueeze(3)).sum(dim=(1, 2, 4)).clamp(min=0)
        cam = torch.zeros(batch, block["grid"][0] * block["grid"][1], dtype=per_token.dtype)
        for token, token_cells in enumerate(block["cells"]):
            for cell in token_cells:
                cam[:, cell] += per_token[:, token] / len(token_cells)
        maps.append(cam.reshape(batch, *block["grid"]))
    return maps


def explicit_daam(model: nn.Module, images: Tensor, target=None) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    blocks: List[Dict] = []
    with torch.enable_grad():
        x = model.stem(images.double())
        for stage in model.stages:
            for block in stage.blocks:
                if isinstance(block, NextTransformerBlock):
                    record = explicit_transformer_block(block, x)
                    blocks.append(record)
                    x = record["x"]
                else:
                    x = block(x)
        logits = model.forward_head(model.norm(x))
        targets = resolve_targets(target, logits)
        score = logits[torch.arange(len(logits)), targets].sum()
        gradients = torch.autograd.grad(score, [block["pre_projection"] for block in blocks])
    block_maps = block_maps_by_hand(blocks, gradients)
    return dict(logits=logits.detach(), block_maps=block_maps,
                flow=flow_on_the_finest_grid(block_maps))


def small_nextvit(seed: int = 3) -> nn.Module:
    """The fewest blocks timm's NextViT builds (its widths are fixed): a transformer block in
    each of stages 2, 3 and 4, after 1 + 4 convolution blocks."""
    torch.manual_seed(0)
    model = NextViT(in_chans=3, num_classes=NUM_CLASSES, depths=(1, 1, 5, 1)).eval()
    # Noise of 0.04: much less leaves the logits all but independent of the image (and block
    # maps zero), much more lets float32 activations grow past where the maps stay exact.
    return add_parameter_noise(model, scale=0.04, seed=seed)


@pytest.fixture(scope="module")
def model():
    return small_nextvit()


@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_flow_and_block_maps_equal_explicit_reference(model, target):
    runs = [block.N_ratio for block in TimmNextVitAdapter(model).attention_modules()]
    assert runs == [16, 4, 1]
    assert_family_matches_reference(model, make_images(3, *IMAGE_SIZE), target, explicit_daam, 3)


def test_every_registered_nextvit_model_is_taken():
    for name, layouts in registered_layouts("nextvit*", TimmNextVitAdapter):
        for layout in layouts:
            cells = layout.grid[0] * layout.grid[1]
            covered = (torch.arange(cells) if layout.positions is None
                       else layout.positions.flatten())
            assert sorted(covered.tolist()) == list(range(cells)), name  # each cell once
