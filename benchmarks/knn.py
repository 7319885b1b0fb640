"""The memory bank at ImageNet scale: k-NN over 1.28 M x 384 features within a memory budget.

A random bank of ImageNet's training-set size (L2-normalised, 1,000 labels) and a batch of
queries. For each memory budget: the time of ``bank.importance`` (k = 20) and its peak memory
above what was held before (VmHWM, reset before each call, with glibc returning large blocks to
the system at once). The baseline, in the same run, is the plain product of the queries with the
whole bank: the (B, M) similarity matrix the chunks avoid.

    python benchmarks/knn.py                      # batch 32, budgets 256 MiB and 32 MiB
"""

import argparse
import os
import statistics
import sys
import time

import torch

from captum_daam import MemoryBank
from peak_memory import MMAP_THRESHOLD, peak_above, reset_peak


def measure(run, repeats: int):
    run()  # warm up
    seconds = []
    before = reset_peak()
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), peak_above(before)


def main(argv=None) -> None:
    if not MMAP_THRESHOLD.items() <= os.environ.items():  # see peak_memory's docstring
        os.environ.update(MMAP_THRESHOLD)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_281_167)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--budgets-mib", type=int, nargs="+", default=[256, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(args.entries, args.dim, generator=generator)
    labels = torch.randint(0, 1000, (args.entries,), generator=generator)
    queries = torch.randn(args.batch, args.dim, generator=generator)
    bank = MemoryBank(features, labels)
    del features
    normalised = torch.nn.functional.normalize(queries, dim=1)

    baseline_seconds, baseline_peak = measure(lambda: normalised @ bank.features.T, args.repeats)
    print(f"bank {args.entries:,} x {args.dim} float32 ({bank.features.numel() * 4 / 2**30:.2f} "
          f"GiB), {args.batch} queries, k = 20, {args.threads} threads")
    print("| method | median time (s) | time / plain product | peak above start (MiB) |")
    print("|---|---|---|---|")
    print(f"| plain (B, M) similarity product | {baseline_seconds:.3f} | 1.00 | "
          f"{baseline_peak / 2**20:.0f} |")
    for budget in args.budgets_mib:
        bank.memory_budget = budget * 2**20
        seconds, peak = measure(lambda: bank.importance(queries, k=20), args.repeats)
        print(f"| importance, budget {budget} MiB | {seconds:.3f} | "
              f"{seconds / baseline_seconds:.2f} | {peak / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    main()
