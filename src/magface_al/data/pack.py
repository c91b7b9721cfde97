"""Write face datasets in InsightFace's RecordIO layout: from a folder of images, or as a subset of another.

The output folder gets ``train.rec``, ``train.idx``, ``property`` and
``manifest.csv`` in the layout that MXNet-based InsightFace tools read:
key 0 is a header record with the label array ``(K, M)``, keys ``1..K-1``
are images sorted by identity, and keys ``K..M-1`` are one identity record
per identity holding its ``[start, end)`` image-key range. As in the
datasets InsightFace distributes, the header record is written last.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from magface_al.data.faces import (
    IDX_NAME,
    MANIFEST_NAME,
    PROPERTY_NAME,
    REC_NAME,
    FaceRecordDataset,
    read_manifest,
    write_manifest,
)
from magface_al.data.recordio import IRHeader, RecordIOWriter, pack_payload
from magface_al.utils import write_text_atomic

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


def _list_identities(folder: Path) -> list[tuple[str, list[Path]]]:
    """Return (identity name, image files) per sub-folder, both sorted by name; empty sub-folders dropped."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found; pass a folder with one sub-folder per identity")
    identities = []
    for sub in sorted(path for path in folder.iterdir() if path.is_dir()):
        files = sorted(path for path in sub.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            logger.warning("skipping %s: it holds no image files (%s)", sub, ", ".join(IMAGE_SUFFIXES))
            continue
        identities.append((sub.name, files))
    if not identities:
        raise ValueError(
            f"{folder} has no sub-folder with images; expected one sub-folder per identity holding "
            f"aligned face images ({', '.join(IMAGE_SUFFIXES)})"
        )
    return identities


def _encode_jpeg(path: Path, jpeg_quality: int) -> tuple[bytes, tuple[int, int]]:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path} could not be read as an image; remove it or replace it with a valid image file")
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
        raise ValueError(f"{path}: JPEG encoding failed; check that the file is an ordinary 8-bit image")
    return encoded.tobytes(), image.shape[:2]


def _write_layout(
    out_dir: Path,
    images: Sequence[tuple[int, bytes]],
    image_size: tuple[int, int],
    *,
    array_label: bool,
) -> list[tuple[int, int]]:
    """Write images (label, encoded bytes) sorted by label, then identity records and the header.

    Labels must be 0..N-1 and ``images`` sorted by label. Returns each identity's key range.
    """
    identity_count = images[-1][0] + 1 if images else 0
    first_identity_key = len(images) + 1
    end_key = first_identity_key + identity_count
    ranges = [(0, 0)] * identity_count
    with RecordIOWriter(out_dir / REC_NAME, out_dir / IDX_NAME) as writer:
        start = 1
        for key, (label, data) in enumerate(images, start=1):
            # Array labels follow the [identity, 0.0] form some InsightFace datasets use.
            value = np.array([label, 0.0], dtype=np.float32) if array_label else float(label)
            writer.write(key, pack_payload(IRHeader(0, value, key, 0), data))
            if key == len(images) or images[key][0] != label:
                ranges[label] = (start, key + 1)
                start = key + 1
        for identity, (begin, end) in enumerate(ranges):
            key = first_identity_key + identity
            writer.write(key, pack_payload(IRHeader(0, np.array([begin, end], dtype=np.float32), key, 0)))
        # id2 = 1 in the header record, as in the datasets InsightFace distributes.
        header = IRHeader(0, np.array([first_identity_key, end_key], dtype=np.float32), 0, 1)
        writer.write(0, pack_payload(header))
    height, width = image_size
    write_text_atomic(out_dir / PROPERTY_NAME, f"{identity_count},{height},{width}\n")
    return ranges


def pack_folder(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    jpeg_quality: int = 95,
    array_label: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Pack a folder of aligned faces, one sub-folder per identity, into a RecordIO dataset.

    Identities are numbered 0..N-1 in sub-folder name order and images are
    taken in file name order. Every image is re-encoded as JPEG from its BGR
    pixels, as InsightFace's packing tools do.

    Args:
        folder: the folder of identity sub-folders.
        out_dir: where ``train.rec``, ``train.idx``, ``property`` and ``manifest.csv`` go.
        jpeg_quality: JPEG quality, 1 to 100.
        array_label: store each image's label as the array ``[identity, 0.0]``
            (IRHeader flag 2) instead of a scalar.
        progress: show a progress bar.

    Returns:
        The manifest rows (``key,identity,label,source_file``) that were written.

    Raises:
        ValueError: the quality is out of range, an image cannot be read, or
            the images differ in size.
    """
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality is {jpeg_quality}, expected an integer from 1 to 100")
    folder, out_dir = Path(folder), Path(out_dir)
    identities = _list_identities(folder)
    total = sum(len(files) for _, files in identities)

    images: list[tuple[int, bytes]] = []
    rows: list[dict[str, Any]] = []
    image_size: tuple[int, int] | None = None
    first_file: Path | None = None
    with tqdm(total=total, desc=f"packing {folder.name}", unit="img", disable=not progress) as bar:
        for label, (name, files) in enumerate(identities):
            for path in files:
                data, size = _encode_jpeg(path, int(jpeg_quality))
                if image_size is None:
                    image_size, first_file = size, path
                elif size != image_size:
                    raise ValueError(
                        f"{path} is {size[1]}x{size[0]} pixels but {first_file} is {image_size[1]}x{image_size[0]}; "
                        f"align all faces to one size (112x112 for InsightFace models) before packing"
                    )
                images.append((label, data))
                rows.append(
                    {
                        "key": len(images),
                        "identity": name,
                        "label": label,
                        "source_file": path.relative_to(folder).as_posix(),
                    }
                )
                bar.update()

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_layout(out_dir, images, image_size or (0, 0), array_label=array_label)
    write_manifest(out_dir / MANIFEST_NAME, rows)
    logger.info("packed %d images of %d identities from %s into %s", len(images), len(identities), folder, out_dir)
    return rows


def write_subset(
    dataset: FaceRecordDataset,
    keys: Sequence[int] | np.ndarray,
    out_dir: str | os.PathLike,
    *,
    array_label: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Write the images ``keys`` of ``dataset`` as a new RecordIO dataset, relabelled 0..N-1.

    The encoded image bytes are copied as they are, without decoding. New
    labels follow the order of the original identity ids and images keep
    their original key order within an identity. Identity names and source
    files come from the dataset's ``manifest.csv`` when it has one; otherwise
    the identity name is the original label and the source file is empty.

    Returns:
        The manifest rows written: ``key,identity,label,source_file`` plus
        ``source_key`` and ``source_label`` (the original key and label).

    Raises:
        KeyError: a key is not an image of ``dataset``.
        ValueError: ``keys`` is empty or repeats a key.
    """
    keys = np.asarray(keys, dtype=np.int64).ravel()
    if not keys.size:
        raise ValueError(f"no keys given for a subset of {dataset.folder}; pass at least one image key")
    unique_keys = np.unique(keys)
    if unique_keys.size != keys.size:
        raise ValueError(f"the keys for a subset of {dataset.folder} repeat {keys.size - unique_keys.size} times; pass each key once")
    out_dir = Path(out_dir)
    source_labels = np.array([dataset.label_of(int(key)) for key in unique_keys], dtype=np.int64)
    order = np.lexsort((unique_keys, source_labels))
    new_labels = np.unique(source_labels, return_inverse=True)[1].astype(np.int64)
    source_rows = _manifest_by_key(dataset)

    images: list[tuple[int, bytes]] = []
    rows: list[dict[str, Any]] = []
    image_size: tuple[int, int] | None = None
    for position in tqdm(order.tolist(), desc=f"writing subset of {dataset.folder.name}", unit="img", disable=not progress):
        key = int(unique_keys[position])
        label = int(new_labels[position])
        images.append((label, dataset.image_bytes(key)))
        source = source_rows.get(key, {})
        rows.append(
            {
                "key": len(images),
                "identity": source.get("identity", str(int(source_labels[position]))),
                "label": label,
                "source_file": source.get("source_file", ""),
                "source_key": key,
                "source_label": int(source_labels[position]),
            }
        )
    if dataset.property is not None:
        image_size = dataset.property[1:]
    else:
        image_size = dataset.image(int(unique_keys[0])).shape[:2]

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_layout(out_dir, images, image_size, array_label=array_label)
    write_manifest(out_dir / MANIFEST_NAME, rows)
    logger.info(
        "wrote %d images of %d identities from %s into %s",
        len(images),
        int(new_labels.max()) + 1,
        dataset.folder,
        out_dir,
    )
    return rows


def _manifest_by_key(dataset: FaceRecordDataset) -> dict[int, dict[str, Any]]:
    path = dataset.folder / MANIFEST_NAME
    if not path.is_file():
        return {}
    return {row["key"]: row for row in read_manifest(path)}
