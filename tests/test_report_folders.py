"""Error folders, error_summary.json, comparison images and plot tables of the report package."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_score, recall_score

from magface_al.evaluation.degenerate import UndefinedMetricWarning
from magface_al.report import ScoredPairs, comparison_image, error_summary, placeholder_image, write_error_folders
from magface_al.report.plots import error_reject_table, histogram_table, roc_table, table_to_csv, write_plot_tables

THRESHOLD = 0.4
MISSING_KEY = 999


class ArrayFaces:
    """Smooth synthetic faces held in memory; an absent key raises KeyError, as FaceRecordDataset does."""

    def __init__(self, keys):
        ramp = np.linspace(0, 120, 112)[None, :, None]
        self.images = {}
        for key in keys:
            colour = np.array([key * 37 % 120, key * 53 % 120, key * 71 % 120])[None, None, :]
            self.images[int(key)] = np.broadcast_to(ramp + colour, (112, 112, 3)).astype(np.uint8)

    def image(self, key):
        return self.images[key]


def make_scored(count=60, seed=1, missing_key=None) -> ScoredPairs:
    rng = np.random.default_rng(seed)
    label = np.arange(count) % 2
    score = np.clip(0.45 * label + rng.normal(0.2, 0.18, count), -1, 1)
    key1 = np.arange(count) * 2
    key2 = np.arange(count) * 2 + 1
    if missing_key is not None:
        key1[0] = missing_key
    return ScoredPairs(
        key1=key1,
        key2=key2,
        label=label,
        identity1=np.array([f"person_{k}" for k in key1]),
        identity2=np.array([f"person_{k if l else k + 1000}" for k, l in zip(key1, label)]),
        score=score,
        magnitude1=rng.uniform(10, 30, count),
        magnitude2=rng.uniform(10, 30, count),
        threshold=THRESHOLD,
    )


@pytest.fixture()
def scored() -> ScoredPairs:
    return make_scored()


@pytest.fixture()
def faces(scored) -> ArrayFaces:
    return ArrayFaces(np.concatenate([scored.key1, scored.key2]))


def expected_outcome_rows(scored: ScoredPairs) -> dict[str, set[int]]:
    same = scored.label == 1
    accepted = scored.score >= THRESHOLD
    return {
        "true_positives": set(np.flatnonzero(same & accepted).tolist()),
        "true_negatives": set(np.flatnonzero(~same & ~accepted).tolist()),
        "false_positives": set(np.flatnonzero(~same & accepted).tolist()),
        "false_negatives": set(np.flatnonzero(same & ~accepted).tolist()),
    }


def test_write_error_folders_layout(tmp_path, scored, faces):
    out = tmp_path / "baseline"
    write_error_folders(out, scored, faces, samples_per_correct=5, seed=0)
    expected = expected_outcome_rows(scored)
    assert expected["false_positives"] and expected["false_negatives"], "fixture must contain both error kinds"

    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["error_summary.json", "false_negatives", "false_positives", "true_negatives", "true_positives"]
    )
    for outcome in ("false_positives", "false_negatives"):
        names = sorted(p.name for p in (out / outcome).iterdir())
        wanted = sorted(f"{row:05d}_sim_{scored.score[row]:.4f}" for row in expected[outcome])
        assert names == wanted
    for outcome in ("true_positives", "true_negatives"):
        folders = list((out / outcome).iterdir())
        assert len(folders) == 5
        rows = {int(p.name.split("_")[0]) for p in folders}
        assert rows <= expected[outcome]


def test_write_error_folders_pair_contents(tmp_path, scored, faces):
    out = tmp_path / "baseline"
    write_error_folders(out, scored, faces)
    row = min(expected_outcome_rows(scored)["false_negatives"])
    folder = out / "false_negatives" / f"{row:05d}_sim_{scored.score[row]:.4f}"
    assert sorted(p.name for p in folder.iterdir()) == ["comparison.jpg", "image1.jpg", "image2.jpg", "info.txt"]

    image1 = cv2.imread(str(folder / "image1.jpg"))
    original = faces.images[int(scored.key1[row])].astype(np.float64)
    # JPEG is lossy: close, not exact.
    assert np.mean(np.abs(image1.astype(np.float64) - original)) < 3
    comparison = cv2.imread(str(folder / "comparison.jpg"))
    assert comparison.shape[1] > 2 * 112
    assert comparison.shape[0] > 224

    info = (folder / "info.txt").read_text()
    assert "outcome: false_negatives" in info
    assert f"key1: {scored.key1[row]}" in info
    assert f"score: {scored.score[row]:.6f}" in info
    assert "predicted: 0" in info


def test_error_summary_json_counts_and_rates(tmp_path, scored, faces):
    write_error_folders(tmp_path / "out", scored, faces)
    summary = json.loads((tmp_path / "out" / "error_summary.json").read_text())
    predicted = (scored.score >= THRESHOLD).astype(int)
    expected = expected_outcome_rows(scored)

    assert summary["threshold"] == THRESHOLD
    assert summary["pairs"] == len(scored)
    assert summary["counts"] == {name: len(rows) for name, rows in expected.items()}
    assert summary["accuracy"] == pytest.approx(accuracy_score(scored.label, predicted))
    assert summary["precision"] == pytest.approx(precision_score(scored.label, predicted))
    assert summary["recall"] == pytest.approx(recall_score(scored.label, predicted))


def test_error_summary_json_lists_every_error_worst_first(tmp_path, scored, faces):
    write_error_folders(tmp_path / "out", scored, faces, max_error_folders=2)
    summary = json.loads((tmp_path / "out" / "error_summary.json").read_text())
    expected = expected_outcome_rows(scored)
    errors = summary["errors"]

    assert {e["index"] for e in errors} == expected["false_positives"] | expected["false_negatives"]
    distances = [abs(e["score"] - THRESHOLD) for e in errors]
    assert distances == sorted(distances, reverse=True)
    for error in errors:
        assert error["outcome"] in ("false_positives", "false_negatives")
        assert error["label"] != error["predicted"]
        assert error["magnitude1"] == pytest.approx(scored.magnitude1[error["index"]])
        assert error["identity1"] == f"person_{scored.key1[error['index']]}"
    with_folder = [e for e in errors if e["folder"] is not None]
    assert len(with_folder) == sum(min(2, len(expected[k])) for k in ("false_positives", "false_negatives"))
    for error in with_folder:
        assert (tmp_path / "out" / error["folder"]).is_dir()


def test_error_summary_precision_undefined_is_null_with_reason():
    scored = make_scored(count=10)
    scored.score[:] = -0.5  # nothing is accepted
    summary = error_summary(scored)
    text = json.dumps(summary, allow_nan=False)
    assert summary["precision"] is None
    assert summary["precision_reason"] == "no pair was predicted same"
    assert summary["recall"] == 0.0
    assert "NaN" not in text


def test_write_error_folders_unreadable_face_placeholder(tmp_path):
    scored = make_scored(missing_key=MISSING_KEY)
    faces = ArrayFaces([k for k in np.concatenate([scored.key1, scored.key2]) if k != MISSING_KEY])
    # Pair 0 is a different-people pair; make it a false positive so it gets a folder.
    scored.score[0] = 0.9
    summary = write_error_folders(tmp_path / "out", scored, faces)

    folder = tmp_path / "out" / "false_positives" / f"00000_sim_{scored.score[0]:.4f}"
    drawn = cv2.imread(str(folder / "image1.jpg")).astype(np.float64)
    assert np.mean(np.abs(drawn - placeholder_image(MISSING_KEY).astype(np.float64))) < 3
    assert "image1: unreadable, drawn as a placeholder" in (folder / "info.txt").read_text()
    assert summary["unreadable_keys"] == [MISSING_KEY]
    saved = json.loads((tmp_path / "out" / "error_summary.json").read_text())
    assert saved["unreadable_keys"] == [MISSING_KEY]


def test_write_error_folders_replaces_old_output(tmp_path, scored, faces):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    write_error_folders(out, scored, faces)
    assert not (out / "stale.txt").exists()
    assert (out / "error_summary.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_error_folders_failure_keeps_old_output(tmp_path, scored):
    class BrokenFaces:
        def image(self, key):
            raise RuntimeError("disk vanished")

    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("complete earlier output")
    with pytest.raises(RuntimeError, match="disk vanished"):
        write_error_folders(out, scored, BrokenFaces())
    assert (out / "previous.txt").read_text() == "complete earlier output"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_pair_folder_names_carry_index_and_similarity(tmp_path, scored, faces):
    write_error_folders(tmp_path / "out", scored, faces)
    pattern = re.compile(r"^\d{5}_sim_-?\d\.\d{4}$")
    for outcome_dir in (tmp_path / "out").iterdir():
        if outcome_dir.is_dir():
            for folder in outcome_dir.iterdir():
                assert pattern.match(folder.name), folder.name


def test_comparison_image_colours_the_verdict():
    face = np.full((112, 112, 3), 128, dtype=np.uint8)
    scored = make_scored(count=4)
    record = scored.pair_record(0)
    record.update(label=1, predicted=0)
    wrong = comparison_image(face, face, record)
    record.update(label=1, predicted=1)
    right = comparison_image(face, face, record)

    def has_colour(image, channel):
        others = [c for c in range(3) if c != channel]
        strong = image[..., channel].astype(int) - image[..., others].max(axis=2).astype(int) > 80
        return bool(strong.any())

    # Channels are BGR: a wrong verdict is drawn red, a right one green.
    assert has_colour(wrong, 2)
    assert not has_colour(wrong, 1)
    assert has_colour(right, 1)
    assert not has_colour(right, 2)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("label", [0, 2, 1], r"ScoredPairs.label contains \[2\]; labels must be 1"),
        ("score", [0.1, 0.2], r"ScoredPairs.score has shape \(2,\), expected \(3,\)"),
        ("score", [0.1, float("nan"), 0.3], r"ScoredPairs.score of pair 1 is nan"),
    ],
)
def test_scored_pairs_rejects_invalid_input(field, value, message):
    columns = dict(
        key1=[1, 2, 3], key2=[4, 5, 6], label=[0, 1, 1], identity1=[1, 2, 3], identity2=[4, 2, 3],
        score=[0.1, 0.5, 0.9], magnitude1=[20, 21, 22], magnitude2=[23, 24, 25], threshold=0.4,
    )
    columns[field] = value
    with pytest.raises(ValueError, match=message):
        ScoredPairs(**columns)


def test_histogram_table_counts_every_pair(scored):
    rows = histogram_table(scored)
    assert sum(r["same_person"] for r in rows) == int(np.sum(scored.label == 1))
    assert sum(r["different_person"] for r in rows) == int(np.sum(scored.label == 0))
    assert rows[0]["score"] == pytest.approx(-0.99)


def test_error_reject_table_starts_at_overall_error(scored):
    with pytest.warns(UndefinedMetricWarning, match="needs at least 1000 different-person pairs"):
        rows = error_reject_table(scored)
    overall_error = np.mean((scored.score >= THRESHOLD) != (scored.label == 1))
    assert rows[0]["reject_fraction"] == 0.0
    assert rows[0]["kept"] == len(scored)
    assert rows[0]["error_rate"] == pytest.approx(overall_error)
    # 30 different-people pairs cannot measure FNMR at FMR 1e-3.
    assert all(r["fnmr"] is None for r in rows)
    assert [r["kept"] for r in rows] == sorted((r["kept"] for r in rows), reverse=True)


@pytest.mark.filterwarnings("ignore::magface_al.evaluation.degenerate.UndefinedMetricWarning")
def test_write_plot_tables_csv_files(tmp_path, scored):
    write_plot_tables(tmp_path / "plots", scored)
    roc_lines = (tmp_path / "plots" / "roc.csv").read_text().splitlines()
    assert roc_lines[0] == "fpr,tpr,threshold"
    assert len(roc_lines) == len(roc_table(scored)) + 1
    erc_text = (tmp_path / "plots" / "error_reject.csv").read_text()
    assert erc_text.splitlines()[0] == "reject_fraction,kept,fnmr,error_rate"
    assert "nan" not in erc_text.lower()
    assert table_to_csv(error_reject_table(scored)) == erc_text


def test_write_error_folders_real_lfw_faces(tmp_path, lfw_dir):
    from magface_al.data.faces import FaceRecordDataset

    dataset = FaceRecordDataset(lfw_dir)
    keys = dataset.keys[:8]
    scored = ScoredPairs(
        key1=keys[:4], key2=keys[4:], label=[1, 1, 0, 0], identity1=dataset.labels[:4],
        identity2=dataset.labels[4:8], score=[0.1, 0.9, 0.8, 0.0], magnitude1=[20] * 4, magnitude2=[21] * 4,
        threshold=0.4,
    )
    summary = write_error_folders(tmp_path / "out", scored, dataset)
    assert summary["counts"]["false_negatives"] == 1
    assert summary["counts"]["false_positives"] == 1
    folder = tmp_path / "out" / "false_negatives" / "00000_sim_0.1000"
    drawn = cv2.imread(str(folder / "image1.jpg")).astype(np.float64)
    assert np.mean(np.abs(drawn - dataset.image(int(keys[0])).astype(np.float64))) < 4
    assert summary["unreadable_keys"] == []
