"""GenericAdapter: DAAM on a model that no registered family knows, here a small T2T-ViT-like
network (a tokens-to-token stem of soft splits and a transformer layer, then a [class] token and
a backbone of attention blocks), equals an explicit reference.

The backbone blocks are either timm ``Block``s or research-code blocks written here the way
T2T-ViT's own code writes them (qkv, scale, proj; no q_norm / k_norm / norm). The reference
re-runs the model with every backbone attention matrix formed explicitly, in float64, with
plain autograd; no hooks and no package code.
"""

import copy
import math
import warnings
from typing import Dict, Optional, Tuple

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from captum_daam import DAAM
from captum_daam.adapters import GenericAdapter, supported_families
from helpers import assert_close_relative, make_images, module_hook_count
from reference import maps_from_every_query_row, maps_from_explicit_blocks, resolve_targets

NUM_CLASSES = 7
TARGETS = [3, 6, 0]

# --------------------------------------------------------------------------- #
# A T2T-ViT-like model
# --------------------------------------------------------------------------- #


class ResearchAttention(nn.Module):
    """Attention as T2T-ViT's and much research code write it (the older timm layout)."""

    def __init__(self, dim: int, num_heads: int, qk_scale: Optional[float] = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj_drop(self.proj(x))


class ResearchBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ResearchAttention(dim, num_heads, qk_scale=0.3)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokensToToken(nn.Module):
    """T2T-ViT's stem: soft split (overlapping unfold), a transformer layer over those
    tokens, re-structurisation to a grid and a second soft split, then a projection."""

    def __init__(self, in_chans: int = 3, token_dim: int = 12, embed_dim: int = 64) -> None:
        super().__init__()
        self.split1 = nn.Unfold(kernel_size=7, stride=4, padding=2)
        self.project1 = nn.Linear(in_chans * 49, token_dim)
        self.layer1 = Block(token_dim, num_heads=1, mlp_ratio=1.0)  # no [class] token here
        self.split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.project2 = nn.Linear(token_dim * 9, embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = ((size + 2 * 2 - 7) // 4 + 1 for size in images.shape[-2:])
        tokens = self.layer1(self.project1(self.split1(images).transpose(1, 2)))
        grid = tokens.transpose(1, 2).reshape(images.shape[0], -1, height, width)
        return self.project2(self.split2(grid).transpose(1, 2))


def sinusoid_table(num_tokens: int, dim: int) -> torch.Tensor:
    """T2T-ViT's fixed sinusoidal position table, (1, N, dim), for any N."""
    position = torch.arange(num_tokens, dtype=torch.float64).unsqueeze(1)
    frequency = torch.pow(10000.0, -2 * (torch.arange(dim) // 2).double() / dim)
    angles = position * frequency
    table = torch.where(torch.arange(dim) % 2 == 0, angles.sin(), angles.cos())
    return table.unsqueeze(0)


class TinyT2TViT(nn.Module):
    """With ``class_token=False`` the first tokens are the registers and the head averages the
    patch tokens (``pool='avg'``)."""

    def __init__(
        self,
        research_blocks: bool = False,
        num_registers: int = 0,
        depth: int = 3,
        class_token: bool = True,
    ):
        super().__init__()
        dim = 64
        self.tokens_to_token = TokensToToken(embed_dim=dim)
        self.cls_token = nn.Parameter(torch.randn(1, int(class_token), dim) * 0.5)
        self.registers = nn.Parameter(torch.randn(1, num_registers, dim) * 0.5)
        make_block = ResearchBlock if research_blocks else (lambda d, h: Block(d, h))
        self.blocks = nn.ModuleList(make_block(dim, 4) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.tokens_to_token(images)
        prefix = torch.cat((self.cls_token, self.registers), dim=1).expand(len(images), -1, -1)
        tokens = torch.cat((prefix, patches), dim=1)
        return tokens + sinusoid_table(tokens.shape[1], tokens.shape[2]).to(tokens.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.head(self.pool(self.norm(x)))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cls_token.shape[1]:
            return tokens[:, 0]
        return tokens[:, self.registers.shape[1]:].mean(dim=1)


def make_t2t(seed: int = 0, **kwargs) -> TinyT2TViT:
    torch.manual_seed(seed)
    return TinyT2TViT(**kwargs).eval()


# --------------------------------------------------------------------------- #
# Explicit reference
# --------------------------------------------------------------------------- #


def explicit_attention(attention: nn.Module, z: torch.Tensor) -> Dict[str, torch.Tensor]:
    """softmax(q k^T * scale) formed as a (B, H, N, N) tensor, for both attention types."""
    batch, tokens, channels = z.shape
    heads = attention.num_heads
    qkv = attention.qkv(z).reshape(batch, tokens, 3, heads, channels // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    if hasattr(attention, "q_norm"):
        q, k = attention.q_norm(q), attention.k_norm(k)
    probabilities = ((q @ k.transpose(-2, -1)) * attention.scale).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, tokens, channels)
    after_norm = attention.norm(pre_projection) if hasattr(attention, "norm") else pre_projection
    return {
        "attn": probabilities,
        "v": v,
        "pre_projection": pre_projection,
        "out": attention.proj(after_norm),
    }


def explicit_daam(
    model: TinyT2TViT, images: torch.Tensor, grid: Tuple[int, int], target=None, queries="class"
) -> Dict[str, object]:
    model = copy.deepcopy(model).double()
    prefix = model.cls_token.shape[1] + model.registers.shape[1]
    with torch.enable_grad():
        x = model.embed(images.double())
        blocks = []
        for block in model.blocks:
            record = explicit_attention(block.attn, block.norm1(x))
            x = x + getattr(block, "ls1", nn.Identity())(record["out"])
            x = x + getattr(block, "ls2", nn.Identity())(block.mlp(block.norm2(x)))
            blocks.append(record)
        final = model.norm(x)
        if model.cls_token.shape[1]:
            pooled = final[:, 0]
        else:
            pooled = final[:, model.registers.shape[1]:].sum(dim=1) / (final.shape[1] - prefix)
        logits = model.head(pooled)
        targets = resolve_targets(target, logits)
        score = logits[torch.arange(len(logits)), targets].sum()
        gradients = torch.autograd.grad(score, [record["pre_projection"] for record in blocks])
    reduce = maps_from_explicit_blocks if queries == "class" else maps_from_every_query_row
    maps = reduce(blocks, gradients, prefix, grid)
    return dict(maps, logits=logits.detach(), targets=targets)


def generic_daam(model: TinyT2TViT, **adapter_kwargs) -> DAAM:
    adapter_kwargs.setdefault("head_queries", "class")
    adapter = GenericAdapter([block.attn for block in model.blocks], **adapter_kwargs)
    return DAAM(model, adapter=adapter)


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #

BLOCK_TYPES = {"timm_blocks": False, "research_blocks": True}


@pytest.mark.parametrize("blocks", sorted(BLOCK_TYPES))
def test_explicit_reference_reproduces_the_models_logits(blocks):
    model = make_t2t(research_blocks=BLOCK_TYPES[blocks])
    images = make_images(3, 64, 64)
    expected = explicit_daam(model, images, (8, 8), target=TARGETS)
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images), 1e-5)


@pytest.mark.parametrize("target", [TARGETS, None], ids=["three_targets", "predicted"])
@pytest.mark.parametrize("blocks", sorted(BLOCK_TYPES))
def test_t2t_like_flow_equals_explicit_reference_with_the_square_grid_inferred(blocks, target):
    model = make_t2t(research_blocks=BLOCK_TYPES[blocks])
    images = make_images(3, 64, 64)
    expected = explicit_daam(model, images, (8, 8), target=target)
    daam = generic_daam(model)
    flow = daam.attribute(images, target=target, return_flow=True)
    block_maps = daam.attribute(images, target=target, return_flow=True, accumulate=False)
    assert flow.shape == (3, 3, 8, 8)
    assert_close_relative(flow, expected["flow"])
    assert_close_relative(block_maps, expected["block_maps"])
    assert_close_relative(daam.attribute(images, target=target), expected["flow"][:, -1:])


def test_non_square_grid_is_given_and_checked():
    model = make_t2t()
    images = make_images(2, 64, 96)  # 8 x 12 patch tokens
    with pytest.raises(ValueError, match="96 patch tokens, which is not a square grid"):
        generic_daam(model).attribute(images, target=[1, 2])
    with pytest.raises(ValueError, match=r"Expected 8x8 = 64 patch tokens .* got 96"):
        generic_daam(model, grid_size=(8, 8)).attribute(images, target=[1, 2])
    assert module_hook_count(model) == 0
    expected = explicit_daam(model, images, (8, 12), target=[1, 2])
    flow = generic_daam(model, grid_size=(8, 12)).attribute(images, target=[1, 2], return_flow=True)
    assert_close_relative(flow, expected["flow"])


def test_register_tokens_are_dropped_as_prefix_tokens():
    model = make_t2t(num_registers=2)
    images = make_images(2, 64, 64)
    expected = explicit_daam(model, images, (8, 8), target=[4, 5])
    flow = generic_daam(model, num_prefix_tokens=3).attribute(
        images, target=[4, 5], return_flow=True
    )
    assert_close_relative(flow, expected["flow"])
    with pytest.raises(ValueError, match="not a square grid"):  # 66 tokens left with prefix 1
        generic_daam(model).attribute(images, target=[4, 5])


def test_layer_takes_the_given_modules_in_block_order_and_names_them_in_errors():
    model = make_t2t()
    images = make_images(2, 64, 64)
    expected = explicit_daam(model, images, (8, 8), target=[1, 2])
    adapter = GenericAdapter([block.attn for block in model.blocks], head_queries="class")
    chosen = [model.blocks[2].attn, model.blocks[0].attn]
    block_maps = DAAM(model, layer=chosen, adapter=adapter).attribute(
        images, target=[1, 2], return_flow=True, accumulate=False
    )
    assert_close_relative(block_maps, expected["block_maps"][:, [0, 2]])
    stem_attention = model.tokens_to_token.layer1.attn
    with pytest.raises(ValueError, match="one of the attention modules given to GenericAdapter"):
        DAAM(model, layer=stem_attention, adapter=adapter)


def test_a_forward_function_with_a_generic_adapter():
    model = make_t2t(research_blocks=True)
    images = make_images(2, 64, 64)
    expected = explicit_daam(model, images, (8, 8), target=[0, 1])
    adapter = GenericAdapter([block.attn for block in model.blocks], head_queries="class")
    flow = DAAM(lambda x: model(x * 1.0), adapter=adapter).attribute(
        images, target=[0, 1], return_flow=True
    )
    assert_close_relative(flow, expected["flow"])
    model.train()
    with pytest.warns(UserWarning, match="training mode"):
        DAAM(lambda x: model(x), adapter=adapter).attribute(images, target=0)
    model.eval()


def test_checks_before_the_forward_when_channels_and_outputs_are_given():
    model = make_t2t()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    daam = generic_daam(model, in_channels=3, num_outputs=NUM_CLASSES)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        daam.attribute(torch.rand(1, 1, 64, 64), target=0)
    with pytest.raises(ValueError, match="0..6"):
        daam.attribute(make_images(1, 64, 64), target=NUM_CLASSES)
    assert calls == []
    with pytest.raises(ValueError, match="target classes below the model's 7 outputs"):
        generic_daam(model).attribute(make_images(1, 64, 64), target=NUM_CLASSES)


def test_bad_generic_adapters_are_refused():
    model = make_t2t()
    with pytest.raises(
        TypeError, match="lacks a qkv linear layer, a proj module, an int num_heads"
    ):
        GenericAdapter([nn.Linear(4, 4)])
    with pytest.raises(ValueError, match="at least one attention module"):
        GenericAdapter([])
    with pytest.raises(ValueError, match="num_prefix_tokens >= 0"):
        GenericAdapter([model.blocks[0].attn], num_prefix_tokens=-1)
    with pytest.raises(ValueError, match="two positive ints"):
        GenericAdapter([model.blocks[0].attn], grid_size=(8, 0), head_queries="class")
    for bad in ("cls", (1,), (0, 0), (0, 3), (), [0.0]):
        with pytest.raises(ValueError, match="head_queries"):
            GenericAdapter([model.blocks[0].attn], num_prefix_tokens=2, head_queries=bad)
    with pytest.raises(ValueError, match="start with the \\[class\\] token"):
        GenericAdapter([model.blocks[0].attn], num_prefix_tokens=0, head_queries="class")
    single = GenericAdapter(model.blocks[0].attn, head_queries="class")
    assert single.attention_modules() == [model.blocks[0].attn]


def test_an_unsupported_model_points_to_the_generic_adapter_and_the_list_of_families():
    with pytest.raises(TypeError) as error:
        DAAM(make_t2t())
    message = str(error.value)
    assert "TinyT2TViT" in message and "GenericAdapter(attention_modules=" in message
    assert "captum-daam check --list" in message and len(message.splitlines()) <= 3
    assert len(supported_families()) >= 5


def test_nothing_is_left_behind_when_the_forward_raises():
    model = make_t2t()
    before = module_hook_count(model)

    def failing(images):
        model(images)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        DAAM(
            failing, adapter=GenericAdapter([b.attn for b in model.blocks], head_queries="class")
        ).attribute(
            make_images(1, 64, 64), target=0
        )
    assert module_hook_count(model) == before
    assert all(parameter.grad is None for parameter in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generic_daam(model).attribute(make_images(1, 64, 64), target=0)
    assert math.isfinite(float(generic_daam(model).attribute(make_images(1, 64, 64)).sum()))


def test_a_model_whose_first_tokens_are_registers_must_say_what_its_head_reads():
    """No [class] token: the first prefix token is a register. The adapter does not assume the
    head reads it; told that the head pools, DAAM explains every row, as the reference does."""
    model = make_t2t(num_registers=2, class_token=False)
    images = make_images(2, 64, 64)
    with pytest.raises(ValueError, match="cannot tell which tokens the model's head reads"):
        GenericAdapter([block.attn for block in model.blocks], num_prefix_tokens=2)
    adapter = GenericAdapter(
        [block.attn for block in model.blocks], num_prefix_tokens=2, head_queries="all"
    )
    assert not adapter.has_class_token and adapter.head_queries is None
    expected = explicit_daam(model, images, (8, 8), target=[4, 5], queries="all")
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images), 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flow = DAAM(model, adapter=adapter).attribute(images, target=[4, 5], return_flow=True)
    assert_close_relative(flow, expected["flow"])
    register_row = explicit_daam(model, images, (8, 8), target=[4, 5])["flow"]
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_relative(flow, register_row, 1e-2)  # not the first register's row
    with pytest.raises(ValueError, match="Expected a model with a \\[class\\] token"):
        DAAM(model, adapter=adapter).attribute(images, target=[4, 5], queries="class")
    assert module_hook_count(model) == 0


def test_without_prefix_tokens_every_row_is_explained_unasked():
    model = make_t2t(class_token=False)
    images = make_images(2, 64, 64)
    adapter = GenericAdapter([block.attn for block in model.blocks], num_prefix_tokens=0)
    expected = explicit_daam(model, images, (8, 8), target=None, queries="all")
    flow = DAAM(model, adapter=adapter).attribute(images, return_flow=True)
    assert_close_relative(flow, expected["flow"])
