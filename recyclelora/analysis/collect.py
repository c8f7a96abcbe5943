"""Gather adapter tensors from a model, an adapter file or a training checkpoint: RecycleLoRA's
main and sub adapters, SoMA's main adapter and the q, k, v adapters of a fused ``qkv`` layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters.io import read_adapter_file
from ..adapters.model import block_index
from ..adapters.names import ADAPTER_KEY, ADAPTER_NAMES


@dataclass
class Adapter:
    """One adapter of one layer: ``B`` (d, r), ``A`` (r, k) and the initial values if known."""

    B: torch.Tensor
    A: torch.Tensor
    B0: torch.Tensor | None = None
    A0: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class LayerAdapters:
    name: str
    adapters: dict[str, Adapter] = field(default_factory=dict)

    @property
    def block(self) -> int | None:
        """First integer component of the layer name (``blocks.7.attn.qkv`` -> 7)."""
        return block_index(self.name)


def from_state_dict(state: dict[str, torch.Tensor]) -> dict[str, LayerAdapters]:
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = ADAPTER_KEY.match(key)
        if m:
            layer, adapter, part, initial = m.groups()
            parts.setdefault((layer or "", adapter), {})[part + initial] = t.detach().cpu()
    layers: dict[str, LayerAdapters] = {}
    # layers by name, each layer's adapters in the order of ADAPTER_NAMES (main, sub, q, k, v)
    for (layer, adapter), p in sorted(
        parts.items(), key=lambda i: (i[0][0], ADAPTER_NAMES.index(i[0][1]))
    ):
        if "A" not in p or "B" not in p:
            raise ValueError(f"{layer}: lora_{adapter} has {sorted(p)}, needs both A and B")
        entry = layers.setdefault(layer, LayerAdapters(layer))
        b0, a0 = p.get("B0"), p.get("A0")
        if b0 is not None and a0 is not None and not (b0.isfinite().all() and a0.isfinite().all()):
            b0 = a0 = None  # NaN: unknown (a checkpoint that did not carry them)
        entry.adapters[adapter] = Adapter(p["B"], p["A"], b0, a0)
    return layers


def load_source(source: str | Path | nn.Module) -> dict[str, LayerAdapters]:
    """Adapters of an adapted model, a ``save_adapters`` file or a checkpoint with a state_dict."""
    if isinstance(source, nn.Module):
        state = source.state_dict()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        if path.suffix == ".safetensors":
            _, state = read_adapter_file(path)
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
            for wrapper in ("state_dict", "model"):
                if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                    state = state[wrapper]
    layers = from_state_dict(state)
    if not layers:
        raise ValueError(f"{source}: no RecycleLoRA adapter tensors (keys '*.lora_main_A', ...)")
    return layers
