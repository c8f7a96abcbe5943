"""RecycleLoRA: RRQR-initialised dual LoRA adapters for domain-generalised segmentation.

The public names below are imported on first use, so that ``import recyclelora.deploy`` (what a
serving image needs) does not pull in torch and the training stack.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the submodule that defines it
_EXPORTS = {
    "AdaptationReport": "adapters",
    "RecycleLoRAConfig": "adapters",
    "RecycleLoRALinear": "adapters",
    "SoMAConfig": "adapters",
    "apply_recyclelora": "adapters",
    "iter_adapted": "adapters",
    "load_adapters": "adapters",
    "merge_recyclelora": "adapters",
    "save_adapters": "adapters",
    "unmerge_recyclelora": "adapters",
    "LoadedModel": "checkpoints",
    "load_model": "checkpoints",
    "build_model": "models",
    "RECIPE_RULES": "param_groups",
    "Rule": "param_groups",
    "build_param_groups": "param_groups",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'recyclelora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
