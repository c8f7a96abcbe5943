"""Read and write SoMA's own mmseg checkpoints (``docs/mmseg_checkpoint_layout.md`` §11).

Their files hold the EMA weights in ``state_dict`` and, with mmengine's ``EMAHook``, the raw
training weights in ``ema_state_dict`` (the hook swaps the two at save time); their released
per-benchmark files are partial (adapters, biases and head: no frozen residuals). The key map is
:mod:`.soma_keys`; the checks, the report and the reader are the mmseg loader's. Every check
runs before anything is loaded: a file that does not fit leaves the model as it was.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..adapters.config import SoMAConfig
from ..adapters.layer import AdaptedLinear
from ..adapters.model import find_config, iter_adapted
from ..adapters.names import tensor_name
from ..atomic import atomic_write
from .errors import MmsegCheckpointError
from .mmseg_export import export_meta
from .mmseg_keys import FACTORS_SECTION, adapter_layout, sample, stored_factors, strip_module_prefix
from .mmseg_load import (
    MmsegLoadReport,
    check_keys,
    initial_factor_keys,
    read_base_weights,
    skip_sections,
)
from .mmseg_read import MmsegFile, describe, read_mmseg_checkpoint
from .soma_keys import ours_to_soma, soma_config, soma_target_names, soma_to_ours

Weights = Literal["evaluated", "training"]
EMA_SECTION = "ema_state_dict"
_REASONS: dict[Weights, dict[str, str]] = {
    "evaluated": {EMA_SECTION: "raw training weights (weights='training' loads them)"},
    "training": {"state_dict": "EMA weights, the evaluated ones (weights='evaluated')"},
}
Factors = dict[str, tuple[Tensor, Tensor]]


def is_soma_model(model: nn.Module) -> bool:
    try:
        return isinstance(find_config(model), SoMAConfig)
    except ValueError:
        return False


def _config_text(config: SoMAConfig) -> str:
    targets = config.target_modules
    extra = "" if targets == SoMAConfig.target_modules else f", target_modules={targets!r}"
    return (
        f"SoMAConfig(rank={config.rank}, alpha={config.alpha:g}, "
        f"first_block={config.first_block}{extra})"
    )


def _build_hint(config: SoMAConfig) -> str:
    return f"build_model(preset, adapters={_config_text(config)})"


def _state(ckpt: MmsegFile, weights: Weights, path: str) -> dict[str, Any]:
    """The state dict of the chosen weights, without a ``module.`` prefix."""
    if weights not in _REASONS:
        raise ValueError(f"weights must be 'evaluated' or 'training', got {weights!r}")
    if weights == "evaluated":
        return strip_module_prefix(ckpt["state_dict"])[0]
    section = ckpt["sections"].get(EMA_SECTION)
    if not isinstance(section, Mapping):
        raise MmsegCheckpointError(
            f"{path!r} has no EMA section ({EMA_SECTION}): its state_dict holds the training "
            "weights; load it with weights='evaluated'"
        )
    return strip_module_prefix(section)[0]


def _steps(section: Mapping[str, Any]) -> int | None:
    """The ``steps`` count of an EMA section, when it holds one."""
    steps = section.get("steps")
    return int(steps) if isinstance(steps, Tensor) and steps.numel() == 1 else None


def soma_ema_entry(ckpt: MmsegFile, path: str) -> dict[str, Any] | None:
    """The file's EMA section in the form of a training checkpoint's ``ema`` entry
    (``source``: the raw training weights in our names; ``steps``), so that writing the model
    out again (:func:`export_soma_checkpoint`) keeps it. None when the file has none."""
    section = ckpt["sections"].get(EMA_SECTION)
    if not isinstance(section, Mapping):
        return None
    source = soma_to_ours(_state(ckpt, "training", path), repr(path)).state
    return {"source": source, "steps": _steps(section) or 0}


def _check_model(model: nn.Module, file_config: SoMAConfig, path: str) -> SoMAConfig:
    """The model has SoMA adapters of the file's rank and alpha, on the file's layers."""
    hint = _build_hint(file_config)
    if not is_soma_model(model):
        what = "RecycleLoRA adapters" if any(True for _ in iter_adapted(model)) else "no adapters"
        raise MmsegCheckpointError(
            f"{path!r} holds SoMA adapters but the model has {what}: build one with {hint}"
        )
    config = find_config(model)
    if (config.rank, config.alpha) != (file_config.rank, file_config.alpha):
        raise MmsegCheckpointError(
            f"{path!r} has SoMA adapters of rank {file_config.rank}, lora_alpha "
            f"{file_config.alpha:g} but the model has rank {config.rank}, alpha "
            f"{config.alpha:g} (scaling alpha / rank): build it with {hint}"
        )
    return config


def _check_layers(
    adapted: Mapping[str, AdaptedLinear], file_layers: set[str], hint: str, path: str
) -> None:
    only_file = sorted(file_layers - set(adapted))
    only_model = sorted(set(adapted) - file_layers)
    if only_file or only_model:
        raise MmsegCheckpointError(
            f"{path!r}: adapted layers differ from the model's (first_block / target_modules): "
            f"adapted only in the file: {sample(only_file) or '-'}; only in the model: "
            f"{sample(only_model) or '-'}; build it with {hint}"
        )


def _absent_backbone(
    model_sd: Mapping[str, Tensor], mapped: Mapping[str, Tensor], factor_keys: set[str]
) -> list[str]:
    """Backbone keys the file lacks: a partial file (SoMA's per-benchmark releases)."""
    return [
        k
        for k in model_sd
        if k.startswith("backbone.") and k not in mapped and k not in factor_keys
    ]


def _stored(adapted: Mapping[str, AdaptedLinear], ckpt: MmsegFile) -> dict[str, Factors] | None:
    """Our exports' initial factors, when the file has them for every layer with shapes that
    fit; else None."""
    stored = stored_factors(ckpt["state_dict"], ckpt["sections"])
    out = {}
    for name, layer in adapted.items():
        entry = stored.get(name, {})
        pairs = {}
        for adapter, b, a in layer.adapter_pairs(initial=True):
            b0 = entry.get(tensor_name(adapter, "B", initial=True))
            a0 = entry.get(tensor_name(adapter, "A", initial=True))
            if b0 is None or a0 is None or b0.shape != b.shape or a0.shape != a.shape:
                return None
            pairs[adapter] = (b0, a0)
        out[name] = pairs
    return out


def _reconstructed(
    adapted: Mapping[str, AdaptedLinear],
    mapped: Mapping[str, Tensor],
    config: SoMAConfig,
    base_weights: str | os.PathLike,
    rtol: float,
    path: str,
) -> dict[str, Factors]:
    """Each layer's initial factors from its base weight ``W0``, after checking that the
    residual it will have (the file's, else its own) is ``W0 - s Σ B0 A0``."""
    base = read_base_weights(base_weights, list(adapted))
    out, bad = {}, []
    for name, layer in adapted.items():
        w0 = base[name][0]
        if tuple(w0.shape) != tuple(layer.weight.shape):
            raise MmsegCheckpointError(
                f"base_weights {os.fspath(base_weights)!r}: {name}.weight is "
                f"{tuple(w0.shape)}, the model's {tuple(layer.weight.shape)}"
            )
        factors = layer.initial_factors_of(w0, config)
        expected = w0.double().clone()
        for adapter, (b0, a0) in factors.items():
            lo, hi = layer.rows[adapter]
            expected[lo:hi] -= layer.scaling * (b0.double() @ a0.double())
        residual = mapped.get(f"{name}.weight", layer.weight.detach())
        diff = float((residual.double() - expected).abs().max())
        tol = rtol * float(w0.double().abs().max())
        if diff > tol:
            bad.append(f"{name} (largest difference {diff:.3g}, tolerance {tol:.3g})")
        out[name] = factors
    if bad:
        raise MmsegCheckpointError(
            f"{path!r}: the residual weight is not W0 - s B0 A0 of base_weights "
            f"{os.fspath(base_weights)!r} in {sample(bad, 3)}: wrong base weights, or a file "
            "saved with merged weights (W_res + s B A)"
        )
    return out


def _plan_factors(
    adapted: Mapping[str, AdaptedLinear],
    mapped: Mapping[str, Tensor],
    ckpt: MmsegFile,
    config: SoMAConfig,
    base_weights: str | os.PathLike | None,
    rtol: float,
    path: str,
    report: MmsegLoadReport,
) -> dict[str, Factors] | None:
    """Initial factors to set on every layer, or None: forget them where the file gives the
    residual, keep the model's where it does not (partial files)."""
    loaded = [n for n in adapted if f"{n}.weight" in mapped]
    if base_weights is not None:
        report.initial_factors = "reconstructed"
        report.notes.append(
            f"initial factors computed from base_weights {os.fspath(base_weights)!r}; the "
            f"residuals match W0 - s B0 A0 (rtol {rtol:g})"
        )
        return _reconstructed(adapted, mapped, config, base_weights, rtol, path)
    stored = _stored(adapted, ckpt) if len(loaded) == len(adapted) else None
    if stored is not None:
        report.initial_factors = "stored"
        return stored
    if not loaded:
        report.initial_factors = "kept"
        report.notes.append(
            "no residual weights in the file: the model's residuals and initial factors stay "
            "(valid only if it was initialised from the DINOv2 weights the file's adapters "
            "started from)"
        )
        return None
    report.initial_factors = (
        "unknown" if len(loaded) == len(adapted) else f"unknown for {len(loaded)} layers"
    )
    report.notes.append(
        "initial factors unknown (SoMA's files carry none): the forward is exact, but "
        "save_adapters refuses until load_soma_checkpoint(..., base_weights=...) recovers them"
    )
    return None


def load_soma_file(
    model: nn.Module,
    ckpt: MmsegFile,
    path: str,
    *,
    weights: Weights = "evaluated",
    strict: bool = True,
    base_weights: str | os.PathLike | None = None,
    rtol: float = 1e-4,
) -> MmsegLoadReport:
    """:func:`load_soma_checkpoint` for a file already read (``read_mmseg_checkpoint``)."""
    report = MmsegLoadReport(path=path, stubbed=ckpt["stubbed"], meta=ckpt["meta"])
    keymap = soma_to_ours(_state(ckpt, weights, path), repr(path))
    others = {
        n: v for n, v in ckpt["sections"].items() if weights == "evaluated" or n != EMA_SECTION
    }
    skip_sections(
        {"state_dict": None, **others} if weights == "training" else others,
        _REASONS[weights],
        report,
    )
    report.renamed, mapped = keymap.renamed, keymap.state
    report.skipped += keymap.skipped
    file_config, notes = soma_config(mapped, ckpt["meta"], repr(path))
    report.notes += notes
    config = _check_model(model, file_config, path)
    adapted = dict(iter_adapted(model))
    _check_layers(adapted, set(adapter_layout(mapped)), _build_hint(file_config), path)
    model_sd = model.state_dict()
    factor_keys = initial_factor_keys(adapted)
    absent = _absent_backbone(model_sd, mapped, factor_keys)
    if absent and strict:
        raise MmsegCheckpointError(
            f"{path!r} is a partial SoMA file: it lacks {len(absent)} backbone keys "
            f"({sample(absent, 4)}), e.g. the frozen residual weights (SoMA's per-benchmark "
            "releases hold adapters, biases and head only). Load it with strict=False into a "
            "model whose residuals were initialised from the same DINOv2 weights: "
            "build_model(preset, backbone_weights=DINOV2_FILE, "
            f"adapters={_config_text(file_config)})"
        )
    check_keys(model_sd, mapped, factor_keys, path, strict, report)
    factors = _plan_factors(adapted, mapped, ckpt, config, base_weights, rtol, path, report)
    to_load = {k: v for k, v in mapped.items() if k in model_sd}
    with torch.no_grad():
        model.load_state_dict(to_load, strict=False)
    for name, layer in adapted.items():
        if factors is not None:
            layer.set_initial_factors(factors[name])
        elif f"{name}.weight" in mapped:
            layer.forget_initial_factors()
        if layer.is_merged:  # refresh the cached merged weight
            layer.merge()
    report.loaded = list(to_load)
    report.alpha = config.alpha
    partial = ", partial" if absent else ""
    report.format = (
        f"{ckpt['container']}, SoMA{partial} ({weights} weights), rank {config.rank}, "
        f"lora_alpha {config.alpha:g}, blocks {config.first_block}+"
    )
    return report


def load_soma_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    weights: Weights = "evaluated",
    strict: bool = True,
    base_weights: str | os.PathLike | None = None,
    rtol: float = 1e-4,
) -> MmsegLoadReport:
    """Load one of SoMA's mmseg checkpoints (or ours written by :func:`export_soma_checkpoint`)
    into a model with SoMA adapters.

    ``weights="evaluated"``: ``state_dict`` (the EMA weights when mmengine's EMAHook ran);
    ``"training"``: the raw training weights of the ``ema_state_dict`` section (an error when
    the file has none).

    Checked before anything is loaded: the model has SoMA adapters of the file's rank (from
    the shapes) and ``lora_alpha`` (from ``meta``; the rank when absent), on the same layers,
    with the same shapes; with ``strict``, no missing or unexpected key. A partial file (no
    frozen residuals) loads only with ``strict=False``, into a model whose residuals were
    initialised from the same DINOv2 weights.

    Initial factors: SoMA's files carry none, so they are marked unknown, unless the file is
    ours (they are stored) or ``base_weights`` (a DINOv2 checkpoint) is given: they are then
    computed from ``W0`` and the residual must equal ``W0 - s B0 A0`` within ``rtol`` times
    ``max |W0|`` (a wrong base, or a file saved with merged weights, is an error).
    """
    path = os.fspath(path)
    return load_soma_file(
        model,
        read_mmseg_checkpoint(path),
        path,
        weights=weights,
        strict=strict,
        base_weights=base_weights,
        rtol=rtol,
    )


def _cfg_text(config: SoMAConfig) -> str:
    return (
        f"r={config.rank}\nlora_alpha={config.alpha!r}\nstart_lora_idx={config.first_block}\n"
        f"target_modules={soma_target_names(config)!r}\n"
    )


def export_soma_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, ema: Mapping[str, Any] | None = None
) -> Path:
    """Write a SoMA model in SoMA's mmseg layout: ``backbone.model.*``, separate q, k, v with
    their adapters (``lora_A.weight``, ``lora_B.weight``) and biases, residual ``weight``,
    ``decode_head.*``; ``meta['cfg']`` with ``r``, ``lora_alpha``, ``start_lora_idx`` and
    ``target_modules``, and our ``meta['recyclelora']``. The known initial factors go to our
    own section (ignored by mmengine), so the round trip is exact.

    ``ema``: a training checkpoint's ``ema`` entry (``source``: the training weights, ``steps``).
    Then, as mmengine's EMAHook writes it, ``state_dict`` holds the model's (EMA) weights and
    ``ema_state_dict`` ``module.<key>`` for every key, with the training weights where
    ``source`` has them, plus ``steps``. Plain Python only (``torch.load(weights_only=True)``
    reads it); the write is atomic.
    """
    if not is_soma_model(model):
        raise ValueError("export_soma_checkpoint writes models with SoMA adapters")
    config = find_config(model)
    adapted = dict(iter_adapted(model))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    soma = ours_to_soma(state).state
    known = all(layer.initial_factors_known for layer in adapted.values())
    meta = export_meta(model, config, "soma", "stored" if known else "none")
    meta["cfg"] += _cfg_text(config)
    checkpoint: dict[str, Any] = {"meta": meta, "state_dict": soma}
    if known:
        checkpoint[FACTORS_SECTION] = {
            f"{name}.{tensor_name(a, p, initial=True)}": t
            for name, layer in adapted.items()
            for a, b0, a0 in layer.adapter_pairs(initial=True)
            for p, t in (("B", b0.detach().cpu()), ("A", a0.detach().cpu()))
        }
    if ema is not None:
        source = dict(ema.get("source") or {})
        unknown = sorted(set(source) - set(state))
        if unknown:
            raise ValueError(f"ema['source'] has keys the model lacks: {sample(unknown, 4)}")
        raw = ours_to_soma({k: v.detach().cpu() for k, v in source.items()}).state
        checkpoint[EMA_SECTION] = {f"module.{k}": raw.get(k, v) for k, v in soma.items()}
        checkpoint[EMA_SECTION]["steps"] = torch.tensor(int(ema.get("steps", 0)))
    with atomic_write(path) as f:
        torch.save(checkpoint, f)
    return Path(path)


def describe_soma(ckpt: MmsegFile) -> str:
    """:func:`~.mmseg_read.describe` plus the SoMA adapters and the EMA section."""
    keymap = soma_to_ours(strip_module_prefix(ckpt["state_dict"])[0])
    config, _ = soma_config(keymap.state, ckpt["meta"])
    layers = adapter_layout(keymap.state)
    lines = [
        describe(ckpt),
        f"SoMA adapters on {len(layers)} layers, rank {config.rank}, lora_alpha "
        f"{config.alpha:g}, blocks {config.first_block}+, targets {soma_target_names(config)}",
    ]
    ema = ckpt["sections"].get(EMA_SECTION)
    if isinstance(ema, Mapping):
        steps = _steps(ema)
        shown = "?" if steps is None else str(steps)
        lines.append(f"EMA section: raw training weights, {shown} steps (state_dict: the EMA)")
    if "backbone.pos_embed" not in keymap.state:
        lines.append("partial: no frozen backbone weights (load with strict=False)")
    return "\n".join(lines)
