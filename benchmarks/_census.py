"""What the censuses (benchmarks/coverage.py for timm, benchmarks/coverage_hf.py for Hugging Face
transformers and open_clip) share: the two checks of a model (:func:`check_model`, described in
coverage.py's docstring), how a record is classified, and the resumable loop over the names."""

import gc
import json
import os
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from typing import (
    Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Set, Tuple
)

import torch
from torch import Tensor, nn

from captum_daam import DAAM
from captum_daam.adapters.base import TokenRows
from captum_daam.adapters.verify import as_recorded_rows, output_projection_input
from captum_daam.attr.base import on_one_grid
from captum_daam.decompose import place_on_grid

#: The reason recorded for a model whose check ended the census process (the kernel's
#: out-of-memory killer): written before the check, replaced by its result.
DIED = (
    "the census process was killed while checking it (out of this machine's memory at the "
    "model's default input size)"
)

#: Reads, during one forward pass, each attention module's output where it enters the module's
#: output projection, appending it to the given list; yields the positions (in the modules
#: given) whose reading already holds the records' rows, so that the adapter's own anchor is
#: not consulted there.
OutputReader = Callable[[Sequence[nn.Module], List[Tensor]], ContextManager[Set[int]]]


def first_sentence(error: BaseException, count: int = 1) -> str:
    """The first ``count`` sentences of the error's message."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ". ".join(text.split(". ")[:count]).rstrip(".") + "."


def relative_error(actual: Tensor, expected: Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


@contextmanager
def projection_input_hooks(
    attentions: Sequence[nn.Module],
    own: List[Tensor],
    find: Callable[[nn.Module], nn.Module] = output_projection_input,
) -> Iterator[Set[int]]:
    """Forward pre-hooks, not the adapter's, on the module whose input is each attention
    module's output before its projection (``find``: timm's layouts by default)."""
    handles = [
        find(attention).register_forward_pre_hook(lambda module, args: own.append(args[0]))
        for attention in attentions
    ]
    try:
        yield set()
    finally:
        for handle in handles:
            handle.remove()


def check_model(
    model: nn.Module, images: Tensor, read_outputs: OutputReader = projection_input_hooks
) -> Dict[str, object]:
    """DAAM on ``images`` with its defaults, and the two checks of coverage.py's docstring;
    ``read_outputs`` reads the attention outputs that check (1) compares with."""
    daam = DAAM(model)
    adapter = daam.adapter
    # DAAM's default: "class", "all", or the rows the head reads (BEiT's mean of the patches,
    # DINOv2's [class] token and patches), whose gradients alone are kept below.
    explained = daam._check_queries(None)
    head_rows = None if isinstance(explained, str) else explained
    queries = "head" if head_rows is not None else explained
    latent = {id(module) for module in adapter.latent_query_modules()}
    # Blocks explained from every row whatever queries: an attention-pool head's latent rows,
    # PVT v1's stages before its [class] token joins.
    every = {id(module) for module in adapter.every_row_modules()}
    # Per block: every row (those blocks, or queries='all' / the head's rows), or row 0.
    every_row = [id(module) in every or queries != "class" for module in daam.layer]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block_maps = daam.attribute(images, block_grids=True, accumulate=False)
    flow = on_one_grid([block[:, 0] for block in block_maps])

    # One forward pass with the adapter's records and, on the input of each module's output
    # projection, hooks that are not the adapter's; autograd's gradient at what they read.
    own: List[Tensor] = []
    with torch.enable_grad(), adapter.record(daam.layer, full=every_row) as records, \
            read_outputs(daam.layer, own) as own_rows:
        scores = adapter.output_scores(model(images))
        score = scores[0, int(scores.argmax(1))]
        # Where the adapter watched a tensor of its own making (the module's output laid
        # out as its records: MaxViT's window tokens, NesT's image blocks), the gradient
        # there too.
        anchors = [None if index in own_rows else record.anchor  # dropped when recording ends
                   for index, record in enumerate(records)]
        views = [anchor for anchor, read in zip(anchors, own)
                 if anchor is not None and anchor is not read]
        gradients = torch.autograd.grad(score, own + views, allow_unused=True)
    if len(own) != len(records):  # one reading per block, in the records' order
        raise RuntimeError(f"the census read {len(own)} attention outputs for {len(records)} "
                           f"blocks")
    view_gradients = iter(gradients[len(own):])

    decomposition_error, map_error = 0.0, 0.0
    layouts = adapter.block_layouts(daam.layer, tuple(images.shape[-2:]))
    for module, record, anchor, read, gradient, daam_map, all_rows, layout in zip(
        daam.layer, records, anchors, own, gradients, block_maps, every_row, layouts
    ):
        values = record.values.double()  # (B, H, N, d)
        heads, width = values.shape[1], values.shape[3]
        at_read = torch.zeros_like(read) if gradient is None else gradient
        at_anchor = None
        if anchor is not None and anchor is not read:  # the adapter's own view: its gradient
            at_anchor = next(view_gradients)
            at_anchor = torch.zeros_like(anchor) if at_anchor is None else at_anchor
        residual = None if record.residual is None else record.residual.double()
        if not all_rows:
            try:
                output, gradient, _ = as_recorded_rows(record, anchor, read, tuple(read.shape[:2]),
                                                       at_read, at_anchor)
            except ValueError:
                decomposition_error, output, gradient = float("inf"), read, at_read
            rebuilt = (record.class_attention.double().unsqueeze(-1) * values).sum(2)
            if residual is not None:  # a term the model adds that is no token's (MViTv2)
                rebuilt = rebuilt + residual[:, :, 0]
            rebuilt = rebuilt.flatten(1)  # (B, C): heads concatenated
            decomposition_error = max(
                decomposition_error, relative_error(rebuilt, output[:, 0].detach())
            )
            weights = gradient[:, 0].double().relu().unflatten(-1, (heads, width))
            cam = (record.class_attention.double() * (values * weights[:, :, None]).sum(-1))
        else:
            attention = record.attention().double()  # (B, H, Nq, N)
            rebuilt = attention @ values if residual is None else attention @ values + residual
            rebuilt = rebuilt.transpose(1, 2).flatten(2)
            try:
                output, gradient, real = as_recorded_rows(
                    record, anchor, read, tuple(rebuilt.shape[:2]), at_read, at_anchor)
            except ValueError:
                decomposition_error, output, gradient, real = float("inf"), read, at_read, None
            if real is not None:  # padding rows, cropped by the module: compared nowhere
                rebuilt = rebuilt * real
            decomposition_error = max(
                decomposition_error, relative_error(rebuilt, output.detach())
            )
            weights = gradient.double().relu()
            if head_rows is not None and id(module) not in every:
                rows = head_rows.rows(weights.shape[1]) if isinstance(head_rows, TokenRows) \
                    else head_rows
                kept = torch.zeros(weights.shape[1], 1, dtype=weights.dtype)
                kept[list(rows)] = 1
                weights = weights * kept  # the rows DAAM explains
            weights = weights.unflatten(-1, (heads, width)).transpose(1, 2)
            cam = values * (attention.transpose(-2, -1) @ weights)
            cam = cam.sum(-1)
        cam = cam.sum(1).relu()  # (B * windows, N)
        if layout.positions is not None:  # windows, or tokens placed otherwise on the grid
            patches = place_on_grid(cam, layout.positions.to(cam.device), layout.grid)
            patches = patches.unsqueeze(1)
        else:
            patches = cam[:, cam.shape[1] - daam_map[0, 0].numel():].reshape(daam_map.shape)
        map_error = max(map_error, relative_error(daam_map, patches))
    return {
        "queries": queries,
        **({"head_rows": str(head_rows)} if head_rows is not None else {}),
        "blocks": len(records),
        "attention_pool_head": bool(latent),
        "grids": sorted({tuple(block.shape[-2:]) for block in block_maps}, reverse=True),
        "flow_grid": list(flow.shape[-2:]),
        "prefix_tokens": adapter.num_prefix_tokens,
        "decomposition_error": decomposition_error,
        "map_error": map_error,
        # How many block maps have a positive value (check (2) compares zeros for the others)
        # and whether the last block's does.
        "blocks_with_positive_map": int((flow[0].flatten(1).amax(1) > 0).sum()),
        "last_block_map_positive": bool(flow[:, -1].amax() > 0),
    }


def noise_zero_weights(model: nn.Module, scale: float = 0.02) -> int:
    """Seeded noise (std ``scale``, as timm's truncated-normal initialisation) on every
    parameter but a bias that a library starts at exactly zero (classifiers initialised to
    zero, as timm's Swin V2 and Hiera heads are; LeViT's zero BatchNorm scales at the end of
    each residual branch; attention bias tables): otherwise no gradient reaches the attention,
    every map is zero and check (2) compares zeros. Returns how many tensors."""
    generator = torch.Generator().manual_seed(0)
    count = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.endswith("bias") and not parameter.any():
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
                count += 1
    return count


def checked(
    record: Dict[str, object],
    prepare: Callable[[], Tuple[nn.Module, Tensor]],
    tolerance: float,
    read_outputs: OutputReader = projection_input_hooks,
    started: Optional[float] = None,
    where: Optional[Callable[[BaseException], str]] = None,
) -> Dict[str, object]:
    """``record`` with the outcome of the checks on the model and images ``prepare`` gives
    (it may fill the record too): exact, runs, refused (a TypeError or ValueError, its first
    sentence) or crashed (any other exception; with ``where``, both record where the error was
    raised), and the seconds since ``started``."""
    started = time.perf_counter() if started is None else started
    try:
        model, images = prepare()
        checks = check_model(model, images, read_outputs)
        record.update(checks)
        exact = max(checks["decomposition_error"], checks["map_error"]) <= tolerance
        record["status"] = "exact" if exact else "runs"
        if not exact:
            record["reason"] = (
                f"decomposition error {checks['decomposition_error']:.1e}, map error "
                f"{checks['map_error']:.1e}"
            )
    except (TypeError, ValueError) as error:
        record.update(status="refused", reason=first_sentence(error))
        if where is not None:
            record["raised_in"] = where(error)
    except Exception as error:  # noqa: BLE001
        record.update(status="crashed", reason=f"{type(error).__name__}: "
                      f"{first_sentence(error)}", traceback=traceback.format_exc(limit=4))
        if where is not None:
            record["raised_in"] = where(error)
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def run_census(
    every_name: Sequence[str],
    names: Sequence[str],
    census_one: Callable[[str, Callable[[Dict[str, object]], None]], Dict[str, object]],
    out: str,
    settings: Dict[str, object],
    recheck: bool,
    summary: Callable[[List[Dict[str, object]], Dict[str, object]], str],
) -> int:
    """Census ``names`` (a selection of ``every_name``, the order of the results) into
    ``out``.json, one record at a time, resuming where the file stops (``recheck``: the named
    models again, but not one whose check killed the census), then ``out``.md from
    ``summary``. ``census_one(name, before_building)`` gives a record and calls
    ``before_building(record so far)`` just before it builds the model with its weights.
    Returns 1 if a model crashed, else 0."""
    path = f"{out}.json"
    done: Dict[str, Dict[str, object]] = {}
    if os.path.exists(path):
        with open(path) as stored:
            done = {record["name"]: record for record in json.load(stored)["models"]}

    def store() -> None:
        records = [done[key] for key in every_name if key in done]
        with open(path + ".partial", "w") as stored:
            json.dump({"settings": settings, "models": records}, stored, indent=1)
        os.replace(path + ".partial", path)

    def mark_as_died(record: Dict[str, object]) -> None:
        # Stored before the check, so that a check the kernel kills (out of memory) leaves it.
        done[record["name"]] = dict(record, status="not built", reason=DIED)
        store()

    for index, name in enumerate(names):
        if name in done and not (recheck and done[name].get("reason") != DIED):
            continue  # a model whose check killed the census is not tried again
        record = census_one(name, mark_as_died)
        done[name] = record
        print(f"[{index + 1}/{len(names)}] {name}: {record['status']} "
              f"{record.get('reason', '')}", flush=True)
        store()
        gc.collect()
    records = [done[key] for key in every_name if key in done]
    with open(f"{out}.md", "w") as table:
        table.write(summary(records, settings))
    crashed = [record["name"] for record in records if record["status"] == "crashed"]
    if crashed:
        print(f"crashed: {', '.join(crashed)}", file=sys.stderr)
    return 1 if crashed else 0
