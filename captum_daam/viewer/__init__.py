"""See the flow: an interactive report of an explain_dataset or compare store, a page for the
images ``captum-daam explain`` explained, and the same view in a notebook.

The report is a folder of its own HTML, CSS and JavaScript (no CDN, nothing fetched from the
network): ``index.html`` opens offline from disk and the folder can be shared as it is. Its
pages:

- **Summary**: accuracy, each metric's mean with its bootstrap interval and histogram, and
  the mean flow mass per block (how the decision forms on average);
- **Gallery**: the examples, sortable and filterable by class, correct / wrong, score and
  each metric, the failures first when asked (e.g. pointing missed on a correct prediction),
  in pages, with thumbnails loaded as they are shown;
- **Example**: the image with a block slider and a play button over D_1..D_L (or the block
  maps cam_l), the three display scalings of :mod:`captum_daam.decompose`, and the other
  methods of a compare store side by side.

Data files are JavaScript (``data/*.js``) rather than JSON so that a page opened from disk
(``file://``) can load them; the maps of 50 examples are one file, loaded when one of them
is opened. :func:`serve` answers the same requests from the store, on demand, so nothing
is written for a store too large to render at once.
"""

import functools
import html
import json
import os
import shutil
import threading
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from ._data import GROUP_SIZE, FlowData, StoreData, ViewerInputError, open_store

__all__ = ["view", "serve", "make_server", "open_store", "FlowView", "flow_page",
           "ViewerInputError"]

PathLike = Union[str, "os.PathLike[str]"]


def view(store: PathLike, out: Optional[PathLike] = None, resamples: int = 10_000) -> Path:
    r"""
    Write the report of an explain_dataset or compare store: a folder with ``index.html``
    that opens offline in a browser.

    A partial store (a run still going, or stopped) is shown on its complete chunks, and
    the page says so. The folder is written beside its place and moved there whole, so an
    error leaves nothing; an earlier report at ``out`` is replaced, and a folder holding
    anything else is refused.

    Args:
        store (str or Path): The store folder of :func:`captum_daam.explain_dataset` or
                    :func:`captum_daam.compare`.
        out (str or Path, optional): The report's folder. Default: ``store/view``
        resamples (int, optional): Bootstrap resamples of the metrics' intervals (as
                    :func:`captum_daam.comparison.report`'s, so both give the same
                    intervals). Default: 10,000

    Returns:
        Path: the report's ``index.html``.

    Raises:
        ViewerInputError: (a ValueError) when ``store`` is not a store of this package, or
                    has no complete chunk yet, or ``out`` holds anything but a report.

    Example::

        >>> from captum_daam.viewer import view
        >>> page = view("store.zarr")  # doctest: +SKIP
        >>> print(page)  # open it in a browser  # doctest: +SKIP
        store.zarr/view/index.html
    """
    data = open_store(store, resamples)
    out = Path(out) if out is not None else data.path / "view"
    _check_out(out, data.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    building = out.parent / f".{out.name}.{uuid.uuid4().hex}.partial"
    try:
        _write_report(data, building)
        if out.exists():
            old = out.parent / f".{out.name}.{uuid.uuid4().hex}.old"
            os.replace(out, old)
            os.replace(building, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out / "index.html"


#: What a report folder holds at its top: an earlier report there is replaced.
REPORT_ENTRIES = {"index.html", "assets", "data", "images"}


def _check_out(out: Path, store: Path) -> None:
    """Refuse a report folder that is, or holds, the store, or that holds anything but an
    earlier report (which is replaced): nothing of a user's is ever removed."""
    if out.exists() and not out.is_dir():
        raise ViewerInputError(f"Expected --out to be a folder for the report, got {out}, a "
                               f"file; choose another --out.")
    if store.resolve() == out.resolve() or out.resolve() in store.resolve().parents:
        raise ViewerInputError(f"Expected a report folder outside the store, got {out}, which "
                               f"holds the store {store}; choose another --out.")
    if out.is_dir():
        entries = {path.name for path in out.iterdir()}
        if entries and not (entries <= REPORT_ENTRIES and {"index.html", "data"} <= entries):
            raise ViewerInputError(
                f"Expected --out to be absent, empty or an earlier report (replaced), got "
                f"{out}, which holds other files ({', '.join(sorted(entries)[:3])}); choose "
                f"another --out.")


def serve(store: PathLike, port: int = 8000, host: str = "127.0.0.1",
          resamples: int = 10_000) -> None:
    """Serve the report of ``store`` at ``http://host:port/`` until interrupted, making each
    file when the page asks for it (nothing is written): for a store too large to write
    out at once. See :func:`make_server` for a server to run in a thread of your own."""
    data = open_store(store, resamples)
    server = make_server(data, host, port)
    print(f"serving {store} at http://{server.server_address[0]}:{server.server_address[1]}/")
    try:
        server.serve_forever()
    finally:
        server.server_close()


def flow_page(examples: Sequence[Dict[str, Any]], title: str = "DAAM") -> str:
    """One self-contained HTML page (styles, script, maps and images inside) with the
    example view of each flow in ``examples`` (see :class:`FlowData`): what ``captum-daam
    explain`` writes as ``index.html``."""
    return _page(FlowData(examples, title), inline=True)


class FlowView:
    """The flow of one image as the report's example view, for Jupyter: a block slider, a
    play button and the three scalings, in an iframe of its own (no widget library needed;
    the notebook keeps it in its output).

    Args:
        image (Tensor): (3, H, W) or (1, 3, H, W) in [0, 1] (or uint8), the image as shown,
                    before the model's normalisation.
        flow (Tensor): (L, h, w) or (1, L, h, w), the raw flow D_1..D_L of
                    ``DAAM.attribute(..., return_flow=True)``.
        target (int, optional): The explained class. Default: 0
        score (float, optional): Its probability, shown beside it. Default: NaN
        label (str, optional): The class's name. Default: None
        height (int, optional): The iframe's height in pixels. Default: 640

    Example::

        >>> from captum_daam.viewer import FlowView
        >>> FlowView(image, flow[0], target=3, label="circle")  # doctest: +SKIP

    Raises:
        ValueError: for a batch of more than one image, an image that is not (3, H, W) in
                    [0, 1], or a flow that is not (L, h, w) and finite; as
                    :func:`captum_daam.visualization.flow_figure` does.
    """

    def __init__(self, image: Any, flow: Any, target: int = 0, score: float = float("nan"),
                 label: Optional[str] = None, height: int = 640) -> None:
        from ..visualization import _as_flow, _as_image

        # checked as flow_figure checks them: one example, an RGB image in [0, 1], a finite flow
        image, flow = _as_image(image), _as_flow(flow)
        self.page = flow_page([{"name": label or f"class {target}", "image": image,
                                "flow": flow, "target": int(target), "score": float(score),
                                "label": label}], title="DAAM flow")
        self.height = height

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.page, quote=True)}" '
                f'style="width:100%;height:{self.height}px;border:0" '
                f'sandbox="allow-scripts"></iframe>')


# ---- the files -----------------------------------------------------------------------------


def _static(name: str) -> str:
    return resources.files(__name__).joinpath("static", name).read_text(encoding="utf-8")


def _script_data(key: str, value: Any) -> str:
    # "<" as its JSON escape: no "</script>" or "<!--" can end or change the script element
    text = json.dumps(value, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return f"DAAMView.receive({json.dumps(key)},{text});\n"


def _page(data: Any, inline: bool) -> str:
    """index.html: the assets linked (a report folder) or inside it (one file, with its
    data and images)."""
    page = _static("index.html")
    if not inline:
        return (page.replace("{{STYLE}}", '<link rel="stylesheet" href="assets/viewer.css">')
                .replace("{{SCRIPT}}", '<script src="assets/viewer.js"></script>')
                .replace("{{DATA}}", ""))
    import base64

    parts = [_script_data("summary", data.summary()), _script_data("stats", data.stats()),
             _script_data("table", data.table())]
    for number in range(data.group_count()):
        parts.append(_script_data(f"maps/{number}", data.maps(number)))
        images = {str(index): "data:image/jpeg;base64," + base64.b64encode(picture).decode()
                  for index, picture in data.images(number).items()}
        parts.append(_script_data(f"images/{number}", images))
    return (page.replace("{{STYLE}}", f"<style>\n{_static('viewer.css')}</style>")
            .replace("{{SCRIPT}}", f"<script>\n{_static('viewer.js')}</script>")
            .replace("{{DATA}}", "<script>\n" + "".join(parts) + "</script>"))


def _write_report(data: StoreData, folder: Path) -> None:
    (folder / "assets").mkdir(parents=True)
    (folder / "data" / "maps").mkdir(parents=True)
    for name in ("viewer.js", "viewer.css"):
        (folder / "assets" / name).write_text(_static(name), encoding="utf-8")
    (folder / "data" / "summary.js").write_text(_script_data("summary", data.summary()))
    (folder / "data" / "stats.js").write_text(_script_data("stats", data.stats()))
    (folder / "data" / "table.js").write_text(_script_data("table", data.table()))
    for number in range(data.group_count()):
        maps = data.maps(number)
        if not maps["examples"]:
            continue
        (folder / "data" / "maps" / f"{number:05d}.js").write_text(
            _script_data(f"maps/{number}", maps))
        images = data.images(number)
        if images:
            place = folder / "images" / f"{number:05d}"
            place.mkdir(parents=True)
            for index, picture in images.items():
                (place / f"{index}.jpg").write_bytes(picture)
    (folder / "index.html").write_text(_page(data, inline=False), encoding="utf-8")


# ---- the server ----------------------------------------------------------------------------


def make_server(data: StoreData, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) that answers the report's requests from ``data``.
    The summary, the table and the metrics' statistics (their bootstrap) are made at once, in
    threads, so the first page waits for them the least; maps and thumbnails are made a
    group at a time (a store chunk is decompressed whole), the last groups kept."""
    cache: Dict[str, bytes] = {}
    locks: Dict[str, threading.Lock] = {}
    guard = threading.Lock()

    def made(key: str, make: Any) -> bytes:
        with guard:
            lock = locks.setdefault(key, threading.Lock())
        with lock:  # one maker per file; the others wait for it
            if key not in cache:
                cache[key] = make()
            return cache[key]

    recent_lock = threading.Lock()
    # one group made at a time: requests for the same group wait for it instead of making it
    group_images = functools.lru_cache(maxsize=8)(data.images)
    group_maps = functools.lru_cache(maxsize=8)(
        lambda number: _script_data(f"maps/{number}", data.maps(number)).encode())

    def answer(path: str) -> Optional[tuple]:
        if path in ("/", "/index.html"):
            return "text/html", made("index", lambda: _page(data, inline=False).encode())
        if path in ("/assets/viewer.js", "/assets/viewer.css"):
            name = path.rsplit("/", 1)[1]
            kind = "text/javascript" if name.endswith(".js") else "text/css"
            return kind, _static(name).encode()
        if path == "/data/summary.js":
            return "text/javascript", made("summary", lambda: _script_data(
                "summary", data.summary()).encode())
        if path == "/data/table.js":
            return "text/javascript", made("table", lambda: _script_data(
                "table", data.table()).encode())
        if path == "/data/stats.js":
            return "text/javascript", made("stats", lambda: _script_data(
                "stats", data.stats()).encode())
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[:2] == ["data", "maps"] and parts[2].endswith(".js"):
            number = _number(parts[2][:-3])
            if number is not None and number < data.group_count():
                with recent_lock:
                    return "text/javascript", group_maps(number)
        if len(parts) == 3 and parts[0] == "images" and parts[2].endswith(".jpg"):
            number, index = _number(parts[1]), _number(parts[2][:-4])
            if number is not None and index is not None and index // GROUP_SIZE == number:
                with recent_lock:
                    picture = group_images(number).get(index)
                if picture is not None:
                    return "image/jpeg", picture
        return None

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            found = answer(self.path.split("?", 1)[0])
            if found is None:
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            kind, body = found
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", f"{kind}; charset=utf-8"
                             if kind.startswith("text") else kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # quiet: the command prints the address once

    server = ThreadingHTTPServer((host, port), Handler)
    for path in ("/data/summary.js", "/data/table.js", "/data/stats.js"):
        threading.Thread(target=answer, args=(path,), daemon=True).start()
    return server


def _number(text: str) -> Optional[int]:
    return int(text) if text.isascii() and text.isdigit() else None
