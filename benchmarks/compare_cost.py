"""What ``captum_daam.compare`` costs against the methods it compares run alone.

The same methods, dataset and metrics two ways, in one process, repeats interleaved
(compare, alone, alone, compare, ...), each run into a fresh store:

- **compare**: ``compare(model, data, methods, metrics, write_report=...)``, one store, one
  forward pass per batch for the shared predictions, then each method and its metrics;
- **alone**: ``explain_dataset(method, data, metrics)`` once per method, each its own store
  (its own predictions: DAAM's from its own forward pass, the others' from one more).

The figure is the ratio of the medians, compare over the sum of the alone runs (the goal:
at most 1.05), and the median of the paired ratios. The report's bootstrap (written by
compare, not by the alone runs) is timed apart, on the run's values and on 50,000 examples.

    python benchmarks/compare_cost.py                      # the bundled model, 256 images
    python benchmarks/compare_cost.py --images 64 --repeats 2

Writes benchmarks/results/compare_cost_<device>.json and .md.
"""

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="daam,rollout,gradient-rollout,legrad,gradcam,"
                        "saliency,random")
    parser.add_argument("--metrics", nargs="*",
                        default=["pointing_game", "deletion", "insertion", "miou"])
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from captum_daam import compare, explain_dataset
    from captum_daam._methods import as_method, named_method
    from captum_daam.comparison import report
    from captum_daam.data import ShapesDataset
    from captum_daam.zoo import tiny_vit

    model = tiny_vit()
    data = ShapesDataset(args.images, seed=11)
    methods = args.methods.split(",")
    image_shape = tuple(data[0][0].shape)
    common = dict(batch_size=args.batch_size, metrics=tuple(args.metrics), progress=False)
    work = Path(tempfile.mkdtemp(prefix="compare_cost."))
    times = {"compare": [], "alone": []}
    per_method = {name: [] for name in methods}
    try:
        def run_compare(index: int) -> float:
            start = time.perf_counter()
            compare(model, data, methods, out=work / f"c{index}.zarr", write_report=False,
                    **common)
            return time.perf_counter() - start

        def run_alone(index: int) -> float:
            total = 0.0
            for name in methods:
                attribution, kwargs = named_method(name, model, (8, 8), image_shape,
                                                   args.batch_size)
                method = as_method(attribution, model)
                start = time.perf_counter()
                explain_dataset(method.attribution, data, work / f"a{index}_{name}.zarr",
                                model=model, attribute_kwargs=kwargs,
                                return_flow=method.is_daam, **common)  # compare: the flow
                seconds = time.perf_counter() - start
                per_method[name].append(seconds)
                total += seconds
            return total

        run_compare(-1)  # warm-up: first imports, allocator
        for repeat in range(args.repeats):
            order = ("compare", "alone") if repeat % 2 == 0 else ("alone", "compare")
            for kind in order:
                seconds = (run_compare if kind == "compare" else run_alone)(repeat)
                times[kind].append(seconds)
                print(f"repeat {repeat} {kind}: {seconds:.2f} s", flush=True)
        start = time.perf_counter()
        report(work / "c0.zarr", out=work / "report")
        report_seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)

    from captum_daam.metrics import bootstrap_intervals

    # a large table's intervals: 8 methods x 11 metrics, each mean and its two differences
    values = torch.rand(50_000, 8 * 11 * 3, dtype=torch.float64)
    start = time.perf_counter()
    bootstrap_intervals(values)
    bootstrap_50k = time.perf_counter() - start

    median = {kind: statistics.median(seconds) for kind, seconds in times.items()}
    paired = [c / a for c, a in zip(times["compare"], times["alone"])]
    result = {
        "images": args.images, "batch_size": args.batch_size, "repeats": args.repeats,
        "threads": args.threads, "methods": methods, "metrics": args.metrics,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "seconds": times, "alone_per_method": per_method,
        "ratio_of_medians": median["compare"] / median["alone"],
        "median_paired_ratio": statistics.median(paired),
        "report_seconds": report_seconds, "bootstrap_seconds_50k_examples": bootstrap_50k,
    }
    lines = [
        f"compare against its methods run alone: bundled tiny ViT, {args.images} shape "
        f"images, batches of {args.batch_size}, {args.threads} threads, torch "
        f"{torch.__version__}, {args.repeats} interleaved repeats",
        "",
        f"methods: {', '.join(methods)}; metrics: {', '.join(args.metrics)}",
        "",
        "| run | median s | runs (s) |",
        "|---|---|---|",
        f"| compare (one store) | {median['compare']:.2f} | "
        f"{', '.join(f'{s:.2f}' for s in times['compare'])} |",
        f"| the methods alone (sum of {len(methods)} explain_dataset runs) | "
        f"{median['alone']:.2f} | {', '.join(f'{s:.2f}' for s in times['alone'])} |",
        "",
        f"compare / alone: ratio of medians **{result['ratio_of_medians']:.3f}**, median of "
        f"paired ratios {result['median_paired_ratio']:.3f} (goal: at most 1.05).",
        "",
        f"The report (not written by the alone runs): {report_seconds:.2f} s for this store "
        f"({len(methods)} methods x {len(args.metrics)} metrics, 10,000 resamples); the "
        f"intervals of a table of 8 methods x 11 metrics on 50,000 examples (264 columns: "
        f"means and the differences from DAAM and from random) take {bootstrap_50k:.1f} s.",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu"
    (out / f"compare_cost_{device}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"compare_cost_{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
