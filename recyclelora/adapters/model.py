"""Adapt any PyTorch model in place, fold the adapters back, and say what was done.

The config decides the kind: ``RecycleLoRAConfig`` (RecycleLoRALinear) or ``SoMAConfig``
(SoMALinear, the baseline); everything else is shared.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import AdapterConfig, SoMAConfig
from .layer import AdaptedLinear, RecycleLoRALinear
from .names import is_adapter_tensor
from .soma import SoMALinear

log = logging.getLogger(__name__)

CONFIG_ATTR = "recyclelora_config"
LAYER_CLASSES: dict[str, type[AdaptedLinear]] = {
    "recyclelora": RecycleLoRALinear,
    "soma": SoMALinear,
}
BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass
class AdaptationReport:
    """What ``apply_recyclelora`` did: adapted layers and the parameter budget."""

    config: AdapterConfig
    layers: list[tuple[str, tuple[int, int]]] = field(default_factory=list)
    adapter_params: int = 0
    bias_params: int = 0  # trainable biases of adapted layers (SoMA)
    frozen_params: int = 0

    def __str__(self) -> str:
        c = self.config
        if isinstance(c, SoMAConfig):
            head = f"SoMA (rank {c.rank}, scaling {c.scaling:.4g}, blocks {c.first_block}+)"
        else:
            head = (
                f"RecycleLoRA ({c.init}, main rank {c.main_rank}, sub rank {c.sub_rank}, "
                f"scaling {c.scaling:.4g})"
            )
        biases = f" plus {self.bias_params:,} biases" if self.bias_params else ""
        return (
            f"{head}: adapted {len(self.layers)} linear layers ({', '.join(c.target_modules)}); "
            f"trainable adapter parameters {self.adapter_params:,} "
            f"({self.adapter_params / 1e6:.2f}M){biases}, frozen {self.frozen_params:,}"
        )


def layer_class(config: AdapterConfig) -> type[AdaptedLinear]:
    return LAYER_CLASSES[config.kind]


def block_index(name: str) -> int | None:
    """First integer component of a layer name (``blocks.7.attn.qkv`` -> 7)."""
    m = BLOCK_INDEX.search(name)
    return int(m.group(1)) if m else None


def is_target(name: str, config: AdapterConfig) -> bool:
    """Whether the layer named ``name`` is adapted: its last component is a target and, for
    SoMA, its block is not one of the first ``first_block``."""
    if split_name(name)[1] not in config.target_modules:
        return False
    if isinstance(config, SoMAConfig) and config.first_block > 0:
        block = block_index(name)
        return block is not None and block >= config.first_block
    return True


def split_name(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def iter_adapted(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def find_config(model: nn.Module) -> AdapterConfig:
    """The config that ``apply_recyclelora`` left on the model (or on one of its submodules)."""
    for module in model.modules():
        cfg = getattr(module, CONFIG_ATTR, None)
        if cfg is not None:
            return cfg
    raise ValueError("this model has no RecycleLoRA adapters: call apply_recyclelora first")


def adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in model.named_parameters():
        if is_adapter_tensor(split_name(name)[1]):
            yield name, p


def trainable_biases(model: nn.Module) -> Iterator[nn.Parameter]:
    """The biases that train with the adapters (those of SoMA's layers)."""
    for _, layer in iter_adapted(model):
        if layer.trains_bias and layer.bias is not None:
            yield layer.bias


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Only ``lora_*`` tensors train, and the biases of the layer kinds that train them
    (SoMA's): residuals and everything else are frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_tensor(split_name(name)[1]))
    for bias in trainable_biases(model):
        bias.requires_grad_(True)


def apply_recyclelora(
    model: nn.Module,
    config: AdapterConfig,
    *,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
    initialize: bool = True,
) -> AdaptationReport:
    """Replace every matching ``nn.Linear`` of ``model`` in place and freeze all the rest of it.

    ``config`` says the kind: RecycleLoRA's dual adapters or SoMA's (with its trainable biases).

    ``initialize=False`` skips the decomposition and leaves the adapter tensors uninitialised:
    for a model whose state_dict (a checkpoint) is loaded right after.

    Apply it to the part to adapt (the backbone): a head that should train stays outside.
    ``progress=None`` shows a bar only on a terminal. Returns (and logs) an ``AdaptationReport``.
    """
    if any(True for _ in iter_adapted(model)):
        raise ValueError("model already has adapters; merge or rebuild it first")
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and is_target(name, config)
    ]
    if not targets:
        blocks = f" in blocks >= {config.first_block}" if isinstance(config, SoMAConfig) else ""
        raise ValueError(
            f"no nn.Linear named one of {config.target_modules}{blocks} in "
            f"{type(model).__name__}; set target_modules to the last component of the layer "
            "names to adapt"
        )
    report = AdaptationReport(config)
    cls = layer_class(config)
    bar = tqdm(
        targets,
        desc=f"{config.kind} {config.init} init",
        unit="layer",
        disable=None if progress is None else not progress,
    )
    for name, linear in bar:
        layer = cls.from_linear(linear, config, generator, initialize, name=name)
        parent, child = split_name(name)
        setattr(model.get_submodule(parent), child, layer)
        report.layers.append((name, (linear.out_features, linear.in_features)))
    freeze_all_but_adapters(model)
    setattr(model, CONFIG_ATTR, config)
    report.adapter_params = sum(p.numel() for _, p in adapter_parameters(model))
    report.bias_params = sum(p.numel() for p in trainable_biases(model))
    report.frozen_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log.info("%s", report)
    return report


def merge_recyclelora(model: nn.Module, *, unload: bool = True) -> nn.Module:
    """Fold the adapters into the weights: no extra cost at inference.

    ``unload=True`` replaces each adapted layer by a plain ``nn.Linear`` (state_dict keys and
    shapes equal the base model's; this is what export uses). ``unload=False`` keeps the layers
    in merged mode so that ``unmerge_recyclelora`` can return to training exactly.
    """
    for name, layer in list(iter_adapted(model)):
        if unload:
            parent, child = split_name(name)
            setattr(model.get_submodule(parent), child, layer.to_linear())
        else:
            layer.merge()
    if unload:
        for module in model.modules():
            if hasattr(module, CONFIG_ATTR):
                delattr(module, CONFIG_ATTR)
    return model


def unmerge_recyclelora(model: nn.Module) -> nn.Module:
    """Leave merged mode: the training tensors were never modified, so this is exact."""
    for _, layer in iter_adapted(model):
        layer.unmerge()
    return model
