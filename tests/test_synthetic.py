"""The synthetic face generator: determinism, domains and the RecordIO layout it writes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from magface_al.data.faces import FaceRecordDataset, read_manifest
from magface_al.data.pack import pack_folder
from magface_al.data.synthetic import (
    DOMAINS,
    DomainSettings,
    get_domain,
    iter_faces,
    render_face,
    sample_identity,
    with_overrides,
    write_synthetic_dataset,
)

SOURCE = DOMAINS["source"]


def test_render_face_shape_and_dtype() -> None:
    image = render_face(sample_identity(0, 0), 0, SOURCE, seed=0)
    assert image.shape == (112, 112, 3)
    assert image.dtype == np.uint8


def test_render_face_same_seed_identical_bytes() -> None:
    first = render_face(sample_identity(7, 3), 5, SOURCE, seed=7)
    second = render_face(sample_identity(7, 3), 5, SOURCE, seed=7)
    assert first.tobytes() == second.tobytes()


def test_render_face_images_of_identity_differ() -> None:
    identity = sample_identity(0, 1)
    first = render_face(identity, 0, SOURCE, seed=0)
    second = render_face(identity, 1, SOURCE, seed=0)
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 5


def test_sample_identity_stable_and_distinct() -> None:
    assert sample_identity(0, 4) == sample_identity(0, 4)
    assert sample_identity(0, 4) != sample_identity(0, 5)
    assert sample_identity(0, 4) != sample_identity(1, 4)


def test_sample_identity_features_near_arcface_template() -> None:
    # The ArcFace 112x112 template puts the eyes near row 52 and the mouth near row 92.
    identities = [sample_identity(0, index) for index in range(200)]
    eye_rows = np.array([identity.eye_row for identity in identities])
    mouth_rows = np.array([identity.mouth_row for identity in identities])
    assert 48 <= eye_rows.mean() <= 56
    assert 86 <= mouth_rows.mean() <= 96


def _mean_face_brightness(domain: str) -> float:
    images = [image for _, _, image in iter_faces(10, 4, domain=domain, seed=3)]
    return float(np.mean([image[30:100, 25:87].mean() for image in images]))


def test_target_domain_darker_than_source() -> None:
    assert _mean_face_brightness("target") < 0.8 * _mean_face_brightness("source")


def test_target_domain_blue_green_cast() -> None:
    images = np.stack([image for _, _, image in iter_faces(10, 4, domain="target", seed=3)]).astype(float)
    source = np.stack([image for _, _, image in iter_faces(10, 4, domain="source", seed=3)]).astype(float)
    target_red_share = images[..., 2].mean() / images.mean()
    source_red_share = source[..., 2].mean() / source.mean()
    assert target_red_share < source_red_share


def test_with_overrides_changes_one_setting() -> None:
    bright = with_overrides(SOURCE, brightness_range=(1.0, 1.0), blur_probability=0.0)
    assert bright.brightness_range == (1.0, 1.0)
    assert bright.max_roll == SOURCE.max_roll


def test_domain_settings_reject_probability_above_one() -> None:
    with pytest.raises(ValueError, match=r"invalid mask_probability 1.5 for domain 'odd': expected 0..1"):
        DomainSettings(name="odd", mask_probability=1.5)


def test_get_domain_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown synthetic domain 'night': expected one of source, target"):
        get_domain("night")


def test_iter_faces_rejects_zero_images() -> None:
    with pytest.raises(ValueError, match=r"invalid images_per_identity 0: expected at least 1"):
        list(iter_faces(2, 0))


def test_iter_faces_blocks_do_not_share_identities() -> None:
    first = {index for index, _, _ in iter_faces(3, 1, first_identity=0)}
    second = {index for index, _, _ in iter_faces(3, 1, first_identity=3)}
    assert first == {0, 1, 2}
    assert second == {3, 4, 5}


def test_write_synthetic_dataset_readable(tmp_path: Path) -> None:
    rows = write_synthetic_dataset(tmp_path, identities=4, images_per_identity=3, domain="target", seed=2)
    dataset = FaceRecordDataset(tmp_path)
    assert len(dataset) == 12
    assert dataset.identities.tolist() == [0, 1, 2, 3]
    assert dataset.keys_of(2).tolist() == [7, 8, 9]
    assert dataset.property == (4, 112, 112)
    assert len(rows) == 12
    manifest = read_manifest(tmp_path / "manifest.csv")
    assert manifest[4] == {"key": 5, "identity": "target_00001", "label": 1, "source_file": "target_00001/0001.jpg"}

    # The stored JPEG decodes to the rendered pixels up to compression error.
    rendered = render_face(sample_identity(2, 1), 1, DOMAINS["target"], seed=2)
    assert np.abs(dataset.image(5).astype(int) - rendered.astype(int)).mean() < 3


def test_write_synthetic_dataset_deterministic(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path / "a", identities=3, images_per_identity=2, seed=9)
    write_synthetic_dataset(tmp_path / "b", identities=3, images_per_identity=2, seed=9)
    for name in ("train.rec", "train.idx", "property", "manifest.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_write_synthetic_dataset_matches_pack_folder(tmp_path: Path) -> None:
    # PNG is lossless, so the packer re-encodes exactly the rendered pixels.
    folder = tmp_path / "images"
    for index, image_index, image in iter_faces(3, 4, seed=5, first_identity=10):
        target = folder / f"source_{index:05d}" / f"{image_index:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), image)
    pack_folder(folder, tmp_path / "packed")
    write_synthetic_dataset(tmp_path / "synthetic", identities=3, images_per_identity=4, seed=5, first_identity=10)
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "synthetic" / name).read_bytes() == (tmp_path / "packed" / name).read_bytes(), name


def test_write_synthetic_dataset_rejects_bad_quality(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"invalid jpeg_quality 0: expected an integer from 1 to 100"):
        write_synthetic_dataset(tmp_path, identities=1, images_per_identity=1, jpeg_quality=0)
