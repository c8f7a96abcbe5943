"""The six datasets in their official release layouts (docs/method.md §4), as train-id label maps.

Which labels are read (following Rein's configurations):

- GTAV, SYNTHIA, Cityscapes: the converted ``*_labelTrainIds.png`` written next to the official
  labels by ``training/prepare_data.py`` (``converted=True``, the default). A missing conversion
  raises a :class:`DataError` that prints the exact command. ``converted=False`` maps the
  official labels on the fly with the same lookup table instead (same result, slower reads).
- UrbanSyn, BDD100K: the official labels are train ids already; read directly (UrbanSyn's 19
  becomes 255 on the fly).
- Mapillary Vistas v1.2 (evaluation): the half-size copy ``half/val_img/*.jpg`` +
  ``half/val_label/*.png`` (train ids) written by ``prepare_data.py mapillary`` (``half=True``);
  ``half=False`` reads the full-size official files and maps the 66 labels on the fly.

Every dataset item is a dict: ``image`` (3, H, W) uint8 RGB tensor, ``label`` (H, W) int64 train
ids (255 ignore), ``path``, ``label_path``, ``index``. :class:`TrainSet` concatenates training
sources, applies the training augmentation from a per-sample seed, and replaces unreadable
samples deterministically.
"""

from __future__ import annotations

import math
import shlex
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from . import labels as L
from .imageio import DataError, DataWarning, read_image, read_label
from .layouts import (
    BDD100K_LAYOUT,
    CITYSCAPES_LAYOUT,
    GTAV_LAYOUT,
    MAPILLARY_HALF_LAYOUT,
    MAPILLARY_LAYOUT,
    SYNTHIA_LAYOUT,
    URBANSYN_LAYOUT,
    Layout,
)
from .sampler import sample_seed
from .transforms import EVAL_SCALES, EvalTransform, TrainTransform

__all__ = [
    "BDD100K",
    "DATASETS",
    "GTAV",
    "Cityscapes",
    "Mapillary",
    "SegDataset",
    "Synthia",
    "TrainSet",
    "UrbanSyn",
    "build_dataset",
    "build_eval_dataset",
    "build_train_set",
    "canonical_name",
    "prepare_command",
]


def prepare_command(dataset: str, root: str | Path) -> str:
    """The one-off conversion command for ``dataset`` at ``root``, as the README spells it."""
    return f"python training/prepare_data.py {dataset} {shlex.quote(str(root))}"


def _examples(items, n: int = 3) -> str:
    items = sorted(items)
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(str(i) for i in items[:n]) + more


class SegDataset(Dataset):
    """Image/label pairs mapped to train ids; subclasses find them through their :class:`Layout`.

    ``transform`` (an :class:`EvalTransform`) rescales the image only; labels stay at their
    file's resolution (evaluation resizes predictions back to it).
    """

    name: ClassVar[str] = "dataset"
    layout: ClassVar[Layout]  # the official release's folders and file names

    def __init__(
        self,
        root: str | Path,
        images: Sequence[str],
        labels: Sequence[str],
        *,
        lut: np.ndarray | None,
        red_channel: bool = False,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        if len(images) != len(labels):
            raise ValueError("images and labels must pair up one to one")
        self.root = Path(root)
        self.images = [str(p) for p in images]
        self.labels = [str(p) for p in labels]
        self.lut = lut
        self.red_channel = red_channel
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, n={len(self)})"

    # -- discovery helpers ------------------------------------------------------------------
    @classmethod
    def _missing(cls, path: Path, what: str) -> DataError:
        return DataError(
            f"{cls.name}: {path} not found ({what}). Expected the official layout under the "
            f"dataset root: {cls.layout.describe()}. Download: {cls.layout.source}.",
            path=path,
        )

    @classmethod
    def _dir(cls, path: Path, what: str) -> Path:
        if not path.is_dir():
            raise cls._missing(path, what)
        return path

    @classmethod
    def _folders(cls, layout: Layout, root: Path, split: str = "") -> tuple[Path, Path]:
        """The (image, label) folders of ``split``, each checked to exist."""
        title = f"{layout.title} {split}" if split else layout.title
        cls._dir(root, f"the {layout.title} dataset root")
        return (
            cls._dir(layout.image_dir(root, split), f"the {title} images folder"),
            cls._dir(layout.label_dir(root, split), f"the {title} labels folder"),
        )

    @classmethod
    def _find(
        cls, root: Path, split: str = "", *, converted: bool = False
    ) -> tuple[list[Path], list[Path]]:
        """Paired (images, labels) of ``split``: the official labels, or the converted ones
        (raising with the conversion command when they are missing)."""
        layout = cls.layout
        img_dir, lab_dir = cls._folders(layout, root, split)
        images = layout.image_files(img_dir)
        labels = layout.label_files(lab_dir, converted=converted)
        if converted:
            cls._need_conversion(root, images, labels, layout.label_files(lab_dir), lab_dir)
        pattern = layout.pairing(split or None, converted=converted)
        return cls._pair(images, labels, img_dir, lab_dir, pattern)

    @classmethod
    def _pair(
        cls,
        images: dict[str, Path],
        labels: dict[str, Path],
        image_dir: Path,
        label_dir: Path,
        pattern: str,
    ) -> tuple[list[Path], list[Path]]:
        source = cls.layout.source
        if not images:
            raise DataError(
                f"{cls.name}: no images in {image_dir} (expected {pattern}). An empty or wrong "
                f"split / folder? Expected layout: {cls.layout.describe()}. Download: {source}.",
                path=image_dir,
            )
        lonely_images = images.keys() - labels.keys()
        lonely_labels = labels.keys() - images.keys()
        if lonely_images or lonely_labels:
            parts = []
            if lonely_images:
                parts.append(
                    f"{len(lonely_images)} of {len(images)} images in {image_dir} have no label in "
                    f"{label_dir} (e.g. {_examples(images[k].name for k in lonely_images)})"
                )
            if lonely_labels:
                parts.append(
                    f"{len(lonely_labels)} labels in {label_dir} have no image in {image_dir} "
                    f"(e.g. {_examples(labels[k].name for k in lonely_labels)})"
                )
            raise DataError(
                f"{cls.name}: image and label files do not pair up: {'; '.join(parts)}. Pairs "
                f"are {pattern}. An interrupted download or extraction? Re-extract the missing "
                f"parts from {source}.",
                path=image_dir if lonely_images else label_dir,
            )
        keys = sorted(images)
        return [images[k] for k in keys], [labels[k] for k in keys]

    @classmethod
    def _need_conversion(
        cls,
        root: Path,
        images: dict[str, Path],
        converted: dict[str, Path],
        raw: dict[str, Path],
        label_dir: Path,
    ) -> None:
        """Raise with the prepare_data command when converted labels are missing for images."""
        missing = [k for k in images if k not in converted and k in raw]
        if not missing:
            return
        cmd = prepare_command(cls.name, root)
        if len(missing) == len(images):
            head = f"the labels in {label_dir} have not been converted to train ids yet"
        else:
            head = (
                f"{len(missing)} of {len(images)} converted label files "
                f"(*{cls.layout.converted_suffix}) are missing in {label_dir} "
                f"(e.g. {_examples(raw[k].name for k in missing)}): the conversion was interrupted"
            )
        raise DataError(
            f"{cls.name}: {head}. Run once (it is resumable and skips finished files):\n"
            f"    {cmd}\n"
            f"or pass converted=False to map the official labels on the fly.",
            path=label_dir,
        )

    # -- reading ----------------------------------------------------------------------------
    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8 RGB, label (H, W) uint8 train ids) of item ``i``.

        A label whose size differs from its image's (a few GTAV pairs) is resized to the
        image with nearest neighbour, with a :class:`DataWarning` naming the files.
        """
        image = read_image(self.images[i])
        raw = read_label(self.labels[i], red_channel=self.red_channel)
        label = L.apply_lut(raw, self.lut) if self.lut is not None else raw.astype(np.uint8)
        if label.shape != image.shape[:2]:
            fix = (
                f" `{prepare_command(self.name, self.root)}` fixes such pairs once on disk."
                if self.name == "gtav"
                else ""
            )
            warnings.warn(
                f"{self.name}: label {self.labels[i]} is {label.shape[1]}x{label.shape[0]} but "
                f"its image {self.images[i]} is {image.shape[1]}x{image.shape[0]}; the label is "
                f"resized to the image (nearest).{fix}",
                DataWarning,
                stacklevel=2,
            )
            label = cv2.resize(
                label, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST
            )
        return image, label

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label = self.load(i)
        if self.transform is not None:
            image = self.transform(image)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": torch.from_numpy(label.astype(np.int64)),
            "path": self.images[i],
            "label_path": self.labels[i],
            "index": i,
        }


class GTAV(SegDataset):
    """GTAV ("Playing for Data"): ``images/*.png`` with ``labels/*.png`` (Cityscapes ids).

    ``converted=True`` reads ``labels/*_labelTrainIds.png`` from ``prepare_data.py gtav``.
    """

    name = "gtav"
    layout = GTAV_LAYOUT

    def __init__(self, root, *, converted: bool = True, transform=None):
        root = Path(root)
        imgs, labs = self._find(root, converted=converted)
        # converted labels are train ids already: the identity table only guards stray values
        lut = L.train_id_lut() if converted else L.cityscapes_lut()
        super().__init__(root, imgs, labs, lut=lut, transform=transform)


class Synthia(SegDataset):
    """SYNTHIA RAND_CITYSCAPES: ``RGB/*.png`` with 16-bit multi-channel ``GT/LABELS/*.png``."""

    name = "synthia"
    layout = SYNTHIA_LAYOUT

    def __init__(self, root, *, converted: bool = True, transform=None):
        root = Path(root)
        imgs, labs = self._find(root, converted=converted)
        lut = L.train_id_lut() if converted else L.synthia_lut()
        super().__init__(root, imgs, labs, lut=lut, red_channel=not converted, transform=transform)


class UrbanSyn(SegDataset):
    """UrbanSyn: ``rgb/rgb_NNNN.png`` with ``ss/ss_NNNN.png`` (train ids; 19 -> 255 on the fly)."""

    name = "urbansyn"
    layout = URBANSYN_LAYOUT

    def __init__(self, root, *, transform=None):
        root = Path(root)
        imgs, labs = self._find(root)
        super().__init__(root, imgs, labs, lut=L.urbansyn_lut(), transform=transform)


class Cityscapes(SegDataset):
    """Cityscapes: ``leftImg8bit/SPLIT/CITY/*_leftImg8bit.png`` with ``gtFine/SPLIT/CITY/...``.

    ``converted=True`` reads ``*_gtFine_labelTrainIds.png`` (``prepare_data.py cityscapes``),
    otherwise ``*_gtFine_labelIds.png`` through the Cityscapes table.
    """

    name = "cityscapes"
    layout = CITYSCAPES_LAYOUT

    def __init__(self, root, split: str = "val", *, converted: bool = True, transform=None):
        root = Path(root)
        imgs, labs = self._find(root, split, converted=converted)
        lut = L.train_id_lut() if converted else L.cityscapes_lut()
        self.split = split
        super().__init__(root, imgs, labs, lut=lut, transform=transform)


class BDD100K(SegDataset):
    """BDD100K 10k: ``images/10k/SPLIT/*.jpg`` with ``labels/sem_seg/masks/SPLIT/*.png``."""

    name = "bdd100k"
    layout = BDD100K_LAYOUT

    def __init__(self, root, split: str = "val", *, transform=None):
        root = Path(root)
        imgs, labs = self._find(root, split)
        self.split = split
        super().__init__(root, imgs, labs, lut=L.bdd100k_lut(), transform=transform)


class Mapillary(SegDataset):
    """Mapillary Vistas v1.2 validation, 66 labels -> 19 by name.

    ``half=True`` (default, evaluation): ``half/val_img/*.jpg`` + ``half/val_label/*.png`` from
    ``prepare_data.py mapillary``. ``half=False``: the official ``validation/images/*.jpg`` +
    ``validation/v1.2/labels/*.png`` mapped on the fly with ``config_v1.2.json``.
    """

    name = "mapillary"
    layout = MAPILLARY_LAYOUT

    def __init__(self, root, split: str = "validation", *, half: bool = True, transform=None):
        root = Path(root)
        if not half:
            imgs, labs = self._find(root, split)
            config = root / self.layout.config
            if not config.is_file():
                raise self._missing(config, "the v1.2 label configuration")
            self.split = split
            super().__init__(root, imgs, labs, lut=L.mapillary_lut(config), transform=transform)
            return
        if split != "validation":
            raise ValueError("the half-size copy exists for split='validation' only")
        official = self.layout.image_dir(root, split)
        half_layout = MAPILLARY_HALF_LAYOUT
        img_dir, lab_dir = half_layout.image_dir(root), half_layout.label_dir(root)
        if not img_dir.is_dir() or not lab_dir.is_dir():
            self._folders(self.layout, root, split)  # no official release there either?
            raise DataError(
                f"mapillary: the half-size evaluation copy {img_dir} / {lab_dir} does not "
                f"exist yet. Run once (resumable):\n"
                f"    {prepare_command('mapillary', root)}\n"
                f"or pass half=False to read the full-size files.",
                path=img_dir,
            )
        imgs, labs = self._pair(
            half_layout.image_files(img_dir),
            half_layout.label_files(lab_dir),
            img_dir,
            lab_dir,
            half_layout.pairing(),
        )
        # the official images, when still there, say how many the copy must hold
        expected = len(self.layout.image_files(official)) if official.is_dir() else 0
        if len(imgs) < expected:
            raise DataError(
                f"mapillary: the half-size copy {img_dir} is incomplete ({len(imgs)} of "
                f"{expected} images): the conversion was interrupted. Run again (it resumes):\n"
                f"    {prepare_command('mapillary', root)}",
                path=img_dir,
            )
        self.split = split
        super().__init__(root, imgs, labs, lut=L.train_id_lut(), transform=transform)


DATASETS: dict[str, type[SegDataset]] = {
    "gtav": GTAV,
    "synthia": Synthia,
    "urbansyn": UrbanSyn,
    "cityscapes": Cityscapes,
    "bdd100k": BDD100K,
    "mapillary": Mapillary,
}


ALIASES = {"gta": "gtav", "gta5": "gtav", "bdd": "bdd100k", "map": "mapillary"}


def canonical_name(name: str) -> str:
    """The DATASETS key of ``name`` (accepts the aliases gta, gta5, bdd, map)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        known = ", ".join([*DATASETS, *ALIASES])
        raise ValueError(f"unknown dataset {name!r}; known: {known}")
    return key


def build_dataset(name: str, root: str | Path, **kwargs) -> SegDataset:
    """``DATASETS[name](root, **kwargs)`` with a clear error for an unknown name."""
    return DATASETS[canonical_name(name)](root, **kwargs)


def build_eval_dataset(name: str, root: str | Path, **kwargs) -> SegDataset:
    """A target dataset's validation split with its docs/method.md §4 evaluation rescale."""
    key = canonical_name(name)
    if key not in EVAL_SCALES:
        raise ValueError(f"no evaluation scale for {name!r}; targets: {', '.join(EVAL_SCALES)}")
    return build_dataset(key, root, transform=EvalTransform(EVAL_SCALES[key]), **kwargs)


class TrainSet(Dataset):
    """Concatenated training sources with the training augmentation.

    Items are addressed by the sampler's keys ``(index, sample_seed)`` (a bare int ``index`` uses
    ``sample_seed(0, 0, index)``); the augmentation is driven by
    ``numpy.random.default_rng(sample_seed)`` only. An unreadable file is replaced by a
    deterministic other sample (chosen from the same key) with a :class:`DataWarning`; more
    than ``max_bad_fraction`` of the set (at least one file) or ``max_consecutive_bad``
    failures in a row raise a :class:`DataError`. The counts are per process (per DataLoader
    worker).
    """

    def __init__(
        self,
        sources: Sequence[SegDataset],
        transform: TrainTransform | None = None,
        *,
        max_bad_fraction: float = 0.01,
        max_consecutive_bad: int = 50,
    ):
        if not sources:
            raise ValueError("TrainSet needs at least one source dataset")
        self.sources = list(sources)
        self.transform = TrainTransform() if transform is None else transform
        self.sizes = [len(s) for s in self.sources]
        self.offsets = np.cumsum([0] + self.sizes)
        self.max_bad = max(1, math.floor(max_bad_fraction * len(self)))
        self.max_consecutive_bad = max_consecutive_bad
        self.bad_files: set[str] = set()
        self._consecutive = 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, index within that source) of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        s = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return s, int(index - self.offsets[s])

    def _record_bad(self, err: DataError, index: int) -> None:
        self.bad_files.add(err.path or f"sample {index}")
        self._consecutive += 1
        if len(self.bad_files) > self.max_bad or self._consecutive > self.max_consecutive_bad:
            raise DataError(
                f"too many unreadable training files: {len(self.bad_files)} distinct (limit "
                f"{self.max_bad}), {self._consecutive} failures in a row (limit "
                f"{self.max_consecutive_bad}); e.g. {_examples(self.bad_files)}. The dataset "
                f"copy looks damaged: re-extract it from the official archives (and re-run "
                f"training/prepare_data.py). Last error: {err}",
                path=err.path,
            ) from err

    def __getitem__(self, key) -> dict[str, Any]:
        if isinstance(key, (tuple, list)):
            index, seed = int(key[0]), int(key[1])
        else:
            index = int(key)
            seed = sample_seed(0, 0, index)
        current = index
        for attempt in range(self.max_consecutive_bad + 1):
            s, local = self.locate(current)
            try:
                image, label = self.sources[s].load(local)
            except DataError as err:
                self._record_bad(err, current)
                current = int(np.random.default_rng([seed, attempt, 0xBAD]).integers(len(self)))
                warnings.warn(
                    f"skipping unreadable training sample {index} "
                    f"({err.path or 'unknown file'}): using sample {current} instead. {err}",
                    DataWarning,
                    stacklevel=2,
                )
                continue
            self._consecutive = 0
            break
        else:  # pragma: no cover - _record_bad raises first
            raise DataError("no readable replacement sample found")
        rng = np.random.default_rng(seed)
        image, label, valid_hw = self.transform(image, label, rng)
        src = self.sources[s]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": torch.from_numpy(label.astype(np.int64)),
            "valid_hw": torch.tensor(valid_hw, dtype=torch.int64),
            "path": src.images[local],
            "index": index,
            "loaded_index": current,
            "seed": seed,
            "source": src.name,
        }


def build_train_set(
    roots: dict[str, str | Path],
    *,
    transform: TrainTransform | None = None,
    **kwargs,
) -> TrainSet:
    """TrainSet over ``roots`` = {dataset name: root}, in that order (e.g. gtav, synthia)."""
    return TrainSet([build_dataset(n, r) for n, r in roots.items()], transform, **kwargs)
