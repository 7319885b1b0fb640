"""DAAM's cost against its floor, measured in one run.

The floor is what any gradient-based explanation of every block must pay at least: one
forward pass and an activation-only backward pass (no weight gradients) down to the output of
the first attention module of the flow (block 1's, or CaiT's / XCiT's first class-attention
block's). DAAM computes every block's map (``return_flow=True``) from one such pass.

Times are medians over interleaved repeats (floor, DAAM, DAAM, floor, ...), so a slow spell
of a shared machine hits both; the ratio DAAM / floor is the figure to read. It is given three
ways: of the median wall times, the median of the ratios of neighbouring runs, and of the median
process CPU times (less sensitive to other tenants of a shared machine). Peak memory is
measured for each method in a fresh subprocess, on a second pass after a first: on CPU the peak
resident set size (VmHWM, reset before the pass, with glibc returning large blocks to the system
at once) above the size before the pass, on CUDA ``torch.cuda.max_memory_allocated`` above
the allocation before.

    python benchmarks/speed.py                       # deit_small_patch16_224, batch 8 and 32
    python benchmarks/speed.py --batch-sizes 8 --repeats 5 --device cuda
    python benchmarks/speed.py --models cait_xxs24_224 torchvision:vit_b_16 --batch-sizes 4
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import timm
import torch
from torch import Tensor, nn

from captum_daam import DAAM
from captum_daam.adapters import adapter_for
from peak_memory import MMAP_THRESHOLD, peak_above, reset_peak

METHODS = ("floor", "daam")


def floor_pass(model: nn.Module, images: Tensor) -> None:
    """Forward, then gradients of the predicted scores at the output of the first attention
    module of the flow only (one linear layer short of where DAAM's backward pass stops)."""
    adapter = adapter_for(model)
    captured: Dict[str, Tensor] = {}

    def keep_output(module: nn.Module, args: tuple, output) -> None:
        captured["output"] = output[0] if isinstance(output, tuple) else output

    handle = adapter.attention_modules()[0].register_forward_hook(keep_output)
    try:
        with torch.enable_grad():
            logits = adapter.output_scores(model(images))
            score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
            torch.autograd.grad(score, captured["output"])
    finally:
        handle.remove()


def daam_pass(model: nn.Module, images: Tensor) -> None:
    DAAM(model).attribute(images, target=None, return_flow=True)


PASSES: Dict[str, Callable[[nn.Module, Tensor], None]] = {"floor": floor_pass, "daam": daam_pass}


def build(model_name: str, batch_size: int, device: str):
    """A model with random weights and a batch of images of its input size.

    ``model_name`` is a timm name, ``torchvision:<name>`` (e.g. torchvision:vit_b_16) or
    ``hf:vit-base`` (transformers' default ViTConfig, google/vit-base-patch16-224's shape).
    """
    torch.manual_seed(0)
    if model_name.startswith("torchvision:"):
        import torchvision

        model = torchvision.models.get_model(model_name.split(":", 1)[1], weights=None)
        size = (model.image_size, model.image_size)
    elif model_name == "hf:vit-base":
        import transformers

        config = transformers.ViTConfig(attn_implementation="sdpa")
        model = transformers.ViTForImageClassification(config)
        size = (config.image_size, config.image_size)
    else:
        model = timm.create_model(model_name, pretrained=False)
        size = tuple(model.pretrained_cfg["input_size"][1:])
    model = model.eval().to(device)
    return model, torch.rand(batch_size, 3, *size, device=device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(model_name: str, batch_size: int, device: str, repeats: int, warmup: int):
    model, images = build(model_name, batch_size, device)
    for _ in range(warmup):
        for method in METHODS:
            PASSES[method](model, images)
    seconds: Dict[str, List[float]] = {method: [] for method in METHODS}
    cpu_seconds: Dict[str, List[float]] = {method: [] for method in METHODS}
    for repeat in range(repeats):
        order = METHODS if repeat % 2 == 0 else METHODS[::-1]
        for method in order:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            PASSES[method](model, images)
            synchronize(device)
            seconds[method].append(time.perf_counter() - start)
            cpu_seconds[method].append(time.process_time() - start_cpu)
    return seconds, cpu_seconds


def peak_memory_here(model_name: str, batch_size: int, device: str, method: str) -> int:
    """Peak memory of one pass above what was held before it (run in a fresh process)."""
    model, images = build(model_name, batch_size, device)
    if device.startswith("cuda"):
        PASSES[method](model, images)  # let kernels and workspaces load first
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        PASSES[method](model, images)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    PASSES[method](model, images)  # let thread pools and one-time buffers settle first
    before = reset_peak()
    PASSES[method](model, images)
    return peak_above(before)


def peak_memory(model_name: str, batch_size: int, device: str, method: str, threads: int) -> int:
    command = [
        sys.executable, __file__, "--models", model_name, "--device", device,
        "--threads", str(threads), "--_memory-of", method, "--batch-sizes", str(batch_size),
    ]
    # Large blocks straight from mmap, so that freed tensors leave the resident set at once.
    environment = dict(os.environ, **MMAP_THRESHOLD)
    result = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
    return int(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["deit_small_patch16_224"],
        help="timm model names, torchvision:<name> (e.g. torchvision:vit_b_16) or hf:vit-base",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=11, help="timed repeats per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes per method first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--_memory-of", dest="memory_of", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.memory_of:
        print(peak_memory_here(args.models[0], args.batch_sizes[0], args.device, args.memory_of))
        return

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{device_name}, {args.threads} threads, torch {torch.__version__}, "
          f"{args.repeats} repeats")
    header = ("| model | batch | floor median (s) | DAAM median (s) | time DAAM / floor | "
              "paired runs DAAM / floor | CPU time DAAM / floor | floor peak (MiB) | "
              "DAAM peak (MiB) | memory DAAM / floor |")
    print(header)
    print("|" + "---|" * 10)
    rows = []
    for model_name, batch_size in ((m, b) for m in args.models for b in args.batch_sizes):
        seconds, cpu_seconds = time_methods(
            model_name, batch_size, args.device, args.repeats, args.warmup
        )
        medians = {method: statistics.median(seconds[method]) for method in METHODS}
        cpu_medians = {method: statistics.median(cpu_seconds[method]) for method in METHODS}
        peaks = {
            method: peak_memory(model_name, batch_size, args.device, method, args.threads)
            for method in METHODS
        }
        row = {
            "model": model_name,
            "batch_size": batch_size,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "median_seconds": medians,
            "median_cpu_seconds": cpu_medians,
            "cpu_time_ratio": cpu_medians["daam"] / cpu_medians["floor"],
            "time_ratio": medians["daam"] / medians["floor"],
            "paired_time_ratio": statistics.median(
                daam / floor for daam, floor in zip(seconds["daam"], seconds["floor"])
            ),
            "peak_bytes": peaks,
            "memory_ratio": peaks["daam"] / peaks["floor"],
        }
        rows.append(row)
        mib = {method: peaks[method] / 2**20 for method in METHODS}
        print(f"| {model_name} | {batch_size} | {medians['floor']:.3f} | {medians['daam']:.3f} | "
              f"{row['time_ratio']:.3f} | {row['paired_time_ratio']:.3f} | "
              f"{row['cpu_time_ratio']:.3f} | "
              f"{mib['floor']:.0f} | {mib['daam']:.0f} | "
              f"{row['memory_ratio']:.3f} |", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name, "threads": args.threads,
                       "torch": torch.__version__, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
