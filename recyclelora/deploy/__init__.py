"""Deployment: merged export directories, inference backends behind one interface, ``segment``.

Light on purpose: importing this package pulls in numpy and OpenCV only; torch, onnx,
onnxruntime and tensorrt are imported by the modules that need them, so a serving image carries
only its backend.

    runner = load_export("exports/syn2real")          # "auto": TensorRT > ONNX Runtime > torch
    labels = segment(runner, rgb_uint8_frame)         # (H, W) uint8 train ids
"""

from .load import BACKENDS, load_export
from .manifest import BackendUnavailable, ExportError, Manifest
from .runner import Runner
from .segment import predict_scores, resize_scores, segment

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "ExportError",
    "Manifest",
    "Runner",
    "load_export",
    "predict_scores",
    "resize_scores",
    "segment",
]
