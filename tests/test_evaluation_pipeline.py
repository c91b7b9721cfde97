"""evaluate_embeddings: calibration on validation pairs, true labels, the metrics layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from magface_al.embedding import Embeddings
from magface_al.evaluation.pipeline import EvaluationOptions, evaluate_embeddings, write_evaluation
from magface_al.pairs.noise import simulate_feedback
from magface_al.pairs.sampling import sample_pairs

pytestmark = pytest.mark.filterwarnings("ignore::magface_al.evaluation.degenerate.UndefinedMetricWarning")


def _embeddings(identities: int = 40, per_identity: int = 4, noise: float = 0.6, seed: int = 0) -> Embeddings:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(identities), per_identity)
    raw = rng.normal(size=(identities, 32))[labels] + rng.normal(scale=noise, size=(len(labels), 32))
    magnitudes = np.linalg.norm(raw, axis=1)
    return Embeddings(
        keys=np.arange(1, len(labels) + 1),
        labels=labels,
        features=(raw / magnitudes[:, None]).astype(np.float32),
        magnitudes=magnitudes.astype(np.float32),
    )


def test_evaluate_calibrates_on_validation():
    embeddings = _embeddings()
    val = sample_pairs(embeddings.keys, embeddings.labels, num_same=40, num_different=40, seed=0,
                       identities=np.arange(0, 20))
    test = sample_pairs(embeddings.keys, embeddings.labels, num_same=60, num_different=60, seed=1,
                        identities=np.arange(20, 40))
    result = evaluate_embeddings(embeddings, val, test, options=EvaluationOptions(folds=5))
    metrics = result.metrics
    assert metrics["calibration"]["source"] == "validation"
    assert metrics["operating_threshold"] == pytest.approx(metrics["calibration"]["threshold"])
    assert metrics["num_pairs"] == 120
    assert metrics["identification"]["num_gallery"] == 20
    assert metrics["identification"]["num_probes"] == 60
    assert "erc_fmr_1e-3_fnmr_drop" in metrics["quality"]
    json.dumps(metrics, allow_nan=False)


def test_evaluate_scores_against_truth_not_noisy_label():
    embeddings = _embeddings(noise=0.3)
    val = sample_pairs(embeddings.keys, embeddings.labels, num_same=40, num_different=40, seed=0,
                       identities=np.arange(0, 20))
    test = sample_pairs(embeddings.keys, embeddings.labels, num_same=60, num_different=60, seed=1,
                        identities=np.arange(20, 40))
    noisy_test = simulate_feedback(test, 0.5, seed=2)
    clean = evaluate_embeddings(embeddings, val, test, options=EvaluationOptions(folds=5)).metrics
    noisy = evaluate_embeddings(embeddings, val, noisy_test, options=EvaluationOptions(folds=5)).metrics
    assert noisy["auc"] == pytest.approx(clean["auc"])
    assert noisy["confusion"] == clean["confusion"]


def test_evaluate_falls_back_to_fixed_threshold():
    embeddings = _embeddings()
    val = sample_pairs(embeddings.keys, embeddings.labels, num_same=10, num_different=0, seed=0)
    test = sample_pairs(embeddings.keys, embeddings.labels, num_same=20, num_different=20, seed=1)
    metrics = evaluate_embeddings(embeddings, val, test, options=EvaluationOptions(folds=5)).metrics
    assert metrics["calibration"]["source"] == "fixed"
    assert metrics["operating_threshold"] == 0.4
    assert "single class" in metrics["calibration"]["source_reason"]


def test_write_evaluation_files(tmp_path):
    embeddings = _embeddings()
    val = sample_pairs(embeddings.keys, embeddings.labels, num_same=20, num_different=20, seed=0,
                       identities=np.arange(0, 20))
    test = sample_pairs(embeddings.keys, embeddings.labels, num_same=20, num_different=20, seed=1,
                        identities=np.arange(20, 40))
    result = evaluate_embeddings(embeddings, val, test, options=EvaluationOptions(folds=5))
    write_evaluation(result, metrics_path=tmp_path / "m.json", plots_dir=tmp_path / "plots",
                     features_dir=tmp_path / "features", val_pairs=val, extra_metrics={"model": "synthetic"})
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert list(metrics)[0] == "model"
    for name in ("roc.csv", "score_histogram.csv", "error_reject.csv"):
        assert (tmp_path / "plots" / name).is_file(), name
    test_keys = np.load(tmp_path / "features" / "test" / "keys.npy")
    assert set(test.keys.tolist()) <= set(test_keys.tolist())
    assert len(test_keys) == 80  # every image of the 20 test identities
