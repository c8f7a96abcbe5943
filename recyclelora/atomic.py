"""Atomic file writes: a reader (or a run killed mid-write) never sees a half-written file.

Everything that matters on disk (checkpoints, adapter files, exports, converted labels, reports)
goes through :func:`atomic_write`: the bytes land in a hidden temporary sibling, are flushed and
fsync'ed, and the temporary is renamed over the target (``os.replace`` is atomic on POSIX and
Windows). A failure removes the temporary and leaves any previous file at the target untouched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"


def temporary_sibling(path: str | os.PathLike) -> Path:
    """``DIR/.NAME.<pid>.tmp``: hidden, unique per process, on the same file system as ``path``."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}{TMP_SUFFIX}")


def is_temporary(path: str | os.PathLike) -> bool:
    """True for a temporary sibling (whatever process wrote it)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporaries in ``folder`` whose writer is gone (killed mid-write).

    A concurrent writer's file in progress is left alone. Returns how many were removed.
    """
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.glob(f".*{TMP_SUFFIX}"):
        pid = p.name[: -len(TMP_SUFFIX)].rpartition(".")[2]
        if not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
            continue
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``.

    ``mode`` is "wb" or "w" (text, UTF-8).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write opens files for writing only ('wb' or 'w'), not {mode!r}")
    target = Path(path)
    tmp = temporary_sibling(target)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(target.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
