"""Compare DAAM with other attributions on a whole dataset: one store, one group per method,
every method explaining the same examples for the same targets; then a table of each
metric's mean with a 95% bootstrap interval, the paired difference of every method from DAAM,
a random row as the chance level, and seconds per image.

The store is an :func:`~captum_daam.explain_dataset` store (Zarr v3, resumable, under
``torchrun`` each process explains its share of the chunks) whose per-method arrays sit in
``methods/<name>/``:

==============================  ==================  ========================================
array                           shape, dtype        content
==============================  ==================  ========================================
``targets``, ``predictions``,   (N,)                shared by every method: the explained
``scores``, ``labels``                              class, the model's prediction, the
                                                    target's softmax probability, the label
``methods/<m>/maps``            (N, L, h, w)        the method's maps at their own grid
                                                    (DAAM's whole flow, L blocks)
``methods/<m>/metrics/<k>``     (N,) float32        metric k of the method's final map
``methods/<m>/curves/<k>``      (N, S) float32      the curve of a curve metric
``methods/<m>/block_metrics/``  (N, L) float32      DAAM: a mask metric of each block's
``<k>``                                             accumulated map D_l
``methods/<m>/seconds``         (C,) float64        seconds chunk c took the method
``complete``                    (C,) bool           chunk c done by every method
==============================  ==================  ========================================

The report (:func:`report`) is written into the store's folder, ``report/``: ``compare.md``,
``compare.csv``, ``curves.png`` and ``flow.png``.
"""

import csv
import io
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ._methods import (
    METHOD_NAMES, Method, RandomMaps, ScoresOf, as_method, explains, named_method)
from ._warnings import warn_user

__all__ = ["compare", "report", "RandomMaps", "ScoresOf", "DEFAULT_METHODS", "LOWER_IS_BETTER"]

#: The methods compared when none are named.
DEFAULT_METHODS = ("daam", "gradient-rollout", "rollout", "gradcam", "integrated-gradients",
                   "saliency", "occlusion", "random")
#: Metrics whose lower values are better; for every other metric higher is better.
LOWER_IS_BETTER = ("deletion", "positive_perturbation", "average_drop")
_BLOCK_METRICS = ("pointing_game", "energy_pointing_game")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def compare(
    model: nn.Module,
    dataset: Any,
    methods: Union[Sequence[str], Mapping[str, Any]] = DEFAULT_METHODS,
    metrics: Sequence[str] = ("deletion", "insertion"),
    out: Union[str, os.PathLike] = "compare.zarr",
    batch_size: int = 64,
    target: Union[None, str, int, Sequence[int], Tensor] = None,
    dtype: torch.dtype = torch.float16,
    return_flow: bool = True,
    num_workers: int = 0,
    progress: bool = True,
    write_report: bool = True,
    resamples: int = 10_000,
) -> Any:
    r"""
    Explain every example of a dataset with several attributions and evaluate them with the
    same metrics, into one Zarr v3 store; then write the comparison's report.

    Every method explains the same examples for the same targets (one forward pass per batch
    gives the predictions, which the methods share). Resumable and distributed exactly as
    :func:`~captum_daam.explain_dataset` (a chunk is complete when every method has
    written it), and a store of other settings (model, methods and their arguments, metrics,
    data) is refused naming the differences.

    Args:
        model (nn.Module): The classifier, in eval mode, on the device the images go to.
        dataset: As :func:`~captum_daam.explain_dataset` takes it: a map-style dataset of
                    ``(image, label[, mask])``, an image folder, or a Hugging Face dataset.
        methods (sequence of str or dict, optional): The names of
                    :data:`~captum_daam._methods.METHOD_NAMES` (``"daam"``, ``"rollout"``,
                    ``"gradient-rollout"``, ``"legrad"``, ``"gradcam"``,
                    ``"integrated-gradients"``, ``"saliency"``, ``"input-x-gradient"``,
                    ``"occlusion"``, ``"random"``), or a dict from a name of your choice to
                    one of those names, an attribution object (any Captum attribution on
                    ``model``), ``(attribution, attribute_kwargs)``, or a callable
                    ``(images, targets) -> maps``. Default: :data:`DEFAULT_METHODS` (when
                    left as the default, methods that refuse the model are left out with a
                    warning; named explicitly, they are an error).
        metrics (sequence of str, optional): From :data:`captum_daam.dataset.METRICS`,
                    computed on each method's final map. Default: deletion and insertion
        out (str or Path, optional): The store. Default: ``"compare.zarr"``
        batch_size (int, optional): Examples per pass and per chunk. Default: 64
        target (optional): As in :func:`~captum_daam.explain_dataset`: None (the
                    predicted class), ``"label"``, an int or one class per example.
        dtype (torch.dtype, optional): The dtype the maps are stored in. Default: float16
        return_flow (bool, optional): Store DAAM's whole flow D_1..D_L (and the mask
                    metrics of every block map, when asked for). Default: True
        num_workers (int, optional): ``DataLoader`` worker processes. Default: 0
        progress (bool, optional): A progress bar and the means at the end. Default: True
        write_report (bool, optional): Write :func:`report` into ``out/report/`` (rank 0).
                    Default: True
        resamples (int, optional): Bootstrap resamples of the report. Default: 10,000

    Returns:
        *zarr.Group*: the store, opened read-only. ``attrs["summary"]`` holds the accuracy,
        each method's metric means and its seconds per image.

    Example::

        >>> from captum_daam import compare
        >>> from captum_daam.data import ShapesDataset
        >>> from captum_daam.zoo import tiny_vit
        >>> store = compare(tiny_vit(), ShapesDataset(64), ["daam", "rollout", "random"],
        ...                 metrics=["pointing_game", "deletion"], out="compare.zarr")
        >>> sorted(store["methods"].group_keys())
        ['daam', 'random', 'rollout']
    """
    from . import dataset as ds

    zarr = ds._import_zarr()
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, got {type(model).__name__}.")
    ds._check_positive_int("batch_size", batch_size)
    ds._check_num_workers(num_workers)
    ds._check_dtype(dtype)
    ds._check_positive_int("resamples", resamples)
    metrics = ds._check_metrics(metrics)
    device = ds._model_device(model)
    out = Path(out)
    specs = _method_specs(methods)
    known = {"kind": "compare", "batch_size": batch_size, "metrics": list(metrics),
             "target": ds._target_name(target), "dtype": ds._DTYPES[dtype]}
    ds.refuse_other_settings(out, {key: value for key, value in known.items()
                                   if value is not ds._UNKNOWN})
    job = ds._Job.prepare(dataset, model, ds._inner_model(model), target, metrics, batch_size)
    grid = _patch_grid(model, job, device)  # DAAM's checks of the images and the model first
    job.check_targets(model, device)
    built, probes = _build_methods(specs, model, job, device, grid, batch_size, return_flow,
                                   explicit=not _is_default(methods))
    settings = {
        **ds.argument_settings(batch_size, None, job.target_spec, return_flow, dtype,
                               metrics),
        "kind": "compare",
        "model": ds._model_identity(model),
        "methods": {name: method.settings() for name, method in built.items()},
        **job.settings(),
    }
    ds.refuse_other_settings(out, settings)

    arrays: Dict[str, Any] = {}
    block_metrics = [name for name in metrics if name in _BLOCK_METRICS]
    for name, method in built.items():
        probe = probes[name]
        prefix = f"methods/{name}/"
        arrays[prefix + "maps"] = ds._maps_array(probe.shape[1:], settings["dtype"])
        arrays.update(ds._metric_arrays(prefix, metrics))
        if method.return_flow:
            for metric in block_metrics:
                arrays[f"{prefix}block_metrics/{metric}"] = ds._ArraySpec(
                    (probe.shape[1],), "float32", float("nan"), ("block",))
        arrays[prefix + "seconds"] = ds._ArraySpec((), "float64", float("nan"),
                                                   per_chunk=True)

    def compute(images: Tensor, targets: Optional[Tensor], masks: Optional[Tensor],
                chunk: int) -> Dict[str, Tensor]:
        values = ds._per_example(ds._logits(model, images), targets)
        targets = values["targets"]
        for name, method in built.items():
            prefix = f"methods/{name}/"
            started = ds._clock(device)
            maps = ds._explain_seeded(method, images, targets, chunk)
            values[prefix + "seconds"] = torch.tensor(ds._clock(device) - started,
                                                      dtype=torch.float64)
            values[prefix + "maps"] = maps.to(dtype)
            values.update(ds._metric_values(prefix, metrics, model, images, maps[:, -1:],
                                            targets, masks))
            if method.return_flow and block_metrics:
                from . import metrics as m

                for metric in block_metrics:
                    values[f"{prefix}block_metrics/{metric}"] = torch.stack(
                        [getattr(m, metric)(maps[:, [block]], masks).float()
                         for block in range(maps.shape[1])], dim=1)
        return values

    def summarise(means: Dict[str, float], summary: Dict[str, Any]) -> Dict[str, Any]:
        group = zarr.open_group(str(out), mode="r")
        summary["metrics"] = {name: {metric: means[f"methods/{name}/metrics/{metric}"]
                                     for metric in metrics} for name in built}
        summary["seconds_per_image"] = {
            name: float(np.nansum(group[f"methods/{name}/seconds"][:])) / summary["examples"]
            for name in built}
        return summary

    store = ds._run_store(zarr, out, settings, arrays, job, compute, summarise, device,
                          num_workers, progress, "compare")
    if write_report and _rank() == 0:
        report(out, resamples=resamples)
    return store


def report(store: Union[str, os.PathLike, Any], out: Optional[Union[str, os.PathLike]] = None,
           reference: Optional[str] = None, resamples: int = 10_000, confidence: float = 0.95,
           seed: int = 0) -> Dict[str, Any]:
    r"""
    The comparison's report from a :func:`compare` store: each metric's mean per method with
    a bootstrap interval, the paired difference from the reference method (DAAM) with its
    interval, a flag where a method cannot be told from the random row, and seconds per
    image; written as ``compare.md`` and ``compare.csv``, with the mean curves of the curve
    metrics (``curves.png``) and DAAM's flow per block (``flow.png``).

    Intervals are percentile bootstraps over the examples, as
    :func:`captum_daam.metrics.bootstrap_interval` and
    :func:`captum_daam.metrics.paired_difference` give them (all at once, with
    :func:`captum_daam.metrics.bootstrap_intervals`): the same resampled examples for both
    methods of a difference. A method's cell is flagged "~random" when the
    interval of its paired difference from the random row holds 0; a metric is flagged when
    every method's cell is.

    Args:
        store (str, Path or zarr.Group): The store of :func:`compare`.
        out (str or Path, optional): The folder to write into. Default: ``store/report``
        reference (str, optional): The method the differences are taken from. Default: the
                    first DAAM method of the store.
        resamples (int, optional): Bootstrap resamples. Default: 10,000
        confidence (float, optional): Default: 0.95
        seed (int, optional): Seed of the resampling. Default: 0

    Returns:
        dict: ``rows`` (one dict per method: each metric's ``mean``, ``low``, ``high``,
        ``difference`` and its interval, ``like_random``), ``flagged_metrics``,
        ``reference``, ``random`` (the random row: the method named ``"random"`` or given
        as :class:`RandomMaps`; None when there is none), and
        ``files``.
    """
    from . import dataset as ds
    from . import metrics as m

    if isinstance(store, (str, os.PathLike)):
        path = Path(store)
        if ds._stored_settings(path) is None:  # refuses what is not a store of this package
            raise ValueError(f"Expected a store of captum_daam.compare, got {path}, which is "
                             f"absent or empty.")
        group = ds._import_zarr().open_group(str(path), mode="r")
    else:
        group, path = store, Path(str(store.store.root))
    settings = dict(group.attrs["settings"])
    if settings.get("kind") != "compare":
        raise ValueError(f"Expected a store of captum_daam.compare, got {path}, a store of "
                         f"explain_dataset.")
    methods: Dict[str, Any] = settings["methods"]
    names = list(methods)
    metrics = list(settings["metrics"])
    complete = np.asarray(group["complete"][:])
    rows_done = _complete_rows(complete, settings["batch_size"], settings["examples"])
    if not len(rows_done):
        raise ValueError(f"Expected a store with at least one complete chunk to report, got "
                         f"{path}, which has none yet; run compare on it to fill it.")
    if reference is None:
        reference = next((name for name in names if methods[name]["class"].endswith(".DAAM")),
                         names[0])
    elif reference not in names:
        raise ValueError(f"Expected reference among the store's methods {names}, got "
                         f"{reference!r}.")
    random_name = next((name for name in names if name == "random" or
                        methods[name].get("callable", "").startswith("RandomMaps")), None)
    values = {name: {metric: torch.from_numpy(np.asarray(
        group[f"methods/{name}/metrics/{metric}"][:], np.float64)[rows_done])
        for metric in metrics} for name in names}
    seconds = {name: float(np.nansum(np.asarray(group[f"methods/{name}/seconds"][:])
                                      [complete])) / max(1, len(rows_done)) for name in names}
    # every interval of the table in one bootstrap pass: the values, and the paired
    # differences from the reference and from the random row, as columns
    columns: List[Tensor] = []
    keys: List[tuple] = []
    for name in names:
        for metric in metrics:
            columns.append(values[name][metric])
            keys.append((name, metric, "mean"))
            if name != reference:
                columns.append(values[name][metric] - values[reference][metric])
                keys.append((name, metric, "difference"))
            if random_name is not None and name != random_name:
                columns.append(values[name][metric] - values[random_name][metric])
                keys.append((name, metric, "random"))
    intervals = dict(zip(keys, m.bootstrap_intervals(
        torch.stack(columns, dim=1), confidence, resamples, seed))) if columns else {}
    rows: List[Dict[str, Any]] = []
    for name in names:
        row: Dict[str, Any] = {"method": name, "seconds_per_image": seconds[name]}
        for metric in metrics:
            mean, low, high = intervals[(name, metric, "mean")]
            cell = {"mean": mean, "low": low, "high": high}
            if name != reference:
                cell["difference"] = list(intervals[(name, metric, "difference")])
            if random_name is not None and name != random_name:
                _, low_r, high_r = intervals[(name, metric, "random")]
                cell["like_random"] = bool(low_r <= 0 <= high_r)
            row[metric] = cell
        rows.append(row)
    flagged = [metric for metric in metrics if random_name is not None and all(
        row[metric].get("like_random", False) for row in rows if row["method"] != random_name)]
    out = Path(out) if out is not None else path / "report"
    out.mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, "metrics": metrics, "flagged_metrics": flagged,
              "reference": reference, "random": random_name, "examples": len(rows_done),
              "of_examples": settings["examples"], "confidence": confidence,
              "resamples": resamples, "files": {}}
    files = result["files"]
    files["markdown"] = _write_text(out / "compare.md", _markdown(result))
    files["csv"] = _write_text(out / "compare.csv", _csv(result))
    curve_metrics = [metric for metric in metrics if metric in ds._CURVES]
    if curve_metrics:
        files["curves"] = _plot_curves(group, names, curve_metrics, rows_done,
                                       out / "curves.png")
    flow_name = next((name for name in names if f"methods/{name}/block_metrics" in group
                      or group[f"methods/{name}/maps"].shape[1] > 1), None)
    if flow_name is not None:
        files["flow"] = _plot_flow(group, flow_name, rows_done, out / "flow.png")
    return result


# ---- methods -----------------------------------------------------------------------------


def _is_default(methods: Any) -> bool:
    return methods is DEFAULT_METHODS


def _method_specs(methods: Any) -> Dict[str, Any]:
    if isinstance(methods, str) or not isinstance(methods, (Mapping, Sequence)):
        raise TypeError(f"Expected methods as a list of names or a dict from names to "
                        f"attributions, got {type(methods).__name__}.")
    specs = dict(methods) if isinstance(methods, Mapping) else {name: name for name in methods}
    if not isinstance(methods, Mapping) and len(specs) != len(methods):
        raise ValueError(f"Expected each method once, got {list(methods)}.")
    if not specs:
        raise ValueError("Expected at least one method, got none.")
    for name, spec in specs.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"Expected method names of letters, digits, '_', '-' and '.', "
                             f"got {name!r}.")
        if isinstance(spec, str) and spec not in METHOD_NAMES:
            raise ValueError(f"Expected a method among {', '.join(METHOD_NAMES)}, got "
                             f"{spec!r}.")
    return specs


def _build_methods(specs: Dict[str, Any], model: nn.Module, job: Any, device: torch.device,
                   grid: Any, batch_size: int, return_flow: bool, explicit: bool):
    """Each method built and run on the first example (its maps' shape); a method that
    refuses the model, at construction or when it runs, is an error when the methods were
    named, and left out with a warning when they are the defaults."""
    built: Dict[str, Method] = {}
    probes: Dict[str, Tensor] = {}
    for name, spec in specs.items():
        try:
            if isinstance(spec, str):
                spec = named_method(spec, model, grid, tuple(job.first[0].shape), batch_size)
            method = as_method(spec, model)
            _check_forward(method, model)
            if method.is_daam and return_flow:
                method.return_flow = True
            probes[name] = job.probe(method, device)
        except (TypeError, ValueError) as error:
            if explicit:
                raise type(error)(f"method {name!r}: {str(error).splitlines()[0]}") from error
            warn_user(f"compare: left out {name}: {str(error).splitlines()[0]}")
            continue
        built[name] = method
    if not built:
        raise ValueError("Expected at least one method that takes this model, got none.")
    return built, probes


def _check_forward(method: Method, model: nn.Module) -> None:
    """An attribution object must explain ``model`` itself: its forward function is the
    model whose predictions and metrics the store holds (a callable is the user's to say)."""
    forward = getattr(method.attribution, "forward_func", None)
    if hasattr(method.attribution, "attribute") and not explains(forward, model):
        raise ValueError(
            f"Expected an attribution built on the compared model (forward_func is model), "
            f"got a {type(method.attribution).__name__} whose forward function is "
            f"{type(forward).__name__}; build it on the model given to compare, or give a "
            f"callable (images, targets) -> maps.")


def _patch_grid(model: nn.Module, job: Any, device: torch.device) -> tuple:
    """The model's patch grid (DAAM's final map of the first example), or the image size
    over 16 for a model DAAM does not take."""
    from .attr import DAAM

    try:
        daam = DAAM(model)
    except TypeError:
        height, width = job.first[0].shape[-2:]
        return (max(1, height // 16), max(1, width // 16))
    return tuple(job.probe(as_method(daam, model), device).shape[-2:])


def _rank() -> int:
    """This process's rank: torch.distributed's, or torchrun's RANK once the group that
    compare initialised is destroyed again."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _complete_rows(complete: np.ndarray, batch_size: int, examples: int) -> np.ndarray:
    rows = [np.arange(c * batch_size, min(examples, (c + 1) * batch_size))
            for c in np.flatnonzero(complete)]
    return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)


# ---- the report's files ------------------------------------------------------------------


def _write_text(path: Path, text: str) -> str:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    temporary.write_text(text)
    os.replace(temporary, path)
    return str(path)


def _number(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.3f}"


def _markdown(result: Dict[str, Any]) -> str:
    metrics, reference = result["metrics"], result["reference"]
    level = round(100 * result["confidence"])
    lines = [
        f"{result['examples']} examples"
        + (f" (of {result['of_examples']}: the store is partial)"
           if result["examples"] < result["of_examples"] else "")
        + f"; mean [{level}% bootstrap interval, {result['resamples']} resamples]; "
        f"Δ: the paired difference from {reference}; ~random: not told apart from the "
        f"random row (the interval of the difference from it holds 0).",
        "",
        "| method | " + " | ".join(
            f"{metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)"
            + (" ~random for every method" if metric in result["flagged_metrics"] else "")
            for metric in metrics) + " | s / image |",
        "|---|" + "---|" * (len(metrics) + 1),
    ]
    for row in result["rows"]:
        cells = []
        for metric in metrics:
            cell = row[metric]
            text = f"{_number(cell['mean'])} [{_number(cell['low'])}, {_number(cell['high'])}]"
            if "difference" in cell:
                diff, low, high = cell["difference"]
                text += f"<br>Δ {diff:+.3f} [{low:+.3f}, {high:+.3f}]"
            if cell.get("like_random"):
                text += " ~random"
            cells.append(text)
        lines.append(f"| {row['method']} | " + " | ".join(cells)
                     + f" | {row['seconds_per_image']:.4f} |")
    return "\n".join(lines) + "\n"


def _csv(result: Dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "metric", "mean", "low", "high", f"difference_from_"
                     f"{result['reference']}", "difference_low", "difference_high",
                     "like_random", "seconds_per_image"])
    for row in result["rows"]:
        for metric in result["metrics"]:
            cell = row[metric]
            difference = cell.get("difference", ["", "", ""])
            writer.writerow([row["method"], metric, cell["mean"], cell["low"], cell["high"],
                             *difference, cell.get("like_random", ""),
                             row["seconds_per_image"]])
    return buffer.getvalue()


def _plot_curves(group: Any, names: List[str], metrics: List[str], rows: np.ndarray,
                 path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .dataset import _CURVES

    figure, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.2),
                                squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for name in names:
            curve = np.asarray(group[f"methods/{name}/curves/{metric}"][:])[rows]
            auc = float(np.nanmean(np.asarray(group[f"methods/{name}/metrics/{metric}"][:])
                                   [rows]))
            axis.plot(_CURVES[metric], np.nanmean(curve, axis=0), label=f"{name} ({auc:.3f})")
        better = "lower" if metric in LOWER_IS_BETTER else "higher"
        axis.set_title(f"{metric} (AUC, {better} is better)")
        axis.set_xlabel("fraction of pixels")
        axis.set_ylabel("accuracy" if "perturbation" in metric else "probability of the target")
        axis.legend(fontsize=7)
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return str(path)


def _plot_flow(group: Any, name: str, rows: np.ndarray, path: Path) -> str:
    """DAAM's flow per block: the mean share of the final map's mass each accumulated map
    D_l holds (how the decision forms on average), and the block maps' mask metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = group[f"methods/{name}/maps"]
    count = len(rows)
    blocks = np.arange(1, maps.shape[1] + 1)
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    axis.plot(blocks, _mean_flow_mass(maps, rows), marker="o",
              label="mass of D_l / mass of D_L")
    if f"methods/{name}/block_metrics" in group:
        for metric in sorted(group[f"methods/{name}/block_metrics"].array_keys()):
            values = np.asarray(group[f"methods/{name}/block_metrics/{metric}"][:])[rows]
            axis.plot(blocks, np.nanmean(values, axis=0), marker="s", label=f"{metric} of D_l")
    axis.set_xlabel("block l")
    axis.set_title(f"{name}: the flow, block by block ({count} examples)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    _save_figure(figure, path)
    plt.close(figure)
    return str(path)


def _mean_flow_mass(maps: Any, rows: np.ndarray) -> np.ndarray:
    """Over the examples ``rows`` of a stored flow (N, L, h, w), read chunk by chunk: the
    mean share of the final map's mass (its positive sum) that each D_l holds."""
    chunk = maps.chunks[0]
    total = np.zeros(maps.shape[1])
    for start in range(0, maps.shape[0], chunk):
        take = rows[(rows >= start) & (rows < start + chunk)]
        if not len(take):
            continue
        flow = np.asarray(maps[start:start + chunk], np.float64)[take - start]
        mass = np.clip(flow, 0, None).sum(axis=(2, 3))
        final = np.where(mass[:, -1:] > 0, mass[:, -1:], 1.0)
        total += (mass / final).sum(axis=0)
    return total / max(1, len(rows))


def _save_figure(figure: Any, path: Path) -> None:
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    figure.savefig(temporary, dpi=110)
    os.replace(temporary, path)
