"""captum-daam explain with models of the Hugging Face ecosystem: a local transformers model
folder (classifier, or image-text model with --text, one flow per text) and open_clip models
with open_clip's bundled tokenizer, offline."""

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from captum_daam import DAAM, ImageTextSimilarity
from captum_daam._images import load_rgb
from captum_daam.cli import main
from helpers import add_parameter_noise, save_shape_pngs
from test_image_text import TEXT, VISION, tiny_clip_tokenizer

TEXTS = ["a photo of a dog", "a cat"]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    paths, _ = save_shape_pngs(tmp_path_factory.mktemp("images"), 1, seed=4)
    return str(paths[0])


def processor() -> transformers.CLIPImageProcessor:
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A small CLIPModel with random weights, its tokenizer and image processor, saved as
    save_pretrained saves them (what a user has after downloading a model once)."""
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)
    model = add_parameter_noise(transformers.CLIPModel(config), 0.2, 3)
    model.save_pretrained(folder)
    tiny_clip_tokenizer(folder).save_pretrained(folder)
    processor().save_pretrained(folder)
    return folder


def _files(folder: Path):
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_one_flow_per_text_from_a_local_model_folder(tmp_path, clip_folder, image_file, capsys):
    out = tmp_path / "out"
    arguments = ["explain", image_file, "--model", str(clip_folder), "--out", str(out),
                 "--no-progress", "--save-raw"]
    for text in TEXTS:
        arguments += ["--text", text]
    assert main(arguments) == 0
    assert _files(out) == [
        "index.html", "shape_t1-a-photo-of-a-dog_daam.npz", "shape_t1-a-photo-of-a-dog_flow.gif",
        "shape_t1-a-photo-of-a-dog_flow.png", "shape_t2-a-cat_daam.npz",
        "shape_t2-a-cat_flow.gif", "shape_t2-a-cat_flow.png",
    ]
    printed = capsys.readouterr().out
    assert "explained text 'a photo of a dog' (p = " in printed
    # The saved flows are DAAM's for each text's logit on the processor's input.
    model = transformers.CLIPModel.from_pretrained(clip_folder).eval()
    tokens = transformers.CLIPTokenizer.from_pretrained(clip_folder)(
        TEXTS, padding=True, return_tensors="pt"
    )
    images = processor()(images=load_rgb(image_file), do_rescale=False, return_tensors="pt")
    similarity = ImageTextSimilarity(model, **tokens)
    for index, name in enumerate(["shape_t1-a-photo-of-a-dog", "shape_t2-a-cat"]):
        expected = DAAM(similarity).attribute(images.pixel_values, target=index, return_flow=True)
        saved = np.load(out / f"{name}_daam.npz")
        assert int(saved["target"]) == index
        np.testing.assert_allclose(saved["flow"], expected[0].numpy(), rtol=1e-5, atol=1e-7)


def test_a_classifier_folder_explains_its_predicted_class(tmp_path, image_file, capsys):
    folder = tmp_path / "vit"
    config = transformers.ViTConfig(**VISION, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["explain", image_file, "--model", str(folder), "--out", str(out),
                 "--no-progress"]) == 0
    assert _files(out) == ["index.html", "shape_flow.gif", "shape_flow.png"]
    assert "explained class " in capsys.readouterr().out
    code = main(["explain", image_file, "--model", str(folder), "--out", str(tmp_path / "x"),
                 "--text", "a dog"])
    assert code == 2 and not (tmp_path / "x").exists()


def test_text_errors_are_one_line_and_write_nothing(tmp_path, clip_folder, image_file, capsys):
    out = tmp_path / "out"
    for extra, start in ((["--target", "1"], "--target and --text"),
                         (["--arch", "vit_small_patch16_224"], "--arch")):
        code = main(["explain", image_file, "--model", str(clip_folder), "--out", str(out),
                     "--text", "a dog", *extra])
        assert code == 2 and not out.exists()
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"captum-daam: error: {start}") and "\n" not in error
    code = main(["explain", image_file, "--model", str(clip_folder), "--out", str(out),
                 "--text", "a dog", "--blocks", "5"])
    assert code == 2 and not out.exists()
    capsys.readouterr()
    code = main(["explain", image_file, "--model", str(clip_folder), "--out", str(out)])
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading
    assert code == 2 and not out.exists() and error.startswith("captum-daam: error: ")
    assert "is an image-text model: give the texts to explain, --text" in error


def test_open_clip_with_its_bundled_tokenizer(tmp_path, image_file, capsys):
    out = tmp_path / "out"
    assert main(["explain", image_file, "--model", "open_clip:ViT-B-32", "--out", str(out),
                 "--text", "a circle", "--text", "a square", "--blocks", "11-12",
                 "--no-progress"]) == 0
    assert _files(out) == ["index.html", "shape_t1-a-circle_flow.gif",
                           "shape_t1-a-circle_flow.png",
                           "shape_t2-a-square_flow.gif", "shape_t2-a-square_flow.png"]
    printed = capsys.readouterr().out
    assert "explained text 'a square'" in printed and "blocks 11-12" in printed
    code = main(["explain", image_file, "--model", "open_clip:No-Such-Model", "--out",
                 str(out / "x"), "--text", "a dog"])
    assert code == 2 and "unknown open_clip model" in capsys.readouterr().err
