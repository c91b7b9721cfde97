"""A local web server that shows selected face pairs and records a person's answers.

The server uses only the standard library (``http.server``). It serves a fixed
set of routes: the page and its two static files, a small JSON API, and the
images of the selected pairs by record key. Every other path, including any
path traversal attempt, gets 404, and malformed requests get 400.

Routes:
    ``GET /``, ``GET /static/app.js``, ``GET /static/style.css``: the page.
    ``GET /api/state``: progress and the next unanswered pair.
    ``GET /api/pairs/<index>``: one pair and its current answer.
    ``GET /images/<key>.jpg``: the encoded image of a record key in the selected pairs.
    ``POST /api/answers`` with ``{"pair": index, "answer": "same" | "different" | "not_sure"}``
    (optionally ``key1``/``key2`` to guard against a stale page).
    ``POST /api/undo``: withdraw the most recent answer.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence
from urllib.parse import unquote, urlsplit

from magface_al.labeling.store import AnswerStore, LabelStoreError, PairToLabel

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"

# The only files the server reads from disk, by URL path. Nothing from the
# request is ever joined to a file system path.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}

IMAGE_ROUTE = re.compile(r"/images/(\d{1,12})\.jpg")
PAIR_ROUTE = re.compile(r"/api/pairs/(\d{1,9})")

# An answer body is under 200 bytes, so anything larger is not from the page.
MAX_BODY_BYTES = 16 * 1024

# How many pairs after the current one the page preloads.
UPCOMING_PAIRS = 3

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


class ImageSource(Protocol):
    """Dataset interface the server reads: record keys and their encoded images."""

    keys: Sequence[int]

    def image_bytes(self, key: int) -> bytes: ...


class RequestError(Exception):
    """A request the server rejects with a 4xx status and a message."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def image_content_type(data: bytes) -> str:
    """Return the MIME type of an encoded image from its magic bytes (JPEG as stored by InsightFace)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    return "image/jpeg"


class LabelServer(ThreadingHTTPServer):
    """The labelling HTTP server: one :class:`AnswerStore` and the images of its pairs.

    Args:
        address: ``(host, port)``; port 0 picks a free port.
        store: where answers are recorded.
        dataset: the dataset the pairs' record keys belong to.

    Raises:
        LabelStoreError: a selected pair names a key that the dataset does not contain.
    """

    daemon_threads = True
    # Rebinding a port that a killed server held must work at once.
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], store: AnswerStore, dataset: ImageSource) -> None:
        self.store = store
        self.dataset = dataset
        self.image_keys = _check_pair_keys(store.pairs, dataset)
        # Readers over one file handle seek and read, which threads must not interleave.
        self._image_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, LabelRequestHandler)

    @property
    def url(self) -> str:
        """The page's address, ``http://host:port/``."""
        host, port = self.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    def read_image(self, key: int) -> bytes:
        """Return the encoded image of ``key``; only keys of the selected pairs are served."""
        if key not in self.image_keys:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no image with key {key} in the selected pairs")
        with self._image_lock:
            return self.dataset.image_bytes(key)


def _check_pair_keys(pairs: Sequence[PairToLabel], dataset: ImageSource) -> frozenset[int]:
    dataset_keys = {int(key) for key in dataset.keys}
    pair_keys = {key for pair in pairs for key in (pair.key1, pair.key2)}
    missing = sorted(pair_keys - dataset_keys)
    if missing:
        shown = ", ".join(str(key) for key in missing[:10])
        raise LabelStoreError(
            f"{len(missing)} record key(s) of the selected pairs are not in the dataset: {shown}; "
            "pass the dataset folder that the pairs were selected from"
        )
    return frozenset(pair_keys)


def pair_view(store: AnswerStore, index: int) -> dict[str, Any]:
    """Describe pair ``index`` for the page: keys, image URLs and its current answer."""
    pair = store.pairs[index]
    return {
        "index": index,
        "key1": pair.key1,
        "key2": pair.key2,
        "image1_url": f"/images/{pair.key1}.jpg",
        "image2_url": f"/images/{pair.key2}.jpg",
        "answer": store.answer_of(index),
    }


def state_view(store: AnswerStore, state: dict[str, Any]) -> dict[str, Any]:
    """Add the next pair and a few upcoming ones (for preloading) to a store state."""
    view = dict(state)
    view["feedback_file"] = store.feedback_path.name
    next_index = state["next"]
    view["pair"] = None if next_index is None else pair_view(store, next_index)
    upcoming = []
    if next_index is not None:
        for index in range(next_index + 1, len(store.pairs)):
            if len(upcoming) == UPCOMING_PAIRS:
                break
            if store.answer_of(index) is None:
                upcoming.append(pair_view(store, index))
    view["upcoming"] = upcoming
    return view


class LabelRequestHandler(BaseHTTPRequestHandler):
    """Routes one request of the labelling page."""

    server: LabelServer
    server_version = "magface-al-label"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("%s %s", self.address_string(), format % args)

    # -- responses ------------------------------------------------------

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, *, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: HTTPStatus, data: Any) -> None:
        body = json.dumps(data).encode("utf-8")
        self._send(status, body, "application/json")

    def _send_error(self, error: RequestError) -> None:
        logger.debug("%s %s rejected with %d: %s", self.command, self.path, error.status, error.message)
        self._send_json(error.status, {"error": error.message})

    def _dispatch(self, routes: Callable[[str], None]) -> None:
        try:
            path = unquote(urlsplit(self.path).path)
            routes(path)
        except RequestError as error:
            self._send_error(error)
        except LabelStoreError as error:
            self._send_error(RequestError(HTTPStatus.BAD_REQUEST, str(error)))
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("client closed the connection during %s %s", self.command, self.path)
        except Exception:
            logger.exception("failed to handle %s %s", self.command, self.path)
            self.close_connection = True
            try:
                self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal server error"})
            except OSError:
                pass

    # -- GET ------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self._dispatch(self._route_get)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(self._route_get)

    def _route_get(self, path: str) -> None:
        if path in STATIC_FILES:
            name, content_type = STATIC_FILES[path]
            self._send(HTTPStatus.OK, (STATIC_DIR / name).read_bytes(), content_type, cache="no-cache")
            return
        if path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon", cache="max-age=86400")
            return
        if path == "/api/state":
            store = self.server.store
            self._send_json(HTTPStatus.OK, state_view(store, store.state()))
            return
        match = PAIR_ROUTE.fullmatch(path)
        if match:
            index = int(match.group(1))
            if index >= len(self.server.store.pairs):
                raise RequestError(HTTPStatus.NOT_FOUND, f"no pair with index {index}")
            self._send_json(HTTPStatus.OK, pair_view(self.server.store, index))
            return
        match = IMAGE_ROUTE.fullmatch(path)
        if match:
            data = self.server.read_image(int(match.group(1)))
            # A record key's image never changes while the server runs.
            self._send(HTTPStatus.OK, data, image_content_type(data), cache="private, max-age=3600")
            return
        raise RequestError(HTTPStatus.NOT_FOUND, f"not found: {path}")

    # -- POST -----------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(self._route_post)

    def _route_post(self, path: str) -> None:
        if path not in ("/api/answers", "/api/undo"):
            # The body is unread; drop the connection instead of parsing it as the next request.
            self.close_connection = True
            raise RequestError(HTTPStatus.NOT_FOUND, f"not found: {path}")
        body = self._read_json_body()
        store = self.server.store
        if path == "/api/undo":
            state = store.undo()
            view = state_view(store, state)
            view["undone"] = state["undone"]
            self._send_json(HTTPStatus.OK, view)
            return
        index, answer = _parse_answer(body, store)
        self._send_json(HTTPStatus.OK, state_view(store, store.record(index, answer)))

    def _read_json_body(self) -> Any:
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "missing Content-Length header")
        try:
            length = int(length_header)
        except ValueError:
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {length_header!r}") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body of {length} bytes exceeds {MAX_BODY_BYTES}"
            )
        raw = self.rfile.read(length)
        # Requiring JSON also blocks cross-site form posts: a browser sends
        # application/json to another origin only after a CORS preflight,
        # which this server never approves.
        if content_type != "application/json":
            raise RequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"expected Content-Type application/json, got {content_type!r}"
            )
        if not raw:
            return {}
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"invalid JSON body: {error}") from None

    # -- other methods --------------------------------------------------

    def _reject_method(self) -> None:
        self.close_connection = True
        self._send_error(RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} is not allowed"))

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _reject_method  # noqa: N815


def _parse_answer(body: Any, store: AnswerStore) -> tuple[int, str]:
    if not isinstance(body, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "expected a JSON object with pair and answer")
    index = body.get("pair")
    answer = body.get("answer")
    if isinstance(index, bool) or not isinstance(index, int):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"pair must be an integer index, got {index!r}")
    if not 0 <= index < len(store.pairs):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"pair index {index} is outside 0..{len(store.pairs) - 1}")
    if not isinstance(answer, str):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"answer must be a string, got {answer!r}")
    pair = store.pairs[index]
    for name, expected in (("key1", pair.key1), ("key2", pair.key2)):
        if name in body and body[name] != expected:
            # The page was built from another pairs file (an old tab left open).
            raise RequestError(
                HTTPStatus.CONFLICT,
                f"pair {index} has {name} {expected}, not {body[name]!r}; reload the page",
            )
    return index, answer


def create_server(
    store: AnswerStore, dataset: ImageSource, *, host: str = "127.0.0.1", port: int = 8765
) -> LabelServer:
    """Bind a :class:`LabelServer` to ``host:port`` (port 0 picks a free one); call ``serve_forever``."""
    server = LabelServer((host, port), store, dataset)
    logger.info("labelling server listening on %s (%d pairs)", server.url, len(store.pairs))
    return server
