"""Recover RRQR initial factors ``A0``/``B0`` from the base weight and a stored residual.

A checkpoint that holds the residual ``W_res = W0 - s Σ B0 A0`` but not the factors (the
authors' mmseg files) still defines them: ``D = (W0 - W_res) / s`` has exactly ``r_main + r_sub``
non-zero columns, RRQR's one-hot ``A0`` rows, equal to the ``B0`` columns. Our RRQR on ``W0`` says
which column belongs to which adapter and in which order, and must agree with ``D``
(``docs/method.md §1``). Everything here works on tensors and through the layer's own methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import RecycleLoRAConfig
from .init import rrqr_factors
from .model import CONFIG_ATTR, find_config, iter_adapted

#: ``{adapter: (B0 (d, r), A0 (r, k))}`` for the adapters of non-zero rank.
LayerFactors = dict[str, tuple[Tensor, Tensor]]


class ReconstructionError(ValueError):
    """The base weights do not explain a layer's residual: not the weights it was made from."""


@dataclass
class Residual:
    """What a checkpoint says about one adapted layer: residual, bias and adapter ranks."""

    weight: Tensor
    bias: Tensor | None
    ranks: Mapping[str, int]


@dataclass
class Reconstruction:
    """Factors of every layer, how many rebuild the residual bit-for-bit, and the QR used."""

    factors: dict[str, LayerFactors]
    exact: int
    worst_deviation: float
    qr_dtype: str | None

    def summary(self, source: str) -> str:
        n = len(self.factors)
        return (
            f"initial factors reconstructed from {source} for {n} layers: {self.exact} exactly "
            "(RRQR factors rebuild the residual bit-for-bit), "
            f"{n - self.exact} from the residual (max |D - RRQR column| "
            f"{self.worst_deviation:.3g})"
        )


def initial_factors_known(model: nn.Module) -> bool:
    """False if any adapted layer of ``model`` has unknown initial factors."""
    return all(layer.initial_factors_known for _, layer in iter_adapted(model))


def _check_bias(name: str, base_bias: Tensor | None, bias: Tensor | None) -> None:
    if (bias is None) != (base_bias is None) or (
        bias is not None and not torch.equal(base_bias.to(bias.dtype), bias)
    ):
        raise ReconstructionError(
            f"{name}: its bias differs from the base weights' — the adapters were not "
            "initialised from this DINOv2 checkpoint"
        )


def _changed_columns(name: str, d: Tensor, r_total: int) -> Tensor:
    nonzero = torch.nonzero((d != 0).any(dim=0)).flatten()
    if nonzero.numel() != r_total:
        raise ReconstructionError(
            f"{name}: (W0 - weight) / s has {nonzero.numel()} non-zero columns, expected "
            f"r_main + r_sub = {r_total} (one per RRQR-selected input column): the base "
            "weights are not the backbone these adapters were initialised from, or the "
            "checkpoint's weight is merged (W_res + s·BA, e.g. saved after model.eval())"
        )
    return nonzero


def reconstruct_layer(
    name: str,
    w0: Tensor,
    base_bias: Tensor | None,
    residual: Residual,
    scaling: float,
    qr_dtypes: tuple[str, ...],
    atol: float,
) -> tuple[LayerFactors, bool, str, float]:
    """Initial factors of one layer from ``W0`` and its residual.

    Returns ``(factors, exact, qr_dtype, deviation)``: ``exact`` when our RRQR factors rebuild
    the stored residual bit-for-bit (then they are used as they are); otherwise the ``B0``
    columns are taken from ``D`` (what the residual implies) and ``deviation`` is the largest
    ``|D column - RRQR column|``.
    """
    w_res = residual.weight.detach().cpu()
    dtype = w_res.dtype
    bias = None if residual.bias is None else residual.bias.detach().cpu()
    w0 = w0.to("cpu", dtype)
    if w0.shape != w_res.shape:
        raise ReconstructionError(
            f"{name}: base weight {tuple(w0.shape)} vs checkpoint weight {tuple(w_res.shape)}"
        )
    _check_bias(name, base_bias, bias)
    d = (w0.double() - w_res.double()) / scaling
    nonzero = _changed_columns(name, d, sum(residual.ranks.values()))
    problems = []
    for qr_dtype in qr_dtypes:
        main, sub = rrqr_factors(w0, residual.ranks["main"], residual.ranks["sub"], qr_dtype)
        rrqr = {a: f for a, f in (("main", main), ("sub", sub)) if f is not None}
        cols = {a: a0.argmax(dim=1) for a, (_, a0) in rrqr.items()}
        if not torch.equal(torch.cat(list(cols.values())).sort().values, nonzero):
            problems.append(f"{qr_dtype} RRQR pivots select other columns than the residual")
            continue
        deviation = 0.0
        for a, (b0, _) in rrqr.items():  # a column of Q is defined up to its sign
            dc = d[:, cols[a]]
            err = torch.minimum((dc - b0).abs().amax(0), (dc + b0).abs().amax(0))
            deviation = max(deviation, float(err.max()))
        if deviation > atol:
            problems.append(
                f"{qr_dtype} RRQR columns differ from the residual's by up to {deviation:.3g} "
                f"(> atol {atol:g}): main/sub assignment or order disagrees"
            )
            continue
        cast = {a: (b0.to(dtype), a0.to(dtype)) for a, (b0, a0) in rrqr.items()}
        delta = sum(b.double() @ a.double() for b, a in cast.values())
        if torch.equal((w0.double() - scaling * delta).to(dtype), w_res):
            return cast, True, qr_dtype, deviation
        from_d = {a: (d[:, cols[a]].to(dtype), cast[a][1]) for a in cast}
        return from_d, False, qr_dtype, deviation
    raise ReconstructionError(
        f"{name}: our RRQR on the base weight disagrees with the checkpoint's residual: "
        + "; ".join(problems)
    )


def reconstruct_all(
    residuals: Mapping[str, Residual],
    base: Mapping[str, tuple[Tensor, Tensor | None]],
    config: RecycleLoRAConfig,
    atol: float = 1e-3,
) -> Reconstruction:
    """Factors for every layer of ``residuals`` from ``base[layer] = (W0, bias0)``.

    The config's QR precision is tried first, then float64 and float32 (the authors' code runs
    its QR in float32). Raises ReconstructionError naming the first layer that disagrees.
    """
    qr_dtypes = tuple(dict.fromkeys((config.qr_dtype, "float64", "float32")))
    factors: dict[str, LayerFactors] = {}
    exact, worst, used = 0, 0.0, set()
    for name, residual in residuals.items():
        if name not in base:
            raise ReconstructionError(f"the base weights have no weight for layer {name}")
        w0, b0 = base[name]
        f, is_exact, qr_dtype, dev = reconstruct_layer(
            name, w0, b0, residual, config.scaling, qr_dtypes, atol
        )
        factors[name] = f
        exact += is_exact
        worst = max(worst, dev)
        used.add(qr_dtype)
    return Reconstruction(factors, exact, worst, used.pop() if len(used) == 1 else None)


def record_origin(model: nn.Module, init: str | None = None, qr_dtype: str | None = None) -> None:
    """Write how the initial factors were made into the model's config and its layers."""
    changes = {k: v for k, v in (("init", init), ("qr_dtype", qr_dtype)) if v is not None}
    if not changes:
        return
    for module in model.modules():
        cfg = getattr(module, CONFIG_ATTR, None)
        if cfg is not None:
            setattr(module, CONFIG_ATTR, dataclasses.replace(cfg, **changes))
    if "init" in changes:
        for _, layer in iter_adapted(model):
            layer.init_kind = changes["init"]


def reconstruct_initial_factors(
    model: nn.Module,
    base: Mapping[str, tuple[Tensor, Tensor | None]],
    *,
    atol: float = 1e-3,
    source: str = "the base weights",
) -> list[str]:
    """Recover every adapted layer's ``A0``/``B0`` from ``base[layer name] = (W0, bias0)``.

    Works on the model's current residuals. Nothing is changed unless every layer agrees.
    Returns report lines.
    """
    adapted = dict(iter_adapted(model))
    if not adapted:
        raise ValueError("the model has no RecycleLoRA adapters")
    residuals = {
        n: Residual(layer.weight.detach(), layer.bias, dict(layer.ranks))
        for n, layer in adapted.items()
    }
    result = reconstruct_all(residuals, base, find_config(model), atol)
    for name, factors in result.factors.items():
        adapted[name].set_initial_factors(factors)
    record_origin(model, init="rrqr", qr_dtype=result.qr_dtype)
    return [result.summary(source)]
