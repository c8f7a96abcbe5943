"""Datasets, augmentation, sampling and loading for the RecycleLoRA recipe (docs/method.md §3-4).

- :mod:`.labels` - the 19 classes, palette, every source's id -> train-id table
- :mod:`.imageio` - OpenCV reading/writing; :class:`DataError` names the file and the fix
- :mod:`.layouts` - each release's folders and file names, spelled once for readers and converters
- :mod:`.datasets` - GTAV, SYNTHIA, UrbanSyn, Cityscapes, BDD100K, Mapillary; :class:`TrainSet`
- :mod:`.convert` - the one-off label conversions and Mapillary's half-size copy
- :mod:`.transforms` - training augmentation, evaluation rescale, normalisation
- :mod:`.sampler` - infinite, seedable, DDP-sharded, resumable source sampler
- :mod:`.loader` - DataLoader construction and batch collation
"""

from .datasets import (
    BDD100K,
    DATASETS,
    GTAV,
    Cityscapes,
    Mapillary,
    SegDataset,
    Synthia,
    TrainSet,
    UrbanSyn,
    build_dataset,
    build_eval_dataset,
    build_train_set,
    canonical_name,
    prepare_command,
)
from .imageio import DataError, DataWarning, read_image, read_label
from .labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, colorize, palette
from .loader import TrainLoader, build_loader, build_train_sampler, collate
from .sampler import GTAV_SUBSET_SIZE, InfiniteSourceSampler, sample_seed
from .transforms import (
    EVAL_SCALES,
    EvalTransform,
    PhotoMetricDistortion,
    TrainTransform,
)

__all__ = [
    "BDD100K",
    "CLASS_NAMES",
    "DATASETS",
    "EVAL_SCALES",
    "GTAV",
    "GTAV_SUBSET_SIZE",
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "Cityscapes",
    "DataError",
    "DataWarning",
    "EvalTransform",
    "InfiniteSourceSampler",
    "Mapillary",
    "PhotoMetricDistortion",
    "SegDataset",
    "Synthia",
    "TrainLoader",
    "TrainSet",
    "TrainTransform",
    "UrbanSyn",
    "build_dataset",
    "build_eval_dataset",
    "build_loader",
    "build_train_sampler",
    "build_train_set",
    "canonical_name",
    "collate",
    "colorize",
    "palette",
    "prepare_command",
    "read_image",
    "read_label",
    "sample_seed",
]
