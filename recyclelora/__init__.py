"""RecycleLoRA: RRQR-initialised dual LoRA adapters for domain-generalised segmentation."""

from .adapters import (
    AdaptationReport,
    RecycleLoRAConfig,
    RecycleLoRALinear,
    apply_recyclelora,
    iter_adapted,
    load_adapters,
    merge_recyclelora,
    save_adapters,
    unmerge_recyclelora,
)
from .checkpoints import LoadedModel, load_model
from .models import build_model
from .param_groups import RECIPE_RULES, Rule, build_param_groups

__all__ = [
    "RECIPE_RULES",
    "AdaptationReport",
    "LoadedModel",
    "RecycleLoRAConfig",
    "RecycleLoRALinear",
    "Rule",
    "apply_recyclelora",
    "build_model",
    "build_param_groups",
    "iter_adapted",
    "load_adapters",
    "load_model",
    "merge_recyclelora",
    "save_adapters",
    "unmerge_recyclelora",
]
