"""Atomic checkpoints: a crash (or a full disk) in the middle of a write never destroys the last good file.

The state is written to a temporary file in the same folder, flushed and fsync'ed, then moved over the
old checkpoint with ``os.replace`` (atomic on POSIX and Windows) and the folder entry is fsync'ed.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_atomic(state: dict, path: str | os.PathLike) -> Path:
    """torch.save ``state`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some file systems do not allow fsync on folders
        pass
    return path


def load(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by :func:`save_atomic` (FileNotFoundError with the path if missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (nothing to resume)")
    return torch.load(path, map_location="cpu", weights_only=False)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write a small text file (config, final metrics) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
