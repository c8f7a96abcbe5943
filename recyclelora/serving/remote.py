"""A :class:`~recyclelora.deploy.Runner` whose crops are predicted in another process.

The HTTP workers decode frames and cut them into crops; one model process owns the backend and
batches the crops of concurrent requests together. This runner is the HTTP side of that split:
``segment()`` runs unchanged on it, so a served label map is the inference API's label map.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..deploy.manifest import Manifest
from ..deploy.runner import Runner


class RemoteRunner(Runner):
    """Crops go to ``predict`` (e.g. a BentoML dependency's batchable API), at most the export's
    ``max_batch`` per call."""

    name = "remote"

    def __init__(self, manifest: Manifest, predict: Callable[[np.ndarray], np.ndarray]) -> None:
        super().__init__(manifest.input_size, manifest.max_batch, manifest.num_classes, "remote")
        self.manifest = manifest
        self._predict = predict

    def _run(self, batch: np.ndarray) -> np.ndarray:
        scores = np.asarray(self._predict(batch), dtype=np.float32)
        expected = (len(batch), self.num_classes, *self.input_size)
        if scores.shape != expected:
            raise RuntimeError(f"the model process returned {scores.shape}, expected {expected}")
        return scores
