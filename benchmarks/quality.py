"""Compare DAAM with other attributions on the bundled tiny ViT and generated shapes.

Methods, all with the image's true class as target (attention rollout has none):

- DAAM, the final map D_L; and DAAM's best single block map cam_l, the block chosen by the
  pointing game on the same single-object images (so its row is optimistic);
- AttentionRollout (Abnar & Zuidema 2020) and GradientRollout (Chefer et al. 2021);
- Captum LayerGradCam on the last block's input patch tokens (``TokenGrid`` on its first
  norm, the layer pytorch-grad-cam uses for ViTs);
- Captum Saliency, IntegratedGradients (32 steps, zero baseline) and Occlusion (8 x 8
  windows, stride 4, zero baseline), at pixel level, channels summed.

Metrics (``captum_daam.metrics``): pointing game and energy-based pointing game on
single-object images; the class-discriminative pointing game on two-object images (the map for
class A must point into A's mask and the map for B into B's; the mean over both); deletion
(zeros baseline) and insertion (blurred baseline) AUC, 32 steps; the cascading
model-randomisation check on the first ``--sanity-images`` images: the Spearman rank
correlation between the trained model's map and the map once the head and every block are
re-initialised (top down; lower means the map depends on the model, as it should), the mean
over images; and milliseconds per image to compute the maps (this machine, ``--threads``).

    python benchmarks/quality.py                    # 500 + 500 images, 23 min on 2 CPU cores
    python benchmarks/quality.py --images 50 --sanity-images 10     # a quick look
"""

import argparse
import json
import os
import time
from typing import Callable, Dict

import torch
from captum.attr import IntegratedGradients, LayerGradCam, Occlusion, Saliency
from torch import Tensor, nn

from captum_daam import DAAM, AttentionRollout, GradientRollout, metrics
from captum_daam.data import make_shapes
from captum_daam.token_grid import TokenGrid
from captum_daam.zoo import tiny_vit

SINGLE_SEED, DOUBLE_SEED = 777_000, 778_000  # seeds training never used
Explain = Callable[[nn.Module, Tensor, Tensor], Tensor]


def daam_block(block: int) -> Explain:
    def explain(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        layer = model.blocks[block].attn
        return DAAM(model, layer=layer).attribute(images, target=targets, accumulate=False)

    return explain


METHODS: Dict[str, Explain] = {
    "DAAM (final map)": lambda m, x, t: DAAM(m).attribute(x, target=t),
    "AttentionRollout": lambda m, x, t: AttentionRollout(m).attribute(x),
    "GradientRollout": lambda m, x, t: GradientRollout(m).attribute(x, target=t),
    "LayerGradCam, last block tokens": lambda m, x, t: LayerGradCam(
        m, TokenGrid(m, m.blocks[-1].norm1)
    ).attribute(x, target=t, relu_attributions=True),
    "Saliency": lambda m, x, t: Saliency(m).attribute(x, target=t),
    "IntegratedGradients": lambda m, x, t: IntegratedGradients(m).attribute(
        x, target=t, n_steps=32, internal_batch_size=len(x) * 32
    ),
    "Occlusion": lambda m, x, t: Occlusion(m).attribute(
        x, target=t, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), baselines=0.0,
        perturbations_per_eval=225,
    ),
}


def in_batches(explain: Explain, model: nn.Module, images: Tensor, targets: Tensor, size: int):
    return torch.cat([
        explain(model, batch, batch_targets).detach()
        for batch, batch_targets in zip(images.split(size), targets.split(size))
    ])


def best_daam_block(model: nn.Module, images: Tensor, targets: Tensor, masks: Tensor,
                    size: int) -> int:
    flows = in_batches(
        lambda m, x, t: DAAM(m).attribute(x, target=t, return_flow=True, accumulate=False),
        model, images, targets, size,
    )
    scores = [float(metrics.pointing_game(flows[:, [block]], masks).float().mean())
              for block in range(flows.shape[1])]
    return max(range(len(scores)), key=scores.__getitem__)


def evaluate(name: str, explain: Explain, model: nn.Module, data: dict, args) -> dict:
    images, targets, masks = data["single"]
    start = time.perf_counter()
    maps = in_batches(explain, model, images, targets, args.batch_size)
    ms_per_image = 1000 * (time.perf_counter() - start) / len(images)
    curves = {
        kind: getattr(metrics, kind)(model, images, maps, target=targets,
                                     batch_size=args.batch_size * 4)
        for kind in ("deletion", "insertion")
    }
    two_images, two_labels, two_masks = data["double"]
    hits = [
        metrics.pointing_game(
            in_batches(explain, model, two_images, two_labels[:, k], args.batch_size),
            two_masks[:, k],
        ).float()
        for k in (0, 1)
    ]
    count = args.sanity_images
    cascade = [model.head] + list(model.blocks)[::-1]
    correlations = metrics.cascading_randomisation(
        explain, model, images[:count], targets[:count], cascade, seed=0
    )
    return {
        "pointing_game": float(metrics.pointing_game(maps, masks).float().mean()),
        "energy_pointing_game": float(metrics.energy_pointing_game(maps, masks).mean()),
        "discriminative_pointing_game": float(torch.stack(hits).mean()),
        "deletion_auc": float(curves["deletion"].auc.mean()),
        "insertion_auc": float(curves["insertion"].auc.mean()),
        "randomised_rank_correlation": float(correlations[:, -1].nanmean()),
        "randomisation_cascade": correlations.nanmean(dim=0).tolist(),
        "ms_per_image": ms_per_image,
        "curves": {kind: {"fractions": curve.fractions.tolist(),
                          "mean_probability": curve.probabilities.mean(0).tolist()}
                   for kind, curve in curves.items()},
    }


def plot_curves(results: Dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, kind, better in zip(axes, ("deletion", "insertion"), ("lower", "higher")):
        for name, row in results.items():
            curve = row["curves"][kind]
            axis.plot(curve["fractions"], curve["mean_probability"],
                      label=f"{name} ({row[kind + '_auc']:.3f})")
        axis.set_title(f"{kind} (AUC in brackets, {better} is better)")
        axis.set_xlabel(f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}")
        axis.set_ylabel("probability of the true class")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500,
                        help="single-object images, and as many two-object images")
    parser.add_argument("--sanity-images", type=int, default=50,
                        help="images for the model-randomisation check")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", help="a subset of the methods, by name")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="folder for quality.json, quality.md and quality_curves.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = tiny_vit()
    images, labels, masks = make_shapes(args.images, seed=SINGLE_SEED)
    double = make_shapes(args.images, seed=DOUBLE_SEED, objects=2)
    data = {"single": (images, labels[:, 0], masks[:, 0]), "double": double}
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels[:, 0]).float().mean())

    methods = dict(METHODS)
    block = best_daam_block(model, *data["single"], args.batch_size)
    methods = {**{"DAAM (final map)": methods.pop("DAAM (final map)"),
                  f"DAAM, best single block ({block + 1})": daam_block(block)}, **methods}
    if args.methods:
        methods = {name: methods[name] for name in args.methods}
    results = {}
    header = ("| method | pointing game | energy pointing game | discriminative pointing game | "
              "deletion AUC (lower better) | insertion AUC | rank corr. after randomisation "
              "(lower better) | ms / image |")
    lines = [f"bundled tiny ViT, {args.images} single-object images (seed {SINGLE_SEED}, "
             f"accuracy {accuracy:.3f}) and {args.images} two-object images (seed "
             f"{DOUBLE_SEED}); randomisation check on {args.sanity_images} images; "
             f"{args.threads} threads, torch {torch.__version__}", "", header, "|" + "---|" * 8]
    print("\n".join(lines), flush=True)
    for name, explain in methods.items():
        row = results[name] = evaluate(name, explain, model, data, args)
        line = (f"| {name} | {row['pointing_game']:.3f} | {row['energy_pointing_game']:.3f} | "
                f"{row['discriminative_pointing_game']:.3f} | {row['deletion_auc']:.3f} | "
                f"{row['insertion_auc']:.3f} | {row['randomised_rank_correlation']:.3f} | "
                f"{row['ms_per_image']:.1f} |")
        lines.append(line)
        print(line, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.json"), "w") as handle:
        json.dump({"images": args.images, "sanity_images": args.sanity_images,
                   "accuracy": accuracy, "best_daam_block": block + 1, "results": results},
                  handle, indent=1)
    with open(os.path.join(args.out, "quality.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    plot_curves(results, os.path.join(args.out, "quality_curves.png"))


if __name__ == "__main__":
    main()
