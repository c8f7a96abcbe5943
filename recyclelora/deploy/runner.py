"""The one interface every inference backend implements: crops in, class scores out.

A runner takes float32 RGB crops on 0-255, (B, 3, H, W) with (H, W) the export's
``input_size``, and returns float32 class scores (B, K, H, W): normalisation is inside the model.
Batches larger than the export's ``max_batch`` are split here, so backends only ever see what
their graph or engine was built for. ``segment`` builds frames on top of this.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Runner(ABC):
    """A loaded export on one backend.

    name: "tensorrt", "onnxruntime" or "torch". detail: what exactly runs (provider, device,
    engine file, precision), for logs and ``/metadata``.
    """

    name: str = ""

    def __init__(
        self, input_size: tuple[int, int], max_batch: int, num_classes: int, detail: str
    ) -> None:
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.max_batch = int(max_batch)
        self.num_classes = int(num_classes)
        self.detail = detail

    def predict_crops(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 RGB 0-255 -> (B, K, H, W) float32 scores, any B >= 1."""
        batch = np.asarray(batch)
        h, w = self.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, h, w):
            raise ValueError(
                f"crops must be (B, 3, {h}, {w}) RGB arrays for this export, got "
                f"{tuple(batch.shape)}; frames of other sizes go through segment()"
            )
        if len(batch) == 0:
            return np.zeros((0, self.num_classes, h, w), np.float32)
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        parts = [
            self._run(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    @abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """One batch of at most ``max_batch`` contiguous float32 crops -> float32 scores."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail})"
