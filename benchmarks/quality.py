"""Compare DAAM with other attributions on the bundled tiny ViT and generated shapes, through
``captum_daam.compare`` (one store, the same examples and targets for every method, 95%
bootstrap intervals, paired differences from DAAM, a random row as the chance level).

Methods, all with the image's true class as target (attention rollout has none):

- DAAM, the final map D_L; and DAAM's best single block map cam_l, the block chosen by the
  pointing game on the same single-object images (so its row is optimistic);
- LeGrad (Bousselham et al. 2025), AttentionRollout (Abnar & Zuidema 2020) and
  GradientRollout (Chefer et al. 2021);
- Captum LayerGradCam on the last block's input patch tokens (``TokenGrid`` on its first
  norm, the layer pytorch-grad-cam uses for ViTs);
- Captum Saliency, IntegratedGradients (32 steps, zero baseline) and Occlusion (8 x 8
  windows, stride 4, zero baseline), at pixel level, channels summed;
- random maps on the patch grid: the chance level.

Metrics (``captum_daam.metrics``, per example, in the compare table): pointing game and
energy-based pointing game; Chefer et al.'s segmentation scores of the binarised map (pixel
accuracy, mIoU, mAP); deletion (zeros baseline) and insertion (blurred baseline) AUC, 32
steps; Chefer et al.'s positive and negative perturbation AUC (10% steps); average drop and
increase in confidence (Grad-CAM++). Beside it, two columns compare does not hold: the
class-discriminative pointing game on two-object images (the map for class A must point into
A's mask and the map for B into B's; the mean over both), and the cascading
model-randomisation check on the first ``--sanity-images`` images (the Spearman rank
correlation between the trained model's map and the map once the head and every block are
re-initialised, top down; lower means the map depends on the model, as it should).

    python benchmarks/quality.py                    # 500 + 500 images, ~40 min on 2 CPU cores
    python benchmarks/quality.py --images 50 --sanity-images 10     # a quick look

Writes benchmarks/results/quality.{md,csv,json} and quality_curves.png.
"""

import argparse
import json
import os
import shutil
import tempfile
from typing import Callable, Dict

import torch
from captum.attr import IntegratedGradients, LayerGradCam, Occlusion, Saliency
from torch import Tensor, nn

from captum_daam import DAAM, AttentionRollout, GradientRollout, LeGrad, compare, metrics
from captum_daam._methods import RandomMaps
from captum_daam.data import ShapesDataset, make_shapes
from captum_daam.token_grid import TokenGrid
from captum_daam.zoo import tiny_vit

SINGLE_SEED, DOUBLE_SEED = 777_000, 778_000  # seeds training never used
METRICS = ("pointing_game", "energy_pointing_game", "pixel_accuracy", "miou",
           "average_precision", "deletion", "insertion", "positive_perturbation",
           "negative_perturbation", "average_drop", "increase_in_confidence")
Explain = Callable[[nn.Module, Tensor, Tensor], Tensor]


def daam_block(block: int) -> Explain:
    def explain(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        layer = model.blocks[block].attn
        return DAAM(model, layer=layer).attribute(images, target=targets, accumulate=False)

    return explain


METHODS: Dict[str, Explain] = {
    "daam": lambda m, x, t: DAAM(m).attribute(x, target=t),
    "legrad": lambda m, x, t: LeGrad(m).attribute(x, target=t),
    "rollout": lambda m, x, t: AttentionRollout(m).attribute(x),
    "gradient-rollout": lambda m, x, t: GradientRollout(m).attribute(x, target=t),
    "gradcam": lambda m, x, t: LayerGradCam(
        m, TokenGrid(m, m.blocks[-1].norm1)
    ).attribute(x, target=t, relu_attributions=True),
    "saliency": lambda m, x, t: Saliency(m).attribute(x, target=t),
    "integrated-gradients": lambda m, x, t: IntegratedGradients(m).attribute(
        x, target=t, n_steps=32, internal_batch_size=len(x) * 32
    ),
    "occlusion": lambda m, x, t: Occlusion(m).attribute(
        x, target=t, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), baselines=0.0,
        perturbations_per_eval=225,
    ),
    "random": lambda m, x, t: RandomMaps((8, 8))(x, t),
}


class Bound:
    """One of :data:`METHODS` on the model, as compare takes a callable."""

    def __init__(self, name: str, explain: Explain, model: nn.Module) -> None:
        self.name, self.explain, self.model = name, explain, model

    def __call__(self, images: Tensor, targets: Tensor) -> Tensor:
        return self.explain(self.model, images, targets)

    def __repr__(self) -> str:
        return f"quality.{self.name}"


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


def beside_compare(explain: Explain, model: nn.Module, single, double, args) -> dict:
    """The two columns compare does not hold: the discriminative pointing game and the
    model-randomisation check."""
    two_images, two_labels, two_masks = double
    hits = [
        metrics.pointing_game(
            in_batches(explain, model, two_images, two_labels[:, k], args.batch_size),
            two_masks[:, k],
        ).float()
        for k in (0, 1)
    ]
    images, targets = single[0][: args.sanity_images], single[1][: args.sanity_images]
    cascade = [model.head] + list(model.blocks)[::-1]
    correlations = metrics.cascading_randomisation(explain, model, images, targets, cascade,
                                                   seed=0)
    return {
        "discriminative_pointing_game": float(torch.stack(hits).mean()),
        "randomised_rank_correlation": float(correlations[:, -1].nanmean()),
        "randomisation_cascade": correlations.nanmean(dim=0).tolist(),
    }


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
                        help="folder for quality.{md,csv,json} and quality_curves.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = tiny_vit()
    data = ShapesDataset(args.images, seed=SINGLE_SEED)
    single = (data.images, data.labels, data.masks)
    double = make_shapes(args.images, seed=DOUBLE_SEED, objects=2)
    block = best_daam_block(model, *single, args.batch_size)
    methods = dict(METHODS)
    methods = {"daam": methods.pop("daam"), f"daam-block-{block + 1}": daam_block(block),
               **methods}
    if args.methods:
        methods = {name: methods[name] for name in args.methods}
    work = tempfile.mkdtemp(prefix="quality.")
    try:
        store = compare(model, data, {name: RandomMaps((8, 8)) if name == "random" else
                                      Bound(name, explain, model)
                                      for name, explain in methods.items()},
                        metrics=METRICS, out=os.path.join(work, "quality.zarr"),
                        batch_size=args.batch_size, target="label", dtype=torch.float32,
                        return_flow=False)
        summary = dict(store.attrs["summary"])
        os.makedirs(args.out, exist_ok=True)
        report = os.path.join(work, "quality.zarr", "report")
        table = open(os.path.join(report, "compare.md")).read()
        shutil.copy(os.path.join(report, "compare.csv"), os.path.join(args.out, "quality.csv"))
        shutil.copy(os.path.join(report, "curves.png"),
                    os.path.join(args.out, "quality_curves.png"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    beside = {}
    lines = ["| method | discriminative pointing game (two objects) | rank corr. after "
             "randomisation (lower better) |", "|---|---|---|"]
    for name, explain in methods.items():
        row = beside[name] = beside_compare(explain, model, single, double, args)
        lines.append(f"| {name} | {row['discriminative_pointing_game']:.3f} | "
                     f"{row['randomised_rank_correlation']:.3f} |")
        print(lines[-1], flush=True)
    header = (f"bundled tiny ViT, {args.images} single-object images (seed {SINGLE_SEED}, "
              f"accuracy {summary['accuracy']:.3f}), target the true class; "
              f"{args.threads} threads, torch {torch.__version__}; DAAM's best single block "
              f"by the pointing game: {block + 1}. Regenerate: python benchmarks/quality.py")
    text = "\n".join([
        header, "", "Through `captum_daam.compare` (s / image: this machine, the maps "
        "only, not the metrics):", "", table.rstrip("\n"), "",
        f"Beside it: {args.images} two-object images (seed {DOUBLE_SEED}) and the "
        f"randomisation check on {args.sanity_images} images:", "", *lines, ""])
    with open(os.path.join(args.out, "quality.md"), "w") as handle:
        handle.write(text)
    with open(os.path.join(args.out, "quality.json"), "w") as handle:
        json.dump({"images": args.images, "sanity_images": args.sanity_images,
                   "best_daam_block": block + 1, "summary": summary, "beside": beside},
                  handle, indent=1)
    print(text)


if __name__ == "__main__":
    main()
