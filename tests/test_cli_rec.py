"""The ``magface-al rec`` subcommands, called in-process and once through the installed console script."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from magface_al.cli import main
from magface_al.data.faces import FaceRecordDataset

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_rec_info_json(lfw_dir, capsys):
    assert main(["rec", "info", str(lfw_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 7701
    assert summary["identities"] == 4281
    assert summary["keys"] == 11983
    assert summary["header"] == {"key": 0, "first_identity_key": 7702, "end_key": 11983}
    assert summary["label_kind"] == "scalar"


def test_rec_info_text(orl_dir, capsys):
    assert main(["rec", "info", str(orl_dir)]) == 0
    out = capsys.readouterr().out
    assert "images:      400" in out
    assert "header:      key 0, image keys 1..400, identity records 401..440" in out
    assert "label kind:  array[2]" in out


def test_rec_info_missing_folder(tmp_path, capsys):
    assert main(["rec", "info", str(tmp_path)]) == 1
    assert "train.rec not found" in capsys.readouterr().err


def test_rec_check_sound(orl_dir, capsys):
    assert main(["rec", "check", str(orl_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checked"] == 400
    assert report["sound"] is True


def test_rec_check_damaged_lists_keys(orl_copy, capsys):
    offsets = dict(line.split() for line in (orl_copy / "train.idx").read_text().splitlines())
    raw = bytearray((orl_copy / "train.rec").read_bytes())
    offset = int(offsets["42"])
    _, lrec = struct.unpack_from("<II", raw, offset)
    image_start = offset + 8 + 32  # frame, IRHeader, two-value label array
    raw[image_start : offset + 8 + (lrec & 0x1FFFFFFF)] = bytes(offset + 8 + (lrec & 0x1FFFFFFF) - image_start)
    (orl_copy / "train.rec").write_bytes(bytes(raw))

    assert main(["rec", "check", str(orl_copy), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "checked 400 records" in out
    assert "1 damaged" in out
    assert "key 42: " in out
    assert "do not decode as an image" in out

    assert main(["rec", "check", str(orl_copy), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [record["key"] for record in report["damaged"]] == [42]


def test_rec_check_foreign_index(orl_copy, lfw_dir, capsys):
    (orl_copy / "train.rec").unlink()
    (orl_copy / "train.rec").symlink_to(lfw_dir / "train.rec")
    assert main(["rec", "check", str(orl_copy), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["damaged"]
    assert "no RecordIO record starts at byte offset" in report["damaged"][0]["reason"]


def test_rec_pack_and_read_back(orl_dir, tmp_path, capsys):
    source = FaceRecordDataset(orl_dir)
    for key in (1, 2, 11):
        folder = tmp_path / "faces" / f"person{source.label_of(key)}"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{key}.png"), source.image(key))
    code = main(["rec", "pack", str(tmp_path / "faces"), str(tmp_path / "out"), "--jpeg-quality", "90", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"out_dir": str(tmp_path / "out"), "images": 3, "identities": 2, "jpeg_quality": 90}
    packed = FaceRecordDataset(tmp_path / "out")
    assert packed.labels.tolist() == [0, 0, 1]


def test_rec_pack_bad_quality(tmp_path, capsys):
    assert main(["rec", "pack", str(tmp_path), str(tmp_path / "out"), "--jpeg-quality", "101"]) == 1
    assert "jpeg_quality is 101, expected an integer from 1 to 100" in capsys.readouterr().err


def test_rec_index_rebuilds(orl_copy, capsys):
    expected = (orl_copy / "train.idx").read_text()
    (orl_copy / "train.idx").unlink()
    assert main(["rec", "index", str(orl_copy)]) == 0
    assert (orl_copy / "train.idx").read_text() == expected


@pytest.mark.parametrize("subcommand", ["info", "check", "pack", "index"])
def test_rec_help(subcommand, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["rec", subcommand, "--help"])
    assert exit_info.value.code == 0
    assert "usage: magface-al rec " + subcommand in capsys.readouterr().out


def test_console_script_rec_info(orl_dir):
    script = Path(sys.executable).parent / "magface-al"
    if not script.exists():
        pytest.skip(f"console script {script} not installed; run `pip install -e .` in the environment")
    result = subprocess.run(
        [str(script), "rec", "info", str(orl_dir), "--json"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["identities"] == 40
