"""``captum-daam demo``: the bundled tiny ViT on generated shapes, offline."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import (
    SCALINGS, _finish_page, _page_entry, _positive_int, _prepare_out, _remove_if_empty,
    _write_outputs,
)


def demo(args: argparse.Namespace) -> int:
    """Explain a few generated shape images with the bundled tiny ViT: flow PNGs and GIFs,
    and index.html, every flow with a block slider."""
    import torch

    from .. import DAAM
    from ..data import CLASSES, make_shapes
    from ..zoo import tiny_vit

    out, created = _prepare_out(args.out)
    try:
        model = tiny_vit()
        images, labels, _ = make_shapes(args.images, seed=args.seed)
        with torch.no_grad():
            probabilities = model(images).softmax(1)
        predicted = probabilities.argmax(1)
        flow = DAAM(model).attribute(images, target=predicted, return_flow=True)
        block_numbers = list(range(1, flow.shape[1] + 1))
        print(f"captum-daam demo: the bundled tiny ViT ({len(block_numbers)} blocks) on "
              f"{args.images} generated images (seed {args.seed}); writing to {out}/")
        for index in range(args.images):
            written = _write_outputs(out, f"shapes_{index}", images[index], flow[index],
                                     block_numbers, args.scaling)
            print(f"  image {index}: true {CLASSES[int(labels[index, 0])]}, predicted "
                  f"{CLASSES[int(predicted[index])]} "
                  f"(p = {float(probabilities[index].max()):.2f}); "
                  f"wrote {', '.join(str(path) for path in written)}", flush=True)
        _finish_page(out, [
            _page_entry(f"shapes_{index}", images[index], flow[index], int(predicted[index]),
                        probabilities[index].max(), CLASSES[int(predicted[index])],
                        block_numbers) for index in range(args.images)], "captum-daam demo")
    except BaseException:
        _remove_if_empty(created)
        raise
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``demo`` to ``subparsers`` (from ``add_subparsers``); it runs :func:`demo`."""
    parser = subparsers.add_parser(
        "demo", help="offline demo: the bundled tiny ViT on generated shapes",
        description=demo.__doc__,
    )
    parser.add_argument("--out", default="daam-demo", help="output folder (default: %(default)s)")
    parser.add_argument("--images", type=_positive_int, default=3,
                        help="how many images, at least 1 (default: 3)")
    parser.add_argument("--seed", type=int, default=2024, help="generator seed")
    parser.add_argument("--scaling", choices=SCALINGS, default="paper",
                        help="colour scaling of the maps (default: the paper's mapping)")
    parser.set_defaults(run=demo)
    return parser
