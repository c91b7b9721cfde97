"""Typed params loading: conversions DVC's rewriting makes necessary, and clear errors."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import pytest
import yaml

from magface_al.params import ParamsError, from_mapping, load_section


@dataclasses.dataclass
class Inner:
    rate: float = 0.5


@dataclasses.dataclass
class Section:
    lr: float
    epochs: int = 3
    enabled: bool = True
    loss: Literal["cosine", "euclidean"] = "cosine"
    path: str = "data"
    checkpoint: Optional[str] = None
    sizes: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_float_written_by_dvc_as_string_converts():
    # `dvc exp run -S finetune.lr=1e-5` writes 1e-05, a string to YAML 1.1 parsers.
    raw = yaml.safe_load("lr: 1e-05\n")
    assert raw["lr"] == "1e-05"
    section = from_mapping(Section, raw, "finetune")
    assert section.lr == pytest.approx(1e-5)
    assert isinstance(section.lr, float)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [({"epochs": 4.0}, 4), ({"epochs": "5"}, 5), ({"epochs": "1e1"}, 10)],
)
def test_integer_accepts_integral_values(raw, expected):
    assert from_mapping(Section, {"lr": 0.1, **raw}, "s").epochs == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"lr": "fast"}, r"s\.lr: expected a number, got 'fast'"),
        ({"lr": 0.1, "epochs": 2.5}, r"s\.epochs: expected an integer, got 2\.5"),
        ({"lr": 0.1, "enabled": "maybe"}, r"s\.enabled: expected true or false"),
        ({"lr": 0.1, "loss": "l1"}, r"s\.loss: invalid value 'l1'; expected one of 'cosine', 'euclidean'"),
        ({"lr": 0.1, "sizes": [1, "x"]}, r"s\.sizes\[1\]: expected an integer"),
        ({"lr": 0.1, "inner": {"rate": "high"}}, r"s\.inner\.rate: expected a number"),
        ({"lr": 0.1, "epoch": 3}, r"s: unknown key\(s\) epoch"),
        ({}, r"s\.lr: missing; add it to params\.yaml"),
    ],
)
def test_invalid_values_name_the_key(raw, message):
    with pytest.raises(ParamsError, match=message):
        from_mapping(Section, raw, "s")


def test_optional_accepts_null_and_string():
    assert from_mapping(Section, {"lr": 1, "checkpoint": None}, "s").checkpoint is None
    assert from_mapping(Section, {"lr": 1, "checkpoint": "m.pt"}, "s").checkpoint == "m.pt"


def test_load_section_reads_nested_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("finetune:\n  sweep:\n    lr: 1e-3\n    epochs: 7\n")
    section = load_section(Section, "finetune.sweep", path)
    assert section.lr == pytest.approx(1e-3)
    assert section.epochs == 7


def test_load_section_missing_section(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("other: {}\n")
    with pytest.raises(ParamsError, match="section 'finetune' is missing"):
        load_section(Section, "finetune", path)


def test_load_section_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_section(Section, "finetune", tmp_path / "absent.yaml")
