"""The labelling page in real headless Chromium, against the ``magface-al label`` command.

A person's session is played through: answers by key and by click, undo,
a page reload, and the server killed with SIGKILL midway and started again.
No answer may be lost, and the feedback file must import cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from magface_al.data.faces import FaceRecordDataset, read_manifest
from magface_al.pairs.feedback import ImageIndex, read_feedback_json

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAIR_COUNT = 8
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def playwright_api():
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM}; install it with apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="module")
def label_command() -> Path:
    command = Path(sys.executable).parent / "magface-al"
    if not command.exists():
        pytest.skip(f"the magface-al command is not installed next to {sys.executable}; run pip install -e .")
    return command


@pytest.fixture
def selected_pairs(tmp_path: Path, lfw_dir: Path) -> Path:
    """Selected pairs over real LFW faces, named as the select stage names them."""
    manifest = {int(row["key"]): row for row in read_manifest(lfw_dir / "manifest.csv")}
    keys = FaceRecordDataset(lfw_dir).keys[:40:5].tolist()
    records = []
    for i in range(PAIR_COUNT):
        first, second = manifest[keys[i]], manifest[keys[(i + 3) % len(keys)]]
        records.append(
            {
                "key1": int(first["key"]), "key2": int(second["key"]),
                "image1": first["source_file"], "image2": second["source_file"],
                "identity1": first["identity"], "identity2": second["identity"],
            }
        )
    path = tmp_path / "selected.json"
    path.write_text(json.dumps({"pairs": records}))
    return path


class LabelProcess:
    """One run of ``magface-al label`` on a free port of 127.0.0.1."""

    def __init__(self, command: Path, dataset: Path, pairs: Path, feedback: Path, stderr_path: Path) -> None:
        self.stderr = stderr_path.open("ab")
        self.process = subprocess.Popen(
            [str(command), "--log-level", "DEBUG", "label", str(dataset), str(pairs), str(feedback),
             "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )
        line = self.process.stdout.readline().decode()
        if not line.startswith("Labelling page: "):
            self.process.kill()
            raise AssertionError(f"server did not start; stdout {line!r}, stderr in {stderr_path}")
        self.url = line.split(": ", 1)[1].strip()

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(timeout=20)
        self.process.stdout.close()
        self.stderr.close()
        return code


def wait_for_pair(page, index: int, done: int) -> None:
    page.wait_for_selector(f'body[data-pair-index="{index}"][data-done="{done}"]', timeout=TIMEOUT_MS)


def test_label_page_full_session(playwright_api, label_command, lfw_dir, selected_pairs, tmp_path):
    feedback = tmp_path / "feedback.json"
    stderr_path = tmp_path / "server.log"
    server = LabelProcess(label_command, lfw_dir, selected_pairs, feedback, stderr_path)
    profile = tmp_path / "profile"
    context = playwright_api.chromium.launch_persistent_context(
        str(profile),
        executable_path=str(CHROMIUM),
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1200, "height": 760},
    )
    console_errors: list[str] = []
    try:
        page = context.new_page()
        page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
        page.goto(server.url)
        wait_for_pair(page, 0, 0)
        assert page.text_content("#progress-text") == f"0 of {PAIR_COUNT} done"
        # Both faces are real decoded images, not broken placeholders.
        widths = page.eval_on_selector_all(".face img", "images => images.map(i => i.complete && i.naturalWidth)")
        assert widths == [112, 112]

        page.keyboard.press("s")
        wait_for_pair(page, 1, 1)
        page.click("#btn-different")
        wait_for_pair(page, 2, 2)
        page.keyboard.press("n")
        wait_for_pair(page, 3, 3)
        page.keyboard.press("u")  # withdraws "not sure" on pair 2 and shows it again
        wait_for_pair(page, 2, 2)
        assert "Undid the answer to pair 3" in page.text_content("#message")
        page.keyboard.press("d")
        wait_for_pair(page, 3, 3)

        page.reload()
        wait_for_pair(page, 3, 3)
        assert page.text_content("#progress-text") == f"3 of {PAIR_COUNT} done"
        page.click("#btn-same")
        wait_for_pair(page, 4, 4)
        assert console_errors == []

        # Kill the server outright: the four answers must already be on disk.
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
        on_disk = json.loads(feedback.read_text())["pairs"]
        assert [(r["key1"], r["label"]) for r in on_disk] == [
            (json.loads(selected_pairs.read_text())["pairs"][i]["key1"], label)
            for i, label in [(0, 1), (1, 0), (2, 0), (3, 1)]
        ]
        # An answer given while the server is down is reported as not saved.
        page.keyboard.press("s")
        page.wait_for_selector("#message.error", timeout=TIMEOUT_MS)
        assert "Not saved" in page.text_content("#message")

        restarted = LabelProcess(label_command, lfw_dir, selected_pairs, feedback, stderr_path)
        page.goto(restarted.url)
        wait_for_pair(page, 4, 4)
        assert page.text_content("#progress-text") == f"4 of {PAIR_COUNT} done"
        for index, key in zip(range(4, PAIR_COUNT), "sdns"):
            page.keyboard.press(key)
            if index + 1 < PAIR_COUNT:
                wait_for_pair(page, index + 1, index + 1)
        page.wait_for_selector("#done-view:not([hidden])", timeout=TIMEOUT_MS)
        assert page.text_content("#progress-text") == f"{PAIR_COUNT} of {PAIR_COUNT} done"
        screenshot = tmp_path / "label_page_done.png"
        page.screenshot(path=str(screenshot))
        assert screenshot.stat().st_size > 0
        assert restarted.stop(signal.SIGTERM) == 0
    finally:
        context.close()
        if server.process.poll() is None:
            server.stop(signal.SIGKILL)

    log = [json.loads(line) for line in feedback.with_name("feedback.answers.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log].count("undo") == 1
    assert len(log) == 10  # 9 answers (one of them withdrawn) and 1 undo

    index = ImageIndex.from_manifest(lfw_dir / "manifest.csv")
    imported = read_feedback_json(feedback, index)
    selected = json.loads(selected_pairs.read_text())["pairs"]
    # Pair 6 was answered "not sure", so it is absent from the feedback.
    expected = {0: 1, 1: 0, 2: 0, 3: 1, 4: 1, 5: 0, 7: 1}
    assert imported.pairs.key1.tolist() == [selected[i]["key1"] for i in expected]
    assert imported.pairs.label.tolist() == list(expected.values())
    assert imported.sources == ["human"] * len(expected)
    assert imported.identity_mismatches == 0
    assert imported.dropped == []


def test_label_page_screenshot_for_review(playwright_api, label_command, lfw_dir, selected_pairs, tmp_path):
    """Save a screenshot of the page mid-session; LABEL_SCREENSHOT names where, else tmp_path."""
    server = LabelProcess(label_command, lfw_dir, selected_pairs, tmp_path / "feedback.json", tmp_path / "server.log")
    browser = playwright_api.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(server.url)
        wait_for_pair(page, 0, 0)
        page.keyboard.press("s")
        wait_for_pair(page, 1, 1)
        page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        target = Path(os.environ.get("LABEL_SCREENSHOT", tmp_path / "label_page.png"))
        page.screenshot(path=str(target))
        assert target.stat().st_size > 10_000
    finally:
        browser.close()
        server.stop(signal.SIGTERM)
