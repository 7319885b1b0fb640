"""The output folder: unique names, a folder that cannot be written, a full disk, and runs
stopped by SIGTERM or SIGINT. Never a half-written file, never a PNG without its GIF."""

import errno
import itertools
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest

import captum_daam.visualization
from captum_daam.cli import main
from captum_daam.cli._common import _unique_stems
from helpers import save_shape_pngs


@pytest.fixture(scope="module")
def shape_png(tmp_path_factory):
    return save_shape_pngs(tmp_path_factory.mktemp("shapes"), 2, seed=11)[0]


def _files(folder: Path):
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def _only_complete_pairs(folder: Path):
    names = _files(folder)
    assert not [name for name in names if name.startswith(".partial-")], names
    pngs = {name[: -len("_flow.png")] for name in names if name.endswith("_flow.png")}
    gifs = {name[: -len("_flow.gif")] for name in names if name.endswith("_flow.gif")}
    assert pngs <= gifs, f"PNG without its GIF: {sorted(pngs - gifs)}"
    return pngs


def _one_line_error(captured, *fragments):
    error = captured.err
    assert error.startswith("captum-daam: error: ") and error.count("\n") == 1, error
    for fragment in fragments:
        assert fragment in error, error
    return error


# ----------------------------------------------------------------- unique names


def _key(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


@pytest.mark.parametrize(
    "paths, expected",
    [
        (["a/x.png", "b/x_1.png", "c/x.png"], ["x", "x_1", "x_2"]),
        (["a/x.png", "c/x.png", "b/x_1.png"], ["x", "x_2", "x_1"]),
        (["a/x.png", "b/x.jpg", "c/x.tif"], ["x", "x_1", "x_2"]),
        (["x.png", "x.png", "x_1.png", "x_2.png"], ["x", "x_3", "x_1", "x_2"]),
        (["a/Cat.png", "b/cat.png"], ["Cat", "cat_1"]),
        (["a/x.png", "b/x_1.png", "c/x_1.png", "d/x.png"], ["x", "x_1", "x_1_1", "x_2"]),
        (["one.png", "two.png"], ["one", "two"]),
    ],
)
def test_unique_stems_worked_examples(paths, expected):
    assert _unique_stems(paths) == expected


def test_unique_stems_are_unique_on_any_file_system_and_keep_names_without_a_clash():
    generator = random.Random(7)
    parts = ["x", "X", "x_1", "x_2", "X_1", "y", "x_1_1", "\u00e9", "e\u0301"]
    for _ in range(300):
        stems = [generator.choice(parts) for _ in range(generator.randint(1, 9))]
        paths = [f"folder{index}/{stem}.png" for index, stem in enumerate(stems)]
        names = _unique_stems(paths)
        assert len({_key(name) for name in names}) == len(names), (stems, names)
        for index, (stem, name) in enumerate(zip(stems, names)):
            first = all(_key(earlier) != _key(stem) for earlier in stems[:index])
            if first:
                assert name == stem  # the first image of a name keeps it
            else:
                assert name.startswith(stem + "_") and _key(name) not in {_key(s) for s in stems}


def test_images_of_the_same_name_in_three_folders_all_get_their_outputs(tmp_path, shape_png):
    sources = []
    for folder, name, source in [("a", "x", 0), ("b", "x_1", 1), ("c", "x", 1)]:
        (tmp_path / folder).mkdir()
        target = tmp_path / folder / f"{name}.png"
        target.write_bytes(shape_png[source].read_bytes())
        sources.append(str(target))
    out = tmp_path / "out"
    assert main(["explain", *sources, "--model", "tiny-vit", "--out", str(out), "--save-raw",
                 "--no-progress"]) == 0
    assert _files(out) == ["index.html"] + sorted(
        f"{stem}_{kind}" for stem in ("x", "x_1", "x_2")
        for kind in ("daam.npz", "flow.gif", "flow.png")
    )
    flows = {stem: np.load(out / f"{stem}_daam.npz")["flow"] for stem in ("x", "x_1", "x_2")}
    np.testing.assert_array_equal(flows["x_1"], flows["x_2"])  # the same picture
    assert not np.array_equal(flows["x"], flows["x_2"])  # not overwritten by c/x.png


# ----------------------------------------------------------------- the output folder


def test_out_that_is_a_file(tmp_path, shape_png, capsys):
    out = tmp_path / "taken"
    out.write_text("keep me")
    code = main(["explain", str(shape_png[0]), "--model", "tiny-vit", "--out", str(out)])
    assert code == 2
    _one_line_error(capsys.readouterr(), f"--out {out} is a file", "expected a folder")
    assert out.read_text() == "keep me"


def test_out_below_a_file(tmp_path, shape_png, capsys):
    (tmp_path / "taken").write_text("keep me")
    out = tmp_path / "taken" / "sub"
    code = main(["explain", str(shape_png[0]), "--model", "tiny-vit", "--out", str(out)])
    assert code == 2
    _one_line_error(capsys.readouterr(), "cannot create the folder", "ENOTDIR")


def test_out_the_user_may_not_write_to(tmp_path, shape_png, capsys, monkeypatch):
    """Permission bits do not stop root (the tests may run as root): os.access is what the
    command asks, so it is made to answer no for this folder."""
    out = tmp_path / "locked"
    out.mkdir()
    real_access = os.access

    def access(path, mode, **kwargs):
        if Path(path) == out and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    code = main(["explain", str(shape_png[0]), "--model", "tiny-vit", "--out", str(out)])
    assert code == 2
    _one_line_error(capsys.readouterr(), f"--out {out}", "may not write")
    assert _files(out) == []


def test_out_on_a_read_only_file_system(tmp_path, shape_png, capsys, monkeypatch):
    """What os.access does not see (a read-only mount) the probe file finds."""
    out = tmp_path / "mounted"
    out.mkdir()
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code = main(["explain", str(shape_png[0]), "--model", "tiny-vit", "--out", str(out)])
    assert code == 2
    _one_line_error(capsys.readouterr(), "cannot write in that folder", "EROFS")
    assert _files(out) == []


def test_a_folder_created_for_a_run_that_fails_is_removed(tmp_path, shape_png, capsys):
    out = tmp_path / "new" / "deeper"
    code = main(["explain", str(shape_png[0]), "--model", "tiny-vit", "--target", "9",
                 "--out", str(out)])
    assert code == 2
    _one_line_error(capsys.readouterr(), "classes 0-4")
    assert not (tmp_path / "new").exists()


def _disk_fills_up(monkeypatch, after_images: int):
    """The GIF writer of the image after ``after_images`` writes half a file, then fails as
    a full disk does."""
    real_save = captum_daam.visualization.save_flow_animation
    calls = itertools.count()

    def save_flow_animation(image, flow, path, **kwargs):
        if next(calls) < after_images:
            return real_save(image, flow, path, **kwargs)
        Path(path).write_bytes(b"GIF89a half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(captum_daam.visualization, "save_flow_animation", save_flow_animation)


@pytest.mark.parametrize("after_images", [0, 1])
def test_a_full_disk_leaves_only_complete_outputs(tmp_path, shape_png, capsys, monkeypatch,
                                                  after_images):
    _disk_fills_up(monkeypatch, after_images)
    out = tmp_path / "out"
    code = main(["explain", *map(str, shape_png), "--model", "tiny-vit", "--out", str(out),
                 "--save-raw", "--no-progress"])
    assert code == 2
    _one_line_error(capsys.readouterr(), "No space left on device", "ENOSPC", f"--out {out}")
    expected = [] if after_images == 0 else [
        "shape0_daam.npz", "shape0_flow.gif", "shape0_flow.png"
    ]
    assert _files(out) == expected


def test_a_full_disk_in_demo(tmp_path, capsys, monkeypatch):
    _disk_fills_up(monkeypatch, 0)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--images", "1"]) == 2
    _one_line_error(capsys.readouterr(), "No space left on device")
    assert not out.exists()


# ----------------------------------------------------------------- signals


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_run_stopped_by_a_signal_leaves_only_complete_pairs(
    tmp_path, shape_png, signal_number
):
    out = tmp_path / "out"
    images = [str(shape_png[index % 2]) for index in range(400)]  # far more than run in time
    process = subprocess.Popen(
        [sys.executable, "-m", "captum_daam.cli", "explain", *images, "--model", "tiny-vit",
         "--out", str(out), "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # A shell's background job starts with SIGINT ignored, and its children inherit that:
        # the run under test gets the default handling, however the tests were started.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*_flow.png")):  # the run is under way
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no output within two minutes"
            time.sleep(0.01)
        process.send_signal(signal_number)
        _, error = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + signal_number, error
    name = "SIGTERM" if signal_number == signal.SIGTERM else "SIGINT"
    assert error.splitlines()[-1].startswith("captum-daam: ") and name in error
    written = _only_complete_pairs(out)
    assert 1 <= len(written) < 400  # stopped mid-run, keeping what was complete
