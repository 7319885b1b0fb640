"""The captum-daam command: demo, explain, check, and its one-line errors (exit status 2)."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from captum_daam.cli import main
from captum_daam.zoo import tiny_vit
from helpers import save_shape_pngs


@pytest.fixture(scope="module")
def shape_files(tmp_path_factory):
    paths, labels = save_shape_pngs(tmp_path_factory.mktemp("images"), 2, seed=4)
    return [str(path) for path in paths], labels


def _files(folder: Path):
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--help"])
    assert raised.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "explain", "check"):
        assert command in text


def test_demo_writes_a_flow_png_and_gif_per_image(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--images", "2"]) == 0
    assert _files(out) == [
        "index.html",
        "shapes_0_flow.gif",
        "shapes_0_flow.png",
        "shapes_1_flow.gif",
        "shapes_1_flow.png",
    ]
    printed = capsys.readouterr().out
    assert "predicted" in printed and "shapes_1_flow.gif" in printed
    with Image.open(out / "shapes_0_flow.gif") as gif:
        assert gif.n_frames == len(tiny_vit().blocks)


def test_explain_with_the_bundled_model_saves_raw_maps(tmp_path, shape_files, capsys):
    paths, labels = shape_files
    out = tmp_path / "out"
    code = main(
        [
            "explain",
            *paths,
            "--model",
            "tiny-vit",
            "--blocks",
            "4-6",
            "--target",
            "2",
            "--out",
            str(out),
            "--save-raw",
            "--no-progress",
        ]
    )
    assert code == 0
    assert _files(out) == ["index.html"] + sorted(
        f"shape{i}_{kind}" for i in range(2) for kind in ("daam.npz", "flow.gif", "flow.png")
    )
    raw = np.load(out / "shape0_daam.npz")
    assert raw["flow"].shape == (3, 8, 8)
    assert raw["block_numbers"].tolist() == [4, 5, 6] and int(raw["target"]) == 2
    assert "explained class triangle" in capsys.readouterr().out


@pytest.mark.parametrize("blocks, shown, numbers", [
    ("1-3,5", "1-3,5", [1, 2, 3, 5]),
    ("5,1-3", "1-3,5", [1, 2, 3, 5]),
    ("2,4,6", "2,4,6", [2, 4, 6]),
    ("4", "4", [4]),
    ("1-6", "1-6", [1, 2, 3, 4, 5, 6]),
    ("1-2,3-4", "1-4", [1, 2, 3, 4]),
])
def test_the_chosen_blocks_are_printed_as_they_are(blocks, shown, numbers, tmp_path,
                                                     shape_files, capsys):
    out = tmp_path / "out"
    code = main(["explain", shape_files[0][0], "--model", "tiny-vit", "--blocks", blocks,
                 "--out", str(out), "--save-raw", "--no-progress"])
    assert code == 0
    assert f"blocks {shown} ({len(numbers)} maps)" in capsys.readouterr().out
    assert np.load(out / "shape0_daam.npz")["block_numbers"].tolist() == numbers


@pytest.mark.parametrize("numbers, shown", [
    ([1, 2, 3, 5], "1-3,5"),
    ([9, 10, 11, 12], "9-12"),
    ([3, 6, 9], "3,6,9"),
    ([4], "4"),
    ([1, 2, 4, 5, 7], "1-2,4-5,7"),
])
def test_block_numbers_are_described_as_ranges(numbers, shown):
    from captum_daam.cli.explain import _describe_blocks

    assert _describe_blocks(numbers) == shown


def test_the_description_of_any_blocks_reads_back_as_the_same_blocks():
    from captum_daam.cli.explain import _describe_blocks, _parse_blocks

    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        chosen = torch.rand(24, generator=generator) < 0.5
        numbers = [index + 1 for index in range(24) if chosen[index]] or [24]
        assert _parse_blocks(_describe_blocks(numbers), 24) == numbers


def test_explain_a_local_checkpoint(tmp_path, shape_files):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "mine.safetensors"
    save_file(tiny_vit().state_dict(), str(checkpoint))
    out = tmp_path / "out"
    assert (
        main(
            [
                "explain",
                shape_files[0][0],
                "--model",
                str(checkpoint),
                "--out",
                str(out),
                "--save-raw",
                "--no-progress",
            ]
        )
        == 0
    )
    bundled = tmp_path / "bundled"
    assert (
        main(
            [
                "explain",
                shape_files[0][0],
                "--model",
                "tiny-vit",
                "--out",
                str(bundled),
                "--save-raw",
                "--no-progress",
            ]
        )
        == 0
    )
    assert np.array_equal(
        np.load(out / "shape0_daam.npz")["flow"], np.load(bundled / "shape0_daam.npz")["flow"]
    )


def _bad_checkpoint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"head.weight": torch.zeros(3, 3)}, str(path))
    return str(path)


def _not_an_image(tmp_path):
    path = tmp_path / "broken.png"
    path.write_text("not a png")
    return str(path)


BAD_COMMANDS = {
    "missing_image": (
        lambda tmp, good: ["explain", str(tmp / "nope.png"), "--model", "tiny-vit"],
        "does not exist",
    ),
    "unreadable_image": (
        lambda tmp, good: ["explain", _not_an_image(tmp), "--model", "tiny-vit"],
        "cannot read image",
    ),
    "unknown_model": (
        lambda tmp, good: ["explain", good, "--model", "not_a_model_xyz"],
        "unknown model",
    ),
    "checkpoint_does_not_fit": (
        lambda tmp, good: ["explain", good, "--model", _bad_checkpoint(tmp)],
        "does not fit",
    ),
    "target_out_of_range": (
        lambda tmp, good: ["explain", good, "--model", "tiny-vit", "--target", "5"],
        "classes 0-4",
    ),
    "blocks_out_of_range": (
        lambda tmp, good: ["explain", good, "--model", "tiny-vit", "--blocks", "2-9"],
        "blocks 1-6",
    ),
    "blocks_malformed": (
        lambda tmp, good: ["explain", good, "--model", "tiny-vit", "--blocks", "x"],
        "--blocks expects",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_COMMANDS))
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(case, tmp_path, shape_files, capsys):
    make_command, message = BAD_COMMANDS[case]
    out = tmp_path / "out"
    code = main(make_command(tmp_path, shape_files[0][0]) + ["--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("captum-daam: error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert _files(out) == []


def test_a_timm_name_offline_says_so(tmp_path, shape_files, capsys, monkeypatch):
    """The test session sets HF_HUB_OFFLINE; with the weights in no cache, the message says
    what is missing and what to do offline, and no download is tried."""
    from huggingface_hub import constants

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise AssertionError("tried to download the pretrained weights")
        return create(name, pretrained=False, **kwargs)

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch-cache"))
    out = tmp_path / "out"
    code = main(
        ["explain", shape_files[0][0], "--model", "deit_tiny_patch16_224", "--out", str(out)]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "could not download the pretrained weights of deit_tiny_patch16_224" in error
    assert "not in the local cache" in error and "--model tiny-vit" in error
    assert _files(out) == []


def test_check_passes(capsys):
    assert main(["check"]) == 0
    assert "FAILED" not in capsys.readouterr().out


def test_cuda_without_a_cuda_device_says_so(tmp_path, shape_files, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    code = main(
        ["explain", shape_files[0][0], "--model", "tiny-vit", "--device", "cuda", "--out", str(out)]
    )
    assert code == 2 and "no CUDA device" in capsys.readouterr().err
    assert _files(out) == []


def test_explain_a_checkpoint_of_a_timm_architecture(tmp_path, shape_files, capsys):
    """A timm architecture with its own data config: resized to 224 and normalised."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    checkpoint = tmp_path / "deit.safetensors"
    save_file(model.state_dict(), str(checkpoint))
    out = tmp_path / "out"
    code = main(
        [
            "explain",
            shape_files[0][0],
            "--model",
            str(checkpoint),
            "--arch",
            "deit_tiny_patch16_224",
            "--blocks",
            "10-12",
            "--save-raw",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    raw = np.load(out / "shape0_daam.npz")
    assert raw["flow"].shape == (3, 14, 14)
    with Image.open(out / "shape0_flow.gif") as gif:
        assert gif.n_frames == 3
    assert "explained class" in capsys.readouterr().out
