"""``captum-daam check``: an offline self-check, DAAM on a randomly initialised timm ViT, its
result verified against the model's own output."""

from __future__ import annotations

import argparse
import difflib
from typing import TYPE_CHECKING, Any, List, Tuple

from ._common import UsageError, _first_line

if TYPE_CHECKING:
    from torch import Tensor, nn

SHADES = " .:-=+*#%@"


def _ascii_map(grid: Tensor) -> str:
    """A (gh, gw) map as characters, darkest to brightest, scaled to its own range."""
    low, high = grid.min(), grid.max()
    scaled = (grid - low) / (high - low).clamp_min(1e-12)
    indices = (scaled * (len(SHADES) - 1)).round().long()
    return "\n".join("".join(SHADES[i] * 2 for i in row.tolist()) for row in indices)


_CHECK_MODELS = (
    "a timm model name of a family captum-daam supports (captum_daam.supported_families() "
    "lists them), e.g. deit_tiny_patch16_224, cait_xxs24_224 or xcit_nano_12_p16_224"
)


def _random_timm_model(name: str) -> nn.Module:
    """``timm.create_model(name, pretrained=False)``, or a message on how to find a name."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        suggestion = f" (close names: {', '.join(close)})" if close else ""
        raise UsageError(
            f"check --model {name!r}: timm has no model of that name{suggestion}. Expected "
            f"{_CHECK_MODELS}; list timm's names with: python -c \"import timm; "
            f"print(timm.list_models('*vit*'))\""
        )
    return timm.create_model(name, pretrained=False).eval()


def _decomposition_error(adapter: Any, model: Any, images: Any) -> Tuple[float, str]:
    """The decomposition of the flow's last attention block, checked against the model's own
    output: a hook that is not the adapter's reads that block's output before its projection
    (:func:`~captum_daam.adapters.verify.output_projection_input`), and the recorded
    contributions of the tokens must add up to its [class] row, or, in a model without a
    [class] token, to every query row (windows laid out as the records say). Returns the
    relative error and which rows were compared."""
    import torch

    from .. import class_token_contributions
    from ..adapters.verify import as_recorded_rows, output_projection_input

    last_attention = adapter.attention_modules()[-1]
    every_row = not adapter.has_class_token
    try:
        reader = output_projection_input(last_attention)
    except LookupError as error:
        raise UsageError(f"check does not know where {error}") from error
    read: List[Any] = []
    handle = reader.register_forward_pre_hook(lambda module, inputs: read.append(inputs[0]))
    try:  # gradients on, so that the adapter's own view of the output is kept (its anchor)
        with adapter.record([last_attention], full=every_row) as records, torch.enable_grad():
            model(images)
            anchor = records[0].anchor
            attention = records[0].attention() if every_row else None
    finally:
        handle.remove()
    if len(read) != 1:
        raise UsageError(
            f"check could not read the output of {type(last_attention).__name__} before its "
            f"projection (seen {len(read)} times in one forward pass, expected once)"
        )
    record = records[0]
    residual = record.residual
    if every_row:
        rebuilt = attention @ record.values if residual is None else (
            attention @ record.values + residual)
        rebuilt = rebuilt.transpose(1, 2).flatten(2)  # (B', N_q, C)
        output, _, real = as_recorded_rows(record, anchor, read[0], tuple(rebuilt.shape[:2]))
        rebuilt = rebuilt if real is None else rebuilt * real
        description = "every query row's output"
    else:
        rebuilt = class_token_contributions(record.class_attention, record.values).sum(1)
        if residual is not None:  # a term the model adds that is no token's (MViTv2)
            rebuilt = rebuilt + residual[:, :, 0].flatten(1)
        output, _, _ = as_recorded_rows(record, anchor, read[0], tuple(read[0].shape[:2]))
        output, description = output[:, 0], "the [class] output"
    error = float((rebuilt - output).abs().max() / output.abs().max())
    return error, description


def check(args: argparse.Namespace) -> int:
    """Explain a random image with a randomly initialised timm ViT and verify the result
    (with --list, print the supported model families instead)."""
    if args.list:
        from ..adapters import supported_families

        print("\n".join(supported_families()))
        return 0
    import torch
    from timm.data import resolve_data_config

    from .. import DAAM
    from ..adapters import adapter_for

    torch.manual_seed(args.seed)
    model = _random_timm_model(args.model)
    try:
        adapter = adapter_for(model)
    except TypeError as error:
        raise UsageError(
            f"check --model {args.model}: {str(error).split('. ')[0]}; expected {_CHECK_MODELS}"
        ) from error
    _, height, width = resolve_data_config({}, model=model)["input_size"]
    images = torch.rand(1, 3, height, width)
    print(f"captum-daam check: {args.model} with random weights (nothing is downloaded), "
          f"one random {height}x{width} image")

    try:
        flow = DAAM(model).attribute(images, target=None, return_flow=True)
    except (TypeError, ValueError) as error:
        raise UsageError(
            f"check --model {args.model}: DAAM cannot explain it: {_first_line(error)}"
        ) from error
    with torch.no_grad():
        predicted = int(model(images).argmax(1))
    print(f"explained class {predicted}: flow of {flow.shape[1]} accumulated maps, "
          f"grid {flow.shape[2]}x{flow.shape[3]}")
    for block, accumulated in enumerate(flow[0], start=1):
        print(f"  D_{block:<2d} sum {float(accumulated.sum()):9.4f}   "
              f"max {float(accumulated.max()):8.4f}")

    error, rows = _decomposition_error(adapter, model, images)
    checks = {
        "maps are non-negative": bool((flow >= 0).all()),
        "the flow only grows from block to block": bool((flow.diff(dim=1) >= 0).all()),
        f"per-token contributions sum to {rows} (relative error {error:.1e})": error
        < 1e-4,
    }
    print("final map D_L (brighter = more attribution):")
    print(_ascii_map(flow[0, -1]))
    for name, passed in checks.items():
        print(f"  [{'ok' if passed else 'FAILED'}] {name}")
    return 0 if all(checks.values()) else 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``check`` to ``subparsers`` (from ``add_subparsers``); it runs :func:`check`."""
    parser = subparsers.add_parser(
        "check", help="offline self-check: DAAM on a randomly initialised timm ViT",
        description=check.__doc__,
    )
    parser.add_argument("--model", default="deit_tiny_patch16_224",
                        help="timm model name of a supported family (e.g. "
                        "deit_tiny_patch16_224, cait_xxs24_224, xcit_nano_12_p16_224), "
                        "built with pretrained=False")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true",
                        help="print the supported model families, one per line, and exit")
    parser.set_defaults(run=check)
    return parser
