"""The ``captum-daam`` command: ``demo``, ``explain``, ``check`` and ``explain-dataset``
(in ``_dataset_cli``).

torch, timm and matplotlib are imported inside the commands, so that ``--help`` and
``--version`` answer without loading them.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import re
import signal
import sys
import tempfile
import threading
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, List, Optional, Sequence, Tuple

from . import __version__

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

SHADES = " .:-=+*#%@"
BUNDLED_MODEL = "tiny-vit"
PARTIAL_PREFIX = ".partial-"  # temporary files in the output folder, never left behind
BUNDLED_MODEL_NOTE = (
    "captum-daam: note: the bundled tiny-vit model only knows the five synthetic shapes of "
    "captum_daam.data ({classes}), so its explanation of a photograph or any other image is "
    "not meaningful; for real images use a timm model, e.g. --model deit_small_patch16_224"
)


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

    from .visualization import flow_figure, save_flow_animation

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


# ----------------------------------------------------------------- demo


def demo(args: argparse.Namespace) -> int:
    """Explain a few generated shape images with the bundled tiny ViT: flow PNGs and GIFs."""
    import torch

    from . import DAAM
    from .data import CLASSES, make_shapes
    from .zoo import tiny_vit

    out, created = _prepare_out(args.out)
    try:
        model = tiny_vit()
        images, labels, _ = make_shapes(args.images, seed=args.seed)
        with torch.no_grad():
            probabilities = model(images).softmax(1)
        predicted = probabilities.argmax(1)
        flow = DAAM(model).attribute(images, target=predicted, return_flow=True)
        block_numbers = list(range(1, flow.shape[1] + 1))
        print(f"captum-daam demo: the bundled tiny ViT ({len(block_numbers)} blocks) on "
              f"{args.images} generated images (seed {args.seed}); writing to {out}/")
        for index in range(args.images):
            written = _write_outputs(out, f"shapes_{index}", images[index], flow[index],
                                     block_numbers, args.scaling)
            print(f"  image {index}: true {CLASSES[int(labels[index, 0])]}, predicted "
                  f"{CLASSES[int(predicted[index])]} "
                  f"(p = {float(probabilities[index].max()):.2f}); "
                  f"wrote {', '.join(str(path) for path in written)}", flush=True)
    except BaseException:
        _remove_if_empty(created)
        raise
    return 0


# ----------------------------------------------------------------- explain


def _describe_blocks(numbers: Sequence[int]) -> str:
    """Sorted block numbers as --blocks takes them: runs as ranges, 1-3,5 or 9-12 or 3,6,9."""
    runs: List[List[int]] = []
    for number in numbers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def _parse_blocks(text: Optional[str], depth: int) -> List[int]:
    """'1-12', '9-12' or '1,4,8' (1-based, inclusive) to sorted block numbers."""
    if text is None:
        return list(range(1, depth + 1))
    numbers = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UsageError(f"--blocks expects ranges like 1-12 or 3,6,9; got {text!r}")
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if first > last:
            raise UsageError(f"--blocks range {part.strip()} runs backwards")
        numbers.update(range(first, last + 1))
    outside = sorted(number for number in numbers if not 1 <= number <= depth)
    if outside:
        raise UsageError(f"--blocks {text}: this model has blocks 1-{depth}, got {outside[0]}")
    return sorted(numbers)


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


def _check_image_file(path: str) -> None:
    """Before any model is loaded: the image exists, is a file, and its header is readable."""
    from ._images import check_image

    if os.path.isdir(path):
        raise UsageError(f"image {path} is a folder, expected an image file")
    if not os.path.isfile(path):
        raise UsageError(f"image {path} does not exist")
    try:
        check_image(path)
    except ValueError as error:
        raise UsageError(str(error)) from error


def _load_model(name: str, architecture: Optional[str], device: torch.device) -> nn.Module:
    """The bundled model, a local checkpoint, or a timm model name with pretrained weights."""
    import timm

    from ._weights import CHECKPOINT_SUFFIXES, fit_checkpoint, pretrained_model, read_checkpoint
    from .zoo import tiny_vit

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


def _class_names(shapes_model: bool, num_classes: int) -> Callable[[int], str]:
    from .data import CLASSES

    if shapes_model:
        return lambda index: CLASSES[index]
    if num_classes in (1000, 1001):
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return lambda index: f"{index} ({info.index_to_description(index).split(',')[0]})"
    return str


def explain(args: argparse.Namespace) -> int:
    """Explain image files with a timm model, a local checkpoint, the bundled model, a local
    transformers model folder or an open_clip model; with --text and an image-text model,
    why each image matches each text."""
    device = _device(args.device)
    for image_path in args.images:
        _check_image_file(image_path)
    out, created = _prepare_out(args.out)
    try:
        return _explain(args, device, out)
    except BaseException:
        _remove_if_empty(created)
        raise


def _explain(args: argparse.Namespace, device: torch.device, out: Path) -> int:
    from ._hub import is_open_clip_name, is_transformers_folder

    if args.text or is_transformers_folder(args.model) or is_open_clip_name(args.model):
        return _explain_with_ecosystem_model(args, device, out)
    import torch
    from timm.data import resolve_data_config
    from torchvision.transforms.functional import normalize
    from tqdm.auto import tqdm

    from . import DAAM
    from ._images import load_rgb, timm_preprocessing
    from .data import CLASSES

    model = _load_model(args.model, args.arch, device)
    adapter, attention_modules, block_numbers = _adapter_and_blocks(model, args)
    num_classes = adapter.num_outputs

    config = resolve_data_config({}, model=model)
    display_transform = timm_preprocessing(model, normalize=False)
    pictures = []
    for image_path in args.images:
        try:
            rgb = load_rgb(image_path)
        except ValueError as error:
            raise UsageError(str(error)) from error
        pictures.append(display_transform(rgb))

    daam = DAAM(model, layer=[attention_modules[number - 1] for number in block_numbers])
    shapes_model = args.model == BUNDLED_MODEL or (
        Path(args.model).is_file() and args.arch in (None, BUNDLED_MODEL)
    )
    names = _class_names(shapes_model, num_classes)
    print(f"captum-daam explain: {args.model}, blocks {_describe_blocks(block_numbers)} "
          f"({len(block_numbers)} maps), writing to {out}/", flush=True)
    if args.model == BUNDLED_MODEL:
        # On stdout, with the report: stderr carries only the one line of an error.
        print(BUNDLED_MODEL_NOTE.format(classes=", ".join(CLASSES)), flush=True)
    stems = _unique_stems(args.images)
    for image_path, picture, stem in tqdm(
        list(zip(args.images, pictures, stems)), desc="images", disable=not args.progress
    ):
        picture = picture.to(device)
        model_input = normalize(picture, config["mean"], config["std"]).unsqueeze(0)
        with torch.no_grad():
            probabilities = model(model_input).softmax(1)[0]
        target = int(probabilities.argmax()) if args.target is None else args.target
        flow = daam.attribute(model_input, target=target, return_flow=True)[0]
        raw = None
        if args.save_raw:
            raw = {"flow": flow.cpu().numpy(), "block_numbers": block_numbers, "target": target}
        written = _write_outputs(out, stem, picture.cpu(), flow.cpu(), block_numbers,
                                 args.scaling, raw)
        tqdm.write(f"  {image_path}: explained class {names(target)} (p = "
                   f"{float(probabilities[target]):.2f}); wrote "
                   f"{', '.join(str(path) for path in written)}")
        sys.stdout.flush()
    return 0


def _adapter_and_blocks(model: nn.Module, args: argparse.Namespace) -> Tuple[Any, list, List[int]]:
    """The model's adapter, its attention modules and the block numbers of ``--blocks``, with
    ``--target`` checked against the model's classes: one-line errors."""
    from .adapters import adapter_for

    try:
        adapter = adapter_for(model)
    except TypeError as error:
        raise UsageError(str(error).split(". ")[0]) from error
    attention_modules = adapter.attention_modules()
    block_numbers = _parse_blocks(args.blocks, len(attention_modules))
    num_classes = adapter.num_outputs
    if args.target is not None and not 0 <= args.target < num_classes:
        raise UsageError(f"--target {args.target}: this model has classes 0-{num_classes - 1}")
    return adapter, attention_modules, block_numbers


def _text_stem(stem: str, index: int, text: str) -> str:
    """The output name of one image's flow for one text: ``stem_t1-a-photo-of-a-dog``."""
    slug = re.sub(r"[^0-9A-Za-z]+", "-", text).strip("-").lower()[:40]
    return f"{stem}_t{index + 1}" + (f"-{slug}" if slug else "")


def _explain_with_ecosystem_model(
    args: argparse.Namespace, device: torch.device, out: Path
) -> int:
    """``explain`` with a transformers model folder (or, with --text, a Hub name) or an
    open_clip model: the model's own preprocessing; with --text, one flow per text, the
    explained score the image's logit for that text (ImageTextSimilarity)."""
    import torch
    from tqdm.auto import tqdm

    from . import DAAM, ImageTextSimilarity
    from ._hub import (
        is_open_clip_name,
        is_transformers_folder,
        load_open_clip,
        load_transformers,
        text_probabilities,
    )
    from ._images import load_rgb

    if args.text and args.target is not None:
        raise UsageError("--target and --text: give one; with --text each text is explained")
    if args.arch is not None:
        raise UsageError("--arch names the timm architecture of a checkpoint file; "
                         f"{args.model} brings its own")
    if any(not text.strip() for text in args.text or []):
        raise UsageError("--text: expected a non-empty text")
    try:
        if is_open_clip_name(args.model):
            loaded = load_open_clip(args.model)
        else:
            local = is_transformers_folder(args.model) or bool(os.environ.get("HF_HUB_OFFLINE"))
            loaded = load_transformers(args.model, local_only=local)
    except ValueError as error:
        raise UsageError(str(error)) from error
    model = loaded.model.eval().to(device)
    forward: Any = model
    if loaded.image_text and not args.text:
        raise UsageError(
            f"{args.model} is an image-text model: give the texts to explain, --text TEXT "
            f"(one flow per text)"
        )
    if args.text:
        if not loaded.image_text or loaded.tokenizer is None:
            raise UsageError(
                f"--text needs an image-text model with its tokenizer (CLIP, SigLIP, ...); "
                f"{args.model} has none"
            )
        try:
            forward = ImageTextSimilarity(
                model, texts=list(args.text), tokenizer=loaded.tokenizer
            ).to(device)
        except (TypeError, ValueError) as error:
            raise UsageError(_first_line(error)) from error
    adapter, attention_modules, block_numbers = _adapter_and_blocks(model, args)
    labels = getattr(getattr(model, "config", None), "id2label", None) or {}
    daam = DAAM(
        forward, layer=[attention_modules[number - 1] for number in block_numbers],
        adapter=adapter,
    )
    print(f"captum-daam explain: {args.model}, blocks {_describe_blocks(block_numbers)} "
          f"({len(block_numbers)} maps), writing to {out}/", flush=True)
    stems = _unique_stems(args.images)
    for image_path, stem in tqdm(
        list(zip(args.images, stems)), desc="images", disable=not args.progress
    ):
        try:
            model_input, picture = loaded.preprocess(load_rgb(image_path))
        except ValueError as error:
            raise UsageError(str(error)) from error
        model_input = model_input.unsqueeze(0).to(device)
        with torch.no_grad():
            scores = forward(model_input)
        if args.text:
            probabilities = text_probabilities(scores[0], loaded.text_probabilities)
            explained = [
                (index, _text_stem(stem, index, text), f"text {text!r}")
                for index, text in enumerate(args.text)
            ]
        else:
            probabilities = adapter.output_scores(scores)[0].softmax(-1)
            target = int(probabilities.argmax()) if args.target is None else args.target
            explained = [(target, stem, f"class {labels.get(target, target)}")]
        for target, name, what in explained:
            flow = daam.attribute(model_input, target=target, return_flow=True)[0]
            raw = None
            if args.save_raw:
                raw = {"flow": flow.cpu().numpy(), "block_numbers": block_numbers,
                       "target": target}
            written = _write_outputs(out, name, picture.cpu(), flow.cpu(), block_numbers,
                                     args.scaling, raw)
            tqdm.write(f"  {image_path}: explained {what} (p = "
                       f"{float(probabilities[target]):.2f}); wrote "
                       f"{', '.join(str(path) for path in written)}")
        sys.stdout.flush()
    return 0


# ----------------------------------------------------------------- check


def _ascii_map(grid: Tensor) -> str:
    """A (gh, gw) map as characters, darkest to brightest, scaled to its own range."""
    low, high = grid.min(), grid.max()
    scaled = (grid - low) / (high - low).clamp_min(1e-12)
    indices = (scaled * (len(SHADES) - 1)).round().long()
    return "\n".join("".join(SHADES[i] * 2 for i in row.tolist()) for row in indices)


_CHECK_MODELS = (
    "a timm model name of a family captum-daam supports (captum_daam.supported_families() "
    "lists them), e.g. deit_tiny_patch16_224, cait_xxs24_224 or xcit_nano_12_p16_224"
)


def _random_timm_model(name: str) -> nn.Module:
    """``timm.create_model(name, pretrained=False)``, or a message on how to find a name."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        suggestion = f" (close names: {', '.join(close)})" if close else ""
        raise UsageError(
            f"check --model {name!r}: timm has no model of that name{suggestion}. Expected "
            f"{_CHECK_MODELS}; list timm's names with: python -c \"import timm; "
            f"print(timm.list_models('*vit*'))\""
        )
    return timm.create_model(name, pretrained=False).eval()


def _decomposition_error(adapter: Any, model: Any, images: Any) -> Tuple[float, str]:
    """The decomposition of the flow's last attention block, checked against the model's own
    output: a hook that is not the adapter's reads that block's output before its projection
    (:func:`~captum_daam.adapters.verify.output_projection_input`), and the recorded
    contributions of the tokens must add up to its [class] row, or, in a model without a
    [class] token, to every query row (windows laid out as the records say). Returns the
    relative error and which rows were compared."""
    import torch

    from . import class_token_contributions
    from .adapters.verify import as_recorded_rows, output_projection_input

    last_attention = adapter.attention_modules()[-1]
    every_row = not adapter.has_class_token
    try:
        reader = output_projection_input(last_attention)
    except LookupError as error:
        raise UsageError(f"check does not know where {error}") from error
    read: List[Any] = []
    handle = reader.register_forward_pre_hook(lambda module, inputs: read.append(inputs[0]))
    try:  # gradients on, so that the adapter's own view of the output is kept (its anchor)
        with adapter.record([last_attention], full=every_row) as records, torch.enable_grad():
            model(images)
            anchor = records[0].anchor
            attention = records[0].attention() if every_row else None
    finally:
        handle.remove()
    if len(read) != 1:
        raise UsageError(
            f"check could not read the output of {type(last_attention).__name__} before its "
            f"projection (seen {len(read)} times in one forward pass, expected once)"
        )
    record = records[0]
    residual = record.residual
    if every_row:
        rebuilt = attention @ record.values if residual is None else (
            attention @ record.values + residual)
        rebuilt = rebuilt.transpose(1, 2).flatten(2)  # (B', N_q, C)
        output, _, real = as_recorded_rows(record, anchor, read[0], tuple(rebuilt.shape[:2]))
        rebuilt = rebuilt if real is None else rebuilt * real
        description = "every query row's output"
    else:
        rebuilt = class_token_contributions(record.class_attention, record.values).sum(1)
        if residual is not None:  # a term the model adds that is no token's (MViTv2)
            rebuilt = rebuilt + residual[:, :, 0].flatten(1)
        output, _, _ = as_recorded_rows(record, anchor, read[0], tuple(read[0].shape[:2]))
        output, description = output[:, 0], "the [class] output"
    error = float((rebuilt - output).abs().max() / output.abs().max())
    return error, description


def check(args: argparse.Namespace) -> int:
    """Explain a random image with a randomly initialised timm ViT and verify the result
    (with --list, print the supported model families instead)."""
    if args.list:
        from .adapters import supported_families

        print("\n".join(supported_families()))
        return 0
    import torch
    from timm.data import resolve_data_config

    from . import DAAM
    from .adapters import adapter_for

    torch.manual_seed(args.seed)
    model = _random_timm_model(args.model)
    try:
        adapter = adapter_for(model)
    except TypeError as error:
        raise UsageError(
            f"check --model {args.model}: {str(error).split('. ')[0]}; expected {_CHECK_MODELS}"
        ) from error
    _, height, width = resolve_data_config({}, model=model)["input_size"]
    images = torch.rand(1, 3, height, width)
    print(f"captum-daam check: {args.model} with random weights (nothing is downloaded), "
          f"one random {height}x{width} image")

    try:
        flow = DAAM(model).attribute(images, target=None, return_flow=True)
    except (TypeError, ValueError) as error:
        raise UsageError(
            f"check --model {args.model}: DAAM cannot explain it: {_first_line(error)}"
        ) from error
    with torch.no_grad():
        predicted = int(model(images).argmax(1))
    print(f"explained class {predicted}: flow of {flow.shape[1]} accumulated maps, "
          f"grid {flow.shape[2]}x{flow.shape[3]}")
    for block, accumulated in enumerate(flow[0], start=1):
        print(f"  D_{block:<2d} sum {float(accumulated.sum()):9.4f}   "
              f"max {float(accumulated.max()):8.4f}")

    error, rows = _decomposition_error(adapter, model, images)
    checks = {
        "maps are non-negative": bool((flow >= 0).all()),
        "the flow only grows from block to block": bool((flow.diff(dim=1) >= 0).all()),
        f"per-token contributions sum to {rows} (relative error {error:.1e})": error
        < 1e-4,
    }
    print("final map D_L (brighter = more attribution):")
    print(_ascii_map(flow[0, -1]))
    for name, passed in checks.items():
        print(f"  [{'ok' if passed else 'FAILED'}] {name}")
    return 0 if all(checks.values()) else 1


# ----------------------------------------------------------------- parser


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="captum-daam",
        description="Dynamic Accumulated Attention Maps (DAAM) for Vision Transformers: "
        "explain a ViT's decision block by block.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    scalings = ("paper", "shared", "per_map")

    demo_parser = commands.add_parser(
        "demo", help="offline demo: the bundled tiny ViT on generated shapes",
        description=demo.__doc__,
    )
    demo_parser.add_argument(
        "--out", default="daam-demo", help="output folder (default: %(default)s)"
    )
    demo_parser.add_argument("--images", type=_positive_int, default=3,
                             help="how many images, at least 1 (default: 3)")
    demo_parser.add_argument("--seed", type=int, default=2024, help="generator seed")
    demo_parser.add_argument("--scaling", choices=scalings, default="paper",
                             help="colour scaling of the maps (default: the paper's mapping)")
    demo_parser.set_defaults(run=demo)

    explain_parser = commands.add_parser(
        "explain", help="explain image files with a timm, transformers or open_clip model, a "
        "checkpoint or the bundled model; with --text, why an image matches each text",
        description=explain.__doc__,
    )
    explain_parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    explain_parser.add_argument(
        "--model", required=True,
        help=f"a timm model name (pretrained weights are downloaded when online, and taken from "
        f"the local cache when there), a local checkpoint file, {BUNDLED_MODEL} (the bundled "
        f"model, which knows only the synthetic shapes of captum_daam.data), a local "
        f"transformers model folder (save_pretrained's), or open_clip:NAME[@TAG_OR_FILE]; "
        f"with --text also a Hugging Face Hub name",
    )
    explain_parser.add_argument(
        "--arch", default=None,
        help=f"timm architecture of a checkpoint given as --model (default: {BUNDLED_MODEL})",
    )
    explain_parser.add_argument(
        "--text", action="append", default=None, metavar="TEXT",
        help="explain why the image matches this text, with an image-text model (CLIP, "
        "SigLIP, ...: a transformers model folder or open_clip:NAME); repeat for several "
        "texts, one flow each",
    )
    explain_parser.add_argument("--target", type=int, default=None,
                                help="class index to explain (default: the predicted class)")
    explain_parser.add_argument("--blocks", default=None,
                                help="blocks of the flow, 1-based, e.g. 1-12 or 9-12 or 3,6,9 "
                                "(default: all)")
    explain_parser.add_argument(
        "--out", default="daam-out", help="output folder (default: %(default)s)"
    )
    explain_parser.add_argument("--device", default="cpu",
                                help="cpu, cuda, cuda:N or mps (default: cpu)")
    explain_parser.add_argument("--save-raw", action="store_true",
                                help="also write the raw flow of each image as .npz")
    explain_parser.add_argument("--scaling", choices=scalings, default="paper",
                                help="colour scaling of the maps (default: the paper's mapping)")
    explain_parser.add_argument("--no-progress", dest="progress", action="store_false",
                                help="no progress bar")
    explain_parser.set_defaults(run=explain)

    check_parser = commands.add_parser(
        "check", help="offline self-check: DAAM on a randomly initialised timm ViT",
        description=check.__doc__,
    )
    check_parser.add_argument("--model", default="deit_tiny_patch16_224",
                              help="timm model name of a supported family (e.g. "
                              "deit_tiny_patch16_224, cait_xxs24_224, xcit_nano_12_p16_224), "
                              "built with pretrained=False")
    check_parser.add_argument("--seed", type=int, default=0)
    check_parser.add_argument("--list", action="store_true",
                              help="print the supported model families, one per line, and exit")
    check_parser.set_defaults(run=check)

    from ._dataset_cli import add_explain_dataset_parser

    add_explain_dataset_parser(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with _SIGNALS.installed():
        try:
            return args.run(args)
        except UsageError as error:
            print(f"captum-daam: error: {' '.join(str(error).split())}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("captum-daam: interrupted (SIGINT); the outputs already written are complete",
                  file=sys.stderr)
            return 128 + signal.SIGINT
        except Terminated:
            print("captum-daam: terminated (SIGTERM); the outputs already written are complete",
                  file=sys.stderr)
            return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
