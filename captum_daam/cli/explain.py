"""``captum-daam explain``: explain image files with a timm, transformers or open_clip model,
a local checkpoint or the bundled model; with ``--text``, why an image matches each text."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple

from ._common import (
    BUNDLED_MODEL,
    SCALINGS,
    UsageError,
    _device,
    _finish_page,
    _first_line,
    _load_model,
    _page_entry,
    _prepare_out,
    _remove_if_empty,
    _unique_stems,
    _write_outputs,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

BUNDLED_MODEL_NOTE = (
    "captum-daam: note: the bundled tiny-vit model only knows the five synthetic shapes of "
    "captum_daam.data ({classes}), so its explanation of a photograph or any other image is "
    "not meaningful; for real images use a timm model, e.g. --model deit_small_patch16_224"
)


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


def _check_image_file(path: str) -> None:
    """Before any model is loaded: the image exists, is a file, and its header is readable."""
    from .._images import check_image

    if os.path.isdir(path):
        raise UsageError(f"image {path} is a folder, expected an image file")
    if not os.path.isfile(path):
        raise UsageError(f"image {path} does not exist")
    try:
        check_image(path)
    except ValueError as error:
        raise UsageError(str(error)) from error


def _class_names(shapes_model: bool, num_classes: int) -> Callable[[int], str]:
    from ..data import CLASSES

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
    from .._hub import is_open_clip_name, is_transformers_folder

    if args.text or is_transformers_folder(args.model) or is_open_clip_name(args.model):
        return _explain_with_ecosystem_model(args, device, out)
    import torch
    from timm.data import resolve_data_config
    from torchvision.transforms.functional import normalize
    from tqdm.auto import tqdm

    from .. import DAAM
    from .._images import load_rgb, timm_preprocessing
    from ..data import CLASSES

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
    shown = []
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
        shown.append(_page_entry(stem, picture, flow, target, probabilities[target],
                                 f"class {names(target)}", block_numbers))
        tqdm.write(f"  {image_path}: explained class {names(target)} (p = "
                   f"{float(probabilities[target]):.2f}); wrote "
                   f"{', '.join(str(path) for path in written)}")
        sys.stdout.flush()
    _finish_page(out, shown, f"captum-daam explain: {args.model}")
    return 0


def _adapter_and_blocks(model: nn.Module, args: argparse.Namespace) -> Tuple[Any, list, List[int]]:
    """The model's adapter, its attention modules and the block numbers of ``--blocks``, with
    ``--target`` checked against the model's classes: one-line errors."""
    from ..adapters import adapter_for

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

    from .. import DAAM, ImageTextSimilarity
    from .._hub import (
        is_open_clip_name,
        is_transformers_folder,
        load_open_clip,
        load_transformers,
        text_probabilities,
    )
    from .._images import load_rgb

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
    shown = []
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
            shown.append(_page_entry(name, picture, flow, target, probabilities[target], what,
                                     block_numbers))
            tqdm.write(f"  {image_path}: explained {what} (p = "
                       f"{float(probabilities[target]):.2f}); wrote "
                       f"{', '.join(str(path) for path in written)}")
        sys.stdout.flush()
    _finish_page(out, shown, f"captum-daam explain: {args.model}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``explain`` to ``subparsers`` (from ``add_subparsers``); it runs :func:`explain`."""
    parser = subparsers.add_parser(
        "explain", help="explain image files with a timm, transformers or open_clip model, a "
        "checkpoint or the bundled model; with --text, why an image matches each text",
        description=explain.__doc__,
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument(
        "--model", required=True,
        help=f"a timm model name (pretrained weights are downloaded when online, and taken from "
        f"the local cache when there), a local checkpoint file, {BUNDLED_MODEL} (the bundled "
        f"model, which knows only the synthetic shapes of captum_daam.data), a local "
        f"transformers model folder (save_pretrained's), or open_clip:NAME[@TAG_OR_FILE]; "
        f"with --text also a Hugging Face Hub name",
    )
    parser.add_argument(
        "--arch", default=None,
        help=f"timm architecture of a checkpoint given as --model (default: {BUNDLED_MODEL})",
    )
    parser.add_argument(
        "--text", action="append", default=None, metavar="TEXT",
        help="explain why the image matches this text, with an image-text model (CLIP, "
        "SigLIP, ...: a transformers model folder or open_clip:NAME); repeat for several "
        "texts, one flow each",
    )
    parser.add_argument("--target", type=int, default=None,
                        help="class index to explain (default: the predicted class)")
    parser.add_argument("--blocks", default=None,
                        help="blocks of the flow, 1-based, e.g. 1-12 or 9-12 or 3,6,9 "
                        "(default: all)")
    parser.add_argument("--out", default="daam-out",
                        help="output folder: a flow PNG and GIF per image, and index.html, "
                        "every flow with a block slider (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument("--save-raw", action="store_true",
                        help="also write the raw flow of each image as .npz")
    parser.add_argument("--scaling", choices=SCALINGS, default="paper",
                        help="colour scaling of the maps (default: the paper's mapping)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar")
    parser.set_defaults(run=explain)
    return parser
