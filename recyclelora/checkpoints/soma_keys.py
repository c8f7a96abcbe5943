"""The key map between SoMA's mmseg checkpoints and our SoMA models
(``docs/mmseg_checkpoint_layout.md`` §11): pure functions on state dicts.

SoMA's DINOv2 sits in ``SoraModel`` (``backbone.model.*``), has separate ``attn.q``, ``attn.k``
and ``attn.v`` layers where ours has the fused ``attn.qkv``, and keeps each adapter as two
``nn.Linear`` modules (``lora_A.weight`` (r, k), ``lora_B.weight`` (d, r)); the residual is the
layer's ``weight`` in both. ``decode_head.*`` maps as in :mod:`.mmseg_keys`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..adapters.config import SoMAConfig
from ..adapters.model import block_index
from ..adapters.names import ADAPTER_KEY, QKV_ADAPTERS
from ..adapters.soma import FUSED_QKV
from .errors import MmsegCheckpointError
from .mmseg_keys import adapter_layout, find_alpha, map_key, ordered_targets

#: SoMA's backbone prefix (``SoraModel.model`` is the DINOv2)
SORA_PREFIX = "backbone.model."
OURS_PREFIX = "backbone."
SORA = "SoraModel prefix"
CONCATENATED = "q, k, v concatenated into qkv"
SPLIT = "qkv split into q, k, v"
ADAPTER_MODULE = "SoMA adapter module"
_SEPARATE = re.compile(r"^(backbone\..*attn)\.([qkv])\.(weight|bias|lora_[AB]\.weight)$")
_LORA_MODULE = re.compile(r"^(backbone\..+)\.lora_([AB])\.weight$")
_FUSED = re.compile(rf"^(backbone\..*attn)\.{FUSED_QKV}\.(weight|bias)$")
_FUSED_ADAPTER = re.compile(rf"^(backbone\..*attn)\.{FUSED_QKV}\.lora_([qkv])_([AB])$")
_MAIN_ADAPTER = re.compile(r"^(backbone\..+)\.lora_main_([AB])$")


@dataclass
class KeyMap:
    """A state dict in the other layout, and what was done to its keys.

    ``renamed``: ``(source key, new key, why)``; ``skipped``: ``(source key, why)``.
    """

    state: dict[str, Tensor] = field(default_factory=dict)
    renamed: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def put(self, source: str, key: str, value: Tensor, why: str) -> None:
        if key in self.state:
            raise MmsegCheckpointError(f"two keys map to {key!r} (e.g. {source!r})")
        self.state[key] = value
        if key != source:
            self.renamed.append((source, key, why))


def soma_keys(state: Mapping[str, Any]) -> list[str]:
    """Keys of SoMA's layout (``backbone.model.*``, LoRA as ``lora_A.weight`` modules)."""
    return [k for k in state if k.startswith(SORA_PREFIX) or ".lora_A.weight" in k]


def soma_to_ours(state: Mapping[str, Any], where: str = "the file") -> KeyMap:
    """SoMA's keys -> ours: ``backbone.model.`` -> ``backbone.``; q, k, v weights and biases
    concatenated (dim 0, in that order) into ``attn.qkv``; ``attn.{q,k,v}.lora_{A,B}.weight`` ->
    ``attn.qkv.lora_{q,k,v}_{A,B}``; other ``lora_{A,B}.weight`` -> ``lora_main_{A,B}``.

    Raises MmsegCheckpointError for a layer whose q, k and v are not all present (our fused
    ``qkv`` holds the three together) or do not fit side by side.
    """
    out = KeyMap()
    separate: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            out.skipped.append((key, f"not a tensor ({type(value).__name__})"))
            continue
        name = OURS_PREFIX + key.removeprefix(SORA_PREFIX) if key.startswith(SORA_PREFIX) else key
        if m := _SEPARATE.match(name):
            separate.setdefault((m[1], m[3]), {})[m[2]] = (key, value)
        elif m := _LORA_MODULE.match(name):
            out.put(key, f"{m[1]}.lora_main_{m[2]}", value, ADAPTER_MODULE)
        else:
            new, how = map_key(name)
            if new is None:
                out.skipped.append((key, how))
            else:
                out.put(key, new, value, how or SORA)
    for (attn, leaf), parts in separate.items():
        absent = [p for p in QKV_ADAPTERS if p not in parts]
        if absent:
            found = ", ".join(parts[p][0] for p in QKV_ADAPTERS if p in parts)
            raise MmsegCheckpointError(
                f"{where}: {found} without {'/'.join(absent)} ({attn}.{{q,k,v}}.{leaf}): our "
                f"DINOv2's fused {FUSED_QKV} layer holds q, k and v together, so a file must "
                "have all three (SoMA's target_modules include q, k and v, or none of them)"
            )
        if leaf.startswith("lora_"):
            for p in QKV_ADAPTERS:
                source, value = parts[p]
                out.put(source, f"{attn}.{FUSED_QKV}.lora_{p}_{leaf[5]}", value, ADAPTER_MODULE)
            continue
        tensors = [parts[p][1] for p in QKV_ADAPTERS]
        if len({tuple(t.shape) for t in tensors}) > 1:
            shapes = [tuple(t.shape) for t in tensors]
            raise MmsegCheckpointError(
                f"{where}: {attn}.{{q,k,v}}.{leaf} have shapes {shapes}; they must be equal"
            )
        out.put(parts["q"][0], f"{attn}.{FUSED_QKV}.{leaf}", torch.cat(tensors), CONCATENATED)
    return out


def ours_to_soma(state: Mapping[str, Tensor]) -> KeyMap:
    """Our keys -> SoMA's, the inverse of :func:`soma_to_ours`. Initial factors
    (``lora_*_{A,B}0``) are skipped: SoMA's files carry none. Split tensors are copies, so a
    saved file holds no storage twice."""
    out = KeyMap()
    for key, value in state.items():
        m = ADAPTER_KEY.match(key)
        if m and m[4]:
            out.skipped.append((key, "initial factor: SoMA's layout has none"))
            continue
        if not key.startswith(OURS_PREFIX):
            out.put(key, key, value, "")
            continue
        name = SORA_PREFIX + key.removeprefix(OURS_PREFIX)
        if m := _FUSED.match(name):
            for p, part in zip(QKV_ADAPTERS, value.chunk(len(QKV_ADAPTERS)), strict=True):
                out.put(key, f"{m[1]}.{p}.{m[2]}", part.clone(), SPLIT)
        elif m := _FUSED_ADAPTER.match(name):
            out.put(key, f"{m[1]}.{m[2]}.lora_{m[3]}.weight", value, ADAPTER_MODULE)
        elif m := _MAIN_ADAPTER.match(name):
            out.put(key, f"{m[1]}.lora_{m[2]}.weight", value, ADAPTER_MODULE)
        else:
            out.put(key, name, value, SORA)
    return out


def soma_target_names(config: SoMAConfig) -> list[str]:
    """SoMA's ``target_modules`` for ours: ``qkv`` is their ``q``, ``k``, ``v``."""
    return [n for t in config.target_modules for n in (QKV_ADAPTERS if t == FUSED_QKV else (t,))]


def soma_rank(mapped: Mapping[str, Tensor], where: str = "the file") -> int | None:
    """The adapters' rank from the shapes of our-named keys; None when there are none."""
    ranks = {r for layer in adapter_layout(mapped).values() for r in layer.values() if r}
    if len(ranks) > 1:
        raise MmsegCheckpointError(
            f"{where}: adapters of ranks {sorted(ranks)} in one file; SoMA uses one rank for "
            "every layer"
        )
    return ranks.pop() if ranks else None


def soma_config(
    mapped: Mapping[str, Tensor], meta: Mapping[str, Any], where: str = "the file"
) -> tuple[SoMAConfig, list[str]]:
    """The SoMAConfig a file's our-named tensors imply: rank from the shapes, alpha from its
    meta (``lora_alpha``; the rank, SoMA's choice, when absent), first block and targets from
    the adapted layers. Returns it and notes."""
    layers = sorted(adapter_layout(mapped))
    rank = soma_rank(mapped, where)
    if rank is None:
        raise MmsegCheckpointError(f"{where}: no SoMA adapter tensors (lora_A.weight)")
    notes = []
    alpha, _ = find_alpha(meta)
    if alpha is None:
        alpha = float(rank)
        notes.append(f"lora_alpha not recorded; assumed SoMA's lora_alpha = r = {rank}")
    blocks = [block_index(n) for n in layers]
    if None in blocks:
        raise MmsegCheckpointError(
            f"{where}: adapters outside the blocks ({layers[blocks.index(None)]})"
        )
    targets = ordered_targets(layers, SoMAConfig.target_modules)
    return SoMAConfig(rank, alpha, min(blocks), targets), notes
