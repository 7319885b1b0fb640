"""The viewer on a large store: the report's cost to write and on disk, and how soon its
first pages open in a browser.

Two stores of ``explain_dataset(DAAM(tiny_vit()), ShapesDataset(n, seed=0), batch_size=256,
return_flow=True, metrics=...)`` are made in one run: a baseline of 1,000 examples and the
large one (50,000 by default). The machines are shared and absolute times vary, so every
figure is given as measured and as the ratio large / baseline of the same run. For each store:

- **report**: ``view(store, out)`` timed, and the report's size (bytes, bytes on disk, files)
  beside the store's;
- **opening**: headless Chromium (Debian's, driven by Playwright), a fresh browser context
  per open (after one open not counted, for the browser's start-up), the median of
  ``--repeats``, timed from ``page.goto`` until:

  - gallery (``#/gallery``): the first 60 cards are in the DOM with their images loaded
    (``complete`` and ``naturalWidth > 0``);
  - summary (``#/``): ``#metric-table`` exists;
  - example (``#/example/<n // 2>``): ``#app[data-drawn]`` is set;

  once for the report from disk (``file://``) and once served by ``make_server`` (port 0, in
  a thread); each served open gets a fresh server, so it makes summary.js, table.js and
  stats.js again (a user's first visit to ``captum-daam view --serve``).

Where the time of an open goes is recorded with it: when summary.js and table.js arrived
(fetched) and were run (``DAAMView.receive`` called), from the page's Resource Timing and a
wrapper of ``DAAMView.receive`` added by an init script, and the sizes of both files; the
Python side of a served open (``open_store``, ``summary()``, ``stats()`` with its bootstrap,
``table()``) is timed apart.

Explaining with the deletion metric costs about 15 times more than without on CPU: when the
baseline's time says the large store would take more than ``--store-budget`` seconds, the
deletion metric is dropped from both stores (the baseline made again) and the results say so.

    python benchmarks/viewer.py                      # 50,000 examples against 1,000, CPU
    python benchmarks/viewer.py --examples 5000 --repeats 1

Writes benchmarks/results/viewer_cpu.json and .md. Needs ``playwright`` (the Python package)
and a Chromium (``--chromium``, default /usr/bin/chromium); nothing is downloaded.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CARDS = 60  # the gallery's first page
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-background-networking"]

# DAAMView.receive wrapped, to note when each data file has been run (parsed and evaluated)
RECEIVE_TIMES = """
(() => {
  window.__received = {};
  let view;
  Object.defineProperty(window, "DAAMView", {
    configurable: true,
    get() { return view; },
    set(value) {
      const receive = value.receive;
      value.receive = function (key) {
        window.__received[key] = performance.now();
        return receive.apply(this, arguments);
      };
      view = value;
    },
  });
})();
"""
GALLERY_READY = f"""() => {{
  const images = Array.from(document.querySelectorAll("#gallery .card img")).slice(0, {CARDS});
  const cards = document.querySelectorAll("#gallery .card").length;
  if (cards && !window.__cardsAt) window.__cardsAt = performance.now();
  return cards >= Math.min({CARDS}, window.__expectedCards) && images.length > 0 &&
    images.every((image) => image.complete && image.naturalWidth > 0);
}}"""
PAGES = {
    "gallery": ("#/gallery", GALLERY_READY),
    "summary": ("#/", "() => document.querySelector('#metric-table') !== null"),
    "example": (None, "() => document.querySelector('#app[data-drawn]') !== null"),
}
TIMINGS = """() => {
  const files = {};
  for (const entry of performance.getEntriesByType("resource")) {
    const name = entry.name.split("/").slice(-2).join("/");
    if (name === "data/summary.js" || name === "data/table.js" || name === "assets/viewer.js") {
      files[name] = {start: entry.startTime, fetched: entry.responseEnd,
                     bytes: entry.encodedBodySize || entry.decodedBodySize || null};
    }
  }
  return {done: performance.now(), received: window.__received, cards: window.__cardsAt || null,
          files: files};
}"""


# ---- stores and reports ----------------------------------------------------------------------


def make_store(examples: int, metrics: list, out: Path, args) -> dict:
    from captum_daam import DAAM, explain_dataset
    from captum_daam.data import ShapesDataset
    from captum_daam.zoo import tiny_vit

    start = time.perf_counter()
    dataset = ShapesDataset(examples, seed=0)
    generated = time.perf_counter() - start
    dataset_bytes = dataset.images.nbytes + dataset.masks.nbytes + dataset.labels.nbytes
    start = time.perf_counter()
    explain_dataset(DAAM(tiny_vit()), dataset, out, batch_size=args.batch_size,
                    return_flow=True, metrics=tuple(metrics), progress=False)
    explained = time.perf_counter() - start
    del dataset
    return {"examples": examples, "metrics": list(metrics), "generate_s": generated,
            "dataset_bytes": dataset_bytes, "explain_s": explained, **folder_size(out)}


def folder_size(folder: Path) -> dict:
    """Bytes (the files' lengths), bytes on disk (allocated blocks) and files under folder."""
    size = disk = files = 0
    for root, _, names in os.walk(folder):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            size, disk, files = size + stat.st_size, disk + stat.st_blocks * 512, files + 1
    return {"bytes": size, "disk_bytes": disk, "files": files}


def write_report(store: Path, out: Path) -> dict:
    from captum_daam.viewer import view

    start = time.perf_counter()
    view(store, out)
    seconds = time.perf_counter() - start
    data = {name: (out / "data" / name).stat().st_size for name in ("summary.js", "table.js")}
    return {"seconds": seconds, **folder_size(out),
            "images_bytes": folder_size(out / "images")["bytes"],
            "maps_bytes": folder_size(out / "data" / "maps")["bytes"],
            "data_bytes": data}


def server_side(store: Path, sample_groups: int) -> dict:
    """What a served first open waits for in Python, and what the report's writing spends on
    maps and thumbnails (timed on the first ``sample_groups`` groups, scaled to all)."""
    from captum_daam.viewer import _script_data, open_store

    timings = {}
    start = time.perf_counter()
    data = open_store(store)
    timings["open_store_s"] = time.perf_counter() - start
    for name in ("summary", "stats", "table"):
        start = time.perf_counter()
        value = getattr(data, name)()
        made = time.perf_counter()
        text = _script_data(name, value)
        timings[f"{name}_s"] = made - start
        timings[f"{name}_json_s"] = time.perf_counter() - made
        timings[f"{name}_js_bytes"] = len(text.encode())
    start = time.perf_counter()
    data._flow_mass(next(iter(data.methods.values())))
    timings["summary_flow_mass_s"] = time.perf_counter() - start
    groups = min(sample_groups, data.group_count())
    start = time.perf_counter()
    for number in range(groups):
        _script_data(f"maps/{number}", data.maps(number))
    timings["maps_all_groups_estimate_s"] = ((time.perf_counter() - start)
                                             * data.group_count() / groups)
    start = time.perf_counter()
    for number in range(groups):
        data.images(number)
    timings["images_all_groups_estimate_s"] = ((time.perf_counter() - start)
                                               * data.group_count() / groups)
    timings["sample_groups"] = groups
    return timings


# ---- the browser -----------------------------------------------------------------------------


class Served:
    """make_server(open_store(store)) serving in a thread, for one open."""

    def __init__(self, data) -> None:
        from captum_daam.viewer import make_server

        self.server = make_server(data, "127.0.0.1", 0)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def open_page(browser, url: str, ready: str, expected_cards: int, timeout_s: float) -> dict:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        context.add_init_script(RECEIVE_TIMES + f"window.__expectedCards = {expected_cards};")
        page = context.new_page()
        start = time.perf_counter()
        page.goto(url, wait_until="commit")
        page.wait_for_function(ready, polling=10, timeout=timeout_s * 1000)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, **page.evaluate(TIMINGS)}
    finally:
        context.close()


def browse(browser, store: Path, report: Path, examples: int, args) -> dict:
    """Each page opened ``args.repeats`` times from disk and served: the seconds of each open
    and its medians."""
    from captum_daam.viewer import open_store

    start = time.perf_counter()
    data = open_store(store)
    opened = time.perf_counter() - start
    results = {"open_store_s": opened}
    for source in ("file", "served"):
        for name, (fragment, ready) in PAGES.items():
            fragment = fragment or f"#/example/{examples // 2}"
            runs = []
            for _ in range(args.repeats):
                served = Served(data) if source == "served" else None
                base = served.url if served else (report / "index.html").resolve().as_uri()
                try:
                    runs.append(open_page(browser, base + fragment, ready,
                                          min(CARDS, examples), args.page_timeout))
                finally:
                    if served:
                        served.close()
            seconds = [run["seconds"] for run in runs]
            results[f"{name}_{source}"] = {"median_s": statistics.median(seconds),
                                           "seconds": seconds, "runs": runs}
            print(f"  {examples} examples, {name} ({source}): "
                  + ", ".join(f"{s:.3f}" for s in seconds) + " s", flush=True)
    return results


# ---- the run ---------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=50_000)
    parser.add_argument("--baseline", type=int, default=1_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--metrics", nargs="*", default=["pointing_game", "deletion"])
    parser.add_argument("--store-budget", type=float, default=600.0,
                        help="seconds the large store may take to explain; deletion is "
                        "dropped when the baseline says it would take longer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--page-timeout", type=float, default=120.0,
                        help="seconds an open may take before it counts as failed")
    parser.add_argument("--sample-groups", type=int, default=40,
                        help="groups of 50 examples whose maps and thumbnails are timed apart")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from playwright.sync_api import sync_playwright

    results = {
        "model": "bundled tiny ViT (captum_daam.zoo.tiny_vit), 64x64 ShapesDataset(n, seed=0), "
                 f"6 blocks, flow stored, batch {args.batch_size}",
        "examples": args.examples, "baseline": args.baseline, "repeats": args.repeats,
        "threads": args.threads, "torch": torch.__version__, "cpus": os.cpu_count(),
        "machine": platform.platform(), "load_average_before": os.getloadavg(),
        "memory_available_bytes_before": available_memory(),
    }
    metrics = list(args.metrics)
    work = Path(tempfile.mkdtemp(prefix="viewer_bench."))
    try:
        stores = {"baseline": work / "baseline.zarr", "large": work / "large.zarr"}
        made = {"baseline": make_store(args.baseline, metrics, stores["baseline"], args)}
        estimate = made["baseline"]["explain_s"] * args.examples / args.baseline
        results["large_store_estimate_s"] = estimate
        results["metrics_asked"] = list(metrics)
        if estimate > args.store_budget and "deletion" in metrics:
            results["deletion_dropped"] = (
                f"the baseline took {made['baseline']['explain_s']:.1f} s with "
                f"{', '.join(metrics)}: {args.examples} examples would take about "
                f"{estimate / 60:.0f} min, over the {args.store_budget:.0f} s budget")
            results["baseline_with_deletion"] = made["baseline"]
            metrics = [name for name in metrics if name != "deletion"]
            print("dropping deletion:", results["deletion_dropped"], flush=True)
            shutil.rmtree(stores["baseline"])
            made["baseline"] = make_store(args.baseline, metrics, stores["baseline"], args)
        results["metrics"] = metrics
        made["large"] = make_store(args.examples, metrics, stores["large"], args)
        results["peak_rss_bytes_after_stores"] = \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results["stores"] = made
        print("stores:", json.dumps(made), flush=True)

        reports = {name: write_report(stores[name], work / f"{name}_view") for name in stores}
        results["reports"] = reports
        print("reports:", json.dumps(reports), flush=True)
        results["server_side"] = {name: server_side(stores[name], args.sample_groups)
                                  for name in stores}
        print("server side:", json.dumps(results["server_side"]), flush=True)

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium,
                                                 args=CHROMIUM_ARGS)
            results["chromium"] = browser.version
            # one open first, not counted: the browser's own start-up (its caches, the GPU
            # process) would otherwise fall on the first figure
            open_page(browser, (work / "baseline_view" / "index.html").as_uri() + "#/gallery",
                      GALLERY_READY, min(CARDS, args.baseline), args.page_timeout)
            results["browser"] = {
                name: browse(browser, stores[name], work / f"{name}_view",
                             made[name]["examples"], args) for name in stores}
            browser.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    (out / "viewer_cpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "viewer_cpu.md").write_text(markdown(results))
    print(markdown(results))


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return -1


def markdown(results: dict) -> str:
    stores, reports = results["stores"], results["reports"]
    browser, server = results["browser"], results["server_side"]

    def mb(count: float) -> str:
        return f"{count / 1e6:.1f} MB" if count >= 1e6 else f"{count / 1e3:.1f} kB"

    def row(name: str, cells: list) -> str:
        return f"| {name} | " + " | ".join(cells) + " |"

    def both(value) -> list:
        large, baseline = value("large"), value("baseline")
        return [large, baseline, large / baseline]

    figures = [
        ("store size (bytes)", lambda n: stores[n]["bytes"], mb),
        ("store creation (s, not the figure)", lambda n: stores[n]["explain_s"], "{:.1f}".format),
        ("report time, view() (s)", lambda n: reports[n]["seconds"], "{:.2f}".format),
        ("report size (bytes)", lambda n: reports[n]["bytes"], mb),
        ("report size on disk (blocks)", lambda n: reports[n]["disk_bytes"], mb),
        ("report files", lambda n: reports[n]["files"], "{:,}".format),
        ("table.js", lambda n: reports[n]["data_bytes"]["table.js"], mb),
        ("summary.js", lambda n: reports[n]["data_bytes"]["summary.js"], mb),
        ("gallery open, file:// (s)", lambda n: browser[n]["gallery_file"]["median_s"],
         "{:.3f}".format),
        ("gallery open, served (s)", lambda n: browser[n]["gallery_served"]["median_s"],
         "{:.3f}".format),
        ("summary open, file:// (s)", lambda n: browser[n]["summary_file"]["median_s"],
         "{:.3f}".format),
        ("summary open, served (s)", lambda n: browser[n]["summary_served"]["median_s"],
         "{:.3f}".format),
        ("example open, file:// (s)", lambda n: browser[n]["example_file"]["median_s"],
         "{:.3f}".format),
        ("example open, served (s)", lambda n: browser[n]["example_served"]["median_s"],
         "{:.3f}".format),
        ("served: open_store (s)", lambda n: browser[n]["open_store_s"], "{:.3f}".format),
        ("served: summary() (s)", lambda n: server[n]["summary_s"], "{:.3f}".format),
        ("served: table() (s)", lambda n: server[n]["table_s"], "{:.3f}".format),
    ]
    large, baseline = results["examples"], results["baseline"]
    lines = [
        (f"The viewer on a store of {large:,} examples against one of {baseline:,}, in one "
        f"run: {results['model']}; metrics {', '.join(results['metrics']) or 'none'}; "
        f"{results['cpus']} CPUs, {results['threads']} torch threads, torch "
        f"{results['torch']}, Chromium {results.get('chromium', '?')} headless (Playwright); "
        f"opens are medians of {results['repeats']}, each in a fresh browser context (a "
        f"served one also with a fresh server); load average "
        f"{results['load_average_before'][0]:.2f} before, "
        f"{results['load_average_after'][0]:.2f} after."),
        "",
    ]
    if "deletion_dropped" in results:
        lines += [(f"The deletion metric was dropped from both stores: "
                   f"{results['deletion_dropped']}."), ""]
    lines += [f"| | {large:,} | {baseline:,} | ratio |", "|---|---|---|---|"]
    for name, value, shown in figures:
        big, small, ratio = both(value)
        lines.append(row(name, [shown(big), shown(small), f"{ratio:.2f}"]))
    lines += ["", ("Where the time of a gallery open went (its median run; ms from the "
               "navigation's start, in the page):"), "",
              "| open | summary.js run | table.js run | first card | 60 images loaded |",
              "|---|---|---|---|---|"]
    for name in ("large", "baseline"):
        for source in ("file", "served"):
            opened = browser[name][f"gallery_{source}"]
            run = min(opened["runs"], key=lambda r: abs(r["seconds"] - opened["median_s"]))
            lines.append(row(f"{stores[name]['examples']:,}, {source}", [
                f"{run['received'].get(key, float('nan')):.0f}" for key in ("summary", "table")]
                + [f"{run['cards'] or float('nan'):.0f}", f"{run['done']:.0f}"]))
    big = server["large"]
    lines += [
        "",
        (f"In Python, for the {large:,}-example store, each timed apart: summary() "
        f"{big['summary_s']:.2f} s, in it the mean flow mass (every map read) "
        f"{big['summary_flow_mass_s']:.2f} s; stats() (the metrics' bootstrap, stats.js, "
        f"which only the summary page waits for) {big['stats_s']:.2f} s; table() "
        f"{big['table_s']:.2f} s and its JSON {big['table_json_s']:.2f} s. Of view()'s "
        f"{reports['large']['seconds']:.1f} s, reading the thumbnails and making their JPEGs "
        f"takes about "
        f"{big['images_all_groups_estimate_s']:.1f} s and the maps' files about "
        f"{big['maps_all_groups_estimate_s']:.1f} s (timed on {big['sample_groups']} groups "
        f"of 50, scaled); the rest is writing {reports['large']['files']:,} files."),
        "",
        (f"The {large:,} generated images took {stores['large']['dataset_bytes'] / 1e9:.2f} GB "
        f"of memory; the process's peak resident size was "
        f"{results['peak_rss_bytes_after_stores'] / 1e9:.2f} GB."),
        "",
        ("Opens are timed from `page.goto` until: gallery (`#/gallery`), the first 60 cards' "
        "images loaded; summary (`#/`), `#metric-table` in the DOM; example "
        "(`#/example/<n/2>`), `#app[data-drawn]` set (the summary page waits for stats.js, "
        "the others do not). A served open includes making summary.js, table.js and "
        "stats.js (a fresh server makes them as it starts, in threads); the served rows "
        "above time those in Python apart."),
        "",
        ("Reproduce: `python benchmarks/viewer.py` (`--examples`, `--repeats`; "
        "benchmarks/results/viewer_cpu.json has every run and where each open's time went)."),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
