"""Face images for the report: safe loading, placeholders and side-by-side comparison images."""

from __future__ import annotations

import logging
from typing import Any, Protocol

import cv2
import numpy as np

logger = logging.getLogger(__name__)

FACE_SIZE = 112  # aligned faces are 112x112; placeholders match them
COMPARISON_FACE_SIZE = 224  # faces are drawn at twice their size so the text stays legible
GAP = 8  # pixels between the two faces
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.5
LINE_HEIGHT = 20
TEXT_COLOR = (20, 20, 20)
CORRECT_COLOR = (40, 140, 40)  # BGR green
WRONG_COLOR = (30, 30, 200)  # BGR red

# What reading one image may raise: an unknown key, a truncated record,
# an undecodable JPEG or a file-system error. Anything else is a bug and propagates.
UNREADABLE_ERRORS = (KeyError, IndexError, ValueError, OSError, EOFError, cv2.error)


class FaceImageSource(Protocol):
    """Anything that returns a face image (uint8 BGR, H x W x 3) for a key, such as ``FaceRecordDataset``."""

    def image(self, key: int) -> np.ndarray: ...


class FaceCache:
    """Read faces once per key from ``source``; an unreadable face becomes a placeholder.

    ``unreadable`` lists the keys that could not be read, so a report can say
    which of its faces are placeholders.
    """

    def __init__(self, source: FaceImageSource | None):
        self.source = source
        self.unreadable: set[int] = set()
        self._images: dict[int, np.ndarray] = {}

    def get(self, key: int) -> np.ndarray:
        """Return the face of ``key``, or a placeholder naming the key when it cannot be read."""
        key = int(key)
        if key not in self._images:
            image = load_face(self.source, key)
            if image is None:
                self.unreadable.add(key)
                image = placeholder_image(key)
            self._images[key] = image
        return self._images[key]

    def is_readable(self, key: int) -> bool:
        """Tell whether the face of ``key`` was read (True) or replaced by a placeholder (False)."""
        self.get(key)
        return int(key) not in self.unreadable


def load_face(source: FaceImageSource | None, key: int) -> np.ndarray | None:
    """Read one face as uint8 BGR (H, W, 3); return None and log a warning when it is unreadable."""
    if source is None:
        return None
    try:
        image = source.image(int(key))
    except UNREADABLE_ERRORS as error:
        logger.warning("face %d could not be read (%s: %s); drawing a placeholder", key, type(error).__name__, error)
        return None
    return _as_bgr(image, key)


def _as_bgr(image: Any, key: int) -> np.ndarray | None:
    if image is None:
        logger.warning("face %d decoded to nothing; drawing a placeholder", key)
        return None
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.size == 0:
        logger.warning("face %d is %s of shape %s, not uint8 pixels; drawing a placeholder", key, image.dtype, image.shape)
        return None
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    logger.warning("face %d has shape %s, expected (H, W, 3); drawing a placeholder", key, image.shape)
    return None


def placeholder_image(key: int, size: int = FACE_SIZE) -> np.ndarray:
    """Draw a grey square with a cross, the word "unreadable" and the key, in place of a missing face."""
    image = np.full((size, size, 3), 200, dtype=np.uint8)
    cv2.line(image, (0, 0), (size - 1, size - 1), (160, 160, 160), 1)
    cv2.line(image, (0, size - 1), (size - 1, 0), (160, 160, 160), 1)
    scale = size / FACE_SIZE * 0.45
    _put_centered(image, "unreadable", size // 2 - int(8 * scale / 0.45), scale)
    _put_centered(image, f"key {int(key)}", size // 2 + int(14 * scale / 0.45), scale)
    return image


def _put_centered(image: np.ndarray, text: str, baseline_y: int, scale: float) -> None:
    (width, _), _ = cv2.getTextSize(text, FONT, scale, 1)
    x = max(0, (image.shape[1] - width) // 2)
    cv2.putText(image, text, (x, baseline_y), FONT, scale, (60, 60, 60), 1, cv2.LINE_AA)


def _ascii(text: Any) -> str:
    # cv2.putText draws ASCII only; other characters would come out as "?" boxes anyway.
    return str(text).encode("ascii", "replace").decode("ascii")


def _fit(text: str, max_width: int) -> str:
    """Shorten ``text`` with "..." until it fits ``max_width`` pixels in the report font."""
    if cv2.getTextSize(text, FONT, FONT_SCALE, 1)[0][0] <= max_width:
        return text
    while text and cv2.getTextSize(text + "...", FONT, FONT_SCALE, 1)[0][0] > max_width:
        text = text[:-1]
    return text + "..."


def _label_name(label: int) -> str:
    return "same" if int(label) == 1 else "different"


def comparison_image(image1: np.ndarray, image2: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """Draw two faces side by side above a text panel describing the pair.

    Args:
        image1: first face, uint8 BGR.
        image2: second face, uint8 BGR.
        record: a pair description as :meth:`ScoredPairs.pair_record` returns it
            (score, threshold, magnitudes, labels, identities and keys).

    Returns:
        The comparison image, uint8 BGR.
    """
    size = COMPARISON_FACE_SIZE
    width = 2 * size + GAP
    faces = np.full((size, width, 3), 255, dtype=np.uint8)
    faces[:, :size] = cv2.resize(image1, (size, size), interpolation=cv2.INTER_CUBIC)
    faces[:, size + GAP :] = cv2.resize(image2, (size, size), interpolation=cv2.INTER_CUBIC)

    correct = record["label"] == record["predicted"]
    lines = [
        (f"similarity {record['score']:.4f}   threshold {record['threshold']:.4f}", TEXT_COLOR),
        (f"magnitude {record['magnitude1']:.2f} | {record['magnitude2']:.2f}", TEXT_COLOR),
        (
            f"true: {_label_name(record['label'])}   predicted: {_label_name(record['predicted'])}",
            CORRECT_COLOR if correct else WRONG_COLOR,
        ),
        (f"1: {_ascii(record['identity1'])} (key {record['key1']})", TEXT_COLOR),
        (f"2: {_ascii(record['identity2'])} (key {record['key2']})", TEXT_COLOR),
    ]
    panel = np.full((LINE_HEIGHT * len(lines) + 10, width, 3), 255, dtype=np.uint8)
    for number, (text, color) in enumerate(lines):
        baseline_y = LINE_HEIGHT * (number + 1)
        cv2.putText(panel, _fit(text, width - 12), (6, baseline_y), FONT, FONT_SCALE, color, 1, cv2.LINE_AA)
    return np.vstack([faces, panel])


def encode_image(image: np.ndarray, suffix: str = ".jpg", *, jpeg_quality: int = 92) -> bytes:
    """Encode a uint8 BGR image as JPEG or PNG bytes (chosen by ``suffix``)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if suffix.lower() in (".jpg", ".jpeg") else []
    ok, buffer = cv2.imencode(suffix, image, params)
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {image.shape} as {suffix}")
    return buffer.tobytes()
