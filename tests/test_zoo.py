"""The bundled tiny ViT: architecture, shipped weights, accuracy, loading from an install."""

import os
import subprocess
import sys
from importlib import resources

import torch
from timm.models.vision_transformer import VisionTransformer

from captum_daam import DAAM
from captum_daam.data import make_shapes
from captum_daam.zoo import TINY_VIT_WEIGHTS, tiny_vit

TEST_SEED = 31_337  # used by neither training (seeds 0, 1, ...) nor its held-out set


def test_a_timm_vit_with_patch_8_six_blocks_and_a_class_token():
    model = tiny_vit()
    assert isinstance(model, VisionTransformer)
    assert model.patch_embed.patch_size == (8, 8)
    assert len(model.blocks) >= 6
    assert model.cls_token is not None and model.num_prefix_tokens == 1
    assert not model.training


def test_the_weights_ship_inside_the_package_and_are_small():
    weights = resources.files("captum_daam.zoo").joinpath(TINY_VIT_WEIGHTS)
    assert weights.is_file()
    with resources.as_file(weights) as path:
        assert os.path.getsize(path) <= 5 * 2**20


def test_held_out_accuracy_on_2000_fresh_images():
    model = tiny_vit()
    images, labels, _ = make_shapes(2000, seed=TEST_SEED)
    with torch.no_grad():
        predictions = torch.cat([model(batch).argmax(1) for batch in images.split(500)])
    accuracy = float((predictions == labels[:, 0]).float().mean())
    assert accuracy >= 0.97, accuracy


def test_random_weights_differ_from_the_shipped_ones():
    trained, untrained = tiny_vit(), tiny_vit(pretrained=False)
    assert not torch.equal(trained.head.weight, untrained.head.weight)


def test_daam_runs_on_it_with_an_8x8_flow():
    images, labels, _ = make_shapes(4, seed=1)
    flow = DAAM(tiny_vit()).attribute(images, target=labels[:, 0], return_flow=True)
    assert flow.shape == (4, len(tiny_vit().blocks), 8, 8)


def test_loads_from_another_directory(tmp_path):
    """In CI the package is installed with a plain `pip install .`: this loads that copy."""
    script = (
        "import captum_daam, torch; from captum_daam.zoo import tiny_vit; "
        "m = tiny_vit(); print(captum_daam.__file__); "
        "print(m(torch.zeros(1, 3, 64, 64)).shape)"
    )
    environment = dict(os.environ)
    environment.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
        env=environment, check=True,
    )
    assert "torch.Size([1, 5])" in result.stdout


def test_training_is_deterministic(capsys):
    from captum_daam.zoo.train_tiny_vit import train

    runs = [train(epochs=1, images_per_epoch=128, batch_size=64, lr=1e-3, threads=2)
            for _ in range(2)]
    first, second = (model.state_dict() for model, _, _ in runs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert runs[0][1] == runs[1][1]  # the same held-out accuracy
    assert "held-out accuracy" in capsys.readouterr().out
