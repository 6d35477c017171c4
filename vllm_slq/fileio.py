"""Atomic writes, the project's one home for them: a reader sees the old file (or
directory) or the new one, never half of one, and a failed write leaves nothing.

  * ``atomic_path(path)``: a temp path beside `path` for any writer (safetensors,
    matplotlib, ...); renamed over `path` when the block succeeds, removed if it fails.
  * ``atomic_write(path, data)`` / ``atomic_write_json``: str or bytes through it.
  * ``atomic_dir(path)``: a temp directory beside `path` to fill (a checkpoint, a
    saved model); renamed into place on success. With ``replace=True`` an existing
    `path` is swapped out and deleted only after the new one is in place, so the
    old one survives a failure at any point.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temp file path in `path`'s directory (keeping its suffix); rename it over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: Path | str, data: str | bytes) -> None:
    """Write str (UTF-8) or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def atomic_write_json(path: Path | str, obj, indent: int = 1, **dumps_kw) -> None:
    atomic_write(path, json.dumps(obj, indent=indent, **dumps_kw))


def fsync_tree(root: Path | str) -> None:
    """fsync every file and directory under root (contents reach the disk before a rename publishes them)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(path: Path | str, replace: bool = False, durable: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory beside `path`; move it to `path` when the block succeeds.

    An existing `path` is an error unless replace=True; then it is renamed aside, the new
    directory renamed in, and only then the old one deleted (restored if the swap fails).
    durable=True fsyncs the new tree before the rename and the parent after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        if not path.exists():
            os.rename(tmp, path)
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
