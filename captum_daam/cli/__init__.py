"""The ``captum-daam`` command line: :func:`main` and :func:`build_parser`.

One module per command, each with ``add_parser(subparsers)`` and the function the command
runs: :mod:`.demo`, :mod:`.explain`, :mod:`.check`, :mod:`.explain_dataset`, :mod:`.compare`,
:mod:`.view`.
What several commands share is in :mod:`._common` (and, for the two that write a store, in
:mod:`._stores`); a command module imports from there (and the rest of the package), never
from this module nor from another command. A new command is one more import
below and one more ``add_parser`` call in :func:`build_parser`.

torch, timm and matplotlib are imported inside the commands, so that ``--help`` and
``--version`` answer without loading them.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import List, Optional

from .. import __version__
from . import check, compare, demo, explain, explain_dataset, view
from ._common import _SIGNALS, Terminated, UsageError, _Parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="captum-daam",
        description="Dynamic Accumulated Attention Maps (DAAM) for Vision Transformers: "
        "explain a ViT's decision block by block.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.add_parser(commands)
    explain.add_parser(commands)
    check.add_parser(commands)
    explain_dataset.add_parser(commands)
    compare.add_parser(commands)
    view.add_parser(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with _SIGNALS.installed():
        try:
            return args.run(args)
        except UsageError as error:
            print(f"captum-daam: error: {' '.join(str(error).split())}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("captum-daam: interrupted (SIGINT); the outputs already written are complete",
                  file=sys.stderr)
            return 128 + signal.SIGINT
        except Terminated:
            print("captum-daam: terminated (SIGTERM); the outputs already written are complete",
                  file=sys.stderr)
            return 128 + signal.SIGTERM
