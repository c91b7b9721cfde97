"""Measure RecordIO read speed against a plain seek/read loop, and index parse time at CASIA-WebFace size.

Run from the repository root:

    .venv/bin/python benchmarks/bench_recordio.py [--data ../shared/data/lfw]

Prints records/s for random-access reads of every key (ours and a plain
``seek``/``read`` loop over the same offsets in the same order), for our
sequential scan, the ratio ours / plain (target >= 0.8), and the time to
parse a generated index of 494,414 keys (target < 1 s). Each figure is the
best of ``--repeat`` runs, so that other load on the machine skews it less.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

from magface_al.data.recordio import RecordIOReader, parse_index

REPO_ROOT = Path(__file__).resolve().parents[1]
CASIA_IMAGES = 494_414  # CASIA-WebFace as InsightFace distributes it


def best_of(repeat: int, *runs) -> list[float]:
    """Return the shortest wall time in seconds of each of ``runs`` over ``repeat`` rounds.

    The runs alternate within a round, so a burst of other load on the
    machine slows all of them rather than one.
    """
    best = [float("inf")] * len(runs)
    for _ in range(repeat):
        for position, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[position] = min(best[position], time.perf_counter() - start)
    return best


def plain_reads(rec_path: Path, offsets: list[int]) -> int:
    """Read whole records at ``offsets`` with nothing but seek/read and the length field."""
    total = 0
    with open(rec_path, "rb") as handle:
        for offset in offsets:
            handle.seek(offset)
            _, lrec = struct.unpack("<II", handle.read(8))
            total += len(handle.read(lrec & 0x1FFFFFFF))
    return total


def our_reads(reader: RecordIOReader, keys: list[int]) -> int:
    return sum(len(reader.read(key)) for key in keys)


def our_scan(reader: RecordIOReader) -> int:
    return sum(len(payload) for _, payload in reader.scan())


def write_generated_index(path: Path, count: int) -> int:
    """Write an index of ``count`` keys with offsets spaced like CASIA-WebFace records; return the end offset."""
    lines = []
    offset = 0
    generator = random.Random(0)
    for key in range(count):
        lines.append(f"{key}\t{offset}\n")
        offset += 8 + 4 * generator.randint(1000, 1800)  # 4 to 7 KB, the size of a 112x112 JPEG
    path.write_text("".join(lines), encoding="ascii")
    return offset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "lfw",
                        help="dataset folder with train.rec and train.idx (default: ../shared/data/lfw)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement; the best is reported (default: 5)")
    parser.add_argument("--index-keys", type=int, default=CASIA_IMAGES,
                        help=f"keys in the generated index (default: {CASIA_IMAGES}, CASIA-WebFace)")
    args = parser.parse_args()

    rec_path, idx_path = args.data / "train.rec", args.data / "train.idx"
    if not rec_path.is_file():
        print(f"error: {rec_path} not found; pass --data with a folder holding train.rec and train.idx", file=sys.stderr)
        return 1
    reader = RecordIOReader(rec_path, idx_path)
    keys = list(reader.keys)
    random.Random(0).shuffle(keys)
    offsets = [reader.offset(key) for key in keys]
    count = len(keys)

    plain_reads(rec_path, offsets)  # warm the page cache so both loops read from memory
    plain_time, ours_time, scan_time = best_of(
        args.repeat,
        lambda: plain_reads(rec_path, offsets),
        lambda: our_reads(reader, keys),
        lambda: our_scan(reader),
    )

    with tempfile.TemporaryDirectory() as folder:
        generated_idx = Path(folder) / "train.idx"
        end = write_generated_index(generated_idx, args.index_keys)
        (parse_time,) = best_of(args.repeat, lambda: parse_index(generated_idx))
        sparse_rec = Path(folder) / "train.rec"
        with open(sparse_rec, "wb") as handle:
            handle.truncate(end)  # a sparse file: only its size matters when opening without validation
        (open_time,) = best_of(args.repeat, lambda: RecordIOReader(sparse_rec, generated_idx, validate=False))

    print(f"data: {args.data} ({count} records, {reader.size / 1e6:.1f} MB), best of {args.repeat} runs")
    print(f"random access, ours:        {count / ours_time:12,.0f} records/s")
    print(f"random access, plain loop:  {count / plain_time:12,.0f} records/s")
    print(f"ratio ours / plain:         {plain_time / ours_time:12.2f}   (target >= 0.8)")
    print(f"sequential scan, ours:      {count / scan_time:12,.0f} records/s")
    print(f"parse index, {args.index_keys:,} keys:  {parse_time:10.3f} s   (target < 1 s)")
    print(f"open reader, {args.index_keys:,} keys:  {open_time:10.3f} s   (parse, key lookup, no validation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
