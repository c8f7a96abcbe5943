"""Checkpoints: training checkpoints, mmseg-format files, and one loader for all of them.

- :func:`load_model`: any checkpoint -> model, with the kind it was (``loader``);
- training checkpoints, atomic and rotating (``training``);
- mmseg 1.x / mmengine files read without running pickled code (``safe_pickle``,
  ``mmseg_read``), their key map (``mmseg_keys``), loading (``mmseg_load``) and export
  (``mmseg_export``);
- SoMA's mmseg files: key map (``soma_keys``), loading and export (``soma_mmseg``).
The layout: ``docs/mmseg_checkpoint_layout.md``.
"""

from .errors import CheckpointError, MmsegCheckpointError, TrainingCheckpointError
from .loader import LoadedModel, inspect_checkpoint, load_model, load_trained_model
from .mmseg_export import export_mmseg_checkpoint
from .mmseg_keys import FACTORS_SECTION, FORMAT
from .mmseg_load import (
    MmsegLoadReport,
    load_mmseg_checkpoint,
    reconstruct_from_base_weights,
)
from .mmseg_read import read_mmseg_checkpoint
from .safe_pickle import StubObject
from .soma_mmseg import export_soma_checkpoint, load_soma_checkpoint
from .training import list_checkpoints, load_latest, newest_checkpoint, save_checkpoint

__all__ = [
    "FACTORS_SECTION",
    "FORMAT",
    "CheckpointError",
    "LoadedModel",
    "MmsegCheckpointError",
    "MmsegLoadReport",
    "StubObject",
    "TrainingCheckpointError",
    "export_mmseg_checkpoint",
    "export_soma_checkpoint",
    "inspect_checkpoint",
    "list_checkpoints",
    "load_latest",
    "load_mmseg_checkpoint",
    "load_soma_checkpoint",
    "load_model",
    "load_trained_model",
    "newest_checkpoint",
    "read_mmseg_checkpoint",
    "reconstruct_from_base_weights",
    "save_checkpoint",
]
