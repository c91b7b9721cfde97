"""Curves for the report: ROC, score histograms and error-versus-reject, as data tables and figures.

The tables are written as CSV files that DVC declares as plots; the figures
(matplotlib, no pyplot state) go into the HTML report.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from typing import Any, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from magface_al.evaluation.quality import error_versus_reject
from magface_al.evaluation.verification import roc_auc, roc_points, score_histogram
from magface_al.report.scored import ScoredPairs
from magface_al.utils import atomic_path, write_text_atomic

logger = logging.getLogger(__name__)

HISTOGRAM_BINS = 100  # on [-1, 1], so each bin is 0.02 wide in cosine units
ERC_FMR = 1e-3  # MagFace reports the error-versus-reject curve as FNMR at this false match rate
MODEL_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def roc_table(scored: ScoredPairs) -> list[dict[str, float]]:
    """Return the ROC curve as rows of ``fpr``, ``tpr`` and ``threshold``; empty (with a warning) when undefined."""
    points = roc_points(scored.score, scored.label)
    return [
        {"fpr": float(f), "tpr": float(t), "threshold": float(th)}
        for f, t, th in zip(points["fpr"], points["tpr"], points["threshold"])
    ]


def histogram_table(scored: ScoredPairs, *, bins: int = HISTOGRAM_BINS) -> list[dict[str, float]]:
    """Count same-person and different-people scores in fixed bins on [-1, 1].

    Each row holds the bin centre ``score`` and the ``same_person`` and
    ``different_person`` counts. Fixed edges make the tables of two revisions
    line up in ``dvc plots diff``.
    """
    counts = score_histogram(scored.score, scored.label, bins=bins)
    return [
        {"score": round(float(c), 6), "same_person": int(s), "different_person": int(d)}
        for c, s, d in zip(counts["score"], counts["same_person"], counts["different_person"])
    ]


def error_reject_table(scored: ScoredPairs, *, fmr: float = ERC_FMR) -> list[dict[str, Any]]:
    """Return the error-versus-reject curve as rows, dropping the lowest-quality pairs first.

    Pair quality is the smaller magnitude of the two faces. Each row holds
    ``reject_fraction``, ``kept`` (pairs), ``error_rate`` (at the model's
    threshold) and ``fnmr`` at the threshold where all pairs have false match
    rate ``fmr``; ``fnmr`` is None where it cannot be measured (fewer than
    ``1 / fmr`` different-people pairs).
    """
    curve = error_versus_reject(
        scored.score, scored.label, scored.pair_quality, fmr=fmr, accuracy_threshold=scored.threshold
    )
    rows = []
    for row in curve.rows():
        accuracy = row.pop("accuracy")
        row["error_rate"] = None if math.isnan(accuracy) else 1.0 - accuracy
        row["fnmr"] = None if math.isnan(row["fnmr"]) else row["fnmr"]
        rows.append(row)
    return rows


def table_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    """Format rows of equal keys as CSV text; None becomes an empty cell."""
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


def write_plot_tables(out_dir: str | os.PathLike, scored: ScoredPairs, *, fmr: float = ERC_FMR) -> dict[str, str]:
    """Write ``roc.csv``, ``score_histogram.csv`` and ``error_reject.csv`` for one model into ``out_dir``.

    ``fmr`` fixes the threshold of the error-versus-reject curve's FNMR column.

    Returns:
        The file names written, keyed by curve.
    """
    tables = {
        "roc": ("roc.csv", roc_table(scored)),
        "score_histogram": ("score_histogram.csv", histogram_table(scored)),
        "error_reject": ("error_reject.csv", error_reject_table(scored, fmr=fmr)),
    }
    os.makedirs(out_dir, exist_ok=True)
    for file_name, rows in tables.values():
        write_text_atomic(os.path.join(out_dir, file_name), table_to_csv(rows))
    return {name: file_name for name, (file_name, _) in tables.items()}


def plot_roc(models: dict[str, ScoredPairs]) -> Figure:
    """Draw the ROC curves of all models on one axes, false positive rate on a log scale."""
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.subplots()
    lowest = 1.0
    for color, (name, scored) in zip(MODEL_COLORS, models.items()):
        rows = roc_table(scored)
        if not rows:
            continue
        fpr = np.array([row["fpr"] for row in rows])
        tpr = np.array([row["tpr"] for row in rows])
        visible = fpr > 0  # a log axis cannot show fpr = 0
        lowest = min(lowest, fpr[visible].min()) if visible.any() else lowest
        axes.plot(fpr[visible], tpr[visible], color=color, label=f"{name} (AUC {roc_auc(scored.score, scored.label):.4f})")
        operating = scored.predicted == 1
        op_fpr = np.mean(operating[scored.label == 0])
        op_tpr = np.mean(operating[scored.label == 1])
        if op_fpr > 0:
            axes.plot([op_fpr], [op_tpr], "o", color=color, markersize=6)
    axes.set_xscale("log")
    axes.set_xlim(lowest / 2, 1.0)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title("ROC (dots: each model's threshold)")
    axes.grid(True, which="both", alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right")
    else:
        axes.text(0.5, 0.5, "undefined: the pairs hold one class only", ha="center", transform=axes.transAxes)
    return figure


def plot_score_histograms(models: dict[str, ScoredPairs]) -> Figure:
    """Draw one panel per model with the same-person and different-people score histograms and the threshold."""
    figure = Figure(figsize=(6.4, 2.6 * max(1, len(models))), layout="constrained")
    axes_list = np.atleast_1d(figure.subplots(len(models), 1, sharex=True, squeeze=False)[:, 0])
    for axes, (name, scored) in zip(axes_list, models.items()):
        rows = histogram_table(scored)
        centres = np.array([row["score"] for row in rows])
        same = np.array([row["same_person"] for row in rows])
        different = np.array([row["different_person"] for row in rows])
        width = 2.0 / HISTOGRAM_BINS
        axes.bar(centres, different, width=width, color="#d62728", alpha=0.55, label="different people")
        axes.bar(centres, same, width=width, color="#1f77b4", alpha=0.55, label="same person")
        axes.axvline(scored.threshold, color="black", linestyle="--", label=f"threshold {scored.threshold:.4f}")
        axes.set_title(name)
        axes.set_ylabel("pairs")
        axes.legend(loc="upper left", fontsize="small")
    axes_list[-1].set_xlabel("cosine similarity")
    return figure


def plot_error_reject(models: dict[str, ScoredPairs]) -> Figure:
    """Draw the error-versus-reject curves: error rate at the threshold, and FNMR where measurable."""
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.subplots()
    for color, (name, scored) in zip(MODEL_COLORS, models.items()):
        rows = error_reject_table(scored)
        fractions = [row["reject_fraction"] for row in rows]
        axes.plot(fractions, [row["error_rate"] for row in rows], "o-", color=color, label=f"{name}: error rate")
        fnmr = [(row["reject_fraction"], row["fnmr"]) for row in rows if row["fnmr"] is not None]
        if fnmr:
            axes.plot(*zip(*fnmr), "s--", color=color, label=f"{name}: FNMR at FMR {ERC_FMR:g}")
    axes.set_xlabel("fraction of lowest-quality pairs rejected")
    axes.set_ylabel("error")
    axes.set_title("Error versus reject (pair quality = smaller magnitude)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> None:
    """Save ``figure`` as PNG or SVG (by suffix), atomically and byte-reproducibly."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in (".png", ".svg"):
        raise ValueError(f"cannot save a figure as {path}; use a .png or .svg file name")
    file_format = suffix[1:]
    # A date in the metadata and random SVG ids would change the file on every run.
    metadata = {"Date": None} if file_format == "svg" else {"Software": None}
    with matplotlib.rc_context({"svg.hashsalt": "magface-al", "svg.fonttype": "path"}):
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format=file_format, metadata=metadata, dpi=110)
