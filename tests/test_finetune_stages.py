"""End-to-end tests of the finetune and evaluate stages on a small synthetic RecordIO dataset."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from magface_al.data.faces import FaceRecordDataset
from magface_al.data.pack import pack_folder
from magface_al.data.synthetic import iter_faces
from magface_al.models import ModelSpec, build_model, load_model, save_checkpoint
from magface_al.pairs.noise import simulate_feedback
from magface_al.pairs.sampling import sample_pairs
from magface_al.pairs.splits import split_identities
from magface_al.pairs.table import write_pairs_csv
from magface_al.utils import write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]


def _stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO_ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the stage is executed
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    faces = root / "faces"
    for identity, index, image in iter_faces(16, 4, seed=0):
        folder = faces / f"person_{identity:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"person_{identity:02d}_{index:04d}.png"), image)
    pack_folder(faces, root / "data" / "subset")
    dataset = FaceRecordDataset(root / "data" / "subset")

    identities, counts = np.unique(dataset.labels, return_counts=True)
    split = split_identities(identities, (0.5, 0.25, 0.25), seed=0, image_counts=counts)
    pairs_dir = root / "data" / "pairs"
    feedback = sample_pairs(dataset.keys, dataset.labels, num_same=20, num_different=20, seed=1,
                            identities=split.feedback)
    write_json_atomic(pairs_dir / "splits.json", {"seed": 0, **split.to_dict()})
    write_pairs_csv(pairs_dir / "feedback_truth.csv", simulate_feedback(feedback, 0.9, seed=2))
    write_pairs_csv(pairs_dir / "val.csv", sample_pairs(dataset.keys, dataset.labels, num_same=12,
                                                        num_different=12, seed=3, identities=split.validation))
    write_pairs_csv(pairs_dir / "test.csv", sample_pairs(dataset.keys, dataset.labels, num_same=12,
                                                         num_different=12, seed=4, identities=split.test))

    torch.manual_seed(0)
    spec = ModelSpec(arch="iresnet", arch_kwargs={"layers": [1, 1, 1, 1], "width_multiplier": 0.125},
                     embedding_size=16)
    save_checkpoint(root / "models" / "pretrained.pt", build_model(spec).eval(), spec)
    return root


def _write_params(root: Path, *, benchmarks: list[dict], tolerance: float = 100.0) -> Path:
    params = {
        "model": {},
        "baseline": {"batch_size": 16, "workers": 0, "device": "cpu"},
        "evaluation": {"folds": 2, "identification": False},
        "finetune": {
            "device": "cpu",
            "batch_size": 16,
            "training": {"train": "head", "epochs": 2, "lr": 1e-3, "batch_size": 8, "seed": 0},
            "suspicious": {"exclude_top_fraction": 0.05},
            "guard": {"tolerance_points": tolerance, "folds": 2, "benchmarks": benchmarks},
        },
        "sweep": {"noise": {"n00": 0.0, "n40": 0.4}},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def _sampled_benchmark(root: Path) -> dict:
    return {"name": "synthetic", "kind": "sampled", "images": str(root / "data" / "subset"),
            "num_same": 20, "num_different": 20, "seed": 5}


def _finetune_args(root: Path, params: Path, tag: str, *extra: str) -> list[str]:
    return [
        "--model", str(root / "models" / "pretrained.pt"), "--data", str(root / "data" / "subset"),
        "--pairs", str(root / "data" / "pairs"), "--out", str(root / "models" / f"{tag}.pt"),
        "--metrics", str(root / "metrics" / f"{tag}.json"),
        "--suspicious", str(root / "reports" / f"{tag}.csv"), "--params", str(params), *extra,
    ]


def test_finetune_stage_writes_outputs(project):
    params = _write_params(project, benchmarks=[_sampled_benchmark(project)])
    assert _stage("finetune").main(_finetune_args(project, params, "tuned")) == 0

    metrics = json.loads((project / "metrics" / "tuned.json").read_text())
    assert metrics["promoted"] is True
    assert metrics["guard"]["benchmarks"][0]["name"] == "synthetic"
    assert metrics["feedback_pairs"] == 40
    assert metrics["suspicious"]["pairs"] == 40
    assert "flagged_precision" in metrics["suspicious"]
    assert len(metrics["training"]["history"]) >= 1

    with (project / "reports" / "tuned.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 40
    assert {"truth", "reason", "suspicion"} <= set(rows[0])

    model, spec = load_model(project / "models" / "tuned.pt", device="cpu")
    assert spec.arch == "iresnet"
    payload = torch.load(project / "models" / "tuned.pt", weights_only=True)
    assert payload["extra"]["promoted"] is True
    assert payload["extra"]["finetune"]["training"]["train"] == "head"


def test_finetune_stage_refused_keeps_pretrained(project):
    # Without a general benchmark the guard cannot show that nothing degraded.
    params = _write_params(project, benchmarks=[])
    _stage("finetune").main(_finetune_args(project, params, "refused"))
    metrics = json.loads((project / "metrics" / "refused.json").read_text())
    assert metrics["promoted"] is False
    assert metrics["promoted_reason"].startswith("no general benchmark was given")

    promoted, _ = load_model(project / "models" / "refused.pt", device="cpu")
    pretrained, _ = load_model(project / "models" / "pretrained.pt", device="cpu")
    reference = pretrained.state_dict()
    assert all(torch.equal(value, reference[name]) for name, value in promoted.state_dict().items())


def test_finetune_stage_noise_key_redraws_labels(project):
    params = _write_params(project, benchmarks=[_sampled_benchmark(project)])
    _stage("finetune").main(_finetune_args(project, params, "n40", "--noise-key", "n40"))
    metrics = json.loads((project / "metrics" / "n40.json").read_text())
    assert metrics["noise"]["key"] == "n40"
    assert metrics["noise"]["requested_rate"] == 0.4
    assert 0.15 < metrics["noise"]["realized_rate"] < 0.65
    assert metrics["suspicious"]["mislabelled"] == round(metrics["noise"]["realized_rate"] * 40)


def test_finetune_stage_unknown_noise_key(project):
    params = _write_params(project, benchmarks=[])
    with pytest.raises(ValueError, match="sweep.noise has no key 'n99'; expected one of n00, n40"):
        _stage("finetune").main(_finetune_args(project, params, "bad", "--noise-key", "n99"))


def test_evaluate_stage_matches_baseline_keys(project):
    params = _write_params(project, benchmarks=[_sampled_benchmark(project)])
    _stage("finetune").main(_finetune_args(project, params, "promoted"))
    common = ["--data", str(project / "data" / "subset"), "--pairs", str(project / "data" / "pairs"),
              "--params", str(params)]
    _stage("baseline").main([
        "--model", str(project / "models" / "pretrained.pt"), "--metrics", str(project / "metrics" / "baseline.json"),
        "--plots", str(project / "plots" / "baseline"), "--features", str(project / "features" / "baseline"), *common,
    ])
    _stage("evaluate").main([
        "--model", str(project / "models" / "promoted.pt"), "--metrics", str(project / "metrics" / "finetuned.json"),
        "--plots", str(project / "plots" / "finetuned"), "--features", str(project / "features" / "finetuned"),
        *common,
    ])
    baseline = json.loads((project / "metrics" / "baseline.json").read_text())
    tuned = json.loads((project / "metrics" / "finetuned.json").read_text())
    assert list(tuned) == list(baseline)
    assert tuned["calibration"]["source"] == "validation"
    assert sorted(p.name for p in (project / "plots" / "finetuned").iterdir()) == sorted(
        p.name for p in (project / "plots" / "baseline").iterdir()
    )


def test_evaluate_summarize_sweep_table(project, tmp_path):
    params = _write_params(project, benchmarks=[_sampled_benchmark(project)])
    baseline = {"accuracy": 0.9, "accuracy_at_operating_threshold": 0.88, "auc": 0.95}
    for key, accuracy in (("n00", 0.92), ("n40", 0.85)):
        write_json_atomic(tmp_path / "sweep" / key / "finetuned.json",
                          {"accuracy": accuracy, "accuracy_at_operating_threshold": accuracy, "auc": 0.96})
        write_json_atomic(tmp_path / "sweep" / key / "finetune.json",
                          {"promoted": key == "n00", "noise": {"realized_rate": 0.0},
                           "suspicious": {"flagged_precision": None},
                           "guard": {"benchmarks": [{"name": "orl", "delta_points": -0.1}]}})
    write_json_atomic(tmp_path / "baseline.json", baseline)
    _stage("evaluate").main([
        "summarize", "--baseline", str(tmp_path / "baseline.json"), "--sweep-dir", str(tmp_path / "sweep"),
        "--out", str(tmp_path / "noise_sweep.json"), "--markdown", str(tmp_path / "noise_sweep.md"),
        "--params", str(params),
    ])
    table = json.loads((tmp_path / "noise_sweep.json").read_text())
    assert list(table) == ["n00", "n40"]
    assert table["n00"]["delta_accuracy"] == pytest.approx(0.02)
    assert table["n40"]["delta_accuracy"] == pytest.approx(-0.05)
    assert table["n40"]["promoted"] is False
    assert table["n40"]["guard_delta_points_orl"] == -0.1
    assert "| n40 | 0.4000 | False |" in (tmp_path / "noise_sweep.md").read_text()
