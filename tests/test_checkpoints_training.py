"""Training checkpoints: resume that skips damaged files with reasons that never advise unsafe
loading, and the newest checkpoint under runs/ (rotation: tests/test_engine_parts.py)."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch

from recyclelora.checkpoints import (
    TrainingCheckpointError,
    load_latest,
    newest_checkpoint,
    save_checkpoint,
)
from recyclelora.checkpoints.errors import torch_reason
from recyclelora.checkpoints.training import read_training_state

UNSAFE_ADVICE = ("weights_only", "safe_globals", "trust")


class Payload:
    """Unpickling it would call os.system: a global torch's weights-only unpickler refuses."""

    def __reduce__(self):
        return os.system, ("true",)


def test_damaged_checkpoints_are_explained_without_unsafe_advice(tmp_path, caplog):
    save_checkpoint({"iteration": 2, "model": {}, "recipe": {}}, tmp_path, 2)
    good = (tmp_path / "iter_2.pth").read_bytes()
    (tmp_path / "iter_4.pth").write_bytes(good[: len(good) // 2])  # truncated copy
    torch.save({"iteration": 6, "x": Payload()}, tmp_path / "iter_6.pth")  # foreign global
    with caplog.at_level(logging.WARNING):
        state, path = load_latest(tmp_path)
    assert path.name == "iter_2.pth" and state["iteration"] == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "iter_6.pth" in warnings[0] and "system" in warnings[0]
    assert "iter_4.pth" in warnings[1] and "truncated" in warnings[1]
    for message in warnings:
        assert not any(a in message for a in UNSAFE_ADVICE), message

    with pytest.raises(TrainingCheckpointError, match="not a training checkpoint") as e:
        read_training_state(tmp_path / "iter_2.pth", required=("iteration", "optimizer"))
    assert "'optimizer'" in str(e.value)


def test_torch_reason_keeps_the_fact_and_drops_the_advice(tmp_path):
    """torch's own message for a refused global advises weights_only=False / allow-listing."""
    path = tmp_path / "payload.pth"
    torch.save({"x": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError) as raw:
        torch.load(path, weights_only=True)
    assert "weights_only" in str(raw.value)  # what must not reach our messages
    reason = torch_reason(raw.value)
    assert reason.startswith("UnpicklingError: ")
    assert "system" in reason and "global" in reason.lower()
    assert not any(a in reason for a in UNSAFE_ADVICE), reason
    long = torch_reason(ValueError("x" * 1000), limit=50)
    assert len(long) <= len("ValueError: ") + 50 and long.endswith("...")


def test_newest_checkpoint_under_runs(tmp_path):
    assert newest_checkpoint(tmp_path / "runs") is None
    old = save_checkpoint({"iteration": 40}, tmp_path / "runs/a/checkpoints", 40)
    new = save_checkpoint({"iteration": 8}, tmp_path / "runs/b/run/checkpoints", 8)
    os.utime(old, (1_000_000, 1_000_000))
    (tmp_path / "runs/b/run/checkpoints/iter_9.pth.partial").write_bytes(b"")  # not complete
    assert newest_checkpoint(tmp_path / "runs") == (8, new)
