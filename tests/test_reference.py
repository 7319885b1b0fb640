"""Tests that pin down the explicit reference (tests/reference.py) itself.

The package is tested against ``reference.py``; these tests make sure the
reference reproduces timm's own forward pass and the DAAM decomposition
identities, so that a disagreement later points at the package.
No network: every model is built with ``pretrained=False``.
"""

import copy

import pytest
import timm
import torch
from timm.layers.attention import Attention
from timm.models.vision_transformer import VisionTransformer

from helpers import assert_close_relative
from reference import explicit_attention, explicit_daam, explicit_forward, resolve_targets


def _images(batch=2, height=224, width=224, seed=0):
    torch.manual_seed(seed)
    return torch.randn(batch, 3, height, width)


NAMED_MODELS = [
    ("deit_tiny_patch16_224", {}),
    ("deit_tiny_distilled_patch16_224", {}),
    ("vit_small_patch16_224", {"qk_norm": True}),
]


def _named_model(name, kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _small_vit(**kwargs):
    """A tiny VisionTransformer so that many variants stay fast."""
    torch.manual_seed(1)
    base = dict(img_size=64, patch_size=16, embed_dim=48, depth=3, num_heads=3, num_classes=10)
    base.update(kwargs)
    return VisionTransformer(**base).eval()


@pytest.mark.parametrize("name,kwargs", NAMED_MODELS, ids=[n for n, _ in NAMED_MODELS])
def test_explicit_forward_matches_timm(name, kwargs):
    model = _named_model(name, kwargs)
    images = _images()
    with torch.no_grad():
        expected = model(images)
        result = explicit_forward(model, images)
    assert_close_relative(result["logits"], expected, 1e-5)

    num_blocks = len(model.blocks)
    assert len(result["blocks"]) == num_blocks
    tokens = model.num_prefix_tokens + 14 * 14
    heads = model.blocks[0].attn.num_heads
    attn = result["blocks"][0]["attn"]
    assert attn.shape == (2, heads, tokens, tokens)
    torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))
    assert result["blocks"][0]["pre_projection"].shape == (2, tokens, model.embed_dim)
    assert result["grid_size"] == (14, 14)


@pytest.mark.parametrize("name,kwargs", NAMED_MODELS, ids=[n for n, _ in NAMED_MODELS])
def test_float64_reference_matches_timm(name, kwargs):
    """The float64 DAAM reference sees the same logits as the float32 model."""
    model = _named_model(name, kwargs)
    images = _images()
    with torch.no_grad():
        expected = model(images)
        expected64 = copy.deepcopy(model).double()(images.double())
    out = explicit_daam(model, images)
    assert out["logits"].dtype == torch.float64
    assert_close_relative(out["logits"], expected64, 1e-10)
    assert_close_relative(out["logits"].float(), expected, 1e-4)
    # The caller's model is untouched.
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("name,kwargs", NAMED_MODELS, ids=[n for n, _ in NAMED_MODELS])
def test_decomposition_property(name, kwargs):
    """sum_n F_l[b, n, :] equals the [class] row of the attention output."""
    model = _named_model(name, kwargs)
    out = explicit_daam(model, _images())
    num_blocks = len(model.blocks)
    assert len(out["contributions"]) == num_blocks == len(out["class_outputs"])
    for contribution, class_output in zip(out["contributions"], out["class_outputs"]):
        assert contribution.shape == (2, model.num_prefix_tokens + 196, model.embed_dim)
        assert_close_relative(contribution.sum(dim=1), class_output, 1e-12)
    assert out["block_maps"].shape == (2, num_blocks, 14, 14)
    assert out["flow"].shape == (2, num_blocks, 14, 14)
    assert (out["block_maps"] >= 0).all()
    torch.testing.assert_close(out["flow"], out["block_maps"].cumsum(dim=1))
    torch.testing.assert_close(out["targets"], out["logits"].argmax(-1))


VARIANTS = {
    "registers": dict(reg_tokens=4),
    "registers_no_embed_class": dict(reg_tokens=2, no_embed_class=True),
    "qk_norm_scale_norm_layerscale": dict(qk_norm=True, scale_attn_norm=True, init_values=1e-2),
    "dynamic_img_size": dict(dynamic_img_size=True, reg_tokens=1),
    "avg_pool_fc_norm": dict(global_pool="avg"),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "nonfused"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_match_timm(variant, fused):
    model = _small_vit(**VARIANTS[variant])
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    height, width = (80, 48) if model.dynamic_img_size else (64, 64)
    images = _images(height=height, width=width)
    with torch.no_grad():
        expected = model(images)
        result = explicit_forward(model, images)
    assert_close_relative(result["logits"], expected, 1e-5)
    gh, gw = result["grid_size"]
    assert (gh, gw) == (height // 16, width // 16)

    out = explicit_daam(model, images)
    assert out["block_maps"].shape == (2, 3, gh, gw)
    for contribution, class_output in zip(out["contributions"], out["class_outputs"]):
        assert_close_relative(contribution.sum(dim=1), class_output, 1e-12)


def test_gated_attention_module_matches_timm():
    """explicit_attention reproduces Attention.forward, including the gate and a mask."""
    torch.manual_seed(2)
    attn = Attention(
        48, num_heads=4, qkv_bias=True, qk_norm=True, scale_norm=True, gated=True,
        norm_layer=torch.nn.LayerNorm,
    ).eval()
    z = torch.randn(2, 7, 48)
    mask = torch.ones(7, 7, dtype=torch.bool)
    mask[:, 3] = False
    for fused in (True, False):
        attn.fused_attn = fused
        for m in (None, mask):
            with torch.no_grad():
                expected = attn(z, attn_mask=m)
                got = explicit_attention(attn, z, attn_mask=m)
            assert_close_relative(got["out"], expected, 1e-5)
            if m is not None:
                assert (got["attn"][..., 3] == 0).all()


def test_cheap_formula_and_targets():
    """The per-head contraction of DESIGN.md equals the full-F block maps; targets resolve."""
    model = _small_vit(reg_tokens=2)
    images = _images(height=64, width=64)
    out = explicit_daam(model, images, target=[3, 7])
    assert out["targets"].tolist() == [3, 7]
    npt = out["num_prefix_tokens"]
    # The cheap form: cam[b, n] = relu(sum_h A[b, h, 0, n] * <v[b, h, n, :], relu(g)[b, h, :]>).
    forward = explicit_forward(copy.deepcopy(model).double(), images.double())
    for index, record in enumerate(forward["blocks"]):
        attn, v = record["attn"].detach(), record["v"].detach()
        batch, heads, _, head_dim = v.shape
        weights = out["class_gradients"][index].clamp(min=0).reshape(batch, heads, head_dim)
        cheap = torch.einsum("bhn,bhne,bhe->bn", attn[:, :, 0, :], v, weights).clamp(min=0)
        torch.testing.assert_close(cheap[:, npt:].reshape(batch, 4, 4), out["block_maps"][:, index])
        torch.testing.assert_close(attn[:, :, 0, :], out["class_attention"][index])

    # int, tensor and list targets agree; None is the argmax
    logits = out["logits"]
    assert resolve_targets(None, logits).tolist() == logits.argmax(-1).tolist()
    assert resolve_targets(5, logits).tolist() == [5, 5]
    assert resolve_targets(torch.tensor([1, 2]), logits).tolist() == [1, 2]
    with pytest.raises(ValueError):
        resolve_targets([1, 2, 3], logits)
    same = explicit_daam(model, images, target=torch.tensor([3, 7]))
    torch.testing.assert_close(same["flow"], out["flow"])

    # Without the relu on the gradients (self-supervised variant) the weights are g itself.
    ssl = explicit_daam(model, images, target=[3, 7], relu_gradients=False)
    for index, contribution in enumerate(ssl["contributions"]):
        g = ssl["class_gradients"][index]
        cam = torch.einsum("bnc,bc->bn", contribution, g).clamp(min=0)
        torch.testing.assert_close(cam[:, npt:].reshape(2, 4, 4), ssl["block_maps"][:, index])
