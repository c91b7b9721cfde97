"""The HTML report (parsed, no browser), the before/after error diff and the visualize stage."""

from __future__ import annotations

import importlib.util
import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from magface_al.report import ModelResult, ScoredPairs, error_diff, write_html_report

REPO_ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.4
pytestmark = pytest.mark.filterwarnings("ignore::magface_al.evaluation.degenerate.UndefinedMetricWarning")


class ReportParser(HTMLParser):
    """Collects image sources, links, scripts, table cells and pair cards of a report page."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.scripts = [], [], []
        self.cells: list[dict] = []
        self.cards: list[dict] = []
        self._cell = None
        self._card_depth = 0
        self._card = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag in ("a", "link") and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "script":
            self.scripts.append(attrs)
        if tag == "td":
            self._cell = {"attrs": attrs, "text": ""}
        if tag == "figure" and "pair" in attrs.get("class", ""):
            self._card = {"attrs": attrs, "text": ""}
        if self._card is not None and tag == "figure":
            self._card_depth += 1

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None
        if tag == "figure" and self._card is not None:
            self._card_depth -= 1
            if self._card_depth == 0:
                self.cards.append(self._card)
                self._card = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._card is not None:
            self._card["text"] += data


def parse_report(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


class ArrayFaces:
    """Plain-colour faces; absent keys raise KeyError, as FaceRecordDataset does."""

    def __init__(self, keys):
        self.images = {int(k): np.full((112, 112, 3), int(k) * 7 % 256, dtype=np.uint8) for k in keys}

    def image(self, key):
        return self.images[key]


def make_scored(score, label, *, key_offset=0, identities=None) -> ScoredPairs:
    count = len(score)
    keys1 = np.arange(count) * 2 + key_offset
    names = identities if identities is not None else [f"person_{k}" for k in keys1]
    rng = np.random.default_rng(len(score))
    return ScoredPairs(
        key1=keys1, key2=keys1 + 1, label=label, identity1=names, identity2=names, score=score,
        magnitude1=rng.uniform(15, 30, count), magnitude2=rng.uniform(15, 30, count), threshold=THRESHOLD,
    )


@pytest.fixture(scope="module")
def two_models():
    rng = np.random.default_rng(3)
    label = np.arange(80) % 2
    before = np.clip(0.4 * label + rng.normal(0.2, 0.2, 80), -1, 1)
    # The fine-tuned scores fix half of the errors, keep the rest and break three correct pairs.
    wrong = np.flatnonzero((before >= THRESHOLD) != (label == 1))
    correct = np.flatnonzero((before >= THRESHOLD) == (label == 1))
    after = before.copy()
    after[wrong[::2]] = np.where(label[wrong[::2]] == 1, 0.7, 0.1)
    after[correct[:3]] = np.where(label[correct[:3]] == 1, 0.2, 0.6)
    metrics_before = {"accuracy": 0.9123456789, "accuracy_std": 0.0123, "auc": 0.95, "eer": None,
                      "eer_reason": "too few pairs", "confusion": {"true_positive": 31}, "num_pairs": 80}
    metrics_after = {"accuracy": 0.95, "accuracy_std": 0.01, "auc": 0.981, "eer": 0.05,
                     "confusion": {"true_positive": 36}, "num_pairs": 80, "tar_at_far_1e-1": 0.875}
    return [
        ModelResult("baseline", make_scored(before, label), metrics_before),
        ModelResult("fine-tuned", make_scored(after, label), metrics_after),
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory, two_models):
    faces = ArrayFaces(np.concatenate([two_models[0].scored.key1, two_models[0].scored.key2]))
    path = write_html_report(tmp_path_factory.mktemp("report") / "html", two_models, faces, gallery_limit=100)
    return path, parse_report(path)


def test_html_report_resources_are_local_files(report):
    path, parsed = report
    assert path.name == "report.html"
    assert len(parsed.images) > 10
    for image in parsed.images:
        source = image["src"]
        assert not source.startswith(("http:", "https:", "//", "/", "data:")), source
        assert (path.parent / source).is_file(), source
    assert all(link.startswith("#") for link in parsed.links)
    assert all("src" not in script for script in parsed.scripts)


def test_html_report_summary_table_shows_metric_values(report, two_models):
    _, parsed = report
    cells = {(c["attrs"].get("data-model"), c["attrs"].get("data-metric")): c for c in parsed.cells}
    checked = 0
    for model in two_models:
        flat = dict(model.metrics)
        flat["confusion.true_positive"] = flat.pop("confusion")["true_positive"]
        for key, value in flat.items():
            if isinstance(value, (int, float)) and not key.endswith("_reason"):
                cell = cells[(model.name, key)]
                assert float(cell["attrs"]["data-value"]) == value
                assert float(cell["text"]) == pytest.approx(value, rel=1e-5)
                checked += 1
    assert checked == 12


def test_html_report_undefined_metric_shows_reason(report):
    _, parsed = report
    cell = next(c for c in parsed.cells if c["attrs"].get("data-metric") == "eer" and c["attrs"].get("data-model") == "baseline")
    assert cell["text"].startswith("n/a")
    assert "too few pairs" in cell["text"]
    missing = next(c for c in parsed.cells
                   if c["attrs"].get("data-metric") == "tar_at_far_1e-1" and c["attrs"].get("data-model") == "baseline")
    assert missing["text"] == "not in file"


def test_html_report_error_galleries_sorted_worst_first(report, two_models):
    _, parsed = report
    scored = two_models[0].scored
    false_positive_rows = np.flatnonzero((scored.label == 0) & (scored.score >= THRESHOLD))
    expected = sorted(false_positive_rows.tolist(), key=lambda row: -abs(scored.score[row] - THRESHOLD))
    baseline_cards = [c for c in parsed.cards if c["attrs"].get("data-section") == "errors-baseline-false_positives"]
    assert [int(c["attrs"]["data-index"]) for c in baseline_cards] == expected
    for card in baseline_cards:
        index = int(card["attrs"]["data-index"])
        assert f"quality {scored.magnitude1[index]:.2f} | {scored.magnitude2[index]:.2f}" in card["text"]


def test_error_diff_fixed_introduced_remaining(two_models):
    before, after = two_models[0].scored, two_models[1].scored
    wrong_before = (before.score >= THRESHOLD) != (before.label == 1)
    wrong_after = (after.score >= THRESHOLD) != (after.label == 1)
    diff = error_diff(before, after)
    assert set(diff.fixed.tolist()) == set(np.flatnonzero(wrong_before & ~wrong_after).tolist())
    assert set(diff.introduced.tolist()) == set(np.flatnonzero(~wrong_before & wrong_after).tolist())
    assert set(diff.remaining.tolist()) == set(np.flatnonzero(wrong_before & wrong_after).tolist())
    assert diff.unmatched == 0
    assert len(diff.fixed) > 0 and len(diff.remaining) > 0


def test_error_diff_matches_pairs_by_keys_not_order(two_models):
    before, after = two_models[0].scored, two_models[1].scored
    order = np.random.default_rng(0).permutation(len(after))
    shuffled = ScoredPairs(
        key1=after.key1[order], key2=after.key2[order], label=after.label[order], identity1=after.identity1[order],
        identity2=after.identity2[order], score=after.score[order], magnitude1=after.magnitude1[order],
        magnitude2=after.magnitude2[order], threshold=after.threshold,
    )
    plain, permuted = error_diff(before, after), error_diff(before, shuffled)
    for name in ("fixed", "introduced", "remaining"):
        assert set(order[getattr(permuted, name)].tolist()) == set(getattr(plain, name).tolist())


def test_html_report_diff_table_counts(report, two_models):
    _, parsed = report
    diff = error_diff(two_models[0].scored, two_models[1].scored)
    counts = {c["attrs"]["data-diff"]: int(c["text"]) for c in parsed.cells if "data-diff" in c["attrs"]}
    assert counts == {"fixed": len(diff.fixed), "introduced": len(diff.introduced), "remaining": len(diff.remaining)}


def test_html_report_unreadable_face_is_placeholder(tmp_path):
    label = np.array([0, 1, 0, 1])
    scored = make_scored(np.array([0.9, 0.1, 0.0, 0.8]), label)
    faces = ArrayFaces([k for k in np.concatenate([scored.key1, scored.key2]) if k != 0])
    path = write_html_report(tmp_path / "html", [ModelResult("baseline", scored, {})], faces)
    parsed = parse_report(path)
    card = next(c for c in parsed.cards if c["attrs"]["data-index"] == "0")
    assert "unreadable: key 0" in card["text"]
    assert any(image["alt"] == "unreadable face 0" for image in parsed.images)
    assert (path.parent / "faces" / "0.jpg").is_file()


def test_html_report_escapes_identity_names(tmp_path):
    names = ["<script>alert(1)</script>", "O'Brien & Sons"]
    scored = make_scored(np.array([0.9, 0.9]), np.array([0, 0]), identities=names)
    path = write_html_report(tmp_path / "html", [ModelResult("baseline", scored, {})], ArrayFaces([0, 1, 2, 3]))
    text = path.read_text(encoding="utf-8")
    assert "<script>alert" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "O&#x27;Brien &amp; Sons" in text


def test_write_html_report_rejects_no_models(tmp_path):
    with pytest.raises(ValueError, match="write_html_report needs at least one model"):
        write_html_report(tmp_path / "html", [], None)


def load_stage():
    spec = importlib.util.spec_from_file_location("visualize_stage", REPO_ROOT / "stages" / "visualize.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve the module's annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_stage_inputs(root: Path, lfw_dir: Path, pair_count: int = 40):
    """Random embeddings for LFW keys, test pairs and metrics files, laid out as the stage expects."""
    from magface_al.data.faces import FaceRecordDataset
    from magface_al.embedding import Embeddings, save_embeddings
    from magface_al.pairs.table import Pairs, write_pairs_csv

    dataset = FaceRecordDataset(lfw_dir)
    keys = dataset.keys[: 2 * pair_count]
    labels = dataset.labels[: 2 * pair_count]
    rng = np.random.default_rng(0)
    for name in ("baseline", "finetuned"):
        features = rng.normal(size=(len(keys), 8)).astype(np.float32)
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        magnitudes = rng.uniform(15, 30, len(keys)).astype(np.float32)
        save_embeddings(root / "features" / name, Embeddings(keys, labels, features, magnitudes))
        (root / "metrics").mkdir(exist_ok=True)
        metrics = {"accuracy": 0.5 + 0.1 * (name == "finetuned"), "operating_threshold": 0.1}
        (root / "metrics" / f"{name}.json").write_text(json.dumps(metrics))
    pairs = Pairs(
        key1=keys[:pair_count], key2=keys[pair_count:], label=np.arange(pair_count) % 2,
        identity1=labels[:pair_count], identity2=labels[pair_count:],
    )
    write_pairs_csv(root / "pairs.csv", pairs)
    (root / "params.yaml").write_text("visualize:\n  samples_per_correct: 2\n  gallery_limit: 10\n")
    return [
        "--data", str(lfw_dir), "--pairs", str(root / "pairs.csv"),
        "--baseline-features", str(root / "features" / "baseline"),
        "--baseline-metrics", str(root / "metrics" / "baseline.json"),
        "--finetuned-features", str(root / "features" / "finetuned"),
        "--finetuned-metrics", str(root / "metrics" / "finetuned.json"),
        "--out", str(root / "reports"), "--plots", str(root / "plots"), "--params", str(root / "params.yaml"),
    ]


def test_visualize_stage_writes_all_outputs(tmp_path, lfw_dir):
    stage = load_stage()
    assert stage.main(write_stage_inputs(tmp_path, lfw_dir)) == 0

    reports = tmp_path / "reports"
    assert sorted(p.name for p in reports.iterdir()) == ["baseline", "finetuned", "html"]
    for model in ("baseline", "finetuned"):
        summary = json.loads((reports / model / "error_summary.json").read_text())
        assert summary["threshold"] == 0.1
        assert summary["pairs"] == 40
        assert len((list((reports / model / "true_positives").iterdir()))) <= 2
        for table in ("roc.csv", "score_histogram.csv", "error_reject.csv"):
            assert (tmp_path / "plots" / model / table).stat().st_size > 0
    page = (reports / "html" / "report.html").read_text()
    assert "Before / after" in page
    # Identity names come from the dataset's manifest.csv.
    first = json.loads((reports / "baseline" / "error_summary.json").read_text())["errors"][0]
    assert isinstance(first["identity1"], str) and not first["identity1"].isdigit()


def test_visualize_stage_missing_threshold_key(tmp_path, lfw_dir):
    stage = load_stage()
    argv = write_stage_inputs(tmp_path, lfw_dir, pair_count=4)
    (tmp_path / "params.yaml").write_text("visualize:\n  threshold_key: calibrated.threshold\n")
    with pytest.raises(ValueError, match=r"baseline.json: no value at key 'calibrated.threshold'; set visualize.threshold_key"):
        stage.main(argv)
