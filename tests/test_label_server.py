"""Tests of the labelling HTTP server over the real LFW RecordIO images."""

from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from magface_al.data.faces import FaceRecordDataset
from magface_al.labeling.server import LabelServer, create_server
from magface_al.labeling.store import AnswerStore, LabelStoreError, PairToLabel

PAIR_COUNT = 6


@pytest.fixture(scope="module")
def lfw_dataset(lfw_dir: Path) -> FaceRecordDataset:
    return FaceRecordDataset(lfw_dir)


@pytest.fixture
def server(tmp_path: Path, lfw_dataset: FaceRecordDataset) -> Iterator[LabelServer]:
    keys = lfw_dataset.keys[: 2 * PAIR_COUNT].tolist()
    pairs = [PairToLabel(key1=keys[2 * i], key2=keys[2 * i + 1]) for i in range(PAIR_COUNT)]
    store = AnswerStore(pairs, tmp_path / "answers.jsonl", tmp_path / "feedback.json")
    label_server = create_server(store, lfw_dataset, host="127.0.0.1", port=0)
    thread = threading.Thread(target=label_server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield label_server
    label_server.shutdown()
    label_server.server_close()
    store.close()
    thread.join(timeout=5)


def request(
    server: LabelServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        # http.client sends the path as given, without normalizing "..", unlike a browser.
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None and "Content-Length" not in (headers or {}):
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def post_json(server: LabelServer, path: str, data: Any) -> tuple[int, Any]:
    status, _, body = request(
        server, "POST", path, json.dumps(data).encode(), {"Content-Type": "application/json"}
    )
    return status, json.loads(body)


def log_entries(server: LabelServer) -> list[dict]:
    return [json.loads(line) for line in server.store.log_path.read_text().splitlines()]


def test_server_serves_page_and_static_files(server):
    for path, content_type in [
        ("/", "text/html"),
        ("/static/app.js", "text/javascript"),
        ("/static/style.css", "text/css"),
    ]:
        status, headers, body = request(server, "GET", path)
        assert status == 200, path
        assert headers["Content-Type"].startswith(content_type)
        assert body


def test_server_page_loads_nothing_from_other_hosts(server):
    _, headers, body = request(server, "GET", "/")
    assert b"http://" not in body
    assert b"https://" not in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]


def test_server_serves_pair_image_as_jpeg(server, lfw_dataset):
    key = server.store.pairs[0].key1
    status, headers, body = request(server, "GET", f"/images/{key}.jpg")
    assert status == 200
    assert headers["Content-Type"] == "image/jpeg"
    assert body == lfw_dataset.image_bytes(key)
    assert body.startswith(b"\xff\xd8")


def test_server_state_names_next_pair(server):
    status, _, body = request(server, "GET", "/api/state")
    state = json.loads(body)
    assert status == 200
    assert state["total"] == PAIR_COUNT
    assert state["pair"]["index"] == 0
    assert state["pair"]["image1_url"] == f"/images/{server.store.pairs[0].key1}.jpg"
    assert [p["index"] for p in state["upcoming"]] == [1, 2, 3]


def test_server_answer_and_undo(server):
    status, state = post_json(server, "/api/answers", {"pair": 0, "answer": "same"})
    assert status == 200
    assert state["done"] == 1
    assert state["pair"]["index"] == 1
    status, state = post_json(server, "/api/undo", {})
    assert status == 200
    assert state["undone"] == 0
    assert state["done"] == 0
    feedback = json.loads(server.store.feedback_path.read_text())
    assert feedback == {"pairs": []}
    assert [e["event"] for e in log_entries(server)] == ["answer", "undo"]


def test_server_pair_route(server):
    post_json(server, "/api/answers", {"pair": 2, "answer": "different"})
    status, _, body = request(server, "GET", "/api/pairs/2")
    assert status == 200
    assert json.loads(body)["answer"] == "different"
    status, _, _ = request(server, "GET", f"/api/pairs/{PAIR_COUNT}")
    assert status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/../../etc/passwd",
        "/static/../store.py",
        "/static/..%2fstore.py",
        "/static/%2e%2e/server.py",
        "/images/../../../etc/passwd",
        "/images/..%2f..%2ftrain.rec",
        "/images/1.jpg/../../server.py",
        "//etc/passwd",
        "/static/",
        "/labeling/server.py",
        "/images/-1.jpg",
        "/images/1",
        "/images/abc.jpg",
    ],
)
def test_server_path_outside_routes_is_404(server, path):
    status, _, body = request(server, "GET", path)
    assert status == 404
    assert b"import" not in body
    assert b"root:" not in body


def test_server_image_not_in_pairs_is_404(server, lfw_dataset):
    outside = int(lfw_dataset.keys[-1])
    status, _, body = request(server, "GET", f"/images/{outside}.jpg")
    assert status == 404
    assert json.loads(body)["error"] == f"no image with key {outside} in the selected pairs"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "invalid JSON body"),
        (b"\xff\xfe", 400, "invalid JSON body"),
        (b"[1, 2]", 400, "expected a JSON object with pair and answer"),
        (b'{"answer": "same"}', 400, "pair must be an integer index, got None"),
        (b'{"pair": "0", "answer": "same"}', 400, "pair must be an integer index, got '0'"),
        (b'{"pair": 99, "answer": "same"}', 400, "pair index 99 is outside 0..5"),
        (b'{"pair": 0}', 400, "answer must be a string, got None"),
        (b'{"pair": 0, "answer": "maybe"}', 400, "answer must be one of same, different, not_sure"),
        (b'{"pair": 0, "answer": "same", "key1": 12345}', 409, "reload the page"),
    ],
)
def test_server_rejects_malformed_answer(server, body, status, message):
    got_status, _, got_body = request(server, "POST", "/api/answers", body, {"Content-Type": "application/json"})
    assert got_status == status
    assert message in json.loads(got_body)["error"]
    assert log_entries(server) == []


def test_server_rejects_non_json_content_type(server):
    status, _, body = request(
        server, "POST", "/api/answers", b"pair=0&answer=same", {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 415
    assert log_entries(server) == []


def test_server_rejects_missing_content_length(server):
    status, _, _ = request(server, "POST", "/api/answers", None, {"Content-Type": "application/json"})
    assert status == 411


def test_server_rejects_oversized_body(server):
    status, _, _ = request(
        server, "POST", "/api/answers", b"{}", {"Content-Type": "application/json", "Content-Length": "1000000"}
    )
    assert status == 413


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_server_rejects_other_methods(server, method):
    status, _, _ = request(server, method, "/api/answers", b"{}")
    assert status == 405


def test_server_post_to_unknown_path_is_404(server):
    status, _ = post_json(server, "/api/../answers", {"pair": 0, "answer": "same"})
    assert status == 404
    assert log_entries(server) == []


def test_server_two_tabs_at_once_both_recorded(server):
    """Two clients post at the same moment, for different pairs and for the same pair."""
    barrier = threading.Barrier(2)
    results: list[int] = []
    plan = [[(0, "same"), (2, "same"), (4, "same")], [(1, "different"), (3, "different"), (4, "not_sure")]]

    def tab(answers: list[tuple[int, str]]) -> None:
        for index, answer in answers:
            barrier.wait()
            status, _ = post_json(server, "/api/answers", {"pair": index, "answer": answer})
            results.append(status)

    threads = [threading.Thread(target=tab, args=(answers,)) for answers in plan]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [200] * 6
    logged = sorted((e["pair"], e["answer"]) for e in log_entries(server))
    assert logged == sorted(answer for answers in plan for answer in answers)
    feedback_keys = {(r["key1"], r["key2"]) for r in json.loads(server.store.feedback_path.read_text())["pairs"]}
    for index in range(4):
        pair = server.store.pairs[index]
        assert (pair.key1, pair.key2) in feedback_keys


def test_create_server_rejects_pair_key_outside_dataset(tmp_path, lfw_dataset):
    missing = int(lfw_dataset.keys.max()) + 1000
    store = AnswerStore([PairToLabel(key1=1, key2=missing)], tmp_path / "a.jsonl", tmp_path / "f.json")
    try:
        with pytest.raises(LabelStoreError, match=rf"not in the dataset: {missing}"):
            create_server(store, lfw_dataset, port=0)
    finally:
        store.close()
