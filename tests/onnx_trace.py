"""The tests' own ONNX trace of a model: torch's exporter called directly, with the graph
contract of an export (input ``images``, output ``logits``, opset 18, dynamic batch), so that
checks of the exporter compare against a graph the exporter did not write."""

from __future__ import annotations

from pathlib import Path

import torch


def trace(model: torch.nn.Module, sample: torch.Tensor, path: Path, max_batch: int = 8) -> Path:
    """Write ``model`` traced on ``sample`` (B, 3, H, W), B > 1, to ``path`` and return it."""
    torch.onnx.export(
        model,
        (sample,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=max_batch)}},
        opset_version=18,
        dynamo=True,
        verbose=False,
    )
    return path
