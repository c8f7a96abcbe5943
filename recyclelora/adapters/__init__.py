"""The RecycleLoRA adapter core: usable on any PyTorch model with ``nn.Linear`` layers."""

from .config import RecycleLoRAConfig
from .io import load_adapters, save_adapters
from .layer import RecycleLoRALinear
from .model import (
    AdaptationReport,
    apply_recyclelora,
    iter_adapted,
    merge_recyclelora,
    unmerge_recyclelora,
)

__all__ = [
    "AdaptationReport",
    "RecycleLoRAConfig",
    "RecycleLoRALinear",
    "apply_recyclelora",
    "iter_adapted",
    "load_adapters",
    "merge_recyclelora",
    "save_adapters",
    "unmerge_recyclelora",
]
