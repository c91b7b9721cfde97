"""Durable storage of labelling answers: an append-only log and the feedback file.

Every answer is one JSON line appended to the log and flushed to disk with
``fsync`` before the request returns, so closing the browser or killing the
server loses nothing. The log is the source of truth. The feedback file that
the pipeline reads is derived from it by replaying the log (compaction) and is
written atomically, so a reader never sees a half-written file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from magface_al.pairs.feedback import SOURCE_HUMAN
from magface_al.utils import write_json_atomic

logger = logging.getLogger(__name__)

# Answer names as the page sends them, and the feedback label each maps to.
# "not_sure" is kept in the log but produces no feedback record.
ANSWER_LABELS: dict[str, int | None] = {"same": 1, "different": 0, "not_sure": None}


class LabelStoreError(ValueError):
    """A selected-pairs file or an answer log is invalid or does not match."""


@dataclass(frozen=True)
class PairToLabel:
    """One pair a person is asked about: two dataset record keys and what is known of them."""

    key1: int
    key2: int
    identity1: Any = None
    identity2: Any = None
    image1: str | None = None
    image2: str | None = None

    def feedback_record(self, label: int) -> dict[str, Any]:
        """Build this pair's record in the feedback file format."""
        return {
            "image1": self.image1 if self.image1 is not None else str(self.key1),
            "image2": self.image2 if self.image2 is not None else str(self.key2),
            "label": label,
            "identity1": self.identity1,
            "identity2": self.identity2,
            "key1": self.key1,
            "key2": self.key2,
            "source": SOURCE_HUMAN,
        }


def _parse_key(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise LabelStoreError(f"{where}: record key must be a non-negative integer, got {value!r}")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or value < 0:
        raise LabelStoreError(f"{where}: record key must be a non-negative integer, got {value!r}")
    return value


def pairs_from_records(records: Sequence[dict[str, Any]], *, source: str) -> list[PairToLabel]:
    """Convert pair records (mappings with ``key1``, ``key2`` and optional names) to pairs.

    Raises:
        LabelStoreError: a record has no valid keys, pairs an image with itself,
            or repeats an earlier pair (in either order).
    """
    pairs: list[PairToLabel] = []
    seen: dict[tuple[int, int], int] = {}
    for index, record in enumerate(records):
        where = f"{source}: pair {index}"
        if not isinstance(record, dict):
            raise LabelStoreError(f"{where}: expected an object with key1 and key2, got {record!r}")
        missing = [name for name in ("key1", "key2") if name not in record]
        if missing:
            raise LabelStoreError(f"{where}: missing {' and '.join(missing)}; each pair needs both record keys")
        key1 = _parse_key(record["key1"], where)
        key2 = _parse_key(record["key2"], where)
        if key1 == key2:
            raise LabelStoreError(f"{where}: pairs image {key1} with itself; remove it from the file")
        unordered = (min(key1, key2), max(key1, key2))
        if unordered in seen:
            raise LabelStoreError(
                f"{where}: repeats pair {seen[unordered]} (keys {key1} and {key2}); remove the duplicate"
            )
        seen[unordered] = index
        pairs.append(
            PairToLabel(
                key1=key1,
                key2=key2,
                identity1=record.get("identity1"),
                identity2=record.get("identity2"),
                image1=None if record.get("image1") is None else str(record["image1"]),
                image2=None if record.get("image2") is None else str(record["image2"]),
            )
        )
    return pairs


def read_selected_pairs(path: str | os.PathLike) -> list[PairToLabel]:
    """Read the pairs to ask about from a JSON file ``{"pairs": [{"key1", "key2", ...}]}``.

    This is the layout the ``select`` stage writes. Extra fields (score,
    strategy) are ignored; ``identity1``/``identity2`` and ``image1``/``image2``
    are carried into the feedback records when present.
    """
    path = Path(path)
    if not path.is_file():
        raise LabelStoreError(f"selected pairs file not found: {path}; run the select stage first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise LabelStoreError(f"{path}: invalid JSON ({error}); expected {{\"pairs\": [...]}}") from error
    if not isinstance(data, dict) or not isinstance(data.get("pairs"), list):
        raise LabelStoreError(f"{path}: expected an object with a \"pairs\" list")
    pairs = pairs_from_records(data["pairs"], source=str(path))
    if not pairs:
        raise LabelStoreError(f"{path}: the pairs list is empty; there is nothing to label")
    return pairs


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class AnswerStore:
    """Answers to a fixed list of pairs, kept in an append-only log.

    The answer history is a stack: a new answer is pushed, ``undo`` pops the
    most recent one, and a pair's current answer is its latest entry on the
    stack. Every method is thread-safe, because the HTTP server answers
    requests from several browser tabs in parallel threads.

    Args:
        pairs: the pairs to label, in the order they are shown.
        log_path: the append-only answer log (JSON lines), created if absent.
        feedback_path: the feedback JSON written on every change.
    """

    def __init__(
        self,
        pairs: Sequence[PairToLabel],
        log_path: str | os.PathLike,
        feedback_path: str | os.PathLike,
    ) -> None:
        if not pairs:
            raise LabelStoreError("there are no pairs to label")
        self.pairs = list(pairs)
        self.log_path = Path(log_path)
        self.feedback_path = Path(feedback_path)
        self._lock = threading.Lock()
        self._history: list[tuple[int, str]] = []
        self._current: list[str | None] = [None] * len(self.pairs)
        self._log_entries = 0
        self._log = self._open_log()
        try:
            self._replay()
            self.compact()
        except BaseException:
            self._log.close()
            raise

    # -- log replay -----------------------------------------------------

    def _replay(self) -> None:
        if not self.log_path.exists():
            return
        raw = self.log_path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            # A process killed inside write() can leave a partial last line.
            # Its answer was never acknowledged to the page, so drop it and
            # cut the file back, or the next append would be glued onto it.
            cut = raw.rfind(b"\n") + 1
            logger.warning(
                "%s: dropping an incomplete last line (%d bytes) left by an interrupted write",
                self.log_path,
                len(raw) - cut,
            )
            with self.log_path.open("r+b") as handle:
                handle.truncate(cut)
                handle.flush()
                os.fsync(handle.fileno())
            raw = raw[:cut]
        for number, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise LabelStoreError(
                    f"{self.log_path}, line {number}: invalid JSON ({error}); "
                    "the log is written only by this tool, so restore it from a backup or move it aside"
                ) from error
            self._apply(entry, f"{self.log_path}, line {number}")
            self._log_entries += 1
        if self._log_entries:
            logger.info(
                "resumed from %s: %d log entries, %d of %d pairs answered",
                self.log_path,
                self._log_entries,
                self._done_count(),
                len(self.pairs),
            )

    def _apply(self, entry: Any, where: str) -> None:
        if not isinstance(entry, dict) or entry.get("event") not in ("answer", "undo"):
            raise LabelStoreError(f"{where}: expected an answer or undo entry, got {entry!r}")
        index = entry.get("pair")
        if not isinstance(index, int) or not 0 <= index < len(self.pairs):
            raise LabelStoreError(
                f"{where}: pair index {index!r} is outside the {len(self.pairs)} selected pairs; "
                "this log belongs to another pairs file, so pass a different log or feedback path"
            )
        pair = self.pairs[index]
        if (entry.get("key1"), entry.get("key2")) != (pair.key1, pair.key2):
            raise LabelStoreError(
                f"{where}: pair {index} has keys ({entry.get('key1')}, {entry.get('key2')}) in the log "
                f"but ({pair.key1}, {pair.key2}) in the pairs file; this log belongs to another pairs "
                "file, so pass a different log or feedback path"
            )
        if entry["event"] == "answer":
            answer = entry.get("answer")
            if answer not in ANSWER_LABELS:
                raise LabelStoreError(f"{where}: unknown answer {answer!r}")
            self._push(index, answer)
        else:
            if not self._history or self._history[-1][0] != index:
                raise LabelStoreError(f"{where}: undo of pair {index} does not match the last answer")
            self._pop()

    # -- in-memory state ------------------------------------------------

    def _push(self, index: int, answer: str) -> None:
        self._history.append((index, answer))
        self._current[index] = answer

    def _pop(self) -> int:
        index, _ = self._history.pop()
        previous = None
        for earlier_index, earlier_answer in reversed(self._history):
            if earlier_index == index:
                previous = earlier_answer
                break
        self._current[index] = previous
        return index

    def _done_count(self) -> int:
        return sum(answer is not None for answer in self._current)

    def _next_index(self) -> int | None:
        for index, answer in enumerate(self._current):
            if answer is None:
                return index
        return None

    # -- log writing ----------------------------------------------------

    def _open_log(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.log_path.exists()
        handle = self.log_path.open("a", encoding="utf-8")
        try:
            # Two servers appending to one log would interleave their undo
            # stacks. The kernel drops this lock when the process dies, even by SIGKILL.
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise LabelStoreError(
                f"{self.log_path} is in use by another labelling server; stop it or pass another feedback path"
            ) from None
        if created:
            # Make the new directory entry itself durable, not only the data.
            directory = os.open(self.log_path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        return handle

    def _append(self, entry: dict[str, Any]) -> None:
        self._log.write(json.dumps(entry, sort_keys=True) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())
        self._log_entries += 1

    # -- public API -----------------------------------------------------

    def _check_index(self, index: Any) -> int:
        if isinstance(index, bool) or not isinstance(index, int):
            raise LabelStoreError(f"pair index must be an integer, got {index!r}")
        if not 0 <= index < len(self.pairs):
            raise LabelStoreError(f"pair index {index} is outside 0..{len(self.pairs) - 1}")
        return index

    def record(self, index: int, answer: str) -> dict[str, Any]:
        """Append ``answer`` for pair ``index`` to the log, durably, and refresh the feedback file.

        Returns:
            The new state (see :meth:`state`).
        Raises:
            LabelStoreError: the index or the answer is invalid.
        """
        index = self._check_index(index)
        if answer not in ANSWER_LABELS:
            raise LabelStoreError(f"answer must be one of {', '.join(ANSWER_LABELS)}, got {answer!r}")
        pair = self.pairs[index]
        with self._lock:
            entry = {
                "event": "answer",
                "pair": index,
                "key1": pair.key1,
                "key2": pair.key2,
                "answer": answer,
                "time": _utc_now(),
            }
            self._append(entry)
            self._push(index, answer)
            self._compact_locked()
            logger.debug("pair %d (%d, %d): %s", index, pair.key1, pair.key2, answer)
            return self._state_locked()

    def undo(self) -> dict[str, Any]:
        """Withdraw the most recent answer; the state's ``undone`` names its pair, or is None."""
        with self._lock:
            if not self._history:
                state = self._state_locked()
                state["undone"] = None
                return state
            index = self._history[-1][0]
            pair = self.pairs[index]
            self._append(
                {"event": "undo", "pair": index, "key1": pair.key1, "key2": pair.key2, "time": _utc_now()}
            )
            self._pop()
            self._compact_locked()
            state = self._state_locked()
            state["undone"] = index
            return state

    def answer_of(self, index: int) -> str | None:
        """Return the current answer to pair ``index`` or None when it is unanswered."""
        index = self._check_index(index)
        with self._lock:
            return self._current[index]

    def state(self) -> dict[str, Any]:
        """Return progress: ``total``, ``done``, answer ``counts`` and the ``next`` unanswered index."""
        with self._lock:
            return self._state_locked()

    def _state_locked(self) -> dict[str, Any]:
        counts = {name: 0 for name in ANSWER_LABELS}
        for answer in self._current:
            if answer is not None:
                counts[answer] += 1
        return {
            "total": len(self.pairs),
            "done": self._done_count(),
            "counts": counts,
            "next": self._next_index(),
            "can_undo": bool(self._history),
        }

    def feedback_records(self) -> list[dict[str, Any]]:
        """Build the feedback records of the answered pairs, "not sure" answers excluded."""
        with self._lock:
            return self._feedback_records_locked()

    def _feedback_records_locked(self) -> list[dict[str, Any]]:
        records = []
        for pair, answer in zip(self.pairs, self._current):
            label = ANSWER_LABELS.get(answer) if answer is not None else None
            if label is not None:
                records.append(pair.feedback_record(label))
        return records

    def compact(self) -> Path:
        """Write the feedback file from the current answers, atomically, and return its path."""
        with self._lock:
            return self._compact_locked()

    def _compact_locked(self) -> Path:
        write_json_atomic(self.feedback_path, {"pairs": self._feedback_records_locked()})
        return self.feedback_path

    def close(self) -> None:
        """Write the feedback file once more and close the log."""
        with self._lock:
            if self._log.closed:
                return
            self._compact_locked()
            self._log.close()

    def __enter__(self) -> AnswerStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def default_log_path(feedback_path: str | os.PathLike) -> Path:
    """Return the answer log path that goes with a feedback file: ``<name>.answers.jsonl`` beside it."""
    feedback_path = Path(feedback_path)
    return feedback_path.with_name(feedback_path.stem + ".answers.jsonl")
