"""Where each official release keeps its images and labels (docs/method.md §4), spelled once.

The dataset readers (:mod:`.datasets`) and the one-off converters (:mod:`.convert`) both find
their files through these :class:`Layout` objects, and their error messages describe the
expected layout from the same fields, so a folder name or suffix cannot disagree between them.

A file is named ``<prefix><key><suffix>`` inside its folder (one ``CITY/`` level deeper for
Cityscapes); an image and its label pair up by ``key``. Converted train-id labels are written
beside the official ones with the release's ``converted_suffix``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..atomic import is_temporary

__all__ = [
    "BDD100K_LAYOUT",
    "CITYSCAPES_LAYOUT",
    "GTAV_LAYOUT",
    "LAYOUTS",
    "MAPILLARY_HALF_LAYOUT",
    "MAPILLARY_LAYOUT",
    "SYNTHIA_LAYOUT",
    "TRAIN_IDS",
    "URBANSYN_LAYOUT",
    "Layout",
]

TRAIN_IDS = "_labelTrainIds.png"  # suffix of the converted labels (Rein's configurations)


@dataclass(frozen=True)
class Layout:
    """One release's folders and file names, relative to the dataset root."""

    name: str  # the dataset's key in datasets.DATASETS
    title: str  # the release as its authors name it, for messages
    source: str  # where the official release is downloaded from
    images: str  # image folder; "{split}" stands for the split
    labels: str  # official label folder
    image_suffix: str
    label_suffix: str
    converted_suffix: str = ""  # "" when the official labels are read as they are
    image_prefix: str = ""
    label_prefix: str = ""
    subfolder: str = ""  # how messages show the one folder level below images/labels, if any
    splits: tuple[str, ...] = ()  # the labelled splits, when the folders contain "{split}"
    config: str = ""  # the release's label configuration file, if any
    key: str = "X"  # how messages show a key (NNNNN: numbered files)

    # -- folders ----------------------------------------------------------------------------
    def image_dir(self, root: str | Path, split: str = "") -> Path:
        return Path(root) / self.images.format(split=split)

    def label_dir(self, root: str | Path, split: str = "") -> Path:
        return Path(root) / self.labels.format(split=split)

    # -- files ------------------------------------------------------------------------------
    def image_files(self, folder: Path) -> dict[str, Path]:
        """{key: path} of the images in ``folder``."""
        return self._files(folder, self.image_prefix, self.image_suffix, "")

    def label_files(self, folder: Path, *, converted: bool = False) -> dict[str, Path]:
        """{key: path} of the official (or, with ``converted``, the converted) labels."""
        if converted:
            if not self.converted_suffix:
                raise ValueError(f"{self.title} labels are read as they are: nothing is converted")
            return self._files(folder, self.label_prefix, self.converted_suffix, "")
        return self._files(folder, self.label_prefix, self.label_suffix, self.converted_suffix)

    def image_path(self, folder: Path, key: str) -> Path:
        return folder / f"{self.image_prefix}{key}{self.image_suffix}"

    def label_path(self, folder: Path, key: str) -> Path:
        """The official label of ``key`` (``CITY/stem`` keys for releases with a subfolder)."""
        return folder / f"{self.label_prefix}{key}{self.label_suffix}"

    def converted_path(self, label: Path) -> Path:
        """Where the conversion of the official label ``label`` is written (beside it)."""
        return label.with_name(label.name[: -len(self.label_suffix)] + self.converted_suffix)

    def _files(self, folder: Path, prefix: str, suffix: str, exclude: str) -> dict[str, Path]:
        pattern = f"{'*/' if self.subfolder else ''}{prefix}*{suffix}"
        out = {}
        for p in folder.glob(pattern):
            if is_temporary(p) or (exclude and p.name.endswith(exclude)):
                continue
            key = p.name[len(prefix) : -len(suffix)]
            out[f"{p.parent.name}/{key}" if self.subfolder else key] = p
        return out

    # -- messages ---------------------------------------------------------------------------
    def _shown(self, folder: str, prefix: str, suffix: str, split: str | None, key: str) -> str:
        if split is None:
            split = self.splits[0] if len(self.splits) == 1 else "{" + ",".join(self.splits) + "}"
        sub = f"{self.subfolder}/" if self.subfolder else ""
        return f"{folder.format(split=split)}/{sub}{prefix}{key}{suffix}"

    def describe(self, split: str | None = None) -> str:
        """The expected files, e.g. ``images/NNNNN.png and labels/NNNNN.png``."""
        image = self._shown(self.images, self.image_prefix, self.image_suffix, split, self.key)
        label = self._shown(self.labels, self.label_prefix, self.label_suffix, split, self.key)
        return f"{self.config + ', ' if self.config else ''}{image} and {label}"

    def pairing(self, split: str | None = None, *, converted: bool = False) -> str:
        """How an image and its label pair up, e.g. ``images/X.png <-> labels/X.png``."""
        suffix = self.converted_suffix if converted else self.label_suffix
        image = self._shown(self.images, self.image_prefix, self.image_suffix, split, "X")
        label = self._shown(self.labels, self.label_prefix, suffix, split, "X")
        return f"{image} <-> {label}"


GTAV_LAYOUT = Layout(
    name="gtav",
    title="GTAV",
    source=(
        "'Playing for Data: Ground Truth from Computer Games' (TU Darmstadt download page, "
        "download.visinf.tu-darmstadt.de/data/from_games/): the 10 image and 10 label parts, "
        "extracted into ROOT"
    ),
    images="images",
    labels="labels",  # palette PNGs of Cityscapes ids
    image_suffix=".png",
    label_suffix=".png",
    converted_suffix=TRAIN_IDS,
    key="NNNNN",
)
SYNTHIA_LAYOUT = Layout(
    name="synthia",
    title="SYNTHIA RAND_CITYSCAPES",
    source="SYNTHIA-RAND-CITYSCAPES (synthia-dataset.net, Downloads page), extracted into ROOT",
    images="RGB",
    labels="GT/LABELS",  # 16-bit, class id in the red channel
    image_suffix=".png",
    label_suffix=".png",
    converted_suffix=TRAIN_IDS,
    key="NNNNNNN",
)
URBANSYN_LAYOUT = Layout(
    name="urbansyn",
    title="UrbanSyn",
    source="UrbanSyn (www.urbansyn.org, download page): the rgb and ss parts, extracted into ROOT",
    images="rgb",
    labels="ss",  # train ids already (19 = unlabelled)
    image_suffix=".png",
    label_suffix=".png",
    image_prefix="rgb_",
    label_prefix="ss_",
    key="NNNN",
)
CITYSCAPES_LAYOUT = Layout(
    name="cityscapes",
    title="Cityscapes",
    source=(
        "Cityscapes (www.cityscapes-dataset.com, Downloads, login required): "
        "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, extracted into ROOT"
    ),
    images="leftImg8bit/{split}",
    labels="gtFine/{split}",
    image_suffix="_leftImg8bit.png",
    label_suffix="_gtFine_labelIds.png",
    converted_suffix="_gtFine_labelTrainIds.png",
    subfolder="CITY",
    splits=("train", "val"),
    key="*",
)
BDD100K_LAYOUT = Layout(
    name="bdd100k",
    title="BDD100K",
    source=(
        "BDD100K (bdd-data.berkeley.edu, download page, login required): '10K Images' and "
        "'Semantic Segmentation' labels, extracted into ROOT"
    ),
    images="images/10k/{split}",
    labels="labels/sem_seg/masks/{split}",  # train ids already
    image_suffix=".jpg",
    label_suffix=".png",
    splits=("train", "val"),
)
MAPILLARY_LAYOUT = Layout(
    name="mapillary",
    title="Mapillary Vistas v1.2",
    source=(
        "Mapillary Vistas Dataset v1.2 (www.mapillary.com/dataset/vistas, research edition), "
        "extracted into ROOT"
    ),
    images="{split}/images",
    labels="{split}/v1.2/labels",  # palette PNGs of the 66 v1.2 labels
    image_suffix=".jpg",
    label_suffix=".png",
    splits=("validation",),
    config="config_v1.2.json",
)
# The half-size evaluation copy of Mapillary's validation split (Rein's), labels in train ids.
MAPILLARY_HALF_LAYOUT = Layout(
    name="mapillary",
    title="Mapillary Vistas v1.2 half-size copy",
    source=MAPILLARY_LAYOUT.source,
    images="half/val_img",
    labels="half/val_label",
    image_suffix=".jpg",
    label_suffix=".png",
)

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        GTAV_LAYOUT,
        SYNTHIA_LAYOUT,
        URBANSYN_LAYOUT,
        CITYSCAPES_LAYOUT,
        BDD100K_LAYOUT,
        MAPILLARY_LAYOUT,
    )
}
