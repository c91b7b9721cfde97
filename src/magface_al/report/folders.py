"""Error folders: one folder per wrongly (and a sample of correctly) classified pair, plus error_summary.json.

Layout of the output folder::

    error_summary.json
    false_positives/<index>_sim_<score>/{image1.jpg, image2.jpg, comparison.jpg, info.txt}
    false_negatives/...
    true_positives/...   (a sample)
    true_negatives/...   (a sample)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from magface_al.report.images import FaceCache, FaceImageSource, comparison_image, encode_image
from magface_al.report.scored import (
    ERROR_OUTCOMES,
    FALSE_NEGATIVE,
    FALSE_POSITIVE,
    OUTCOMES,
    TRUE_NEGATIVE,
    TRUE_POSITIVE,
    ScoredPairs,
    error_order,
)
from magface_al.utils import atomic_path, to_strict_json

logger = logging.getLogger(__name__)

SUMMARY_FILE = "error_summary.json"
INFO_FILE = "info.txt"


def pair_folder_name(index: int, score: float) -> str:
    """Name a pair's folder by its index in the pairs file and its similarity, e.g. ``00042_sim_0.3127``."""
    return f"{int(index):05d}_sim_{float(score):.4f}"


def sample_rows(rows: np.ndarray, count: int, *, seed: int) -> np.ndarray:
    """Pick ``count`` of ``rows`` at random (all of them when fewer), returned in ascending order."""
    rows = np.asarray(rows, dtype=np.int64)
    if count < 0:
        raise ValueError(f"invalid sample count {count}: expected 0 or more")
    if len(rows) <= count:
        return rows
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size=count, replace=False))


def _ratio(numerator: int, denominator: int, name: str, reason: str) -> dict[str, Any]:
    if denominator == 0:
        return {name: None, f"{name}_reason": reason}
    return {name: numerator / denominator}


def error_summary(scored: ScoredPairs, *, folders: dict[int, str] | None = None,
                  unreadable_keys: set[int] | None = None) -> dict[str, Any]:
    """Summarise one model's decisions at its threshold as a strict-JSON-ready mapping.

    Args:
        scored: the scored pairs.
        folders: folder (relative to the summary) written for each pair row, if any.
        unreadable_keys: image keys that were drawn as placeholders.

    Returns:
        ``threshold``, ``pairs``, ``counts`` per outcome, ``accuracy``,
        ``precision`` and ``recall`` (None plus a ``*_reason`` when undefined),
        ``unreadable_keys`` and ``errors``: every false positive and false
        negative, most confidently wrong first.
    """
    outcomes = scored.outcomes()
    counts = {name: int(np.sum(outcomes == name)) for name in OUTCOMES}
    true_pos, false_pos, false_neg = counts[TRUE_POSITIVE], counts[FALSE_POSITIVE], counts[FALSE_NEGATIVE]
    correct = counts[TRUE_POSITIVE] + counts[TRUE_NEGATIVE]

    summary: dict[str, Any] = {"threshold": scored.threshold, "pairs": len(scored), "counts": counts}
    summary.update(_ratio(correct, len(scored), "accuracy", "no pairs"))
    summary.update(_ratio(true_pos, true_pos + false_pos, "precision", "no pair was predicted same"))
    summary.update(_ratio(true_pos, true_pos + false_neg, "recall", "no same-person pairs"))
    summary["unreadable_keys"] = sorted(int(key) for key in (unreadable_keys or ()))

    error_rows = error_order(scored, np.flatnonzero(np.isin(outcomes, ERROR_OUTCOMES)))
    errors = []
    for row in error_rows:
        record = {"outcome": outcomes[row], **scored.pair_record(row)}
        record["folder"] = (folders or {}).get(int(row))
        errors.append(record)
    summary["errors"] = errors
    return summary


def _info_text(record: dict[str, Any], outcome: str, cache: FaceCache) -> str:
    lines = [f"outcome: {outcome}"]
    for name, value in record.items():
        if isinstance(value, float):
            value = f"{value:.6f}"
        lines.append(f"{name}: {value}")
    for slot in ("1", "2"):
        key = record[f"key{slot}"]
        if not cache.is_readable(key):
            lines.append(f"image{slot}: unreadable, drawn as a placeholder")
    return "\n".join(lines) + "\n"


def _write_pair_folder(folder: Path, record: dict[str, Any], outcome: str, cache: FaceCache) -> None:
    folder.mkdir(parents=True)
    face1 = cache.get(record["key1"])
    face2 = cache.get(record["key2"])
    (folder / "image1.jpg").write_bytes(encode_image(face1, ".jpg", jpeg_quality=95))
    (folder / "image2.jpg").write_bytes(encode_image(face2, ".jpg", jpeg_quality=95))
    (folder / "comparison.jpg").write_bytes(encode_image(comparison_image(face1, face2, record)))
    (folder / INFO_FILE).write_text(_info_text(record, outcome, cache), encoding="utf-8")


def _rows_to_write(scored: ScoredPairs, outcomes: np.ndarray, *, samples_per_correct: int,
                   max_error_folders: int | None, seed: int) -> dict[str, np.ndarray]:
    selected = {}
    for offset, name in enumerate(OUTCOMES):
        rows = np.flatnonzero(outcomes == name)
        if name in ERROR_OUTCOMES:
            rows = error_order(scored, rows)
            if max_error_folders is not None:
                rows = rows[:max_error_folders]
        else:
            # A different stream per outcome, so adding pairs of one kind does
            # not reshuffle the sample of the other.
            rows = sample_rows(rows, samples_per_correct, seed=seed + offset)
        selected[name] = rows
    return selected


def write_error_folders(
    out_dir: str | os.PathLike,
    scored: ScoredPairs,
    source: FaceImageSource | FaceCache | None,
    *,
    samples_per_correct: int = 20,
    max_error_folders: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the error folders and ``error_summary.json`` for one model, atomically.

    The whole ``out_dir`` is built under a temporary name and renamed into
    place, replacing an older one.

    Args:
        out_dir: folder to create.
        scored: pairs with this model's scores, magnitudes and threshold.
        source: where face images come from (``FaceRecordDataset`` or a
            :class:`FaceCache` shared with the HTML report). An unreadable
            face becomes a placeholder naming its key.
        samples_per_correct: how many true positives and how many true
            negatives get a folder (a seeded random sample).
        max_error_folders: limit on folders per error outcome, most
            confidently wrong first; None writes one for every error.
            ``error_summary.json`` lists every error either way.
        seed: seed of the sample of correct pairs.

    Returns:
        The summary written to ``error_summary.json``.
    """
    if max_error_folders is not None and max_error_folders < 0:
        raise ValueError(f"invalid max_error_folders {max_error_folders}: expected None (all) or 0 or more")
    cache = source if isinstance(source, FaceCache) else FaceCache(source)
    outcomes = scored.outcomes()
    selected = _rows_to_write(
        scored, outcomes, samples_per_correct=samples_per_correct, max_error_folders=max_error_folders, seed=seed
    )

    with atomic_path(out_dir, is_dir=True) as tmp:
        folders: dict[int, str] = {}
        for name in OUTCOMES:
            (tmp / name).mkdir()
            for row in selected[name]:
                relative = f"{name}/{pair_folder_name(scored.index[row], scored.score[row])}"
                _write_pair_folder(tmp / relative, scored.pair_record(row), name, cache)
                folders[int(row)] = relative
        summary = error_summary(scored, folders=folders, unreadable_keys=cache.unreadable)
        summary["samples"] = {
            name: [int(scored.index[row]) for row in selected[name]] for name in (TRUE_POSITIVE, TRUE_NEGATIVE)
        }
        text = json.dumps(to_strict_json(summary), indent=2, allow_nan=False)
        (tmp / SUMMARY_FILE).write_text(text + "\n", encoding="utf-8")

    logger.info(
        "wrote %s: %d false positives, %d false negatives, %d unreadable faces",
        out_dir, summary["counts"][FALSE_POSITIVE], summary["counts"][FALSE_NEGATIVE], len(cache.unreadable),
    )
    return summary
