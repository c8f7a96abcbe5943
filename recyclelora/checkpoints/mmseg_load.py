"""Load an mmseg-format checkpoint into a model: the authors' files, plain / merged backbones,
mmdet 2.x head names, and our own exports (``docs/mmseg_checkpoint_layout.md``).

Every check runs before anything is loaded: a file that does not fit leaves the model as it was.

Initial factors. Our layers keep ``A0``, ``B0`` (``W_res = W0 - s Σ B0 A0``) so that adapters can
be saved alone and re-attached to the base model. The authors' files do not have them: loading
one marks them unknown (``RecycleLoRALinear.forget_initial_factors``; the forward does not use
them) and ``save_adapters`` refuses until ``base_weights=`` (the DINOv2 checkpoint the adapters
were initialised from) reconstructs them (:mod:`recyclelora.adapters.reconstruct`). Our exports
carry them in a section of their own, so they round-trip exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters.config import RecycleLoRAConfig
from ..adapters.layer import AdaptedLinear, RecycleLoRALinear
from ..adapters.model import find_config, iter_adapted
from ..adapters.names import expand_one_hot, tensor_key, tensor_name
from ..adapters.reconstruct import (
    LayerFactors,
    ReconstructionError,
    Residual,
    reconstruct_all,
    reconstruct_initial_factors,
    record_origin,
)
from .errors import MmsegCheckpointError
from .mmseg_keys import (
    AUTHORS_ALPHA,
    FACTORS_SECTION,
    MMDET2,
    adapter_layout,
    find_alpha,
    is_initial_factor,
    map_key,
    sample,
    soma_message,
    stored_factors,
    strip_module_prefix,
)
from .mmseg_read import MmsegFile, read_mmseg_checkpoint
from .soma_keys import soma_keys


@dataclass
class MmsegLoadReport:
    """What :func:`load_mmseg_checkpoint` did.

    ``loaded``: our keys that received a tensor. ``renamed``: ``(file key, our key, why)``.
    ``skipped``: ``(file key or section, reason)`` — known, deliberately ignored entries.
    ``missing`` / ``unexpected``: model keys the file lacks / file keys the model has no place
    for (with ``strict`` either is an error). ``initial_factors``: ``"stored"``,
    ``"reconstructed"``, ``"unknown"`` (see the module doc) or ``"n/a"`` (no adapters).
    """

    path: str
    format: str = ""
    loaded: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ranks: tuple[int, int] | None = None
    alpha: float | None = None
    initial_factors: str = "n/a"
    notes: list[str] = field(default_factory=list)
    stubbed: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        lines = [f"mmseg checkpoint {self.path} ({self.format})"]
        lines.append(f"  loaded {len(self.loaded)} tensors, renamed {len(self.renamed)}")
        if self.ranks is not None:
            lines.append(
                f"  adapters: r_main={self.ranks[0]}, r_sub={self.ranks[1]}, alpha={self.alpha}, "
                f"initial factors {self.initial_factors}"
            )
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            lines.append(f"  {name} ({len(items)})" + (":" if items else ""))
            lines.extend(f"    {k}" for k in items)
        if self.skipped:
            lines.append(f"  skipped ({len(self.skipped)}):")
            lines.extend(f"    {k}: {why}" for k, why in self.skipped)
        if self.stubbed:
            lines.append(f"  not loaded (inert stubs): {', '.join(self.stubbed)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


@dataclass
class _FactorPlan:
    """Initial factors to set per layer (the others become unknown), and their origin."""

    factors: dict[str, LayerFactors] = field(default_factory=dict)
    init: str | None = None
    qr_dtype: str | None = None


_SECTION_REASONS = {
    "ema_state_dict": "EMA copy; 'state_dict' already holds the EMA weights "
    "(mmengine EMAHook swaps them at save time)",
}


def _rank_hint(r_main: int, r_sub: int) -> str:
    return (
        f"build a matching model with build_model(..., adapters=RecycleLoRAConfig({r_main}, "
        f"{r_sub}))"
    )


def _require_config(model: nn.Module, path: str) -> RecycleLoRAConfig:
    try:
        return find_config(model)
    except ValueError as e:
        raise MmsegCheckpointError(
            f"{path!r}: the model's adapters carry no RecycleLoRAConfig (apply_recyclelora and "
            "load_adapters record one)"
        ) from e


# ---------------------------------------------------------------------------------------------
# Steps, in the order load_mmseg_file runs them


def _unwrap_state(ckpt: MmsegFile, path: str, report: MmsegLoadReport) -> dict[str, Any]:
    """The state dict without a DDP prefix; SoMA refused; other sections listed as skipped."""
    state, stripped = strip_module_prefix(ckpt["state_dict"])
    if stripped:
        report.notes.append("stripped the 'module.' prefix (DDP-wrapped model)")
    soma = soma_keys(state)
    if soma:
        raise MmsegCheckpointError(soma_message(path, soma))
    skip_sections(ckpt["sections"], _SECTION_REASONS, report)
    return state


def skip_sections(
    sections: Mapping[str, Any], reasons: Mapping[str, str], report: MmsegLoadReport
) -> None:
    """List the sections that are not loaded in the report, with their ``reasons``."""
    for name in sections:
        if name != FACTORS_SECTION:
            reason = reasons.get(name, "training state, not model weights")
            report.skipped.append((f"[{name}]", reason))


def _map_state(state: Mapping[str, Any], path: str, report: MmsegLoadReport) -> dict[str, Tensor]:
    """File keys -> our keys; initial factors are left to :func:`_plan_factors`."""
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        if is_initial_factor(key):
            continue
        new, how = map_key(key)
        if new is None:
            report.skipped.append((key, how))
            continue
        if not isinstance(value, Tensor):
            report.skipped.append((key, f"not a tensor ({type(value).__name__})"))
            continue
        if new in mapped:
            raise MmsegCheckpointError(f"{path!r}: two file keys map to {new!r} (e.g. {key!r})")
        mapped[new] = value
        if new != key:
            report.renamed.append((key, new, how))
    return mapped


def _check_alpha(
    config: RecycleLoRAConfig, meta: Mapping[str, Any], path: str, report: MmsegLoadReport
) -> None:
    alpha, source = find_alpha(meta)
    if alpha is None:
        alpha = config.alpha
        report.notes.append(
            f"lora_alpha not recorded in the file; assumed the model's {alpha:g} "
            f"(the authors' configs all use {AUTHORS_ALPHA:g})"
        )
    elif not math.isclose(alpha, config.alpha, rel_tol=1e-9):
        r_main, r_sub = config.main_rank, config.sub_rank
        raise MmsegCheckpointError(
            f"{path!r}: lora_alpha = {alpha:g} in {source} but the model has alpha = "
            f"{config.alpha:g} (scaling alpha / (r_main + r_sub) would differ): build it with "
            f"RecycleLoRAConfig({r_main}, {r_sub}, alpha={alpha:g})"
        )
    report.alpha = alpha


def _check_adapters(
    model: nn.Module,
    adapted: Mapping[str, RecycleLoRALinear],
    mapped: Mapping[str, Tensor],
    meta: Mapping[str, Any],
    path: str,
    report: MmsegLoadReport,
) -> str | None:
    """File and model agree on adapters (ranks, layers, alpha); returns a format note."""
    file_layers = adapter_layout(mapped)
    file_ranks = {(r["main"], r["sub"]) for r in file_layers.values()}
    if len(file_ranks) > 1:
        raise MmsegCheckpointError(
            f"{path!r}: adapters of different ranks (r_main, r_sub) {sorted(file_ranks)} in one "
            "file; RecycleLoRA models here use one rank pair for every layer"
        )
    if not file_layers:
        plain = sorted(n for n in adapted if f"{n}.weight" in mapped)
        if plain:
            raise MmsegCheckpointError(
                f"{path!r} holds a plain (un-adapted or merged) DINOv2 backbone but the model "
                f"has RecycleLoRA adapters ({sample(plain, 3)}): build it with "
                "build_model(..., adapters=None), or start new adapters from these weights"
            )
        return "plain backbone" if any(k.startswith("backbone.") for k in mapped) else None
    r_main, r_sub = next(iter(file_ranks))
    report.ranks = (r_main, r_sub)
    if not adapted:
        raise MmsegCheckpointError(
            f"{path!r} has RecycleLoRA adapters (r_main={r_main}, r_sub={r_sub}) on "
            f"{len(file_layers)} layers but the model has none: {_rank_hint(r_main, r_sub)}"
        )
    config = _require_config(model, path)
    if (config.main_rank, config.sub_rank) != (r_main, r_sub):
        raise MmsegCheckpointError(
            f"{path!r} has adapter ranks r_main={r_main}, r_sub={r_sub} but the model has "
            f"r_main={config.main_rank}, r_sub={config.sub_rank}: {_rank_hint(r_main, r_sub)}"
        )
    only_file = sorted(set(file_layers) - set(adapted))
    only_model = sorted(n for n in adapted if n not in file_layers and f"{n}.weight" in mapped)
    if only_file or only_model:
        raise MmsegCheckpointError(
            f"{path!r}: adapted layers differ from the model's (target_modules / skipped "
            f"blocks): adapted only in the file: {sample(only_file) or '-'}; only in the "
            f"model: {sample(only_model) or '-'}"
        )
    _check_alpha(config, meta, path, report)
    return f"RecycleLoRA adapters r_main={r_main}, r_sub={r_sub}"


def initial_factor_keys(adapted: Mapping[str, AdaptedLinear]) -> set[str]:
    return {
        tensor_key(name, adapter, part, initial=True)
        for name, layer in adapted.items()
        for adapter, _, _ in layer.adapter_pairs(initial=True)
        for part in "AB"
    }


def check_keys(
    model_sd: Mapping[str, Tensor],
    mapped: Mapping[str, Tensor],
    factor_keys: set[str],
    path: str,
    strict: bool,
    report: MmsegLoadReport,
) -> None:
    """Same shapes; with ``strict``, no missing and no unexpected keys."""
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(model_sd[k].shape)}"
        for k, v in mapped.items()
        if k in model_sd and tuple(v.shape) != tuple(model_sd[k].shape)
    ]
    if bad:
        raise MmsegCheckpointError(
            f"{path!r}: shapes differ from the model's (another preset, img_size or "
            f"num_classes?): {sample(bad, 5)}"
        )
    report.missing = [k for k in model_sd if k not in mapped and k not in factor_keys]
    report.unexpected = [k for k in mapped if k not in model_sd]
    if strict and (report.missing or report.unexpected):
        hint = ""
        if any(k.startswith("backbone.reins.") for k, _ in report.skipped):
            hint = " (a Rein checkpoint holds no DINOv2 weights and a different head)"
        raise MmsegCheckpointError(
            f"{path!r} does not match the model{hint}: missing {len(report.missing)} keys "
            f"({sample(report.missing) or '-'}); unexpected {len(report.unexpected)} keys "
            f"({sample(report.unexpected) or '-'}): use a checkpoint of this preset and class "
            "count (in Python, load_mmseg_checkpoint(..., strict=False) loads what matches)"
        )


def _resolve_stored(entry: Mapping[str, Tensor], layer: RecycleLoRALinear) -> LayerFactors | None:
    """A layer's factors from the file (one-hot ``A0`` as columns or dense), None if unusable."""
    widths = {tensor_name(a, "A", initial=True): layer.in_features for a in layer.ranks}
    try:
        dense = expand_one_hot(dict(entry), widths)
    except ValueError:
        return None
    out: LayerFactors = {}
    for adapter, r in layer.ranks.items():
        if r == 0:
            continue
        b0 = dense.get(tensor_name(adapter, "B", initial=True))
        a0 = dense.get(tensor_name(adapter, "A", initial=True))
        if b0 is None or a0 is None:
            return None
        if tuple(b0.shape) != (layer.out_features, r) or tuple(a0.shape) != (r, layer.in_features):
            return None
        out[adapter] = (b0, a0)
    return out


def _file_origin(
    model: nn.Module, meta: Mapping[str, Any], report: MmsegLoadReport
) -> tuple[str | None, str | None]:
    """(init, qr_dtype) that made the file's adapters: our exports say it, the authors' is RRQR."""
    ours = meta.get("recyclelora")
    file_cfg = ours.get("config") if isinstance(ours, Mapping) else None
    if not isinstance(file_cfg, Mapping):
        return "rrqr", None
    init, qr_dtype = file_cfg.get("init"), file_cfg.get("qr_dtype")
    try:  # validated before anything is loaded
        dataclasses.replace(find_config(model), init=init, qr_dtype=qr_dtype)
    except (TypeError, ValueError):
        report.notes.append("ignored meta['recyclelora']['config'] init/qr_dtype")
        return None, None
    return init, qr_dtype


def read_base_weights(
    path: str | os.PathLike, layer_names: list[str]
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """``{layer: (W0, bias0)}`` from a DINOv2 checkpoint (any file ``load_dinov2_weights``
    reads); a segmentor's ``backbone.`` prefix is matched to the file's bare names. Linear
    weights need no geometry conversion."""
    from ..models.dinov2_weights import convert_hf_to_meta, read_checkpoint

    state, fmt, _ = read_checkpoint(path)
    if fmt.startswith("huggingface"):
        state, _ = convert_hf_to_meta(state)
    base = {}
    for name in layer_names:
        key = name.removeprefix("backbone.")
        if f"{key}.weight" not in state:
            raise MmsegCheckpointError(
                f"base_weights {os.fspath(path)!r} has no {key}.weight for layer {name}"
            )
        base[name] = (state[f"{key}.weight"], state.get(f"{key}.bias"))
    return base


def _reconstruct(
    model: nn.Module,
    todo: Mapping[str, RecycleLoRALinear],
    mapped: Mapping[str, Tensor],
    base_weights: str | os.PathLike,
    atol: float,
    path: str,
) -> tuple[dict[str, LayerFactors], str, str | None]:
    """Factors of ``todo`` from the file's residuals and the base weights."""
    dtype = next(iter(todo.values())).weight.dtype
    residuals = {
        n: Residual(
            mapped[f"{n}.weight"].to(dtype),
            mapped[f"{n}.bias"].to(dtype) if f"{n}.bias" in mapped else None,
            dict(layer.ranks),
        )
        for n, layer in todo.items()
    }
    base = read_base_weights(base_weights, list(todo))
    try:
        result = reconstruct_all(residuals, base, find_config(model), atol)
    except ReconstructionError as e:
        raise MmsegCheckpointError(f"{path!r} with base_weights: {e}") from e
    return result.factors, result.summary(repr(os.fspath(base_weights))), result.qr_dtype


def _plan_factors(
    model: nn.Module,
    layers: Mapping[str, RecycleLoRALinear],
    mapped: Mapping[str, Tensor],
    ckpt: MmsegFile,
    base_weights: str | os.PathLike | None,
    atol: float,
    path: str,
    report: MmsegLoadReport,
) -> _FactorPlan:
    """Stored factors, else reconstructed ones (``base_weights``), else unknown."""
    plan = _FactorPlan()
    if not layers:
        return plan
    stored = stored_factors(ckpt["state_dict"], ckpt["sections"])
    for name, layer in layers.items():
        f = _resolve_stored(stored[name], layer) if name in stored else None
        if f is not None:
            plan.factors[name] = f
    plan.init, plan.qr_dtype = _file_origin(model, ckpt["meta"], report)
    todo = {n: layer for n, layer in layers.items() if n not in plan.factors}
    if plan.factors:
        report.notes.append(f"initial factors of {len(plan.factors)} layers read from the file")
    if todo and base_weights is not None:
        if plan.init not in (None, "rrqr"):
            raise MmsegCheckpointError(
                f"{path!r}: adapters were initialised with {plan.init!r}; base_weights can "
                "only reconstruct RRQR initial factors"
            )
        rebuilt, note, qr_used = _reconstruct(model, todo, mapped, base_weights, atol, path)
        plan.factors.update(rebuilt)
        report.notes.append(note)
        plan.qr_dtype = qr_used or plan.qr_dtype
    elif plan.factors and base_weights is not None:
        report.notes.append("base_weights not needed: the file stores the initial factors")
    unknown = [n for n in layers if n not in plan.factors]
    if not unknown:
        report.initial_factors = "stored" if base_weights is None or not todo else "reconstructed"
    elif len(unknown) == len(layers):
        report.initial_factors = "unknown"
    else:
        report.initial_factors = f"unknown for {len(unknown)} of {len(layers)} layers"
    if unknown:
        report.notes.append(
            "initial factors unknown (the file has no A0/B0): the forward is exact, but "
            "save_adapters refuses until reconstruct_from_base_weights(model, base_weights) "
            "or load_mmseg_checkpoint(..., base_weights=...) recovers them"
        )
    return plan


def _apply(
    model: nn.Module,
    to_load: Mapping[str, Tensor],
    layers: Mapping[str, RecycleLoRALinear],
    plan: _FactorPlan,
) -> None:
    """Copy the tensors, then set (or forget) each layer's initial factors."""
    with torch.no_grad():
        result = model.load_state_dict(dict(to_load), strict=False)
    if result.unexpected_keys:  # every key was checked against the model's state dict
        raise RuntimeError(f"unexpected keys after the checks: {result.unexpected_keys}")
    for name, layer in layers.items():
        if name in plan.factors:
            layer.set_initial_factors(plan.factors[name])
        else:
            layer.forget_initial_factors()
        if layer.is_merged:  # refresh the cached merged weight
            layer.merge()
    if layers:
        record_origin(model, init=plan.init, qr_dtype=plan.qr_dtype)


# ---------------------------------------------------------------------------------------------
# Public


def load_mmseg_file(
    model: nn.Module,
    ckpt: MmsegFile,
    path: str,
    *,
    strict: bool = True,
    base_weights: str | os.PathLike | None = None,
    atol: float = 1e-3,
) -> MmsegLoadReport:
    """:func:`load_mmseg_checkpoint` for a file already read (``read_mmseg_checkpoint``)."""
    report = MmsegLoadReport(path=path, stubbed=ckpt["stubbed"], meta=ckpt["meta"])
    fmt = [ckpt["container"]]
    state = _unwrap_state(ckpt, path, report)
    mapped = _map_state(state, path, report)
    if any(how == MMDET2 for _, _, how in report.renamed):
        fmt.append("mmdet 2.x head names")
    adapted = dict(iter_adapted(model))
    note = _check_adapters(model, adapted, mapped, ckpt["meta"], path, report)
    fmt += [note] if note else []
    model_sd = model.state_dict()
    check_keys(model_sd, mapped, initial_factor_keys(adapted), path, strict, report)
    layers = {n: layer for n, layer in adapted.items() if f"{n}.weight" in mapped}
    plan = _plan_factors(model, layers, mapped, ckpt, base_weights, atol, path, report)
    to_load = {k: v for k, v in mapped.items() if k in model_sd}
    _apply(model, to_load, layers, plan)
    report.loaded = list(to_load)
    report.format = ", ".join(fmt)
    return report


def load_mmseg_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    base_weights: str | os.PathLike | None = None,
    atol: float = 1e-3,
) -> MmsegLoadReport:
    """Load an mmseg 1.x checkpoint (authors' RecycleLoRA, plain/merged DINOv2, our export).

    Key map: see :mod:`recyclelora.checkpoints.mmseg_keys`; a ``module.`` prefix is stripped,
    known foreign entries are skipped and listed in the report, SoMA files are refused: they
    load with :func:`~recyclelora.checkpoints.soma_mmseg.load_soma_checkpoint`.

    Adapter ranks come from the tensor shapes and must equal the model's; an adapted file needs
    an adapted model and a plain (or merged) backbone a model built with ``adapters=None``.
    ``lora_alpha`` (from ``meta``; the model's when absent) must equal the model's.

    Nothing is loaded if anything fails: unreadable file, structure/shape mismatch, or — with
    ``strict`` — any missing or unexpected key (``strict=False`` loads the rest and reports).
    A model built with ``build_model(..., init_adapters=False)`` skips the (here useless)
    decomposition.

    Initial factors: stored ones (our exports) are loaded; else ``base_weights`` (a DINOv2
    checkpoint) reconstructs them (``atol``: tolerance of the ``D``-vs-RRQR column check);
    else they are marked unknown (see the module doc).

    A ``weight`` saved while the authors' layers were merged (``W_res + s·BA``, after
    ``model.eval()``) cannot be told apart from keys alone; it would count the update twice.
    ``base_weights`` detects it (the residual then differs from ``W0`` in every column).
    """
    path = os.fspath(path)
    ckpt = read_mmseg_checkpoint(path)
    return load_mmseg_file(model, ckpt, path, strict=strict, base_weights=base_weights, atol=atol)


def reconstruct_from_base_weights(
    model: nn.Module, base_weights: str | os.PathLike, *, atol: float = 1e-3
) -> list[str]:
    """Recover every adapted layer's ``A0``/``B0`` from a DINOv2 checkpoint, e.g. after
    :func:`load_mmseg_checkpoint` without ``base_weights``. Returns report lines."""
    names = [n for n, _ in iter_adapted(model)]
    if not names:
        raise ValueError("the model has no RecycleLoRA adapters")
    base = read_base_weights(base_weights, names)
    try:
        return reconstruct_initial_factors(
            model, base, atol=atol, source=repr(os.fspath(base_weights))
        )
    except ReconstructionError as e:
        raise MmsegCheckpointError(f"base_weights {os.fspath(base_weights)!r}: {e}") from e
