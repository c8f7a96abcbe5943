"""Models: DINOv2 backbone, Mask2Former head and the assembled segmentor."""

from .segmentor import PRESETS, Segmentor, build_model

__all__ = ["PRESETS", "Segmentor", "build_model"]
