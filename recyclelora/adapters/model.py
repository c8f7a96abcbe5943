"""Adapt any PyTorch model in place, fold the adapters back, and say what was done."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import RecycleLoRAConfig
from .layer import RecycleLoRALinear
from .names import is_adapter_tensor

log = logging.getLogger(__name__)

CONFIG_ATTR = "recyclelora_config"


@dataclass
class AdaptationReport:
    """What ``apply_recyclelora`` did: adapted layers and the parameter budget."""

    config: RecycleLoRAConfig
    layers: list[tuple[str, tuple[int, int]]] = field(default_factory=list)
    adapter_params: int = 0
    frozen_params: int = 0

    def __str__(self) -> str:
        c = self.config
        return (
            f"RecycleLoRA ({c.init}, main rank {c.main_rank}, sub rank {c.sub_rank}, "
            f"scaling {c.scaling:.4g}): adapted {len(self.layers)} linear layers "
            f"({', '.join(c.target_modules)}); trainable adapter parameters "
            f"{self.adapter_params:,} ({self.adapter_params / 1e6:.2f}M), "
            f"frozen {self.frozen_params:,}"
        )


def split_name(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def iter_adapted(model: nn.Module) -> Iterator[tuple[str, RecycleLoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, RecycleLoRALinear):
            yield name, module


def find_config(model: nn.Module) -> RecycleLoRAConfig:
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


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Only ``lora_*`` tensors train: residuals, biases and everything else are frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_tensor(split_name(name)[1]))


def apply_recyclelora(
    model: nn.Module,
    config: RecycleLoRAConfig,
    *,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
    initialize: bool = True,
) -> AdaptationReport:
    """Replace every matching ``nn.Linear`` of ``model`` in place and freeze all the rest of it.

    ``initialize=False`` skips the decomposition and leaves the adapter tensors uninitialised:
    for a model whose state_dict (a checkpoint) is loaded right after.

    Apply it to the part to adapt (the backbone): a head that should train stays outside.
    ``progress=None`` shows a bar only on a terminal. Returns (and logs) an ``AdaptationReport``.
    """
    if any(True for _ in iter_adapted(model)):
        raise ValueError("model already has RecycleLoRA adapters; merge or rebuild it first")
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and split_name(name)[1] in config.target_modules
    ]
    if not targets:
        raise ValueError(
            f"no nn.Linear named one of {config.target_modules} in {type(model).__name__}; "
            "set target_modules to the last component of the layer names to adapt"
        )
    report = AdaptationReport(config)
    bar = tqdm(
        targets,
        desc=f"RecycleLoRA {config.init} init",
        unit="layer",
        disable=None if progress is None else not progress,
    )
    for name, linear in bar:
        layer = RecycleLoRALinear.from_linear(linear, config, generator, initialize)
        parent, child = split_name(name)
        setattr(model.get_submodule(parent), child, layer)
        report.layers.append((name, (linear.out_features, linear.in_features)))
    freeze_all_but_adapters(model)
    setattr(model, CONFIG_ATTR, config)
    report.adapter_params = sum(p.numel() for _, p in adapter_parameters(model))
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
