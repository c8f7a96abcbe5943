"""Write a model as an mmseg 1.x checkpoint, in the authors' layout or merged."""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..adapters.config import AdapterConfig
from ..adapters.layer import RecycleLoRALinear
from ..adapters.model import find_config, iter_adapted
from ..adapters.names import ADAPTER_KEY, compress_one_hot
from ..atomic import atomic_write
from .mmseg_keys import FACTORS_SECTION, FORMAT, authors_name

AdapterKeys = Literal["recyclelora", "merged"]


def _cityscapes_dataset_meta(num_classes: int) -> dict[str, Any] | None:
    if num_classes != 19:
        return None
    from ..data.labels import CLASS_NAMES, palette

    return {
        "classes": tuple(CLASS_NAMES),
        "palette": [[int(c) for c in row] for row in palette()],
    }


def _plain_config(config: AdapterConfig) -> dict[str, Any]:
    d = config.to_dict()
    d["target_modules"] = list(d["target_modules"])
    return d


def _export_state(
    model: nn.Module, adapted: Mapping[str, RecycleLoRALinear], adapter_keys: AdapterKeys
) -> tuple[collections.OrderedDict[str, Tensor], dict[str, Tensor]]:
    """(state dict in the file's names, known initial factors by our key)."""
    out: collections.OrderedDict[str, Tensor] = collections.OrderedDict()
    factors: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        layer_name, _, leaf = key.rpartition(".")
        layer = adapted.get(layer_name)
        value = value.detach().cpu()  # as mmengine's weights_to_cpu
        m = ADAPTER_KEY.match(leaf)
        if layer is None or (m is None and adapter_keys == "recyclelora"):
            out[key] = value
        elif adapter_keys == "merged":
            if leaf == "weight":
                out[key] = layer.merged().cpu()
            elif m is None:
                out[key] = value
        elif not m[4]:
            out[f"{layer_name}.{authors_name(m[2], m[3])}"] = value
        elif layer.initial_factors_known:
            factors[key] = value
    return out, factors


def export_meta(
    model: nn.Module,
    config: AdapterConfig | None,
    adapter_keys: str,
    initial_factors: str,
) -> dict[str, Any]:
    """Plain-Python meta: ``cfg`` as the authors' configs spell it, ours under ``recyclelora``."""
    num_classes = getattr(getattr(model, "decode_head", None), "num_classes", None)
    img_size = getattr(getattr(model, "backbone", None), "img_size", None)
    info: dict[str, Any] = {
        "format": FORMAT,
        "adapter_keys": adapter_keys if config is not None else "none",
        "config": _plain_config(config) if config is not None else None,
        "num_classes": None if num_classes is None else int(num_classes),
        "img_size": None if img_size is None else [int(s) for s in img_size],
        "initial_factors": initial_factors,
    }
    cfg_lines = ["# exported by recyclelora (summary, not a full config)"]
    if num_classes is not None:
        cfg_lines.append(f"num_classes = {int(num_classes)}")
    if config is not None and adapter_keys == "recyclelora":
        cfg_lines += [
            f"r_max = {config.main_rank + config.sub_rank}",
            f"r_main = {config.main_rank}",
            f"lora_alpha = {config.alpha!r}",
        ]
    meta: dict[str, Any] = {
        "cfg": "\n".join(cfg_lines) + "\n",
        "time": time.strftime("%Y%m%d_%H%M%S"),
        "recyclelora": info,
    }
    dataset_meta = _cityscapes_dataset_meta(int(num_classes)) if num_classes else None
    if dataset_meta:
        meta["dataset_meta"] = dataset_meta
    return meta


def export_mmseg_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_keys: AdapterKeys = "recyclelora",
    include_initial_factors: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an mmseg 1.x checkpoint ``{'meta': {...}, 'state_dict': ...}``.

    ``adapter_keys="recyclelora"``: the authors' layout — ``weight`` = residual, adapters as
    ``lora_A_main`` / ``lora_B_main`` / ``lora_A_sub`` / ``lora_B_sub`` (un-merged, whatever
    the layers' merge mode). ``"merged"``: adapters folded in (``W_res + s Σ B A``), plain
    DINOv2 keys. A model without adapters always gets plain keys.

    ``meta`` holds only plain Python, so the file also loads with
    ``torch.load(weights_only=True)``; entries given here are added. With
    ``include_initial_factors`` the known initial factors go to the top-level section
    :data:`~recyclelora.checkpoints.mmseg_keys.FACTORS_SECTION` (ignored by mmengine; one-hot
    ``A0`` as ``.columns``), which makes the round trip exact. The write is atomic.
    """
    if adapter_keys not in ("recyclelora", "merged"):
        raise ValueError(f"adapter_keys must be 'recyclelora' or 'merged', got {adapter_keys!r}")
    adapted = dict(iter_adapted(model))
    config = find_config(model) if adapted else None
    state, factors = _export_state(model, adapted, adapter_keys)
    with_factors = bool(adapted) and adapter_keys == "recyclelora" and include_initial_factors
    factors = compress_one_hot(factors) if with_factors else {}
    n_unknown = sum(not layer.initial_factors_known for layer in adapted.values())
    if not adapted or adapter_keys == "merged":
        status = "n/a"
    else:
        status = "none" if not factors else "partial" if n_unknown else "stored"
    checkpoint: dict[str, Any] = {
        "meta": {**export_meta(model, config, adapter_keys, status), **dict(meta or {})},
        "state_dict": state,
    }
    if factors:
        checkpoint[FACTORS_SECTION] = factors
    with atomic_write(path) as f:
        torch.save(checkpoint, f)
    return Path(path)
