"""The ``captum-daam`` command."""

import argparse
import sys
from typing import List, Optional

import torch

SHADES = " .:-=+*#%@"


def _ascii_map(grid: torch.Tensor) -> str:
    """A (gh, gw) map as characters, darkest to brightest, scaled to its own range."""
    low, high = grid.min(), grid.max()
    scaled = (grid - low) / (high - low).clamp_min(1e-12)
    indices = (scaled * (len(SHADES) - 1)).round().long()
    return "\n".join("".join(SHADES[i] * 2 for i in row.tolist()) for row in indices)


def check(args: argparse.Namespace) -> int:
    """Explain a random image with a randomly initialised timm ViT and verify the result."""
    import timm

    from . import DAAM, class_token_contributions
    from .adapters import adapter_for

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False).eval()
    height, width = model.patch_embed.img_size
    images = torch.rand(1, 3, height, width)
    print(f"captum-daam check: {args.model} with random weights (nothing is downloaded), "
          f"one random {height}x{width} image")

    flow = DAAM(model).attribute(images, target=None, return_flow=True)
    predicted = int(model(images).argmax(1))
    print(f"explained class {predicted}: flow of {flow.shape[1]} accumulated maps, "
          f"grid {flow.shape[2]}x{flow.shape[3]}")
    for block, accumulated in enumerate(flow[0], start=1):
        print(f"  D_{block:<2d} sum {float(accumulated.sum()):9.4f}   max {float(accumulated.max()):8.4f}")

    adapter = adapter_for(model)
    class_outputs = []
    handle = model.blocks[-1].attn.norm.register_forward_pre_hook(
        lambda module, args: class_outputs.append(args[0][:, 0].detach())
    )
    try:
        with adapter.record(adapter.attention_modules()[-1:]) as records, torch.no_grad():
            model(images)
    finally:
        handle.remove()
    rebuilt = class_token_contributions(records[0].class_attention, records[0].values).sum(1)
    error = float((rebuilt - class_outputs[0]).abs().max() / class_outputs[0].abs().max())
    checks = {
        "maps are non-negative": bool((flow >= 0).all()),
        "the flow only grows from block to block": bool((flow.diff(dim=1) >= 0).all()),
        f"per-token contributions sum to the [class] output (relative error {error:.1e})": error
        < 1e-4,
    }
    print("final map D_L (brighter = more attribution):")
    print(_ascii_map(flow[0, -1]))
    for name, passed in checks.items():
        print(f"  [{'ok' if passed else 'FAILED'}] {name}")
    return 0 if all(checks.values()) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captum-daam",
        description="Dynamic Accumulated Attention Maps (DAAM) for Vision Transformers.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser(
        "check",
        help="offline self-check: DAAM on a randomly initialised timm ViT",
        description=check.__doc__,
    )
    check_parser.add_argument("--model", default="deit_tiny_patch16_224",
                              help="timm model name, built with pretrained=False")
    check_parser.add_argument("--seed", type=int, default=0)
    check_parser.set_defaults(run=check)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
