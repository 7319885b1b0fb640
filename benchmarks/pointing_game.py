"""A first quality figure: the pointing game on generated shapes with the bundled tiny ViT.

For each of N fresh ``make_shapes`` images (a seed that training never used), each map is
brought to the image with bilinear interpolation; a hit is when its maximum falls inside the
object's mask. The target is the true class. Methods:

- DAAM: the final accumulated map D_L;
- raw [class] attention: the last block's [class] attention row over the patches, mean of heads;
- Grad-CAM on the last block: the patch tokens it reads (the output of its first norm, the
  layer pytorch-grad-cam uses for ViTs) seen as a (C, gh, gw) map, channels weighted by the
  mean gradient over the patches, then relu (Selvaraju et al. 2017). The block's own output
  patch tokens would give zero gradients: only the [class] token is read after the last block.

    python benchmarks/pointing_game.py              # 500 images
"""

import argparse
import json
import time
from typing import Callable, Dict

import torch
from torch import Tensor, nn

from captum_daam import DAAM, metrics
from captum_daam.adapters import adapter_for
from captum_daam.data import make_shapes
from captum_daam.zoo import tiny_vit

FRESH_SEED = 777_000


def daam_maps(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    return DAAM(model).attribute(images, target=targets)


def class_attention_maps(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    adapter = adapter_for(model)
    last_block = adapter.attention_modules()[-1:]
    with adapter.record(last_block) as records, torch.no_grad():
        model(images)
    row = records[0].class_attention.mean(dim=1)[:, adapter.num_prefix_tokens :]
    grid = adapter.grid_size(tuple(images.shape[-2:]))
    return row.reshape(-1, 1, *grid)


def grad_cam_maps(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    adapter = adapter_for(model)
    captured = {}

    def keep(module: nn.Module, args: tuple, output: Tensor) -> None:
        captured["tokens"] = output

    handle = model.blocks[-1].norm1.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            scores = model(images).gather(1, targets.unsqueeze(1)).sum()
            gradient = torch.autograd.grad(scores, captured["tokens"])[0]
    finally:
        handle.remove()
    prefix = adapter.num_prefix_tokens
    tokens, gradient = captured["tokens"][:, prefix:].detach(), gradient[:, prefix:]
    weights = gradient.mean(dim=1, keepdim=True)  # (B, 1, C): mean over the patch grid
    cam = (tokens * weights).sum(-1).relu()
    grid = adapter.grid_size(tuple(images.shape[-2:]))
    return cam.reshape(-1, 1, *grid)


METHODS: Dict[str, Callable[[nn.Module, Tensor, Tensor], Tensor]] = {
    "DAAM (final map)": daam_maps,
    "last block [class] attention": class_attention_maps,
    "Grad-CAM, last block tokens": grad_cam_maps,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = tiny_vit()
    images, labels, masks = make_shapes(args.images, seed=FRESH_SEED)
    targets, masks = labels[:, 0], masks[:, 0]
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == targets).float().mean())
    results = {}
    for name, method in METHODS.items():
        start = time.perf_counter()
        hits = torch.cat([
            metrics.pointing_game(method(model, batch, batch_targets), batch_masks)
            for batch, batch_targets, batch_masks in zip(
                images.split(args.batch_size), targets.split(args.batch_size),
                masks.split(args.batch_size))
        ])
        results[name] = {
            "pointing_game": float(hits.float().mean()),
            "ms_per_image": 1000 * (time.perf_counter() - start) / args.images,
        }
    print(f"bundled tiny ViT on {args.images} fresh make_shapes images (seed {FRESH_SEED}), "
          f"target = true class; model accuracy on them {accuracy:.3f}")
    print("| method | pointing game | ms / image |")
    print("|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['pointing_game']:.3f} | {row['ms_per_image']:.1f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"images": args.images, "seed": FRESH_SEED, "accuracy": accuracy,
                       "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
