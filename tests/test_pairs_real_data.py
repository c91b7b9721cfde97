"""Splits, pairs, noise and feedback import on the real LFW subset; the extract, pairs and baseline stages."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from magface_al.data.faces import FaceRecordDataset
from magface_al.pairs import read_pairs_csv
from magface_al.pairs.feedback import ImageIndex, read_feedback_json
from magface_al.pairs.noise import realized_noise_rate, simulate_feedback
from magface_al.pairs.sampling import sample_pairs
from magface_al.pairs.splits import IdentitySplit, split_identities

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lfw(lfw_dir: Path) -> FaceRecordDataset:
    return FaceRecordDataset(lfw_dir)


def _load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_stage", REPO_ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve the module's annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_lfw_split_no_identity_in_two_parts(lfw):
    identities, counts = np.unique(lfw.labels, return_counts=True)
    split = split_identities(identities, (0.6, 0.2, 0.2), seed=0, image_counts=counts)
    parts = {name: set(split.part(name).tolist()) for name in ("feedback", "validation", "test")}
    assert not parts["feedback"] & parts["validation"]
    assert not parts["feedback"] & parts["test"]
    assert not parts["validation"] & parts["test"]
    assert set.union(*parts.values()) == set(identities.tolist())

    # Pairs drawn per part use only that part's identities, so no image is shared either.
    keys_by_part = {}
    for name, same in (("feedback", 500), ("validation", 200), ("test", 200)):
        pairs = sample_pairs(lfw.keys, lfw.labels, num_same=same, num_different=same, seed=1,
                             identities=split.part(name), description=f"the {name} part")
        assert set(pairs.identities.tolist()) <= parts[name]
        keys_by_part[name] = set(pairs.keys.tolist())
    assert not keys_by_part["feedback"] & keys_by_part["test"]
    assert not keys_by_part["validation"] & keys_by_part["test"]


def test_lfw_too_many_same_pairs_is_clear_error(lfw):
    # LFW here has 8101 same-person pairs in all.
    with pytest.raises(ValueError, match="can form only 8101 distinct same-person pairs, but 9000 were requested"):
        sample_pairs(lfw.keys, lfw.labels, num_same=9000, num_different=0, seed=0, description="LFW")


@pytest.mark.parametrize("correct_rate", [0.9, 0.75])
def test_lfw_realized_noise_within_one_point(lfw, correct_rate):
    pairs = sample_pairs(lfw.keys, lfw.labels, num_same=8000, num_different=42000, seed=2)
    assert len(np.unique(pairs.canonical(), axis=0)) == 50_000
    feedback = simulate_feedback(pairs, correct_rate, seed=3)
    assert abs(realized_noise_rate(feedback) - (1 - correct_rate)) < 0.01


def test_lfw_import_old_tool_feedback(lfw_dir, tmp_path):
    # The first protocol lines of pairs.txt, written as the earlier tool's feedback records.
    lines = (lfw_dir / "pairs.txt").read_text().splitlines()[1:11]
    records = []
    for line in lines:
        fields = line.split()
        if len(fields) == 3:
            name, first, second = fields[0], int(fields[1]), int(fields[2])
            records.append({"image1": f"{name}/{name}_{first:04d}.png", "image2": f"{name}/{name}_{second:04d}.png",
                            "label": "same", "identity1": name, "identity2": name})
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"pairs": records}))
    result = read_feedback_json(path, ImageIndex.from_manifest(lfw_dir / "manifest.csv"))
    assert len(result.pairs) == len(records) == 10
    assert (result.pairs.identity1 == result.pairs.identity2).all()
    assert result.identity_mismatches == 0


def _write_params(path: Path) -> None:
    params = {
        "extract": {"seed": 0, "num_identities": 60, "images_per_identity": 4, "min_images_per_identity": 3},
        "pairs": {
            "seed": 0, "feedback_fraction": 0.5, "validation_fraction": 0.25, "test_fraction": 0.25,
            "feedback_same": 40, "feedback_different": 40, "validation_same": 20, "validation_different": 20,
            "test_same": 30, "test_different": 30, "correct_rate": 0.8,
        },
        "model": {"arch": "mobilefacenet"},
        "baseline": {"batch_size": 32, "workers": 0, "device": "cpu"},
        "evaluation": {"folds": 5, "erc_fmr": 0.1},
    }
    path.write_text(yaml.safe_dump(params))


@pytest.mark.slow
def test_stages_extract_pairs_baseline(lfw_dir, mobilefacenet_ckpt, tmp_path):
    params = tmp_path / "params.yaml"
    _write_params(params)
    data, pairs_dir = tmp_path / "subset", tmp_path / "pairs"
    metrics = tmp_path / "metrics"

    _load_stage("extract").main(["--source", str(lfw_dir), "--out", str(data),
                                 "--metrics", str(metrics / "extract.json"), "--params", str(params)])
    extract = json.loads((metrics / "extract.json").read_text())
    assert extract["identities"] == 60
    assert extract["images"] <= 240

    _load_stage("pairs").main(["--data", str(data), "--out", str(pairs_dir),
                               "--metrics", str(metrics / "pairs.json"), "--params", str(params)])
    splits = IdentitySplit.from_dict(json.loads((pairs_dir / "splits.json").read_text()))
    test = read_pairs_csv(pairs_dir / "test.csv")
    assert set(test.identities.tolist()) <= set(splits.test.tolist())
    feedback = read_pairs_csv(pairs_dir / "feedback_truth.csv")
    assert set(feedback.identities.tolist()) <= set(splits.feedback.tolist())
    assert feedback.truth is not None

    _load_stage("baseline").main(["--model", str(mobilefacenet_ckpt), "--data", str(data), "--pairs", str(pairs_dir),
                                  "--metrics", str(metrics / "baseline.json"), "--plots", str(tmp_path / "plots"),
                                  "--features", str(tmp_path / "features"), "--params", str(params)])
    text = (metrics / "baseline.json").read_text()
    baseline = json.loads(text)
    assert "NaN" not in text and "Infinity" not in text
    assert baseline["num_pairs"] == 60
    assert baseline["auc"] > 0.9
    assert baseline["calibration"]["source"] == "validation"
    assert baseline["tar_at_far_1e-3"] is None
    assert (tmp_path / "plots" / "roc.csv").is_file()
    assert (tmp_path / "features" / "test" / "features.npy").is_file()
