"""The viewer (captum_daam.viewer, ``captum-daam view``): the report of explain_dataset and
compare stores, explain's index.html and the notebook view, driven in headless Chromium
(Debian's chromium through Playwright). What the pages show is checked against values
computed here from the store's arrays: the sort and filter orders, the maps at each block
under each scaling (captum_daam.decompose.scale_flow), the example shown, the summary."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

zarr = pytest.importorskip("zarr", minversion="3")

from captum_daam import DAAM, FlowView, cli, compare, explain_dataset, view  # noqa: E402
from captum_daam._images import load_rgb, timm_preprocessing  # noqa: E402
from captum_daam.data import ShapesDataset  # noqa: E402
from captum_daam.decompose import scale_flow  # noqa: E402
from captum_daam.viewer import make_server, open_store  # noqa: E402
from captum_daam.viewer._data import MAP_SIDE, encode_maps  # noqa: E402
from captum_daam.zoo import tiny_vit  # noqa: E402

from test_dataset import save_image_folder, subprocess_env, to_uint8_pictures  # noqa: E402

SCREENSHOTS = Path(os.environ.get("CAPTUM_DAAM_SCREENSHOTS", "")) if os.environ.get(
    "CAPTUM_DAAM_SCREENSHOTS") else None
METRICS = ["pointing_game", "deletion"]
# The page's maps come as float16 (each example over its largest magnitude): they are shown
# within one step of the 256-colour map of what the package's scalings give.
STEP = 1 / 256


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_vit()


@pytest.fixture(scope="module")
def shapes():
    # 3 chunks of 8, the last one short; two of the 23 predicted wrong
    return ShapesDataset(23, seed=8)


@pytest.fixture(scope="module")
def explained(model, shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("explained") / "e.zarr"
    explain_dataset(DAAM(model), shapes, out, batch_size=8, return_flow=True, metrics=METRICS,
                    progress=False)
    return out


@pytest.fixture(scope="module")
def compared(model, shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("compared") / "c.zarr"
    compare(model, shapes, ["daam", "rollout", "saliency"], metrics=["pointing_game"],
            out=out, batch_size=8, progress=False, resamples=200)
    return out


@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium, headless, through Playwright. Where it is not installed the browser
    tests are skipped, except under CAPTUM_DAAM_REQUIRE_BROWSER=1 (.ci/run sets it), where
    that is a failure."""
    executable = os.environ.get("CAPTUM_DAAM_CHROMIUM") or shutil.which("chromium")
    required = os.environ.get("CAPTUM_DAAM_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if executable is None or sync_playwright is None:
        missing = "Debian's chromium (apt-get install -y chromium)" if executable is None \
            else "playwright (pip install playwright)"
        if required:
            pytest.fail(f"the browser tests need {missing}")
        pytest.skip(f"the browser tests need {missing}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=[
            "--headless", "--no-sandbox", "--disable-background-networking"])
        yield browser
        browser.close()


class Page:
    """A browser page that records every request leaving file:// and the local server, and
    every script error, so a test can assert the page is self-contained and error-free."""

    def __init__(self, browser, allowed=("file://", "data:", "about:")):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.errors, self.outside = [], []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda message: message.type == "error"
                     and self.errors.append(message.text))

        def check(route):
            if not route.request.url.startswith(allowed):
                self.outside.append(route.request.url)
                return route.abort()
            return route.continue_()

        self.page.route("**/*", check)

    def open(self, url, ready="#app[data-page]"):
        self.page.goto(url)
        self.page.wait_for_selector(ready)
        return self.page

    def screenshot(self, name):
        """Every page is photographed: into CAPTUM_DAAM_SCREENSHOTS when set, else in memory;
        either way the picture must be a PNG of the whole page."""
        picture = self.page.screenshot(full_page=True)
        assert picture[:8] == b"\x89PNG\r\n\x1a\n" and len(picture) > 5000
        if SCREENSHOTS is not None:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            (SCREENSHOTS / f"{name}.png").write_bytes(picture)

    def close(self):
        assert self.errors == [], self.errors
        assert self.outside == [], f"requests left the report: {self.outside}"
        self.context.close()


@pytest.fixture
def page(chromium):
    opened = Page(chromium)
    yield opened
    opened.close()


def store_arrays(path, prefix=""):
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(group[name][:]) for name in
            ("targets", "predictions", "scores", "labels")}, group


def shown_order(page):
    return [int(card.get_attribute("data-index"))
            for card in page.query_selector_all("#gallery .card")]


def wait_drawn(page, index, block, scaling="paper", mode="flow"):
    page.wait_for_selector(f'#app[data-drawn="{index}:{block}:{scaling}:{mode}"]')


def wait_gallery(page, query):
    """Until the gallery shown is that of ``query`` (URLSearchParams' spelling)."""
    page.wait_for_selector(f'#app[data-query="{query}"]')


def shown_values(page, method):
    return np.array(page.evaluate(f"DAAMView.shown.maps[{json.dumps(method)}].values"))


def expected_scaled(maps, scaling, mode="flow"):
    """The page's map values computed here: the stored (float16) maps as float32, block maps
    by differences, scaled by the package's own scale_flow."""
    flow = torch.from_numpy(np.asarray(maps, np.float32))[None]
    if mode == "block":
        flow = torch.cat([flow[:, :1], flow[:, 1:] - flow[:, :-1]], dim=1)
    return scale_flow(flow, scaling)[0].numpy()


def read_script(path):
    """The value a data script gives DAAMView.receive."""
    text = Path(path).read_text()
    match = re.fullmatch(r'DAAMView\.receive\("[^"]+",(.*)\);\n', text, re.S)
    return json.loads(match.group(1).replace("<\\/", "</"))


# ---- the store's thumbnails ---------------------------------------------------------------------


def test_stores_keep_the_image_the_model_was_given_as_a_thumbnail(model, shapes, explained):
    thumbnails = np.asarray(zarr.open_group(str(explained), mode="r")["thumbnails"][:])
    # the shapes are in [0, 1] at 64 pixels: kept as they are, in 8 bits
    expected = (shapes.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert thumbnails.shape == (23, 64, 64, 3)
    np.testing.assert_array_equal(thumbnails, expected)


def test_an_image_folder_for_a_timm_model_keeps_its_un_normalised_input(shapes, tmp_path):
    import timm
    from PIL import Image

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=5).eval()
    root = tmp_path / "images"
    save_image_folder(root, to_uint8_pictures(shapes.images[:3]), ["a", "b", "a"])
    store = explain_dataset(DAAM(model), str(root), tmp_path / "f.zarr", batch_size=2,
                            progress=False)
    thumbnails = np.asarray(store["thumbnails"][:])
    assert thumbnails.shape == (3, 96, 96, 3)
    # what the model was given before normalisation, shrunk here with Pillow
    files = sorted(root.glob("*/*.png"), key=lambda path: (path.parent.name, path.name))
    preprocess = timm_preprocessing(model, normalize=False)
    for thumbnail, path in zip(thumbnails, files):
        picture = (preprocess(load_rgb(path)) * 255).round().byte().permute(1, 2, 0).numpy()
        small = np.asarray(Image.fromarray(picture).resize((96, 96), Image.BILINEAR), np.float64)
        assert np.abs(thumbnail - small).mean() < 3.0


def test_a_store_written_before_thumbnails_were_kept_resumes_without_them(model, shapes,
                                                                          explained, tmp_path):
    older = tmp_path / "older.zarr"
    shutil.copytree(explained, older, ignore=shutil.ignore_patterns("view"))
    shutil.rmtree(older / "thumbnails")
    group = zarr.open_group(str(older), mode="r+")
    settings = dict(group.attrs["settings"])
    del settings["thumbnails"]
    group.attrs["settings"] = settings
    group["complete"][1] = False  # stopped in its middle chunk
    group["maps"][8:16] = 0
    explain_dataset(DAAM(model), shapes, older, batch_size=8, return_flow=True,
                    metrics=METRICS, progress=False)
    resumed = zarr.open_group(str(older), mode="r")
    assert resumed["complete"][:].all() and "thumbnails" not in resumed
    np.testing.assert_array_equal(resumed["maps"][:],
                                  zarr.open_group(str(explained), mode="r")["maps"][:])


# ---- the report's data ------------------------------------------------------------------------


def test_the_summary_holds_the_stores_values(explained):
    shared, group = store_arrays(explained)
    data = open_store(explained)
    summary, stats = data.summary(), data.stats()
    assert summary["examples"] == summary["shown"] == 23 and summary["partial"] is False
    assert summary["accuracy"] == pytest.approx(
        float((shared["predictions"] == shared["labels"]).mean()))
    for metric in METRICS:
        values = np.asarray(group[f"metrics/{metric}"][:], np.float64)
        values = values[np.isfinite(values)]
        stat = stats["DAAM"][metric]
        assert stat["mean"] == pytest.approx(values.mean())
        assert stat["low"] <= stat["mean"] <= stat["high"]
        assert sum(stat["histogram"]["counts"]) == len(values) == stat["count"]
    # the mean flow mass per block, computed here from the stored flow
    flow = np.clip(np.asarray(group["maps"][:], np.float64), 0, None).sum(axis=(2, 3))
    np.testing.assert_allclose(summary["flow_mass"]["DAAM"], (flow / flow[:, -1:]).mean(0),
                               rtol=1e-4)  # 5 significant digits
    assert summary["methods"] == [{"name": "DAAM", "blocks": 6, "grid": [8, 8], "flow": True}]


def test_the_reports_files_hold_the_stored_maps_and_nothing_from_the_network(explained,
                                                                              tmp_path):
    out = tmp_path / "report"
    page = view(explained, out)
    assert page == out / "index.html"
    group = zarr.open_group(str(explained), mode="r")
    maps = read_script(out / "data" / "maps" / "00000.js")["examples"]  # 50 per file
    assert sorted(map(int, maps)) == list(range(23))
    for index in (0, 7, 22):
        entry = maps[str(index)]["DAAM"]
        decoded = np.frombuffer(base64.b64decode(entry["data"]), "<f2").reshape(entry["shape"])
        stored = np.asarray(group["maps"][index], np.float64)
        # each example over its largest magnitude, in float16's precision
        np.testing.assert_allclose(decoded, stored / np.abs(stored).max(), rtol=1e-3,
                                   atol=1e-6)
        assert (out / "images" / "00000" / f"{index}.jpg").read_bytes()[:2] == b"\xff\xd8"
    table = read_script(out / "data" / "table.js")
    assert table["index"] == list(range(23))
    assert table["prediction"] == np.asarray(group["predictions"][:]).tolist()
    # its own HTML, CSS and JavaScript: nothing names an address outside the folder but the
    # SVG namespace (a name, never fetched)
    for path in out.rglob("*"):
        if path.suffix in (".html", ".js", ".css"):
            text = path.read_text().replace("http://www.w3.org/2000/svg", "")
            assert "http://" not in text and "https://" not in text and "//cdn" not in text, path


def test_large_maps_are_shown_as_the_means_of_the_pixels_they_cover():
    maps = torch.rand(2, 1, 2 * MAP_SIDE, 2 * MAP_SIDE - 1)  # a pixel attribution, say
    encoded = encode_maps(maps)
    assert len(encoded) == 2 and encoded[1]["shape"] == [1, MAP_SIDE, MAP_SIDE]
    decoded = np.frombuffer(base64.b64decode(encoded[1]["data"]), "<f2").reshape(
        encoded[1]["shape"])[0]
    # each cell the mean of the pixels it covers (1 wide at the right edge), by hand; the
    # example divided by its largest magnitude
    cells = np.array([[float(maps[1, 0, 2 * row:2 * row + 2, 2 * column:2 * column + 2].mean())
                       for column in range(MAP_SIDE)] for row in range(MAP_SIDE)])
    np.testing.assert_allclose(decoded, cells / np.abs(cells).max(), rtol=1e-3, atol=1e-6)
    small = torch.rand(1, 3, MAP_SIDE, 5)  # at most MAP_SIDE: as they are
    assert encode_maps(small)[0]["shape"] == [3, MAP_SIDE, 5]


# ---- the pages in a browser -------------------------------------------------------------------


def test_the_summary_page_shows_accuracy_metrics_and_the_flow(explained, tmp_path, page):
    index = view(explained, tmp_path / "r")
    stats = open_store(explained).stats()
    summary = open_store(explained).summary()
    shown = page.open(index.as_uri() + "#/", "#metric-table")
    assert shown.inner_text("#fact-accuracy .fact-value") == f"{100 * summary['accuracy']:.1f} %"
    cell = shown.inner_text('#metric-table td[data-method="DAAM"][data-metric="deletion"] .mean')
    assert cell == f"{stats['DAAM']['deletion']['mean']:.3f}"
    assert len(shown.query_selector_all('svg.line-chart[data-method="DAAM"] circle')) == 6
    page.screenshot("summary")


def test_the_gallery_sorts_and_filters_as_the_stored_values_say(compared, tmp_path, page):
    index = view(compared, tmp_path / "r")
    shared, group = store_arrays(compared)
    pointing = np.asarray(group["methods/daam/metrics/pointing_game"][:])
    shown = page.open(index.as_uri() + "#/gallery", "#gallery .card")
    assert shown_order(shown) == list(range(23))

    # sort by score, descending, through the form as a user does
    shown.select_option("#control-sort", "score")
    shown.select_option("#control-order", "desc")
    wait_gallery(shown, "sort=score&order=desc")
    expected = sorted(range(23), key=lambda i: (-float(shared["scores"][i]), i))
    assert shown_order(shown) == expected
    page.screenshot("gallery")

    # filter: one class (by label), and the wrong predictions
    shown.select_option("#control-class", "2")
    wait_gallery(shown, "class=2&sort=score&order=desc")
    assert sorted(shown_order(shown)) == [i for i in range(23) if shared["labels"][i] == 2]
    shown.select_option("#control-class", "")
    shown.select_option("#control-outcome", "wrong")
    wait_gallery(shown, "outcome=wrong&sort=score&order=desc")
    wrong = [i for i in range(23) if shared["predictions"][i] != shared["labels"][i]]
    assert 0 < len(wrong) < 23, "this store has no wrong predictions to filter"
    assert sorted(shown_order(shown)) == wrong

    # a metric filter and the failures first: pointing missed on a correct prediction
    shown.goto(index.as_uri() + "#/gallery?where=daam/pointing_game&op=lt&value=0.5")
    wait_gallery(shown, "where=daam%2Fpointing_game&op=lt&value=0.5")
    assert sorted(shown_order(shown)) == [i for i in range(23) if pointing[i] < 0.5]
    shown.goto(index.as_uri() + "#/gallery?failures=1&sort=score")
    wait_gallery(shown, "failures=1&sort=score")
    failures = [i for i in range(23) if pointing[i] == 0 and
                shared["predictions"][i] == shared["labels"][i]]
    assert 0 < len(failures) < 23, "this store has no failures to put first"
    rest = [i for i in range(23) if i not in failures]
    by_score = lambda i: (float(shared["scores"][i]), i)  # noqa: E731
    assert shown_order(shown) == sorted(failures, key=by_score) + sorted(rest, key=by_score)


def test_the_slider_and_the_play_button_change_the_shown_map(explained, tmp_path, page):
    index = view(explained, tmp_path / "r")
    flow = np.asarray(zarr.open_group(str(explained), mode="r")["maps"][9])
    # without the image under the map: a canvas that drew a file:// image cannot be read back
    shown = page.open(index.as_uri() + "#/example/9?image=0", "#block-slider")
    wait_drawn(shown, 9, 6)
    np.testing.assert_allclose(shown_values(shown, "DAAM"), expected_scaled(flow, "paper")[5]
                               .ravel(), atol=STEP)
    before = shown.evaluate("document.querySelector('canvas.map').toDataURL()")
    shown.locator("#block-slider").fill("2")
    wait_drawn(shown, 9, 2)
    np.testing.assert_allclose(shown_values(shown, "DAAM"), expected_scaled(flow, "paper")[1]
                               .ravel(), atol=STEP)
    assert shown.evaluate("document.querySelector('canvas.map').toDataURL()") != before
    assert shown.inner_text("#block-label") == "2 of 6"
    # the other scalings and the block maps cam_l
    for scaling, mode in [("shared", "flow"), ("per_map", "flow"), ("paper", "block")]:
        shown.select_option("#scaling", scaling)
        shown.select_option("#mode", mode)
        wait_drawn(shown, 9, 2, scaling, mode)
        np.testing.assert_allclose(shown_values(shown, "DAAM"),
                                   expected_scaled(flow, scaling, mode)[1].ravel(), atol=STEP)
    shown.check("#show-image")
    page.screenshot("example")
    # play runs through the blocks, from the one shown to the last, and stops there
    shown.evaluate("DAAMView.drawn = []")
    shown.click("#play")
    shown.wait_for_selector('#app[data-drawn="9:6:paper:block"]', timeout=10_000)
    assert shown.evaluate("DAAMView.drawn") == [2, 3, 4, 5, 6]
    assert shown.inner_text("#play").endswith("play")


def test_the_detail_view_shows_the_clicked_example_and_every_method(compared, tmp_path, page):
    index = view(compared, tmp_path / "r")
    group = zarr.open_group(str(compared), mode="r")
    shown = page.open(index.as_uri() + "#/gallery?sort=score", "#gallery .card")
    shown.click('#gallery .card[data-index="14"]')
    wait_drawn(shown, 14, 6)
    assert shown.get_attribute("#example-title", "data-index") == "14"
    for method, block in [("daam", 6), ("rollout", 1), ("saliency", 1)]:
        maps = np.asarray(group[f"methods/{method}/maps"][14])
        np.testing.assert_allclose(shown_values(shown, method),
                                   expected_scaled(maps, "paper")[block - 1].ravel(), atol=STEP)
        assert shown.get_attribute(f'canvas.map[data-method="{method}"]', "data-block") == \
            str(block)
    # the slider moves DAAM's flow; the single maps stay
    shown.locator("#block-slider").fill("1")
    wait_drawn(shown, 14, 1)
    assert shown.get_attribute('canvas.map[data-method="rollout"]', "data-block") == "1"
    page.screenshot("compare-example")
    shown.click("text=back to the gallery")
    shown.wait_for_selector("#gallery .card")
    assert "sort=score" in shown.evaluate("location.hash")


def test_a_partial_store_shows_what_is_complete_and_says_so(model, shapes, tmp_path, page):
    out = tmp_path / "p.zarr"
    explain_dataset(DAAM(model), shapes, out, batch_size=8, return_flow=True, progress=False)
    # the state a run stopped in its middle chunk leaves: that chunk is not marked complete
    zarr.open_group(str(out), mode="r+")["complete"][1] = False
    index = view(out)
    shown = page.open(index.as_uri() + "#/gallery", "#gallery .card")
    assert shown.is_visible("#notice")
    assert "15 of 23 examples (2 of 3 chunks)" in shown.inner_text("#notice")
    assert shown_order(shown) == list(range(8)) + list(range(16, 23))
    page.screenshot("partial")


def run_view(arguments, capsys):
    capsys.readouterr()
    code = cli.main(["view", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def listing(folder):
    return sorted(str(path.relative_to(folder)) for path in Path(folder).rglob("*"))


def test_what_is_not_a_whole_store_gets_a_one_line_error_and_nothing_is_written(
        model, shapes, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    unfilled = tmp_path / "unfilled.zarr"
    explain_dataset(DAAM(model), ShapesDataset(4, seed=1), unfilled, batch_size=2,
                    progress=False)
    zarr.open_group(str(unfilled), mode="r+")["complete"][:] = False  # a run killed at once
    for path, words in [(empty, "an empty folder"), (other, "other files"),
                        (other / "notes.txt", "a file"), (tmp_path / "absent", "absent"),
                        (unfilled, "no complete chunk")]:
        before = listing(tmp_path)
        code, out, error = run_view([str(path)], capsys)
        assert code == 2 and out == "", (path, out)
        assert error.count("\n") == 1 and error.startswith("captum-daam: error:"), error
        assert words in error or words.replace("no complete chunk", "none yet") in error, error
        assert listing(tmp_path) == before
    code, _, error = run_view([str(unfilled), "--resamples", "0"], capsys)
    assert code == 2 and "--resamples" in error


def test_the_command_replaces_an_earlier_report_and_nothing_else(explained, tmp_path, capsys):
    out = tmp_path / "shared-report"
    code, printed, _ = run_view([str(explained), "--out", str(out)], capsys)
    assert code == 0 and str(out / "index.html") in printed
    (out / "data" / "stale.js").write_text("from before")
    assert run_view([str(explained), "--out", str(out)], capsys)[0] == 0
    assert not (out / "data" / "stale.js").exists() and (out / "index.html").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]
    # a folder of the user's, the folder holding the store, the store itself: refused, kept
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (out / "notes.txt").write_text("mine too")  # a report the user added to
    for place, words in [(mine, "other files"), (out, "other files"),
                         (explained.parent, "holds the store"), (explained, "holds the store"),
                         (mine / "notes.txt", "a file")]:
        before = listing(tmp_path) + listing(explained.parent)
        code, _, error = run_view([str(explained), "--out", str(place)], capsys)
        assert code == 2 and error.count("\n") == 1 and words in error, error
        assert "choose another --out" in error
        assert listing(tmp_path) + listing(explained.parent) == before


def test_an_error_while_writing_leaves_nothing(explained, tmp_path, monkeypatch, capsys):
    from captum_daam.viewer import _data

    def broken(self, number):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_data.StoreData, "maps", broken)
    before = listing(tmp_path)
    code, _, error = run_view([str(explained), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and error.count("\n") == 1 and "No space left on device" in error, error
    assert listing(tmp_path) == before


def test_serve_answers_the_same_pages_from_the_store(compared, tmp_path, chromium):
    report = view(compared, tmp_path / "r").parent
    server = make_server(open_store(compared), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for name in ("data/table.js", "data/maps/00000.js", "assets/viewer.js",
                     "images/00000/3.jpg"):
            with urllib.request.urlopen(f"{base}/{name}", timeout=60) as answer:
                assert answer.read() == (report / name).read_bytes(), name
        opened = Page(chromium, allowed=(base, "data:", "about:"))
        shown = opened.open(base + "/#/gallery", "#gallery .card")
        assert shown_order(shown) == list(range(23))
        shown.click('#gallery .card[data-index="5"]')
        wait_drawn(shown, 5, 6)
        opened.screenshot("served-example")
        opened.close()
    finally:
        server.shutdown()
        server.server_close()


def test_the_serve_command_prints_its_address_and_serves(compared, tmp_path):
    before = listing(compared)
    process = subprocess.Popen(
        [sys.executable, "-m", "captum_daam.cli", "view", str(compared), "--serve", "--port",
         "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        line = process.stdout.readline()
        address = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        with urllib.request.urlopen(address + "data/summary.js", timeout=60) as answer:
            assert answer.read().startswith(b'DAAMView.receive("summary",')
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(address + "images/00000/999.jpg", timeout=60)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert listing(compared) == before  # serving writes nothing


# ---- explain's page and the notebook view -----------------------------------------------------


def test_explain_writes_an_index_html_with_the_example_view(shapes, tmp_path, page, capsys):
    pictures = to_uint8_pictures(shapes.images[:2])
    paths = []
    for number, picture in enumerate(pictures):
        paths.append(tmp_path / f"shape{number}.png")
        picture.save(paths[-1])
    out = tmp_path / "out"
    assert cli.main(["explain", *map(str, paths), "--model", "tiny-vit", "--out", str(out),
                     "--blocks", "3-6", "--save-raw", "--no-progress"]) == 0
    assert "index.html" in capsys.readouterr().out
    raw = np.load(out / "shape1_daam.npz")
    shown = page.open((out / "index.html").as_uri() + "#/example/1", "#block-slider")
    wait_drawn(shown, 1, 4)
    assert "shape1" in shown.inner_text("#example-title")
    np.testing.assert_allclose(shown_values(shown, "DAAM"), expected_scaled(
        raw["flow"].astype(np.float16), "paper")[3].ravel(), atol=STEP)
    shown.locator("#block-slider").fill("1")
    wait_drawn(shown, 1, 1)
    assert shown.inner_text("#block-label") == "block 3 (1 of 4)"
    page.screenshot("explain")


def test_the_notebook_view_is_the_example_view_in_an_iframe(model, shapes, page):
    image = shapes.images[4]
    flow = DAAM(model).attribute(image[None], target=int(shapes.labels[4]), return_flow=True)
    frame = FlowView(image, flow, target=int(shapes.labels[4]), label="a shape")._repr_html_()
    assert frame.startswith("<iframe srcdoc=") and "sandbox=\"allow-scripts\"" in frame
    # the cell's output as a notebook shows it: the iframe, its escaping and its sandbox
    page.page.set_content(frame)
    view_frame = page.page.wait_for_selector("iframe").content_frame()
    view_frame.wait_for_selector('#app[data-drawn="0:6:paper:flow"]')
    np.testing.assert_allclose(shown_values(view_frame, "DAAM"), expected_scaled(
        flow[0].numpy(), "paper")[5].ravel(), atol=STEP)
    view_frame.locator("#block-slider").fill("4")
    wait_drawn(view_frame, 0, 4)
    page.screenshot("notebook")


def test_maps_of_any_sign_and_size_are_shown_as_the_scalings_say(page):
    # hand-made: negative values, a huge and a tiny example (beyond float16 both ways)
    torch.manual_seed(0)
    image = torch.rand(3, 32, 48)
    for size in (1e9, 1e-9):
        flow = (torch.randn(5, 4, 6) * size).cumsum(0)
        page.page.set_content(FlowView(image, flow)._repr_html_())
        view_frame = page.page.wait_for_selector("iframe").content_frame()
        for scaling, mode in [("paper", "flow"), ("shared", "block"), ("per_map", "flow")]:
            view_frame.select_option("#scaling", scaling)
            view_frame.select_option("#mode", mode)
            view_frame.locator("#block-slider").fill("3")
            wait_drawn(view_frame, 0, 3, scaling, mode)
            np.testing.assert_allclose(shown_values(view_frame, "DAAM"), expected_scaled(
                flow.numpy(), scaling, mode)[2].ravel(), atol=STEP)


def test_a_store_without_thumbnails_is_shown_with_its_maps_alone(explained, tmp_path, page):
    older = tmp_path / "older.zarr"  # as stores written before thumbnails were kept
    shutil.copytree(explained, older, ignore=shutil.ignore_patterns("view"))
    shutil.rmtree(older / "thumbnails")
    index = view(older)
    assert not (index.parent / "images").exists()
    shown = page.open(index.as_uri() + "#/example/3", "#block-slider")
    wait_drawn(shown, 3, 6)
    assert "holds no image" in shown.inner_text("#panels")
    shown.goto(index.as_uri() + "#/gallery")
    shown.wait_for_selector("#gallery .card .no-image")


def test_a_hugging_face_dataset_of_named_classes_is_viewed_by_its_names(shapes,
                                                                         tmp_path, page):
    datasets = pytest.importorskip("datasets")
    names = ["circle", "square", "triangle", "cross", "ring"]  # the bundled model's classes
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=names)})
    table = datasets.Dataset.from_dict({"image": to_uint8_pictures(shapes.images[:10]),
                                        "label": shapes.labels[:10].tolist()},
                                       features=features)
    table.save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "hf.zarr"
    # as a user does: the saved split to a store, the store to its report
    assert cli.main(["explain-dataset", "--model", "tiny-vit", "--data", str(tmp_path / "saved"),
                     "--out", str(out), "--flow", "--metrics", "deletion", "--batch-size", "4",
                     "--no-progress"]) == 0
    # the images as the dataset holds them (PNG pixels; the model only rescales to [0, 1])
    np.testing.assert_array_equal(
        zarr.open_group(str(out), mode="r")["thumbnails"][:],
        np.stack([np.array(picture) for picture in to_uint8_pictures(shapes.images[:10])]))
    assert cli.main(["view", str(out)]) == 0
    shown = page.open((out / "view" / "index.html").as_uri() + "#/gallery", "#gallery .card")
    options = shown.eval_on_selector_all("#control-class option", "o => o.map(x => x.text)")
    present = sorted({int(label) for label in shapes.labels[:10]})
    assert options == ["all"] + [f"{names[label]} ({label})" for label in present]
    first = int(shapes.labels[0])
    assert names[first] in shown.inner_text('#gallery .card[data-index="0"]')
    page.screenshot("hugging-face-gallery")


def test_previous_and_next_follow_the_gallery_and_keys_move_the_blocks(compared, tmp_path,
                                                                       page):
    index = view(compared, tmp_path / "r")
    shared, group = store_arrays(compared)
    order = sorted(range(23), key=lambda i: (-float(shared["scores"][i]), i))
    shown = page.open(index.as_uri() + "#/gallery?sort=score&order=desc", "#gallery .card")
    shown.click(f'#gallery .card[data-index="{order[4]}"]')
    wait_drawn(shown, order[4], 6)
    shown.click("#example-next")
    wait_drawn(shown, order[5], 6)
    shown.keyboard.press("[")
    wait_drawn(shown, order[4], 6)
    shown.keyboard.press("[")
    wait_drawn(shown, order[3], 6)
    shown.keyboard.press("ArrowLeft")
    shown.keyboard.press("ArrowLeft")
    wait_drawn(shown, order[3], 4)
    assert shown.input_value("#block-slider") == "4"
    shown.keyboard.press("ArrowRight")
    wait_drawn(shown, order[3], 5)


def test_a_compare_summary_shows_the_block_metrics_of_the_flow(compared):
    summary = open_store(compared).summary()
    group = zarr.open_group(str(compared), mode="r")
    pointing = np.asarray(group["methods/daam/block_metrics/pointing_game"][:], np.float64)
    np.testing.assert_allclose(summary["block_metrics"]["daam"]["pointing_game"],
                               np.nanmean(pointing, axis=0), rtol=1e-4)
    assert set(summary["flow_mass"]) == {"daam"}  # the methods with one map have no flow


def test_the_viewer_gives_the_intervals_of_the_compare_report(compared, tmp_path):
    from captum_daam.comparison import report

    data = open_store(compared, resamples=500)
    stats = data.stats()
    rows = report(compared, tmp_path / "report", resamples=500)["rows"]
    for row in rows:
        cell, shown = row["pointing_game"], stats[row["method"]]["pointing_game"]
        assert (shown["mean"], shown["low"], shown["high"]) == pytest.approx(
            (cell["mean"], cell["low"], cell["high"]), abs=1e-12)


def test_the_notebook_view_refuses_what_flow_figure_refuses():
    image, flow = torch.rand(3, 16, 16), torch.rand(4, 2, 2)
    for bad_image, bad_flow, words in [
        (torch.rand(2, 3, 16, 16), flow, "batch"),
        (image * 3 - 1, flow, "[0, 1]"),
        (torch.rand(4, 16, 16), flow, "RGB"),
        (image, torch.full((4, 2, 2), float("nan")), "finite"),
        (image, torch.rand(2, 2), "(L, gh, gw)"),
    ]:
        with pytest.raises(ValueError, match=re.escape(words)):
            FlowView(bad_image, bad_flow)
