"""Save adapters alone (safetensors) and re-attach them to a fresh base model.

The file holds, per adapted layer, the trained ``lora_*_A``/``lora_*_B`` and the initial factors
that define its residual. RRQR's one-hot ``A0`` is stored as its column indices, which keeps the
file at about (adapter size + B0 size) instead of twice the adapter size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import RecycleLoRAConfig
from .layer import RecycleLoRALinear
from .model import (
    CONFIG_ATTR,
    find_config,
    freeze_all_but_adapters,
    iter_adapted,
    split_name,
)

FORMAT = "recyclelora-adapters/1"
ONE_HOT = ".A0_columns"


class InitialFactorsUnknownError(ValueError):
    """Adapters whose initial factors A0/B0 are unknown cannot be saved on their own."""


def one_hot_columns(a0: torch.Tensor) -> torch.Tensor | None:
    """Column index of each row if ``a0`` is exactly one-hot per row, else ``None``."""
    cols = a0.argmax(dim=1)
    expected = torch.zeros_like(a0)
    expected[torch.arange(a0.shape[0]), cols] = 1
    return cols if torch.equal(a0, expected) else None


def save_adapters(model: nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Write every adapter of ``model`` to ``path`` (a ``.safetensors`` file), atomically."""
    config = find_config(model)
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for name, layer in iter_adapted(model):
        if not layer.initial_factors_known:
            raise InitialFactorsUnknownError(
                f"initial factors unknown: {name} was loaded from a checkpoint without them, so "
                "the adapters cannot be re-attached to a base model on their own; reconstruct "
                "them from the base weights, e.g. load_mmseg_checkpoint(..., base_weights=PATH)"
            )
        layers[name] = [layer.out_features, layer.in_features, layer.bias is not None]
        for adapter, b, a in layer.adapter_pairs():
            p = f"{name}.lora_{adapter}"
            tensors[f"{p}_A"], tensors[f"{p}_B"] = a.detach(), b.detach()
            b0, a0 = getattr(layer, f"lora_{adapter}_B0"), getattr(layer, f"lora_{adapter}_A0")
            tensors[f"{p}_B0"] = b0
            cols = one_hot_columns(a0)
            if cols is None:
                tensors[f"{p}_A0"] = a0
            else:
                tensors[p + ONE_HOT] = cols
    header = {
        "format": FORMAT,
        "config": json.dumps(config.to_dict()),
        "layers": json.dumps(layers),
        "user": json.dumps(metadata or {}),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def read_adapter_file(path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header, tensors) of an adapter file, with a clear error for anything else.

    Tensors come back with dense ``*_A0`` keys, as in the adapted model's state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors adapter file ({e}); it may be truncated — "
            "re-save it with recyclelora.save_adapters"
        ) from e
    if header.get("format") != FORMAT:
        raise ValueError(
            f"{path} is a safetensors file but not a RecycleLoRA adapter file "
            f"(format {header.get('format')!r}, expected {FORMAT!r})"
        )
    for key in [k for k in tensors if k.endswith(ONE_HOT)]:
        prefix = key[: -len(ONE_HOT)]
        cols = tensors.pop(key)
        a0 = torch.zeros_like(tensors[f"{prefix}_A"])
        a0[torch.arange(len(cols)), cols] = 1
        tensors[f"{prefix}_A0"] = a0
    return header, tensors


def load_adapters(model: nn.Module, path: str | Path) -> RecycleLoRAConfig:
    """Re-attach saved adapters to ``model``, a fresh base model with plain ``nn.Linear`` layers.

    Pass the module that ``apply_recyclelora`` and ``save_adapters`` were given (layer names are
    relative to it); like ``apply_recyclelora``, it freezes everything in it but the adapters.

    No decomposition runs: the residual is rebuilt from the stored initial factors, so the result
    equals the saved model bit-exactly. Returns the adapters' config.
    """
    header, tensors = read_adapter_file(path)
    config = RecycleLoRAConfig.from_dict(json.loads(header["config"]))
    layers = json.loads(header["layers"])
    missing = [n for n in layers if not isinstance(getattr_path(model, n), nn.Linear)]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} adapted layers have no plain nn.Linear in this model, "
            f"e.g. {missing[:3]}; load adapters into the base model they were trained on"
        )
    for name, (out_f, in_f, _) in layers.items():
        base: nn.Linear = getattr_path(model, name)
        if (base.out_features, base.in_features) != (out_f, in_f):
            raise ValueError(
                f"{path}: layer {name} is {out_f}x{in_f} in the adapter file but "
                f"{base.out_features}x{base.in_features} in this model"
            )
        layer = RecycleLoRALinear(
            in_f,
            out_f,
            config.main_rank,
            config.sub_rank,
            config.alpha,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        layer.init_kind = config.init
        factors = {}
        for adapter, r in layer.ranks.items():
            if r == 0:
                factors[adapter] = None
                continue
            p = f"{name}.lora_{adapter}"
            factors[adapter] = (tensors[f"{p}_B0"], tensors[f"{p}_A0"])
        layer.reset_to_initial(base.weight, base.bias, factors)
        with torch.no_grad():
            for adapter, b, a in layer.adapter_pairs():
                a.copy_(tensors[f"{name}.lora_{adapter}_A"])
                b.copy_(tensors[f"{name}.lora_{adapter}_B"])
        parent, child = split_name(name)
        setattr(model.get_submodule(parent), child, layer)
    freeze_all_but_adapters(model)
    setattr(model, CONFIG_ATTR, config)
    return config


def getattr_path(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
