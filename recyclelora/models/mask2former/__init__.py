"""Mask2Former decode head in plain PyTorch (mmdet 3.x / mmseg 1.x names and semantics)."""

from .head import Mask2FormerHead, semantic_inference, unmask_full_rows
from .losses import InstanceTargets, Mask2FormerLoss, semantic_to_instance_targets
from .matcher import HungarianMatcher
from .ms_deform_attn import MSDeformAttn, set_deform_attn_impl
from .pixel_decoder import MSDeformAttnPixelDecoder
from .positional_encoding import SinePositionalEncoding
from .transformer_decoder import (
    Mask2FormerTransformerDecoder,
    Mask2FormerTransformerDecoderLayer,
    MultiheadAttention,
)

__all__ = [
    "HungarianMatcher",
    "InstanceTargets",
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "Mask2FormerHead",
    "Mask2FormerLoss",
    "Mask2FormerTransformerDecoder",
    "Mask2FormerTransformerDecoderLayer",
    "MultiheadAttention",
    "SinePositionalEncoding",
    "semantic_inference",
    "semantic_to_instance_targets",
    "set_deform_attn_impl",
    "unmask_full_rows",
]
