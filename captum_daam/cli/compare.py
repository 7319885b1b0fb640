"""``captum-daam compare``: :func:`captum_daam.compare` from the command line.

Runnable also as a module, and so under torchrun::

    captum-daam compare --model tiny-vit --data shapes:500 --out compare.zarr \\
        --methods daam,gradient-rollout,rollout,random --metrics pointing_game deletion
    torchrun --nproc_per_node=2 -m captum_daam.cli compare ...

torch is imported only when the command runs, not when the parser is built.
"""

import argparse
from typing import Any, List

from .._names import METHOD_NAMES, METRICS
from ._common import UsageError, _load_model
from ._stores import (
    add_store_arguments, build_dataset, check_store_folder, parse_data, parse_target,
    run_store_command, store_device,
)

__all__ = ["add_parser", "compare_command"]

_DTYPES = ("float16", "float32", "float64")
_DEFAULT_METHODS = "daam,gradient-rollout,rollout,gradcam,integrated-gradients,saliency," \
                   "occlusion,random"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to ``subparsers``; it runs :func:`compare_command`."""
    parser = subparsers.add_parser(
        "compare",
        help="compare DAAM with other attributions on a dataset (one store, a table with "
        "confidence intervals; resumable, also under torchrun)",
        description="Explain every image of a dataset with several attributions, for the same "
        "targets, evaluate each with the same metrics, and write one Zarr v3 store (one group "
        "per method) and its report in OUT/report: compare.md and compare.csv (each metric's "
        "mean with a 95% bootstrap interval, the paired difference from DAAM, a random row "
        "as the chance level, seconds per image), curves.png and flow.png. Re-running the "
        "same command resumes a run that stopped; captum-daam view OUT shows every example "
        "with every method. Needs zarr: pip install "
        "\"captum-daam[dataset]\".",
    )
    add_store_arguments(parser, "compare.zarr")
    parser.add_argument("--methods", default=_DEFAULT_METHODS,
                        help=f"comma-separated, from {','.join(METHOD_NAMES)} (default: "
                        f"{_DEFAULT_METHODS}; those that refuse the model are left out with a "
                        f"warning)")
    parser.add_argument("--metrics", nargs="*", choices=METRICS,
                        default=["deletion", "insertion"], metavar="METRIC",
                        help=f"per-example metrics of each final map: {', '.join(METRICS)} "
                        f"(pointing games and segmentation need masks: shapes:N data; "
                        f"default: deletion insertion)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per pass and per chunk of the store (default: 64)")
    parser.add_argument("--target", default=None,
                        help="class to explain: an index, or 'label' for the dataset's labels "
                        "(default: the predicted class)")
    parser.add_argument("--dtype", choices=_DTYPES, default="float16",
                        help="dtype of the stored maps (default: float16)")
    parser.add_argument("--no-flow", dest="flow", action="store_false",
                        help="store DAAM's final map only, not its whole flow")
    parser.add_argument("--resamples", type=int, default=10_000,
                        help="bootstrap resamples of the report (default: 10000)")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda (under torchrun, cuda means cuda:LOCAL_RANK)")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="DataLoader worker processes (default: 0)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar")
    parser.set_defaults(run=compare_command)
    return parser


def compare_command(args: argparse.Namespace) -> int:
    """Run ``compare``; errors are one line on stderr and exit status 2."""
    return run_store_command(_run, args)


def _methods(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHOD_NAMES]
    if not names or unknown:
        raise UsageError(f"--methods expects comma-separated names from "
                         f"{','.join(METHOD_NAMES)}, got {text!r}")
    if len(set(names)) != len(names):
        raise UsageError(f"--methods names each method once, got {text!r}")
    return names


def _run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be 0 or more, got {args.num_workers}")
    if args.resamples < 1:
        raise UsageError(f"--resamples must be at least 1, got {args.resamples}")
    methods = _methods(args.methods)
    target = parse_target(args.target)
    data = parse_data(args.data)
    check_store_folder(args.out, "compare")

    import torch

    from ..comparison import DEFAULT_METHODS, compare

    device = store_device(args.device)
    model = _load_model(args.model, args.arch, device)
    compare(
        model, build_dataset(data),
        DEFAULT_METHODS if methods == list(DEFAULT_METHODS) else methods,
        metrics=tuple(args.metrics), out=args.out, batch_size=args.batch_size, target=target,
        dtype=getattr(torch, args.dtype), return_flow=args.flow, num_workers=args.num_workers,
        progress=args.progress, resamples=args.resamples,
    )
    return 0
