"""Frame geometry shared by the data pipeline, the PyTorch model and the deployment runtime.

Pure functions on sizes (no arrays): how a frame is rescaled for evaluation (mmcv
``rescale_size``) and which sliding windows cover it (mmseg ``slide_inference``). Training,
evaluation and ``recyclelora.deploy.segment`` all call these, so the three agree by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["pair", "rescale_size", "slide_windows"]


def pair(x: int | Sequence[int]) -> tuple[int, int]:
    """``n`` -> ``(n, n)``; an (h, w) pair -> itself as ints."""
    if isinstance(x, int):
        return (x, x)
    a, b = x
    return (int(a), int(b))


def rescale_size(hw: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``rescale_size``: largest (h, w) with long edge <= max(scale), short <= min(scale)."""
    h, w = hw
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def slide_windows(
    height: int, width: int, crop: int | Sequence[int], stride: int | Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """mmseg ``slide_inference`` windows ``(y1, y2, x1, x2)`` over a ``height x width`` image.

    ``grids = max(size - crop + stride - 1, 0) // stride + 1`` per axis; window ``i`` starts at
    ``i * stride``, ends at ``min(start + crop, size)`` and is then shifted back to start at
    ``max(end - crop, 0)``: every window is ``crop`` wide unless the image is smaller, the last one
    ends on the border. Row-major order.
    """
    h_crop, w_crop = pair(crop)
    h_stride, w_stride = pair(stride)
    if min(h_crop, w_crop, h_stride, w_stride) <= 0:
        raise ValueError(f"crop {crop} and stride {stride} must be positive")
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, height)
            x2 = min(w_idx * w_stride + w_crop, width)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows
