"""What several ``captum-daam`` commands share: the one-line errors (:class:`UsageError`,
:class:`Terminated`), SIGINT and SIGTERM held back while files are put in place, writing
outputs all or none, the output folder, ``--device``, the model of ``--model``, one-line
warnings and the argument parser's one-line errors.

Only the standard library is imported here; torch, timm and matplotlib are imported inside
the functions that need them, so that ``--help`` and ``--version`` answer without them.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import tempfile
import threading
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

BUNDLED_MODEL = "tiny-vit"
PARTIAL_PREFIX = ".partial-"  # temporary files in the output folder, never left behind
SCALINGS = ("paper", "shared", "per_map")  # --scaling of the flow images


class UsageError(ValueError):
    """Bad input from the command line: reported in one line, exit status 2."""


class Terminated(BaseException):
    """SIGTERM as an exception, as KeyboardInterrupt is SIGINT's, so that clean-ups run."""


# ----------------------------------------------------------------- signals


class _Signals:
    """SIGINT and SIGTERM raised as exceptions while a command runs, and held back while the
    files of one image are put in place (:meth:`held`), so they appear all or none."""

    def __init__(self) -> None:
        self.holding = 0
        self.pending: Optional[int] = None

    def handle(self, signum: int, frame: object) -> None:
        if self.holding:
            self.pending = self.pending or signum
            return
        raise _signal_exception(signum)

    @contextmanager
    def held(self) -> Iterator[None]:
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
            if not self.holding and self.pending is not None:
                signum, self.pending = self.pending, None
                raise _signal_exception(signum)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Our handlers for the duration of the block; the previous ones afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread may set handlers; it also gets the signals
            return
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue  # whoever started us asked for it to be ignored (nohup, a shell's &)
            previous[signum] = signal.signal(signum, self.handle)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)
            self.pending = None


def _signal_exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


_SIGNALS = _Signals()


# ----------------------------------------------------------------- writing files


def _write_together(outputs: Sequence[Tuple[Path, Callable[[Path], object]]]) -> None:
    """Write each ``(path, write)`` to a temporary file in its folder, then move them all into
    place in the order given, with SIGINT and SIGTERM held back. An error or a signal leaves
    no temporary file, and a file never appears without those listed before it."""
    temporaries: List[Path] = []
    try:
        for path, write in outputs:
            with _SIGNALS.held():  # a temporary file is listed as soon as it exists
                handle, name = tempfile.mkstemp(
                    dir=path.parent, prefix=PARTIAL_PREFIX, suffix=path.suffix
                )
                os.close(handle)
                temporaries.append(Path(name))
            write(temporaries[-1])
            os.chmod(temporaries[-1], 0o666 & ~_umask())  # mkstemp makes files private
        with _SIGNALS.held():
            for (path, _), temporary in zip(outputs, temporaries):
                os.replace(temporary, path)
    except BaseException:
        with _SIGNALS.held():
            for temporary in temporaries:
                temporary.unlink(missing_ok=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _write_outputs(
    out: Path, stem: str, image: Tensor, flow: Tensor, block_numbers: List[int],
    scaling: str, raw: Optional[dict] = None,
) -> List[Path]:
    """One image's flow PNG and GIF (and raw ``.npz``), all or none; the PNG is put in place
    last, so a PNG is never without its GIF."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np

    from ..visualization import flow_figure, save_flow_animation

    figure_path, gif_path, raw_path = (
        out / f"{stem}_flow.png", out / f"{stem}_flow.gif", out / f"{stem}_daam.npz"
    )
    figure = flow_figure(image, flow, scaling=scaling, block_numbers=block_numbers)

    def save_raw(path: Path) -> None:
        with open(path, "wb") as handle:
            np.savez(handle, **raw)

    outputs = [(raw_path, save_raw)] if raw is not None else []
    outputs.append((gif_path, lambda path: save_flow_animation(
        image, flow, path, scaling=scaling, block_numbers=block_numbers)))
    outputs.append((figure_path, lambda path: figure.savefig(
        path, dpi=110, bbox_inches="tight", format="png")))
    try:
        _write_together(outputs)
    except OSError as error:
        full = error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        remedy = "free some space" if full else "check the folder"
        raise UsageError(
            f"could not write {figure_path.name} and {gif_path.name} to --out {out}: "
            f"{_os_reason(error)}; expected a folder that takes them: {remedy} or choose "
            f"another --out"
        ) from error
    return [figure_path, gif_path] + ([raw_path] if raw is not None else [])


def _page_entry(name: str, picture: Any, flow: Any, target: int, score: Any, what: str,
                block_numbers: List[int]) -> dict:
    """One explained image as the viewer's page takes it (captum_daam.viewer.FlowData)."""
    return {"name": f"{name}: {what}", "image": picture.cpu(), "flow": flow.cpu(),
            "target": target, "score": float(score), "label": what,
            "block_numbers": block_numbers}


def _finish_page(out: Path, shown: Sequence[dict], title: str) -> Path:
    """index.html beside the PNGs and GIFs: every explained image in the viewer's example
    view (block slider, play button, scalings), one self-contained file, written whole or
    not at all once every image is explained."""
    from ..viewer import flow_page

    path = out / "index.html"
    page = flow_page(shown, title)
    try:
        _write_together([(path, lambda temporary: temporary.write_text(page, encoding="utf-8"))])
    except OSError as error:
        raise UsageError(f"could not write {path.name} to --out {out}: "
                         f"{_os_reason(error)}; choose another --out") from error
    print(f"  the flows, interactively: {path}", flush=True)
    return path


def _os_reason(error: OSError) -> str:
    if error.errno in errno.errorcode:
        return f"{error.strerror or os.strerror(error.errno)} ({errno.errorcode[error.errno]})"
    return _first_line(error)


def _prepare_out(text: str) -> Tuple[Path, List[Path]]:
    """The output folder, created if need be and checked writable; and the folders created,
    outermost first, so that a run that fails before writing can remove them again."""
    out = Path(text)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {text} is a file; expected a folder (existing or to be created)")
    created = [folder for folder in (out, *out.parents) if not folder.exists()][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _remove_if_empty(created)
        raise UsageError(
            f"--out {text}: cannot create the folder ({_os_reason(error)}); expected a folder "
            f"that exists or can be created"
        ) from error
    try:
        _check_writable(out)
    except UsageError:
        _remove_if_empty(created)
        raise
    return out, created


def _check_writable(out: Path) -> None:
    """Whether files can be written in ``out``: the permission bits, then (as they do not stop
    root, nor say anything of a read-only or full file system) one temporary file."""
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(
            f"--out {out}: this user may not write in that folder; expected a folder you can "
            f"write to"
        )
    try:
        handle, probe = tempfile.mkstemp(dir=out, prefix=f"{PARTIAL_PREFIX}probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UsageError(
            f"--out {out}: cannot write in that folder ({_os_reason(error)}); expected a "
            f"folder you can write to"
        ) from error


def _remove_if_empty(created: Sequence[Path]) -> None:
    for folder in reversed(created):  # innermost first
        try:
            folder.rmdir()
        except OSError:  # not empty (outputs were written), or gone: keep the rest
            return


def _unique_stems(paths: Sequence[str]) -> List[str]:
    """One output name stem per image: the file's stem, or, for a later image with the stem
    of an earlier one, ``stem_1``, ``stem_2``, ... skipping every name another image has or
    was given. Names are compared as a case-insensitive file system compares them
    (case-folded, Unicode-normalised), so no output can overwrite another there either."""

    def key(stem: str) -> str:
        return unicodedata.normalize("NFC", stem).casefold()

    stems = [Path(path).stem for path in paths]
    unavailable = {key(stem) for stem in stems}  # a new name must not be any image's own
    given, names = set(), []
    for stem in stems:
        name, number = stem, 0
        while key(name) in given or (number and key(name) in unavailable):
            number += 1
            name = f"{stem}_{number}"
        given.add(key(name))
        unavailable.add(key(name))
        names.append(name)
    return names


# ----------------------------------------------------------------- device and model


def _device(text: str) -> torch.device:
    """``--device`` parsed by torch and checked available, before anything is loaded."""
    import torch

    expected = "expected cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError) as error:
        raise UsageError(f"--device {text!r} is not a device torch knows; {expected}") from error
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {text}: no CUDA device is available here (torch.cuda.is_available() "
                f"is False); use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(
                f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}"
            )
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {text}: no Apple MPS device is available here; use cpu")
        return device
    raise UsageError(f"--device {text}: captum-daam does not run on {device.type!r}; {expected}")


def _load_model(name: str, architecture: Optional[str], device: torch.device) -> nn.Module:
    """The bundled model, a local checkpoint, or a timm model name with pretrained weights."""
    import timm

    from .._weights import CHECKPOINT_SUFFIXES, fit_checkpoint, pretrained_model, read_checkpoint
    from ..zoo import tiny_vit

    path = Path(name)
    if name == BUNDLED_MODEL:
        model = tiny_vit()
    elif path.suffix in CHECKPOINT_SUFFIXES or path.exists():
        if path.is_dir():
            raise UsageError(
                f"checkpoint {name} is a folder; expected a checkpoint file "
                f"({', '.join(CHECKPOINT_SUFFIXES)})"
            )
        if not path.is_file():
            raise UsageError(f"checkpoint {name} does not exist")
        arch = architecture or BUNDLED_MODEL
        if arch == BUNDLED_MODEL:
            model = tiny_vit(pretrained=False)
        elif not timm.is_model(arch):
            raise UsageError(
                f"unknown timm model {arch!r} for --arch; expected a timm architecture name "
                f"such as deit_small_patch16_224 (see timm.list_models())"
            )
        else:
            model = timm.create_model(arch, pretrained=False)
        try:
            if path.suffix == ".npz":  # JAX/Flax weights: timm's model-specific loader
                timm.models.load_checkpoint(model, str(path), strict=True)
            else:
                fit_checkpoint(model, read_checkpoint(path), path, arch)
        except ValueError as error:
            raise UsageError(str(error)) from error
        except Exception as error:  # timm's .npz loader fails in many ways
            raise UsageError(
                f"checkpoint {name} does not fit the {arch} architecture: {_first_line(error)}"
            ) from error
    else:
        if name not in timm.list_models(pretrained=True) and name not in timm.list_models():
            raise UsageError(
                f"unknown model {name!r}: give a timm model name (e.g. deit_small_patch16_224), "
                f"a checkpoint file, or {BUNDLED_MODEL}"
            )
        try:
            model = pretrained_model(name)
        except ValueError as error:
            raise UsageError(str(error)) from error
    return model.eval().to(device)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


# ----------------------------------------------------------------- messages and arguments


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Python's warnings as ``captum-daam: warning: ...`` lines (not file, line and source)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
        print(f"captum-daam: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the command's one-line form (and exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"captum-daam: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value
