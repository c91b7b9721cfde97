"""``magface-al label``: serve the labelling page for a file of selected pairs."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8765


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``label`` subcommand."""
    parser = subparsers.add_parser(
        "label",
        help="answer selected pairs (same / different / not sure) in a local web page",
        description=(
            "Start a local web server that shows the selected pairs one at a time. Every answer is "
            "appended to a log at once and the feedback file is rewritten atomically, so stopping "
            "the server or closing the browser loses nothing; run the command again to resume."
        ),
    )
    parser.add_argument("dataset", type=Path, help="dataset folder with train.rec, train.idx and property")
    parser.add_argument("pairs", type=Path, help="selected pairs JSON written by the select stage")
    parser.add_argument("feedback", type=Path, help="feedback JSON to write (the human-feedback input of finetune)")
    parser.add_argument(
        "--log",
        type=Path,
        default=None,
        help="append-only answer log (default: FEEDBACK's name with .answers.jsonl, beside it)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"TCP port to listen on; 0 picks a free port (default: {DEFAULT_PORT})",
    )
    parser.set_defaults(func=run_label)


def run_label(args: argparse.Namespace) -> int:
    """Serve the labelling page until interrupted; return the exit code."""
    from magface_al.data.faces import FaceRecordDataset
    from magface_al.labeling.server import create_server
    from magface_al.labeling.store import AnswerStore, LabelStoreError, default_log_path, read_selected_pairs

    if not 0 <= args.port <= 65535:
        logger.error("invalid --port %d; use 0 to 65535 (0 picks a free port)", args.port)
        return 2
    log_path = args.log or default_log_path(args.feedback)
    try:
        pairs = read_selected_pairs(args.pairs)
        dataset = FaceRecordDataset(args.dataset)
        store = AnswerStore(pairs, log_path, args.feedback)
    except (LabelStoreError, OSError, ValueError) as error:
        logger.error("%s", error)
        return 1

    try:
        server = create_server(store, dataset, host=args.host, port=args.port)
    except LabelStoreError as error:
        store.close()
        logger.error("%s", error)
        return 1
    except OSError as error:
        store.close()
        logger.error("cannot listen on %s:%d: %s; pass another --port (0 picks a free one)", args.host, args.port, error)
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        logger.info("received signal %d, stopping", signum)
        # shutdown() waits for serve_forever to return, so it must run in another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    # The URL goes to stdout so that scripts (and tests using port 0) can read it.
    print(f"Labelling page: {server.url}", flush=True)
    logger.info("answers are logged to %s and written to %s", log_path, args.feedback)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("interrupted, stopping")
    finally:
        server.server_close()
        store.close()
    state = store.state()
    logger.info("%d of %d pairs answered; feedback written to %s", state["done"], state["total"], args.feedback)
    return 0


if __name__ == "__main__":
    from magface_al.cli import main

    sys.exit(main(["label", *sys.argv[1:]]))
