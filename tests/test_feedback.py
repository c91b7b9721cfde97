"""Feedback files: writing, importing the earlier tool's format, and every kind of bad entry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from magface_al.pairs import Pairs
from magface_al.pairs.feedback import (
    FeedbackError,
    ImageIndex,
    ImageInfo,
    normalize_label,
    read_feedback_json,
    write_feedback_json,
)


@pytest.fixture
def index() -> ImageIndex:
    rows = [
        ImageInfo(1, "Ann", 0, "Ann/Ann_0001.png"),
        ImageInfo(2, "Ann", 0, "Ann/Ann_0002.png"),
        ImageInfo(3, "Bob", 1, "Bob/Bob_0001.png"),
        ImageInfo(4, "Cy", 2, "Cy/Cy_0001.png"),
        ImageInfo(5, "Dee", 3, "Dee/Ann_0001.png"),  # same file name as key 1, other folder
    ]
    return ImageIndex(rows)


def _write(path, records):
    path.write_text(json.dumps({"pairs": records}))
    return path


def _old(image1, image2, label, identity1=None, identity2=None):
    return {"image1": image1, "image2": image2, "label": label, "identity1": identity1, "identity2": identity2}


def test_round_trip_keeps_truth_and_source(tmp_path, index):
    pairs = Pairs([1, 1], [2, 3], [0, 0], [0, 0], [0, 1], truth=[1, 0])
    write_feedback_json(tmp_path / "f.json", pairs, index, source="simulated")
    records = json.loads((tmp_path / "f.json").read_text())["pairs"]
    assert records[0] == {
        "image1": "Ann/Ann_0001.png", "image2": "Ann/Ann_0002.png", "label": 0,
        "identity1": "Ann", "identity2": "Ann", "key1": 1, "key2": 2, "source": "simulated", "truth": 1,
    }
    result = read_feedback_json(tmp_path / "f.json", index)
    assert result.pairs.label.tolist() == [0, 0]
    assert result.pairs.truth.tolist() == [1, 0]
    assert result.sources == ["simulated", "simulated"]


def test_import_old_tool_format(tmp_path, index):
    path = _write(tmp_path / "old.json", [
        _old("Ann/Ann_0001.png", "Ann/Ann_0002.png", 1, "Ann", "Ann"),
        _old("/data/lfw/Ann/Ann_0001.png", "Bob_0001.png", "different", "Ann", "Bob"),
        _old("3", 4, "No"),
    ])
    result = read_feedback_json(path, index)
    assert result.pairs.key1.tolist() == [1, 1, 3]
    assert result.pairs.key2.tolist() == [2, 3, 4]
    assert result.pairs.label.tolist() == [1, 0, 0]
    assert result.pairs.identity2.tolist() == [0, 1, 2]
    assert result.pairs.truth is None
    assert result.sources == ["human"] * 3


@pytest.mark.parametrize(
    "value, expected",
    [(1, 1), (0, 0), (True, 1), (False, 0), (1.0, 1), ("true", 1), ("False", 0), (" same ", 1),
     ("different", 0), ("YES", 1), ("no", 0), ("1", 1), ("0", 0)],
)
def test_normalize_label_spellings(value, expected):
    assert normalize_label(value) == expected


@pytest.mark.parametrize("value", [2, -1, 0.5, "maybe", "", None, [1]])
def test_normalize_label_rejects(value):
    with pytest.raises(ValueError, match="is not one of 1/0, true/false, same/different or yes/no"):
        normalize_label(value)


@pytest.mark.parametrize(
    "records, message",
    [
        ([_old("Ann/Ann_0001.png", "Zed/Zed_0001.png", 1)],
         r"pair 0 \('Ann/Ann_0001.png', 'Zed/Zed_0001.png'\): image 'Zed/Zed_0001.png' is not in the manifest; "
         r"use image names from the dataset manifest"),
        ([_old("Ann/Ann_0001.png", "Ann/Ann_0002.png", "maybe")],
         r"pair 0 .*: label 'maybe' is not one of 1/0, true/false, same/different or yes/no; write the label as"),
        ([_old("Ann/Ann_0001.png", "Ann/Ann_0001.png", 1)], r"pair 0 .*: pairs image 1 with itself; remove the entry"),
        ([_old("Ann/Ann_0001.png", "Ann/Ann_0002.png", 1), _old("Ann/Ann_0002.png", "Ann/Ann_0001.png", 1)],
         r"pair 1 .*: duplicate of pair 0 \(the same images in either order\); remove the duplicate"),
        ([_old("Ann/Ann_0001.png", "Ann/Ann_0002.png", 1), _old("Ann/Ann_0002.png", "Ann/Ann_0001.png", 0)],
         r"pair 0 .*: pair repeated at positions \[0, 1\] with conflicting labels; keep one entry with the right label"),
        ([_old("Ann_0001.png", "Bob/Bob_0001.png", 0)], r"image 'Ann_0001.png' is ambiguous: 2 manifest entries"),
        ([{"image1": "Ann/Ann_0001.png", "label": 1}], r"pair 0 .*: image2 is missing"),
        ([_old("Ann/Ann_0001.png", "Bob/Bob_0001.png", None)], r"label None is not one of"),
        (["not an object"], r"pair 0: entry is a str, not an object"),
    ],
)
def test_import_errors_name_file_pair_and_fix(tmp_path, index, records, message):
    path = _write(tmp_path / "bad.json", records)
    with pytest.raises(FeedbackError, match=message) as error:
        read_feedback_json(path, index)
    assert str(path) in str(error.value)
    assert 'on_error="drop"' in str(error.value)


def test_import_drop_reports_every_entry(tmp_path, index):
    path = _write(tmp_path / "mixed.json", [
        _old("Ann/Ann_0001.png", "Ann/Ann_0002.png", "same"),   # kept
        _old("Ann/Ann_0001.png", "Nobody.png", 1),              # unknown image
        _old("Bob/Bob_0001.png", "Cy/Cy_0001.png", "perhaps"),  # bad label
        _old("Cy/Cy_0001.png", "Cy/Cy_0001.png", 0),            # self pair
        _old("Ann/Ann_0002.png", "Ann/Ann_0001.png", 1),        # duplicate of 0
        _old("Bob/Bob_0001.png", "Dee/Ann_0001.png", 0),        # conflicting with 6
        _old("Dee/Ann_0001.png", "Bob/Bob_0001.png", 1),
    ])
    result = read_feedback_json(path, index, on_error="drop")
    assert result.pairs.canonical().tolist() == [[1, 2]]
    reasons = {d.position: d.reason for d in result.dropped}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6]
    assert "not in the manifest" in reasons[1]
    assert "is not one of" in reasons[2]
    assert "with itself" in reasons[3]
    assert reasons[4].startswith("duplicate of pair 0")
    assert "conflicting labels" in reasons[5] and "conflicting labels" in reasons[6]
    report = result.report()
    assert report["kept"] == 1
    assert report["dropped"] == 6
    json.dumps(report)


def test_import_rejects_held_out_identities(tmp_path, index):
    path = _write(tmp_path / "f.json", [_old("Ann/Ann_0001.png", "Bob/Bob_0001.png", 0)])
    with pytest.raises(FeedbackError, match="identity Bob is not in the feedback pool"):
        read_feedback_json(path, index, allowed_identities=np.array([0, 2]))


def test_import_counts_identity_mismatch(tmp_path, index):
    path = _write(tmp_path / "f.json", [_old("Ann/Ann_0001.png", "Bob/Bob_0001.png", 0, "Ann", "Robert")])
    result = read_feedback_json(path, index)
    assert result.identity_mismatches == 1
    assert result.pairs.identity2.tolist() == [1]


def test_import_keys_take_precedence(tmp_path, index):
    path = _write(tmp_path / "f.json", [{"key1": 3, "key2": "4", "image1": "ignored", "label": 0, "source": "human"}])
    result = read_feedback_json(path, index)
    assert result.pairs.canonical().tolist() == [[3, 4]]


def test_import_missing_file(tmp_path, index):
    with pytest.raises(FeedbackError, match="feedback file not found"):
        read_feedback_json(tmp_path / "none.json", index)


def test_import_not_a_pairs_object(tmp_path, index):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(FeedbackError, match='expected a JSON object with a "pairs" list'):
        read_feedback_json(path, index)
