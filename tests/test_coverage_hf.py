"""benchmarks/coverage_hf.py, the census of Hugging Face transformers' vision models and
open_clip's configs: its records for three small classes, and its reading of
``nn.MultiheadAttention``'s output before the output projection, against an explicit one."""

import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import coverage_hf  # noqa: E402

NAMES = ["ViTForImageClassification", "ResNetForImageClassification", "CLIPModel"]


def test_census_records_an_exact_a_refused_and_an_image_text_model(tmp_path):
    out = tmp_path / "coverage_hf"
    code = coverage_hf.main(["--names", *NAMES, "--out", str(out), "--threads", "2"])
    assert code == 0  # nothing crashed
    stored = json.loads((tmp_path / "coverage_hf.json").read_text())
    records = {record["name"]: record for record in stored["models"]}
    assert sorted(records) == sorted(NAMES)

    vit = records["ViTForImageClassification"]
    assert (vit["status"], vit["task"], vit["config"], vit["queries"]) == (
        "exact", "image classification", "small", "class")
    assert vit["input_size"] == [64, 64] and vit["grids"] == [[4, 4]] and vit["blocks"] == 2
    assert max(vit["decomposition_error"], vit["map_error"]) <= 1e-4
    assert vit["blocks_with_positive_map"] >= 1

    resnet = records["ResNetForImageClassification"]
    assert resnet["status"] == "refused"
    assert resnet["reason"].startswith("DAAM has no adapter for a model of type ResNetFor")
    assert "It has no attention module" in resnet["reason"]  # the true reason, its 2nd sentence
    assert "decomposition_error" not in resnet  # refused before any work

    clip = records["CLIPModel"]  # through ImageTextSimilarity(model, input_ids=random ids)
    assert (clip["status"], clip["task"], clip["family"]) == ("exact", "image-text", "clip")
    assert max(clip["decomposition_error"], clip["map_error"]) <= 1e-4

    summary = (tmp_path / "coverage_hf.md").read_text()
    assert "3 models: 2 exact, 0 runs, 1 refused, 0 crashed, 0 not built" in summary
    assert "| clip | 1 | image-text | 1 | 0 | 0 | 0 | 0 | class |" in summary


def test_multihead_reading_is_the_output_before_out_proj_and_leaves_the_output_alone():
    torch.manual_seed(0)
    for batch_first in (True, False):
        attention = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
        tokens = torch.randn(3, 5, 8)  # (B, N, C)
        given = tokens if batch_first else tokens.transpose(0, 1)
        expected_output = attention(given, given, given, need_weights=False)[0]

        own = []
        with coverage_hf.read_projection_inputs([attention], own) as own_rows:
            output = attention(given, given, given, need_weights=False)[0]
        assert own_rows == {0} and len(own) == 1
        assert torch.equal(output, expected_output)

        # By hand, in float64: softmax(q k^T / sqrt(d)) v per head, heads concatenated.
        weight, bias = attention.in_proj_weight.double(), attention.in_proj_bias.double()
        q, k, v = F.linear(tokens.double(), weight, bias).chunk(3, dim=-1)
        q, k, v = (x.unflatten(-1, (2, 4)).transpose(1, 2) for x in (q, k, v))
        rows = (torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1) @ v).transpose(1, 2)
        assert torch.allclose(own[0].double(), rows.flatten(2), atol=1e-6)
