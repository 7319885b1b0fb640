"""explain_dataset's throughput and the cost of its store, measured in one run.

Two figures:

- **Store overhead**: ``explain_dataset`` (Zarr store, predictions and scores, settings hash,
  resumability) against the plain loop it replaces, over the same DataLoader and batches::

      for images, labels, masks in loader:
          maps.append(daam.attribute(images, return_flow=True).to(dtype).cpu())

  in one process, interleaved repeats (plain, store, store, plain, ...), each store run into
  a fresh folder; the ratio of the medians and the median of the paired ratios are the
  figures to read (the machines are shared and absolute times vary).
- **Processes**: images/s of ``explain_dataset`` on 1 and 2 processes under torchrun (gloo
  on CPU), timed inside the job between two barriers (process start-up and imports not
  counted), with the threads per process given (torchrun's default is 1).

    python benchmarks/dataset.py                         # the bundled model, CPU, 2048 images
    python benchmarks/dataset.py --images 512 --repeats 3
    python benchmarks/dataset.py --device cuda --autocast float16 --processes 1 2 4 \
        --model deit_small_patch16_224 --batch-size 128     # GPU: not run yet (no GPU lent)

Writes benchmarks/results/dataset_<device>.json and .md.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
AUTOCAST = {"none": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RandomImages(torch.utils.data.Dataset):
    """Seeded random images at a model's input size, with labels and empty masks: the data of
    a timm model built with random weights (nothing is downloaded)."""

    def __init__(self, count: int, size: tuple, seed: int) -> None:
        self.count, self.size, self.seed = count, size, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.rand(self.size, generator=generator)
        return image, index % 10, torch.zeros(self.size[1:], dtype=torch.bool)

    def __repr__(self) -> str:
        return f"RandomImages({self.count}, {self.size}, seed={self.seed})"


def build(args):
    from captum_daam import DAAM
    from captum_daam.data import ShapesDataset
    from captum_daam.zoo import tiny_vit

    device = torch.device(args.device)
    if args.model == "tiny-vit":
        return DAAM(tiny_vit().to(device)), ShapesDataset(args.images, seed=args.seed), device
    import timm
    from timm.data import resolve_data_config

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False).eval().to(device)
    size = tuple(resolve_data_config({}, model=model)["input_size"])
    return DAAM(model), RandomImages(args.images, size, args.seed), device


def autocast(args):
    dtype = AUTOCAST[args.autocast]
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(args.device).type, dtype=dtype)


def plain_loop(daam, dataset, device, args) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    start = time.perf_counter()
    maps = []
    with autocast(args):
        for images, _, _ in loader:
            flow = daam.attribute(images.to(device), return_flow=True)
            maps.append(flow.to(torch.float16).cpu())
    return time.perf_counter() - start


def store_run(daam, dataset, device, args, out: Path) -> float:
    from captum_daam import explain_dataset

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    with autocast(args):
        explain_dataset(daam, dataset, out, batch_size=args.batch_size, return_flow=True,
                        dtype=torch.float16, metrics=tuple(args.metrics),
                        num_workers=args.num_workers, progress=False)
    return time.perf_counter() - start


def overhead(args) -> dict:
    torch.set_num_threads(args.threads)
    daam, dataset, device = build(args)
    plain_loop(daam, dataset, device, args)  # warm-up
    plain, store = [], []
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            order = ("plain", "store") if repeat % 2 == 0 else ("store", "plain")
            for name in order:
                if name == "plain":
                    plain.append(plain_loop(daam, dataset, device, args))
                else:
                    store.append(store_run(daam, dataset, device, args,
                                           Path(folder) / "maps.zarr"))
    return {
        "plain_s": plain, "store_s": store,
        "plain_median_s": statistics.median(plain), "store_median_s": statistics.median(store),
        "ratio_of_medians": statistics.median(store) / statistics.median(plain),
        "median_paired_ratio": statistics.median(s / p for s, p in zip(store, plain)),
        "plain_images_per_s": args.images / statistics.median(plain),
        "store_images_per_s": args.images / statistics.median(store),
    }


def worker(args) -> None:
    """One rank of a torchrun job: explain_dataset between two barriers."""
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    daam, dataset, device = build(args)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    times = []
    for repeat in range(args.repeats):
        out = Path(args.out) / f"maps{repeat}.zarr"
        dist.barrier()
        start = time.perf_counter()
        with autocast(args):
            from captum_daam import explain_dataset

            explain_dataset(daam, dataset, out, batch_size=args.batch_size, return_flow=True,
                            dtype=torch.float16, metrics=tuple(args.metrics),
                            num_workers=args.num_workers, progress=False)
        dist.barrier()
        times.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        Path(args.out, "times.json").write_text(json.dumps(times))
    dist.destroy_process_group()


def processes(args, count: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={count}", str(Path(__file__)), "--worker",
                   "--out", folder] + forwarded(args)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        subprocess.run(command, env=env, check=True)
        times = json.loads(Path(folder, "times.json").read_text())
    return {"processes": count, "threads_per_process": args.threads, "times_s": times,
            "median_s": statistics.median(times),
            "images_per_s": args.images / statistics.median(times)}


def forwarded(args) -> list:
    listed = [
        "--model", args.model, "--images", str(args.images), "--batch-size", str(args.batch_size),
        "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads),
        "--autocast", args.autocast, "--seed", str(args.seed),
        "--num-workers", str(args.num_workers),
    ]
    return listed + (["--metrics", *args.metrics] if args.metrics else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-vit",
                        help="tiny-vit (the bundled model on generated shapes) or a timm "
                        "model name, built with random weights, on random images")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--autocast", choices=sorted(AUTOCAST), default="none",
                        help="run DAAM under torch.autocast with this dtype (GPU)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--metrics", nargs="*", default=[])
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    results = {
        "model": ("bundled tiny ViT (captum_daam.zoo.tiny_vit), 64x64, 6 blocks, flow stored"
                  if args.model == "tiny-vit" else
                  f"timm {args.model}, random weights, random images, flow stored"),
        "device": args.device, "autocast": args.autocast, "images": args.images,
        "batch_size": args.batch_size, "repeats": args.repeats, "threads": args.threads,
        "metrics": args.metrics, "torch": torch.__version__, "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "load_average_before": os.getloadavg(),
        "overhead": overhead(args),
        "processes": [processes(args, count) for count in args.processes],
        "load_average_after": os.getloadavg(),
    }
    name = f"dataset_{torch.device(args.device).type}"
    if args.model != "tiny-vit":
        name += f"_{args.model}"
    (HERE / "results" / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results" / f"{name}.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    o = results["overhead"]
    lines = [
        f"{results['model']}; {results['images']} images, batch {results['batch_size']}, "
        f"{results['device']}, autocast {results['autocast']}, {results['threads']} thread(s) "
        f"per process, medians of {results['repeats']} repeats, torch {results['torch']}; "
        f"load average {results['load_average_before'][0]:.2f} before, "
        f"{results['load_average_after'][0]:.2f} after",
        "",
        "| run | median (s) | images/s | store / plain (medians) | store / plain (paired) |",
        "|---|---|---|---|---|",
        f"| plain DAAM.attribute loop, 1 process | {o['plain_median_s']:.3f} | "
        f"{o['plain_images_per_s']:.0f} | 1.000 | 1.000 |",
        f"| explain_dataset, 1 process | {o['store_median_s']:.3f} | "
        f"{o['store_images_per_s']:.0f} | {o['ratio_of_medians']:.3f} | "
        f"{o['median_paired_ratio']:.3f} |",
    ]
    for run in results["processes"]:
        lines.append(f"| explain_dataset under torchrun, {run['processes']} process(es) | "
                     f"{run['median_s']:.3f} | {run['images_per_s']:.0f} | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
