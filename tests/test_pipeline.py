"""The DVC pipeline as a team uses it, on a tiny configuration in a copy of the project.

One module-scoped run of ``dvc repro`` with tests/tiny_params.yaml serves the
metrics, status and declared-params checks. Later tests reuse the same copy:
they force a rerun, push to a temporary remote and clone, interrupt a stage,
and run experiments. The real-data test applies the documented change of
params for the user's own data to the LFW subset and the MobileFaceNet
checkpoint in ``../shared``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import yaml

from magface_al.params import TRACE_ENV, read_params
from pipeline_helpers import (
    METRICS_FILES,
    REPO_ROOT,
    TINY_PARAMS,
    UP_TO_DATE,
    commit_all,
    copy_project,
    dvc,
    dvc_command,
    file_digests,
    flat_keys,
    git,
    is_declared,
    load_strict_json,
    lock_differences,
    non_finite_numbers,
    pipeline_stages,
    read_trace,
    stage_env,
)

# Metadata that legitimately differs between the two models' metrics files.
MODEL_IDENTITY_KEYS = {"model", "arch"}


@dataclasses.dataclass
class TinyRun:
    """The copy the tiny pipeline ran in, and the results of its first run."""

    repo: Path
    trace: Path
    output: str
    lock: str
    stages: dict[str, dict[str, Any]]
    seconds: float


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """Copy the project with the tiny params, run ``dvc repro`` once with the params trace on, commit the result."""
    root = tmp_path_factory.mktemp("pipeline")
    repo = copy_project(root / "repo")
    trace = root / "params_trace.jsonl"
    started = time.perf_counter()
    result = dvc(repo, "repro", trace=trace, timeout=900)
    seconds = time.perf_counter() - started
    commit_all(repo, "tiny pipeline run")
    return TinyRun(
        repo=repo,
        trace=trace,
        output=result.stdout + result.stderr,
        lock=(repo / "dvc.lock").read_text(encoding="utf-8"),
        stages=pipeline_stages(repo),
        seconds=seconds,
    )


def _dotted_keys(value: Any, prefix: str = "", free: tuple[str, ...] = ()) -> set[str]:
    """Return the dotted keys of nested mappings, without the content of lists and of the ``free`` mappings."""
    if not isinstance(value, dict) or prefix in free:
        return {prefix}
    keys = {prefix} if prefix else set()
    for key, item in value.items():
        keys |= _dotted_keys(item, f"{prefix}.{key}" if prefix else str(key), free)
    return keys


def test_tiny_params_same_keys_as_params_yaml() -> None:
    # The tiny file replaces params.yaml in the copies. A key added to or removed
    # from params.yaml must be mirrored there, because the stages reject unknown keys.
    free = ("embedded", "sweep.noise")
    project = _dotted_keys(yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8")), free=free)
    tiny = _dotted_keys(yaml.safe_load(TINY_PARAMS.read_text(encoding="utf-8")), free=free)
    assert sorted(project - tiny) == [], f"keys of params.yaml missing from {TINY_PARAMS.name}"
    assert sorted(tiny - project) == [], f"keys of {TINY_PARAMS.name} that params.yaml does not have"


def test_params_trace_records_lookups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("a: {b: 1, c: {d: 2}}\nsweep: {noise: {n00: 0.0}}\n", encoding="utf-8")
    trace = tmp_path / "trace.jsonl"
    monkeypatch.delenv(TRACE_ENV, raising=False)
    assert type(read_params(params)) is dict
    read_params(params)["a"]
    assert not trace.exists()

    monkeypatch.setenv(TRACE_ENV, str(trace))
    data = read_params(params)
    assert data.get("sweep", {}).get("noise", {}).get("n00") == 0.0
    assert dict(data["a"]["c"]) == {"d": 2}
    recorded = [(entry["path"], entry["kind"]) for entry in read_trace(trace)]
    assert recorded == [
        ("sweep", "node"), ("sweep.noise", "node"), ("sweep.noise.n00", "value"),
        ("a", "node"), ("a.c", "node"), ("a.c", "value"), ("a.c.d", "value"),
    ]


@pytest.mark.slow
def test_pipeline_repro_writes_strict_metrics(tiny_run: TinyRun) -> None:
    declared = {path for info in tiny_run.stages.values() for path in info["metrics"]}
    assert sorted(set(METRICS_FILES) - declared) == [], "metrics files not declared as metrics in dvc.yaml"
    for name in sorted(declared):
        path = tiny_run.repo / name
        assert path.is_file(), f"{name} was not written"
        try:
            metrics = load_strict_json(path)
        except ValueError as error:
            pytest.fail(f"{name}: {error}")
        assert non_finite_numbers(metrics) == [], f"{name} holds non-finite numbers"
    baseline = flat_keys(load_strict_json(tiny_run.repo / "metrics/baseline.json"))
    finetuned = flat_keys(load_strict_json(tiny_run.repo / "metrics/finetuned.json"))
    assert baseline - MODEL_IDENTITY_KEYS == finetuned - MODEL_IDENTITY_KEYS
    assert {"accuracy", "auc"} <= baseline, sorted(baseline)


@pytest.mark.slow
def test_pipeline_status_clean_after_repro(tiny_run: TinyRun) -> None:
    assert "Running stage 'noise_sweep'" in tiny_run.output
    status = dvc(tiny_run.repo, "status")
    assert UP_TO_DATE in status.stdout, status.stdout


def _started_by(process_argv: list[str], stage_argv: list[str]) -> bool:
    """True if a process with ``process_argv`` belongs to the stage command ``stage_argv``.

    ``python stages/x.py ARGS`` runs one process. ``python -m
    magface_al.distributed.launch stages/x.py ARGS`` runs the launcher (its
    argv[0] is launch.py) and, under torchrun, ``stages/x.py ARGS`` per rank.
    """
    command = stage_argv[1:]
    if command[:2] != ["-m", "magface_al.distributed.launch"]:
        return process_argv == command
    launched = command[2:]
    return process_argv == launched or (process_argv[0].endswith("launch.py") and process_argv[1:] == launched)


@pytest.mark.slow
def test_pipeline_stages_read_only_declared_params(tiny_run: TinyRun) -> None:
    trace = read_trace(tiny_run.trace)
    problems = []
    for name, info in tiny_run.stages.items():
        reads = [entry for entry in trace if _started_by(entry["argv"], info["argv"])]
        if not reads:
            problems.append(f"{name}: no params lookup recorded (did it run, and does it use magface_al.params?)")
        undeclared = sorted({entry["path"] for entry in reads
                             if not is_declared(entry["path"], entry["kind"], info["params"])})
        if undeclared:
            problems.append(f"{name} reads {', '.join(undeclared)} but declares only {', '.join(info['params'])}")
    assert problems == []


@pytest.mark.slow
def test_pipeline_repro_force_reproduces_lock(tiny_run: TinyRun) -> None:
    dvc(tiny_run.repo, "repro", "--force", timeout=900)
    rerun = (tiny_run.repo / "dvc.lock").read_text(encoding="utf-8")
    assert lock_differences(tiny_run.lock, rerun) == [], "dvc repro --force changed dvc.lock"
    assert rerun == tiny_run.lock


@pytest.mark.slow
def test_pipeline_remote_clone_pull_reruns_nothing(tiny_run: TinyRun, tmp_path: Path) -> None:
    repo = tiny_run.repo
    dvc(repo, "remote", "add", "--force", "--default", "pipeline-test", str(tmp_path / "remote"))
    commit_all(repo, "remote for the test")
    dvc(repo, "push")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)], check=True, capture_output=True)
    dvc(clone, "pull")

    outputs = [out for info in tiny_run.stages.values() for out in info["outs"]]
    pulled = file_digests(clone, outputs)
    assert pulled == file_digests(repo, outputs)
    cached = [out for info in tiny_run.stages.values() for out in info["cached_outs"]]
    assert all((clone / out).exists() for out in cached)

    rerun = dvc(clone, "repro")
    assert "Running stage" not in rerun.stdout, rerun.stdout
    assert UP_TO_DATE in rerun.stdout, rerun.stdout


def _stage_process(parent: subprocess.Popen, script: str) -> psutil.Process | None:
    try:
        children = psutil.Process(parent.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if script in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.mark.slow
def test_pipeline_killed_stage_leaves_no_output(tiny_run: TinyRun) -> None:
    repo = tiny_run.repo
    stage, script, out = "sample@synthetic", "stages/sample.py", Path("data/sample")
    assert out.as_posix() in tiny_run.stages[stage]["outs"]
    before = file_digests(repo, [out.as_posix()])
    stale = set((repo / out.parent).glob(f".{out.name}.tmp-*"))
    repro = subprocess.Popen(
        [*dvc_command(), "repro", "--force", "--single-item", stage], cwd=repo, env=stage_env(repo),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    killed = False
    deadline = time.monotonic() + 120
    try:
        # Kill the stage once it has begun writing, i.e. a new temporary folder exists.
        while time.monotonic() < deadline and repro.poll() is None:
            process = _stage_process(repro, script)
            if process is not None and set((repo / out.parent).glob(f".{out.name}.tmp-*")) - stale:
                os.kill(process.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.005)
        output, _ = repro.communicate(timeout=120)
    finally:
        if repro.poll() is None:
            repro.kill()
    assert killed, f"the {stage} stage ended before it could be interrupted:\n{output}"
    assert repro.returncode != 0, output

    # DVC removes a stage's outputs before it runs the command, so the final
    # path is normally absent. If it exists, it must be the complete earlier output.
    if (repo / out).exists():
        assert file_digests(repo, [out.as_posix()]) == before, f"{out} holds a partial output"
    else:
        status = dvc(repo, "status", stage)
        assert UP_TO_DATE not in status.stdout, status.stdout
        assert "deleted" in status.stdout, status.stdout

    dvc(repo, "repro", timeout=900)
    assert UP_TO_DATE in dvc(repo, "status").stdout


def _finetune_lr(checkpoint: Path) -> Any:
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return stored["extra"]["finetune"]["training"]["lr"]


def _experiments(repo: Path) -> dict[str, dict[str, Any]]:
    """Map experiment name to its revision and data, from ``dvc exp show --json``."""
    rows = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    found = {}
    for row in rows:
        for experiment in row.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                found[rev.get("name") or rev["rev"]] = rev
    return found


@pytest.mark.slow
def test_exp_run_set_param_reaches_stage(tiny_run: TinyRun) -> None:
    repo = tiny_run.repo
    dvc(repo, "exp", "run", "--name", "lr-1e-5", "--set-param", "finetune.training.lr=1e-5", "finetune")
    # DVC writes the value back as 1e-05, which a YAML 1.1 reader takes for a string.
    written = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))["finetune"]["training"]["lr"]
    assert written == "1e-05"
    lr = _finetune_lr(repo / "models/finetuned.pt")
    assert isinstance(lr, float) and lr == pytest.approx(1e-5)

    experiment = _experiments(repo)["lr-1e-5"]
    assert experiment["data"]["params"]["params.yaml"]["data"]["finetune"]["training"]["lr"] == pytest.approx(1e-5)
    assert "metrics/finetune.json" in experiment["data"]["metrics"]


def _wait_for_idle_queue(repo: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = dvc(repo, "queue", "status").stdout
        if "0 active, 0 idle" in status:
            break
        time.sleep(1)
    return status


@pytest.mark.slow
def test_exp_queue_runs_in_temporary_copy(tiny_run: TinyRun) -> None:
    repo = tiny_run.repo
    git(repo, "checkout", "--quiet", "--", ".")
    dvc(repo, "checkout", "--force")
    dvc(repo, "exp", "run", "--queue", "--name", "lr-2e-5", "--set-param", "finetune.training.lr=2e-5", "finetune")
    try:
        dvc(repo, "exp", "run", "--run-all", timeout=600)
    finally:
        status = _wait_for_idle_queue(repo)
    assert "lr-2e-5" in status, status
    assert "Success" in status, status

    experiment = _experiments(repo)["lr-2e-5"]
    assert experiment["data"]["params"]["params.yaml"]["data"]["finetune"]["training"]["lr"] == pytest.approx(2e-5)
    assert "metrics/finetune.json" in experiment["data"]["metrics"]
    # The checkpoint the queued run saved, found through that experiment's dvc.lock.
    lock = yaml.safe_load(git(repo, "show", f"{experiment['rev']}:dvc.lock"))
    out = next(item for item in lock["stages"]["finetune"]["outs"] if item["path"] == "models/finetuned.pt")
    cached = repo / ".dvc" / "cache" / "files" / "md5" / out["md5"][:2] / out["md5"][2:]
    assert _finetune_lr(cached) == pytest.approx(2e-5)


def _real_data_params(lfw_dir: Path, orl_dir: Path, checkpoint: Path) -> dict[str, Any]:
    """The tiny params changed as the README documents for the user's own data and checkpoint."""
    params = yaml.safe_load(TINY_PARAMS.read_text(encoding="utf-8"))
    params["data"] = {"source": str(lfw_dir), "general": str(orl_dir)}
    params["model"].update(checkpoint=str(checkpoint), arch="mobilefacenet")
    params["embedded"] = {}
    # Two images of each of 60 people: every stage embeds few faces with the real model.
    params["extract"].update(num_identities=60, images_per_identity=2, min_images_per_identity=2)
    params["pairs"].update(feedback_same=20, feedback_different=20, validation_same=10, validation_different=10,
                           test_same=10, test_different=10)
    params["finetune"]["guard"]["benchmarks"] = [
        {"name": "orl", "kind": "sampled", "images": str(orl_dir), "num_same": 10, "num_different": 10, "seed": 0}
    ]
    params["sweep"]["noise"] = {"n20": 0.2}
    return params


@pytest.mark.slow
def test_pipeline_real_data_through_params(
    tmp_path: Path, lfw_dir: Path, orl_dir: Path, mobilefacenet_ckpt: Path
) -> None:
    params = tmp_path / "real_params.yaml"
    params.write_text(yaml.safe_dump(_real_data_params(lfw_dir, orl_dir, mobilefacenet_ckpt), sort_keys=False))
    repo = copy_project(tmp_path / "repo", params=params)
    stages = pipeline_stages(repo)
    assert not [name for name in stages if name.startswith(("sample", "pretrain"))]

    result = dvc(repo, "repro", timeout=900)
    assert "Running stage 'sample" not in result.stdout
    assert "Running stage 'pretrain" not in result.stdout
    assert not (repo / "data" / "sample").exists()
    assert not (repo / "models" / "pretrained.pt").exists()
    for name in ("metrics/baseline.json", "metrics/finetuned.json", "metrics/finetune.json"):
        metrics = load_strict_json(repo / name)
        assert non_finite_numbers(metrics) == [], name
    baseline = load_strict_json(repo / "metrics/baseline.json")
    assert baseline.get("arch") == "mobilefacenet", baseline.get("arch")
    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    workspace = next(iter(shown.values()))["data"]
    for name in ("metrics/baseline.json", "metrics/finetuned.json"):
        assert "accuracy" in workspace[name]["data"], name


def test_pipeline_stages_run_two_ranks(tiny_run: TinyRun) -> None:
    """distributed.nproc_per_node: 2 reruns the torchrun stages with two gloo ranks; embeddings equal one process's."""
    repo = tiny_run.repo
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    params["distributed"].update(nproc_per_node=2, threads_per_process=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    result = dvc(repo, "repro", timeout=900)
    output = result.stdout + result.stderr
    for stage in ("pretrain@synthetic", "baseline", "finetune", "evaluate"):
        assert f"Running stage '{stage}'" in output, stage
    assert "rank 1 of 2 joined the gloo process group" in output
    assert UP_TO_DATE in dvc(repo, "status").stdout
    for name in METRICS_FILES:
        assert non_finite_numbers(load_strict_json(repo / name)) == [], name

    # The baseline stage's command with one process, on the checkpoint the two-process run trained.
    params["distributed"].update(nproc_per_node=1)
    single_params = repo.parent / "single_process_params.yaml"
    single_params.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    command = [
        sys.executable, "-m", "magface_al.distributed.launch", "--params", str(single_params), "stages/baseline.py",
        "--model", "models/pretrained.pt", "--data", "data/subset", "--pairs", "data/pairs",
        "--params", str(single_params), "--metrics", str(repo.parent / "single.json"),
        "--plots", str(repo.parent / "single_plots"), "--features", str(repo.parent / "single_features"),
    ]
    single = subprocess.run(command, cwd=repo, env=stage_env(repo), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    for part in ("test", "val"):
        for array in ("keys", "features", "magnitudes"):
            two = np.load(repo / "features" / "baseline" / part / f"{array}.npy")
            one = np.load(repo.parent / "single_features" / part / f"{array}.npy")
            assert np.array_equal(two, one), f"{part}/{array}"
    assert load_strict_json(repo / "metrics" / "baseline.json") == load_strict_json(repo.parent / "single.json")
