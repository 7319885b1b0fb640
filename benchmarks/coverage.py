"""Census of timm: which models DAAM explains exactly, which it refuses and why.

Every name ``timm.list_models()`` gives is built on the meta device first (no memory, no
weights) to see whether it has a [class] token, how large it is and whether an adapter takes
it. Models an adapter takes, up to ``--max-params`` parameters, are then built with random
weights (``pretrained=False``: nothing is downloaded) and explained for one random image at
the model's default input size, with DAAM's defaults (``queries='class'`` where the head
reads the [class] token, ``'all'`` where it pools or there is none; an attention-pool head's
latent rows). Each model ends in one of:

- ``exact``: DAAM's block maps equal maps formed from an independent check of every block of
  the flow, to ``--tolerance`` (relative to the largest value): (1) the recorded decomposition
  adds up to the module's own attention output, read by a hook that is not the adapter's on
  the input of the module's output projection (``norm`` or ``proj``): the [class] row,
  sum_n A[h, 0, n] v[h, n], or with queries='all' every row, A @ v (plus the term the record
  names as no token's, MViTv2's pooled query); (2) the maps formed from that decomposition
  with the gradient autograd gives at the hooked tensor, each token placed on the grid as
  the adapter's layout says (windows), equal DAAM's. Weights a library starts at exactly
  zero (a zero-initialised classifier) are given small seeded noise first, so that the maps
  are not zero everywhere; each record says how many block maps have a positive value.
  Each family's test file checks the same models' maps token by token against an explicit
  float64 reference; this census checks that every model name meets the decomposition.
- ``runs``: DAAM explains the model, but a check above is off (the record says by how much).
- ``refused``: DAAM raises a TypeError or ValueError before any work (no adapter takes the
  model: its message says whether it has attention at all; or the model cannot take its
  default input); the reason is its message's first sentences.
- ``crashed``: any other exception (a bug: the goal is none).
- ``not built``: larger than ``--max-params`` (the size is recorded), or its check killed
  the census process (out of memory); such a model is not tried again on resuming.

Results go to ``--out`` as JSON (one record per model, written as it goes, so an interrupted
census resumes where it stopped; ``--recheck`` checks the named models again) and a Markdown
summary of every model the JSON holds.

    python benchmarks/coverage.py                       # every timm model, up to 700M parameters
    python benchmarks/coverage.py --names 'pit_*' 'mvitv2_*_cls' --out /tmp/some
"""

import argparse
import fnmatch
import os
import sys
import time
from collections import Counter, defaultdict
from typing import Callable, Dict, List, Optional

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from captum_daam.adapters import adapter_for

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _census, beside this file
from _census import checked, first_sentence, noise_zero_weights, run_census  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def has_class_token(model: nn.Module) -> bool:
    """Whether a learned [class] token is among the model's parameters (timm names them
    ``cls_token``, ``cls_token_0``, ``cls_token1`` ...)."""
    return any("cls_token" in name for name, _ in model.named_parameters())


def census_one(
    name: str,
    max_params: float,
    tolerance: float,
    before_building: Callable[[Dict[str, object]], None] = lambda record: None,
) -> Dict[str, object]:
    """The census record of one model; ``before_building`` is given the record so far (name,
    family, size) just before the model is built with its weights and checked."""
    record: Dict[str, object] = {"name": name}
    try:
        with torch.device("meta"):
            skeleton = timm.create_model(name, pretrained=False)
    except Exception as error:  # noqa: BLE001 - a census records every failure
        return dict(record, status="not built", reason=f"timm cannot build it: "
                    f"{first_sentence(error)}", class_token=None)
    record["class_token"] = has_class_token(skeleton)
    record["family"] = type(skeleton).__name__
    record["params"] = sum(parameter.numel() for parameter in skeleton.parameters())
    try:
        adapter_for(skeleton)  # the adapters refuse a model in their constructor, before any work
    except TypeError as error:  # no adapter: the message's second sentence says if it has attention
        return dict(record, status="refused", reason=first_sentence(error, 2))
    except Exception as error:  # noqa: BLE001
        return dict(record, status="crashed", reason=f"on the meta device: {type(error).__name__}: "
                    f"{first_sentence(error)}")
    if record["params"] > max_params:
        return dict(record, status="not built", reason=f"{record['params'] / 1e6:.0f}M "
                    f"parameters, above this census's {max_params / 1e6:.0f}M")
    del skeleton
    before_building(record)
    started = time.perf_counter()

    def prepare():
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        record["zero_weights_noised"] = noise_zero_weights(model)
        _, height, width = resolve_data_config({}, model=model)["input_size"]
        record["input_size"] = [height, width]
        images = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
        return model, images

    return checked(record, prepare, tolerance, started=started)


def summary(records: List[Dict[str, object]], settings: Dict[str, object]) -> str:
    with_token = [record for record in records if "class_token" in record]
    counts = Counter(record["status"] for record in with_token)
    lines = [
        f"timm {timm.__version__}, torch {torch.__version__}, CPU; random weights, batch 1, "
        f"default input size; tolerance {settings['tolerance']:.0e}; models built up to the "
        f"parameter limit of the run that checked them (the latest run's: "
        f"{settings['max_params'] / 1e6:.0f}M; a model not built names its run's limit). The "
        f"seconds are per model, as measured in the run (resumable, so possibly in several "
        f"pieces) that checked it.",
        "",
        f"{len(records)} model names: "
        + ", ".join(f"{counts[status]} {status}" for status in
                    ("exact", "runs", "refused", "crashed", "not built")),
        "",
        "| family (class) | models | with a [class] token | exact | runs | refused | crashed "
        "| not built | grids | queries |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_family: Dict[str, List[Dict[str, object]]] = defaultdict(list)
    for record in with_token:
        by_family[record["family"]].append(record)
    for family in sorted(by_family, key=lambda name: (-len(by_family[name]), name)):
        group = by_family[family]
        family_counts = Counter(record["status"] for record in group)
        built = [record for record in group if record.get("grids")]
        multi = any(len(record["grids"]) > 1 for record in built)
        grids = ("per block" if multi else "one") if built else "-"
        queries = sorted({record["queries"] for record in group if "queries" in record})
        lines.append(
            f"| {family} | {len(group)} | {sum(bool(r['class_token']) for r in group)} | "
            + " | ".join(str(family_counts[status]) for status in
                         ("exact", "runs", "refused", "crashed", "not built"))
            + f" | {grids} | {', '.join(queries) or '-'} |"
        )
    refused = [record for record in with_token if record["status"] == "refused"]
    without_attention = [r for r in refused if "has no attention module" in r["reason"]]
    channel_attention = Counter(
        r["family"] for r in refused if "Its attention modules mix no tokens" in r["reason"]
    )
    unknown_attention = Counter(
        r["family"] for r in refused if "are of no supported family" in r["reason"]
    )
    listed = (len(without_attention) + sum(channel_attention.values())
              + sum(unknown_attention.values()))
    lines += [
        "",
        f"Refused: {len(without_attention)} models without attention (convolutional or MLP "
        f"models, no module named for attention and no nn.MultiheadAttention); "
        f"{sum(channel_attention.values())} whose attention modules weigh channels and mix no "
        f"tokens ("
        + ", ".join(f"{family} {count}" for family, count in channel_attention.most_common())
        + f"); {sum(unknown_attention.values())} with attention modules of a family no "
        f"adapter knows yet ("
        + ", ".join(f"{family} {count}" for family, count in unknown_attention.most_common())
        + f"); {len(refused) - listed} for another reason, listed below.",
        "",
        "Models not explained exactly and not refused for lacking attention or an adapter, "
        "and why:",
        "",
    ]
    for record in with_token:
        reason = record.get("reason", "")
        if record["status"] == "refused" and reason.startswith("DAAM has no adapter"):
            continue
        if record["status"] != "exact":
            lines.append(f"- {record['name']} ({record['family']}): {record['status']}: "
                         f"{record.get('reason', '')}")
    lines += ["", "Every model built:", "",
              "| model | status | [class] token | blocks | grids | queries | decomposition error "
              "| map error | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for record in with_token:
        if "seconds" not in record:
            continue
        grids = " ".join(f"{g[0]}x{g[1]}" for g in record.get("grids", []))
        errors = [f"{record[key]:.1e}" if key in record else "" for key in
                  ("decomposition_error", "map_error")]
        head = " + attention pool" if record.get("attention_pool_head") else ""
        token = "yes" if record["class_token"] else "no"
        lines.append(f"| {record['name']} | {record['status']} | {token} | "
                     f"{record.get('blocks', '')}{head} | "
                     f"{grids} | {record.get('queries', '')} | {errors[0]} | {errors[1]} | "
                     f"{record.get('seconds', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--names", nargs="*", default=["*"],
                        help="fnmatch patterns of timm names (default: every name)")
    parser.add_argument("--max-params", type=float, default=700e6,
                        help="build models up to this many parameters (default 700e6)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest relative error of an exact model (default 1e-4)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads")
    parser.add_argument("--out", default=os.path.join(RESULTS, "coverage"),
                        help="path prefix of the .json and .md results")
    parser.add_argument("--recheck", action="store_true",
                        help="check the named models again even where --out has them")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    every_name = timm.list_models()
    names = [name for name in every_name
             if any(fnmatch.fnmatch(name, pattern) for pattern in args.names)]
    settings = {"max_params": args.max_params, "tolerance": args.tolerance,
                "threads": args.threads, "timm": timm.__version__, "torch": torch.__version__}
    return run_census(
        every_name, names,
        lambda name, before: census_one(name, args.max_params, args.tolerance, before),
        args.out, settings, args.recheck, summary,
    )


if __name__ == "__main__":
    sys.exit(main())
