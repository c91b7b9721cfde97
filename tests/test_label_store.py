"""Tests of the answer log and the feedback file it is compacted into."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from magface_al.labeling.store import (
    AnswerStore,
    LabelStoreError,
    PairToLabel,
    default_log_path,
    read_selected_pairs,
)
from magface_al.pairs.feedback import ImageIndex, read_feedback_json


def make_pairs(count: int = 5) -> list[PairToLabel]:
    return [
        PairToLabel(key1=2 * i + 1, key2=2 * i + 2, identity1=i, identity2=i + 100, image1=f"a/{i}.jpg", image2=f"b/{i}.jpg")
        for i in range(count)
    ]


def open_store(tmp_path: Path, pairs: list[PairToLabel] | None = None) -> AnswerStore:
    feedback = tmp_path / "feedback.json"
    return AnswerStore(pairs or make_pairs(), default_log_path(feedback), feedback)


def read_feedback(tmp_path: Path) -> list[dict]:
    return json.loads((tmp_path / "feedback.json").read_text())["pairs"]


def log_lines(store: AnswerStore) -> list[dict]:
    return [json.loads(line) for line in store.log_path.read_text().splitlines()]


def test_store_new_log_writes_empty_feedback(tmp_path):
    with open_store(tmp_path) as store:
        state = store.state()
    assert state["total"] == 5
    assert state["done"] == 0
    assert state["next"] == 0
    assert read_feedback(tmp_path) == []


def test_store_record_appends_and_compacts(tmp_path):
    with open_store(tmp_path) as store:
        store.record(0, "same")
        store.record(1, "different")
        state = store.record(2, "not_sure")
        # The feedback file is current after every answer, before close.
        records = read_feedback(tmp_path)
    assert state["done"] == 3
    assert state["next"] == 3
    assert state["counts"] == {"same": 1, "different": 1, "not_sure": 1}
    assert [(r["key1"], r["key2"], r["label"]) for r in records] == [(1, 2, 1), (3, 4, 0)]
    assert all(r["source"] == "human" for r in records)
    assert records[0]["image1"] == "a/0.jpg"
    assert records[0]["identity2"] == 100
    assert [entry["answer"] for entry in log_lines(store)] == ["same", "different", "not_sure"]


def test_store_not_sure_excluded_from_feedback(tmp_path):
    with open_store(tmp_path) as store:
        store.record(0, "not_sure")
    assert read_feedback(tmp_path) == []
    assert log_lines(store)[0]["answer"] == "not_sure"


def test_store_undo_restores_previous_answer(tmp_path):
    with open_store(tmp_path) as store:
        store.record(0, "same")
        store.record(0, "different")
        state = store.undo()
        assert state["undone"] == 0
        assert store.answer_of(0) == "same"
        state = store.undo()
        assert state["undone"] == 0
        assert store.answer_of(0) is None
        state = store.undo()
    assert state["undone"] is None
    assert state["done"] == 0
    assert read_feedback(tmp_path) == []
    assert [entry["event"] for entry in log_lines(store)] == ["answer", "answer", "undo", "undo"]


def test_store_resumes_from_log(tmp_path):
    with open_store(tmp_path) as store:
        store.record(0, "same")
        store.record(1, "different")
        store.record(2, "same")
        store.undo()
    with open_store(tmp_path) as reopened:
        state = reopened.state()
        assert state["done"] == 2
        assert state["next"] == 2
        assert reopened.answer_of(1) == "different"
        # The undo stack survives a restart too.
        reopened.undo()
        assert reopened.answer_of(1) is None


def test_store_next_is_lowest_unanswered(tmp_path):
    with open_store(tmp_path) as store:
        store.record(1, "same")
        store.record(0, "same")
        state = store.record(3, "different")
    assert state["next"] == 2


def test_store_all_answered_next_is_none(tmp_path):
    with open_store(tmp_path, make_pairs(2)) as store:
        store.record(0, "same")
        state = store.record(1, "same")
    assert state["next"] is None
    assert state["done"] == 2


def test_store_rebuilds_lost_feedback_file(tmp_path):
    with open_store(tmp_path) as store:
        store.record(0, "same")
    (tmp_path / "feedback.json").unlink()
    with open_store(tmp_path):
        pass
    assert [r["key1"] for r in read_feedback(tmp_path)] == [1]


def test_store_drops_incomplete_last_line(tmp_path):
    with open_store(tmp_path) as store:
        store.record(0, "same")
    with store.log_path.open("a") as handle:
        handle.write('{"event": "answer", "pair": 1, "ke')  # a write cut short by a kill
    with open_store(tmp_path) as reopened:
        assert reopened.state()["done"] == 1
        reopened.record(1, "different")
    lines = log_lines(reopened)
    assert [entry["pair"] for entry in lines] == [0, 1]


def test_store_rejects_log_of_other_pairs(tmp_path):
    with open_store(tmp_path) as store:
        store.record(0, "same")
    other = [PairToLabel(key1=50, key2=60)] + make_pairs()[1:]
    with pytest.raises(LabelStoreError, match=r"pair 0 has keys \(1, 2\) in the log but \(50, 60\) in the pairs file"):
        open_store(tmp_path, other)


def test_store_rejects_corrupt_log_line(tmp_path):
    log = default_log_path(tmp_path / "feedback.json")
    log.write_text("not json\n")
    with pytest.raises(LabelStoreError, match=r"line 1: invalid JSON"):
        open_store(tmp_path)


def test_store_rejects_second_writer(tmp_path):
    with open_store(tmp_path):
        with pytest.raises(LabelStoreError, match="is in use by another labelling server"):
            open_store(tmp_path)


@pytest.mark.parametrize(
    ("index", "answer", "message"),
    [
        (5, "same", r"pair index 5 is outside 0\.\.4"),
        (-1, "same", r"pair index -1 is outside 0\.\.4"),
        ("0", "same", r"pair index must be an integer, got '0'"),
        (True, "same", r"pair index must be an integer, got True"),
        (0, "maybe", r"answer must be one of same, different, not_sure, got 'maybe'"),
    ],
)
def test_store_record_rejects_invalid(tmp_path, index, answer, message):
    with open_store(tmp_path) as store:
        with pytest.raises(LabelStoreError, match=message):
            store.record(index, answer)
    assert store.log_path.read_text() == ""


def test_store_concurrent_records_all_logged(tmp_path):
    pairs = make_pairs(40)
    with open_store(tmp_path, pairs) as store:
        barrier = threading.Barrier(4)

        def answer_range(start: int) -> None:
            barrier.wait()
            for index in range(start, 40, 4):
                store.record(index, "same" if index % 2 else "different")

        threads = [threading.Thread(target=answer_range, args=(start,)) for start in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(entry["pair"] for entry in log_lines(store)) == list(range(40))
    assert len(read_feedback(tmp_path)) == 40


def test_store_feedback_readable_by_importer(tmp_path):
    pairs = make_pairs(3)
    with open_store(tmp_path, pairs) as store:
        store.record(0, "same")
        store.record(1, "different")
        store.record(2, "not_sure")
    keys = np.arange(1, 7)
    index = ImageIndex.from_labels(keys, np.array([0, 100, 1, 101, 2, 102]))
    imported = read_feedback_json(tmp_path / "feedback.json", index)
    assert imported.pairs.key1.tolist() == [1, 3]
    assert imported.pairs.label.tolist() == [1, 0]
    assert imported.sources == ["human", "human"]


def test_read_selected_pairs_reads_records(tmp_path):
    path = tmp_path / "selected.json"
    path.write_text(json.dumps({"pairs": [{"key1": 3, "key2": "7", "identity1": "Ann", "score": 0.4}]}))
    pairs = read_selected_pairs(path)
    assert pairs == [PairToLabel(key1=3, key2=7, identity1="Ann")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", r"invalid JSON"),
        ('{"rows": []}', r'expected an object with a "pairs" list'),
        ('{"pairs": []}', r"the pairs list is empty"),
        ('{"pairs": [{"key1": 1}]}', r"pair 0: missing key2"),
        ('{"pairs": [{"key1": 1, "key2": 1}]}', r"pair 0: pairs image 1 with itself"),
        ('{"pairs": [{"key1": 1, "key2": -4}]}', r"pair 0: record key must be a non-negative integer, got -4"),
        ('{"pairs": [{"key1": 1, "key2": 2}, {"key1": 2, "key2": 1}]}', r"pair 1: repeats pair 0"),
    ],
)
def test_read_selected_pairs_rejects_invalid(tmp_path, content, message):
    path = tmp_path / "selected.json"
    path.write_text(content)
    with pytest.raises(LabelStoreError, match=message):
        read_selected_pairs(path)


def test_read_selected_pairs_missing_file(tmp_path):
    with pytest.raises(LabelStoreError, match="selected pairs file not found"):
        read_selected_pairs(tmp_path / "absent.json")
