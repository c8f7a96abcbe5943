"""Save adapters alone (safetensors) and re-attach them to a fresh base model.

The file holds, per adapted layer, the trained ``lora_*_A``/``lora_*_B``, the initial factors
that define its residual, and the trained bias where the kind trains it (SoMA). RRQR's one-hot
``A0`` is stored as its column indices (``names.compress_one_hot``), which keeps the file at about
(adapter size + B0 size) instead of twice the adapter size. The header holds the config (with its
kind), the layer shapes and the arithmetic of the initialisation (``init.init_arithmetic``: QR
dtype, BLAS threads, LAPACK routine).
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..atomic import write_bytes
from .config import AdapterConfig, config_from_dict
from .init import init_arithmetic
from .model import (
    CONFIG_ATTR,
    find_config,
    freeze_all_but_adapters,
    iter_adapted,
    layer_class,
    split_name,
)
from .names import compress_one_hot, expand_one_hot, tensor_key

FORMAT = "recyclelora-adapters/2"


class InitialFactorsUnknownError(ValueError):
    """Adapters whose initial factors A0/B0 are unknown cannot be saved on their own."""


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
        for initial in (False, True):
            for adapter, b, a in layer.adapter_pairs(initial):
                tensors[tensor_key(name, adapter, "A", initial)] = a.detach()
                tensors[tensor_key(name, adapter, "B", initial)] = b.detach()
        if layer.trains_bias and layer.bias is not None:
            tensors[bias_key(name)] = layer.bias.detach()
    header = {
        "format": FORMAT,
        "config": json.dumps(config.to_dict()),
        "arithmetic": json.dumps(init_arithmetic(config)),
        "layers": json.dumps(layers),
        "user": json.dumps(metadata or {}),
    }
    tensors = compress_one_hot({k: v.contiguous().cpu() for k, v in tensors.items()})
    return write_bytes(path, safetensors.torch.save(tensors, metadata=header))


def bias_key(layer: str) -> str:
    return f"{layer}.bias"


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
    try:
        tensors = expand_one_hot(tensors)
    except ValueError as e:
        raise ValueError(f"{path}: damaged adapter file ({e}); re-save it") from e
    return header, tensors


def load_adapters(model: nn.Module, path: str | Path) -> AdapterConfig:
    """Re-attach saved adapters to ``model``, a fresh base model with plain ``nn.Linear`` layers.

    Pass the module that ``apply_recyclelora`` and ``save_adapters`` were given (layer names are
    relative to it); like ``apply_recyclelora``, it freezes everything in it but the adapters.

    No decomposition runs: the residual is rebuilt from the stored initial factors, so the result
    equals the saved model bit-exactly. Returns the adapters' config.
    """
    header, tensors = read_adapter_file(path)
    config = config_from_dict(json.loads(header["config"]))
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
        layer = layer_class(config).shaped_like(base, config, name)
        factors = {}
        for adapter, r in layer.ranks.items():
            if r == 0:
                factors[adapter] = None
                continue
            factors[adapter] = tuple(
                tensors[tensor_key(name, adapter, part, initial=True)] for part in "BA"
            )
        layer.reset_to_initial(base.weight, base.bias, factors)
        with torch.no_grad():
            for adapter, b, a in layer.adapter_pairs():
                a.copy_(tensors[tensor_key(name, adapter, "A")])
                b.copy_(tensors[tensor_key(name, adapter, "B")])
            if layer.trains_bias and layer.bias is not None:
                layer.bias.copy_(tensors[bias_key(name)])
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
