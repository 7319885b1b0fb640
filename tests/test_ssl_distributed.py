"""MemoryBank.build under torchrun (two gloo processes on CPU): each process runs the backbone
over its own block of the loader's batches, and every process ends with the bank that one
process builds from the same loader, compared value for value against that single-process
build. The nccl path (tensors moved to the rank's CUDA device) needs GPUs and is not run here.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, SubsetRandomSampler

from captum_daam import MemoryBank
from captum_daam.ssl import _block_bounds

REPO_ROOT = Path(__file__).resolve().parents[1]

# Written to a temporary folder and run by torchrun; the test imports it too, for the loaders
# and the backbone of the single-process builds it compares with.
SCRIPT = '''
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

import captum_daam
from captum_daam import MemoryBank
from captum_daam.zoo import tiny_vit


def random_images(size, seed):
    """(size, 3, 64, 64) images in [0, 1] and labels of 5 classes, the same in every process."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(size, 3, 64, 64, generator=generator)
    return images, torch.randint(0, 5, (size,), generator=generator)


class RecordingImages(Dataset):
    """Images with their labels, remembering which indices were loaded."""

    def __init__(self, size, seed):
        self.images, self.labels = random_images(size, seed)
        self.loaded = []

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        self.loaded.append(int(index))
        return self.images[index], self.labels[index]


class BatchesOfImages(Dataset):
    """Items that are whole batches, for a loader with automatic batching off."""

    def __init__(self, sizes, seed):
        images, labels = random_images(sum(sizes), seed)
        bounds = torch.tensor([0] + list(sizes)).cumsum(0).tolist()
        self.batches = [
            (images[start:stop], labels[start:stop])
            for start, stop in zip(bounds[:-1], bounds[1:])
        ]

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.batches[index]


def make_backbone():
    backbone = tiny_vit()
    backbone.reset_classifier(0)  # headless: the (B, 96) [class] token features
    return backbone.eval()


def make_loaders():
    """name: a loader, built the same way in every process and in the test."""
    return {
        "uneven": DataLoader(RecordingImages(13, seed=3), batch_size=3),
        "one_example": DataLoader(RecordingImages(1, seed=4), batch_size=3),
        "drop_last": DataLoader(RecordingImages(13, seed=5), batch_size=4, drop_last=True),
        "unbatched": DataLoader(BatchesOfImages([2, 5, 1], seed=6), batch_size=None),
    }


def main(out):
    dist.init_process_group("gloo")  # build never initialises a group: the script does
    rank = dist.get_rank()
    backbone = make_backbone()
    loaded = {}
    for name, loader in make_loaders().items():
        bank = MemoryBank.build(backbone, loader, progress=False)
        bank.save(out / f"{name}_rank{rank}.safetensors")
        loaded[name] = getattr(loader.dataset, "loaded", None)

    def failing_on_rank_1(images):
        if dist.get_rank() == 1:
            raise OSError("unreadable image")
        return backbone(images)

    try:
        MemoryBank.build(failing_on_rank_1, make_loaders()["uneven"], progress=False)
        failure = None
    except Exception as error:
        failure = {"type": type(error).__name__, "message": str(error)}
    summary = {
        "loaded": loaded,
        "failure": failure,
        "world_size": dist.get_world_size(),
        "package": captum_daam.__file__,
    }
    (out / f"summary_rank{rank}.json").write_text(json.dumps(summary))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
'''


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Runs SCRIPT under torchrun with two processes once; returns its folder and module."""
    folder = tmp_path_factory.mktemp("distributed_bank")
    script = folder / "build_bank.py"
    script.write_text(SCRIPT)
    python_path = [str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(python_path))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(script), str(folder)]
    result = subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=180, cwd=folder
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    specification = importlib.util.spec_from_file_location("build_bank", script)
    module = importlib.util.module_from_spec(specification)
    specification.loader.exec_module(module)
    return folder, module


@pytest.mark.parametrize("name", ["uneven", "one_example", "drop_last", "unbatched"])
def test_every_process_ends_with_the_single_process_bank(two_process_run, name):
    folder, module = two_process_run
    loader = module.make_loaders()[name]
    expected = MemoryBank.build(module.make_backbone(), loader, progress=False)
    for rank in (0, 1):
        bank = MemoryBank.load(folder / f"{name}_rank{rank}.safetensors")
        assert torch.equal(bank.features, expected.features), f"rank {rank}"
        assert torch.equal(bank.labels, expected.labels), f"rank {rank}"
    assert len(expected) == {"uneven": 13, "one_example": 1, "drop_last": 12, "unbatched": 8}[name]


def test_each_process_loads_only_its_own_contiguous_block_of_batches(two_process_run):
    folder, _ = two_process_run
    summaries = [json.loads((folder / f"summary_rank{r}.json").read_text()) for r in (0, 1)]
    assert [summary["world_size"] for summary in summaries] == [2, 2]
    for summary in summaries:  # the code under test, not another installed copy
        assert Path(summary["package"]).resolve().is_relative_to(REPO_ROOT)
    # 13 examples in batches of 3: five batches, three to rank 0 and two to rank 1
    assert summaries[0]["loaded"]["uneven"] == list(range(9))
    assert summaries[1]["loaded"]["uneven"] == list(range(9, 13))
    # one batch for two processes: rank 1 has an empty share, nothing is repeated
    assert summaries[0]["loaded"]["one_example"] == [0]
    assert summaries[1]["loaded"]["one_example"] == []
    # drop_last: the last, partial batch (index 12) is loaded by no one, as in one process
    assert summaries[0]["loaded"]["drop_last"] == list(range(8))
    assert summaries[1]["loaded"]["drop_last"] == list(range(8, 12))


def test_a_failure_in_one_process_is_raised_in_every_process_instead_of_hanging(
    two_process_run,
):
    folder, _ = two_process_run
    summaries = [json.loads((folder / f"summary_rank{r}.json").read_text()) for r in (0, 1)]
    assert summaries[1]["failure"] == {"type": "OSError", "message": "unreadable image"}
    assert summaries[0]["failure"]["type"] == "RuntimeError"
    assert "rank(s) [1] failed" in summaries[0]["failure"]["message"]


# ----------------------------------------------------------------- in this process


def test_blocks_are_contiguous_and_as_even_as_numpy_array_split(tmp_path):
    for count in range(0, 12):
        for world_size in (1, 2, 3, 5):
            expected = np.array_split(np.arange(count), world_size)
            for rank, block in enumerate(expected):
                start, stop = _block_bounds(count, rank, world_size)
                assert list(range(start, stop)) == block.tolist()


def test_distributed_true_without_a_process_group_is_refused():
    assert not dist.is_initialized()
    batches = [(torch.ones(2, 3), torch.zeros(2))]
    with pytest.raises(ValueError, match="init_process_group"):
        MemoryBank.build(torch.nn.Identity(), batches, progress=False, distributed=True)
    with pytest.raises(TypeError, match="None, True or False"):
        MemoryBank.build(torch.nn.Identity(), batches, progress=False, distributed=1)


def feature_batches():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(7, 5, generator=generator)
    labels = torch.randint(0, 3, (7,), generator=generator)
    return features, labels


def test_loaders_that_cannot_be_shared_in_order_are_refused_with_the_reason(process_group):
    features, labels = feature_batches()
    dataset = torch.utils.data.TensorDataset(features, labels)
    unshareable = {
        "a list": [(features, labels)],
        "RandomSampler": DataLoader(dataset, batch_size=2, shuffle=True),
        "SubsetRandomSampler": DataLoader(dataset, sampler=SubsetRandomSampler(range(7))),
        "custom batch sampler": DataLoader(dataset, batch_sampler=[[0, 1], [2]]),
    }
    for reason, loader in unshareable.items():
        with pytest.raises(ValueError, match=f"shuffle=False.*got .*{reason}.*distributed=False"):
            MemoryBank.build(torch.nn.Identity(), loader, progress=False, distributed=True)


def test_a_group_of_one_process_builds_the_same_bank_on_either_path(process_group):
    features, labels = feature_batches()
    loader = DataLoader(torch.utils.data.TensorDataset(features, labels), batch_size=3)
    shared = MemoryBank.build(torch.nn.Identity(), loader, progress=False, distributed=True)
    assert torch.equal(shared.features, torch.nn.functional.normalize(features, dim=1))
    assert torch.equal(shared.labels, labels)
    # default with one process, and distributed=False: any iterable, as before
    for distributed in (None, False):
        alone = MemoryBank.build(
            torch.nn.Identity(), [(features, labels)], progress=False, distributed=distributed
        )
        assert torch.equal(alone.features, shared.features)
        assert torch.equal(alone.labels, shared.labels)
