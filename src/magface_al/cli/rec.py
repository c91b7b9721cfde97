"""``magface-al rec``: inspect, check, index and pack InsightFace RecordIO datasets."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_DATA_HELP = "dataset folder holding train.rec, train.idx and property, as InsightFace distributes them"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``rec`` command group and its subcommands."""
    rec = subparsers.add_parser("rec", help="inspect, check and write InsightFace RecordIO datasets")
    commands = rec.add_subparsers(dest="rec_command", metavar="SUBCOMMAND")
    rec.set_defaults(func=lambda args: _print_group_help(rec))

    info = commands.add_parser("info", help="print image, identity and key counts, header layout and label kind")
    info.add_argument("data", type=Path, metavar="DATA", help=_DATA_HELP)
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(func=run_info)

    check = commands.add_parser(
        "check", help="read and decode every record; exit status 0 when all are sound, 1 when any is damaged"
    )
    check.add_argument("data", type=Path, metavar="DATA", help=_DATA_HELP)
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    check.set_defaults(func=run_check)

    pack = commands.add_parser(
        "pack", help="pack a folder of aligned faces (one sub-folder per identity) into train.rec/.idx/property"
    )
    pack.add_argument("folder", type=Path, metavar="FOLDER", help="folder with one sub-folder of images per identity")
    pack.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder to write the dataset and manifest.csv into")
    pack.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality from 1 to 100 (default: 95)")
    pack.add_argument(
        "--array-label", action="store_true", help="store labels as the array [identity, 0.0] instead of a scalar"
    )
    pack.add_argument("--json", action="store_true", help="print the summary as JSON")
    pack.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pack.set_defaults(func=run_pack)

    index = commands.add_parser(
        "index", help="rebuild train.idx by scanning train.rec (each record's IRHeader id becomes its key)"
    )
    index.add_argument("data", type=Path, metavar="DATA", help="dataset folder holding train.rec")
    index.add_argument(
        "--output", type=Path, default=None, help="where to write the index (default: DATA/train.idx, replaced)"
    )
    index.set_defaults(func=run_index)


def _print_group_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _print_json(data: Any) -> None:
    from magface_al.utils import to_strict_json

    print(json.dumps(to_strict_json(data), indent=2))


def _fail(error: BaseException) -> int:
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f"error: {message}", file=sys.stderr)
    return 1


def run_info(args: argparse.Namespace) -> int:
    from magface_al.data.faces import FaceRecordDataset
    from magface_al.data.recordio import RecordIOError

    try:
        summary = FaceRecordDataset(args.data).describe()
    except (RecordIOError, FileNotFoundError, ValueError) as error:
        return _fail(error)
    if args.json:
        _print_json(summary)
        return 0
    header = summary["header"]
    layout = (
        f"key 0, image keys 1..{header['first_identity_key'] - 1}, "
        f"identity records {header['first_identity_key']}..{header['end_key'] - 1}"
        if header
        else "none (every key is an image)"
    )
    lines = [
        f"dataset:     {summary['folder']}",
        f"images:      {summary['images']}",
        f"identities:  {summary['identities']}",
        f"keys:        {summary['keys']}",
        f"header:      {layout}",
        f"label kind:  {summary['label_kind']}",
        f"property:    {summary['property']}",
        f"rec size:    {summary['rec_bytes']} bytes",
    ]
    print("\n".join(lines))
    return 0


def run_check(args: argparse.Namespace) -> int:
    from magface_al.data.faces import check_dataset

    try:
        report = check_dataset(args.data, progress=not args.no_progress and not args.json)
    except (FileNotFoundError, ValueError) as error:
        return _fail(error)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(f"checked {report.checked} records of {args.data}: {len(report.damaged)} damaged")
        for record in report.damaged:
            print(f"key {record.key}: {record.reason}")
    return 0 if report.sound else 1


def run_pack(args: argparse.Namespace) -> int:
    from magface_al.data.pack import pack_folder

    try:
        rows = pack_folder(
            args.folder,
            args.out_dir,
            jpeg_quality=args.jpeg_quality,
            array_label=args.array_label,
            progress=not args.no_progress and not args.json,
        )
    except (FileNotFoundError, ValueError) as error:
        return _fail(error)
    summary = {
        "out_dir": str(args.out_dir),
        "images": len(rows),
        "identities": len({row["label"] for row in rows}),
        "jpeg_quality": args.jpeg_quality,
    }
    if args.json:
        _print_json(summary)
    else:
        print(f"packed {summary['images']} images of {summary['identities']} identities into {args.out_dir}")
    return 0


def run_index(args: argparse.Namespace) -> int:
    from magface_al.data.faces import IDX_NAME, REC_NAME
    from magface_al.data.recordio import build_index

    output = args.output or args.data / IDX_NAME
    try:
        count = build_index(args.data / REC_NAME, output)
    except (FileNotFoundError, ValueError) as error:
        return _fail(error)
    print(f"indexed {count} records into {output}")
    return 0
