"""``captum-daam view``: the report of an explain-dataset or compare store
(:mod:`captum_daam.viewer`), written as a folder or served from a local port.

torch is imported only when the command runs, not when the parser is built.
"""

import argparse
from typing import Any

from ._common import UsageError, _os_reason

__all__ = ["add_parser", "view_command"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``view`` subcommand to ``subparsers``; it runs :func:`view_command`."""
    parser = subparsers.add_parser(
        "view",
        help="an interactive report of an explain-dataset or compare store (HTML, opens "
        "offline), or --serve it",
        description="Write the report of an explain-dataset or compare store: a folder with "
        "index.html that opens offline in a browser (its own HTML, CSS and JavaScript, no "
        "network), to share as it is. A summary (accuracy, each metric's mean with its 95% "
        "bootstrap interval and histogram, the mean flow mass per block), a gallery sortable "
        "and filterable by class, correct / wrong, score and each metric (failures first on "
        "request), and per example the image with a block slider and play button over "
        "D_1..D_L, the three display scalings and, for a compare store, every method side by "
        "side. A partial store is shown on its complete chunks, and the pages say so. With "
        "--serve nothing is written: the same pages are made on request from a local port.",
    )
    parser.add_argument("store", metavar="STORE",
                        help="the store folder of explain-dataset or compare")
    parser.add_argument("--out", default=None,
                        help="the report's folder (default: STORE/view); an earlier report "
                        "there is replaced, a folder holding anything else is refused")
    parser.add_argument("--serve", action="store_true",
                        help="serve the report from a local port instead of writing it")
    parser.add_argument("--port", type=int, default=8000,
                        help="with --serve: the port (default: 8000; 0 takes a free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="with --serve: the address to listen on (default: 127.0.0.1)")
    parser.add_argument("--resamples", type=int, default=10_000,
                        help="bootstrap resamples of the metrics' intervals, as compare's "
                        "report (default: 10000)")
    parser.set_defaults(run=view_command)
    return parser


def view_command(args: argparse.Namespace) -> int:
    """Write or serve the report; errors are one line on stderr and exit status 2."""
    if args.resamples < 1:
        raise UsageError(f"--resamples must be at least 1, got {args.resamples}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    if args.serve and args.out is not None:
        raise UsageError("--serve writes nothing; give either --serve or --out")
    from ..viewer import ViewerInputError, make_server, open_store, view

    try:
        if not args.serve:
            page = view(args.store, args.out, resamples=args.resamples)
            print(f"captum-daam view: wrote {page.parent}/ (open {page} in a browser)")
            return 0
        data = open_store(args.store, args.resamples)
    except ViewerInputError as error:
        raise UsageError(str(error)) from error
    except OSError as error:  # writing the report: a full disk, a folder not writable
        place = args.out or f"{args.store}/view"
        raise UsageError(f"could not write the report to {place}: {_os_reason(error)}; free "
                         f"some space or choose another --out") from error
    try:
        server = make_server(data, args.host, args.port)
    except OSError as error:
        raise UsageError(f"could not listen on {args.host}:{args.port}: {error.strerror}; "
                         f"choose another --port") from error
    host, port = server.server_address[:2]
    print(f"captum-daam view: serving {args.store} at http://{host}:{port}/ (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped: not an error
        print("captum-daam view: stopped", flush=True)
    finally:
        server.server_close()
    return 0
