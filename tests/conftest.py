"""Shared pytest fixtures: paths to the real face data and model next to the repository.

The real data lives in ``../shared`` relative to the repository root. Tests
that need it skip with a reason when it is absent; none of them passes
without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path}; place the shared test data next to the repository")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``shared`` folder next to the repository root (real data and models)."""
    return _require(SHARED_DIR, "shared test data folder")


@pytest.fixture(scope="session")
def lfw_dir(shared_dir: Path) -> Path:
    """The LFW subset in InsightFace RecordIO layout, with manifest.csv, pairs.txt and lfw_fold1.bin."""
    return _require(shared_dir / "data" / "lfw" / "train.rec", "LFW RecordIO file").parent


@pytest.fixture(scope="session")
def orl_dir(shared_dir: Path) -> Path:
    """The ORL faces in InsightFace RecordIO layout with array labels."""
    return _require(shared_dir / "data" / "orl" / "train.rec", "ORL RecordIO file").parent


@pytest.fixture(scope="session")
def mobilefacenet_ckpt(shared_dir: Path) -> Path:
    """The pretrained MobileFaceNet checkpoint (CASIA-WebFace, ArcFace loss)."""
    return _require(shared_dir / "models" / "mobilefacenet_casia_arcface.ckpt", "MobileFaceNet checkpoint")


@pytest.fixture
def orl_copy(orl_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the ORL dataset folder (about 2 MB), for tests that damage or extend it."""
    import shutil

    target = tmp_path / "orl"
    shutil.copytree(orl_dir, target)
    for path in target.iterdir():
        path.chmod(0o644)
    return target


@pytest.fixture(autouse=True, scope="session")
def isolated_parity_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Keep the backend parity-gate cache of CLI runs out of the user's ~/.cache."""
    import os

    folder = tmp_path_factory.mktemp("parity-cache")
    previous = os.environ.get("MAGFACE_AL_CACHE")
    os.environ["MAGFACE_AL_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("MAGFACE_AL_CACHE", None)
    else:
        os.environ["MAGFACE_AL_CACHE"] = previous
