"""Atomic, rotating training checkpoints: a killed run resumes from its last complete one.

Each checkpoint is written to ``iter_N.pth.tmp``, flushed to disk and renamed: a file named
``iter_N.pth`` is therefore always complete. Older ones beyond ``keep`` are deleted afterwards.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)
NAME = re.compile(r"^iter_(\d+)\.pth$")


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(state: dict, folder: str | Path, iteration: int, keep: int = 3) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"iter_{iteration}.pth"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    for stale in folder.glob("*.pth.tmp"):  # left by a run killed mid-write
        stale.unlink(missing_ok=True)
    for _, old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_latest(folder: str | Path) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads; damaged ones are reported and skipped."""
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as e:  # a damaged file must not stop the resume
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, e)
    return None


def load_trained_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model, recipe, iteration) from a training checkpoint: the model is rebuilt from the
    recipe stored in it, without the adapters' decomposition (the checkpoint has every tensor)."""
    from ..models import build_model
    from ..recipes import from_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable training checkpoint ({e})") from e
    if not isinstance(state, dict) or "model" not in state or "recipe" not in state:
        raise ValueError(
            f"{path} is not a checkpoint written by training/train.py (needs 'model' and "
            "'recipe'); for mmseg-format checkpoints use recyclelora.models.mmseg_format"
        )
    recipe = from_dict(state["recipe"])
    model = build_model(
        recipe.model, adapters=recipe.adapters, img_size=recipe.data.crop, init_adapters=False
    )
    model.load_state_dict(state["model"])
    return model.to(device).eval(), recipe, int(state["iteration"])
