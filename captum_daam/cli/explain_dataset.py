"""``captum-daam explain-dataset``: :func:`captum_daam.explain_dataset` from the command line.

Runnable also as a module, and so under torchrun::

    python -m captum_daam.cli explain-dataset --model tiny-vit --data shapes:200 \\
        --out maps.zarr --flow --metrics pointing_game
    torchrun --nproc_per_node=2 -m captum_daam.cli explain-dataset ...

torch is imported only when the command runs, not when the parser is built.
"""

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

from ._common import UsageError, _load_model, _one_line_warnings, _os_reason
from ._common import _device as _checked_device

__all__ = ["add_parser", "explain_dataset_command"]

_DTYPES = ("float16", "float32", "float64")
_METRICS = ("pointing_game", "energy_pointing_game", "deletion", "insertion")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``explain-dataset`` subcommand to ``subparsers`` (from ``add_subparsers``);
    it runs :func:`explain_dataset_command`."""
    parser = subparsers.add_parser(
        "explain-dataset",
        help="explain a whole dataset into a Zarr store (resumable; also under torchrun)",
        description="Explain every image of a dataset with DAAM and write the maps, targets, "
        "predictions, scores and per-example metrics into one Zarr v3 store. Re-running the "
        "same command resumes a run that stopped. Under torchrun each process explains its "
        "share. Needs zarr: pip install \"captum-daam[dataset]\".",
    )
    parser.add_argument(
        "--model", required=True,
        help="a timm model name (pretrained weights), a local checkpoint file, or tiny-vit "
        "(the bundled model)",
    )
    parser.add_argument("--arch", default=None,
                        help="timm architecture of a checkpoint given as --model "
                        "(default: the bundled one)")
    parser.add_argument(
        "--data", required=True,
        help="an image folder of class folders (ImageFolder, read with the model's timm data "
        "config); shapes:N[:SEED] (N generated shape images with masks); hf:NAME:SPLIT "
        "(datasets.load_dataset) or a folder written by datasets' save_to_disk",
    )
    parser.add_argument("--out", required=True, help="the Zarr store (a folder), e.g. maps.zarr")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per DAAM pass and per chunk of the store (default: 64)")
    parser.add_argument("--flow", action="store_true",
                        help="store every block's accumulated map, not only the final one")
    parser.add_argument("--target", default=None,
                        help="class to explain: an index, or 'label' for the dataset's labels "
                        "(default: the predicted class)")
    parser.add_argument("--dtype", choices=_DTYPES, default="float16",
                        help="dtype of the stored maps (default: float16)")
    parser.add_argument("--metrics", nargs="*", choices=_METRICS, default=[],
                        metavar="METRIC",
                        help=f"per-example metrics of the final map: {', '.join(_METRICS)} "
                        f"(the pointing games need masks: shapes:N data)")
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
    try:
        with _one_line_warnings():
            return _run(args)
    except (ValueError, TypeError, ImportError) as error:
        text = str(error).strip().splitlines()
        print(f"captum-daam: error: {text[0] if text else type(error).__name__}",
              file=sys.stderr)
        return 2
    except OSError as error:  # the file system: a full disk, a folder it may not write to
        import errno

        if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            remedy = "free some space"
        else:
            remedy = f"fix the cause{f' ({error.filename})' if error.filename else ''}"
        print(f"captum-daam: error: could not write the store {args.out}: {_os_reason(error)}; "
              f"the examples written so far are complete: {remedy} and run the same command "
              f"again to resume", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.num_workers < 0:
        raise UsageError(f"--num-workers must be 0 or more, got {args.num_workers}")
    if args.internal_batch_size is not None and args.internal_batch_size < 1:
        raise UsageError(f"--internal-batch-size must be at least 1, got "
                         f"{args.internal_batch_size}")
    target = _parse_target(args.target)
    data = _parse_data(args.data)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file, not a folder for a Zarr store")
    try:
        import zarr  # noqa: F401  (checked before the model is loaded)
    except ImportError as error:
        raise UsageError('explain-dataset needs zarr>=3: pip install "captum-daam[dataset]"') \
            from error

    from ..dataset import argument_settings, refuse_other_settings

    # an existing store of other settings is refused before the model and the data are loaded
    refuse_other_settings(args.out, argument_settings(
        args.batch_size, args.internal_batch_size, "predicted" if target is None else target,
        args.flow, args.dtype, args.metrics))

    import torch

    from ..attr import DAAM
    from ..dataset import explain_dataset

    device = _device(args.device)
    model = _load_model(args.model, args.arch, device)
    dataset = _build_dataset(data, model)
    explain_dataset(
        DAAM(model), dataset, args.out, batch_size=args.batch_size, target=target,
        return_flow=args.flow, dtype=getattr(torch, args.dtype), metrics=tuple(args.metrics),
        internal_batch_size=args.internal_batch_size, num_workers=args.num_workers,
        progress=args.progress,
    )
    return 0


def _parse_target(text: Optional[str]) -> Any:
    if text is None or text == "label":
        return text
    if not re.fullmatch(r"\d+", text):
        raise UsageError(f"--target expects a class index or 'label', got {text!r}")
    return int(text)


def _parse_data(text: str) -> tuple:
    """('shapes', n, seed), ('hf', name, split), ('hf-disk', path) or ('folder', path)."""
    if text.startswith("shapes:"):
        match = re.fullmatch(r"shapes:(\d+)(?::(\d+))?", text)
        if not match or int(match.group(1)) < 1:
            raise UsageError(f"--data shapes:N[:SEED] expects N >= 1, got {text!r}")
        return ("shapes", int(match.group(1)), int(match.group(2) or 0))
    if text.startswith("hf:"):
        parts = text.split(":")
        if len(parts) != 3 or not all(parts[1:]):
            raise UsageError(f"--data hf:NAME:SPLIT expects a dataset name and a split, got "
                             f"{text!r}")
        return ("hf", parts[1], parts[2])
    path = Path(text)
    if not path.is_dir():
        raise UsageError(f"--data {text} is not a folder (nor shapes:N or hf:NAME:SPLIT)")
    if (path / "dataset_dict.json").is_file():
        from ..data import load_hugging_face_folder

        try:
            load_hugging_face_folder(path)  # refuses a DatasetDict, naming its splits
        except ValueError as error:
            raise UsageError(f"--data: {error}") from None
    if (path / "dataset_info.json").is_file() and (path / "state.json").is_file():
        return ("hf-disk", str(path))
    return ("folder", str(path))


def _device(text: str) -> Any:
    """``--device`` checked as ``captum-daam explain`` checks it; under torchrun a bare
    ``cuda`` is the process's own GPU (LOCAL_RANK)."""
    import torch

    device = _checked_device(text)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def _build_dataset(data: tuple, model: Any) -> Any:
    kind = data[0]
    if kind == "shapes":
        from ..data import ShapesDataset

        return ShapesDataset(data[1], seed=data[2])
    if kind == "folder":
        return data[1]  # explain_dataset reads it as an ImageFolder with the timm transform
    try:
        import datasets
    except ImportError as error:
        raise UsageError('Hugging Face data needs the datasets package: pip install '
                         '"captum-daam[hf-datasets]"') from error
    if kind == "hf-disk":
        from ..data import load_hugging_face_folder

        return load_hugging_face_folder(data[1])
    try:
        return datasets.load_dataset(data[1], split=data[2])
    except Exception as error:  # offline, unknown name or split: many kinds of errors
        raise UsageError(f"could not load the Hugging Face dataset {data[1]} split {data[2]}: "
                         f"{str(error).strip().splitlines()[0][:160]}") from error
