"""Explain and evaluate a whole dataset into one Zarr v3 store: on one process or many
(``torch.distributed``, e.g. under ``torchrun``), resumable after a crash.

Store layout (a Zarr v3 group; N examples, chunks of ``batch_size`` examples along axis 0):

=========================  ====================  ==============================================
array                      shape, dtype          content
=========================  ====================  ==============================================
``maps``                   (N, L, h, w), dtype    the flow D_1..D_L (``return_flow``) or the
                                                  final map alone (L = 1), at the grid the
                                                  attribution gives (patch grid or image)
``targets``                (N,) int64            the explained class
``predictions``            (N,) int64            the model's argmax class
``scores``                 (N,) float32          softmax probability of the explained class
``labels``                 (N,) int64            the dataset's label
``thumbnails``             (N, h, w, 3) uint8    the image the model was given, un-normalised,
                                                  longest side 96 (for the viewer)
``metrics/<name>``         (N,) float32          one array per metric, per example
``curves/<name>``          (N, S) float32        the curve of a curve metric (deletion, ...)
``seconds``                (C,) float64          seconds chunk c took to explain
``complete``               (C,) bool             chunk c done; written after the chunk's
                                                  other arrays
=========================  ====================  ==============================================

The group's attributes hold ``settings`` (everything the values depend on, compared on a
re-run) and ``summary`` (the aggregated metrics and accuracy, rewritten by each run).
A store of :func:`captum_daam.compare` holds the same per-example arrays once, and
``maps``, ``metrics``, ``curves`` and ``seconds`` once per method, in ``methods/<name>/``.

Why it is safe to kill: zarr's ``LocalStore`` writes every chunk to a temporary ``*.partial``
file and renames it into place, so a chunk file is either absent, the old one or the new one.
A chunk of examples is written by exactly one process (chunk c goes to rank c % world among
the chunks still to do), and its bit in ``complete`` is written only after all its arrays.
A re-run computes again every chunk whose bit is not set; on the same device and software
this gives the same values, so the store equals that of an uninterrupted run.

Chunks are written by one background thread per process, in order, while the next batch is
explained; an error while writing stops the writing and is raised in the caller's thread.
"""

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from ._labels import LabelMeaning, model_class_names
from ._warnings import warn_user
from ._methods import Method, ScoresOf, as_method
from ._names import MASK_METRICS, METRICS
from ._thumbnails import input_normalisation, thumbnail_shape, thumbnails

__all__ = ["explain_dataset", "METRICS", "argument_settings", "refuse_other_settings"]

FORMAT_VERSION = 1
_MASK_METRICS = MASK_METRICS
#: The curve metrics and the fractions of pixels along their curves.
_CURVES = {
    "deletion": [step / 32 for step in range(33)],
    "insertion": [step / 32 for step in range(33)],
    "positive_perturbation": [step / 10 for step in range(10)],
    "negative_perturbation": [step / 10 for step in range(10)],
}
_DTYPES = {torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}
_INSTALL_HINT = 'pip install "captum-daam[dataset]"'
_UNKNOWN = object()  # a setting that cannot be known before the dataset is read
_LOCK_FILE = ".captum_daam.lock"
_SHARED = ("targets", "predictions", "scores", "labels", "thumbnails")  # in every store
# zarr's LocalStore writes each file to "<name without suffix>.<uuid4 hex>.partial" first
_ZARR_TEMPORARY = re.compile(r"[^.]+\.[0-9a-f]{32}\.partial")


def explain_dataset(
    attribution: Any,
    dataset: Any,
    out: Union[str, os.PathLike],
    batch_size: int = 64,
    target: Union[None, str, int, Sequence[int], Tensor] = None,
    return_flow: bool = False,
    dtype: torch.dtype = torch.float16,
    metrics: Sequence[str] = (),
    internal_batch_size: Optional[int] = None,
    num_workers: int = 0,
    progress: bool = True,
    model: Optional[nn.Module] = None,
    attribute_kwargs: Optional[Dict[str, Any]] = None,
) -> Any:
    r"""
    Explain every example of a dataset with DAAM, or with any other Captum attribution, and
    write the maps, the predictions and per-example metrics into one Zarr v3 store,
    resumably, on one process or on every process of a ``torch.distributed`` job. To run
    several attributions on the same examples and compare them, see
    :func:`captum_daam.compare`.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is
    initialised here when it is not already (gloo for a model on the CPU, nccl for one on
    CUDA, which should then be on ``cuda:LOCAL_RANK``) and destroyed again at the end. Each
    rank explains a disjoint share of the chunks (no example is padded or written twice),
    rank 0 creates the store, shows the progress bar and stores the aggregated metrics.

    A run that stopped for any reason (even SIGKILL) is resumed by calling again with the
    same arguments: complete chunks are kept, the others computed again; the result equals
    an uninterrupted run's value for value (on the same device and software). A store
    written with a different model or settings is refused with a ValueError naming the
    differences; nothing is mixed.

    Args:
        attribution (Attribution or Callable): The attribution:

                    - ``DAAM(model)`` (with ``layer=`` for a part of the flow);
                    - any other Captum attribution object (``GradientRollout(model)``,
                      ``LayerGradCam(model, TokenGrid(model, layer))``,
                      ``IntegratedGradients(model)``, ``Saliency``, ``Occlusion``,
                      ``NoiseTunnel(...)`` around any of them, ...), called as
                      ``attribute(images, target=targets, **attribute_kwargs)``;
                    - a callable ``(images, targets) -> maps``, with ``model=``.

                    Maps are stored at the grid they come in: DAAM, the rollouts, LeGrad
                    and Grad-CAM on a ViT block on the patch grid, (gh, gw); pixel
                    attributions at the input size, (H, W), summed over colour channels.
                    The model (the attribution's ``forward_func`` unless ``model`` is
                    given) must classify (class scores), in eval mode, on the device the
                    images should go to. Random methods (``NoiseTunnel``) draw from a
                    generator seeded per chunk, so a resumed run gives the same values.
        dataset (Dataset, str, Path or datasets.Dataset): What to explain:

                    - a map-style torch ``Dataset`` yielding ``(image, label)`` or
                      ``(image, label, mask)``: image (C, H, W) float as the model takes it,
                      label an int, mask (H, W) or (1, H, W) bool, True on the object;
                    - a folder of class folders (torchvision ``ImageFolder``), read with the
                      model's timm data config (``resolve_data_config``,
                      ``create_transform``);
                    - a Hugging Face ``datasets.Dataset`` (one split) with an image and a
                      label column, read with the same transform (see
                      :class:`captum_daam.data.HuggingFaceImages` to name the columns).
        out (str or Path): The store, a folder (conventionally ``*.zarr``). Created when
                    absent; resumed when it holds a store of this function with the same
                    settings; any other existing folder with content is refused.
        batch_size (int, optional): Examples per DAAM pass, and per chunk of the store (so
                    each chunk is written once, by one process: 50,000 examples in batches
                    of 64 make 782 files per array). Part of the settings: the values of a
                    batch can differ in the last bits with its composition.
                    Default: 64
        target (None, str, int, list[int] or Tensor, optional): The class explained:

                    - None: each example's predicted class;
                    - ``"label"``: the dataset's label of each example;
                    - an int: this class for every example;
                    - a list or 1-D tensor of N classes, one per example of the dataset.

                    Default: None
        return_flow (bool, optional): DAAM only: store the whole flow D_1..D_L,
                    (N, L, gh, gw), not only the final map, (N, 1, gh, gw). Default: False
        dtype (torch.dtype, optional): The dtype the maps are stored in:
                    ``torch.float16``, ``torch.float32`` or ``torch.float64`` (the maps are
                    computed in the model's dtype and cast; metrics use them uncast).
                    Default: torch.float16
        metrics (sequence of str, optional): Per-example metrics of the final map, from
                    :mod:`captum_daam.metrics` with their defaults, against the explained
                    class (:data:`METRICS` lists them):

                    - with masks from the dataset: ``"pointing_game"`` (1.0 for a hit,
                      else 0.0), ``"energy_pointing_game"``, and the segmentation scores
                      of the binarised map ``"pixel_accuracy"``, ``"miou"`` and
                      ``"average_precision"`` (Chefer et al. 2021);
                    - ``"deletion"`` and ``"insertion"`` (32 steps, 33 more forward passes
                      per example), ``"positive_perturbation"`` and
                      ``"negative_perturbation"`` (Chefer et al. 2021: 10 steps of 10%):
                      the AUC, and the curve in ``curves/<name>`` (N, steps);
                    - ``"average_drop"`` and ``"increase_in_confidence"`` (Grad-CAM++).

                    Default: () (none)
        internal_batch_size (int, optional): DAAM only: passed to
                    :meth:`DAAM.attribute`, to bound memory (give other attributions
                    theirs in ``attribute_kwargs``). Default: None (the whole batch)
        num_workers (int, optional): ``DataLoader`` worker processes. Default: 0
        progress (bool, optional): A tqdm bar (rank 0 only, over rank 0's examples) and
                    the aggregated metrics printed at the end. Default: True
        model (nn.Module, optional): The model whose predictions and metrics go with the
                    maps. Default: None, the attribution's ``forward_func`` (needed for a
                    callable).
        attribute_kwargs (dict, optional): Further arguments of every ``attribute`` call
                    (e.g. ``{"n_steps": 32}`` for IntegratedGradients); part of the
                    settings. Default: None

    Returns:
        *zarr.Group*: the store, opened read-only; ``group["maps"][i]`` reads example i
        lazily as a numpy array, ``group["seconds"][c]`` the seconds chunk c took to
        explain (the maps and the predictions, not the metrics),
        ``group.attrs["summary"]`` holds ``examples``, the
        ``accuracy`` of the predictions against the labels and the mean of each metric
        over all N examples (read back from the store, so a resumed run counts every
        example, not only those it computed).

    Raises:
        ImportError: when zarr (>= 3) is not installed.
        TypeError, ValueError: for wrong arguments or dataset items, before any work; and
                    for an existing store of other settings.

    Example::

        >>> import torch
        >>> from captum_daam import DAAM, explain_dataset
        >>> from captum_daam.data import ShapesDataset
        >>> from captum_daam.zoo import tiny_vit
        >>> store = explain_dataset(DAAM(tiny_vit()), ShapesDataset(100), "maps.zarr",
        ...                         batch_size=32, return_flow=True,
        ...                         metrics=("pointing_game",))
        >>> store["maps"].shape, store["maps"].dtype
        ((100, 6, 8, 8), dtype('<f2'))
        >>> store.attrs["summary"]["metrics"]["pointing_game"]  # doctest: +SKIP
        0.84
    """
    zarr = _import_zarr()
    method = _as_method(attribution, model, return_flow, internal_batch_size, attribute_kwargs)
    _check_positive_int("batch_size", batch_size)
    if internal_batch_size is not None:
        _check_positive_int("internal_batch_size", internal_batch_size)
    _check_num_workers(num_workers)
    _check_dtype(dtype)
    metrics = _check_metrics(metrics)
    device = _model_device(method.model)
    out = Path(out)
    # Settings known from the arguments alone: a store of other settings is refused before the
    # dataset is read.
    known = argument_settings(batch_size, internal_batch_size, _target_name(target),
                              return_flow, dtype, metrics)
    refuse_other_settings(out, {key: value for key, value in known.items()
                                if value is not _UNKNOWN})
    job = _Job.prepare(dataset, method.model, _inner_model(method.model, method.attribution),
                       target, metrics, batch_size)
    settings = {
        **argument_settings(batch_size, internal_batch_size, job.target_spec, return_flow,
                            dtype, metrics),
        "model": _model_identity(method.model),
        "method": method.settings(),
        **job.settings(),
    }
    if method.is_daam:
        settings["flow_blocks"] = settings["method"]["blocks"]
    refuse_other_settings(out, settings)

    # One example through the method: the maps' shape (and any error about the model).
    if not method.is_daam:  # DAAM checks the images and the model itself, first
        job.check_targets(method.model, device)
    probe = job.probe(method, device)
    if method.is_daam:
        job.check_targets(method.model, device)
    if method.is_daam:
        settings.update(blocks=len(method.attribution.layer))  # one flow map per module
    settings["grid"] = list(probe.shape[-2:])
    arrays = {"maps": _maps_array(probe.shape[1:], settings["dtype"]),
              "seconds": _ArraySpec((), "float64", float("nan"), per_chunk=True)}
    arrays.update(_metric_arrays("", metrics))

    def compute(images: Tensor, targets: Optional[Tensor], masks: Optional[Tensor],
                chunk: int) -> Dict[str, Tensor]:
        started = _clock(device)
        if method.is_daam:
            maps, logits = _attribute_with_scores(method, images, targets)
            values = _per_example(logits, targets)
        else:
            values = _per_example(_logits(method.model, images), targets)
            maps = _explain_seeded(method, images, values["targets"], chunk)
        values["seconds"] = torch.tensor(_clock(device) - started, dtype=torch.float64)
        values["maps"] = maps.to(dtype)
        values.update(_metric_values("", metrics, method.model, images, maps[:, -1:],
                                     values["targets"], masks))
        return values

    def summarise(means: Dict[str, float], summary: Dict[str, Any]) -> Dict[str, Any]:
        summary["metrics"] = {name: means[f"metrics/{name}"] for name in metrics}
        return summary

    return _run_store(zarr, out, settings, arrays, job, compute, summarise, device,
                      num_workers, progress, "explain_dataset")


class _ArraySpec(NamedTuple):
    """One array of a store beside the shared per-example ones: per example, shaped
    (N, *shape), or per chunk, (C, *shape)."""

    shape: Tuple[int, ...]
    dtype: str
    fill: Any
    dims: Tuple[str, ...] = ()
    per_chunk: bool = False


def _maps_array(shape: Sequence[int], dtype: str) -> _ArraySpec:
    return _ArraySpec(tuple(shape), dtype, 0, ("block", "row", "column"))


def _metric_arrays(prefix: str, metrics: Sequence[str]) -> Dict[str, _ArraySpec]:
    arrays = {f"{prefix}metrics/{name}": _ArraySpec((), "float32", float("nan"))
              for name in metrics}
    for name in metrics:
        if name in _CURVES:
            arrays[f"{prefix}curves/{name}"] = _ArraySpec(
                (len(_CURVES[name]),), "float32", float("nan"), ("step",))
    return arrays


class _Job:
    """A dataset's examples and their targets, checked before any work."""

    def __init__(self, dataset: Any, first: Tuple[Tensor, int, Optional[Tensor]],
                 target_spec: Any, target_table: Optional[Tensor],
                 labels: Optional[LabelMeaning], batch_size: int) -> None:
        self.dataset, self.first, self.labels = dataset, first, labels
        self.target_spec, self.target_table = target_spec, target_table
        self.batch_size = batch_size
        self.num_examples = len(dataset)
        self.num_chunks = -(-self.num_examples // batch_size)
        self.thumbnail_shape = thumbnail_shape(first[0].shape)
        self.normalisation = input_normalisation(dataset)

    @classmethod
    def prepare(cls, dataset: Any, model: nn.Module, inner: nn.Module, target: Any,
                metrics: Sequence[str], batch_size: int) -> "_Job":
        dataset = _as_dataset(dataset, model, inner)
        num_examples = len(dataset)
        if num_examples == 0:
            raise ValueError("Expected a dataset with at least one example, got an empty one.")
        first = _check_item(dataset[0], 0)
        needs_masks = [name for name in metrics if name in _MASK_METRICS]
        if first[2] is None and needs_masks:
            raise ValueError(
                f"Expected the dataset to yield (image, label, mask) for the metrics "
                f"{needs_masks}, got items without masks."
            )
        target_spec, target_table = _check_target_spec(target, num_examples)
        labels = getattr(dataset, "labels", None)
        labels = labels if isinstance(labels, LabelMeaning) else None
        if target_spec == "label" and labels is not None and not labels.comparable:
            raise ValueError(
                f'Expected labels that are the model\'s classes for target="label", got '
                f"{labels.note}. Name the classes (the class folders) after the model's "
                f"classes, or give target=None (the predicted class) or a class index."
            )
        return cls(dataset, first, target_spec, target_table, labels, batch_size)

    def settings(self) -> Dict[str, Any]:
        return {"dataset": _dataset_identity(self.dataset), "examples": self.num_examples,
                "image_shape": list(self.first[0].shape),
                "thumbnails": list(self.thumbnail_shape)}

    def first_image(self, device: torch.device) -> Tensor:
        return self.first[0].unsqueeze(0).to(device)

    def check_targets(self, model: nn.Module, device: torch.device) -> None:
        """Refuse, before any work, fixed targets (an int, one per example, the first
        example's label) that the model's scores do not have."""
        if self.target_spec == "predicted":
            return
        classes = _logits(model, self.first[0].unsqueeze(0).to(device)).shape[1]
        if self.target_table is not None:
            highest = int(self.target_table.max()) if len(self.target_table) else -1
        else:
            highest = self.first[1] if self.target_spec == "label" else -1
        if highest >= classes:
            raise ValueError(f"Expected target classes below the model's {classes} outputs, "
                             f"got {highest}.")

    def probe(self, method: Method, device: torch.device) -> Tensor:
        """The method's maps of the first example (their shape; any error about the model
        before the store is made), with torch's random generators left as they were."""
        image = self.first[0].unsqueeze(0).to(device)
        if self.target_spec == "label":
            target = torch.tensor([self.first[1]], device=device)
        elif self.target_table is not None:
            target = self.target_table[:1].to(device)
        else:
            target = None if method.is_daam else _logits(method.model, image).argmax(1)
        return _explain_seeded(method, image, target, 0)

    def targets(self, labels: Tensor, rows: slice, device: torch.device) -> Optional[Tensor]:
        """The batch's targets, or None for the predicted classes."""
        if self.target_spec == "label":
            return labels.to(device)
        if self.target_table is not None:
            return self.target_table[rows].to(device)
        return None


def _run_store(
    zarr: Any, out: Path, settings: Dict[str, Any], arrays: Dict[str, _ArraySpec], job: _Job,
    compute: Callable[..., Dict[str, Tensor]],
    summarise: Callable[[Dict[str, float], Dict[str, Any]], Dict[str, Any]],
    device: torch.device, num_workers: int, progress: bool, name: str,
) -> Any:
    """Open or create the store, explain the chunks still to do (this rank's share), and
    store the summary: the accuracy and the mean of every array under a ``metrics`` group
    (over all examples, also those of earlier runs), given to ``summarise``."""
    created_group = _init_distributed(device)
    try:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        message: List[Any] = [None, None]
        with contextlib.ExitStack() as held:
            if rank == 0:
                try:
                    todo = _open_or_create(zarr, out, settings, job.num_chunks, arrays,
                                           job.labels, held)
                    message = [None, todo]
                except (ValueError, TypeError, OSError) as error:
                    message = [error, None]
            if world > 1:
                dist.broadcast_object_list(message, src=0)
            if message[0] is not None:
                raise message[0]
            if rank == 0 and job.labels is not None and not job.labels.comparable:
                warn_user(f"{name}: the labels are {job.labels.note}; the mapping is in "
                          f"the store's attributes (labels).")
            todo = message[1]
            group = zarr.open_group(str(out), mode="r+")
            mine = todo[rank::world]
            metric_names = [key for key in arrays if _is_metric(key)]
            computed = _explain_chunks(
                compute, job, group, mine, arrays, metric_names, device, num_workers,
                progress and rank == 0,
                name if world == 1 else f"{name}, rank 0's share of {world} processes")
            if world > 1:
                dist.barrier()
            # Chunks complete before this run are read back, each by one rank (c % world).
            pending = set(todo)
            stored = [c for c in range(rank, job.num_chunks, world) if c not in pending]
            means, summary = _aggregate(group, metric_names, computed, stored, job.batch_size,
                                        world, device,
                                        job.labels is None or job.labels.comparable)
            if rank == 0:
                summary = summarise(means, summary)
                group.attrs["summary"] = summary
                if progress:
                    print(_describe_summary(summary, out, name))
            if world > 1:
                dist.barrier()
    finally:
        if created_group and dist.is_initialized():
            dist.destroy_process_group()
    return zarr.open_group(str(out), mode="r")


def _is_metric(key: str) -> bool:
    return key.split("/")[-2:-1] == ["metrics"]


# ---- checks made before any work ---------------------------------------------------------


def _import_zarr() -> Any:
    try:
        import zarr
    except ImportError as error:
        raise ImportError(
            f"explain_dataset writes a Zarr v3 store and needs zarr>=3: {_INSTALL_HINT}"
        ) from error
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ImportError(
            f"explain_dataset needs zarr>=3 (Zarr v3 stores), found zarr {zarr.__version__}: "
            f"{_INSTALL_HINT}"
        )
    return zarr


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Expected {name} to be a positive int, got {value!r}.")


def _check_metrics(metrics: Sequence[str]) -> Tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ValueError(f"Expected metrics among {', '.join(METRICS)}, got {unknown}.")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"Expected each metric once, got {list(metrics)}.")
    return metrics


def _check_target_spec(
    target: Any, num_examples: int
) -> Tuple[Union[str, int, Dict[str, Any]], Optional[Tensor]]:
    """The target as stored in the settings, and the (N,) table of classes when fixed."""
    if target is None:
        return "predicted", None
    if isinstance(target, str):
        if target != "label":
            raise ValueError(f'Expected target None, "label", an int or N classes, got '
                             f'{target!r}.')
        return "label", None
    if isinstance(target, int) and not isinstance(target, bool):
        if target < 0:
            raise ValueError(f"Expected a non-negative target class, got {target}.")
        return target, torch.full((num_examples,), target, dtype=torch.long)
    if isinstance(target, Tensor) or (
        isinstance(target, (list, tuple)) and all(
            isinstance(item, int) and not isinstance(item, bool) for item in target)
    ):
        table = torch.as_tensor(target)
        if table.is_floating_point() or table.dtype == torch.bool or table.dim() != 1:
            raise TypeError(
                f"Expected per-example targets as a 1-D integer tensor or list, got "
                f"{table.dtype} of shape {tuple(table.shape)}."
            )
        if table.numel() != num_examples:
            raise ValueError(
                f"Expected one target per example of the dataset ({num_examples}), got "
                f"{table.numel()}."
            )
        if table.numel() and int(table.min()) < 0:
            raise ValueError(f"Expected non-negative target classes, got {int(table.min())}.")
        table = table.to(torch.long).cpu()
        digest = hashlib.sha256(table.numpy().tobytes()).hexdigest()
        return {"per_example_sha256": digest}, table
    raise TypeError(
        f'Expected target None, "label", an int, or a list / 1-D tensor of one class per '
        f"example, got {type(target).__name__}."
    )


def _target_name(target: Any) -> Any:
    """The target as the settings name it, where that needs no dataset (else _UNKNOWN)."""
    if target is None:
        return "predicted"
    if isinstance(target, (str, int)) and not isinstance(target, bool):
        return target
    return _UNKNOWN


def argument_settings(
    batch_size: int, internal_batch_size: Optional[int], target: Any, return_flow: bool,
    dtype: Union[torch.dtype, str], metrics: Sequence[str],
) -> Dict[str, Any]:
    """The settings of a store that follow from the arguments alone (no model, no data), as
    stored: what ``captum-daam explain-dataset`` compares with an existing store before it
    loads anything."""
    return {
        "format": FORMAT_VERSION,
        "package_version": _package_version(),
        "batch_size": batch_size,
        "internal_batch_size": internal_batch_size,
        "target": target,
        "return_flow": bool(return_flow),
        "dtype": dtype if isinstance(dtype, str) else _DTYPES.get(dtype, str(dtype)),
        "metrics": list(metrics),
    }


def _check_item(item: Any, index: int, like: Optional[Tensor] = None
                ) -> Tuple[Tensor, int, Optional[Tensor]]:
    """A dataset item as (image, label, mask or None), checked; with ``like``, the image must
    have its shape and dtype (the first example's: the examples are explained in batches)."""
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise TypeError(
            f"Expected dataset items (image, label) or (image, label, mask), got "
            f"{type(item).__name__} at index {index}."
        )
    image, label = item[0], item[1]
    mask = item[2] if len(item) == 3 else None
    if not isinstance(image, Tensor) or image.dim() != 3 or not image.is_floating_point():
        raise TypeError(
            f"Expected each image as a (C, H, W) float tensor, got "
            f"{_describe(image)} at index {index}; give the dataset a transform (e.g. timm's "
            f"create_transform(**resolve_data_config({{}}, model=model)))."
        )
    if like is not None and (image.shape != like.shape or image.dtype != like.dtype):
        raise ValueError(
            f"Expected every image of the dataset shaped and typed like the first, "
            f"{_describe(like)}, got {_describe(image)} at index {index}; give the dataset a "
            f"transform that makes every image the model's input size, channels and dtype."
        )
    label = _label(label, index)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"Expected a bool mask, got {_describe(mask)} at index {index}.")
        if mask.dim() == 3 and mask.shape[0] == 1:
            mask = mask[0]
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"Expected a mask (H, W) or (1, H, W) of the image's size "
                f"{tuple(image.shape[-2:])}, got {tuple(mask.shape)} at index {index}."
            )
    return image, label, mask


def _label(label: Any, index: int) -> int:
    """An integer label: a Python or numpy integer, or a one-element integer tensor or array
    (not a bool, not a float)."""
    if isinstance(label, Tensor) and label.numel() == 1 and not (
            label.is_floating_point() or label.is_complex() or label.dtype == torch.bool):
        return int(label)
    if isinstance(label, np.ndarray) and label.size == 1 and label.dtype.kind in "iu":
        return int(label)
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"Expected an int label, got {_describe(label)} at index {index}.")
    return int(label)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return type(value).__name__


def _as_dataset(dataset: Any, model: nn.Module, inner: nn.Module) -> Any:
    """A map-style dataset of tuples: a folder of class folders becomes an
    :class:`~captum_daam.data.ImageFolderImages`, a Hugging Face Dataset (or a folder written
    by its ``save_to_disk``) a :class:`~captum_daam.data.HuggingFaceImages`, both with the
    timm transform of ``inner`` (the ViT inside the model) and the model's class names."""
    from ._images import timm_preprocessing
    from .data import HuggingFaceImages, ImageFolderImages, load_hugging_face_folder

    if isinstance(dataset, (str, os.PathLike)):
        root = Path(dataset)
        if not root.is_dir():
            raise ValueError(f"Expected an image folder of class folders, got {str(root)!r}, "
                             f"which is not a folder.")
        loaded = load_hugging_face_folder(root)
        if loaded is None:
            return ImageFolderImages(root, timm_preprocessing(inner),
                                     _model_classes(model, inner))
        dataset = loaded
    if type(dataset).__module__.split(".")[0] == "datasets":
        return HuggingFaceImages(dataset, timm_preprocessing(inner),
                                 model_classes=_model_classes(model, inner))
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise TypeError(
            f"Expected a map-style dataset (with __getitem__ and __len__), an image folder or "
            f"a datasets.Dataset, got {type(dataset).__name__}."
        )
    return dataset


def _model_classes(model: nn.Module, inner: nn.Module) -> Optional[List[List[str]]]:
    """The class names of the explained model (the outer module's, where it says)."""
    names = model_class_names(model)
    return names if names is not None else model_class_names(inner)


def _inner_model(model: nn.Module, attribution: Any = None) -> nn.Module:
    """The ViT inside the model, for its timm data config: the attribution's adapter's, or
    the one the registered adapters find in ``model``; the model itself otherwise."""
    adapter = getattr(attribution, "adapter", None)
    if adapter is not None:
        return adapter.model
    from .adapters import adapter_for

    try:
        return adapter_for(model).model
    except (TypeError, ValueError):
        return model


def _model_device(model: nn.Module) -> torch.device:
    """The model's device; a model on the meta device (no values) is refused, as
    :meth:`DAAM.attribute` refuses it."""
    parameter = next(iter(model.parameters()), None)
    if parameter is not None and parameter.is_meta:
        raise ValueError(
            "Expected a model with values, got one on the meta device (built without "
            "weights); load or materialise its weights first (e.g. model.to_empty(device=...) "
            "and load_state_dict).")
    return parameter.device if parameter is not None else torch.device("cpu")


def _as_method(attribution: Any, model: Optional[nn.Module], return_flow: bool,
               internal_batch_size: Optional[int],
               attribute_kwargs: Optional[Dict[str, Any]]) -> Method:
    method = as_method(attribution, model, return_flow, internal_batch_size, attribute_kwargs)
    if method.is_daam:
        method.attribution._check_model_has_values()
    return method


def _check_num_workers(num_workers: object) -> None:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"Expected num_workers to be a non-negative int, got {num_workers!r}.")


def _check_dtype(dtype: object) -> None:
    if dtype not in _DTYPES:
        raise ValueError(
            f"Expected dtype to be one of {', '.join(map(str, _DTYPES))} (zarr has no "
            f"bfloat16), got {dtype!r}."
        )


# ---- the settings the values depend on ---------------------------------------------------


def _package_version() -> str:
    from . import __version__

    return __version__


def _model_identity(module: nn.Module) -> Dict[str, str]:
    """The explained module's class and a SHA-256 of its state dict (names, dtypes, shapes
    and values, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    kind = type(module)
    return {"class": f"{kind.__module__}.{kind.__qualname__}", "state_dict_sha256":
            digest.hexdigest()}


def _dataset_identity(dataset: Any) -> Dict[str, Any]:
    """What the examples depend on, as values that are the same in every process: the
    dataset's own ``identity()`` where it has one (image folders, Hugging Face datasets);
    else its type, length and, where the class describes itself (``__repr__``), that
    description without memory addresses; for a dataset with ``samples`` (torchvision's
    folders) also a SHA-256 of the file paths below its root and their labels."""
    from .data import stable_repr

    if callable(getattr(dataset, "identity", None)):
        return dataset.identity()
    kind = type(dataset)
    identity: Dict[str, Any] = {"class": f"{kind.__module__}.{kind.__qualname__}",
                                "length": len(dataset)}
    if kind.__repr__ is not object.__repr__:
        identity["description"] = stable_repr(dataset)
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list):
        root = getattr(dataset, "root", None)
        identity["samples_sha256"] = hashlib.sha256(json.dumps(
            [[_below(path, root), int(label)] for path, label in samples]).encode()
        ).hexdigest()
    return identity


def _below(path: Any, root: Any) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except (TypeError, ValueError):
        return str(path)


# ---- the store ---------------------------------------------------------------------------


def refuse_other_settings(out: Union[str, os.PathLike], settings: Dict[str, Any]) -> None:
    """Raise a ValueError when ``out`` holds a store whose settings differ from ``settings``
    in any key ``settings`` has (or anything but an explain_dataset store); nothing when it is
    absent or an empty folder. Reads only the store's attributes."""
    stored = _stored_settings(Path(out))
    if stored is not None:
        _refuse_differences(Path(out), {key: stored.get(key) for key in settings}, settings)


def _stored_settings(path: Path) -> Optional[Dict[str, Any]]:
    """The settings of the store at ``path``; None when the path is absent or an empty
    folder; a ValueError for anything else that is not an explain_dataset store."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"Expected out to be a folder for a Zarr store, got a file: {path}.")
    if not path.is_dir() or not any(path.iterdir()):
        return None
    zarr = _import_zarr()
    try:
        attributes = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # any reason the folder is not a zarr group
        attributes = {}
    if attributes.get("captum_daam_format") is None:
        raise ValueError(
            f"Expected out to be absent, empty or a store of explain_dataset, got {path}, "
            f"which holds other files or folders. Choose another out."
        )
    if not isinstance(attributes.get("settings"), dict):
        # stores are created whole since format 1's second release; an older one was cut short
        raise ValueError(
            f"The store {path} was cut short while it was being created (it has no "
            f"settings) and holds no examples; delete it and run again."
        )
    return attributes["settings"]


def _refuse_differences(path: Path, stored: Dict[str, Any], given: Dict[str, Any]) -> None:
    if stored.get("thumbnails") is None:  # written before stores kept thumbnails: resumed without
        given = {key: value for key, value in given.items() if key != "thumbnails"}
    differences = _differences(stored, given)
    if differences:
        raise ValueError(
            f"The store {path} was written with other settings; refusing to mix them. "
            f"Differences (stored vs given): {'; '.join(differences)}. Use another out, or "
            f"delete the store to start again."
        )


def _open_or_create(
    zarr: Any, path: Path, settings: Dict[str, Any], num_chunks: int,
    arrays: Dict[str, "_ArraySpec"], labels: Optional[LabelMeaning],
    held: contextlib.ExitStack,
) -> List[int]:
    """Rank 0: open the store at ``path`` (checking its settings) or create it, and hold a
    shared lock on it for the run (``held``). Returns the indices of the chunks still to do.

    A store is created whole in a folder beside ``path`` and renamed into place, so ``path``
    is either absent (or the empty folder it was) or a complete store: when two runs create
    it at once, one rename wins and the other run opens the winner's store as a resumption
    (same settings) or is refused (other settings)."""
    stored = _stored_settings(path)
    if stored is None:
        if _create_whole(zarr, path, settings, num_chunks, arrays, labels):
            held.enter_context(_shared_lock(path, clean=False))
            return list(range(num_chunks))
        stored = _stored_settings(path)
        if stored is None:
            raise ValueError(f"Expected to create the store {path}, but the folder changed "
                             f"while it was being created; run again.")
    _refuse_differences(path, stored, settings)
    held.enter_context(_shared_lock(path, clean=True))
    return np.flatnonzero(~zarr.open_group(str(path), mode="r")["complete"][:]).tolist()


def _differences(stored: Dict[str, Any], given: Dict[str, Any], prefix: str = "") -> List[str]:
    differences = []
    for key in sorted(set(stored) | set(given)):
        old, new = stored.get(key), given.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += _differences(old, new, f"{prefix}{key}.")
        elif json.dumps(old) != json.dumps(new):
            differences.append(f"{prefix}{key} {_shown(old)} vs {_shown(new)}")
    return differences


def _shown(value: Any, most: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def _create_whole(
    zarr: Any, path: Path, settings: Dict[str, Any], num_chunks: int,
    arrays: Dict[str, "_ArraySpec"], labels: Optional[LabelMeaning],
) -> bool:
    """Create the store in a new folder beside ``path`` and rename it to ``path``. False when
    another run's store took the place first (this run's folder is removed again)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_creations(path)
    building = path.parent / f"{_creation_prefix(path)}{socket.gethostname()}.{os.getpid()}." \
                             f"{uuid.uuid4().hex}"
    try:
        _create(zarr, building, settings, num_chunks, arrays, labels)
        try:
            os.rename(building, path)  # atomic; replaces an empty folder, never a full one
        except OSError as error:
            if path.is_dir() and any(path.iterdir()):
                return False
            raise error
        return True
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _creation_prefix(path: Path) -> str:
    return f".{path.name}.creating."


def _remove_abandoned_creations(path: Path) -> None:
    """Remove the folders that a run on this host, now gone, was creating the store in when it
    was killed: named by :func:`_create_whole` with that run's host and process id."""
    prefix, host = _creation_prefix(path), socket.gethostname()
    for folder in path.parent.glob(f"{glob.escape(prefix)}*"):
        owner = folder.name[len(prefix):].rsplit(".", 2)
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit() or \
                not re.fullmatch(r"[0-9a-f]{32}", owner[2]) or _process_alive(int(owner[1])):
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _shared_lock(path: Path, clean: bool):
    """A shared lock on the store for the duration of a run. With ``clean``, first the
    temporaries a killed run left (zarr's ``*.<uuid>.partial`` files in the store's arrays)
    are removed, but only when no other run holds the store: another run's temporaries may
    be files it is writing."""
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): temporaries stay, harmlessly
        yield
        return
    handle = open(path / _LOCK_FILE, "a+b")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except OSError:  # another run holds it, or the file system has no locks
            alone = False
        if alone and clean:
            _remove_temporaries(path)
        try:
            fcntl.flock(handle, fcntl.LOCK_SH)
        except OSError:
            pass
        yield
    finally:
        handle.close()


def _remove_temporaries(path: Path) -> None:
    """zarr's temporaries in the store's folders (the group's, and each array's metadata
    and chunk folders), named as zarr's LocalStore names them."""
    folders = [path, *(item for item in path.rglob("*") if item.is_dir())]
    for folder in folders:
        for item in folder.iterdir():
            if item.is_file() and _ZARR_TEMPORARY.fullmatch(item.name):
                item.unlink(missing_ok=True)


def _create(
    zarr: Any, path: Path, settings: Dict[str, Any], num_chunks: int,
    arrays: Dict[str, "_ArraySpec"], labels: Optional[LabelMeaning],
) -> None:
    """The group, its arrays and its attributes (the settings, and what the labels mean)."""
    attributes: Dict[str, Any] = {"captum_daam_format": FORMAT_VERSION}
    if labels is not None:
        attributes["labels"] = labels.describe()
    group = zarr.open_group(str(path), mode="w", attributes=attributes)
    n, chunk = settings["examples"], settings["batch_size"]
    shared = {"targets": _ArraySpec((), "int64", -1), "predictions": _ArraySpec((), "int64", -1),
              "scores": _ArraySpec((), "float32", float("nan")),
              "labels": _ArraySpec((), "int64", -1),
              "thumbnails": _ArraySpec((*settings["thumbnails"], 3), "uint8", 0,
                                       ("y", "x", "rgb"))}
    for name, spec in {**shared, **arrays}.items():
        dims = ("chunk",) if spec.per_chunk else ("example",)
        group.create_array(name, shape=((num_chunks,) if spec.per_chunk else (n,)) + spec.shape,
                           chunks=(1 if spec.per_chunk else chunk,) + spec.shape,
                           dtype=spec.dtype, fill_value=spec.fill,
                           dimension_names=dims + (spec.dims or ()))
    group.create_array("complete", shape=(num_chunks,), chunks=(1,), dtype="bool",
                       fill_value=False, dimension_names=("chunk",))
    group.attrs["settings"] = settings


# ---- the work ----------------------------------------------------------------------------


def _init_distributed(device: torch.device) -> bool:
    """Initialise torch.distributed from torchrun's environment when it is not yet; True
    when this call initialised it (and the caller destroys it)."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


class _Indexed(Dataset):
    """The dataset's items with their indices, so that a message names the real index."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[int, Any]:
        return index, self.dataset[index]


class _Collate:
    """A batch of :class:`_Indexed` items as (images, labels, masks), each item checked
    against the first example's image (same shape and dtype)."""

    def __init__(self, like: Tensor) -> None:
        self.like = like

    def __call__(self, items: List[Tuple[int, Any]]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        checked = [_check_item(item, index, self.like) for index, item in items]
        images = torch.stack([image for image, _, _ in checked])
        labels = torch.tensor([label for _, label, _ in checked], dtype=torch.long)
        masks = None if checked[0][2] is None else torch.stack([mask for _, _, mask in checked])
        return images, labels, masks


def _explain_chunks(
    compute: Callable[..., Dict[str, Tensor]], job: "_Job", group: Any, chunks: List[int],
    arrays: Dict[str, "_ArraySpec"], metric_names: Sequence[str], device: torch.device,
    num_workers: int, progress: bool, description: str,
) -> Tensor:
    """Explain and write ``chunks``; returns their summary totals (:func:`_totals`)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    n, size = job.num_examples, job.batch_size
    batches = [list(range(c * size, min(n, (c + 1) * size))) for c in chunks]
    loader = DataLoader(_Indexed(job.dataset), batch_sampler=batches, num_workers=num_workers,
                        collate_fn=_Collate(job.first[0]), pin_memory=device.type == "cuda",
                        worker_init_fn=_quiet_on_sigterm if num_workers else None)
    # a store written before thumbnails were kept is resumed without them
    shared = [name for name in _SHARED if name != "thumbnails" or name in group]
    handles = {name: group[name] for name in (*shared, *arrays, "complete")}
    per_chunk = {name for name, spec in arrays.items() if spec.per_chunk}
    bar = tqdm(total=sum(map(len, batches)), desc=description, unit="image",
               disable=not progress)
    writer = _ChunkWriter(handles, per_chunk)
    totals = torch.zeros(2 * len(metric_names) + 3, dtype=torch.float64)
    try:
        for chunk, (images, labels, masks) in zip(chunks, loader):
            start, stop = chunk * size, chunk * size + len(images)
            images = images.to(device, non_blocking=True)
            targets = job.targets(labels, slice(start, stop), device)
            values = compute(images, targets, masks, chunk)
            values["labels"] = labels
            if "thumbnails" in handles:
                values["thumbnails"] = thumbnails(images, job.thumbnail_shape,
                                                  job.normalisation)
            stored = {name: value.detach().cpu().numpy() for name, value in values.items()}
            writer.put(chunk, slice(start, stop), stored)
            totals += _totals(stored, metric_names)
            bar.update(len(images))
        writer.close()
    finally:
        writer.close(raise_error=False)
        bar.close()
    return totals


def _quiet_on_sigterm(worker_id: int) -> None:
    """In a DataLoader worker: SIGTERM ends the worker at once and quietly (exit status 0),
    so that a SIGTERM to the whole process group (``kill -TERM -PGID``, torchrun, a batch
    scheduler) gives the main process's one-line message, not a worker traceback. A worker
    holds nothing worth finishing: it loads images; the main process writes the store."""
    signal.signal(signal.SIGTERM, _exit_quietly)


def _exit_quietly(signum: int, frame: Any) -> None:
    # Not sys.exit: the worker's exit would wait for its result queue's feeder thread, which
    # waits for a main process that no longer reads.
    os._exit(0)


class _ChunkWriter:
    """Writes chunks to the store in a background thread, so that writing overlaps the next
    batch's DAAM pass (torch releases the GIL). Chunks are written one after the other, each
    one's completion bit after its arrays; the first error stops the writing (nothing is
    written after it, as after a kill) and is raised in the caller's thread."""

    def __init__(self, arrays: Dict[str, Any], per_chunk: Any = ()) -> None:
        import queue
        import threading

        self.arrays, self.per_chunk, self.error = arrays, set(per_chunk), None
        self.queue: Any = queue.Queue(maxsize=2)
        self.thread = threading.Thread(target=self._run, name="explain_dataset-writer",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after an error, write nothing more
            chunk, rows, values = item
            try:
                for name, value in values.items():
                    self.arrays[name][chunk if name in self.per_chunk else rows] = value
                self.arrays["complete"][chunk] = True  # last: the chunk's values are in place
            except BaseException as error:  # raised again in the caller's thread
                self.error = error

    def put(self, chunk: int, rows: slice, values: Dict[str, np.ndarray]) -> None:
        self._raise_error()
        self.queue.put((chunk, rows, values))

    def close(self, raise_error: bool = True) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if raise_error:
            self._raise_error()

    def _raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def _attribute_with_scores(
    method: Method, images: Tensor, targets: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    """DAAM's maps and the class scores of the same forward pass (read by a forward hook,
    removed afterwards; a forward function that is not a module is run once more)."""
    daam = method.attribution
    outputs: List[Tensor] = []
    module = daam.forward_func
    handle = None
    if isinstance(module, nn.Module):
        handle = module.register_forward_hook(
            lambda _module, _args, output: outputs.append(daam._scores(output).detach()))
    try:
        maps = method.explain(images, targets)
    finally:
        if handle is not None:
            handle.remove()
    if handle is None:
        with torch.no_grad():
            outputs.append(daam._scores(module(images)))
    return maps, torch.cat(outputs)


def _logits(model: nn.Module, images: Tensor) -> Tensor:
    """The model's class scores (one forward pass without gradients)."""
    with torch.no_grad():
        scores = ScoresOf(model)(images)
    if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[0] != len(images):
        raise ValueError(f"Expected the model to give ({len(images)}, classes) scores, got "
                         f"{_describe(scores)}.")
    return scores


def _explain_seeded(method: Method, images: Tensor, targets: Tensor, chunk: int) -> Tensor:
    """The method's maps with torch's random generators seeded by the chunk, so that a
    random method (NoiseTunnel) gives the same values in a resumed run."""
    devices = list(range(torch.cuda.device_count())) if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(chunk)
        return method.explain(images, targets)


def _clock(device: torch.device) -> float:
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _per_example(logits: Tensor, targets: Optional[Tensor]) -> Dict[str, Tensor]:
    """The shared per-example arrays of a batch (all but the labels); targets None: the
    predicted classes."""
    targets = logits.argmax(1) if targets is None else targets
    if targets.numel() and int(targets.max()) >= logits.shape[1]:
        raise ValueError(f"Expected target classes below the model's {logits.shape[1]} "
                         f"outputs, got {int(targets.max())}.")
    return {
        "targets": targets,
        "predictions": logits.argmax(1),
        "scores": logits.float().softmax(1).gather(1, targets[:, None])[:, 0],
    }


def _metric_values(prefix: str, names: Sequence[str], model: nn.Module, images: Tensor,
                   final: Tensor, targets: Tensor, masks: Optional[Tensor]
                   ) -> Dict[str, Tensor]:
    """Per-example values of the metrics ``names`` (and the curves of curve metrics), keyed
    by their arrays' names under ``prefix``."""
    from . import metrics as m

    model = ScoresOf(model)  # a model output object (transformers) as its class scores
    values: Dict[str, Tensor] = {}
    wanted = set(names)
    if wanted & {"pixel_accuracy", "miou", "average_precision"}:
        scores = m.segmentation(final, masks)
        values.update(pixel_accuracy=scores.pixel_accuracy, miou=scores.iou,
                      average_precision=scores.average_precision)
    if wanted & {"average_drop", "increase_in_confidence"}:
        change = m.confidence_change(model, images, final, target=targets)
        values.update(average_drop=change.drop, increase_in_confidence=change.increase)
    if "pointing_game" in wanted:
        values["pointing_game"] = m.pointing_game(final, masks)
    if "energy_pointing_game" in wanted:
        values["energy_pointing_game"] = m.energy_pointing_game(final, masks)
    out: Dict[str, Tensor] = {}
    for name in names:
        if name in ("deletion", "insertion"):
            curve = getattr(m, name)(model, images, final, target=targets)
            values[name], out[f"{prefix}curves/{name}"] = curve.auc, curve.probabilities
        elif name in ("positive_perturbation", "negative_perturbation"):
            curve = m.perturbation(model, images, final, target=targets,
                                   positive=name.startswith("positive"))
            values[name], out[f"{prefix}curves/{name}"] = curve.auc, curve.correct
        out[f"{prefix}metrics/{name}"] = values[name].float()
    return out


def _totals(values: Dict[str, Any], metric_names: Sequence[str]) -> Tensor:
    """Sums over some examples, as stored (dtypes of the store): each metric array's sum
    and count of its finite values, then the correct predictions, the examples with a label
    (>= 0), and the examples."""
    totals = torch.zeros(2 * len(metric_names) + 3, dtype=torch.float64)
    for index, name in enumerate(metric_names):
        value = np.asarray(values[name], np.float32).astype(np.float64)
        finite = np.isfinite(value)
        totals[2 * index] = float(value[finite].sum())
        totals[2 * index + 1] = float(finite.sum())
    labels, predictions = np.asarray(values["labels"]), np.asarray(values["predictions"])
    totals[-3] = float(((labels == predictions) & (labels >= 0)).sum())
    totals[-2] = float((labels >= 0).sum())
    totals[-1] = len(labels)
    return totals


def _aggregate(group: Any, metric_names: Sequence[str], computed: Tensor,
               stored_chunks: List[int], batch_size: int, world: int, device: torch.device,
               labels_are_classes: bool) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """The accuracy and the mean of each metric array over all examples (its finite values):
    this rank's totals of the chunks it computed plus those of ``stored_chunks`` (complete
    before this run, read back), summed over the ranks (all_reduce). No accuracy where the
    labels are not the model's classes."""
    totals = computed.clone()
    for chunk in stored_chunks:
        rows = slice(chunk * batch_size, (chunk + 1) * batch_size)
        names = list(metric_names) + ["labels", "predictions"]
        totals += _totals({name: group[name][rows] for name in names}, metric_names)
    if world > 1:
        carrier = totals.to(device) if dist.get_backend() == "nccl" else totals
        dist.all_reduce(carrier)
        totals = carrier.cpu()
    means = {name: float(totals[2 * i] / totals[2 * i + 1]) if totals[2 * i + 1] > 0
             else float("nan") for i, name in enumerate(metric_names)}
    return means, {
        "examples": int(totals[-1]),
        "accuracy": float(totals[-3] / totals[-2]) if totals[-2] > 0 and labels_are_classes
        else None,
    }


def _describe_summary(summary: Dict[str, Any], out: Any, name: str = "explain_dataset") -> str:
    parts = [f"{summary['examples']} examples in {out}"]
    if summary["accuracy"] is not None:
        parts.append(f"accuracy {summary['accuracy']:.4f}")
    for key, value in summary.get("metrics", {}).items():
        if isinstance(value, dict):
            parts += [f"{key} {metric} {mean:.4f}" for metric, mean in value.items()]
        else:
            parts.append(f"{key} {value:.4f}")
    return f"{name}: " + ", ".join(parts)
