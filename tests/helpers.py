"""Small utilities shared by the tests (no package code under test here)."""

import timm
import torch
from torch import nn


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """max |actual - expected| <= rel * max |expected| (maps are compared as a whole)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    scale = expected.abs().max().clamp(min=1e-30)
    error = (actual - expected).abs().max()
    assert (
        error <= rel * scale
    ), f"max abs error {error.item():.3e} > {rel:.0e} * {scale.item():.3e}"


def make_images(batch: int = 3, height: int = 224, width: int = 224, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)


def make_model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A timm model with random weights (no download), in eval mode."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def set_fused_attention(model: nn.Module, fused: bool) -> nn.Module:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model


def module_hook_count(model: nn.Module) -> int:
    """All module hooks of every kind on every submodule."""
    total = 0
    for module in model.modules():
        for name in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_pre_hooks_with_kwargs",
        ):
            total += len(getattr(module, name, {}))
    return total
