"""What the viewer shows, as plain JSON-able values: read from a store of
:func:`captum_daam.explain_dataset` or :func:`captum_daam.compare` (:class:`StoreData`), or
made from flows in memory (:class:`FlowData`, for ``captum-daam explain`` and notebooks).

Both give the same five things the page asks for:

- ``summary()``: the store's description, accuracy, the scores' histogram, the mean flow
  mass per block, the colour map: what every page needs first;
- ``stats()``: each metric's mean with its bootstrap interval and histogram (the summary
  page's table; apart, as its bootstrap takes a second on 50,000 examples);
- ``table()``: one column per field over the shown examples (index, label, target,
  prediction, score, each method's metrics), for sorting and filtering in the page;
- ``maps(k)``: the maps of examples ``k * GROUP_SIZE ...`` as float16 in base64, each
  example's divided by its largest magnitude (the display scalings do not change with it);
- ``images(k)``: the thumbnails of those examples as JPEG bytes (none where the store keeps
  no thumbnails).
"""

import base64
import io
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

#: Examples per file of maps.
GROUP_SIZE = 50
#: Maps larger than this on a side (pixel attributions) are shown average-pooled to it.
MAP_SIDE = 64
_HISTOGRAM_BINS = 20


class ViewerInputError(ValueError):
    """A store the viewer cannot show; the message is one line a user can act on."""


def open_store(path: Any, resamples: int = 10_000) -> "StoreData":
    """The store at ``path``, checked: a store of this package with at least one complete
    chunk; a ViewerInputError otherwise. ``resamples``: of the metrics' bootstrap."""
    from .. import dataset as ds

    path = Path(path)
    if not path.is_dir():
        raise ViewerInputError(f"Expected a store folder of explain-dataset or compare, got "
                               f"{path}, which is {'a file' if path.exists() else 'absent'}; "
                               f"give the folder their --out wrote.")
    try:
        settings = ds._stored_settings(path)
    except ValueError as error:
        if "cut short" in str(error):  # a store that was never created whole: say so
            raise ViewerInputError(" ".join(str(error).split())) from error
        raise ViewerInputError(f"Expected a store of explain-dataset or compare, got {path}, "
                               f"which holds other files or folders; give the folder their "
                               f"--out wrote.") from error
    if settings is None:
        raise ViewerInputError(f"Expected a store of explain-dataset or compare, got {path}, "
                               f"an empty folder; give the folder their --out wrote.")
    group = ds._import_zarr().open_group(str(path), mode="r")
    return StoreData(group, path, settings, resamples)


class StoreData:
    """The viewer's data from an explain_dataset or compare store (its complete chunks)."""

    def __init__(self, group: Any, path: Path, settings: Dict[str, Any],
                 resamples: int = 10_000, confidence: float = 0.95) -> None:
        from ..comparison import _complete_rows

        self.group, self.path, self.settings = group, path, settings
        self.resamples, self.confidence = resamples, confidence
        self.kind = "compare" if settings.get("kind") == "compare" else "explain_dataset"
        self.examples = int(settings["examples"])
        complete = np.asarray(group["complete"][:])
        self.rows = _complete_rows(complete, int(settings["batch_size"]), self.examples)
        if not len(self.rows):
            raise ViewerInputError(
                f"Expected a store with at least one complete chunk, got {path}, which has "
                f"none yet ({len(complete)} chunks): run explain-dataset or compare on it "
                f"to fill it.")
        self.chunks = (int(complete.sum()), len(complete))
        if self.kind == "compare":
            self.methods = {name: f"methods/{name}/" for name in settings["methods"]}
        else:
            self.methods = {_method_label(settings.get("method", {})): ""}
        self.metrics = list(settings.get("metrics", []))
        self.has_images = "thumbnails" in group
        self._shared = {name: np.asarray(group[name][:]) for name in
                        ("targets", "predictions", "scores", "labels")}
        self._last_chunk: Dict[str, Any] = {}  # array name -> (chunk, its values)

    # ---- the page's requests -----------------------------------------------------------

    def summary(self) -> Dict[str, Any]:
        from ..comparison import LOWER_IS_BETTER

        rows = self.rows
        labels = self._shared["labels"][rows]
        predictions = self._shared["predictions"][rows]
        meaning = self.group.attrs.get("labels")
        comparable = meaning is None or bool(meaning.get("model_classes", True))
        known = labels >= 0
        accuracy = (float((predictions[known] == labels[known]).mean())
                    if comparable and known.any() else None)
        methods = []
        for name, prefix in self.methods.items():
            shape = self.group[f"{prefix}maps"].shape
            methods.append({"name": name, "blocks": int(shape[1]),
                            "grid": [int(side) for side in shape[2:]],
                            "flow": int(shape[1]) > 1})
        return {
            "kind": self.kind,
            "title": self.path.name,
            "model": self.settings.get("model", {}).get("class", "?"),
            "dataset": _dataset_name(self.settings.get("dataset", {})),
            "examples": self.examples,
            "shown": int(len(rows)),
            "chunks": list(self.chunks),
            "partial": len(rows) < self.examples,
            "accuracy": accuracy,
            "labels_are_classes": comparable,
            "labels_meaning": None if meaning is None else meaning.get("meaning"),
            "classes": _class_names(meaning),  # the labels' names
            "methods": methods,
            "metrics": self.metrics,
            "lower_is_better": [name for name in self.metrics if name in LOWER_IS_BETTER],
            "score_histogram": _histogram(self._shared["scores"][rows].astype(np.float64)),
            "flow_mass": {item["name"]: self._flow_mass(self.methods[item["name"]])
                          for item in methods if item["flow"]},
            "block_metrics": self._block_metrics(),
            "confidence": self.confidence,
            "resamples": self.resamples,
            "group_size": GROUP_SIZE,
            "images": self.has_images,
            "colormap": colormap_table(),
        }

    def table(self) -> Dict[str, Any]:
        rows = self.rows
        columns: Dict[str, Any] = {"index": rows.tolist()}
        for name in ("label", "target", "prediction"):
            columns[name] = self._shared[f"{name}s"][rows].tolist()
        columns["score"] = _rounded(self._shared["scores"][rows])
        columns["metrics"] = {
            name: {metric: _rounded(np.asarray(self.group[f"{prefix}metrics/{metric}"][:])[rows])
                   for metric in self.metrics}
            for name, prefix in self.methods.items()}
        return columns

    def group_count(self) -> int:
        return -(-self.examples // GROUP_SIZE)

    def maps(self, number: int) -> Dict[str, Any]:
        start, stop = number * GROUP_SIZE, min(self.examples, (number + 1) * GROUP_SIZE)
        rows = self.rows[(self.rows >= start) & (self.rows < stop)]
        examples: Dict[str, Any] = {str(int(row)): {} for row in rows}
        if not len(rows):
            return {"examples": examples}
        for name, prefix in self.methods.items():
            maps = torch.from_numpy(self._rows(f"{prefix}maps", rows).astype(np.float32))
            for row, encoded in zip(rows, encode_maps(maps)):
                examples[str(int(row))][name] = encoded
        return {"examples": examples}

    def images(self, number: int) -> Dict[int, bytes]:
        """The thumbnails of group ``number``'s shown examples, read at once."""
        start, stop = number * GROUP_SIZE, min(self.examples, (number + 1) * GROUP_SIZE)
        rows = self.rows[(self.rows >= start) & (self.rows < stop)]
        if not self.has_images or not len(rows):
            return {}
        pictures = self._rows("thumbnails", rows)
        return {int(row): jpeg(picture) for row, picture in zip(rows, pictures)}

    # ---- helpers -----------------------------------------------------------------------

    def _rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """``rows`` (ascending) of an array, read a store chunk at a time and the last chunk
        kept: the groups of 50 the page asks for, in order, decompress each chunk once."""
        array = self.group[name]
        size = array.chunks[0]
        parts = []
        for chunk in np.unique(rows // size):
            kept = self._last_chunk.get(name)
            if kept is None or kept[0] != chunk:
                kept = (chunk, np.asarray(array[chunk * size:(chunk + 1) * size]))
                self._last_chunk[name] = kept
            parts.append(kept[1][rows[rows // size == chunk] - chunk * size])
        return np.concatenate(parts)

    def stats(self) -> Dict[str, Any]:
        """Each method's metrics: mean, bootstrap interval, count and histogram."""
        from .. import metrics as m

        columns, keys = [], []
        for name, prefix in self.methods.items():
            for metric in self.metrics:
                values = np.asarray(self.group[f"{prefix}metrics/{metric}"][:],
                                    np.float64)[self.rows]
                columns.append(torch.from_numpy(values))
                keys.append((name, metric))
        stats: Dict[str, Any] = {name: {} for name in self.methods}
        if not columns:
            return stats
        # every interval in one pass, as compare's report forms them (a column with NaNs is
        # resampled over its values that are not NaN)
        finite = [column[column.isfinite()] for column in columns]
        whole = [k for k, values in enumerate(finite) if len(values)]
        intervals: List[Any] = [None] * len(columns)
        if whole:
            found = m.bootstrap_intervals(torch.stack([columns[k] for k in whole], dim=1),
                                          self.confidence, self.resamples)
            for k, interval in zip(whole, found):
                intervals[k] = interval
        for (name, metric), values, interval in zip(keys, finite, intervals):
            stats[name][metric] = {
                "mean": None if interval is None else interval[0],
                "low": None if interval is None else interval[1],
                "high": None if interval is None else interval[2],
                "count": int(len(values)),
                "histogram": _histogram(values.numpy()),
            }
        return stats

    def _block_metrics(self) -> Dict[str, Dict[str, List[Optional[float]]]]:
        """Per method with a flow, each block metric's mean over the examples, per block
        (compare stores keep the pointing games of every D_l)."""
        found: Dict[str, Dict[str, List[Optional[float]]]] = {}
        for name, prefix in self.methods.items():
            if f"{prefix}block_metrics" not in self.group:
                continue
            folder = self.group[f"{prefix}block_metrics"]
            found[name] = {metric: _rounded(np.nanmean(np.asarray(folder[metric][:], np.float64)
                                                       [self.rows], axis=0))
                           for metric in sorted(folder.array_keys())}
        return found

    def _flow_mass(self, prefix: str) -> List[Optional[float]]:
        from ..comparison import _mean_flow_mass

        return _rounded(_mean_flow_mass(self.group[f"{prefix}maps"], self.rows))


class FlowData:
    """The viewer's data for flows in memory: one example per explained image (``captum-daam
    explain``, :class:`captum_daam.viewer.FlowView`), without metrics.

    Args:
        examples: dicts with ``name``, ``image`` ((3, H, W) in [0, 1]), ``flow``
            ((L, h, w) raw maps), ``target`` and ``score``, and optionally ``label`` (text
            shown for the target).
        title: the page's title.
    """

    def __init__(self, examples: Sequence[Dict[str, Any]], title: str = "DAAM") -> None:
        self.examples = list(examples)
        self.title = title

    def summary(self) -> Dict[str, Any]:
        first = self.examples[0]["flow"]
        return {
            "kind": "explain", "title": self.title, "model": None,
            "dataset": None, "examples": len(self.examples), "shown": len(self.examples),
            "chunks": None, "partial": False, "accuracy": None,
            "labels_are_classes": True,  # "classes" names the model's classes here
            "labels_meaning": None,
            "classes": {str(item["target"]): item["label"] for item in self.examples
                        if item.get("label") is not None},
            "methods": [{"name": "DAAM", "blocks": int(first.shape[0]),
                         "grid": [int(side) for side in first.shape[1:]],
                         "flow": int(first.shape[0]) > 1}],
            "metrics": [], "lower_is_better": [],
            "score_histogram": None, "flow_mass": {}, "block_metrics": {}, "confidence": None,
            "resamples": None,
            "group_size": max(1, len(self.examples)), "images": True,
            "names": [item["name"] for item in self.examples],
            "block_numbers": self.examples[0].get("block_numbers"),
            "colormap": colormap_table(),
        }

    def stats(self) -> Dict[str, Any]:
        return {"DAAM": {}}

    def table(self) -> Dict[str, Any]:
        count = len(self.examples)
        return {"index": list(range(count)), "label": [-1] * count,
                "target": [int(item["target"]) for item in self.examples],
                "prediction": [int(item["target"]) for item in self.examples],
                "score": _rounded(np.array([item["score"] for item in self.examples])),
                "metrics": {"DAAM": {}}}

    def group_count(self) -> int:
        return 1

    def maps(self, number: int) -> Dict[str, Any]:
        flows = [torch.as_tensor(item["flow"]).detach().float().cpu() for item in self.examples]
        return {"examples": {str(index): {"DAAM": encode_maps(flow[None])[0]}
                             for index, flow in enumerate(flows)}}

    def image(self, index: int) -> Optional[bytes]:
        image = torch.as_tensor(self.examples[index]["image"]).detach().float().cpu()
        picture = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
        return jpeg(picture.numpy(), longest=288)

    def images(self, number: int) -> Dict[int, bytes]:
        return {index: self.image(index) for index in range(len(self.examples))}


# ---- encoding ------------------------------------------------------------------------------


def encode_maps(maps: torch.Tensor) -> List[Dict[str, Any]]:
    """(B, L, h, w) maps -> per example {"shape": [L, h, w], "data": base64 of float16
    little-endian}; maps larger than MAP_SIDE on a side are average-pooled first (whole
    factors, so a pooled cell is the mean of the pixels it covers). Each example is divided
    by its largest finite magnitude first, so float16 neither overflows nor loses small
    maps to its subnormals; the display scalings and the block maps scale with it."""
    maps = maps.float()
    factor = math.ceil(max(maps.shape[-2:]) / MAP_SIDE)
    if factor > 1:
        maps = torch.nn.functional.avg_pool2d(maps, factor, ceil_mode=True)
    finite = maps.isfinite()
    largest = torch.where(finite, maps.abs(), torch.zeros_like(maps)).flatten(1).amax(1)
    maps = maps / torch.where(largest > 0, largest, torch.ones_like(largest))[:, None, None,
                                                                                None]
    values = maps.to(torch.float16).numpy().astype("<f2")
    return [{"shape": list(example.shape),
             "data": base64.b64encode(example.tobytes()).decode("ascii")}
            for example in values]


def jpeg(picture: np.ndarray, longest: Optional[int] = None) -> bytes:
    """(h, w, 3) uint8 -> JPEG bytes (enlarged, bicubically, to ``longest`` when given)."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(picture))
    if longest is not None and max(image.size) != longest:
        ratio = longest / max(image.size)
        image = image.resize((max(1, round(image.width * ratio)),
                              max(1, round(image.height * ratio))), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def colormap_table(name: str = "jet") -> List[List[int]]:
    """The colour map the package's figures use, as 256 RGB triples."""
    from matplotlib import colormaps

    colours = colormaps[name](np.linspace(0, 1, 256))[:, :3]
    return np.rint(colours * 255).astype(int).tolist()


def _rounded(values: np.ndarray) -> List[Optional[float]]:
    """Floats with 5 significant digits, NaN as None (JSON's null)."""
    return [None if not math.isfinite(value) else float(f"{value:.5g}")
            for value in np.asarray(values, np.float64).tolist()]


def _histogram(values: np.ndarray) -> Optional[Dict[str, Any]]:
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    low, high = float(values.min()), float(values.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(values, bins=_HISTOGRAM_BINS, range=(low, high))
    return {"edges": _rounded(edges), "counts": counts.tolist()}


def _method_label(method: Dict[str, Any]) -> str:
    name = str(method.get("class", "method")).rsplit(".", 1)[-1]
    wrapped = method.get("wraps")
    return f"{name}({str(wrapped).rsplit('.', 1)[-1]})" if wrapped else name


def _dataset_name(identity: Dict[str, Any]) -> str:
    kind = str(identity.get("class", "dataset")).rsplit(".", 1)[-1]
    size = identity.get("images", identity.get("rows", identity.get("length")))
    return f"{kind} ({size} examples)" if size is not None else kind


def _class_names(meaning: Optional[Dict[str, Any]]) -> Dict[str, str]:
    """Class index -> name, from the labels' mapping a store keeps (class folders, a
    dataset's class names); empty when the store has none."""
    if not meaning:
        return {}
    return {str(index): str(name) for name, index in meaning.get("class_to_index", {}).items()}
