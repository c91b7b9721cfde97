"""The labelling page: a local web server that records a person's answers to selected pairs.

The answers go to an append-only log and are compacted into a feedback file in
the format that :mod:`magface_al.pairs.feedback` reads.
"""

from magface_al.labeling.server import LabelServer, create_server
from magface_al.labeling.store import (
    ANSWER_LABELS,
    AnswerStore,
    LabelStoreError,
    PairToLabel,
    default_log_path,
    read_selected_pairs,
)

__all__ = [
    "ANSWER_LABELS",
    "AnswerStore",
    "LabelServer",
    "LabelStoreError",
    "PairToLabel",
    "create_server",
    "default_log_path",
    "read_selected_pairs",
]
