"""Atomic, rotating training checkpoints: a killed run resumes from its last complete one.

Each checkpoint is written through :func:`recyclelora.atomic.atomic_write` and renamed to
``iter_N.pth``: a file of that name is therefore always complete. Older ones beyond ``keep`` and
temporaries of killed writers are deleted afterwards.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write, remove_stale_temporaries
from .errors import TrainingCheckpointError, torch_reason

log = logging.getLogger(__name__)
NAME = re.compile(r"^iter_(\d+)\.pth$")
#: What :func:`is_training_state` requires at the top level of a training checkpoint.
REQUIRED = ("iteration", "model", "recipe")


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(
    state: Mapping[str, Any], folder: str | os.PathLike, iteration: int, keep: int = 3
) -> Path:
    """Write ``folder/iter_<iteration>.pth`` atomically and keep the newest ``keep``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"iter_{iteration}.pth"
    with atomic_write(path) as f:
        torch.save(dict(state), f)
    remove_stale_temporaries(folder)
    for _, old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def read_training_state(
    path: str | os.PathLike, required: tuple[str, ...] = REQUIRED
) -> dict[str, Any]:
    """The whole state of a training checkpoint (optimizer, data position, RNG...), for resume.

    torch's weights-only unpickler: a training checkpoint holds tensors and plain Python only.
    ``required``: the top-level entries it must have.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingCheckpointError(
            f"cannot read {os.fspath(path)!r} as a training checkpoint ({torch_reason(e)}): it "
            "may be truncated (a run killed mid-copy) or written by another program"
        ) from e
    if not is_training_state(state, required):
        raise TrainingCheckpointError(not_training_message(os.fspath(path), state, required))
    return state


def is_training_state(obj: Any, required: tuple[str, ...] = REQUIRED) -> bool:
    return isinstance(obj, Mapping) and all(k in obj for k in required)


def not_training_message(path: str, obj: Any, required: tuple[str, ...] = REQUIRED) -> str:
    found = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
    return (
        f"{path!r} is not a training checkpoint (needs {', '.join(map(repr, required))}; found "
        f"{found}); training/train.py writes them as runs/<recipe>/checkpoints/iter_N.pth"
    )


def load_latest(folder: str | os.PathLike) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads; damaged ones are reported and skipped."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return read_training_state(path, required=("iteration",)), path
        except TrainingCheckpointError as e:  # a damaged file must not stop the resume
            log.warning("%s; trying the previous one", e)
    return None


def newest_checkpoint(root: str | os.PathLike = "runs") -> tuple[int, Path] | None:
    """The most recently written complete checkpoint in any ``checkpoints/`` folder under
    ``root``, with its iteration."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [c for folder in root.rglob("checkpoints") for c in list_checkpoints(folder)]
    if not found:
        return None
    return max(found, key=lambda c: (c[1].stat().st_mtime, c[0]))
