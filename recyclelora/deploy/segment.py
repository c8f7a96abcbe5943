"""``segment(runner, image)``: a frame of any size -> train ids, on any backend.

The evaluation protocol of docs/method.md §4 in numpy and OpenCV, with the geometry of the
export's ``model.json``:

1. rescale the frame to fit ``eval_scale`` keeping its ratio (bilinear, mmcv ``imrescale``);
   ``max_side`` shrinks that scale so its longer bound is at most ``max_side`` (fewer windows:
   faster and coarser);
2. "slide": the ``crop``/``stride`` windows of mmseg ``slide_inference``, batched through the
   runner ``max_batch`` at a time. A window smaller than the graph's ``input_size`` (a frame
   smaller than a crop) is padded at the bottom/right with the mean colour - 0 after
   normalisation, as mmseg pads - and its scores cropped back. Scores are summed into place and
   divided by the number of windows covering each pixel.
   "whole": a graph takes only its ``input_size``, so the rescaled frame is resized to it,
   predicted once, and the scores resized to the rescaled frame's size (unlike PyTorch
   whole-image inference, which sees the frame at its own size: use "slide" for the paper's
   numbers);
3. the scores are resized back to the frame (bilinear) and the argmax taken.

The evaluator calls :func:`predict_scores` and :func:`resize_scores` directly on images its
datasets have already rescaled.
"""

from __future__ import annotations

from typing import Literal, overload

import cv2
import numpy as np

from ..geometry import pair, rescale_size, slide_windows
from .manifest import Manifest
from .runner import Runner

Mode = Literal["slide", "whole"]
_CV_MAX_CHANNELS = 512  # cv2.resize handles at most this many channels at once


def _manifest(runner: Runner) -> Manifest:
    manifest = getattr(runner, "manifest", None)
    if manifest is None:
        raise ValueError(f"{runner!r} has no manifest: open exports with load_export()")
    return manifest


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {tuple(image.shape)}"
        )
    return image


def resize_scores(scores: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(K, h, w) float32 -> (K, H, W), bilinear with half-pixel centres (as
    ``F.interpolate(mode="bilinear", align_corners=False)``)."""
    h, w = int(hw[0]), int(hw[1])
    if scores.shape[1:] == (h, w):
        return scores
    parts = []
    for k in range(0, len(scores), _CV_MAX_CHANNELS):
        hwk = np.ascontiguousarray(scores[k : k + _CV_MAX_CHANNELS].transpose(1, 2, 0))
        out = cv2.resize(hwk, (w, h), interpolation=cv2.INTER_LINEAR)
        parts.append(out.reshape(h, w, -1).transpose(2, 0, 1))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def _slide(runner: Runner, image: np.ndarray, manifest: Manifest) -> np.ndarray:
    h, w = image.shape[:2]
    in_h, in_w = runner.input_size
    crop = pair(manifest.crop)
    if crop[0] > in_h or crop[1] > in_w:
        raise ValueError(f"the export's crop {crop} exceeds its graph input {runner.input_size}")
    windows = slide_windows(h, w, crop, pair(manifest.stride))
    chw = image.transpose(2, 0, 1).astype(np.float32)
    mean = np.asarray(manifest.mean, np.float32).reshape(1, 3, 1, 1)
    scores = np.zeros((runner.num_classes, h, w), np.float32)
    count = np.zeros((h, w), np.float32)
    for start in range(0, len(windows), runner.max_batch):
        chunk = windows[start : start + runner.max_batch]
        crops = np.empty((len(chunk), 3, in_h, in_w), np.float32)
        crops[:] = mean
        for window, (y1, y2, x1, x2) in zip(crops, chunk, strict=True):
            window[:, : y2 - y1, : x2 - x1] = chw[:, y1:y2, x1:x2]
        for logits, (y1, y2, x1, x2) in zip(runner.predict_crops(crops), chunk, strict=True):
            scores[:, y1:y2, x1:x2] += logits[:, : y2 - y1, : x2 - x1]
            count[y1:y2, x1:x2] += 1
    return scores / count


def predict_scores(runner: Runner, image: np.ndarray, mode: Mode = "slide") -> np.ndarray:
    """Class scores (K, h, w) float32 of an RGB uint8 image already at the evaluation scale."""
    image = _check_image(image)
    manifest = _manifest(runner)
    if mode == "slide":
        return _slide(runner, image, manifest)
    if mode == "whole":
        in_h, in_w = runner.input_size
        resized = cv2.resize(image, (in_w, in_h), interpolation=cv2.INTER_LINEAR)
        crop = resized.transpose(2, 0, 1)[None].astype(np.float32)
        return resize_scores(runner.predict_crops(crop)[0], image.shape[:2])
    raise ValueError(f"mode must be 'slide' or 'whole', got {mode!r}")


def evaluation_scale(manifest: Manifest, max_side: int | None = None) -> tuple[int, int]:
    """The (long, short) bounds a frame is rescaled to fit: the export's ``eval_scale``, shrunk
    (ratio kept) so that its longer bound is at most ``max_side``."""
    long, short = pair(manifest.eval_scale)
    if max_side is None or max_side >= max(long, short):
        return long, short
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    f = max_side / max(long, short)
    return max(1, round(long * f)), max(1, round(short * f))


@overload
def segment(
    runner: Runner,
    image: np.ndarray,
    mode: Mode = ...,
    return_scores: Literal[False] = ...,
    max_side: int | None = ...,
) -> np.ndarray: ...
@overload
def segment(
    runner: Runner,
    image: np.ndarray,
    mode: Mode,
    return_scores: Literal[True],
    max_side: int | None = ...,
) -> tuple[np.ndarray, np.ndarray]: ...
def segment(
    runner: Runner,
    image: np.ndarray,
    mode: Mode = "slide",
    return_scores: bool = False,
    max_side: int | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 (H, W, 3) frame -> (H, W) uint8 train ids (see the module docstring); with
    ``return_scores`` also the (K, H, W) float32 scores they are the argmax of. ``max_side``
    bounds the longer side of the evaluation scale (default: the export's ``eval_scale``)."""
    image = _check_image(image)
    manifest = _manifest(runner)
    if runner.num_classes > 256:
        raise ValueError(f"{runner.num_classes} classes do not fit uint8 train ids")
    frame_hw = image.shape[:2]
    h, w = rescale_size(frame_hw, evaluation_scale(manifest, max_side))
    if (h, w) != frame_hw:
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    scores = resize_scores(predict_scores(runner, image, mode), frame_hw)
    labels = scores.argmax(0).astype(np.uint8)
    return (labels, scores) if return_scores else labels
