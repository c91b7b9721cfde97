"""Small helpers shared by every package: atomic writes, logging set-up, strict JSON."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)


def _current_umask() -> int:
    # os.umask can only be read by setting it; restore it at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` and rename it into place on success.

    The temporary file or folder lives in the same directory, so the final
    ``os.replace`` is atomic on POSIX file systems. A run killed midway
    therefore leaves the old artifact or none, never a half-written one that
    DVC would hash as valid. On an exception the temporary path is removed.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    # mkstemp/mkdtemp create owner-only entries (0600/0700); artifacts should
    # get the same permissions as any other file the user creates.
    umask = _current_umask()
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
        os.chmod(tmp, 0o777 & ~umask)
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(handle)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        if is_dir and final.exists():
            # os.replace cannot overwrite a non-empty directory; move the old
            # one aside first so the swap is still a pair of renames.
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def to_strict_json(value: Any) -> Any:
    """Convert numpy scalars and arrays to plain Python and NaN/inf floats to None.

    DVC's metrics tooling rejects ``NaN`` and ``Infinity``, which Python's json
    module would otherwise write; callers record the reason for a None next to it.
    """
    if isinstance(value, dict):
        return {str(k): to_strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_strict_json(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return to_strict_json(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: str | os.PathLike, data: Any, *, indent: int = 2) -> None:
    """Write ``data`` as strict JSON (no NaN, no Infinity), atomically."""
    text = json.dumps(to_strict_json(data), indent=indent, allow_nan=False, sort_keys=False)
    write_text_atomic(path, text + "\n")


def setup_logging(level: int | str = logging.INFO) -> None:
    """Configure the root logger once for command-line entry points and stages."""
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
