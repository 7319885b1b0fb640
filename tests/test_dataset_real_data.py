"""explain_dataset on what users feed it: image folders, Hugging Face datasets (in memory and
save_to_disk folders) and the generated shapes, resumed by the same command in a new process;
stores created by two runs at once; a user's files never removed; labels, items and errors
named as they are."""

import errno
import fcntl
import os
import signal
import socket
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

from test_dataset import (  # noqa: E402
    ARRAYS,
    assert_same_store,
    batched_attribute,
    read,
    save_image_folder,
    subprocess_env,
    to_uint8_pictures,
    wait_for_complete_chunks,
)

from captum_daam import DAAM, cli, explain_dataset  # noqa: E402
from captum_daam.data import ShapesDataset  # noqa: E402
from captum_daam.zoo import tiny_vit  # noqa: E402

CLASS_NAMES = ["circle", "square", "triangle", "cross", "ring"]  # the bundled model's classes


@pytest.fixture(scope="module")
def model():
    return tiny_vit()


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(12, seed=11)


def image_folder(root, shapes):
    save_image_folder(root, to_uint8_pictures(shapes.images),
                      [CLASS_NAMES[label] for label in shapes.labels])
    return root


def hugging_face_table(shapes):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=CLASS_NAMES)})
    return datasets.Dataset.from_dict(
        {"image": to_uint8_pictures(shapes.images), "label": shapes.labels.tolist()},
        features=features)


def chunk_files(out):
    """Every chunk file of the store with its modification time."""
    return {path: path.stat().st_mtime_ns for path in Path(out).rglob("c/**/*")
            if path.is_file()}


# ---- the same command in a new process resumes --------------------------------------------

# Put first in a script run with crash as its last argument: the run stops with an error at
# the store's write of chunk 1's completion bit (chunk 0 complete, the rest not).
CRASH_AT_CHUNK_1 = textwrap.dedent("""
    import sys
    from zarr.storage import LocalStore

    if sys.argv[-1] == "crash":
        sys.argv.pop()
        original = LocalStore.set

        async def write(self, key, value):
            if key == "complete/c/1":
                raise RuntimeError("injected crash")
            return await original(self, key, value)

        LocalStore.set = write
""")

# `captum-daam ARGS` (the command line, in this script so that it can crash).
COMMAND = CRASH_AT_CHUNK_1 + textwrap.dedent("""
    from captum_daam import cli
    sys.exit(cli.main(sys.argv[1:]))
""")

# The Python API on an in-memory Hugging Face dataset built in this process; argv: out.
HUGGING_FACE_RUN = CRASH_AT_CHUNK_1 + textwrap.dedent("""
    import datasets
    from PIL import Image
    from captum_daam import DAAM, explain_dataset
    from captum_daam.data import ShapesDataset
    from captum_daam.zoo import tiny_vit

    shapes = ShapesDataset(12, seed=11)
    pixels = (shapes.images * 255).round().byte().permute(0, 2, 3, 1).numpy()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(
        names=["circle", "square", "triangle", "cross", "ring"])})
    table = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels],
                                        "label": shapes.labels.tolist()}, features=features)
    explain_dataset(DAAM(tiny_vit()), table, sys.argv[1], batch_size=4, target="label",
                    progress=False)
""")


@pytest.mark.parametrize("source", ["image folder", "hugging face folder", "shapes",
                                    "hugging face in memory"])
def test_the_same_command_in_new_processes_resumes_and_then_finds_the_store_complete(
    model, shapes, source, tmp_path
):
    out = tmp_path / "maps.zarr"
    if source == "image folder":
        data = str(image_folder(tmp_path / "images", shapes))
    elif source == "hugging face folder":
        data = str(tmp_path / "hf")
        hugging_face_table(shapes).save_to_disk(data)
    else:
        data = "shapes:12:11"
    if source == "hugging face in memory":
        pytest.importorskip("datasets")
        script, arguments = tmp_path / "run.py", [str(out)]
        script.write_text(HUGGING_FACE_RUN)
    else:
        script = tmp_path / "command.py"
        script.write_text(COMMAND)
        arguments = ["explain-dataset", "--model", "tiny-vit", "--data", data, "--out",
                     str(out), "--batch-size", "4", "--target", "label", "--no-progress"]
    # a crash, then the same command twice, each in a new process
    runs = [[sys.executable, str(script), *arguments, *end] for end in (["crash"], [], [])]

    interrupted = subprocess.run(runs[0], env=subprocess_env(), capture_output=True, text=True,
                                 timeout=300)
    assert interrupted.returncode == 1 and "injected crash" in interrupted.stderr, \
        interrupted.stderr[-3000:]
    assert read(out, "complete").tolist() == [True, False, False]
    first_chunk = {path: mtime for path, mtime in chunk_files(out).items()
                   if path.name == "0" and path.parent.name == "c"}

    resumed = subprocess.run(runs[1], env=subprocess_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "other settings" not in resumed.stderr
    assert read(out, "complete").all()
    # chunk 0 was kept, not computed again
    assert {path: chunk_files(out)[path] for path in first_chunk} == first_chunk

    finished = chunk_files(out)
    again = subprocess.run(runs[2], env=subprocess_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert chunk_files(out) == finished  # a finished store: nothing written again

    # the values equal an uninterrupted run's, computed in this process from the same images
    images = shapes.images if source == "shapes" else torch.stack(
        [torch.from_numpy(np.array(picture)).permute(2, 0, 1)
         for picture in to_uint8_pictures(shapes.images)]).float() / 255
    order = list(range(12))
    if source == "image folder":  # ImageFolder: class folders by name, files by name
        order = sorted(order, key=lambda i: (CLASS_NAMES[int(shapes.labels[i])], f"{i}.png"))
    expected = batched_attribute(model, images[order], 4, target=shapes.labels[order])
    np.testing.assert_allclose(read(out, "maps"), expected.to(torch.float16).numpy(),
                               rtol=1e-3, atol=1e-6)
    assert read(out, "labels").tolist() == shapes.labels[order].tolist()


def test_dataset_identity_is_made_of_values_the_same_in_every_process(shapes, tmp_path):
    """The settings name the transform by its data config, and a folder by its files below
    the root: no memory address, no absolute path."""
    root = image_folder(tmp_path / "images", shapes)
    store = explain_dataset(DAAM(tiny_vit()), str(root), tmp_path / "m.zarr", progress=False)
    identity = store.attrs["settings"]["dataset"]
    text = repr(identity)
    assert " at 0x" not in text and str(tmp_path) not in text
    assert identity["transform"].startswith("TimmPreprocessing(")
    assert identity["images"] == 12


# ---- a user's files are never removed ------------------------------------------------------


@pytest.mark.parametrize("content", ["partial files", "empty folders"])
def test_a_folder_of_a_users_partial_files_or_empty_folders_is_refused_and_kept(
    model, shapes, content, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    if content == "partial files":
        (out / "thesis.partial").write_text("three years of work")
        (out / "zarr.0123456789abcdef0123456789abcdef.partial").write_text("mine too")
    else:
        (out / "empty" / "nested").mkdir(parents=True)
    before = sorted(path.relative_to(out) for path in out.rglob("*"))
    with pytest.raises(ValueError, match="holds other files or folders"):
        explain_dataset(DAAM(model), shapes, out, progress=False)
    assert sorted(path.relative_to(out) for path in out.rglob("*")) == before
    if content == "partial files":
        assert (out / "thesis.partial").read_text() == "three years of work"


def test_an_empty_folder_becomes_the_store(model, shapes, tmp_path):
    out = tmp_path / "empty.zarr"
    out.mkdir()
    store = explain_dataset(DAAM(model), shapes, out, batch_size=4, progress=False)
    assert store["complete"][:].all()


def test_temporaries_are_removed_only_when_no_other_run_holds_the_store(
    model, shapes, tmp_path
):
    out = tmp_path / "m.zarr"
    explain_dataset(DAAM(model), shapes, out, batch_size=4, progress=False)
    ours = out / "maps" / "c" / f"1.{uuid.uuid4().hex}.partial"  # as zarr names them
    users = out / "maps" / "c" / "notes.partial"  # not a name zarr gives
    ours.write_bytes(b"half")
    users.write_bytes(b"kept")
    with open(out / ".captum_daam.lock", "a+b") as other_run:
        fcntl.flock(other_run, fcntl.LOCK_SH)  # another run is writing the store
        explain_dataset(DAAM(model), shapes, out, batch_size=4, progress=False)
        assert ours.exists()
    explain_dataset(DAAM(model), shapes, out, batch_size=4, progress=False)
    assert not ours.exists() and users.read_bytes() == b"kept"


def test_creations_abandoned_by_a_killed_run_are_removed_and_live_ones_kept(
    model, shapes, tmp_path
):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    abandoned = tmp_path / f".m.zarr.creating.{host}.{dead.pid}.{uuid.uuid4().hex}"
    live = tmp_path / f".m.zarr.creating.{host}.{os.getpid()}.{uuid.uuid4().hex}"
    other = tmp_path / ".m.zarr.creating.mine"  # not a name of ours
    for folder in (abandoned, live, other):
        folder.mkdir()
    explain_dataset(DAAM(model), shapes, tmp_path / "m.zarr", batch_size=4, progress=False)
    assert not abandoned.exists() and live.exists() and other.exists()


# ---- two runs created at the same moment ---------------------------------------------------

# Several trials; in each, this process starts at the same wall-clock moment as its twin.
# argv: the folder of the trials' stores, the first start time, the batch size, trials.
RACING_RUN = textwrap.dedent("""
    import sys, time
    from captum_daam import cli

    folder, start, batch, trials = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    codes = []
    for trial in range(trials):
        time.sleep(max(0.0, start + 2.0 * trial - time.time()))
        codes.append(cli.main(["explain-dataset", "--model", "tiny-vit", "--data",
                               "shapes:8:1", "--out", f"{folder}/{trial}.zarr",
                               "--batch-size", batch, "--no-progress"]))
    print("codes", *codes)
""")


@pytest.mark.parametrize("same_settings", [True, False], ids=["same", "other"])
def test_two_runs_created_at_the_same_moment_leave_one_whole_store(
    model, same_settings, tmp_path
):
    trials = 6
    script = tmp_path / "race.py"
    script.write_text(RACING_RUN)
    start = time.time() + 12  # after both processes have imported torch
    batches = ["4", "4" if same_settings else "2"]
    runs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(start), batch,
                              str(trials)], env=subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for batch in batches]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stderr[-3000:]
    codes = [list(map(int, stdout.split()[1:])) for stdout, _ in outputs]
    reference = explain_dataset(DAAM(model), ShapesDataset(8, seed=1), tmp_path / "ref.zarr",
                                batch_size=4, progress=False)
    for trial in range(trials):
        store = zarr.open_group(str(tmp_path / f"{trial}.zarr"), mode="r")
        assert store["complete"][:].all()
        pair = [codes[0][trial], codes[1][trial]]
        if same_settings:
            assert pair == [0, 0]
            assert_same_store(tmp_path / f"{trial}.zarr", tmp_path / "ref.zarr")
        else:
            assert sorted(pair) == [0, 2], pair  # one wins, the other is refused
            winner = batches[pair.index(0)]
            assert store.attrs["settings"]["batch_size"] == int(winner)
    assert reference["complete"][:].all()
    for _, stderr in outputs:
        lines = [line for line in stderr.splitlines() if line]
        assert all(line.startswith("captum-daam: error: The store") and "other settings" in
                   line for line in lines), stderr[-3000:]
    # no half-created store or creation folder is left
    assert not list(tmp_path.glob(".*.creating.*"))


# ---- labels and items ----------------------------------------------------------------------


class Items(torch.utils.data.Dataset):
    """Images of the shapes dataset, with one item changed at ``index``."""

    def __init__(self, shapes, index=None, image=None, label=None):
        self.shapes, self.index, self.image, self.label = shapes, index, image, label

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, index):
        image, label, _ = self.shapes[index]
        if index == self.index:
            image = image if self.image is None else self.image
            label = label if self.label is None else self.label
        return image, label


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("changed, message", [
    (dict(image=torch.rand(1, 64, 64)), r"torch\.float32 tensor of shape \(1, 64, 64\)"),
    (dict(image=torch.rand(3, 48, 64)), r"shape \(3, 48, 64\)"),
    (dict(image=torch.rand(3, 64, 64, dtype=torch.float64)), "torch.float64"),
    (dict(label=2.0), "int label, got float"),
], ids=["one channel", "other size", "float64", "float label"])
def test_an_item_unlike_the_first_is_refused_naming_its_real_index(
    model, shapes, changed, message, num_workers, tmp_path
):
    with pytest.raises((ValueError, TypeError), match=message) as error:
        explain_dataset(DAAM(model), Items(shapes, index=9, **changed), tmp_path / "m.zarr",
                        batch_size=4, num_workers=num_workers, progress=False)
    assert "at index 9" in str(error.value)


def test_numpy_integer_labels_are_accepted(model, shapes, tmp_path):
    labels = [np.int64(label) for label in shapes.labels[:6].tolist()]
    labels[1] = np.uint8(labels[1])
    labels[2] = np.array(labels[2])  # a 0-d array, as a numpy column gives

    class NumpyLabels(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, index):
            return shapes.images[index], labels[index]

    store = explain_dataset(DAAM(model), NumpyLabels(), tmp_path / "m.zarr", batch_size=4,
                            target="label", progress=False)
    assert store["labels"][:].tolist() == shapes.labels[:6].tolist()


def test_a_first_image_of_another_dtype_than_the_model_is_refused_before_any_work(
    model, shapes, tmp_path
):
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        items = [(image.to(dtype), label) for image, label, _ in [shapes[0], shapes[1]]]
        with pytest.raises(ValueError, match=str(dtype).replace("torch.", "")):
            explain_dataset(DAAM(model), items, tmp_path / "m.zarr", progress=False)
        assert not (tmp_path / "m.zarr").exists()


def test_a_model_on_the_meta_device_is_refused_before_any_work(shapes, tmp_path):
    with torch.device("meta"):
        meta_model = tiny_vit(pretrained=False)
    with pytest.raises(ValueError, match="meta device"):
        explain_dataset(DAAM(meta_model), shapes, tmp_path / "m.zarr", progress=False)
    assert not (tmp_path / "m.zarr").exists()


def test_hugging_face_class_names_of_the_models_classes_give_its_indices(
    model, shapes, tmp_path
):
    datasets = pytest.importorskip("datasets")
    shuffled = ["ring", "cross", "circle", "triangle", "square"]  # the dataset's own order
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=shuffled)})
    own = [shuffled.index(CLASS_NAMES[label]) for label in shapes.labels.tolist()]
    table = datasets.Dataset.from_dict(
        {"image": to_uint8_pictures(shapes.images), "label": own}, features=features)
    store = explain_dataset(DAAM(model), table, tmp_path / "hf.zarr", batch_size=4,
                            progress=False)
    assert store["labels"][:].tolist() == shapes.labels.tolist()
    assert store.attrs["labels"]["class_to_index"] == {name: CLASS_NAMES.index(name)
                                                       for name in shuffled}


# ---- errors in one line --------------------------------------------------------------------


def run_command(arguments, capsys):
    capsys.readouterr()
    code = cli.main(["explain-dataset", "--model", "tiny-vit", "--no-progress", *arguments])
    error = capsys.readouterr().err.strip()
    return code, error


def assert_one_line_error(code, error, *words):
    assert code == 2, error
    assert error.count("\n") == 0 and error.startswith("captum-daam: error:"), error
    for word in words:
        assert word in error, error


def test_a_full_disk_stops_in_one_line_and_the_same_command_resumes(
    model, tmp_path, capsys, monkeypatch
):
    from zarr.storage import LocalStore

    out = tmp_path / "full.zarr"
    original = LocalStore.set

    async def full_disk(self, key, value):
        if key.startswith("maps/c/1"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await original(self, key, value)

    monkeypatch.setattr(LocalStore, "set", full_disk)
    arguments = ["--data", "shapes:12:4", "--out", str(out), "--batch-size", "4"]
    code, error = run_command(arguments, capsys)
    assert_one_line_error(code, error, "ENOSPC", "free some space", "run the same command")
    assert read(out, "complete").tolist() == [True, False, False]

    monkeypatch.setattr(LocalStore, "set", original)
    assert run_command(arguments, capsys)[0] == 0
    reference = explain_dataset(DAAM(model), ShapesDataset(12, seed=4), tmp_path / "ref.zarr",
                                batch_size=4, progress=False)
    assert reference["complete"][:].all()
    assert_same_store(out, tmp_path / "ref.zarr", ARRAYS)


def test_an_empty_class_folder_is_refused_in_one_line(shapes, tmp_path, capsys):
    root = image_folder(tmp_path / "images", shapes)
    (root / "hexagon").mkdir()
    code, error = run_command(["--data", str(root), "--out", str(tmp_path / "m.zarr")], capsys)
    assert_one_line_error(code, error, "got none in 'hexagon'", "to hold images")
    assert not (tmp_path / "m.zarr").exists()
    with pytest.raises(ValueError, match="no folders in it"):
        explain_dataset(DAAM(tiny_vit()), str(root / "hexagon"), tmp_path / "m.zarr",
                        progress=False)


def test_a_saved_dataset_dict_is_refused_naming_its_splits(shapes, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    table = hugging_face_table(shapes)
    folder = tmp_path / "splits"
    datasets.DatasetDict({"train": table.select(range(8)), "test": table.select(range(8, 12))}
                         ).save_to_disk(str(folder))
    code, error = run_command(["--data", str(folder), "--out", str(tmp_path / "m.zarr")],
                              capsys)
    assert_one_line_error(code, error, "DatasetDict", "train, test", str(folder / "train"))
    with pytest.raises(ValueError, match="train, test"):
        explain_dataset(DAAM(tiny_vit()), str(folder), tmp_path / "m.zarr", progress=False)
    with pytest.raises(TypeError, match=r"\['train', 'test'\]"):
        explain_dataset(DAAM(tiny_vit()), datasets.load_from_disk(str(folder)),
                        tmp_path / "m.zarr", progress=False)
    # one split's folder is a dataset
    assert run_command(["--data", str(folder / "test"), "--out", str(tmp_path / "t.zarr")],
                       capsys)[0] == 0
    assert read(tmp_path / "t.zarr", "labels").tolist() == shapes.labels[8:].tolist()


def test_other_settings_are_refused_before_the_model_and_the_data_are_loaded(
    tmp_path, capsys, monkeypatch
):
    from captum_daam import data
    from captum_daam.cli import explain_dataset as command

    out = tmp_path / "m.zarr"
    assert run_command(["--data", "shapes:6", "--out", str(out), "--batch-size", "4"],
                       capsys)[0] == 0

    def never(*args, **kwargs):
        raise AssertionError("loaded before the settings were compared")

    monkeypatch.setattr(command, "_load_model", never)  # where the command looks it up
    monkeypatch.setattr(data.ShapesDataset, "__init__", never)
    for changed, shown in [(["--batch-size", "8"], "batch_size 4 vs 8"),
                           (["--batch-size", "4", "--flow"], "return_flow False vs True"),
                           (["--batch-size", "4", "--dtype", "float32"],
                            "dtype 'float16' vs 'float32'"),
                           (["--batch-size", "4", "--target", "label"],
                            "target 'predicted' vs 'label'")]:
        code, error = run_command(["--data", "shapes:6", "--out", str(out), *changed], capsys)
        assert_one_line_error(code, error, "other settings", shown)


def test_a_refusal_shows_values_not_addresses(model, shapes, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    image_folder(first, shapes)
    image_folder(second, ShapesDataset(12, seed=12))
    out = tmp_path / "m.zarr"
    explain_dataset(DAAM(model), str(first), out, progress=False)
    with pytest.raises(ValueError, match="dataset.files_sha256") as error:
        explain_dataset(DAAM(model), str(second), out, progress=False)
    assert " at 0x" not in str(error.value)


# The run under test: the package's command line, with a stack dump of every thread of every
# process of the run on SIGUSR1 (DataLoader workers are forked, so they inherit it).
DUMPING_MAIN = ("import faulthandler, signal, sys; "
                "faulthandler.register(signal.SIGUSR1, all_threads=True); "
                "from captum_daam.cli import main; sys.exit(main(sys.argv[1:]))")


def default_signal_handling() -> None:
    """In the child before it runs: SIGINT and SIGTERM handled by default and not blocked,
    however the tests were started (a shell's background job ignores SIGINT; a runner may
    block or ignore SIGTERM, and children inherit both)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def test_sigterm_to_the_process_group_with_workers_gives_one_line(tmp_path):
    out = tmp_path / "m.zarr"
    run = subprocess.Popen(
        [sys.executable, "-c", DUMPING_MAIN, "explain-dataset", "--model", "tiny-vit",
         "--data", "shapes:16000", "--out", str(out), "--batch-size", "16", "--num-workers",
         "2", "--no-progress"],
        env=subprocess_env(), stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=default_signal_handling)
    try:
        # Far more images than run before the signal: the run must still be going when the
        # first chunk is seen complete.
        wait_for_complete_chunks(out, 1, run, seconds=240)
        assert run.poll() is None, "the run ended before a chunk was seen complete"
        os.killpg(run.pid, signal.SIGTERM)  # the main process and its DataLoader workers
        try:
            _, stderr = run.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGUSR1)  # where every process of the run is stuck
            time.sleep(5)
            os.killpg(run.pid, signal.SIGKILL)
            _, stderr = run.communicate()
            pytest.fail(f"the run did not end within 120 s of SIGTERM; its stacks:\n{stderr}")
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stderr.strip().splitlines() == [
        "captum-daam: terminated (SIGTERM); the outputs already written are complete"], stderr


# ---- the class names models know ----------------------------------------------------------


def test_imagenet_folders_of_a_timm_model_take_imagenet_indices(shapes, tmp_path):
    """ImageNet's own folder names (WordNet ids) and class names, for a timm ImageNet model
    (random weights; its pretrained_cfg names the ImageNet classes)."""
    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    # ImageNet-1k: 0 tench (n01440764), 1 goldfish (n01443537), 2 great white shark
    folders = ["n01440764", "goldfish", "Great_White_Shark"]
    save_image_folder(tmp_path / "images", to_uint8_pictures(shapes.images[:3]), folders)
    store = explain_dataset(DAAM(model), str(tmp_path / "images"), tmp_path / "m.zarr",
                            progress=False)
    by_folder = dict(zip(sorted(folders), store["labels"][:].tolist()))
    assert by_folder == {"n01440764": 0, "goldfish": 1, "Great_White_Shark": 2}
    assert store.attrs["labels"]["model_classes"] is True


def test_hugging_face_id2label_names_the_classes(shapes, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=224, patch_size=32,
                                    id2label={0: "dog", 1: "cat"}, label2id={"dog": 0, "cat": 1})
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    save_image_folder(tmp_path / "images", to_uint8_pictures(shapes.images[:2]), ["dog", "cat"])
    store = explain_dataset(DAAM(model), str(tmp_path / "images"), tmp_path / "m.zarr",
                            progress=False)
    assert store["labels"][:].tolist() == [1, 0]  # cat/1.png, then dog/0.png
    assert store.attrs["labels"]["class_to_index"] == {"cat": 1, "dog": 0}
