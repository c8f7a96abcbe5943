"""The 19 Cityscapes train classes and every label-id -> train-id table (docs/method.md §4).

All tables are lookup arrays (``lut[raw_id] -> train id``, 255 = ignore) of dtype uint8: 256
entries for 8-bit label files, 65,536 for Synthia's 16-bit ones. Apply them with
:func:`apply_lut`. The Cityscapes table and palette come from ``cityscapesscripts`` (the
dataset's own label definition), never from a hand-copied list.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "CLASS_NAMES",
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "SYNTHIA_TO_TRAIN_ID",
    "apply_lut",
    "bdd100k_lut",
    "cityscapes_lut",
    "colorize",
    "mapillary_lut",
    "mapillary_name_to_train_id",
    "palette",
    "read_mapillary_names",
    "synthia_lut",
    "train_id_lut",
    "urbansyn_lut",
]

NUM_CLASSES = 19
IGNORE_INDEX = 255

CLASS_NAMES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)

# SYNTHIA RAND_CITYSCAPES class id (red channel of GT/LABELS) -> train id; the rest -> 255.
SYNTHIA_TO_TRAIN_ID: Mapping[int, int] = {
    3: 0,
    4: 1,
    2: 2,
    21: 3,
    5: 4,
    7: 5,
    15: 6,
    9: 7,
    6: 8,
    16: 9,
    1: 10,
    10: 11,
    17: 12,
    8: 13,
    18: 14,
    19: 15,
    20: 16,
    12: 17,
    11: 18,
}


def _cityscapes_labels():
    try:
        from cityscapesscripts.helpers import labels as cs_labels
    except ImportError as e:  # pragma: no cover - exercised only without the dependency
        raise ImportError(
            "recyclelora.data needs the Cityscapes label definition from `cityscapesscripts`: "
            "pip install cityscapesscripts==2.3.0"
        ) from e
    return cs_labels.labels


def _lut(size: int = 256) -> np.ndarray:
    return np.full(size, IGNORE_INDEX, dtype=np.uint8)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@lru_cache(maxsize=1)
def cityscapes_lut() -> np.ndarray:
    """Cityscapes label id (``*_gtFine_labelIds.png``, also GTAV's labels) -> train id."""
    lut = _lut()
    for label in _cityscapes_labels():
        if 0 <= label.id < 256 and 0 <= label.trainId < NUM_CLASSES:
            lut[label.id] = label.trainId
    return _frozen(lut)


@lru_cache(maxsize=1)
def palette() -> np.ndarray:
    """(19, 3) uint8 RGB colours of the train classes (the Cityscapes colour scheme)."""
    colors = np.zeros((NUM_CLASSES, 3), dtype=np.uint8)
    seen = set()
    for label in _cityscapes_labels():
        if 0 <= label.trainId < NUM_CLASSES and label.trainId not in seen:
            colors[label.trainId] = label.color
            seen.add(label.trainId)
    if len(seen) != NUM_CLASSES:  # pragma: no cover - guards a changed upstream definition
        raise RuntimeError("cityscapesscripts' label table does not define all 19 train ids")
    return _frozen(colors)


@lru_cache(maxsize=1)
def synthia_lut() -> np.ndarray:
    """SYNTHIA class id -> train id, 65,536 entries (the label files are 16-bit)."""
    lut = _lut(65536)
    for k, v in SYNTHIA_TO_TRAIN_ID.items():
        lut[k] = v
    return _frozen(lut)


@lru_cache(maxsize=1)
def urbansyn_lut() -> np.ndarray:
    """UrbanSyn ``ss/`` labels are train ids already; 19 (their "unlabelled") and above -> 255."""
    lut = _lut()
    lut[:NUM_CLASSES] = np.arange(NUM_CLASSES)
    return _frozen(lut)


def train_id_lut() -> np.ndarray:
    """Identity on train ids 0-18, everything else -> 255 (for files that hold train ids)."""
    return urbansyn_lut()


def bdd100k_lut() -> np.ndarray:
    """BDD100K ``sem_seg/masks`` are train ids already (255 ignore); anything else -> 255."""
    return urbansyn_lut()


def _normalise(name: str) -> str:
    return name.lower().replace(" ", "").replace("-", "")


_CITYSCAPES_BY_NAME = {_normalise(n): i for i, n in enumerate(CLASS_NAMES)}

# Substring rules, tried in this order after the exact-name match (docs/method.md §4).
_MAPILLARY_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("trafficsign", "front", "back"), "traffic sign"),
    (("onrail",), "train"),
    (("cyclist", "rider"), "rider"),
    (("pole", "streetlight"), "pole"),
    (("curb", "pedestrianarea"), "sidewalk"),
    (("crosswalkplain", "parking", "bikelane", "servicelane", "lanemarking"), "road"),
)


def mapillary_name_to_train_id(readable: str) -> int:
    """Train id of one Mapillary Vistas label, from its ``readable`` name (255 if none)."""
    name = _normalise(readable)
    if name in _CITYSCAPES_BY_NAME:
        return _CITYSCAPES_BY_NAME[name]
    for needles, target in _MAPILLARY_RULES:
        if any(n in name for n in needles):
            return CLASS_NAMES.index(target)
    return IGNORE_INDEX


def read_mapillary_names(config: str | Path) -> list[str]:
    """The ``readable`` label names, in label-id order, of a Mapillary ``config_v1.2.json``."""
    path = Path(config)
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))["labels"]
        return [str(entry["readable"]) for entry in labels]
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} is not a Mapillary Vistas config (expected a JSON object with a 'labels' "
            f"list whose entries have a 'readable' name): {e}"
        ) from e


def mapillary_lut(names: Sequence[str] | str | Path) -> np.ndarray:
    """Mapillary label id -> train id, from the label names or the ``config_v1.2.json`` path."""
    if isinstance(names, (str, Path)):
        names = read_mapillary_names(names)
    if len(names) > 256:
        raise ValueError(f"{len(names)} Mapillary labels do not fit 8-bit label files")
    lut = _lut()
    for i, n in enumerate(names):
        lut[i] = mapillary_name_to_train_id(n)
    return _frozen(lut)


def apply_lut(label: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map raw ids to train ids; ids beyond the table's range become 255."""
    label = np.asarray(label)
    if label.dtype == np.uint8 and lut.shape[0] >= 256:
        return lut[label]
    if label.dtype not in (np.uint8, np.uint16):
        label = label.astype(np.int64)
        out = np.full(label.shape, IGNORE_INDEX, dtype=np.uint8)
        ok = (label >= 0) & (label < lut.shape[0])
        out[ok] = lut[label[ok]]
        return out
    if int(label.max(initial=0)) < lut.shape[0]:
        return lut[label]
    big = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
    big[: lut.shape[0]] = lut[:65536]
    return big[label]


def colorize(train_ids: np.ndarray, ignore_color: Iterable[int] = (0, 0, 0)) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 RGB in the Cityscapes colours (ignore -> black)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:] = np.asarray(tuple(ignore_color), dtype=np.uint8)
    table[:NUM_CLASSES] = palette()
    return table[np.clip(np.asarray(train_ids).astype(np.intp), 0, 255)]
