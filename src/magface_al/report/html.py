"""The HTML report: a folder with ``report.html``, its figures and face thumbnails, viewable offline.

Every resource is a relative file inside the report folder, so the folder can
be copied anywhere and opened from disk with no network.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.resources
import logging
import math
import os
import string
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from magface_al.report import plots
from magface_al.report.folders import error_summary
from magface_al.report.images import FaceCache, FaceImageSource, encode_image
from magface_al.report.scored import (
    ERROR_OUTCOMES,
    FALSE_NEGATIVE,
    FALSE_POSITIVE,
    OUTCOMES,
    ScoredPairs,
    error_order,
)
from magface_al.utils import atomic_path

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
FIGURE_DIR = "figures"
FACE_DIR = "faces"
OUTCOME_TITLES = {
    FALSE_POSITIVE: "False positives (different people accepted)",
    FALSE_NEGATIVE: "False negatives (same person rejected)",
}


@dataclasses.dataclass
class ModelResult:
    """One model's scored test pairs and its metrics file contents, under a display name."""

    name: str
    scored: ScoredPairs
    metrics: dict[str, Any]


@dataclasses.dataclass
class ErrorDiff:
    """Rows of pairs (into the *after* model's pairs) whose error status changed or stayed."""

    fixed: np.ndarray
    introduced: np.ndarray
    remaining: np.ndarray
    before_rows: np.ndarray  # row of the same pair in the *before* model's pairs, aligned with the after rows
    unmatched: int


def error_diff(before: ScoredPairs, after: ScoredPairs) -> ErrorDiff:
    """Compare errors of two models on the pairs they share, matched by ``(key1, key2)``.

    Returns:
        Rows (into ``after``) of errors fixed (wrong before, right after),
        introduced (right before, wrong after) and remaining (wrong in
        both), most confidently wrong first, plus the number of pairs of
        ``after`` that ``before`` does not contain.
    """
    before_row = {(int(a), int(b)): row for row, (a, b) in enumerate(zip(before.key1, before.key2))}
    after_rows, before_rows = [], []
    for row, (a, b) in enumerate(zip(after.key1, after.key2)):
        match = before_row.get((int(a), int(b)))
        if match is not None:
            after_rows.append(row)
            before_rows.append(match)
    after_rows_arr = np.asarray(after_rows, dtype=np.int64)
    before_rows_arr = np.asarray(before_rows, dtype=np.int64)
    wrong_before = np.zeros(len(after), dtype=bool)
    wrong_before[after_rows_arr] = before.predicted[before_rows_arr] != before.label[before_rows_arr]
    matched = np.zeros(len(after), dtype=bool)
    matched[after_rows_arr] = True
    wrong_after = after.predicted != after.label

    before_of = np.full(len(after), -1, dtype=np.int64)
    before_of[after_rows_arr] = before_rows_arr
    fixed = np.flatnonzero(matched & wrong_before & ~wrong_after)
    introduced = np.flatnonzero(matched & ~wrong_before & wrong_after)
    remaining = np.flatnonzero(matched & wrong_before & wrong_after)
    return ErrorDiff(
        fixed=fixed[np.argsort(-np.abs(before.margin[before_of[fixed]]), kind="stable")],
        introduced=error_order(after, introduced),
        remaining=error_order(after, remaining),
        before_rows=before_of,
        unmatched=int(np.sum(~matched)),
    )


# ---------------------------------------------------------------- formatting


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def format_number(value: Any) -> str:
    """Format a metric for display: integers as they are, floats with 6 significant digits."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return "n/a"
        return f"{float(value):.6g}"
    return str(value)


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys (``{"a": {"b": 1}}`` becomes ``{"a.b": 1}``)."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


_MISSING = object()  # a metric absent from one model's file, unlike a recorded None


def _value_cell(model: str, metric: str, value: Any, reason: Any, *, kind: str = "metric") -> str:
    # data-* attributes let tests and scripts find a value without parsing the layout.
    attributes = f'data-model="{_escape(model)}" data-{kind}="{_escape(metric)}"'
    if value is _MISSING:
        return f"<td {attributes}>not in file</td>"
    if value is None:
        note = f'<span class="reason">{_escape(reason)}</span>' if reason else ""
        return f"<td {attributes}>n/a{note}</td>"
    if _is_number(value):
        return f'<td {attributes} data-value="{_escape(repr(float(value)))}">{format_number(value)}</td>'
    if isinstance(value, list):
        if len(value) <= 10 and all(_is_number(v) for v in value):
            text = ", ".join(format_number(v) for v in value)
        else:
            text = f"{len(value)} values"
        return f"<td {attributes}>{_escape(text)}</td>"
    return f"<td {attributes}>{_escape(value)}</td>"


def _metric_names(flat_metrics: Sequence[dict[str, Any]]) -> list[str]:
    """List metric keys in order of first appearance, leaving out ``*_reason`` keys of a listed metric."""
    names: list[str] = []
    for flat in flat_metrics:
        for key in flat:
            if key not in names:
                names.append(key)
    return [n for n in names if not (n.endswith("_reason") and n[: -len("_reason")] in names)]


def _metric_row(models: Sequence[ModelResult], flat: Sequence[dict[str, Any]], name: str, show_change: bool) -> str:
    cells = "".join(
        _value_cell(model.name, name, values.get(name, _MISSING), values.get(f"{name}_reason"))
        for model, values in zip(models, flat)
    )
    if show_change:
        first, last = flat[0].get(name), flat[-1].get(name)
        change = ""
        if _is_number(first) and _is_number(last):
            difference = float(last) - float(first)
            # Differences at float rounding level (e.g. 1e-18 between equal rates) read as 0.
            scale = max(abs(float(first)), abs(float(last)), 1.0)
            change = "0" if abs(difference) < 1e-12 * scale else format_number(difference)
        if change and not change.startswith("-") and change != "0":
            change = "+" + change
        cells += f"<td>{_escape(change)}</td>"
    return f'<tr><td class="name">{_escape(name)}</td>{cells}</tr>'


def summary_table(models: Sequence[ModelResult]) -> str:
    """Render the metrics of all models side by side, with the change from the first to the last model.

    Metrics whose value is a list (per-fold values) go into a second,
    collapsed table, so the main table stays one screen of scalars.
    """
    flat = [flatten_metrics(model.metrics) for model in models]
    header = "".join(f"<th>{_escape(model.name)}</th>" for model in models)
    show_change = len(models) >= 2
    if show_change:
        header += f"<th>change ({_escape(models[-1].name)} &minus; {_escape(models[0].name)})</th>"
    head = f'<thead><tr><th class="name">metric</th>{header}</tr></thead>'

    names = _metric_names(flat)
    listed = [n for n in names if any(isinstance(values.get(n), list) for values in flat)]
    scalars = [n for n in names if n not in listed]
    html_text = (
        f'<table id="metrics-table">{head}<tbody>'
        f"{''.join(_metric_row(models, flat, n, show_change) for n in scalars)}</tbody></table>"
    )
    if listed:
        html_text += (
            f"<details><summary>{len(listed)} metrics with several values (per fold)</summary>"
            f'<table id="metrics-lists">{head}<tbody>'
            f"{''.join(_metric_row(models, flat, n, False) for n in listed)}</tbody></table></details>"
        )
    return html_text


def decisions_table(models: Sequence[ModelResult], summaries: Sequence[dict[str, Any]]) -> str:
    """Render the counts and rates at each model's threshold, computed from the scored pairs."""
    header = "".join(f"<th>{_escape(model.name)}</th>" for model in models)
    fields = [("threshold", lambda s: s["threshold"]), ("pairs", lambda s: s["pairs"])]
    fields += [(name.replace("_", " "), lambda s, n=name: s["counts"][n]) for name in OUTCOMES]
    fields += [(name, lambda s, n=name: s[n]) for name in ("accuracy", "precision", "recall")]
    fields += [("unreadable faces drawn", lambda s: len(s["unreadable_keys"]))]
    rows = []
    for label, getter in fields:
        cells = "".join(
            _value_cell(model.name, label, getter(summary), None, kind="decision")
            for model, summary in zip(models, summaries)
        )
        rows.append(f'<tr><td class="name">{_escape(label)}</td>{cells}</tr>')
    return (
        '<table id="decisions-table">'
        f'<thead><tr><th class="name">at the threshold</th>{header}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


# ---------------------------------------------------------------- galleries


def _face_img(key: int, cache: FaceCache) -> str:
    key = int(key)
    alt = f"face {key}" if cache.is_readable(key) else f"unreadable face {key}"
    return f'<img src="{FACE_DIR}/{key}.jpg" alt="{_escape(alt)}" width="112" height="112" loading="eager">'


def _label_name(label: int) -> str:
    return "same" if int(label) == 1 else "different"


def pair_card(
    scored: ScoredPairs,
    row: int,
    outcome: str,
    cache: FaceCache,
    *,
    section: str,
    before: tuple[str, ScoredPairs, int] | None = None,
) -> str:
    """Render one pair as a card with both faces, its score, distance from the threshold and quality.

    ``section`` names the gallery the card belongs to; ``before`` adds the
    score of the same pair under an earlier model (name, its pairs, its row).
    """
    record = scored.pair_record(row)
    unreadable = [key for key in (record["key1"], record["key2"]) if not cache.is_readable(key)]
    lines = [
        f"<b>#{record['index']:05d}</b> similarity <b>{record['score']:.4f}</b>",
        f"threshold {record['threshold']:.4f}, off by {abs(record['margin']):.4f}",
        f"quality {record['magnitude1']:.2f} | {record['magnitude2']:.2f} (pair {record['pair_quality']:.2f})",
        f'<span class="identity">{_escape(record["identity1"])}</span> vs '
        f'<span class="identity">{_escape(record["identity2"])}</span>',
        f"true: {_label_name(record['label'])}, predicted: {_label_name(record['predicted'])}",
    ]
    if before is not None:
        name, before_scored, before_row = before
        lines.append(
            f"{_escape(name)}: {before_scored.score[before_row]:.4f} "
            f"(threshold {before_scored.threshold:.4f})"
        )
    if unreadable:
        lines.append(f'<span class="unreadable">unreadable: key {", ".join(map(str, unreadable))}</span>')
    faces = _face_img(record["key1"], cache) + _face_img(record["key2"], cache)
    return (
        f'<figure class="pair {outcome}" data-index="{record["index"]}" data-section="{_escape(section)}">'
        f'<div class="faces">{faces}</div><figcaption>{"<br>".join(lines)}</figcaption></figure>'
    )


def _gallery(cards: list[str], total: int, limit: int) -> str:
    shown = min(total, limit)
    note = f"showing {shown} of {total}" if total > shown else f"{total} pair{'s' if total != 1 else ''}"
    if total == 0:
        return '<p class="note">none</p>'
    return f'<p class="note">{note}</p><div class="gallery">{"".join(cards)}</div>'


def error_gallery(model: ModelResult, outcome: str, cache: FaceCache, limit: int) -> str:
    """Render one model's false positives or false negatives, most confidently wrong first."""
    scored = model.scored
    rows = error_order(scored, np.flatnonzero(scored.outcomes() == outcome))
    section = f"errors-{model.name}-{outcome}"
    cards = [pair_card(scored, row, outcome, cache, section=section) for row in rows[:limit]]
    return _gallery(cards, len(rows), limit)


def diff_section(before: ModelResult, after: ModelResult, cache: FaceCache, limit: int) -> str:
    """Render which errors fine-tuning fixed, introduced and left, with counts and galleries."""
    diff = error_diff(before.scored, after.scored)
    outcomes = after.scored.outcomes()
    before_outcomes = before.scored.outcomes()
    parts = [
        '<table id="diff-table"><thead><tr><th class="name">errors</th><th>pairs</th></tr></thead><tbody>',
        f'<tr><td class="name">fixed</td><td data-diff="fixed">{len(diff.fixed)}</td></tr>',
        f'<tr><td class="name">introduced</td><td data-diff="introduced">{len(diff.introduced)}</td></tr>',
        f'<tr><td class="name">remaining</td><td data-diff="remaining">{len(diff.remaining)}</td></tr>',
        "</tbody></table>",
    ]
    if diff.unmatched:
        parts.append(f'<p class="note">{diff.unmatched} pairs of {_escape(after.name)} have no match in '
                     f'{_escape(before.name)} and are left out of the comparison.</p>')
    sections = (
        ("fixed", f"Fixed: wrong with {before.name}, right with {after.name}", diff.fixed),
        ("introduced", f"Introduced: right with {before.name}, wrong with {after.name}", diff.introduced),
        ("remaining", "Remaining: wrong with both", diff.remaining),
    )
    for slug, title, rows in sections:
        cards = []
        for row in rows[:limit]:
            before_row = int(diff.before_rows[row])
            outcome = outcomes[row] if outcomes[row] in ERROR_OUTCOMES else before_outcomes[before_row]
            cards.append(pair_card(
                after.scored, row, outcome, cache, section=f"diff-{slug}", before=(before.name, before.scored, before_row)
            ))
        parts.append(f'<h3 id="diff-{slug}">{_escape(title)}</h3>')
        parts.append(_gallery(cards, len(rows), limit))
    return "".join(parts)


# ---------------------------------------------------------------- assembly


def _figure_tag(file_name: str, alt: str) -> str:
    return f'<img src="{FIGURE_DIR}/{file_name}" alt="{_escape(alt)}">'


def _write_figures(folder: Path, models: Sequence[ModelResult]) -> str:
    scored = {model.name: model.scored for model in models}
    figures = {
        "roc.svg": ("ROC curves", plots.plot_roc(scored)),
        "score_histograms.svg": ("score histograms", plots.plot_score_histograms(scored)),
        "error_reject.svg": ("error versus reject", plots.plot_error_reject(scored)),
    }
    folder.mkdir()
    tags = []
    for file_name, (alt, figure) in figures.items():
        plots.save_figure(figure, folder / file_name)
        tags.append(_figure_tag(file_name, alt))
    return f'<div class="figures">{"".join(tags)}</div>'


def _shown_keys(models: Sequence[ModelResult], limit: int) -> Iterable[int]:
    """Yield every face key a gallery may show (duplicates included)."""
    for model in models:
        scored = model.scored
        wrong = np.flatnonzero(scored.predicted != scored.label)
        yield from scored.key1[wrong].tolist()
        yield from scored.key2[wrong].tolist()
    if len(models) >= 2:
        # Fixed errors are right in the last model, so its wrong rows above miss them.
        diff = error_diff(models[0].scored, models[-1].scored)
        rows = diff.fixed[:limit]
        yield from models[-1].scored.key1[rows].tolist()
        yield from models[-1].scored.key2[rows].tolist()


def _write_faces(folder: Path, keys: Iterable[int], cache: FaceCache) -> None:
    folder.mkdir()
    for key in sorted(set(int(k) for k in keys)):
        (folder / f"{key}.jpg").write_bytes(encode_image(cache.get(key), ".jpg", jpeg_quality=92))


def _render_page(title: str, body: str) -> str:
    template_text = (importlib.resources.files("magface_al.report") / "templates" / "report.html").read_text(
        encoding="utf-8"
    )
    return string.Template(template_text).substitute(title=_escape(title), body=body)


def write_html_report(
    out_dir: str | os.PathLike,
    models: Sequence[ModelResult],
    source: FaceImageSource | FaceCache | None,
    *,
    gallery_limit: int = 48,
    title: str = "Face verification report",
    notes: Sequence[str] = (),
) -> Path:
    """Write the report folder (``report.html``, ``figures/``, ``faces/``) atomically.

    Args:
        out_dir: folder to create; an older one is replaced.
        models: the models to compare, first the baseline, last the fine-tuned
            one. The before/after section compares the first with the last.
        source: where face images come from; unreadable faces are shown as
            placeholders naming their key.
        gallery_limit: most pairs shown per gallery.
        title: page title.
        notes: lines shown under the title (for example the model and pairs files).

    Returns:
        Path of ``report.html`` inside ``out_dir``.
    """
    if not models:
        raise ValueError("write_html_report needs at least one model; pass the baseline and the fine-tuned results")
    if gallery_limit < 1:
        raise ValueError(f"invalid gallery_limit {gallery_limit}: expected 1 or more")
    cache = source if isinstance(source, FaceCache) else FaceCache(source)

    with atomic_path(out_dir, is_dir=True) as tmp:
        figures_html = _write_figures(tmp / FIGURE_DIR, models)
        _write_faces(tmp / FACE_DIR, _shown_keys(models, gallery_limit), cache)
        summaries = [error_summary(model.scored, unreadable_keys=_unreadable_of(model.scored, cache)) for model in models]

        body = [f"<h1>{_escape(title)}</h1>"]
        body += [f'<p class="lead">{_escape(note)}</p>' for note in notes]
        body.append('<nav><a href="#summary">summary</a>')
        if len(models) >= 2:
            body.append('<a href="#diff">before / after</a>')
        body.append('<a href="#curves">curves</a>')
        body += [f'<a href="#errors-{i}">{_escape(model.name)} errors</a>' for i, model in enumerate(models)]
        body.append("</nav>")

        body.append('<h2 id="summary">Summary</h2><p class="note">Values from the metrics files.</p>')
        body.append(summary_table(models))
        body.append("<h3>Decisions at each model's threshold</h3>")
        body.append(decisions_table(models, summaries))

        if len(models) >= 2:
            body.append(f'<h2 id="diff">Before / after: {_escape(models[0].name)} &rarr; {_escape(models[-1].name)}</h2>')
            body.append(diff_section(models[0], models[-1], cache, gallery_limit))

        body.append('<h2 id="curves">Curves</h2>')
        body.append(figures_html)

        for number, model in enumerate(models):
            body.append(f'<h2 id="errors-{number}">Errors of {_escape(model.name)}</h2>')
            body.append('<p class="note">Sorted by distance of the score from the threshold, largest first; '
                        "quality is the face's embedding magnitude.</p>")
            for outcome in ERROR_OUTCOMES:
                body.append(f"<h3>{_escape(OUTCOME_TITLES[outcome])}</h3>")
                body.append(error_gallery(model, outcome, cache, gallery_limit))

        (tmp / REPORT_FILE).write_text(_render_page(title, "\n".join(body)), encoding="utf-8")

    logger.info("wrote %s", Path(out_dir) / REPORT_FILE)
    return Path(out_dir) / REPORT_FILE


def _unreadable_of(scored: ScoredPairs, cache: FaceCache) -> set[int]:
    keys = set(scored.key1.tolist()) | set(scored.key2.tolist())
    return keys & cache.unreadable
