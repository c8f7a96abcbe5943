"""The adapter core, usable on any PyTorch model with ``nn.Linear`` layers: RecycleLoRA's dual
adapters, and SoMA's (the baseline), sharing the residual, merge and save/load machinery."""

from .config import AdapterConfig, RecycleLoRAConfig, SoMAConfig
from .io import load_adapters, save_adapters
from .layer import AdaptedLinear, RecycleLoRALinear
from .model import (
    AdaptationReport,
    apply_recyclelora,
    iter_adapted,
    merge_recyclelora,
    unmerge_recyclelora,
)
from .soma import SoMALinear

__all__ = [
    "AdaptationReport",
    "AdaptedLinear",
    "AdapterConfig",
    "RecycleLoRAConfig",
    "RecycleLoRALinear",
    "SoMAConfig",
    "SoMALinear",
    "apply_recyclelora",
    "iter_adapted",
    "load_adapters",
    "merge_recyclelora",
    "save_adapters",
    "unmerge_recyclelora",
]
