"""Acceptance: the pretrained MobileFaceNet reaches its measured LFW accuracy through `magface-al verify`.

Reference figure for this checkpoint and this LFW subset (CPU, fp32, 10-fold
protocol, single view): 98.47% +- 0.56. Feeding BGR instead of RGB costs about
half a point, so the 0.15-point tolerance catches a wrong channel order.
"""

from __future__ import annotations

import json

import pytest

from magface_al.cli import main

REFERENCE_ACCURACY = 0.9847
TOLERANCE = 0.0015


@pytest.mark.slow
def test_verify_lfw_pairs_accuracy(mobilefacenet_ckpt, lfw_dir, capsys):
    code = main(
        ["--log-level", "WARNING", "verify", "--checkpoint", str(mobilefacenet_ckpt)]
        + ["--pairs", str(lfw_dir / "pairs.txt"), "--data", str(lfw_dir), "--json"]
        + ["--batch-size", "64", "--workers", "2", "--no-progress", "--device", "cpu"]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["accuracy", "accuracy_std", "auc", "eer", "tar_at_far_1e-3"]
    assert abs(result["accuracy"] - REFERENCE_ACCURACY) <= TOLERANCE
    assert 0.002 < result["accuracy_std"] < 0.012
    assert result["auc"] > 0.99
    assert 0.0 < result["eer"] < 0.03
    assert 0.8 < result["tar_at_far_1e-3"] <= 1.0


@pytest.mark.slow
def test_verify_bin_fold(mobilefacenet_ckpt, lfw_dir, capsys):
    code = main(
        ["--log-level", "ERROR", "verify", "--checkpoint", str(mobilefacenet_ckpt), "--arch", "mobilefacenet"]
        + ["--pairs", str(lfw_dir / "lfw_fold1.bin"), "--no-progress", "--device", "cpu"]
    )
    assert code == 0
    output = capsys.readouterr().out
    assert "pairs: 600 (single view)" in output
    accuracy = float(output.split("accuracy (10-fold): ")[1].split("%")[0])
    assert 96.0 < accuracy <= 100.0


def test_verify_pairs_txt_needs_data(mobilefacenet_ckpt, lfw_dir, capsys):
    code = main(
        ["verify", "--checkpoint", str(mobilefacenet_ckpt), "--pairs", str(lfw_dir / "pairs.txt"), "--device", "cpu"]
    )
    assert code == 1
    assert "pairs.txt, which needs --data" in capsys.readouterr().err


def test_verify_preset_needs_arch(mobilefacenet_ckpt, lfw_dir, capsys):
    code = main(
        ["verify", "--checkpoint", str(mobilefacenet_ckpt), "--pairs", str(lfw_dir / "lfw_fold1.bin")]
        + ["--preset", "arcface_torch", "--device", "cpu"]
    )
    assert code == 1
    assert "--preset needs --arch" in capsys.readouterr().err
