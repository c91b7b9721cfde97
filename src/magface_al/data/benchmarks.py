"""Verification benchmark files: LFW ``pairs.txt`` and InsightFace ``.bin`` pair files.

``pairs.txt`` starts with a line ``folds pairs_per_fold`` (``10 300`` for
LFW); each fold then lists ``pairs_per_fold`` same-person lines
``name n1 n2`` followed by as many different-person lines
``name1 n1 name2 n2``, where image ``n`` of ``name`` is ``name/name_000n``
with any image extension.

An InsightFace ``.bin`` is a pickle of ``(list of 2N encoded images, list of
N booleans)``: images ``2i`` and ``2i+1`` form pair ``i``. Pickles can run
code when loaded, so ``load_bin`` uses an unpickler that builds no object
other than lists, tuples, bytes, strings, numbers and booleans.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from magface_al.data.faces import MANIFEST_NAME, read_manifest

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class UnsafePickleError(ValueError):
    """A pickle that tries to build an object outside the allowed types."""


# ---------------------------------------------------------------------------
# pairs.txt


def _parse_pairs_lines(path: Path) -> list[tuple[str, int, str, int, bool, int]]:
    """Return (name1, n1, name2, n2, same, line number) per pair, in file order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path} is empty; expected LFW pairs.txt with a first line such as '10 300'")
    head = lines[0].split()
    if not 1 <= len(head) <= 2 or not all(field.isdigit() for field in head):
        raise ValueError(
            f"{path}, line 1 is {lines[0]!r}; expected 'folds pairs_per_fold' such as '10 300' (LFW pairs.txt format)"
        )
    pairs = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) == 3:
                pairs.append((fields[0], int(fields[1]), fields[0], int(fields[2]), True, number))
            elif len(fields) == 4:
                pairs.append((fields[0], int(fields[1]), fields[2], int(fields[3]), False, number))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{path}, line {number} is {line!r}; expected 'name n1 n2' (same person) or "
                f"'name1 n1 name2 n2' (different people) with integer image numbers"
            ) from None
    if len(head) == 2:
        folds, per_fold = int(head[0]), int(head[1])
        expected = folds * 2 * per_fold
        if len(pairs) != expected:
            raise ValueError(
                f"{path} declares {folds} folds of {per_fold} same and {per_fold} different pairs "
                f"({expected} lines) but lists {len(pairs)} pairs; the file is incomplete or damaged"
            )
    return pairs


def _image_stem(name: str, number: int) -> str:
    return f"{name}/{name}_{number:04d}"


def _manifest_lookup(manifest_path: Path) -> dict[str, int]:
    """Map ``name/name_000n`` (source file without extension) to the record key."""
    lookup = {}
    for row in read_manifest(manifest_path):
        source = Path(row["source_file"])
        lookup[source.with_suffix("").as_posix()] = row["key"]
    return lookup


def _folder_lookup(folder: Path, stems: set[str]) -> dict[str, Path]:
    lookup = {}
    for stem in stems:
        for suffix in _IMAGE_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                lookup[stem] = candidate
                break
    return lookup


def read_lfw_pairs(
    pairs_txt: str | os.PathLike,
    manifest_or_folder: str | os.PathLike,
    *,
    skip_missing: bool = False,
) -> list[tuple[Any, Any, bool]]:
    """Read LFW ``pairs.txt`` and resolve each image to a record key or an image path.

    Args:
        pairs_txt: the pairs file.
        manifest_or_folder: a ``manifest.csv``, a RecordIO dataset folder
            holding one (images resolve to int record keys), or a folder of
            ``name/name_000n.<ext>`` images (images resolve to paths).
        skip_missing: leave out pairs whose images are not found, with a
            warning that counts them, instead of raising.

    Returns:
        ``(image1, image2, same)`` per pair, in file order, so the folds stay
        contiguous.

    Raises:
        ValueError: the file is malformed, or an image is missing and
            ``skip_missing`` is false.
    """
    pairs_txt, target = Path(pairs_txt), Path(manifest_or_folder)
    parsed = _parse_pairs_lines(pairs_txt)
    stems = {_image_stem(name, number) for pair in parsed for name, number in (pair[0:2], pair[2:4])}
    if target.is_file():
        lookup: dict[str, Any] = _manifest_lookup(target)
    elif (target / MANIFEST_NAME).is_file():
        target = target / MANIFEST_NAME
        lookup = _manifest_lookup(target)
    elif target.is_dir():
        lookup = _folder_lookup(target, stems)
    else:
        raise FileNotFoundError(
            f"{target} not found; pass a manifest.csv, a dataset folder holding one, or a folder of face images"
        )

    resolved = []
    missing_lines = []
    for name1, number1, name2, number2, same, line in parsed:
        first, second = _image_stem(name1, number1), _image_stem(name2, number2)
        if first not in lookup or second not in lookup:
            absent = first if first not in lookup else second
            if not skip_missing:
                raise ValueError(
                    f"{pairs_txt}, line {line}: image {absent} is not in {target}; use the manifest or image "
                    f"folder this pairs file was made for, or pass skip_missing=True to leave such pairs out"
                )
            missing_lines.append(line)
            continue
        resolved.append((lookup[first], lookup[second], same))
    if missing_lines:
        logger.warning(
            "left out %d pairs of %s whose images are not in %s (lines %s)",
            len(missing_lines),
            pairs_txt,
            target,
            missing_lines[:20],
        )
    return resolved


# ---------------------------------------------------------------------------
# InsightFace .bin


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode``, which protocol-2 pickles written by Python 3 use for bytes."""
    if not isinstance(text, str) or codecs.lookup(encoding).name not in ("latin-1", "iso8859-1"):
        raise UnsafePickleError(f"_codecs.encode called with encoding {encoding!r}; only latin-1 text is allowed")
    return text.encode("latin-1")


class _RestrictedUnpickler(pickle.Unpickler):
    """Build only containers and scalars; the one global allowed is the latin-1 bytes encoder."""

    def __init__(self, handle: io.BufferedIOBase, path: Path) -> None:
        super().__init__(handle, encoding="bytes")  # Older .bin files store the JPEG bytes as Python 2 str
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise UnsafePickleError(
            f"{self._path} tries to build {module}.{name}; a verification .bin holds only a list of image "
            f"bytes and a list of booleans, so it was rejected unloaded. Obtain the file from a trusted source"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path} uses pickle persistent ids, which a verification .bin never needs")


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """Load an InsightFace verification ``.bin`` without running code from it.

    Returns:
        (2N encoded images, bool array of N "same person" flags); images ``2i``
        and ``2i+1`` form pair ``i``.

    Raises:
        UnsafePickleError: the pickle tries to build any object but lists,
            tuples, bytes, strings, numbers and booleans.
        ValueError: the content is not (list of 2N bytes, list of N booleans).
    """
    path = Path(path)
    with path.open("rb") as handle:
        try:
            content = _RestrictedUnpickler(handle, path).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError) as error:
            raise ValueError(f"{path} is not a readable pickle ({error}); the file is damaged, copy it again") from None
    if not isinstance(content, (tuple, list)) or len(content) != 2:
        raise ValueError(f"{path} holds a {type(content).__name__}, expected a pair (images, same-person flags)")
    images, flags = content
    if not isinstance(images, (list, tuple)) or not all(isinstance(image, (bytes, bytearray)) for image in images):
        raise ValueError(f"{path}: the first element must be a list of encoded image bytes")
    if not isinstance(flags, (list, tuple)) or not all(isinstance(flag, (bool, int)) for flag in flags):
        raise ValueError(f"{path}: the second element must be a list of booleans")
    if len(images) != 2 * len(flags):
        raise ValueError(
            f"{path} holds {len(images)} images for {len(flags)} pairs; expected exactly two images per pair"
        )
    return [bytes(image) for image in images], np.asarray(flags, dtype=bool)
