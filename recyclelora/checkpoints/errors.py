"""Checkpoint errors, and torch's reasons told without its advice to load unsafely."""

from __future__ import annotations

import re


class CheckpointError(ValueError):
    """A file that is not a checkpoint this project reads, or does not fit the model."""


class MmsegCheckpointError(CheckpointError):
    """An mmseg-format checkpoint that cannot be read, recognised or loaded into the model."""


class TrainingCheckpointError(CheckpointError):
    """A file that is not a readable training checkpoint (``iter_N.pth``)."""


# Sentences of torch's messages that advise allow-listing globals or loading with
# ``weights_only=False``: both would let the file run code, which this project never does.
_ADVICE = re.compile(
    r"weights_only|safe_globals|allowlist|trust|arbitrary code|two options|documentation|https?://",
    re.IGNORECASE,
)
_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(.*)")


def torch_reason(error: BaseException, limit: int = 240) -> str:
    """The factual part of a torch / pickle error: what failed, not how to load it unsafely.

    For a refused global torch says e.g. "Unsupported global: GLOBAL os.system was not an
    allowed global by default. Please use ..."; this keeps the first sentence.
    """
    text = " ".join(str(error).split())
    m = _UNPICKLER.search(text)
    if m:
        text = m[1]
    sentences = re.split(r"(?<=[.!?])\s+", text)
    kept = [s for s in sentences if s and not _ADVICE.search(s)]
    reason = " ".join(kept).strip() or type(error).__name__
    if len(reason) > limit:
        reason = reason[: limit - 3].rstrip() + "..."
    return f"{type(error).__name__}: {reason}"
