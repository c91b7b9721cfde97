"""The HTML report and the offline DVC plots page, opened in Debian's headless Chromium with the network blocked.

The report test runs the visualize stage end to end on real LFW faces scored
by the pretrained MobileFaceNet: once from a single view and once with the
mirrored image added, which stand in for two models.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
OFFLINE_TEMPLATE = REPO_ROOT / ".dvc" / "plots" / "offline.html"
PAIRS_PER_CLASS = 100
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore::magface_al.evaluation.degenerate.UndefinedMetricWarning"),
]


@pytest.fixture(scope="module")
def playwright_api():
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium not found at {CHROMIUM}; install it with `apt-get install chromium`")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed in this environment")
    with sync_api.sync_playwright() as playwright:
        yield playwright


def load_stage():
    spec = importlib.util.spec_from_file_location("visualize_stage", REPO_ROOT / "stages" / "visualize.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def offline_page(playwright, profile_dir: Path):
    """Open a page in a fresh Chromium profile that aborts every request not for a local file.

    Yields the page, the list of blocked URLs and the list of console errors
    (console messages of type error and uncaught page exceptions).
    """
    context = playwright.chromium.launch_persistent_context(
        str(profile_dir), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 900},
    )
    blocked: list[str] = []
    errors: list[str] = []

    def route(request_route):
        if request_route.request.url.startswith("file:"):
            request_route.continue_()
        else:
            blocked.append(request_route.request.url)
            request_route.abort()

    try:
        context.route("**/*", route)
        page = context.new_page()
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page, blocked, errors
    finally:
        context.close()


def flatten(metrics: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def lfw_test_pairs(lfw_dir: Path):
    """The first PAIRS_PER_CLASS same-person and different-person pairs of LFW's first fold."""
    from magface_al.data.benchmarks import read_lfw_pairs
    from magface_al.data.faces import FaceRecordDataset
    from magface_al.pairs.table import Pairs

    resolved = read_lfw_pairs(lfw_dir / "pairs.txt", lfw_dir)
    fold = resolved[:600]  # 300 same-person pairs, then 300 different-person pairs
    chosen = fold[:PAIRS_PER_CLASS] + fold[300 : 300 + PAIRS_PER_CLASS]
    dataset = FaceRecordDataset(lfw_dir)
    key1 = np.array([int(a) for a, _, _ in chosen])
    key2 = np.array([int(b) for _, b, _ in chosen])
    label = np.array([int(same) for _, _, same in chosen])
    identity1 = np.array([dataset.label_of(k) for k in key1])
    identity2 = np.array([dataset.label_of(k) for k in key2])
    return dataset, Pairs(key1, key2, label, identity1, identity2)


def write_real_inputs(root: Path, lfw_dir: Path, checkpoint: Path) -> list[str]:
    """Embed the pairs' faces with MobileFaceNet twice (single view, with flip); write what the stage reads."""
    from magface_al.embedding import Embeddings, embed_images, save_embeddings
    from magface_al.evaluation.verification import cosine_scores, verification_metrics
    from magface_al.models.checkpoint import load_model
    from magface_al.pairs.table import write_pairs_csv
    from magface_al.utils import write_json_atomic

    dataset, pairs = lfw_test_pairs(lfw_dir)
    keys = np.unique(np.concatenate([pairs.key1, pairs.key2]))
    images = np.stack([dataset.image(int(k)) for k in keys])
    model, spec = load_model(checkpoint, device="cpu")
    key_to_row = {int(k): row for row, k in enumerate(keys)}

    single, magnitudes = embed_images(model, spec, images, flip=False, device="cpu")
    mirrored, mirrored_magnitudes = embed_images(model, spec, images[:, :, ::-1].copy(), flip=False, device="cpu")
    # The flip test adds the raw features of both views; rebuilt here to save a third pass on the CPU.
    combined = single * magnitudes[:, None] + mirrored * mirrored_magnitudes[:, None]
    combined /= np.linalg.norm(combined, axis=1, keepdims=True)
    labels = np.array([dataset.label_of(int(k)) for k in keys])
    for name, features in (("baseline", single), ("finetuned", combined)):
        save_embeddings(root / "features" / name, Embeddings(keys, labels, features, magnitudes))
        scores = cosine_scores(features, key_to_row, pairs)
        write_json_atomic(root / "metrics" / f"{name}.json", verification_metrics(scores, pairs.label, folds=10))
    write_pairs_csv(root / "pairs.csv", pairs)
    # Each model's best threshold on these pairs: a stand-in for a threshold calibrated on validation pairs.
    (root / "params.yaml").write_text("visualize:\n  samples_per_correct: 4\n  threshold_key: best_threshold\n")
    return [
        "--data", str(lfw_dir), "--pairs", str(root / "pairs.csv"),
        "--baseline-features", str(root / "features" / "baseline"),
        "--baseline-metrics", str(root / "metrics" / "baseline.json"),
        "--finetuned-features", str(root / "features" / "finetuned"),
        "--finetuned-metrics", str(root / "metrics" / "finetuned.json"),
        "--out", str(root / "reports"), "--plots", str(root / "plots"), "--params", str(root / "params.yaml"),
    ]


@pytest.mark.slow
def test_report_in_chromium_real_faces(tmp_path, playwright_api, lfw_dir, mobilefacenet_ckpt):
    argv = write_real_inputs(tmp_path, lfw_dir, mobilefacenet_ckpt)
    assert load_stage().main(argv) == 0
    report = tmp_path / "reports" / "html" / "report.html"
    summary = json.loads((tmp_path / "reports" / "baseline" / "error_summary.json").read_text())
    assert summary["pairs"] == 2 * PAIRS_PER_CLASS
    assert summary["unreadable_keys"] == []

    with offline_page(playwright_api, tmp_path / "profile") as (page, blocked, errors):
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate(
            "Array.from(document.images).map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}))"
        )
        cells = page.evaluate(
            "Array.from(document.querySelectorAll('td[data-metric]')).map(c => "
            "({model: c.dataset.model, metric: c.dataset.metric, text: c.innerText}))"
        )
        page.screenshot(path=str(tmp_path / "report_top.png"))
        page.screenshot(path=str(tmp_path / "report_full.png"), full_page=True)

    sources = [image["src"] for image in images]
    assert [image["src"] for image in images if not image["ok"]] == []
    assert sum(source.startswith("figures/") for source in sources) == 3
    assert sum(source.startswith("faces/") for source in sources) >= 2
    assert blocked == []
    assert errors == []

    shown = {(cell["model"], cell["metric"]): cell["text"] for cell in cells}
    checked = 0
    for model, file_name in (("baseline", "baseline.json"), ("fine-tuned", "finetuned.json")):
        metrics = flatten(json.loads((tmp_path / "metrics" / file_name).read_text()))
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert float(shown[(model, key)]) == pytest.approx(value, rel=1e-5, abs=1e-9), key
                checked += 1
    assert checked >= 20
    assert (tmp_path / "report_full.png").stat().st_size > 50_000


def write_dvc_project(root: Path) -> None:
    """A git + DVC project with the visualize plot tables of two models and top-level plot definitions."""
    from magface_al.report import ScoredPairs, write_plot_tables

    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    rng = np.random.default_rng(0)
    label = np.arange(400) % 2
    for name, noise in (("baseline", 0.2), ("finetuned", 0.12)):
        score = np.clip(0.5 * label + rng.normal(0.1, noise, 400), -1, 1)
        scored = ScoredPairs(
            key1=np.arange(400), key2=np.arange(400) + 1000, label=label, identity1=np.zeros(400),
            identity2=np.zeros(400), score=score, magnitude1=rng.uniform(10, 30, 400),
            magnitude2=rng.uniform(10, 30, 400), threshold=0.4,
        )
        write_plot_tables(root / "plots" / "visualize" / name, scored)
    (root / "dvc.yaml").write_text(
        "plots:\n"
        "  - roc:\n      x: fpr\n      y:\n"
        "        plots/visualize/baseline/roc.csv: tpr\n        plots/visualize/finetuned/roc.csv: tpr\n"
        "  - error_reject:\n      x: reject_fraction\n      y:\n"
        "        plots/visualize/baseline/error_reject.csv: error_rate\n"
        "        plots/visualize/finetuned/error_reject.csv: error_rate\n"
        "  - plots/visualize/baseline/score_histogram.csv:\n      x: score\n      y: [same_person, different_person]\n"
    )


def test_dvc_plots_render_offline(tmp_path, playwright_api):
    if shutil.which("git") is None:
        pytest.skip("git not found; `dvc plots show` needs a git repository")
    project = tmp_path / "project"
    project.mkdir()
    write_dvc_project(project)
    subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(OFFLINE_TEMPLATE), "-o", "out"],
        cwd=project, check=True, capture_output=True,
    )
    page_text = (project / "out" / "index.html").read_text(encoding="utf-8")
    assert "cdn.jsdelivr" not in page_text
    assert "<script src=" not in page_text

    with offline_page(playwright_api, tmp_path / "profile") as (page, blocked, errors):
        page.goto((project / "out" / "index.html").as_uri())
        page.wait_for_function(
            "document.querySelectorAll('.vega-embed canvas, .vega-embed svg.marks').length >= 3", timeout=30_000
        )
        page.screenshot(path=str(tmp_path / "dvc_plots.png"), full_page=True)

    assert blocked == []
    assert errors == []
