"""explain_dataset: the store against DAAM.attribute, metrics against captum_daam.metrics,
2 processes (torchrun, gloo) against 1, SIGKILL and a crash at every store write against an
uninterrupted run, refused settings, Hugging Face datasets, image folders, the command line."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

zarr = pytest.importorskip("zarr", minversion="3")

from captum_daam import DAAM, explain_dataset, metrics  # noqa: E402
from captum_daam import cli  # noqa: E402
from captum_daam.data import ShapesDataset  # noqa: E402
from captum_daam.zoo import tiny_vit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARRAYS = ("maps", "targets", "predictions", "scores", "labels", "complete")


def subprocess_env() -> dict:
    """The environment of a child process: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def model():
    return tiny_vit()


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(10, seed=3)


def batched_attribute(model, images, batch_size, target=None, **kwargs):
    """DAAM.attribute on the same batches as the store (the independent path); a (N,)
    target tensor is split with the images."""
    daam = DAAM(model)
    batches = [slice(start, start + batch_size) for start in range(0, len(images), batch_size)]
    return torch.cat([daam.attribute(
        images[rows], target=target[rows] if isinstance(target, torch.Tensor) else target,
        **kwargs) for rows in batches])


def read(path, name):
    return zarr.open_group(str(path), mode="r")[name][:]


def assert_same_store(first, second, names=ARRAYS):
    for name in names:
        assert np.array_equal(read(first, name), read(second, name), equal_nan=True), name


# ---- values ------------------------------------------------------------------------------


def test_store_maps_equal_daam_attribute_float32_and_float16(model, shapes, tmp_path):
    store32 = explain_dataset(DAAM(model), shapes, tmp_path / "f32.zarr", batch_size=4,
                              return_flow=True, dtype=torch.float32, progress=False)
    store16 = explain_dataset(DAAM(model), shapes, tmp_path / "f16.zarr", batch_size=4,
                              return_flow=True, progress=False)
    expected = batched_attribute(model, shapes.images, 4, return_flow=True)
    assert store32["maps"].shape == (10, 6, 8, 8) and store32["maps"].dtype == np.float32
    assert store32["maps"].chunks == (4, 6, 8, 8)
    np.testing.assert_array_equal(store32["maps"][:], expected.numpy())
    one_pass = DAAM(model).attribute(shapes.images, return_flow=True)
    np.testing.assert_allclose(store32["maps"][:], one_pass.numpy(), rtol=1e-6, atol=1e-7)
    assert store16["maps"].dtype == np.float16
    np.testing.assert_array_equal(store16["maps"][:], expected.to(torch.float16).numpy())

    with torch.no_grad():
        logits = model(shapes.images)
    predicted = logits.argmax(1)
    np.testing.assert_array_equal(store32["predictions"][:], predicted.numpy())
    np.testing.assert_array_equal(store32["targets"][:], predicted.numpy())
    np.testing.assert_array_equal(store32["labels"][:], shapes.labels.numpy())
    probability = logits.softmax(1).gather(1, predicted[:, None])[:, 0]
    np.testing.assert_allclose(store32["scores"][:], probability.numpy(), rtol=1e-5)
    assert store32["complete"][:].all()
    settings = store32.attrs["settings"]
    assert settings["batch_size"] == 4 and settings["dtype"] == "float32"
    assert settings["return_flow"] is True and settings["grid"] == [8, 8]
    assert settings["target"] == "predicted" and settings["blocks"] == 6


def test_targets_label_int_and_per_example_final_map(model, shapes, tmp_path):
    per_example = [4, 3, 2, 1, 0, 0, 1, 2, 3, 4]
    for name, target, expected_targets in [
        ("label", "label", shapes.labels),
        ("int", 2, torch.full((10,), 2)),
        ("list", per_example, torch.tensor(per_example)),
    ]:
        store = explain_dataset(DAAM(model), shapes, tmp_path / f"{name}.zarr", batch_size=3,
                                target=target, dtype=torch.float32, progress=False)
        expected = batched_attribute(model, shapes.images, 3, target=expected_targets)
        assert store["maps"].shape == (10, 1, 8, 8)
        np.testing.assert_array_equal(store["maps"][:], expected.numpy())
        np.testing.assert_array_equal(store["targets"][:], expected_targets.numpy())


def test_aggregated_metrics_equal_mean_of_per_example_metrics(model, shapes, tmp_path):
    names = ("pointing_game", "energy_pointing_game", "deletion", "insertion")
    store = explain_dataset(DAAM(model), shapes, tmp_path / "m.zarr", batch_size=4,
                            target="label", metrics=names, progress=False)
    final = DAAM(model).attribute(shapes.images, target=shapes.labels)
    masks = shapes.masks
    expected = {
        "pointing_game": metrics.pointing_game(final, masks).double(),
        "energy_pointing_game": metrics.energy_pointing_game(final, masks).double(),
        "deletion": metrics.deletion(model, shapes.images, final, target=shapes.labels).auc,
        "insertion": metrics.insertion(model, shapes.images, final, target=shapes.labels).auc,
    }
    summary = store.attrs["summary"]
    assert summary["examples"] == 10
    for name in names:
        per_example = store[f"metrics/{name}"][:]
        np.testing.assert_allclose(per_example, expected[name].numpy(), rtol=1e-5, atol=1e-6)
        assert summary["metrics"][name] == pytest.approx(float(per_example.astype(
            np.float64).mean()), rel=1e-12)
        assert summary["metrics"][name] == pytest.approx(float(expected[name].mean()),
                                                         abs=1e-5)
    with torch.no_grad():
        accuracy = (model(shapes.images).argmax(1) == shapes.labels).double().mean()
    assert summary["accuracy"] == pytest.approx(float(accuracy))


def test_store_reads_lazily_with_zarr_and_numpy(model, shapes, tmp_path):
    explain_dataset(DAAM(model), shapes, tmp_path / "lazy.zarr", batch_size=4,
                    return_flow=True, metrics=("pointing_game",), progress=False)
    group = zarr.open_group(str(tmp_path / "lazy.zarr"), mode="r")
    maps = group["maps"]  # nothing read yet: a lazy array
    assert isinstance(maps, zarr.Array) and maps.nchunks == 3
    part = maps[5:7, -1]  # reads the one chunk holding examples 5 and 6
    expected = DAAM(model).attribute(shapes.images[4:8], return_flow=True)[1:3, -1]
    np.testing.assert_array_equal(part, expected.to(torch.float16).numpy())
    assert np.asarray(group["metrics/pointing_game"]).shape == (10,)
    assert set(group.attrs) >= {"settings", "summary", "captum_daam_format"}


# ---- processes and crashes ---------------------------------------------------------------


def test_two_processes_with_torchrun_equal_one_process(model, tmp_path):
    two = tmp_path / "two.zarr"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "captum_daam.cli", "explain-dataset",
               "--model", "tiny-vit", "--data", "shapes:14:5", "--out", str(two),
               "--batch-size", "4", "--flow", "--dtype", "float32", "--metrics",
               "pointing_game", "energy_pointing_game", "--no-progress"]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one = explain_dataset(DAAM(model), ShapesDataset(14, seed=5), tmp_path / "one.zarr",
                          batch_size=4, return_flow=True, dtype=torch.float32,
                          metrics=("pointing_game", "energy_pointing_game"), progress=False)
    assert_same_store(two, tmp_path / "one.zarr",
                      ARRAYS + ("metrics/pointing_game", "metrics/energy_pointing_game"))
    stored = zarr.open_group(str(two), mode="r").attrs
    assert stored["settings"] == one.attrs["settings"]
    assert stored["summary"]["examples"] == 14
    for name, value in one.attrs["summary"]["metrics"].items():
        assert stored["summary"]["metrics"][name] == pytest.approx(value, rel=1e-12)
    # every rank wrote only its own chunks: 4 chunks, none written twice, none missing
    assert zarr.open_group(str(two), mode="r")["complete"][:].tolist() == [True] * 4


SLOW_RUN = textwrap.dedent("""
    import sys, time
    import torch
    from captum_daam import DAAM, explain_dataset
    from captum_daam.data import ShapesDataset
    from captum_daam.zoo import tiny_vit

    class SlowShapes(ShapesDataset):
        def __getitem__(self, index):
            time.sleep(0.02)  # slow enough to be killed in the middle of the run
            return super().__getitem__(index)

    explain_dataset(DAAM(tiny_vit()), SlowShapes(48, seed=7), sys.argv[1], batch_size=4,
                    return_flow=True, metrics=("pointing_game",), progress=False)
""")


def wait_for_complete_chunks(out, count, process, seconds):
    """Until the store at ``out`` has ``count`` complete chunks, the process ends or the
    seconds are up."""
    deadline = time.monotonic() + seconds
    done = 0
    while done < count and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
        try:
            done = int(zarr.open_group(str(out), mode="r")["complete"][:].sum())
        except Exception:  # the store is still being created
            done = 0


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(model, tmp_path):
    script = tmp_path / "slow_run.py"
    script.write_text(SLOW_RUN)
    out = tmp_path / "killed.zarr"
    child = subprocess.Popen([sys.executable, str(script), str(out)], env=subprocess_env())
    try:
        wait_for_complete_chunks(out, 2, child, seconds=120)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    complete = read(out, "complete")
    assert 2 <= complete.sum() < len(complete), "the run was not killed in the middle"

    resumed = subprocess.run([sys.executable, str(script), str(out)], env=subprocess_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    explain_dataset(DAAM(model), ShapesDataset(48, seed=7), tmp_path / "whole.zarr",
                    batch_size=4, return_flow=True, metrics=("pointing_game",), progress=False)
    assert_same_store(out, tmp_path / "whole.zarr", ARRAYS + ("metrics/pointing_game",))
    assert not list(out.rglob("*.partial"))


class InjectedCrash(Exception):
    pass


def test_crash_at_every_store_write_then_resume_equals_uninterrupted_run(
    model, tmp_path, monkeypatch
):
    """Stop the run at its k-th write to the store (``LocalStore.set`` and
    ``set_if_not_exists``: every chunk and metadata document), for every k, leaving a
    half-written temporary as a killed zarr write would; the resumed store equals an
    uninterrupted one."""
    from zarr.storage import LocalStore

    data = ShapesDataset(4, seed=9)
    settings = dict(batch_size=2, return_flow=True, metrics=("pointing_game",),
                    progress=False)
    reference = tmp_path / "reference.zarr"
    originals = {name: getattr(LocalStore, name) for name in ("set", "set_if_not_exists")}

    def patch(crash_at, calls):
        for name, original in originals.items():
            async def write(self, key, value, _original=original):
                calls.append(key)
                if crash_at is not None and len(calls) > crash_at:
                    # named as zarr's LocalStore names its temporaries
                    partial = (Path(self.root) / key).with_suffix(
                        f".{uuid.uuid4().hex}.partial")
                    partial.parent.mkdir(parents=True, exist_ok=True)
                    partial.write_bytes(b"half")
                    raise InjectedCrash(key)
                return await _original(self, key, value)

            monkeypatch.setattr(LocalStore, name, write)

    writes = []
    patch(None, writes)
    explain_dataset(DAAM(model), data, reference, **settings)
    assert len(writes) >= 2 * 7 + 3, writes  # 2 chunks of 6 arrays and a bit, metadata
    assert writes.index("complete/c/0") > writes.index("maps/c/0/0/0/0")

    for crash_at in range(len(writes)):
        out = tmp_path / f"crash{crash_at}.zarr"
        patch(crash_at, [])
        with pytest.raises(InjectedCrash):
            explain_dataset(DAAM(model), data, out, **settings)
        patch(None, [])
        explain_dataset(DAAM(model), data, out, **settings)
        assert_same_store(out, reference, ARRAYS + ("metrics/pointing_game",))
        stored = zarr.open_group(str(out), mode="r").attrs
        assert stored["settings"] == zarr.open_group(str(reference), mode="r").attrs[
            "settings"]
        assert stored["summary"] == zarr.open_group(str(reference), mode="r").attrs["summary"]
        assert not list(out.rglob("*.partial")), crash_at


# ---- refusals ----------------------------------------------------------------------------


def test_other_settings_against_an_existing_store_are_refused(model, shapes, tmp_path):
    out = tmp_path / "m.zarr"
    explain_dataset(DAAM(model), shapes, out, batch_size=4, progress=False)
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    for changed, keyword in [
        (dict(batch_size=5), "batch_size 4 vs 5"),
        (dict(dtype=torch.float32), "dtype 'float16' vs 'float32'"),
        (dict(return_flow=True), "return_flow False vs True"),
        (dict(target="label"), "target 'predicted' vs 'label'"),
        (dict(metrics=("pointing_game",)), "metrics"),
    ]:
        arguments = dict(batch_size=4, progress=False)
        arguments.update(changed)
        with pytest.raises(ValueError, match="other settings") as error:
            explain_dataset(DAAM(model), shapes, out, **arguments)
        assert keyword in str(error.value)
    with pytest.raises(ValueError, match="model.state_dict_sha256"):
        explain_dataset(DAAM(tiny_vit(pretrained=False)), shapes, out, batch_size=4,
                        progress=False)
    with pytest.raises(ValueError, match="dataset.description"):
        explain_dataset(DAAM(model), ShapesDataset(10, seed=4), out, batch_size=4,
                        progress=False)
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == before


def test_bad_arguments_are_refused_before_any_work(model, shapes, tmp_path):
    out = tmp_path / "never.zarr"
    images_only = [(image, label) for image, label, _ in [shapes[0], shapes[1]]]
    cases = [
        (dict(dataset=images_only, metrics=("pointing_game",)), ValueError, "mask"),
        (dict(dtype=torch.bfloat16), ValueError, "bfloat16"),
        (dict(metrics=("accuracy",)), ValueError, "metrics among"),
        (dict(target=[1, 2]), ValueError, "one target per example"),
        (dict(target="true"), ValueError, '"label"'),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(dataset=[(shapes.images[0].numpy(), 1)]), TypeError, "float tensor"),
        (dict(dataset=tmp_path / "absent"), ValueError, "not a folder"),
    ]
    for changed, kind, message in cases:
        arguments = dict(dataset=shapes, progress=False)
        arguments.update(changed)
        with pytest.raises(kind, match=message):
            explain_dataset(DAAM(model), out=out, **arguments)
        assert not out.exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds other files"):
        explain_dataset(DAAM(model), shapes, foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


# ---- other data sources ------------------------------------------------------------------


def to_uint8_pictures(images):
    from PIL import Image

    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(picture) for picture in pixels]


def test_hugging_face_dataset(model, shapes, tmp_path):
    datasets = pytest.importorskip("datasets")
    pictures = to_uint8_pictures(shapes.images[:6])
    features = datasets.Features({"img": datasets.Image(),
                                  "fine_label": datasets.ClassLabel(num_classes=5)})
    table = datasets.Dataset.from_dict(
        {"img": pictures, "fine_label": shapes.labels[:6].tolist()}, features=features)
    store = explain_dataset(DAAM(model), table, tmp_path / "hf.zarr", batch_size=4,
                            target="label", dtype=torch.float32, progress=False)
    # independently: the PNG-exact pixels in [0, 1] (the model's data config only resizes
    # to 64, which these images already are, and normalises with mean 0, std 1)
    images = torch.stack([torch.from_numpy(np.array(picture)).permute(2, 0, 1)
                          for picture in pictures]).float() / 255
    expected = batched_attribute(model, images, 4, target=shapes.labels[:6])
    np.testing.assert_allclose(store["maps"][:], expected.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(store["labels"][:], shapes.labels[:6].numpy())
    assert "HuggingFaceImages" in store.attrs["settings"]["dataset"]["class"]


def save_image_folder(root, pictures, folder_names):
    """An ImageFolder tree: picture i saved as root/<folder_names[i]>/<i>.png."""
    for index, (picture, folder) in enumerate(zip(pictures, folder_names)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        picture.save(root / folder / f"{index}.png")


def test_image_folder_named_after_the_models_classes_gives_its_class_indices(
    model, shapes, tmp_path
):
    root = tmp_path / "images"
    pictures = to_uint8_pictures(shapes.images[:6])
    class_names = ["circle", "square", "triangle", "cross", "ring"]  # the model's classes
    save_image_folder(root, pictures, [class_names[label] for label in shapes.labels[:6]])
    store = explain_dataset(DAAM(model), str(root), tmp_path / "folder.zarr", batch_size=4,
                            dtype=torch.float32, progress=False)
    # ImageFolder's order: class folders sorted by name, then files sorted by name
    order = sorted(range(6), key=lambda i: (class_names[int(shapes.labels[i])], f"{i}.png"))
    images = torch.stack([torch.from_numpy(np.array(pictures[i])).permute(2, 0, 1)
                          for i in order]).float() / 255
    expected = batched_attribute(model, images, 4, return_flow=False)
    np.testing.assert_allclose(store["maps"][:], expected.numpy(), rtol=1e-6, atol=1e-7)
    # the labels are the model's classes, not the folders' alphabetical positions
    assert store["labels"][:].tolist() == [int(shapes.labels[i]) for i in order]
    with torch.no_grad():
        correct = (model(images).argmax(1) == shapes.labels[order]).double().mean()
    assert store.attrs["summary"]["accuracy"] == pytest.approx(float(correct))
    assert store.attrs["labels"]["model_classes"] is True
    present = {class_names[int(label)] for label in shapes.labels[:6]}
    assert store.attrs["labels"]["class_to_index"] == {
        name: class_names.index(name) for name in sorted(present)}


def test_image_folder_of_other_names_says_so_once_and_stores_the_mapping(
    model, shapes, tmp_path
):
    root = tmp_path / "images"
    save_image_folder(root, to_uint8_pictures(shapes.images[:6]),
                      ["zebra", "apple", "zebra", "mango", "apple", "zebra"])
    with pytest.warns(UserWarning, match="not class names of the model") as caught:
        store = explain_dataset(DAAM(model), str(root), tmp_path / "other.zarr", batch_size=4,
                                progress=False)
    assert len([w for w in caught if "class names" in str(w.message)]) == 1
    # ImageFolder's numbering: apple 0, mango 1, zebra 2; files in folder order
    assert store["labels"][:].tolist() == [0, 0, 1, 2, 2, 2]
    assert store.attrs["labels"]["class_to_index"] == {"apple": 0, "mango": 1, "zebra": 2}
    assert store.attrs["labels"]["model_classes"] is False
    assert store.attrs["summary"]["accuracy"] is None  # folder numbers are not its classes
    with pytest.raises(ValueError, match='target="label"'):
        explain_dataset(DAAM(model), str(root), tmp_path / "label.zarr", target="label",
                        progress=False)
    assert not (tmp_path / "label.zarr").exists()


def test_image_folders_named_by_class_index_take_that_index(model, shapes, tmp_path):
    root = tmp_path / "images"
    save_image_folder(root, to_uint8_pictures(shapes.images[:4]), ["4", "0", "4", "2"])
    store = explain_dataset(DAAM(model), str(root), tmp_path / "numbers.zarr", batch_size=4,
                            progress=False)
    assert store["labels"][:].tolist() == [0, 2, 4, 4]
    assert store.attrs["summary"]["accuracy"] is not None


# ---- command line ------------------------------------------------------------------------


def test_command_line_writes_the_store_and_reports_errors_in_one_line(
    model, tmp_path, capsys
):
    out = tmp_path / "cli.zarr"
    arguments = ["explain-dataset", "--model", "tiny-vit", "--data", "shapes:6:2", "--out",
                 str(out), "--batch-size", "4", "--target", "label", "--no-progress"]
    assert cli.main(arguments) == 0
    data = ShapesDataset(6, seed=2)
    expected = batched_attribute(model, data.images, 4, target=data.labels)
    np.testing.assert_array_equal(read(out, "maps"), expected.to(torch.float16).numpy())

    folder = tmp_path / "folder" / "circle"
    folder.mkdir(parents=True)
    to_uint8_pictures(data.images[:1])[0].save(folder / "0.png")
    base = ["explain-dataset", "--model", "tiny-vit", "--no-progress", "--batch-size", "4"]
    for bad, message in [
        (["--data", "shapes:6:2", "--out", str(out), "--batch-size", "8"], "other settings"),
        (["--data", "shapes:x", "--out", str(out)], "shapes:N"),
        (["--data", str(tmp_path / "nowhere"), "--out", str(out)], "not a folder"),
        (["--data", "shapes:6", "--out", str(out), "--target", "cat"], "--target"),
        (["--data", str(tmp_path / "folder"), "--out", str(tmp_path / "m.zarr"),
          "--metrics", "pointing_game"], "mask"),
    ]:
        capsys.readouterr()
        assert cli.main(base + bad) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and error.startswith("captum-daam: error:"), error
        assert message in error, error


def test_sixteen_bit_images_are_read_from_their_raw_values(model, shapes, tmp_path):
    """An image folder and a Hugging Face dataset of 16-bit greyscale PNGs are explained from
    value / 65535 (Pillow's convert("RGB"), torchvision's default loader, clips them to
    white)."""
    from PIL import Image

    datasets = pytest.importorskip("datasets")
    grey = (shapes.images[:4].mean(1) * 65535).round().to(torch.int32).numpy().astype(np.uint16)
    pictures = [Image.fromarray(pixels) for pixels in grey]
    assert {picture.mode for picture in pictures} == {"I;16"}
    root = tmp_path / "images" / "circle"
    root.mkdir(parents=True)
    for index, picture in enumerate(pictures):
        picture.save(root / f"{index}.png")
    # independently: the raw 16-bit values over 65535, the same in the three channels
    images = torch.from_numpy(grey.astype(np.float32) / 65535).unsqueeze(1).expand(-1, 3, -1, -1)
    expected = batched_attribute(model, images.contiguous(), 4, target=1).numpy()

    folder = explain_dataset(DAAM(model), str(tmp_path / "images"), tmp_path / "folder.zarr",
                             batch_size=4, target=1, dtype=torch.float32, progress=False)
    np.testing.assert_allclose(folder["maps"][:], expected, rtol=1e-6, atol=1e-7)

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
        num_classes=5)})
    table = datasets.Dataset.from_dict(
        {"image": [str(root / f"{index}.png") for index in range(4)], "label": [0] * 4},
        features=features)
    assert table[0]["image"].mode == "I;16"
    hugging_face = explain_dataset(DAAM(model), table, tmp_path / "hf.zarr", batch_size=4,
                                   target=1, dtype=torch.float32, progress=False)
    np.testing.assert_allclose(hugging_face["maps"][:], expected, rtol=1e-6, atol=1e-7)
