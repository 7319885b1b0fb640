"""``captum-daam explain-dataset``: :func:`captum_daam.explain_dataset` from the command line.

Runnable also as a module, and so under torchrun::

    python -m captum_daam.cli explain-dataset --model tiny-vit --data shapes:200 \\
        --out maps.zarr --flow --metrics pointing_game
    torchrun --nproc_per_node=2 -m captum_daam.cli explain-dataset ...

torch is imported only when the command runs, not when the parser is built.
"""

import argparse
from typing import Any

from .._names import METRICS
from ._common import UsageError, _load_model
from ._stores import (
    add_store_arguments, build_dataset, check_store_folder, parse_data, parse_target,
    run_store_command, store_device,
)

__all__ = ["add_parser", "explain_dataset_command"]

_DTYPES = ("float16", "float32", "float64")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``explain-dataset`` subcommand to ``subparsers`` (from ``add_subparsers``);
    it runs :func:`explain_dataset_command`."""
    parser = subparsers.add_parser(
        "explain-dataset",
        help="explain a whole dataset into a Zarr store (resumable; also under torchrun)",
        description="Explain every image of a dataset with DAAM and write the maps, targets, "
        "predictions, scores and per-example metrics into one Zarr v3 store. Re-running the "
        "same command resumes a run that stopped. Under torchrun each process explains its "
        "share. Look at the store with captum-daam view OUT. Needs zarr: pip install "
        "\"captum-daam[dataset]\".",
    )
    add_store_arguments(parser, "maps.zarr")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per DAAM pass and per chunk of the store (default: 64)")
    parser.add_argument("--flow", action="store_true",
                        help="store every block's accumulated map, not only the final one")
    parser.add_argument("--target", default=None,
                        help="class to explain: an index, or 'label' for the dataset's labels "
                        "(default: the predicted class)")
    parser.add_argument("--dtype", choices=_DTYPES, default="float16",
                        help="dtype of the stored maps (default: float16)")
    parser.add_argument("--metrics", nargs="*", choices=METRICS, default=[],
                        metavar="METRIC",
                        help=f"per-example metrics of the final map: {', '.join(METRICS)} "
                        f"(the pointing games and the segmentation scores need masks: "
                        f"shapes:N data). Other attributions than DAAM: captum-daam compare "
                        f"--methods NAME")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda (under torchrun, cuda means cuda:LOCAL_RANK)")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="DataLoader worker processes (default: 0)")
    parser.add_argument("--internal-batch-size", type=int, default=None,
                        help="explain each batch this many images at a time (memory)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar")
    parser.set_defaults(run=explain_dataset_command)
    return parser


def explain_dataset_command(args: argparse.Namespace) -> int:
    """Run ``explain-dataset``; a usage error, or an error of the file system while writing
    the store (a full disk), is one line on stderr and exit status 2. Warnings are one line
    each."""
    return run_store_command(_run, args)


def _run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be 0 or more, got {args.num_workers}")
    if args.internal_batch_size is not None and args.internal_batch_size < 1:
        raise UsageError(f"--internal-batch-size must be at least 1, got "
                         f"{args.internal_batch_size}")
    target = parse_target(args.target)
    data = parse_data(args.data)
    check_store_folder(args.out, "explain-dataset")

    from ..dataset import argument_settings, refuse_other_settings

    # an existing store of other settings is refused before the model and the data are loaded
    refuse_other_settings(args.out, argument_settings(
        args.batch_size, args.internal_batch_size, "predicted" if target is None else target,
        args.flow, args.dtype, args.metrics))

    import torch

    from ..attr import DAAM
    from ..dataset import explain_dataset

    device = store_device(args.device)
    model = _load_model(args.model, args.arch, device)
    dataset = build_dataset(data)
    explain_dataset(
        DAAM(model), dataset, args.out, batch_size=args.batch_size, target=target,
        return_flow=args.flow, dtype=getattr(torch, args.dtype), metrics=tuple(args.metrics),
        internal_batch_size=args.internal_batch_size, num_workers=args.num_workers,
        progress=args.progress,
    )
    return 0
