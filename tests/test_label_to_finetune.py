"""Labels given on the labelling page in real headless Chromium drive `dvc repro` of the finetune stage.

In a copy of the project with tests/tiny_params.yaml, DVC runs the pipeline up
to the select stage. ``magface-al label`` serves the selected pairs, and
Chromium answers them by key and by click, "not sure" included. The feedback
file then becomes ``pairs.feedback_file`` in the copy's params.yaml, as the
README tells a user to do, and ``dvc repro finetune`` must re-import the pairs
and train on exactly the pairs answered "same" or "different". The whole
``dvc repro`` then completes on the human feedback, and a changed feedback
file makes the pairs stage stale.
"""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
import torch

from pipeline_helpers import UP_TO_DATE, commit_all, copy_project, dvc, load_strict_json
from test_label_browser import (  # noqa: F401 (playwright_api and label_command are fixtures)
    CHROMIUM,
    CHROMIUM_ARGS,
    TIMEOUT_MS,
    LabelProcess,
    label_command,
    playwright_api,
    wait_for_pair,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

FEEDBACK_FILE = "feedback/human.json"
# The answer and input method ("key" or "click") per selected pair, in order (five pairs with the tiny params).
ANSWER_PLAN = [("same", "key"), ("different", "click"), ("not_sure", "key"), ("same", "click"), ("different", "key")]
KEYS = {"same": "s", "different": "d", "not_sure": "n"}
BUTTONS = {"same": "#btn-same", "different": "#btn-different", "not_sure": "#btn-not-sure"}
LABELS = {"same": 1, "different": 0}


@pytest.fixture(scope="module")
def selected_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copy the project with the tiny params and run the pipeline up to the select stage."""
    repo = copy_project(tmp_path_factory.mktemp("label_to_finetune") / "repo")
    dvc(repo, "repro", "select", timeout=600)
    commit_all(repo, "tiny pipeline up to select")
    return repo


def answer_all_pairs(playwright, command: Path, repo: Path, feedback: Path, log_path: Path) -> list[str]:
    """Answer every selected pair in Chromium following ANSWER_PLAN; return the answers in pair order."""
    pair_count = len(json.loads((repo / "data/select/selected.json").read_text())["pairs"])
    server = LabelProcess(command, repo / "data/subset", repo / "data/select/selected.json", feedback, log_path)
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    answers = []
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(server.url)
        wait_for_pair(page, 0, 0)
        assert page.text_content("#progress-text") == f"0 of {pair_count} done"
        for index in range(pair_count):
            answer, how = ANSWER_PLAN[index % len(ANSWER_PLAN)]
            if how == "key":
                page.keyboard.press(KEYS[answer])
            else:
                page.click(BUTTONS[answer])
            answers.append(answer)
            if index + 1 < pair_count:
                wait_for_pair(page, index + 1, index + 1)
        page.wait_for_selector("#done-view:not([hidden])", timeout=TIMEOUT_MS)
        assert page.text_content("#progress-text") == f"{pair_count} of {pair_count} done"
    finally:
        browser.close()
        exit_code = server.stop(signal.SIGTERM)
    assert exit_code == 0, f"magface-al label exited with {exit_code}; its log is {log_path}"
    return answers


def set_feedback_file(repo: Path, value: str) -> None:
    """Set pairs.feedback_file in the copy's params.yaml by editing the one line, as a user would."""
    params = repo / "params.yaml"
    text = params.read_text(encoding="utf-8")
    assert text.count("feedback_file: null") == 1, "expected exactly one 'feedback_file: null' in params.yaml"
    params.write_text(text.replace("feedback_file: null", f"feedback_file: {value}"), encoding="utf-8")


def test_label_answers_drive_finetune_repro(playwright_api, label_command, selected_project, tmp_path):
    repo = selected_project
    selected = json.loads((repo / "data/select/selected.json").read_text())["pairs"]
    assert len(selected) >= len(ANSWER_PLAN), f"the select stage chose only {len(selected)} pairs"
    simulated = load_strict_json(repo / "metrics/pairs.json")
    assert simulated["feedback_source"] == "simulated"

    answers = answer_all_pairs(playwright_api, label_command, repo, repo / FEEDBACK_FILE, tmp_path / "server.log")
    answered = [(pair["key1"], pair["key2"], LABELS[answer]) for pair, answer in zip(selected, answers)
                if answer != "not_sure"]
    assert "not_sure" in answers
    written = json.loads((repo / FEEDBACK_FILE).read_text())["pairs"]
    assert [(r["key1"], r["key2"], r["label"]) for r in written] == answered

    set_feedback_file(repo, FEEDBACK_FILE)
    result = dvc(repo, "repro", "finetune", timeout=600)
    output = result.stdout + result.stderr
    assert "Running stage 'pairs'" in output, output
    assert "Running stage 'finetune'" in output, output

    pairs_metrics = load_strict_json(repo / "metrics/pairs.json")
    assert pairs_metrics["feedback_source"] == "human"
    assert pairs_metrics["feedback_pairs"] == len(answered)
    assert pairs_metrics["import_dropped"] == 0
    imported = json.loads((repo / "data/pairs/feedback.json").read_text())["pairs"]
    assert [(r["key1"], r["key2"], r["label"]) for r in imported] == answered
    assert {r["source"] for r in imported} == {"human"}

    finetune_metrics = load_strict_json(repo / "metrics/finetune.json")
    assert finetune_metrics["feedback_pairs"] == len(answered)
    assert finetune_metrics["training"]["train_pairs"] == len(answered)
    assert finetune_metrics["noise"]["realized_rate"] is None
    with (repo / "reports/suspicious_pairs.csv").open(newline="", encoding="utf-8") as handle:
        ranked = list(csv.DictReader(handle))
    trained = sorted((int(r["key1"]), int(r["key2"]), int(r["label"])) for r in ranked)
    assert trained == sorted(answered)
    assert "truth" not in ranked[0], "human feedback has no true labels, so the ranking must not show any"

    # The promoted checkpoint is the one this run trained: its epoch is the run's best epoch.
    checkpoint = torch.load(repo / "models/finetuned.pt", map_location="cpu", weights_only=True)
    assert checkpoint["extra"]["promoted"] == finetune_metrics["promoted"]
    expected_epoch = finetune_metrics["training"]["best_epoch"] if finetune_metrics["promoted"] else 0
    assert checkpoint["epoch"] == expected_epoch

    status = dvc(repo, "status", "--with-deps", "finetune")
    assert UP_TO_DATE in status.stdout, status.stdout

    # The whole pipeline runs on human feedback: the noise sweep trains on the answers as given.
    result = dvc(repo, "repro", timeout=900)
    sweep = load_strict_json(repo / "metrics/sweep/n00/finetune.json")
    assert sweep["noise"]["applied"] is False
    assert sweep["feedback_pairs"] == len(answered)
    assert UP_TO_DATE in dvc(repo, "status").stdout

    # A later session that changes the feedback file makes the pairs stage stale.
    changed = json.loads((repo / FEEDBACK_FILE).read_text())
    changed["pairs"] = changed["pairs"][:-1]
    (repo / FEEDBACK_FILE).write_text(json.dumps(changed), encoding="utf-8")
    status = dvc(repo, "status", "pairs").stdout
    assert "changed deps" in status, status
    assert "feedback" in status, status
