"""What the endpoints return besides the label map: per-class pixel fractions, COCO run-length
masks (the format pycocotools reads) and the blended overlay with a legend, for people."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


def class_fractions(labels: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """Each class name -> the fraction of the frame's pixels labelled with it (sums to 1)."""
    counts = np.bincount(labels.ravel(), minlength=len(classes))[: len(classes)]
    return {name: float(c) / labels.size for name, c in zip(classes, counts, strict=True)}


def coco_rle(mask: np.ndarray) -> dict:
    """A boolean (H, W) mask -> COCO's compressed RLE ``{"size": [H, W], "counts": str}``, as
    ``pycocotools.mask.encode`` writes it (column-major run lengths, LEB128-like text)."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _legend(
    entries: Sequence[tuple[str, Sequence[int], float]], height: int, scale: float
) -> np.ndarray:
    """A white column with one colour swatch, name and percentage per entry."""
    font, thick = cv2.FONT_HERSHEY_SIMPLEX, max(1, round(scale))
    row = max(12, round(22 * scale))
    text_w = max(
        (cv2.getTextSize(f"{n} 100.0%", font, 0.5 * scale, thick)[0][0] for n, _, _ in entries),
        default=0,
    )
    panel = np.full((height, row + text_w + 3 * row // 2, 3), 255, np.uint8)
    for i, (name, colour, fraction) in enumerate(entries):
        y = row // 2 + i * row
        if y + row > height:
            break
        c = tuple(int(v) for v in colour)
        cv2.rectangle(panel, (row // 4, y), (row // 4 + row * 3 // 4, y + row * 3 // 4), c, -1)
        cv2.putText(
            panel, f"{name} {100 * fraction:.1f}%", (row + row // 4, y + row * 5 // 8),
            font, 0.5 * scale, (0, 0, 0), thick, cv2.LINE_AA,
        )  # fmt: skip
    return panel


def blend(
    image: np.ndarray,
    labels: np.ndarray,
    palette: Sequence[Sequence[int]],
    classes: Sequence[str],
    alpha: float = 0.5,
    legend: bool = True,
) -> np.ndarray:
    """(H, W, 3) RGB frame blended with its labels' palette colours; with ``legend`` a panel on
    the right lists the classes present, largest first. Returns (H, W [+ panel], 3) uint8 RGB."""
    colours = np.asarray(palette, np.uint8)[labels]
    blended = cv2.addWeighted(image, 1.0 - alpha, colours, alpha, 0.0)
    if not legend:
        return blended
    fractions = class_fractions(labels, classes)
    present = sorted((f, k) for k, f in enumerate(fractions.values()) if f > 0)[::-1]
    entries = [(classes[k], palette[k], f) for f, k in present]
    scale = max(0.6, min(2.0, labels.shape[0] / 540))
    return np.concatenate([blended, _legend(entries, labels.shape[0], scale)], axis=1)
