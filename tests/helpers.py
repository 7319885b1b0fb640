"""Small utilities shared by the tests. Nothing here computes an expected value: the explicit
references live in reference.py and in each family's test file."""

import contextlib
import warnings
from typing import Callable, Dict, List, Sequence, Tuple

import pytest
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


def assert_attributions_match(
    daam,
    images: torch.Tensor,
    target,
    expected: Dict[str, torch.Tensor],
    rel: float = 1e-4,
    **options,
) -> torch.Tensor:
    """DAAM's block maps, flow and final map for ``target`` (and further attribute()
    ``options``) equal the reference's ``block_maps`` and ``flow`` (B, L, gh, gw). Returns
    the flow."""
    flow = daam.attribute(images, target=target, return_flow=True, **options)
    block_maps = daam.attribute(
        images, target=target, return_flow=True, accumulate=False, **options
    )
    final = daam.attribute(images, target=target, **options)
    assert_close_relative(block_maps, expected["block_maps"], rel)
    assert_close_relative(flow, expected["flow"], rel)
    assert_close_relative(final, expected["flow"][:, -1:], rel)
    return flow


def record_with_module_outputs(
    adapter, attention_modules: Sequence[nn.Module], forward: Callable[[], object]
) -> Tuple[List, List[torch.Tensor]]:
    """Run ``forward`` without gradients under ``adapter.record`` and also keep each attention
    module's own output (the first tensor of a tuple), to check the records against it."""
    outputs: List[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, output) -> None:
        outputs.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [module.register_forward_hook(keep) for module in attention_modules]
    try:
        with adapter.record(attention_modules) as records, torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return records, outputs


def save_shape_pngs(folder, count: int, seed: int):
    """``count`` generated shape images saved as 8-bit PNGs in ``folder`` (shape.png for one,
    shape0.png, shape1.png, ... for more); returns their paths and labels."""
    from PIL import Image

    from captum_daam.data import make_shapes

    images, labels, _ = make_shapes(count, seed=seed)
    paths = []
    for index, image in enumerate(images):
        path = folder / (f"shape{index}.png" if count > 1 else "shape.png")
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
        paths.append(path)
    return paths, labels[:, 0]


def pooling_warning(model: nn.Module):
    """Expect the warning that [class] rows get on a model whose head pools the tokens, and
    only then."""
    if model.global_pool == "token":
        return contextlib.nullcontext()
    return pytest.warns(UserWarning, match=f"global_pool={model.global_pool!r}")


class ClassRows:
    """DAAM on the [class] rows, which the explicit references form, also for models that pool
    (queries='class'; their default is every row), with the warning they get then. Unless
    ``layer`` is given, the flow runs over the model's blocks without an attention-pool head
    (global_pool='map'), which the families' references do not form (test_attention_pool.py
    checks it against a reference of its own)."""

    def __init__(self, model: nn.Module, **kwargs) -> None:
        from captum_daam import DAAM
        from captum_daam.adapters import adapter_for

        self.model = model
        if kwargs.get("layer") is None:
            adapter = kwargs.get("adapter") or adapter_for(model)
            latent = {id(module) for module in adapter.latent_query_modules()}
            kwargs["layer"] = [
                module for module in adapter.attention_modules() if id(module) not in latent
            ]
        self.daam = DAAM(model, **kwargs)

    def attribute(self, *args, **kwargs):
        with pooling_warning(self.model):
            return self.daam.attribute(*args, queries="class", **kwargs)


def assert_maps_on_block_grids_match(
    model: nn.Module, images: torch.Tensor, target, expected: Dict[str, object], rel: float = 1e-4
) -> None:
    """DAAM with its defaults, without a warning: the block maps on their own grids equal the
    reference's ``block_maps`` (a list of (B, h_l, w_l)), each of which has a positive value,
    and the flow equals its ``flow``; no hook is left on the model."""
    from captum_daam import DAAM

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        daam = DAAM(model)
        blocks = daam.attribute(images, target=target, block_grids=True, accumulate=False)
        flow = daam.attribute(images, target=target, return_flow=True)
    assert len(blocks) == len(expected["block_maps"])
    for block, reference_map in zip(blocks, expected["block_maps"]):
        assert_close_relative(block[:, 0], reference_map, rel)
        assert float(reference_map.amax()) > 0
    assert_close_relative(flow, expected["flow"], rel)
    assert module_hook_count(model) == 0


def add_parameter_noise(model: nn.Module, scale: float = 0.1, seed: int = 1) -> nn.Module:
    """Seeded noise on every parameter, so that the biases, tables and heads a library starts
    at constants (zeros, ones) matter in a test; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def assert_family_matches_reference(
    model: nn.Module, images: torch.Tensor, target, explicit_daam: Callable, blocks: int
) -> None:
    """A family's explicit reference, ``explicit_daam(model, images, target)``, runs the model
    itself (its logits equal the model's to 1e-5) through ``blocks`` attention blocks, and
    DAAM's block maps and flow equal the reference's (:func:`assert_maps_on_block_grids_match`)."""
    expected = explicit_daam(model, images, target)
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images).double(), 1e-5)
    assert len(expected["block_maps"]) == blocks
    assert_maps_on_block_grids_match(model, images, target, expected)


def assert_refused_before_any_work(model: nn.Module, images: torch.Tensor, match: str) -> None:
    """DAAM refuses ``images`` for ``model`` with a ValueError matching ``match``, leaving no
    hook on the model."""
    from captum_daam import DAAM

    with pytest.raises(ValueError, match=match):
        DAAM(model).attribute(images, target=0)
    assert module_hook_count(model) == 0


def assert_each_cell_in_one_window(layout, name: str = "") -> None:
    """Every cell of the block's grid is read by exactly one token of one window (padding,
    -1, aside)."""
    cells = layout.positions[layout.positions >= 0]
    assert sorted(cells.tolist()) == list(range(layout.grid[0] * layout.grid[1])), name


def registered_layouts(pattern, adapter_class, image_size=None):
    """For every timm name matching ``pattern`` (built on the meta device, no weights): the
    name and the layouts of its blocks for ``image_size`` (default: its pretrained input size),
    from the adapter, which must be an ``adapter_class`` for a model without a [class] token."""
    from captum_daam.adapters import adapter_for

    for name in timm.list_models(pattern):
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        adapter = adapter_for(model)
        assert isinstance(adapter, adapter_class) and not adapter.has_class_token, name
        size = image_size or tuple(model.pretrained_cfg["input_size"][1:])
        yield name, adapter.block_layouts(adapter.attention_modules(), size)
