"""The two backends that run anywhere: PyTorch on the merged weights, and ONNX Runtime.

Both implement :class:`~recyclelora.deploy.runner.Runner` (crops of the export's
``input_size`` in, class scores out). torch, safetensors and onnxruntime are imported inside the
constructors, so a serving image needs only the backend it runs. TensorRT lives in
:mod:`recyclelora.deploy.tensorrt`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import Manifest
from .runner import Runner

#: ONNX Runtime execution providers, fastest first; the session falls back along this list.
PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class TorchRunner(Runner):
    """``build_model(preset, adapters=None, deform_attn_impl="gather")`` with the merged weights
    of ``model.safetensors`` loaded strictly; eval mode, no autograd. The gather sampler is the
    one the ONNX graph was traced with, so both backends compute the same thing."""

    name = "torch"

    def __init__(self, weights: str | Path, manifest: Manifest, device: str | None = None) -> None:
        import torch
        from safetensors.torch import load_file

        from ..models import build_model

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        model = build_model(
            manifest.preset,
            num_classes=manifest.num_classes,
            adapters=None,
            img_size=tuple(manifest.train_size),
            deform_attn_impl="gather",
        )
        model.load_state_dict(load_file(str(weights)), strict=True)
        self.model = model.to(self.device).eval().requires_grad_(False)
        super().__init__(
            manifest.input_size, manifest.max_batch, manifest.num_classes, f"torch {self.device}"
        )

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = self.model(torch.from_numpy(batch).to(self.device))
        return logits.float().cpu().numpy()


def available_providers() -> list[str]:
    """The providers of :data:`PROVIDER_ORDER` that this onnxruntime build offers, in order."""
    import onnxruntime

    offered = set(onnxruntime.get_available_providers())
    return [p for p in PROVIDER_ORDER if p in offered]


_ARENA_LOCK = threading.Lock()
_arena_registered = False


def share_cpu_arena() -> None:
    """Register one CPU memory arena with this process's ONNX Runtime environment (once).

    Sessions created with ``shared_arena=True`` then draw their working memory from it instead
    of each growing an arena of its own and keeping it: several large graphs in one process
    (models served side by side, a benchmark's variants) hold one working set, not one each.
    The arena grows by what is requested, not to the next power of two.
    """
    import onnxruntime

    global _arena_registered
    with _ARENA_LOCK:
        if not _arena_registered:
            cpu = onnxruntime.OrtMemoryInfo(
                "Cpu",
                onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR,
                0,
                onnxruntime.OrtMemType.DEFAULT,
            )
            onnxruntime.create_and_register_allocator(
                cpu,
                onnxruntime.OrtArenaCfg({"arena_extend_strategy": 1}),  # kSameAsRequested
            )
            _arena_registered = True


class OnnxRuntimeRunner(Runner):
    """``onnxruntime.InferenceSession`` on ``model.onnx`` (input ``images``, output ``logits``).

    providers: default every provider of :data:`PROVIDER_ORDER` this build offers (the session
    uses the first that accepts the graph); each a name or (name, provider options). threads:
    intra-op threads; None leaves ORT's default (one per physical core). shared_arena: take CPU
    working memory from the process's one shared arena (:func:`share_cpu_arena`) rather than
    from an arena of the session's own.
    """

    name = "onnxruntime"

    def __init__(
        self,
        graph: str | Path,
        manifest: Manifest,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        threads: int | None = None,
        shared_arena: bool = False,
    ) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        if shared_arena:
            share_cpu_arena()
            options.add_session_config_entry("session.use_env_allocators", "1")
        self.session = onnxruntime.InferenceSession(
            str(graph), options, providers=list(providers or available_providers())
        )
        self.provider = self.session.get_providers()[0]
        super().__init__(
            manifest.input_size,
            manifest.max_batch,
            manifest.num_classes,
            f"onnxruntime {self.provider}",
        )

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run(["logits"], {"images": batch})
        return np.asarray(logits, dtype=np.float32)
