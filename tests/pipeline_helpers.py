"""Helpers for the pipeline tests: copy the project, run git and DVC in the copy, read strict JSON.

The copy holds only what the pipeline needs (dvc.yaml, stages/, src/, the
DVC config) and never the outputs, the cache or the virtual environment of
the working tree it is copied from.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_PARAMS = REPO_ROOT / "tests" / "tiny_params.yaml"
TRACE_ENV = "MAGFACE_AL_PARAMS_TRACE"
UP_TO_DATE = "Data and pipelines are up to date"

# Tracked or not yet committed files under these names make up the project.
# Everything else (outputs, caches, tests, benchmarks) is left out of the copy.
PROJECT_DIRS = ("src/", "stages/", ".dvc/", "feedback/")
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "pyproject.toml")
SKIPPED_PARTS = ("__pycache__", ".egg-info")

# The pipeline's metrics files on the tiny configuration (sweep keys n00, n40).
METRICS_FILES = (
    "metrics/pretrain.json",
    "metrics/extract.json",
    "metrics/pairs.json",
    "metrics/baseline.json",
    "metrics/finetune.json",
    "metrics/finetuned.json",
    "metrics/select.json",
    "metrics/active_rounds.json",
    "metrics/sweep/n00/finetune.json",
    "metrics/sweep/n00/finetuned.json",
    "metrics/sweep/n40/finetune.json",
    "metrics/sweep/n40/finetuned.json",
    "metrics/noise_sweep.json",
)


def project_files(root: Path = REPO_ROOT) -> list[str]:
    """Return the project's files relative to ``root``: tracked ones and untracked ones git does not ignore."""
    listed: set[str] = set()
    for extra in ([], ["--others", "--exclude-standard"]):
        result = subprocess.run(
            ["git", "ls-files", "-z", *extra], cwd=root, check=True, capture_output=True, text=True
        )
        listed.update(name for name in result.stdout.split("\0") if name)
    return sorted(
        name
        for name in listed
        if (name.startswith(PROJECT_DIRS) or name in PROJECT_FILES)
        and not any(part in name for part in SKIPPED_PARTS)
        and (root / name).is_file()
    )


def copy_project(dest: Path, params: Path = TINY_PARAMS, root: Path = REPO_ROOT) -> Path:
    """Copy the project into ``dest`` with ``params`` as its params.yaml, and commit it to a fresh git repository."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in project_files(root):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    shutil.copyfile(params, dest / "params.yaml")
    git(dest, "init", "--quiet", "--initial-branch=main")
    commit_all(dest, "project copy")
    return dest


def git(repo: Path, *args: str) -> str:
    """Run git in ``repo`` with a fixed identity and return its standard output."""
    command = ["git", "-c", "user.name=pipeline test", "-c", "user.email=pipeline-test@localhost",
               "-c", "commit.gpgsign=false", *args]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    if result.returncode:
        raise AssertionError(f"git {' '.join(args)} failed in {repo}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def commit_all(repo: Path, message: str) -> None:
    """Stage every change in ``repo`` and commit it (allowing an empty commit)."""
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--allow-empty", "-m", message)


def stage_env(repo: Path, trace: Path | None = None) -> dict[str, str]:
    """Return the environment for DVC and the stages it starts.

    The virtual environment's bin folder comes first on PATH, because the
    stages are started as ``python stages/...``. The copy's own ``src`` comes
    first on PYTHONPATH, so that the stages run the copied library.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = str(repo / "src")
    env["DVC_NO_ANALYTICS"] = "1"
    env.pop(TRACE_ENV, None)
    if trace is not None:
        env[TRACE_ENV] = str(trace)
    return env


def dvc_command() -> list[str]:
    """Return the command of the DVC executable next to the running interpreter."""
    return [str(Path(sys.executable).parent / "dvc")]


def dvc(repo: Path, *args: str, trace: Path | None = None, timeout: float = 600, check: bool = True
        ) -> subprocess.CompletedProcess:
    """Run ``dvc ARGS`` in ``repo``. When ``check`` is set, a failure raises with DVC's output."""
    result = subprocess.run(
        [*dvc_command(), *args], cwd=repo, env=stage_env(repo, trace), capture_output=True, text=True,
        timeout=timeout,
    )
    if check and result.returncode:
        raise AssertionError(
            f"dvc {' '.join(args)} failed in {repo} (exit {result.returncode}):\n"
            f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
        )
    return result


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} in JSON")


def load_strict_json(path: Path) -> Any:
    """Parse ``path`` as JSON, rejecting NaN and infinities anywhere in it."""
    with path.open(encoding="utf-8") as handle:
        return json.load(handle, parse_constant=_reject_constant)


def non_finite_numbers(value: Any, where: str = "") -> list[str]:
    """Return the dotted paths of floats in ``value`` that are NaN or infinite."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [where or "<top>"]
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in non_finite_numbers(item, f"{where}.{key}".lstrip("."))]
    if isinstance(value, list):
        return [found for i, item in enumerate(value) for found in non_finite_numbers(item, f"{where}[{i}]")]
    return []


def flat_keys(value: Any, prefix: str = "") -> set[str]:
    """Return the dotted paths of every scalar or list in a nested JSON mapping."""
    if not isinstance(value, dict):
        return {prefix}
    keys: set[str] = set()
    for key, item in value.items():
        keys |= flat_keys(item, f"{prefix}.{key}" if prefix else str(key))
    return keys


def pipeline_stages(repo: Path) -> dict[str, dict[str, Any]]:
    """Describe each stage of ``repo`` as DVC resolves it: command, params keys and outputs.

    Returns a mapping from stage name (``pretrain@synthetic`` for ``foreach``
    entries) to ``cmd``, ``argv`` (the command split like a shell),
    ``params`` (declared params.yaml keys), ``outs`` (every output path) and
    ``metrics`` (the metrics outputs). Uses DVC's own loader, in a subprocess
    because DVC keeps state per process and working directory.
    """
    script = (
        "import json, sys\n"
        "from dvc.repo import Repo\n"
        "from dvc.dependency.param import ParamsDependency\n"
        "stages = {}\n"
        "with Repo(sys.argv[1]) as repo:\n"
        "    for stage in repo.index.stages:\n"
        "        params = []\n"
        "        for dep in stage.deps:\n"
        "            if isinstance(dep, ParamsDependency):\n"
        "                params += [str(key) for key in dep.params] if dep.params else ['<all params>']\n"
        "        stages[stage.addressing] = {\n"
        "            'cmd': stage.cmd, 'params': params,\n"
        "            'outs': [str(out.def_path) for out in stage.outs],\n"
        "            'cached_outs': [str(out.def_path) for out in stage.outs if out.use_cache],\n"
        "            'metrics': [str(out.def_path) for out in stage.outs if out.metric],\n"
        "        }\n"
        "print(json.dumps(stages))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(repo)], cwd=repo, env=stage_env(repo), capture_output=True, text=True,
        check=False, timeout=120,
    )
    if result.returncode:
        raise AssertionError(f"reading the stages of {repo} with DVC failed:\n{result.stderr[-4000:]}")
    stages = json.loads(result.stdout)
    for info in stages.values():
        info["argv"] = shlex.split(info["cmd"])
    return stages


def read_trace(path: Path) -> list[dict[str, Any]]:
    """Return the params lookups recorded in a trace file, one dict per lookup."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def is_declared(path: str, kind: str, declared: Iterable[str]) -> bool:
    """Return whether reading ``path`` is covered by the declared params keys.

    A value is covered by a declared key equal to it or above it. A node that
    is only descended into is also covered by a declared key below it.
    """
    for key in declared:
        if key == "<all params>" or path == key or path.startswith(key + "."):
            return True
        if kind == "node" and key.startswith(path + "."):
            return True
    return False


def file_digests(root: Path, names: Iterable[str]) -> dict[str, str]:
    """Return the SHA-256 of every file under each of ``names`` (files or folders) below ``root``."""
    import hashlib

    digests: dict[str, str] = {}
    for name in names:
        path = root / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digests[file.relative_to(root).as_posix()] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


def _lock_hashes(text: str) -> dict[tuple[str, str, str], Any]:
    data = yaml.safe_load(text) or {}
    hashes: dict[tuple[str, str, str], Any] = {}
    for stage, entry in (data.get("stages") or {}).items():
        for kind in ("deps", "outs"):
            for item in entry.get(kind) or []:
                hashes[(stage, kind, item["path"])] = item.get("md5")
        hashes[(stage, "params", "")] = entry.get("params")
        hashes[(stage, "cmd", "")] = entry.get("cmd")
    return hashes


def lock_differences(old: str, new: str) -> list[str]:
    """Name every stage entry whose hash, params or command differs between two dvc.lock texts."""
    before, after = _lock_hashes(old), _lock_hashes(new)
    return [
        f"{stage} {kind} {path}".rstrip() + f": {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(set(before) | set(after))
        for stage, kind, path in [key]
        if before.get(key) != after.get(key)
    ]
