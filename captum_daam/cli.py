"""The ``captum-daam`` command: ``demo``, ``explain`` and ``check``."""

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

SHADES = " .:-=+*#%@"
BUNDLED_MODEL = "tiny-vit"


class UsageError(ValueError):
    """Bad input from the command line: reported in one line, exit status 2."""


# ----------------------------------------------------------------- writing files


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary file in the same folder, so no half-written file is left."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=path.suffix)
    os.close(handle)
    try:
        write(Path(temporary))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes files private; give usual rights
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_outputs(
    out: Path, stem: str, image: Tensor, flow: Tensor, block_numbers: List[int],
    scaling: str, raw: Optional[dict] = None,
) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np

    from .visualization import flow_figure, save_flow_animation

    written = []
    figure_path = out / f"{stem}_flow.png"
    figure = flow_figure(image, flow, scaling=scaling, block_numbers=block_numbers)
    _write_atomically(figure_path, lambda p: figure.savefig(p, dpi=110, bbox_inches="tight",
                                                            format="png"))
    written.append(figure_path)
    gif_path = out / f"{stem}_flow.gif"
    _write_atomically(gif_path, lambda p: save_flow_animation(
        image, flow, p, scaling=scaling, block_numbers=block_numbers))
    written.append(gif_path)
    if raw is not None:
        raw_path = out / f"{stem}_daam.npz"

        def save_raw(p: Path) -> None:
            with open(p, "wb") as handle:
                np.savez(handle, **raw)

        _write_atomically(raw_path, save_raw)
        written.append(raw_path)
    return written


# ----------------------------------------------------------------- demo


def demo(args: argparse.Namespace) -> int:
    """Explain a few generated shape images with the bundled tiny ViT: flow PNGs and GIFs."""
    from . import DAAM
    from .data import CLASSES, make_shapes
    from .zoo import tiny_vit

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
        stem = f"shapes_{index}"
        written = _write_outputs(out, stem, images[index], flow[index], block_numbers, args.scaling)
        print(f"  image {index}: true {CLASSES[int(labels[index, 0])]}, predicted "
              f"{CLASSES[int(predicted[index])]} (p = {float(probabilities[index].max()):.2f}); "
              f"wrote {', '.join(str(path) for path in written)}")
    return 0


# ----------------------------------------------------------------- explain


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


def _load_model(name: str, architecture: Optional[str], device: str) -> Tuple[nn.Module, str]:
    """The bundled model, a local checkpoint, or a timm model name; and a display name."""
    import timm

    from .zoo import tiny_vit

    path = Path(name)
    if name == BUNDLED_MODEL:
        model = tiny_vit()
    elif path.suffix in (".pth", ".pt", ".bin", ".safetensors") or path.exists():
        if not path.is_file():
            raise UsageError(f"checkpoint {name} does not exist")
        if architecture in (None, BUNDLED_MODEL):
            model = tiny_vit(pretrained=False)
        else:
            try:
                model = timm.create_model(architecture, pretrained=False)
            except RuntimeError as error:
                raise UsageError(f"unknown timm model {architecture!r} for --arch") from error
        try:
            timm.models.load_checkpoint(model, str(path), strict=True)
        except Exception as error:  # any reason a file does not load into this architecture
            raise UsageError(
                f"checkpoint {name} does not fit the {architecture or BUNDLED_MODEL} "
                f"architecture: {_first_line(error)}"
            ) from error
        model.eval()
    else:
        if name not in timm.list_models(pretrained=True) and name not in timm.list_models():
            raise UsageError(
                f"unknown model {name!r}: give a timm model name (e.g. deit_small_patch16_224), "
                f"a checkpoint file, or {BUNDLED_MODEL}"
            )
        try:
            model = timm.create_model(name, pretrained=True).eval()
        except Exception as error:  # downloads fail offline in many ways
            raise UsageError(
                f"could not get the pretrained weights of {name} (no network?): "
                f"{_first_line(error)}. Offline, use a local checkpoint or {BUNDLED_MODEL}."
            ) from error
    return model.to(device), name


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


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
    """Explain image files with a timm model, a local checkpoint or the bundled model."""
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform, resolve_data_config
    from torchvision.transforms.functional import convert_image_dtype, normalize
    from tqdm.auto import tqdm

    from . import DAAM
    from .adapters import adapter_for

    for image_path in args.images:
        if not Path(image_path).is_file():
            raise UsageError(f"image {image_path} does not exist")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available here")
    model, model_name = _load_model(args.model, args.arch, args.device)
    try:
        adapter = adapter_for(model)
    except TypeError as error:
        raise UsageError(str(error).split(". ")[0]) from error
    attention_modules = adapter.attention_modules()
    block_numbers = _parse_blocks(args.blocks, len(attention_modules))
    num_classes = adapter.num_outputs
    if args.target is not None and not 0 <= args.target < num_classes:
        raise UsageError(f"--target {args.target}: this model has classes 0-{num_classes - 1}")

    config = resolve_data_config({}, model=model)
    display_transform = create_transform(**config, normalize=False)
    pictures = []
    for image_path in args.images:
        try:
            with Image.open(image_path) as opened:
                picture = display_transform(opened.convert("RGB"))
            pictures.append(convert_image_dtype(picture, torch.float32))
        except (UnidentifiedImageError, OSError) as error:
            raise UsageError(f"cannot read image {image_path}: {error}") from error

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    daam = DAAM(model, layer=[attention_modules[number - 1] for number in block_numbers])
    shapes_model = args.model == BUNDLED_MODEL or (
        Path(args.model).is_file() and args.arch in (None, BUNDLED_MODEL)
    )
    names = _class_names(shapes_model, num_classes)
    print(f"captum-daam explain: {model_name}, blocks {block_numbers[0]}-{block_numbers[-1]} "
          f"({len(block_numbers)} maps), writing to {out}/")
    stems = _unique_stems(args.images)
    for image_path, picture, stem in tqdm(
        list(zip(args.images, pictures, stems)), desc="images", disable=not args.progress
    ):
        picture = picture.to(args.device)
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
    return 0


def _unique_stems(paths: Sequence[str]) -> List[str]:
    stems, seen = [], {}
    for path in paths:
        stem = Path(path).stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        stems.append(stem if count == 0 else f"{stem}_{count}")
    return stems


# ----------------------------------------------------------------- check


def _ascii_map(grid: Tensor) -> str:
    """A (gh, gw) map as characters, darkest to brightest, scaled to its own range."""
    low, high = grid.min(), grid.max()
    scaled = (grid - low) / (high - low).clamp_min(1e-12)
    indices = (scaled * (len(SHADES) - 1)).round().long()
    return "\n".join("".join(SHADES[i] * 2 for i in row.tolist()) for row in indices)


def check(args: argparse.Namespace) -> int:
    """Explain a random image with a randomly initialised timm ViT and verify the result."""
    import timm

    from . import DAAM, class_token_contributions
    from .adapters import adapter_for

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, pretrained=False).eval()
    height, width = model.patch_embed.img_size
    images = torch.rand(1, 3, height, width)
    print(f"captum-daam check: {args.model} with random weights (nothing is downloaded), "
          f"one random {height}x{width} image")

    flow = DAAM(model).attribute(images, target=None, return_flow=True)
    predicted = int(model(images).argmax(1))
    print(f"explained class {predicted}: flow of {flow.shape[1]} accumulated maps, "
          f"grid {flow.shape[2]}x{flow.shape[3]}")
    for block, accumulated in enumerate(flow[0], start=1):
        print(f"  D_{block:<2d} sum {float(accumulated.sum()):9.4f}   "
              f"max {float(accumulated.max()):8.4f}")

    adapter = adapter_for(model)
    class_outputs = []
    handle = model.blocks[-1].attn.norm.register_forward_pre_hook(
        lambda module, args: class_outputs.append(args[0][:, 0].detach())
    )
    try:
        with adapter.record(adapter.attention_modules()[-1:]) as records, torch.no_grad():
            model(images)
    finally:
        handle.remove()
    rebuilt = class_token_contributions(records[0].class_attention, records[0].values).sum(1)
    error = float((rebuilt - class_outputs[0]).abs().max() / class_outputs[0].abs().max())
    checks = {
        "maps are non-negative": bool((flow >= 0).all()),
        "the flow only grows from block to block": bool((flow.diff(dim=1) >= 0).all()),
        f"per-token contributions sum to the [class] output (relative error {error:.1e})": error
        < 1e-4,
    }
    print("final map D_L (brighter = more attribution):")
    print(_ascii_map(flow[0, -1]))
    for name, passed in checks.items():
        print(f"  [{'ok' if passed else 'FAILED'}] {name}")
    return 0 if all(checks.values()) else 1


# ----------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captum-daam",
        description="Dynamic Accumulated Attention Maps (DAAM) for Vision Transformers: "
        "explain a ViT's decision block by block.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    scalings = ("paper", "shared", "per_map")

    demo_parser = commands.add_parser(
        "demo", help="offline demo: the bundled tiny ViT on generated shapes",
        description=demo.__doc__,
    )
    demo_parser.add_argument(
        "--out", default="daam-demo", help="output folder (default: %(default)s)"
    )
    demo_parser.add_argument("--images", type=int, default=3, help="how many images (default: 3)")
    demo_parser.add_argument("--seed", type=int, default=2024, help="generator seed")
    demo_parser.add_argument("--scaling", choices=scalings, default="paper",
                             help="colour scaling of the maps (default: the paper's mapping)")
    demo_parser.set_defaults(run=demo)

    explain_parser = commands.add_parser(
        "explain", help="explain image files with a timm model, a checkpoint or the bundled model",
        description=explain.__doc__,
    )
    explain_parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    explain_parser.add_argument(
        "--model", required=True,
        help=f"a timm model name (pretrained weights are downloaded when online), a local "
        f"checkpoint file, or {BUNDLED_MODEL} (the bundled model)",
    )
    explain_parser.add_argument(
        "--arch", default=None,
        help=f"timm architecture of a checkpoint given as --model (default: {BUNDLED_MODEL})",
    )
    explain_parser.add_argument("--target", type=int, default=None,
                                help="class index to explain (default: the predicted class)")
    explain_parser.add_argument("--blocks", default=None,
                                help="blocks of the flow, 1-based, e.g. 1-12 or 9-12 or 3,6,9 "
                                "(default: all)")
    explain_parser.add_argument(
        "--out", default="daam-out", help="output folder (default: %(default)s)"
    )
    explain_parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
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
                              help="timm model name, built with pretrained=False")
    check_parser.add_argument("--seed", type=int, default=0)
    check_parser.set_defaults(run=check)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"captum-daam: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
