"""torch.distributed with two gloo processes on the CPU, started by the real torchrun.

Each run starts tests/distributed_worker.py under ``torchrun --standalone``.
The single-process reference runs under torchrun too, with one process, so
both use one thread per forward pass and differ only in the number of ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from magface_al.data.synthetic import write_synthetic_dataset
from magface_al.distributed.context import DistributedContext, current_context, init_distributed
from magface_al.distributed.embedding import shard_range, shards_root
from magface_al.distributed.launch import DistributedParams, torchrun_arguments
from magface_al.embedding import load_embeddings

WORKER = Path(__file__).with_name("distributed_worker.py")


def torchrun(nproc: int, *args: str, timeout: float = 300, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--max-restarts=0", str(WORKER), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def synthetic_faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(folder, identities=8, images_per_identity=12, seed=1)
    return folder


# --- shards -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "batch", "world", "expected"),
    [
        (200, 16, 2, [(0, 96), (96, 200)]),
        (64, 16, 2, [(0, 32), (32, 64)]),
        (10, 16, 2, [(0, 0), (0, 10)]),
        (0, 16, 3, [(0, 0), (0, 0), (0, 0)]),
        (100, 10, 3, [(0, 30), (30, 60), (60, 100)]),
    ],
)
def test_shard_range_splits_whole_batches(count: int, batch: int, world: int, expected: list[tuple[int, int]]) -> None:
    ranges = [shard_range(count, batch, rank, world) for rank in range(world)]
    assert ranges == expected


def test_shard_range_covers_every_row_once() -> None:
    for count in range(0, 70):
        rows = [row for rank in range(4) for row in range(*shard_range(count, 8, rank, 4))]
        assert rows == list(range(count))


def test_shard_range_rejects_rank_outside_world() -> None:
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2 processes"):
        shard_range(10, 4, 2, 2)


def test_single_process_context_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = init_distributed(torch.device("cpu"))
    assert context == DistributedContext()
    assert current_context().is_main
    assert not current_context().enabled


def test_init_without_rendezvous_variables_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="RANK, MASTER_ADDR, MASTER_PORT is not set; start the run with torchrun"):
        init_distributed(torch.device("cpu"))


# --- launcher ---------------------------------------------------------------


def test_launcher_single_node_is_standalone() -> None:
    arguments = torchrun_arguments(DistributedParams(nproc_per_node=4), "stages/baseline.py", ["--data", "d"])
    assert arguments == ["--nnodes=1", "--nproc-per-node=4", "--max-restarts=0", "--standalone",
                         "stages/baseline.py", "--data", "d"]


def test_launcher_several_nodes_use_the_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAGFACE_AL_RDZV_ENDPOINT", "node1:29500")
    arguments = torchrun_arguments(DistributedParams(nproc_per_node=8, nnodes=2), "s.py", [])
    assert "--rdzv-endpoint=node1:29500" in arguments
    assert "--rdzv-backend=c10d" in arguments
    assert "--standalone" not in arguments


def test_launcher_several_nodes_without_endpoint_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAGFACE_AL_RDZV_ENDPOINT", raising=False)
    with pytest.raises(ValueError, match="distributed.nnodes is 2, but no rendezvous endpoint is set"):
        torchrun_arguments(DistributedParams(nnodes=2), "s.py", [])


def test_distributed_params_reject_zero_processes() -> None:
    with pytest.raises(ValueError, match="distributed.nproc_per_node: must be at least 1, got 0"):
        DistributedParams(nproc_per_node=0)


# --- two ranks against one ---------------------------------------------------


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    embeddings = load_embeddings(folder, mmap=False)
    return {"keys": embeddings.keys, "labels": embeddings.labels, "features": np.asarray(embeddings.features),
            "magnitudes": embeddings.magnitudes}


def test_sharded_lfw_embedding_equals_single_process(lfw_dir: Path, mobilefacenet_ckpt: Path, tmp_path: Path) -> None:
    common = ["--count", "200", "--batch-size", "16"]
    torchrun(1, "embed", str(lfw_dir), str(mobilefacenet_ckpt), str(tmp_path / "one"), *common)
    torchrun(2, "embed", str(lfw_dir), str(mobilefacenet_ckpt), str(tmp_path / "two"), *common)
    torchrun(2, "embed", str(lfw_dir), str(mobilefacenet_ckpt), str(tmp_path / "memory"), *common, "--in-memory")
    single = _arrays(tmp_path / "one")
    assert len(single["keys"]) == 200
    for name in ("two", "memory"):
        merged = _arrays(tmp_path / name)
        for array, values in single.items():
            assert np.array_equal(merged[array], values), f"{name}: {array} differs from the single process"
    assert (tmp_path / "two" / "meta.json").read_text() == (tmp_path / "one" / "meta.json").read_text()
    assert not shards_root(tmp_path / "two").exists()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "weights.pt", weights_only=True)


def _max_parameter_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    # BatchNorm running statistics are left out: DDP keeps rank 0's, which saw half of each batch.
    names = [name for name, value in first.items() if value.is_floating_point() and "running_" not in name]
    return max(float((first[name] - second[name]).abs().max()) for name in names)


def test_ddp_magloss_matches_accumulated_single_process(synthetic_faces: Path, tmp_path: Path) -> None:
    for name in ("two", "accumulated", "one"):
        (tmp_path / name).mkdir()
    torchrun(2, "pretrain", str(synthetic_faces), str(tmp_path / "two"), "--steps", "6", "--batch-size", "16")
    torchrun(1, "pretrain", str(synthetic_faces), str(tmp_path / "accumulated"), "--steps", "6", "--batch-size", "16",
             "--accumulation", "2")
    torchrun(1, "pretrain", str(synthetic_faces), str(tmp_path / "one"), "--steps", "6", "--batch-size", "16")
    two, accumulated = _weights(tmp_path / "two"), _weights(tmp_path / "accumulated")
    # Stated tolerance: 1e-5 absolute on weights of magnitude up to ~1e3 after 6 SGD steps. The runs
    # do the same arithmetic, except for the order of the gradient sum.
    assert _max_parameter_difference(two, accumulated) <= 1e-5
    history_two = json.loads((tmp_path / "two" / "history.json").read_text())
    history_accumulated = json.loads((tmp_path / "accumulated" / "history.json").read_text())
    assert history_two[-1]["loss"] == pytest.approx(history_accumulated[-1]["loss"], rel=1e-6)
    assert history_two[-1]["train_accuracy"] == history_accumulated[-1]["train_accuracy"]
    # One process without accumulation normalizes BatchNorm over all 16 images, so it takes other steps.
    assert _max_parameter_difference(two, _weights(tmp_path / "one")) > 1e-3


def test_ddp_finetuning_matches_one_process(synthetic_faces: Path, tmp_path: Path) -> None:
    for name in ("two", "one"):
        (tmp_path / name).mkdir()
        torchrun(2 if name == "two" else 1, "finetune", str(synthetic_faces), str(tmp_path / name),
                 "--epochs", "3", "--batch-size", "16")
    two, one = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    # Stated tolerance: 1e-5 absolute (weights of magnitude ~1); the ranks sum gradients in another order.
    assert _max_parameter_difference(two, one) <= 1e-5
    history_two = json.loads((tmp_path / "two" / "history.json").read_text())
    history_one = json.loads((tmp_path / "one" / "history.json").read_text())
    assert len(history_two) == 4
    for epoch_two, epoch_one in zip(history_two[1:], history_one[1:]):
        assert epoch_two["train_loss"] == pytest.approx(epoch_one["train_loss"], rel=1e-5)
        assert epoch_two["val_accuracy"] == epoch_one["val_accuracy"]
    assert history_two[-1]["train_loss"] != history_two[1]["train_loss"], "training did not change the loss"


def _rank_process(parent: subprocess.Popen, rank: int, timeout: float = 60) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(parent.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "distributed_worker.py" in " ".join(child.cmdline()):
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} did not start within {timeout} s")


def test_killed_rank_leaves_no_output(lfw_dir: Path, mobilefacenet_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "embeddings"
    args = ("embed", str(lfw_dir), str(mobilefacenet_ckpt), str(out), "--count", "3000", "--batch-size", "16")
    run = torchrun(2, *args, wait=False)
    victim = _rank_process(run, 1)
    # Wait until rank 1 streams its shard, then kill it in the middle of the work.
    deadline = time.monotonic() + 120
    while not any(shards_root(out).glob("*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any(shards_root(out).glob("*")), "rank 1 never started its shard"
    time.sleep(1.0)
    victim.send_signal(signal.SIGKILL)
    output, _ = run.communicate(timeout=300)
    assert run.returncode != 0
    assert "rank      : 1" in output, output[-3000:]
    assert "Signal 9 (SIGKILL)" in output, output[-3000:]
    assert not out.exists(), "a killed run must not leave an output folder"
    # The next run removes the stale shards and completes.
    torchrun(2, "embed", str(lfw_dir), str(mobilefacenet_ckpt), str(out), "--count", "64", "--batch-size", "16")
    assert len(load_embeddings(out)) == 64
    assert not shards_root(out).exists()


def _cli_embed(nproc: int | None, lfw_dir: Path, checkpoint: Path, keys: Path, out: Path, backend: str) -> None:
    command = [str(Path(sys.executable).with_name("magface-al")), "embed", "--checkpoint", str(checkpoint),
               "--arch", "mobilefacenet", "--data", str(lfw_dir), "--keys", str(keys), "--out", str(out),
               "--backend", backend, "--batch-size", "16", "--workers", "1", "--no-progress"]
    if nproc is not None:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "--max-restarts=0", "--no-python", *command]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_cli_embed_torchrun_shares_auto_choice(
    lfw_dir: Path, mobilefacenet_ckpt: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("\n".join(str(key) for key in range(1, 97)) + "\n", encoding="utf-8")
    _cli_embed(2, lfw_dir, mobilefacenet_ckpt, keys, tmp_path / "auto", "auto")
    chosen = json.loads((tmp_path / "auto" / "meta.json").read_text())["backend"]
    engine = chosen.split("/")[0]
    # Rank 0 chose by timing and rank 1 ran the same engine, so one process running that engine agrees.
    _cli_embed(None, lfw_dir, mobilefacenet_ckpt, keys, tmp_path / "single", engine)
    single, merged = _arrays(tmp_path / "single"), _arrays(tmp_path / "auto")
    assert np.array_equal(single["keys"], merged["keys"])
    assert np.array_equal(single["features"], merged["features"]), f"{chosen}: ranks and one process differ"


def test_launcher_environment_endpoint_overrides_params(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAGFACE_AL_RDZV_ENDPOINT", "job-node:29400")
    params = DistributedParams(nnodes=2, rdzv_endpoint="stale-node:29500")
    assert "--rdzv-endpoint=job-node:29400" in torchrun_arguments(params, "s.py", [])


def test_merge_names_the_rank_whose_shard_is_missing(tmp_path: Path) -> None:
    from magface_al.distributed.embedding import _expected_shards, shard_folder

    out = tmp_path / "embeddings"
    shard_folder(out, 0).mkdir(parents=True)
    (shard_folder(out, 0) / "features.npy").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="the shard of rank 1 is missing"):
        _expected_shards(out, 64, 16, 2)
