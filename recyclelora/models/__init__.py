"""Models: DINOv2 backbone, Mask2Former head and the assembled segmentor."""

from .segmentor import PRESETS, Segmentor, build_model

__all__ = ["PRESETS", "Segmentor", "build_model"]

from .mmseg_format import (  # noqa: E402
    MmsegCheckpointError,
    MmsegLoadReport,
    export_mmseg_checkpoint,
    load_mmseg_checkpoint,
    read_mmseg_checkpoint,
    reconstruct_initial_factors,
)

__all__ += [
    "MmsegCheckpointError",
    "MmsegLoadReport",
    "export_mmseg_checkpoint",
    "load_mmseg_checkpoint",
    "read_mmseg_checkpoint",
    "reconstruct_initial_factors",
]
