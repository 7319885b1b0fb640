"""Bad input to the command, each refused in one line on stderr with exit status 2, before
anything is loaded where it can be: devices, images, checkpoints, demo and check arguments.
And check on every timm family it supports, and the note on the bundled model."""

import os
from pathlib import Path

import pytest
import timm
import torch

import captum_daam._images
import captum_daam.zoo
from captum_daam.cli import main
from captum_daam.data import CLASSES
from helpers import save_shape_pngs


@pytest.fixture(scope="module")
def shape_png(tmp_path_factory):
    return str(save_shape_pngs(tmp_path_factory.mktemp("shapes"), 1, seed=5)[0][0])


def _files(folder: Path):
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def _assert_one_line_error(captured, *fragments):
    error = captured.err
    assert error.startswith("captum-daam: error: ") and error.count("\n") == 1, error
    assert "Traceback" not in error
    for fragment in fragments:
        assert fragment in error, error


@pytest.fixture
def nothing_may_load(monkeypatch):
    """Fail the test if a model is built or an image decoded."""

    def refuse(*args, **kwargs):
        raise AssertionError("loaded something before checking the arguments")

    monkeypatch.setattr(captum_daam.zoo, "tiny_vit", refuse)
    monkeypatch.setattr(timm, "create_model", refuse)
    monkeypatch.setattr(captum_daam._images, "load_rgb", refuse)


# ----------------------------------------------------------------- --device


@pytest.mark.parametrize("device", ["cdua", "gpu", "cuda:x", "cpu:0:1"])
def test_a_device_torch_does_not_know(device, tmp_path, shape_png, capsys, nothing_may_load):
    out = tmp_path / "out"
    code = main(["explain", shape_png, "--model", "tiny-vit", "--device", device,
                 "--out", str(out)])
    assert code == 2
    _assert_one_line_error(capsys.readouterr(), f"--device {device!r}", "expected cpu, cuda")
    assert not out.exists()


def test_a_device_type_it_does_not_run_on(tmp_path, shape_png, capsys, nothing_may_load):
    code = main(["explain", shape_png, "--model", "tiny-vit", "--device", "meta",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    _assert_one_line_error(capsys.readouterr(), "does not run on 'meta'", "expected cpu")


def test_cuda_absent(tmp_path, shape_png, capsys, monkeypatch, nothing_may_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["explain", shape_png, "--model", "tiny-vit", "--device", "cuda",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    _assert_one_line_error(capsys.readouterr(), "no CUDA device is available", "--device cpu")


def test_a_cuda_index_beyond_the_devices(tmp_path, shape_png, capsys, monkeypatch,
                                         nothing_may_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code = main(["explain", shape_png, "--model", "tiny-vit", "--device", "cuda:2",
                 "--out", str(tmp_path / "out")])
    assert code == 2
    _assert_one_line_error(capsys.readouterr(), "2 CUDA device(s), cuda:0 to cuda:1")


# ----------------------------------------------------------------- images


def test_a_folder_given_as_image(tmp_path, capsys, nothing_may_load):
    folder = tmp_path / "photos"
    folder.mkdir()
    code = main(["explain", str(folder), "--model", "tiny-vit", "--out", str(tmp_path / "out")])
    assert code == 2
    _assert_one_line_error(capsys.readouterr(), f"image {folder} is a folder")


def test_a_text_file_given_as_image(tmp_path, capsys, nothing_may_load):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    code = main(["explain", str(text), "--model", "tiny-vit", "--out", str(tmp_path / "out")])
    assert code == 2
    _assert_one_line_error(capsys.readouterr(), f"cannot read image {text}",
                           "expected an image file")


# ----------------------------------------------------------------- checkpoints


def _explain_checkpoint(shape_png, checkpoint, tmp_path, *extra):
    out = tmp_path / "out"
    code = main(["explain", shape_png, "--model", str(checkpoint), *extra, "--out", str(out),
                 "--no-progress"])
    return code, out


def test_a_folder_given_as_checkpoint(tmp_path, shape_png, capsys):
    folder = tmp_path / "weights"
    folder.mkdir()
    code, out = _explain_checkpoint(shape_png, folder, tmp_path)
    assert code == 2
    _assert_one_line_error(capsys.readouterr(), f"checkpoint {folder} is a folder",
                           "expected a checkpoint file")
    assert not out.exists()


def test_a_text_file_given_as_checkpoint(tmp_path, shape_png, capsys):
    text = tmp_path / "weights.pth"
    text.write_text("these are not weights")
    code, out = _explain_checkpoint(shape_png, text, tmp_path)
    assert code == 2
    _assert_one_line_error(capsys.readouterr(), "is not a PyTorch checkpoint", "torch.save")


def test_a_whole_pickled_model_given_as_checkpoint(tmp_path, shape_png, capsys):
    pickled = tmp_path / "whole.pth"
    torch.save(captum_daam.zoo.tiny_vit(), pickled)
    code, out = _explain_checkpoint(shape_png, pickled, tmp_path)
    assert code == 2
    _assert_one_line_error(
        capsys.readouterr(), "whole pickled model", "nn.Module classes such as timm.",
        "not a state dict",
        "torch.save(model.state_dict()", "--arch",
    )
    assert not out.exists()


def test_a_whole_pickled_model_in_torchs_legacy_format_is_named_as_such(
    tmp_path, shape_png, capsys
):
    pickled = tmp_path / "legacy.pth"
    torch.save(captum_daam.zoo.tiny_vit(), pickled, _use_new_zipfile_serialization=False)
    code, out = _explain_checkpoint(shape_png, pickled, tmp_path)
    assert code == 2
    _assert_one_line_error(capsys.readouterr(), "whole pickled model",
                           "nn.Module classes such as timm.", "torch.save(model.state_dict()")
    # a legacy-format state dict is a checkpoint like any other
    weights = tmp_path / "legacy_weights.pth"
    torch.save(captum_daam.zoo.tiny_vit().state_dict(), weights,
               _use_new_zipfile_serialization=False)
    assert _explain_checkpoint(shape_png, weights, tmp_path)[0] == 0


WARNING_TORCH_LOAD = """
import sys, warnings
import torch
from captum_daam.cli import main

original = torch.load

def warning_load(*args, **kwargs):
    warnings.warn("TypedStorage is deprecated", UserWarning)
    warnings.warn("You are using torch.load with weights_only", FutureWarning)
    return original(*args, **kwargs)

torch.load = warning_load
sys.exit(main(sys.argv[1:]))
"""


def test_warnings_while_reading_a_refused_checkpoint_do_not_reach_stderr(tmp_path, shape_png):
    """torch (some versions) warns while it reads such a file; in a new process, as a user runs
    the command, stderr holds the one-line error alone."""
    import subprocess
    import sys

    script = tmp_path / "warning_load.py"
    script.write_text(WARNING_TORCH_LOAD)
    pickled = tmp_path / "whole.pth"
    torch.save(captum_daam.zoo.tiny_vit(), pickled)
    environment = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for command in (["explain", shape_png], ["explain-dataset", "--data", "shapes:4"]):
        result = subprocess.run(
            [sys.executable, "-W", "default", str(script), *command, "--model", str(pickled),
             "--out", str(tmp_path / "out.zarr"), "--no-progress"],
            capture_output=True, text=True, env=environment, timeout=300)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "whole pickled model" in lines[0], result.stderr


def test_a_training_checkpoint_with_its_arguments_still_loads(tmp_path, shape_png):
    """timm's training checkpoints hold an argparse.Namespace next to the state dict: the safe
    load allows it, and takes the weights from ``state_dict``."""
    import argparse

    checkpoint = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"state_dict": captum_daam.zoo.tiny_vit().state_dict(),
                "args": argparse.Namespace(lr=0.1), "epoch": 3}, checkpoint)
    code, out = _explain_checkpoint(shape_png, checkpoint, tmp_path)
    assert code == 0
    assert _files(out) == ["index.html", "shape_flow.gif", "shape_flow.png"]


def test_a_checkpoint_that_does_not_fit_names_the_parameters(tmp_path, shape_png, capsys):
    state_dict = captum_daam.zoo.tiny_vit().state_dict()
    state_dict["head.weight"] = torch.zeros(7, 96)
    del state_dict["norm.bias"]
    checkpoint = tmp_path / "other.pth"
    torch.save(state_dict, checkpoint)
    code, _ = _explain_checkpoint(shape_png, checkpoint, tmp_path)
    assert code == 2
    _assert_one_line_error(
        capsys.readouterr(), "does not fit the tiny-vit architecture", "1 parameters missing",
        "norm.bias", "head.weight is (7, 96) in the file, (5, 96) in the model",
    )


# ----------------------------------------------------------------- demo --images


@pytest.mark.parametrize("count", ["0", "-3", "two"])
def test_demo_needs_at_least_one_image(count, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["demo", "--images", count, "--out", str(tmp_path / "demo")])
    assert raised.value.code == 2
    _assert_one_line_error(capsys.readouterr(), "--images", f"got {count!r}",
                           "expected a positive whole number")
    assert not (tmp_path / "demo").exists()


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["explain", "x.png"])
    assert raised.value.code == 2
    _assert_one_line_error(capsys.readouterr(), "--model")


# ----------------------------------------------------------------- check


def test_check_with_an_unknown_model_says_how_to_find_names(capsys):
    assert main(["check", "--model", "deit_tny_patch16_224"]) == 2
    _assert_one_line_error(
        capsys.readouterr(), "timm has no model of that name", "deit_tiny_patch16_224",
        "timm.list_models", "supported_families()",
    )


def test_check_with_a_timm_model_of_no_supported_family(capsys):
    assert main(["check", "--model", "resnet18"]) == 2
    _assert_one_line_error(capsys.readouterr(), "no adapter", "ResNet", "supported_families()")


@pytest.mark.parametrize(
    "name, blocks, grid", [("cait_xxs24_224", 2, 14), ("xcit_nano_12_p16_224", 2, 14)]
)
def test_check_passes_on_the_class_attention_families(name, blocks, grid, capsys):
    """CaiT and XCiT explain their class-attention blocks (two in both) over a 14 x 14 grid;
    check must build them from timm's data config and verify them through their adapter."""
    assert main(["check", "--model", name]) == 0
    printed = capsys.readouterr().out
    assert "FAILED" not in printed
    assert f"flow of {blocks} accumulated maps, grid {grid}x{grid}" in printed
    assert printed.count("[ok]") == 3


@pytest.mark.parametrize(
    "name, blocks, grid", [("mvitv2_small_cls", 16, 28), ("crossvit_tiny_240", 21, 20)]
)
def test_check_passes_on_families_whose_grid_changes(name, blocks, grid, capsys):
    """MViTv2 (its pooled query is added to the attention output: the record names that term)
    and CrossViT (two branches): the flow on the finest grid, and every check passes."""
    assert main(["check", "--model", name]) == 0
    printed = capsys.readouterr().out
    assert "FAILED" not in printed
    assert f"flow of {blocks} accumulated maps, grid {grid}x{grid}" in printed
    assert printed.count("[ok]") == 3


@pytest.mark.parametrize("name", ["levit_conv_128s", "hiera_tiny_224", "nest_tiny",
                                  "efficientvit_m0"])
def test_check_passes_on_models_without_a_class_token(name, capsys):
    """Every query row of the last block checked against the module's own output, however
    the module lays it out: NCHW (LeViT's conv layout), mask units interleaved (Hiera), image
    blocks with heads merged channel-major (NesT), heads run one after another in windows
    (EfficientViT)."""
    assert main(["check", "--model", name]) == 0
    printed = capsys.readouterr().out
    assert "FAILED" not in printed
    assert "[ok] per-token contributions sum to every query row's output" in printed


def test_check_fails_when_every_row_does_not_add_up(capsys, monkeypatch):
    """The every-row check is a real one: an output read off by a little is caught."""
    from captum_daam.adapters import verify

    real = verify.as_recorded_rows
    monkeypatch.setattr(verify, "as_recorded_rows", lambda *args: (
        lambda rows: (rows[0] * 1.001,) + tuple(rows[1:]))(real(*args)))
    assert main(["check", "--model", "levit_conv_128s"]) == 1
    assert "[FAILED] per-token contributions sum to every query row's" in (
        capsys.readouterr().out)


def test_check_fails_when_the_decomposition_does_not_add_up(capsys, monkeypatch):
    """The sum check is a real one: contributions that are off by a little are caught."""
    import captum_daam

    real = captum_daam.class_token_contributions
    monkeypatch.setattr(captum_daam, "class_token_contributions",
                        lambda attention, values: real(attention, values) * 1.001)
    assert main(["check"]) == 1
    assert "[FAILED] per-token contributions sum" in capsys.readouterr().out


# ----------------------------------------------------------------- the bundled model's note


def test_explain_with_the_bundled_model_notes_once_that_it_knows_only_shapes(
    tmp_path, shape_png, capsys
):
    code = main(["explain", shape_png, shape_png, "--model", "tiny-vit",
                 "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr()
    assert printed.out.count("captum-daam: note: the bundled tiny-vit model") == 1
    note = next(line for line in printed.out.splitlines() if "note:" in line)
    assert all(name in note for name in CLASSES) and "not meaningful" in note
    assert printed.err == ""


def test_no_note_for_other_models(tmp_path, shape_png, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    checkpoint = tmp_path / "deit.safetensors"
    save_file(timm.create_model("deit_tiny_patch16_224").state_dict(), str(checkpoint))
    code = main(["explain", shape_png, "--model", str(checkpoint), "--arch",
                 "deit_tiny_patch16_224", "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    assert "note:" not in capsys.readouterr().out
