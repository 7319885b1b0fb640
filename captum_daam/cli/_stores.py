"""What the commands that write a store (``explain-dataset``, ``compare``) share: their
``--data``, ``--target`` and ``--device``, the store folder's check, and one-line errors.
torch is imported only inside the functions."""

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from ._common import UsageError, _device, _one_line_warnings, _os_reason

__all__ = ["add_store_arguments", "build_dataset", "check_store_folder", "parse_data",
           "parse_target", "run_store_command", "store_device"]


def add_store_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """``--model``, ``--arch``, ``--data`` and ``--out``."""
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
    parser.add_argument("--out", required=True,
                        help=f"the Zarr store (a folder), e.g. {example}")


def run_store_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace
                      ) -> int:
    """``run(args)``; a usage error, or an error of the file system while writing the store
    (a full disk), is one line on stderr and exit status 2. Warnings are one line each."""
    try:
        with _one_line_warnings():
            return run(args)
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


def check_store_folder(out: str, command: str) -> None:
    """``--out`` may be a folder or absent, and zarr must be there, before the model loads."""
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is a file, not a folder for a Zarr store")
    try:
        import zarr  # noqa: F401  (checked before the model is loaded)
    except ImportError as error:
        raise UsageError(f'{command} needs zarr>=3: pip install "captum-daam[dataset]"') \
            from error


def parse_target(text: Optional[str]) -> Any:
    if text is None or text == "label":
        return text
    if not re.fullmatch(r"\d+", text):
        raise UsageError(f"--target expects a class index or 'label', got {text!r}")
    return int(text)


def parse_data(text: str) -> tuple:
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


def store_device(text: str) -> Any:
    """``--device`` checked as ``captum-daam explain`` checks it; under torchrun a bare
    ``cuda`` is the process's own GPU (LOCAL_RANK)."""
    import torch

    device = _device(text)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def build_dataset(data: tuple) -> Any:
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
