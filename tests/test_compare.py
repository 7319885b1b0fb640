"""Any Captum attribution in explain_dataset, and captum_daam.compare: the stored maps against
each attribution called directly on the same batches, the metrics against
captum_daam.metrics on those maps, the report's intervals against metrics.bootstrap_interval
and paired_difference on the stored values, resumption after a crash, two processes under
torchrun against one, refusals."""

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients, LayerGradCam, NoiseTunnel, Saliency

zarr = pytest.importorskip("zarr", minversion="3")

from captum_daam import (  # noqa: E402
    DAAM, AttentionRollout, GradientRollout, LeGrad, explain_dataset)
from captum_daam import metrics  # noqa: E402
from captum_daam._methods import RandomMaps  # noqa: E402
from captum_daam.comparison import compare, report  # noqa: E402
from captum_daam.data import ShapesDataset  # noqa: E402
from captum_daam.token_grid import TokenGrid  # noqa: E402
from captum_daam.zoo import tiny_vit  # noqa: E402

from test_dataset import subprocess_env  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_vit()


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(10, seed=3)


def in_batches(explain, images, targets, batch_size):
    """``explain(images, targets)`` on the store's batches, summed over channels: the
    independent path."""
    maps = []
    for start in range(0, len(images), batch_size):
        rows = slice(start, start + batch_size)
        out = explain(images[rows], targets[rows]).detach()
        maps.append(out.sum(dim=1, keepdim=True) if out.dim() == 4 else out.unsqueeze(1))
    return torch.cat(maps)


def predicted(model, images):
    with torch.no_grad():
        return model(images).argmax(1)


# ---- any attribution in explain_dataset ---------------------------------------------------


def test_any_captum_attribution_is_stored_at_the_grid_it_comes_in(model, shapes, tmp_path):
    images = shapes.images
    targets = predicted(model, images)
    layer = TokenGrid(model, model.blocks[-1].norm1)
    cases = {
        "saliency": (Saliency(model), {}, lambda x, t: Saliency(model).attribute(x, target=t),
                     (64, 64)),
        "gradient_rollout": (GradientRollout(model), {},
                             lambda x, t: GradientRollout(model).attribute(x, target=t),
                             (8, 8)),
        "gradcam": (LayerGradCam(model, layer), {"relu_attributions": True},
                    lambda x, t: LayerGradCam(model, layer).attribute(
                        x, target=t, relu_attributions=True), (8, 8)),
        "integrated_gradients": (IntegratedGradients(model), {"n_steps": 4},
                                 lambda x, t: IntegratedGradients(model).attribute(
                                     x, target=t, n_steps=4), (64, 64)),
    }
    for name, (attribution, kwargs, direct, grid) in cases.items():
        store = explain_dataset(attribution, shapes, tmp_path / f"{name}.zarr", batch_size=4,
                                dtype=torch.float32, attribute_kwargs=kwargs,
                                metrics=("pointing_game", "deletion"), progress=False)
        expected = in_batches(direct, images, targets, 4)
        assert store["maps"].shape == (10, 1, *grid), name
        np.testing.assert_allclose(store["maps"][:], expected.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(store["targets"][:], targets.numpy())
        np.testing.assert_allclose(
            store["metrics/pointing_game"][:],
            metrics.pointing_game(expected, shapes.masks).float().numpy())
        curve = metrics.deletion(model, images, expected, target=targets)
        np.testing.assert_allclose(store["metrics/deletion"][:], curve.auc.numpy(),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(store["curves/deletion"][:], curve.probabilities.numpy(),
                                   rtol=1e-5, atol=1e-6)
        method = store.attrs["settings"]["method"]
        assert method["class"] == f"{type(attribution).__module__}." \
                                  f"{type(attribution).__qualname__}"
        assert method["arguments"] == {key: value for key, value in kwargs.items()}
        assert (store["seconds"][:] > 0).all()
    assert store.attrs["settings"]["method"]["class"].endswith("IntegratedGradients")
    gradcam = zarr.open_group(str(tmp_path / "gradcam.zarr"), mode="r")
    assert gradcam.attrs["settings"]["method"]["layer"] == "TokenGrid(blocks.5.norm1)"


def test_a_callable_with_its_model_and_the_label_as_target(model, shapes, tmp_path):
    def centre(images, targets):
        maps = torch.zeros(len(images), 8, 8)
        maps[:, 3:5, 3:5] = 1 + targets[:, None, None].float()
        return maps

    store = explain_dataset(centre, shapes, tmp_path / "c.zarr", batch_size=3, model=model,
                            target="label", dtype=torch.float32, progress=False)
    expected = in_batches(centre, shapes.images, shapes.labels, 3)
    np.testing.assert_array_equal(store["maps"][:], expected.numpy())
    np.testing.assert_array_equal(store["targets"][:], shapes.labels.numpy())
    np.testing.assert_array_equal(store["predictions"][:],
                                  predicted(model, shapes.images).numpy())
    assert "centre" in store.attrs["settings"]["method"]["callable"]
    with pytest.raises(TypeError, match="model="):
        explain_dataset(centre, shapes, tmp_path / "never.zarr", progress=False)
    assert not (tmp_path / "never.zarr").exists()


class FailingShapes(ShapesDataset):
    """Shapes whose item ``fail_at`` raises, once armed."""

    fail_at = None

    def __getitem__(self, index):
        if index == self.fail_at:
            raise RuntimeError("injected")
        return super().__getitem__(index)


def test_a_random_method_resumed_after_a_crash_gives_the_uninterrupted_values(
        model, tmp_path):
    tunnel = NoiseTunnel(Saliency(model))
    kwargs = {"nt_type": "smoothgrad", "nt_samples": 3, "stdevs": 0.1}
    data = FailingShapes(12, seed=4)
    whole = explain_dataset(tunnel, data, tmp_path / "whole.zarr", batch_size=4,
                            attribute_kwargs=kwargs, dtype=torch.float32, progress=False)
    data.fail_at = 9
    with pytest.raises(RuntimeError, match="injected"):
        explain_dataset(tunnel, data, tmp_path / "cut.zarr", batch_size=4,
                        attribute_kwargs=kwargs, dtype=torch.float32, progress=False)
    assert zarr.open_group(str(tmp_path / "cut.zarr"))["complete"][:].tolist() == \
        [True, True, False]
    torch.manual_seed(123)  # the global generator does not decide the values
    data.fail_at = None
    resumed = explain_dataset(tunnel, data, tmp_path / "cut.zarr", batch_size=4,
                              attribute_kwargs=kwargs, dtype=torch.float32, progress=False)
    np.testing.assert_array_equal(resumed["maps"][:], whole["maps"][:])
    noise_free = in_batches(lambda x, t: Saliency(model).attribute(x, target=t),
                            data.images, torch.from_numpy(whole["targets"][:]), 4)
    assert not np.allclose(whole["maps"][:], noise_free.numpy())  # the noise is there


def test_random_maps_depend_on_the_image_only():
    images = torch.rand(5, 3, 16, 16)
    maps = RandomMaps((4, 4), seed=1)(images)
    assert maps.shape == (5, 1, 4, 4)
    again = torch.cat([RandomMaps((4, 4), seed=1)(images[i:i + 1]) for i in (0, 1, 2, 3, 4)])
    torch.testing.assert_close(maps, again, rtol=0, atol=0)
    assert not torch.equal(maps, RandomMaps((4, 4), seed=2)(images))
    assert not torch.equal(maps[0], maps[1])


# ---- compare ------------------------------------------------------------------------------


COMPARE_METRICS = ("pointing_game", "energy_pointing_game", "deletion",
                   "positive_perturbation", "miou")


@pytest.fixture(scope="module")
def compared(model, tmp_path_factory):
    data = ShapesDataset(12, seed=8)
    out = tmp_path_factory.mktemp("compare") / "c.zarr"
    store = compare(model, data, ["daam", "rollout", "saliency", "random"],
                    metrics=COMPARE_METRICS, out=out, batch_size=5, dtype=torch.float32,
                    progress=False, resamples=500)
    return data, out, store


def test_every_method_explains_the_same_examples_for_the_same_targets(model, compared):
    data, out, store = compared
    images, masks = data.images, data.masks
    targets = predicted(model, images)
    np.testing.assert_array_equal(store["targets"][:], targets.numpy())
    np.testing.assert_array_equal(store["labels"][:], data.labels.numpy())
    direct = {
        "daam": lambda x, t: DAAM(model).attribute(x, target=t, return_flow=True),
        "rollout": lambda x, t: AttentionRollout(model).attribute(x),
        "saliency": lambda x, t: Saliency(model).attribute(x, target=t),
        "random": RandomMaps((8, 8)),
    }
    for name, explain in direct.items():
        maps = []
        for start in range(0, 12, 5):
            rows = slice(start, start + 5)
            out_maps = explain(images[rows], targets[rows]).detach()
            maps.append(out_maps if name == "daam" else out_maps.sum(dim=1, keepdim=True))
        expected = torch.cat(maps)
        stored = store[f"methods/{name}/maps"][:]
        assert stored.shape == tuple(expected.shape), name
        np.testing.assert_allclose(stored, expected.numpy(), rtol=1e-5, atol=1e-6)
        final = expected[:, -1:]
        for metric, value in {
            "pointing_game": metrics.pointing_game(final, masks).float(),
            "energy_pointing_game": metrics.energy_pointing_game(final, masks),
            "deletion": metrics.deletion(model, images, final, target=targets).auc,
            "positive_perturbation": metrics.perturbation(model, images, final,
                                                          target=targets).auc,
            "miou": metrics.segmentation(final, masks).iou,
        }.items():
            np.testing.assert_allclose(store[f"methods/{name}/metrics/{metric}"][:],
                                       value.float().numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name} {metric}")
        assert (store[f"methods/{name}/seconds"][:] > 0).all()
    flow = torch.from_numpy(store["methods/daam/maps"][:])
    for block in range(flow.shape[1]):
        np.testing.assert_allclose(
            store["methods/daam/block_metrics/pointing_game"][:, block],
            metrics.pointing_game(flow[:, [block]], masks).float().numpy())
    summary = store.attrs["summary"]
    assert summary["examples"] == 12
    for name in direct:
        assert summary["metrics"][name]["deletion"] == pytest.approx(
            float(store[f"methods/{name}/metrics/deletion"][:].astype(np.float64).mean()))
        assert summary["seconds_per_image"][name] > 0


def test_the_report_holds_the_bootstrap_intervals_of_the_stored_values(compared, tmp_path):
    data, out, store = compared
    result = report(out, out=tmp_path / "again", resamples=500, seed=3)
    rows = {row["method"]: row for row in result["rows"]}
    assert result["reference"] == "daam" and result["random"] == "random"
    for name, row in rows.items():
        for metric in COMPARE_METRICS:
            values = torch.from_numpy(store[f"methods/{name}/metrics/{metric}"][:]).double()
            mean, low, high = metrics.bootstrap_interval(values, resamples=500, seed=3)
            assert (row[metric]["mean"], row[metric]["low"], row[metric]["high"]) == \
                pytest.approx((mean, low, high))
            assert row[metric]["mean"] == pytest.approx(float(values.mean()))
            daam = torch.from_numpy(store[f"methods/daam/metrics/{metric}"][:]).double()
            if name != "daam":
                assert row[metric]["difference"] == pytest.approx(list(
                    metrics.paired_difference(values, daam, resamples=500, seed=3)))
            if name != "random":
                chance = torch.from_numpy(store[f"methods/random/metrics/{metric}"][:]).double()
                _, low_r, high_r = metrics.paired_difference(values, chance, resamples=500,
                                                             seed=3)
                assert row[metric]["like_random"] == (low_r <= 0 <= high_r)
    for metric in COMPARE_METRICS:
        assert (metric in result["flagged_metrics"]) == all(
            rows[name][metric]["like_random"] for name in ("daam", "rollout", "saliency"))
    markdown = (tmp_path / "again" / "compare.md").read_text()
    assert markdown.count("\n| ") == 1 + 4  # header and one row per method
    assert "| daam |" in markdown and "Δ" in markdown
    with open(tmp_path / "again" / "compare.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4 * len(COMPARE_METRICS)
    saliency_deletion = next(line for line in table
                             if line["method"] == "saliency" and line["metric"] == "deletion")
    assert float(saliency_deletion["mean"]) == pytest.approx(rows["saliency"]["deletion"]["mean"])
    for name in ("curves.png", "flow.png"):
        assert (tmp_path / "again" / name).stat().st_size > 1000
    assert sorted(path.name for path in (out / "report").iterdir()) == \
        ["compare.csv", "compare.md", "curves.png", "flow.png"]


def test_compare_resumed_after_a_crash_equals_an_uninterrupted_run(model, tmp_path):
    data = FailingShapes(9, seed=2)
    settings = dict(methods=["daam", "gradient-rollout", "random"], metrics=("insertion",),
                    batch_size=3, dtype=torch.float32, progress=False, resamples=100)
    compare(model, data, out=tmp_path / "whole.zarr", **settings)
    data.fail_at = 4
    with pytest.raises(RuntimeError, match="injected"):
        compare(model, data, out=tmp_path / "cut.zarr", **settings)
    data.fail_at = None
    compare(model, data, out=tmp_path / "cut.zarr", **settings)
    whole = zarr.open_group(str(tmp_path / "whole.zarr"), mode="r")
    cut = zarr.open_group(str(tmp_path / "cut.zarr"), mode="r")
    for name in ("targets", "predictions", "scores", "complete", "methods/daam/maps",
                 "methods/gradient-rollout/maps", "methods/random/maps",
                 "methods/daam/metrics/insertion", "methods/random/curves/insertion"):
        np.testing.assert_array_equal(cut[name][:], whole[name][:], err_msg=name)
    assert cut.attrs["settings"] == whole.attrs["settings"]
    assert cut.attrs["summary"]["metrics"] == whole.attrs["summary"]["metrics"]


def test_two_processes_under_torchrun_equal_one(model, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "from captum_daam.comparison import compare\n"
        "from captum_daam.data import ShapesDataset\n"
        "from captum_daam.zoo import tiny_vit\n"
        "compare(tiny_vit(), ShapesDataset(10, seed=6), ['daam', 'saliency', 'random'],\n"
        "        metrics=['pointing_game', 'deletion'], out=sys.argv[1], batch_size=3,\n"
        "        dtype=torch.float32, progress=False, resamples=100)\n")
    two = tmp_path / "two.zarr"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(two)], env=subprocess_env(), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one = compare(model, ShapesDataset(10, seed=6), ["daam", "saliency", "random"],
                  metrics=["pointing_game", "deletion"], out=tmp_path / "one.zarr",
                  batch_size=3, dtype=torch.float32, progress=False, resamples=100)
    two_group = zarr.open_group(str(two), mode="r")
    for name in ("targets", "complete", "methods/daam/maps", "methods/saliency/maps",
                 "methods/random/maps", "methods/daam/metrics/deletion",
                 "methods/saliency/metrics/pointing_game"):
        np.testing.assert_array_equal(two_group[name][:], one[name][:], err_msg=name)
    assert two_group.attrs["settings"] == one.attrs["settings"]
    assert (two / "report" / "compare.md").is_file()


def test_refusals_before_any_work(model, shapes, tmp_path):
    out = tmp_path / "never.zarr"
    cases = [
        (dict(methods=["daam", "grad-cam"]), ValueError, "among"),
        (dict(methods={"a/b": "daam"}), ValueError, "names of letters"),
        (dict(methods=["daam", "daam"]), ValueError, "once"),
        (dict(methods=[]), ValueError, "at least one"),
        (dict(methods="daam"), TypeError, "list of names"),
        (dict(metrics=("accuracy",)), ValueError, "metrics among"),
        (dict(dataset=[(image, label) for image, label, _ in [shapes[0], shapes[1]]],
              metrics=("miou",)), ValueError, "mask"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(methods={"gr": GradientRollout(tiny_vit(pretrained=False)), "d": "daam"}),
         ValueError, "method 'gr': Expected an attribution built on the compared model"),
        (dict(target=5), ValueError, "below the model's 5 outputs"),
        (dict(methods=["rollout", "random"], target=[0] * 9 + [7]), ValueError,
         "below the model's 5 outputs, got 7"),
    ]
    for changed, kind, message in cases:
        arguments = dict(dataset=shapes, methods=["daam"], progress=False)
        arguments.update(changed)
        with pytest.raises(kind, match=message):
            compare(model, out=out, **arguments)
        assert not out.exists()
    explained = tmp_path / "explained.zarr"
    explain_dataset(DAAM(model), shapes, explained, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        compare(model, shapes, ["daam"], out=explained, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="store of captum_daam.compare"):
        report(explained)


def test_other_methods_against_an_existing_compare_store_are_refused(model, shapes, tmp_path):
    out = tmp_path / "c.zarr"
    compare(model, shapes, ["daam", "random"], metrics=(), out=out, batch_size=5,
            progress=False, resamples=50)
    with pytest.raises(ValueError, match="methods"):
        compare(model, shapes, ["daam", "saliency"], metrics=(), out=out, batch_size=5,
                progress=False)
    with pytest.raises(ValueError, match="methods.ig"):
        compare(model, shapes, {"daam": "daam", "random": (RandomMaps((8, 8)), {}),
                                "ig": (IntegratedGradients(model), {"n_steps": 2})},
                metrics=(), out=out, batch_size=5, progress=False)


# ---- the command line ---------------------------------------------------------------------


def test_the_command_line_writes_the_store_and_its_report(model, tmp_path, capsys):
    from captum_daam.cli import main

    out = tmp_path / "cli.zarr"
    code = main(["compare", "--model", "tiny-vit", "--data", "shapes:6:2", "--out", str(out),
                 "--methods", "daam,rollout,random", "--metrics", "pointing_game", "insertion",
                 "--batch-size", "4", "--dtype", "float32", "--resamples", "200",
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    expected = compare(model, ShapesDataset(6, seed=2), ["daam", "rollout", "random"],
                       metrics=["pointing_game", "insertion"], out=tmp_path / "api.zarr",
                       batch_size=4, dtype=torch.float32, progress=False, resamples=200)
    stored = zarr.open_group(str(out), mode="r")
    for name in ("targets", "methods/daam/maps", "methods/rollout/maps",
                 "methods/random/maps", "methods/daam/metrics/insertion"):
        np.testing.assert_array_equal(stored[name][:], expected[name][:], err_msg=name)
    tables = []
    for store in (out, tmp_path / "api.zarr"):
        with open(store / "report" / "compare.csv") as handle:
            tables.append([{key: value for key, value in line.items()
                            if key != "seconds_per_image"} for line in csv.DictReader(handle)])
    assert tables[0] == tables[1] and len(tables[0]) == 3 * 2


def test_command_line_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    from captum_daam.cli import main

    out = tmp_path / "never.zarr"
    for arguments, message in [
        (["--methods", "daam,gradcam++"], "--methods expects"),
        (["--methods", "daam,daam"], "each method once"),
        (["--batch-size", "0"], "--batch-size"),
        (["--data", "shapes:0"], "N >= 1"),
        (["--target", "dog"], "--target"),
        (["--methods", "daam", "--metrics", "miou", "--data", str(tmp_path)], "not a folder"
         if not tmp_path.exists() else "class folders"),
    ]:
        base = ["compare", "--model", "tiny-vit", "--data", "shapes:4", "--out", str(out),
                "--no-progress"]
        code = main(base + arguments)
        error = capsys.readouterr().err
        assert code == 2 and error.count("\n") == 1 and message in error, error
        assert not out.exists()


def test_a_partial_store_reports_its_complete_chunks_and_says_so(model, tmp_path):
    data = FailingShapes(9, seed=5)
    data.fail_at = 7
    out = tmp_path / "partial.zarr"
    with pytest.raises(RuntimeError, match="injected"):
        compare(model, data, ["daam", "random"], metrics=("deletion",), out=out,
                batch_size=3, dtype=torch.float32, progress=False)
    result = report(out, resamples=200)
    assert result["examples"] == 6 and result["of_examples"] == 9
    stored = zarr.open_group(str(out), mode="r")["methods/daam/metrics/deletion"][:6]
    row = next(row for row in result["rows"] if row["method"] == "daam")
    assert row["deletion"]["mean"] == pytest.approx(float(stored.astype(np.float64).mean()))
    assert "(of 9: the store is partial)" in (out / "report" / "compare.md").read_text()


def test_the_default_methods_leave_out_those_that_refuse_the_model(tmp_path):
    import timm

    pooled = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                               patch_size=8, depth=2, num_classes=5, class_token=False,
                               global_pool="avg").eval()
    images = torch.rand(4, 3, 32, 32)
    data = [(image, index % 5) for index, image in enumerate(images)]
    with pytest.warns(UserWarning, match="left out rollout"):
        store = compare(pooled, data, metrics=(), out=tmp_path / "c.zarr", batch_size=2,
                        progress=False, resamples=50)
    kept = sorted(store["methods"].group_keys())
    assert "rollout" not in kept and "gradient-rollout" not in kept
    assert {"daam", "gradcam", "saliency", "random", "occlusion",
            "integrated-gradients"} <= set(kept)
    with pytest.raises(TypeError, match="method 'rollout'"):
        compare(pooled, data, ["daam", "rollout"], metrics=(), out=tmp_path / "n.zarr",
                progress=False)
    assert not (tmp_path / "n.zarr").exists()


def test_what_the_maps_depend_on_is_in_the_settings(model, shapes, tmp_path):
    """A resumed store refuses a method built otherwise: its layer, whether it multiplies by
    the inputs, its forward function."""
    out = tmp_path / "s.zarr"
    for first, second, difference in [
        (AttentionRollout(model),
         AttentionRollout(model, layer=[block.attn for block in model.blocks[3:]]),
         "method.layer"),
        (IntegratedGradients(model), IntegratedGradients(model, multiply_by_inputs=False),
         "method.multiplies_by_inputs"),
        (Saliency(model), Saliency(lambda x: model(x).softmax(-1)), "method.forward_func"),
    ]:
        kwargs = {"n_steps": 2} if isinstance(first, IntegratedGradients) else {}
        explain_dataset(first, shapes, out, batch_size=5, model=model,
                        attribute_kwargs=kwargs, progress=False)
        with pytest.raises(ValueError, match=difference):
            explain_dataset(second, shapes, out, batch_size=5, model=model,
                            attribute_kwargs=kwargs, progress=False)
        import shutil

        shutil.rmtree(out)
    with pytest.raises(ValueError, match="internal_batch_size"):
        explain_dataset(Saliency(model), shapes, out, internal_batch_size=2, progress=False)
    assert not out.exists()


def test_a_target_out_of_range_leaves_no_store(model, shapes, tmp_path):
    out = tmp_path / "never.zarr"
    for attribution, target in [(RandomMaps((8, 8)), 9), (DAAM(model), [0] * 9 + [5]),
                                (AttentionRollout(model), 5)]:
        with pytest.raises(ValueError, match="below the model's 5 outputs"):
            explain_dataset(attribution, shapes, out, model=model, target=target,
                            progress=False)
        assert not out.exists()


def test_the_default_methods_leave_out_a_method_that_refuses_when_it_runs(tmp_path):
    import timm

    pit = timm.create_model("pit_ti_224", pretrained=False, img_size=64, num_classes=3).eval()
    data = [(torch.rand(3, 64, 64), index % 3) for index in range(2)]
    with pytest.warns(UserWarning, match="left out gradient-rollout: GradientRollout multiplies"):
        store = compare(pit, data, metrics=(), out=tmp_path / "c.zarr", batch_size=2,
                        progress=False, resamples=50)
    kept = set(store["methods"].group_keys())
    assert "daam" in kept and "rollout" not in kept and "gradient-rollout" not in kept


def test_a_store_without_a_complete_chunk_is_not_reported(model, tmp_path):
    data = FailingShapes(6, seed=1)
    data.fail_at = 1  # in the first chunk, after the first example was checked
    out = tmp_path / "empty.zarr"
    with pytest.raises(RuntimeError, match="injected"):
        compare(model, data, ["daam"], metrics=(), out=out, batch_size=3, progress=False)
    with pytest.raises(ValueError, match="no complete chunk|none yet"):
        report(out)


# ---- what users feed it: image folders, Hugging Face datasets, library models -------------


def test_compare_reads_an_image_folder_and_a_hugging_face_dataset(model, tmp_path):
    import datasets

    from captum_daam.data import CLASSES
    from test_dataset import save_image_folder, to_uint8_pictures

    data = ShapesDataset(6, seed=12)
    pictures = to_uint8_pictures(data.images)
    save_image_folder(tmp_path / "folder", pictures, [CLASSES[int(i)] for i in data.labels])
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(CLASSES))})
    table = datasets.Dataset.from_dict(
        {"image": pictures, "label": data.labels.tolist()}, features=features)
    # independently: the PNG pixels in [0, 1] (the bundled model's data config keeps 64 x 64
    # and normalises with mean 0, std 1)
    images = torch.stack([torch.from_numpy(np.array(picture)).permute(2, 0, 1)
                          for picture in pictures]).float() / 255
    stores = {}
    for name, source in [("folder", tmp_path / "folder"), ("hf", table)]:
        stores[name] = compare(model, source, ["daam", "saliency", "random"],
                               metrics=("insertion",), out=tmp_path / f"{name}.zarr",
                               batch_size=4, target="label", dtype=torch.float32,
                               progress=False, resamples=100)
    folder_order = torch.from_numpy(stores["folder"]["labels"][:])
    for name, store in stores.items():
        order = torch.arange(6) if name == "hf" else torch.tensor(sorted(
            range(6), key=lambda i: (CLASSES[int(data.labels[i])], f"{i}.png")))
        targets = data.labels[order]
        np.testing.assert_array_equal(store["targets"][:], targets.numpy())
        expected = in_batches(lambda x, t: Saliency(model).attribute(x, target=t),
                              images[order], targets, 4)
        np.testing.assert_allclose(store["methods/saliency/maps"][:], expected.numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
        flow = torch.cat([DAAM(model).attribute(images[order][rows], target=targets[rows],
                                                return_flow=True)
                          for rows in (slice(0, 4), slice(4, 6))])
        np.testing.assert_allclose(store["methods/daam/maps"][:], flow.numpy(), rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    assert folder_order.tolist() == data.labels[torch.tensor(sorted(
        range(6), key=lambda i: (CLASSES[int(data.labels[i])], f"{i}.png")))].tolist()
    assert (tmp_path / "hf.zarr" / "report" / "compare.md").is_file()


def test_compare_on_timm_and_transformers_models_built_from_their_configs(tmp_path):
    import timm
    import transformers

    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    data = [(image, index % 3) for index, image in enumerate(images)]
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=8, depth=2, num_classes=3).eval()
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, num_labels=3)
    hf_vit = transformers.ViTForImageClassification(config).eval()
    for name, model in [("timm", deit), ("hf", hf_vit)]:
        store = compare(model, data, ["daam", "legrad", "gradient-rollout", "gradcam",
                                      "saliency", "random"],
                        metrics=("deletion",), out=tmp_path / f"{name}.zarr", batch_size=2,
                        dtype=torch.float32, progress=False, resamples=100)
        with torch.no_grad():
            output = model(images)
        logits = getattr(output, "logits", output)
        np.testing.assert_array_equal(store["predictions"][:], logits.argmax(1).numpy())
        expected = torch.cat([LeGrad(model).attribute(images[rows], target=logits[rows].argmax(1))
                              for rows in (slice(0, 2), slice(2, 4))])
        np.testing.assert_allclose(store["methods/legrad/maps"][:], expected.numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
        assert store["methods/daam/maps"].shape == (4, 2, 4, 4)
        assert store["methods/gradcam/maps"].shape == (4, 1, 4, 4)
        assert store["methods/saliency/maps"].shape == (4, 1, 32, 32)


def test_captum_attributions_on_a_transformers_model_through_its_scores(tmp_path):
    import transformers

    from captum_daam.comparison import ScoresOf

    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, num_labels=3)
    model = transformers.ViTForImageClassification(config).eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    store = compare(model, [(image, 1) for image in images],
                    {"ig": (IntegratedGradients(ScoresOf(model)), {"n_steps": 4})},
                    metrics=("deletion",), out=tmp_path / "c.zarr", batch_size=2,
                    dtype=torch.float32, progress=False, resamples=50)
    targets = model(images).logits.argmax(1)
    expected = IntegratedGradients(lambda x: model(x).logits).attribute(
        images, target=targets, n_steps=4).sum(dim=1, keepdim=True)
    np.testing.assert_allclose(store["methods/ig/maps"][:], expected.detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    assert "forward_func" not in store.attrs["settings"]["methods"]["ig"]
