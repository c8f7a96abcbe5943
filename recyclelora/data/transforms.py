"""Training augmentation and evaluation resizing (docs/method.md §3-4; mmseg Mask2Former defaults).

Training, per sample, driven by one ``numpy.random.Generator`` seeded from the sample key:

1. random short-edge resize to one of ``int(512 * x * 0.1) for x in range(5, 21)``, long edge
   capped at 2048 (mmseg ``RandomChoiceResize`` + ``ResizeShortestEdge``, then mmcv's
   ``imrescale`` rounding); image bilinear, label nearest (OpenCV, like mmcv);
2. random 512x512 crop, re-drawn up to 10 times while one class covers >= 75% of the crop or it
   holds fewer than two classes (255 ignored) - mmseg ``RandomCrop(cat_max_ratio=0.75)``;
3. horizontal flip with p = 0.5;
4. photometric distortion (mmseg ``PhotoMetricDistortion``, bit-exact: float32 maths, clipping,
   truncation to uint8, OpenCV HSV round trips), done with 256-entry lookup tables;
5. pad bottom/right to 512x512: image 0, label 255. The unpadded size is returned as
   ``valid_hw``. mmseg pads *after* normalisation (padding = 0 in normalised units); use
   ``Segmentor.normalize`` with ``valid_hw`` to get exactly that.

Evaluation: the image is rescaled to fit the dataset's scale keeping its ratio (mmcv
``imrescale``: long edge <= max(scale), short edge <= min(scale)); the label is left untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from ..geometry import rescale_size
from .labels import IGNORE_INDEX

__all__ = [
    "EVAL_SCALES",
    "TRAIN_SHORT_EDGES",
    "short_edges_for",
    "EvalTransform",
    "PhotoMetricDistortion",
    "TrainTransform",
    "crop_bbox",
    "pad_pair",
    "resize_pair",
    "shortest_edge_size",
]


def short_edges_for(crop: int) -> tuple[int, ...]:
    """The recipe's resize set relative to the crop: ``int(crop * x * 0.1)``, x = 5..20."""
    return tuple(int(crop * x * 0.1) for x in range(5, 21))


TRAIN_SHORT_EDGES: tuple[int, ...] = short_edges_for(512)
EVAL_SCALES: dict[str, tuple[int, int]] = {  # (long, short) bounds, docs/method.md §4
    "cityscapes": (2048, 1024),
    "bdd100k": (1280, 720),
    "mapillary": (2048, 1024),
}


def shortest_edge_size(hw: tuple[int, int], short_edge: int, max_size: int) -> tuple[int, int]:
    """mmseg ``ResizeShortestEdge``: short edge -> ``short_edge``, long edge capped at max_size."""
    h, w = hw
    size = short_edge * 1.0
    s = size / min(h, w)
    new_h, new_w = (size, s * w) if h < w else (s * h, size)
    if max(new_h, new_w) > max_size:
        s = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * s, new_w * s
    target = (int(new_h + 0.5), int(new_w + 0.5))
    # mmseg hands (w, h) to Resize(keep_ratio=True), i.e. mmcv.imrescale, which re-derives the size
    return rescale_size(hw, (target[1], target[0]))


def resize_pair(
    image: np.ndarray, label: np.ndarray | None, size_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Image bilinear, label nearest (OpenCV, as mmcv's ``imresize``); no-op at the same size."""
    h, w = size_hw
    if image.shape[:2] != (h, w):
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    if label is not None and label.shape[:2] != (h, w):
        label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    return image, label


def crop_bbox(
    label: np.ndarray,
    crop_hw: tuple[int, int],
    rng: np.random.Generator,
    *,
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
    max_redraws: int = 10,
) -> tuple[int, int, int, int]:
    """mmseg ``RandomCrop.crop_bbox``: (y1, y2, x1, x2), re-drawn while the crop is dominated.

    A crop is accepted when it holds at least two non-ignored classes and the largest covers
    less than ``cat_max_ratio`` of the non-ignored pixels; after ``max_redraws`` re-draws the
    last one is kept unchecked.
    """
    margin_h = max(label.shape[0] - crop_hw[0], 0)
    margin_w = max(label.shape[1] - crop_hw[1], 0)

    def draw() -> tuple[int, int, int, int]:
        y = int(rng.integers(0, margin_h + 1))
        x = int(rng.integers(0, margin_w + 1))
        return y, y + crop_hw[0], x, x + crop_hw[1]

    bbox = draw()
    if cat_max_ratio < 1.0:
        for _ in range(max_redraws):
            y1, y2, x1, x2 = bbox
            counts = np.bincount(label[y1:y2, x1:x2].ravel(), minlength=256)
            if 0 <= ignore_index < counts.shape[0]:
                counts[ignore_index] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            bbox = draw()
    return bbox


def _value_lut(alpha: float = 1, beta: float = 0) -> np.ndarray:
    # mmseg's ``convert``: float32 multiply-add, clip to [0, 255], truncate to uint8
    values = np.arange(256, dtype=np.float32) * alpha + beta
    return np.clip(values, 0, 255).astype(np.uint8)


class PhotoMetricDistortion:
    """mmseg ``PhotoMetricDistortion`` on RGB uint8, each step with p = 0.5.

    Brightness (+U(-32, 32)); contrast (x U(0.5, 1.5)) either right after brightness or last, at
    random; saturation (HSV S x U(0.5, 1.5)); hue (H + randint(-18, 18) mod 180, NumPy's
    exclusive upper bound as in mmseg, so -18..17). The HSV steps convert to HSV and back
    separately, as mmseg does; the result is bit-identical to mmseg's on the same draws.
    """

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: tuple[float, float] = (0.5, 1.5),
        saturation_range: tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def _flip(self, rng: np.random.Generator) -> bool:
        return bool(rng.integers(2))

    def _contrast(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self._flip(rng):
            img = cv2.LUT(img, _value_lut(alpha=rng.uniform(*self.contrast_range)))
        return img

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self._flip(rng):
            d = self.brightness_delta
            img = cv2.LUT(img, _value_lut(beta=rng.uniform(-d, d)))
        contrast_first = bool(rng.integers(2))  # mmseg: mode == 1 -> contrast before HSV
        if contrast_first:
            img = self._contrast(img, rng)
        if self._flip(rng):
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[:, :, 1] = cv2.LUT(
                hsv[:, :, 1], _value_lut(alpha=rng.uniform(*self.saturation_range))
            )
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if self._flip(rng):
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            delta = int(rng.integers(-self.hue_delta, self.hue_delta))
            lut = ((np.arange(256) + delta) % 180).astype(np.uint8)
            hsv[:, :, 0] = cv2.LUT(hsv[:, :, 0], lut)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first:
            img = self._contrast(img, rng)
        return img


def pad_pair(
    image: np.ndarray,
    label: np.ndarray,
    size_hw: tuple[int, int],
    *,
    pad_value: int = 0,
    label_pad_value: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to at least ``size_hw`` (mmseg pads at the bottom/right)."""
    dh, dw = max(size_hw[0] - image.shape[0], 0), max(size_hw[1] - image.shape[1], 0)
    if dh or dw:
        image = cv2.copyMakeBorder(image, 0, dh, 0, dw, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
        label = cv2.copyMakeBorder(label, 0, dh, 0, dw, cv2.BORDER_CONSTANT, value=label_pad_value)
    return image, label


class TrainTransform:
    """The training augmentation; ``__call__(image, label, rng) -> (image, label, valid_hw)``.

    ``image`` (H, W, 3) uint8 RGB and ``label`` (H, W) uint8 train ids in; out come the
    crop_size x crop_size padded image and label and the unpadded (h, w) of the crop.
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int] = 512,
        short_edges: Sequence[int] | None = None,
        max_size: int | None = None,
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: PhotoMetricDistortion | None = None,
        ignore_index: int = IGNORE_INDEX,
        pad: bool = True,
    ):
        self.crop_hw = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        # default: the recipe's set and long-edge cap (2048 at 512), scaled to other crops
        crop = max(self.crop_hw)
        self.short_edges = tuple(int(s) for s in short_edges or short_edges_for(crop))
        self.max_size = max_size if max_size is not None else 4 * crop
        self.cat_max_ratio = cat_max_ratio
        self.flip_prob = flip_prob
        self.photometric = PhotoMetricDistortion() if photometric is None else photometric
        self.ignore_index = ignore_index
        self.pad = pad

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        if label.dtype != np.uint8:
            raise TypeError(f"labels must be uint8 train ids, got {label.dtype}")
        short = self.short_edges[int(rng.integers(len(self.short_edges)))]
        size = shortest_edge_size(image.shape[:2], short, self.max_size)
        image, label = resize_pair(image, label, size)
        y1, y2, x1, x2 = crop_bbox(
            label,
            self.crop_hw,
            rng,
            cat_max_ratio=self.cat_max_ratio,
            ignore_index=self.ignore_index,
        )
        image, label = image[y1:y2, x1:x2], label[y1:y2, x1:x2]
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        image = np.ascontiguousarray(image)
        label = np.ascontiguousarray(label)
        image = self.photometric(image, rng)
        valid_hw = (int(image.shape[0]), int(image.shape[1]))
        if self.pad:
            image, label = pad_pair(image, label, self.crop_hw, label_pad_value=self.ignore_index)
        return image, label, valid_hw


class EvalTransform:
    """Rescale the image to fit ``scale`` keeping its ratio (bilinear); labels are not touched."""

    def __init__(self, scale: tuple[int, int] = (2048, 1024)):
        self.scale = tuple(scale)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        size = rescale_size(image.shape[:2], self.scale)
        return resize_pair(image, None, size)[0]
