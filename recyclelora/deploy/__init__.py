"""Deployment: merged export directories, inference backends behind one interface, ``segment``.

Light on purpose: importing this package pulls in numpy only; torch, onnx, onnxruntime and
tensorrt are imported by the modules that need them, so a serving image carries only its backend.
"""

from .manifest import ExportError, Manifest
from .runner import Runner

__all__ = ["ExportError", "Manifest", "Runner"]
