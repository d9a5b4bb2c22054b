"""Atomic writes: a file is written to a temporary name beside its target and renamed.

``os.replace`` is atomic on POSIX and Windows, so a reader (or a resumed run) sees
either the old file, the complete new one, or nothing: never a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success.

    The temporary keeps the target's suffix, so writers that choose a format by
    extension (PIL, matplotlib, pandas) still work. On an exception it is removed.
    """
    path = Path(path)
    if path.is_dir():  # else the rename fails naming the temporary
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # make the bytes durable before the rename
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the mode a plain open() would
        os.replace(tmp_path, path)
    except OSError as exc:
        if exc.filename is None:  # a full disk (ENOSPC) names no file: name the one being written
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json_object(path: str | os.PathLike) -> dict[str, Any] | str:
    """The JSON object in ``path`` (a manifest), or why it cannot be read: the exception's name or
    ``"not a JSON object"``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return type(exc).__name__
    return data if isinstance(data, dict) else "not a JSON object"


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file (checkpoints, accumulator states).

    Serialised in memory first: torch's own file writer reports a full disk as an opaque
    ``RuntimeError`` ("unexpected pos"), Python's write as ``OSError(ENOSPC)`` naming the file.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())
