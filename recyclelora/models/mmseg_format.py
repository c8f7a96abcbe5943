"""Read and write mmseg 1.x / mmengine checkpoints in the authors' RecycleLoRA layout.

See ``docs/mmseg_checkpoint_layout.md`` for the layout. In short, an mmengine checkpoint is
``{'meta': ..., 'state_dict': ..., 'message_hub': ..., 'optimizer': ..., ...}`` whose
``state_dict`` holds ``backbone.<DINOv2 name>`` and ``decode_head.<mmdet 3.x name>`` keys; the
authors' ``RecycleLoRALinear`` adds ``lora_A_main`` / ``lora_B_main`` / ``lora_A_sub`` /
``lora_B_sub`` next to ``weight`` (the frozen residual ``W_res``) and ``bias``. Our
:class:`~recyclelora.models.segmentor.Segmentor` uses the same names except the adapters, which
are ``lora_main_A`` / ``lora_main_B`` / ``lora_sub_A`` / ``lora_sub_B``.

* :func:`read_mmseg_checkpoint` loads such a file **without** mmengine/mmcv/mmseg and without
  running pickled code: a restricted unpickler resolves only tensor-rebuild functions, storages,
  ``OrderedDict`` and a few inert builtins; every other class or function named in the file
  (``HistoryBuffer``, numpy arrays and scalars, ``ConfigDict``, ``os.system``...) becomes an inert
  :class:`StubObject` that records its arguments and never calls anything.
* :func:`load_mmseg_checkpoint` maps the keys into a model (adapters, plain / merged backbones,
  mmdet 2.x head names), checks ranks, shapes and ``lora_alpha``, and reports what it skipped.
* :func:`export_mmseg_checkpoint` writes a model in the authors' layout (or merged, plain keys).

Initial factors. Our layers keep the initial factors ``A0``, ``B0`` (``W_res = W0 - s Σ B0 A0``)
so that adapters can be saved alone and re-attached to the base model. The authors' files do not
have them. Loading such a file leaves them *unknown*: the buffers are set to NaN (the forward does
not use them), the layer's ``initial_factors_known`` turns False and ``save_adapters`` raises
:class:`~recyclelora.adapters.io.InitialFactorsUnknownError`. Pass
``base_weights=`` (the DINOv2 checkpoint the adapters were initialised from) to reconstruct them:
``D = (W0 - W_res) / s`` has exactly ``r_main + r_sub`` non-zero columns (RRQR's one-hot ``A0``)
equal to the ``B0`` columns; our RRQR on ``W0`` says which column belongs to which adapter and in
which order, and must agree with ``D``. Our own exports carry the factors in an extra top-level
section (``recyclelora_initial_factors``, ignored by mmengine), so they round-trip exactly.
"""

from __future__ import annotations

import _codecs
import argparse
import builtins
import collections
import contextlib
import dataclasses
import functools
import math
import os
import pickle
import re
import time
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..adapters.config import RecycleLoRAConfig
from ..adapters.init import rrqr_factors
from ..adapters.io import InitialFactorsUnknownError
from ..adapters.layer import ADAPTERS, RecycleLoRALinear
from ..adapters.model import CONFIG_ATTR, iter_adapted
from .dinov2_weights import checkpoint_kind

__all__ = [
    "FACTORS_SECTION",
    "FORMAT",
    "InitialFactorsUnknownError",
    "LoadReport",
    "MmsegCheckpointError",
    "MmsegLoadReport",
    "StubObject",
    "export_mmseg_checkpoint",
    "initial_factors_known",
    "load_mmseg_checkpoint",
    "read_mmseg_checkpoint",
    "reconstruct_initial_factors",
]

FORMAT = "recyclelora-mmseg/1"
#: Top-level section of our exports holding the initial factors (mmengine ignores it).
FACTORS_SECTION = "recyclelora_initial_factors"
_COLUMNS = ".columns"  # one-hot A0 stored as its column indices
_AUTHORS_ALPHA = 1.0  # lora_alpha of every authors' config (docs §2b)


class MmsegCheckpointError(ValueError):
    """A checkpoint that cannot be read, recognised or loaded into the given model."""


# =============================================================================================
# Safe reading


class StubObject:
    """Inert stand-in for an object whose class or function is not loaded.

    ``stub_class`` is the dotted name the file referred to (e.g.
    ``"mmengine.logging.history_buffer.HistoryBuffer"``, ``"numpy.core.multiarray._reconstruct"``
    or ``"posix.system"``); ``args`` / ``kwargs`` the call arguments, ``state`` what pickle's BUILD
    passed, ``dict_items`` / ``list_items`` what it stored as a mapping / sequence. Nothing is
    imported or called.
    """

    stub_class = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> StubObject:
        obj = object.__new__(cls)
        obj.args, obj.kwargs = args, kwargs
        obj.state = None
        obj.dict_items, obj.list_items = {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: D107 - nothing to do
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dict_items[key] = value

    def append(self, value: Any) -> None:
        self.list_items.append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.list_items.extend(values)

    def add(self, value: Any) -> None:
        self.list_items.append(value)

    def __call__(self, *args: Any, **kwargs: Any) -> StubObject:
        """A stub returned by a stub (e.g. ``getattr(stub, 'touch')`` then called): one more
        inert stub, recording the call."""
        return _stub_class(f"{self.stub_class}(...)")(*args, **kwargs)

    def __reduce__(self) -> tuple:
        state = (self.args, self.kwargs, self.state, self.dict_items, self.list_items)
        return (_make_stub, (self.stub_class, *state))

    def __repr__(self) -> str:
        return f"<stub {self.stub_class}>"


def _new_stub_class(name: str) -> type[StubObject]:
    """A StubObject subclass for one referenced name (pickle's NEWOBJ needs a class)."""
    short = re.sub(r"\W", "_", name.rpartition(".")[2]) or "Stub"
    return type(f"Stub_{short}", (StubObject,), {"stub_class": name, "__module__": __name__})


_stub_class = functools.cache(_new_stub_class)  # shared ones: re-pickled / weights-only stubs


def _make_stub(name: str, args, kwargs, state, dict_items, list_items) -> StubObject:
    obj = _stub_class(name)(*args, **kwargs)
    obj.state, obj.dict_items, obj.list_items = state, dict(dict_items), list(list_items)
    return obj


def _inert_globals() -> dict[tuple[str, str], Any]:
    """Globals a checkpoint may resolve as they are: immutable C types and builtin functions
    (pickle's BUILD cannot set attributes on them)."""
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("_codecs", "encode"): _codecs.encode,  # protocol-2 bytes
    }
    for name in ("set", "frozenset", "complex", "slice", "range", "bytes", "bytearray"):
        allowed[("builtins", name)] = getattr(builtins, name)
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    return allowed


_INERT = _inert_globals()
_REBUILDERS = ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")


def _per_load_globals(stub_for) -> dict[tuple[str, str], Any]:
    """Tensor rebuilding through fresh wrappers and tokens, made for one load.

    Pickle's BUILD can set attributes on whatever ``find_class`` returned; handing out torch's
    own Python functions or ``torch.Tensor`` would let a file tamper with them process-wide.
    """
    allowed: dict[tuple[str, str], Any] = {}
    wrappers = []
    for fname in _REBUILDERS:
        f = getattr(torch._utils, fname, None)
        if f is not None:

            def wrapper(*args, _f=f, **kwargs):
                return _f(*args, **kwargs)

            allowed[("torch._utils", fname)] = wrapper
            wrappers.append(wrapper)
    # stand-ins for the classes that _rebuild_from_type_v2 receives as ``new_type``
    tokens = {
        type("TensorToken", (), {}): torch.Tensor,
        type("ParameterToken", (), {}): nn.Parameter,
    }
    token_by_type = {cls: tok for tok, cls in tokens.items()}
    allowed[("torch", "Tensor")] = token_by_type[torch.Tensor]
    allowed[("torch.nn.parameter", "Parameter")] = token_by_type[nn.Parameter]

    def rebuild_from_type_v2(func, new_type, args, state):
        """torch's ``_rebuild_from_type_v2`` for plain tensors / parameters only."""
        real_type = next((cls for tok, cls in tokens.items() if new_type is tok), None)
        if real_type is None or not any(func is w for w in wrappers):
            return stub_for("torch._tensor._rebuild_from_type_v2")(func, new_type, args, state)
        return torch._tensor._rebuild_from_type_v2(func, real_type, args, state)

    allowed[("torch._tensor", "_rebuild_from_type_v2")] = rebuild_from_type_v2
    return allowed


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Undo protocol-2's Python 2 names (``__builtin__.set``, ``copy_reg``) as pickle would."""
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

    if (module, name) in NAME_MAPPING:
        return NAME_MAPPING[(module, name)]
    return IMPORT_MAPPING.get(module, module), name


def _restricted_pickle_module(stubbed: set[str]) -> types.SimpleNamespace:
    """A ``pickle_module`` for ``torch.load`` whose unpickler resolves only tensor rebuilding
    and inert builtins; every other global becomes a stub class (fresh for this load)."""
    classes: dict[str, type[StubObject]] = {}

    def stub_for(name: str) -> type[StubObject]:
        if name not in classes:
            classes[name] = _new_stub_class(name)
        return classes[name]

    allowed = {**_INERT, **_per_load_globals(stub_for)}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            module, name = _python3_name(module, name)
            obj = allowed.get((module, name))
            if obj is not None:
                return obj
            stubbed.add(f"{module}.{name}")
            return stub_for(f"{module}.{name}")

    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()

    # ``__name__`` because torch checks ``pickle_module.__name__ == "dill"``.
    return types.SimpleNamespace(
        __name__="recyclelora_restricted_pickle",
        Unpickler=RestrictedUnpickler,
        load=load,
        UnpicklingError=pickle.UnpicklingError,
    )


def _load_weights_only(path: str, stubbed: set[str]) -> Any:
    """Route for ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` (torch refuses custom pickle modules then):
    torch's weights-only unpickler with every non-allowlisted global registered as a stub."""
    ser = torch.serialization
    if not (hasattr(ser, "safe_globals") and hasattr(ser, "get_unsafe_globals_in_checkpoint")):
        raise MmsegCheckpointError(
            f"{path!r}: TORCH_FORCE_WEIGHTS_ONLY_LOAD is set and torch {torch.__version__} has "
            "no safe_globals / get_unsafe_globals_in_checkpoint; unset it to read mmengine "
            "checkpoints (they are still read without running pickled code)"
        )
    names = ser.get_unsafe_globals_in_checkpoint(path)
    stubbed.update(names)
    try:
        with ser.safe_globals([(_stub_class(n), n) for n in names]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # a dict or list subclass (ConfigDict: the weights-only unpickler fills plain dicts and
        # lists only) or a global from a module torch blocks outright (os, subprocess...)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = lines[-2] if len(lines) >= 2 else (lines or [""])[0]
        raise MmsegCheckpointError(
            f"{path!r}: TORCH_FORCE_WEIGHTS_ONLY_LOAD is set and torch's weights-only unpickler "
            f"cannot read this file even with stubs ({why[:200]}); unset it to use the "
            "restricted unpickler (which runs no pickled code either)"
        ) from e


def _is_tensor_state(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, Tensor) for v in obj.values())
    )


def read_mmseg_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read an mmengine / mmseg / mmcv checkpoint safely (no mmengine, no pickled code run).

    Returns a dict with:

    - ``"state_dict"``: the model state (an ``OrderedDict``; tensors exact, any non-tensor value
      as read);
    - ``"meta"``: the ``meta`` dict (``{}`` if absent or not a mapping), objects of unknown
      classes inside it as :class:`StubObject`;
    - ``"sections"``: every other top-level entry (``message_hub``, ``optimizer``,
      ``param_schedulers``, ``ema_state_dict``, :data:`FACTORS_SECTION`...), same treatment;
    - ``"stubbed"``: the sorted dotted names that became stubs;
    - ``"container"``: ``"torch-zip"``, ``"torch-pickle"`` or ``"safetensors"`` (+ ``", bare
      state dict"`` when the file is a state dict without the ``state_dict`` wrapper).

    Raises FileNotFoundError, or MmsegCheckpointError (naming the file) for an unreadable,
    truncated or corrupt file and for one without a state dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mmseg checkpoint not found: {path!r}")
    kind = checkpoint_kind(path)
    if kind == "unknown":
        raise MmsegCheckpointError(
            f"{path!r} is not a PyTorch checkpoint (neither a zip nor a pickle file); "
            "expected an mmengine/mmseg .pth file"
        )
    stubbed: set[str] = set()
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            obj: Any = collections.OrderedDict(load_file(path, device="cpu"))
        else:
            try:
                obj = torch.load(
                    path,
                    map_location="cpu",
                    weights_only=False,  # safe: the restricted unpickler resolves the globals
                    pickle_module=_restricted_pickle_module(stubbed),
                )
            except RuntimeError as e:
                if "explicit pickle_module" not in str(e):
                    raise
                obj = _load_weights_only(path, stubbed)
    except MmsegCheckpointError:
        raise
    except Exception as e:  # every reader failure becomes one clear message
        raise MmsegCheckpointError(
            f"cannot read {path!r} as a {kind} checkpoint ({type(e).__name__}: "
            f"{str(e).strip()[:300]}); the file may be truncated or corrupt (re-download or "
            "re-save it)"
        ) from e

    container = kind
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state = obj["state_dict"]
        meta = obj.get("meta")
        sections = {str(k): v for k, v in obj.items() if k not in ("state_dict", "meta")}
    elif _is_tensor_state(obj) and not isinstance(obj.get("meta"), Mapping):
        state, meta, sections = obj, None, {}
        container += ", bare state dict"
    else:
        what = (
            f"top-level keys {sorted(map(str, obj))[:8]}"
            if isinstance(obj, Mapping)
            else f"a {type(obj).__name__}"
        )
        raise MmsegCheckpointError(
            f"{path!r} has no 'state_dict' (found {what}); expected an mmengine/mmseg "
            "checkpoint {'meta': ..., 'state_dict': {...}}"
        )
    if not isinstance(state, collections.OrderedDict):
        state = collections.OrderedDict(state)
    return {
        "state_dict": state,
        "meta": dict(meta) if isinstance(meta, Mapping) else {},
        "sections": sections,
        "stubbed": sorted(stubbed),
        "container": container,
    }


# =============================================================================================
# Initial-factor bookkeeping on the model


_INITIAL_BUFFERS = frozenset(f"lora_{a}_{p}0" for a in ADAPTERS for p in "AB")


def _mark_unknown(layer: RecycleLoRALinear) -> None:
    """NaN initial factors: ``initial_factors_known`` turns False and ``save_adapters`` refuses."""
    with torch.no_grad():
        for name in _INITIAL_BUFFERS:
            buf = layer._buffers.get(name)
            if buf is not None:
                buf.fill_(math.nan)


def initial_factors_known(model: nn.Module) -> bool:
    """False if any adapted layer of ``model`` has unknown initial factors."""
    return all(layer.initial_factors_known for _, layer in iter_adapted(model))


def _set_factors(layer: RecycleLoRALinear, factors: Mapping[str, tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for adapter, (b0, a0) in factors.items():
            layer._buffers[f"lora_{adapter}_B0"].copy_(b0)
            layer._buffers[f"lora_{adapter}_A0"].copy_(a0)


def _one_hot(columns: Tensor, k: int, like: Tensor) -> Tensor:
    a0 = torch.zeros(len(columns), k, dtype=like.dtype)
    a0[torch.arange(len(columns)), columns.long()] = 1
    return a0


# =============================================================================================
# Reconstruction of the initial factors from the base weights


def _read_base_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """Meta-named DINOv2 state (``blocks.N.attn.qkv.weight``...) from any file that
    ``load_dinov2_weights`` reads; linear weights need no geometry conversion."""
    from .dinov2_weights import convert_hf_to_meta, read_checkpoint

    state, fmt, _ = read_checkpoint(path)
    if fmt.startswith("huggingface"):
        state, _ = convert_hf_to_meta(state)
    return state


def _reconstruct_layer(
    name: str,
    w0: Tensor,
    base_bias: Tensor | None,
    w_res: Tensor,
    bias: Tensor | None,
    ranks: Mapping[str, int],
    scaling: float,
    qr_dtypes: tuple[str, ...],
    atol: float,
) -> tuple[dict[str, tuple[Tensor, Tensor]], bool, str, float]:
    """Initial factors of one layer from ``W0`` and its residual.

    Returns ``(factors, exact, qr_dtype, deviation)``: ``exact`` when our RRQR factors rebuild
    the stored residual bit-for-bit (then they are used as they are); otherwise the ``B0``
    columns are taken from ``D`` (what the residual implies) and ``deviation`` is the largest
    ``|D column - RRQR column|``.
    """
    dtype = w_res.dtype
    w_res = w_res.detach().cpu()
    bias = None if bias is None else bias.detach().cpu()
    w0 = w0.to("cpu", dtype)
    if w0.shape != w_res.shape:
        raise MmsegCheckpointError(
            f"{name}: base weight {tuple(w0.shape)} vs checkpoint weight {tuple(w_res.shape)}"
        )
    if (bias is None) != (base_bias is None) or (
        bias is not None and not torch.equal(base_bias.to(dtype), bias)
    ):
        raise MmsegCheckpointError(
            f"{name}: its bias differs from base_weights' — the adapters were not initialised "
            "from this DINOv2 checkpoint"
        )
    d = (w0.double() - w_res.double()) / scaling
    nonzero = torch.nonzero((d != 0).any(dim=0)).flatten()
    r_total = sum(ranks.values())
    if nonzero.numel() != r_total:
        raise MmsegCheckpointError(
            f"{name}: (W0 - weight) / s has {nonzero.numel()} non-zero columns, expected "
            f"r_main + r_sub = {r_total} (one per RRQR-selected input column): base_weights is "
            "not the backbone these adapters were initialised from, or the checkpoint's weight "
            "is merged (W_res + s·BA, e.g. saved after model.eval())"
        )
    problems = []
    for qr_dtype in qr_dtypes:
        main, sub = rrqr_factors(w0, ranks["main"], ranks["sub"], qr_dtype)
        rrqr = {a: f for a, f in (("main", main), ("sub", sub)) if f is not None}
        cols = {a: a0.argmax(dim=1) for a, (_, a0) in rrqr.items()}
        chosen = torch.cat(list(cols.values())).sort().values
        if not torch.equal(chosen, nonzero):
            problems.append(f"{qr_dtype} RRQR pivots select other columns than the residual")
            continue
        deviation = 0.0
        for a, (b0, _) in rrqr.items():
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
    raise MmsegCheckpointError(
        f"{name}: our RRQR on the base weight disagrees with the checkpoint's residual: "
        + "; ".join(problems)
    )


def _reconstruct_all(
    layers: Mapping[str, tuple[Tensor, Tensor | None, Mapping[str, int]]],
    base_weights: str | os.PathLike,
    config: RecycleLoRAConfig,
    atol: float,
) -> tuple[dict[str, dict[str, tuple[Tensor, Tensor]]], list[str], str | None]:
    """Factors for ``{layer name: (W_res, bias, ranks)}``; returns (factors, notes, qr_dtype)."""
    base = _read_base_weights(base_weights)
    qr_dtypes = tuple(dict.fromkeys((config.qr_dtype, "float64", "float32")))
    factors, n_exact, worst, used = {}, 0, 0.0, set()
    for name, (w_res, bias, ranks) in layers.items():
        key = name[len("backbone.") :] if name.startswith("backbone.") else name
        if f"{key}.weight" not in base:
            raise MmsegCheckpointError(
                f"base_weights {os.fspath(base_weights)!r} has no {key}.weight for layer {name}"
            )
        f, exact, qr_dtype, dev = _reconstruct_layer(
            name,
            base[f"{key}.weight"],
            base.get(f"{key}.bias"),
            w_res,
            bias,
            ranks,
            config.scaling,
            qr_dtypes,
            atol,
        )
        factors[name] = f
        n_exact += exact
        worst = max(worst, dev)
        used.add(qr_dtype)
    notes = [
        f"initial factors reconstructed from {os.fspath(base_weights)!r} for {len(layers)} "
        f"layers: {n_exact} exactly (RRQR factors rebuild the residual bit-for-bit), "
        f"{len(layers) - n_exact} from the residual (max |D - RRQR column| {worst:.3g})"
    ]
    qr_dtype = used.pop() if len(used) == 1 else None
    return factors, notes, qr_dtype


def reconstruct_initial_factors(
    model: nn.Module, base_weights: str | os.PathLike, *, atol: float = 1e-3
) -> list[str]:
    """Recover every adapted layer's ``A0``/``B0`` from the base DINOv2 weights (see module doc).

    Works on the model's current residuals (e.g. after :func:`load_mmseg_checkpoint` without
    ``base_weights``). Nothing is changed unless every layer agrees. Returns report lines.
    """
    adapted = dict(iter_adapted(model))
    if not adapted:
        raise ValueError("the model has no RecycleLoRA adapters")
    config = _model_config(model)
    layers = {
        n: (
            layer.weight.detach(),
            None if layer.bias is None else layer.bias.detach(),
            dict(layer.ranks),
        )
        for n, layer in adapted.items()
    }
    factors, notes, qr_dtype = _reconstruct_all(layers, base_weights, config, atol)
    for name, f in factors.items():
        _set_factors(adapted[name], f)
    _update_config(model, init="rrqr", qr_dtype=qr_dtype)
    return notes


# =============================================================================================
# Key map


_SKIP_RULES: tuple[tuple[re.Pattern, str], ...] = (
    (
        re.compile(r"^decode_head\.conv_seg\."),
        "mmseg 0.x BaseDecodeHead classifier, unused by Mask2Former",
    ),
    (
        re.compile(r"^decode_head\.querys2feat\."),
        "Rein's head (replace_query_feat): no counterpart in Mask2Former",
    ),
    (re.compile(r"^backbone\.reins\."), "Rein's tokens: not part of a RecycleLoRA model"),
    (re.compile(r"^data_preprocessor\."), "normalisation constants (fixed in Segmentor)"),
    (re.compile(r"^(ema_model|ema)\.|^steps$"), "EMA bookkeeping"),
)
_MMDET2_RENAMES: tuple[tuple[re.Pattern, str], ...] = (
    # mmcv 1.x BaseTransformerLayer: attentions / ffns in operation order (docs §5)
    (
        re.compile(r"^(decode_head\.transformer_decoder\.layers\.\d+\.)attentions\.0\."),
        "cross_attn",
    ),
    (re.compile(r"^(decode_head\.transformer_decoder\.layers\.\d+\.)attentions\.1\."), "self_attn"),
    (re.compile(r"^(decode_head\.transformer_decoder\.layers\.\d+\.)ffns\.0\."), "ffn"),
    (
        re.compile(r"^(decode_head\.pixel_decoder\.encoder\.layers\.\d+\.)attentions\.0\."),
        "self_attn",
    ),
    (re.compile(r"^(decode_head\.pixel_decoder\.encoder\.layers\.\d+\.)ffns\.0\."), "ffn"),
)
_AUTHORS_ADAPTER = re.compile(r"^(backbone\..+)\.lora_([AB])_(main|sub)$")
_OUR_ADAPTER = re.compile(r"^(.+)\.lora_(main|sub)_([AB])$")
_OUR_FACTOR = re.compile(r"^(.+)\.lora_(main|sub)_([AB])0$")
_ALPHA_IN_CFG = re.compile(r"\blora_alpha\s*=\s*([0-9.eE+-]+)")


def _map_key(key: str) -> tuple[str | None, str]:
    """File key -> (our key, how) or (None, why skipped)."""
    for pattern, reason in _SKIP_RULES:
        if pattern.search(key):
            return None, reason
    m = _AUTHORS_ADAPTER.match(key)
    if m:
        return f"{m[1]}.lora_{m[3]}_{m[2]}", "authors' adapter name"
    for pattern, new in _MMDET2_RENAMES:
        m = pattern.match(key)
        if m:
            return f"{m[1]}{new}.{key[m.end() :]}", "mmdet 2.x name"
    return key, ""


def _strip_module_prefix(state: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    keys = [k for k in state if k != "steps"]
    if keys and all(k.startswith("module.") for k in keys):
        return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}, True
    return dict(state), False


def _soma_error(path: str, keys: list[str]) -> MmsegCheckpointError:
    return MmsegCheckpointError(
        f"{path!r}: not supported: this is a SoMA checkpoint (keys like {keys[0]!r}: SoraModel "
        "wraps the backbone as backbone.model.*, attention split into q/k/v, LoRA as "
        "lora_A.weight / lora_B.weight Linear modules). Merge it first (per q/k/v/proj/fc1/fc2: "
        "W = weight + scaling * lora_B.weight @ lora_A.weight, then concatenate q, k, v into "
        "attn.qkv), save the plain backbone as backbone.* keys and load that into a model built "
        "with build_model(..., adapters=None)"
    )


def _model_config(model: nn.Module) -> RecycleLoRAConfig:
    for module in model.modules():
        cfg = getattr(module, CONFIG_ATTR, None)
        if cfg is not None:
            return cfg
    # adapters present but no config (e.g. re-attached by hand): infer ranks/alpha
    layer = next(layer for _, layer in iter_adapted(model))
    return RecycleLoRAConfig(layer.ranks["main"], layer.ranks["sub"], layer.alpha)


def _update_config(model: nn.Module, **changes: Any) -> None:
    changes = {k: v for k, v in changes.items() if v is not None}
    for module in model.modules():
        cfg = getattr(module, CONFIG_ATTR, None)
        if cfg is not None:
            setattr(module, CONFIG_ATTR, dataclasses.replace(cfg, **changes))
    if "init" in changes:
        for _, layer in iter_adapted(model):
            layer.init_kind = changes["init"]


def _find_alpha(meta: Mapping[str, Any]) -> tuple[float | None, str]:
    ours = meta.get("recyclelora")
    if isinstance(ours, Mapping) and isinstance(ours.get("config"), Mapping):
        alpha = ours["config"].get("alpha")
        if isinstance(alpha, (int, float)):
            return float(alpha), "meta['recyclelora']"
    for key in ("cfg", "config"):  # mmengine: 'cfg' (pretty text); mmcv 1.x: 'config'
        cfg = meta.get(key)
        if isinstance(cfg, str):
            m = _ALPHA_IN_CFG.search(cfg)
            if m:
                try:
                    return float(m[1]), f"meta[{key!r}]"
                except ValueError:
                    pass
            continue
        # a ConfigDict read as a stub: look for a 'lora_alpha' entry, a few levels deep
        todo: list[tuple[Any, int]] = [(cfg, 0)]
        while todo:
            obj, depth = todo.pop()
            items = obj.dict_items if isinstance(obj, StubObject) else obj
            if not isinstance(items, Mapping) or depth > 6:
                continue
            value = items.get("lora_alpha")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value), f"meta[{key!r}] (ConfigDict)"
            todo.extend((v, depth + 1) for v in items.values())
    return None, ""


def _file_factors(
    state: Mapping[str, Any], sections: Mapping[str, Any]
) -> dict[str, dict[str, dict[str, Tensor]]]:
    """``{layer: {adapter: {"A0": t, "B0": t}}}`` from our factors section or our own names."""
    found: dict[str, dict[str, dict[str, Tensor]]] = {}
    section = sections.get(FACTORS_SECTION)
    items = list(section.items()) if isinstance(section, Mapping) else []
    items += [(k, v) for k, v in state.items() if _OUR_FACTOR.match(k)]
    for key, value in items:
        if not isinstance(key, str) or not isinstance(value, Tensor):
            continue
        cols = key.endswith(_COLUMNS)
        m = _OUR_FACTOR.match(key[: -len(_COLUMNS)] if cols else key)
        if m:
            part = found.setdefault(m[1], {}).setdefault(m[2], {})
            part[f"{m[3]}0" + (_COLUMNS if cols else "")] = value
    return found


def _resolve_file_factors(
    entry: Mapping[str, Mapping[str, Tensor]], layer: RecycleLoRALinear
) -> dict[str, tuple[Tensor, Tensor]] | None:
    out = {}
    for adapter, r in layer.ranks.items():
        if r == 0:
            continue
        part = entry.get(adapter, {})
        b0 = part.get("B0")
        a0 = part.get("A0")
        cols = part.get("A0" + _COLUMNS)
        if a0 is None and cols is not None:
            if cols.ndim != 1 or cols.is_floating_point() or cols.numel() != r:
                return None
            if cols.numel() and not 0 <= int(cols.min()) <= int(cols.max()) < layer.in_features:
                return None
            a0 = _one_hot(cols, layer.in_features, layer.weight)
        if b0 is None or a0 is None:
            return None
        if tuple(b0.shape) != (layer.out_features, r) or tuple(a0.shape) != (r, layer.in_features):
            return None
        out[adapter] = (b0, a0)
    return out


# =============================================================================================
# Loading


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


LoadReport = MmsegLoadReport


def _adapter_layout(
    mapped: Mapping[str, Tensor],
) -> dict[str, dict[str, int]]:
    """``{layer: {"main": r, "sub": r}}`` from our-named adapter keys (rank from the shapes)."""
    layers: dict[str, dict[str, int]] = {}
    for key, t in mapped.items():
        m = _OUR_ADAPTER.match(key)
        if m and m[1].startswith("backbone."):
            r = t.shape[0] if m[3] == "A" else t.shape[-1]
            ranks = layers.setdefault(m[1], {"main": 0, "sub": 0})
            ranks[m[2]] = max(ranks[m[2]], int(r))
    return layers


def _rank_hint(r_main: int, r_sub: int) -> str:
    return (
        f"build a matching model with build_model(..., adapters=RecycleLoRAConfig({r_main}, "
        f"{r_sub}))"
    )


def _sample(keys: Iterable[str], n: int = 8) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_mmseg_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    base_weights: str | os.PathLike | None = None,
    atol: float = 1e-3,
) -> MmsegLoadReport:
    """Load an mmseg 1.x checkpoint (authors' RecycleLoRA, plain/merged DINOv2, our export).

    Key map (file -> ``model``): ``backbone.*`` and ``decode_head.*`` keep their names; the
    authors' ``lora_A_main`` / ``lora_B_main`` / ``lora_A_sub`` / ``lora_B_sub`` become
    ``lora_main_A`` / ... (their ``weight`` is the residual, as ours); mmdet 2.x head names
    (``attentions.0`` = cross-attention, ``attentions.1`` = self-attention, ``ffns.0``; encoder
    ``attentions.0`` = self-attention) are renamed; a ``module.`` prefix is stripped. Known
    foreign entries (``decode_head.conv_seg``, ``data_preprocessor``, Rein's ``backbone.reins``
    and ``querys2feat``, EMA bookkeeping) are skipped and listed in the report; SoMA files are
    refused with an explanation.

    Adapter ranks come from the tensor shapes and must equal the model's; an adapted file needs
    an adapted model and a plain (or merged) backbone a model built with ``adapters=None`` —
    always an error, never a silent partial load. ``lora_alpha`` (from ``meta``; the authors'
    1.0 when absent) must equal the model's.

    Nothing is loaded if anything fails: unreadable file, structure/shape mismatch, or — with
    ``strict`` — any missing or unexpected key (``strict=False`` loads the rest and reports).

    A model built with ``build_model(..., init_adapters=False)`` skips the (here useless)
    decomposition; every tensor comes from the file.

    Initial factors: stored ones (our exports) are loaded; else ``base_weights`` (a DINOv2
    checkpoint for ``load_dinov2_weights``) reconstructs them (``atol``: tolerance of the
    ``D``-vs-RRQR column check); else they are marked unknown (see the module doc).

    Note: a ``weight`` saved while the authors' layers were merged (``W_res + s·BA``, after
    ``model.eval()``) cannot be told apart from keys alone; it would count the update twice.
    ``base_weights`` detects it (the residual then differs from ``W0`` in every column).
    """
    path = os.fspath(path)
    ckpt = read_mmseg_checkpoint(path)
    report = MmsegLoadReport(path=path, stubbed=ckpt["stubbed"], meta=ckpt["meta"])
    meta, sections = ckpt["meta"], ckpt["sections"]
    fmt: list[str] = [ckpt["container"]]

    state, stripped = _strip_module_prefix(ckpt["state_dict"])
    if stripped:
        report.notes.append("stripped the 'module.' prefix (DDP-wrapped model)")
    soma = [k for k in state if k.startswith("backbone.model.") or ".lora_A.weight" in k]
    if soma:
        raise _soma_error(path, soma)
    for name in sections:
        if name == FACTORS_SECTION:
            continue
        reason = {
            "ema_state_dict": "EMA copy; 'state_dict' already holds the EMA weights "
            "(mmengine EMAHook swaps them at save time)",
        }.get(name, "training state, not model weights")
        report.skipped.append((f"[{name}]", reason))

    # ---- map keys
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        if _OUR_FACTOR.match(key):
            continue  # our own full state dict: initial factors, handled below
        new, how = _map_key(key)
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
    hows = {how for _, _, how in report.renamed}
    if "mmdet 2.x name" in hows:
        fmt.append("mmdet 2.x head names")

    # ---- adapter structure
    model_sd = model.state_dict()
    adapted = dict(iter_adapted(model))
    factor_keys = {
        f"{n}.{b}" for n, layer in adapted.items() for b in layer._buffers if b in _INITIAL_BUFFERS
    }
    file_layers = _adapter_layout(mapped)
    file_ranks = {(r["main"], r["sub"]) for r in file_layers.values()}
    if len(file_ranks) > 1:
        raise MmsegCheckpointError(
            f"{path!r}: adapters of different ranks (r_main, r_sub) {sorted(file_ranks)} in one "
            "file; RecycleLoRA models here use one rank pair for every layer"
        )
    if file_layers:
        r_main, r_sub = next(iter(file_ranks))
        report.ranks = (r_main, r_sub)
        fmt.append(f"RecycleLoRA adapters r_main={r_main}, r_sub={r_sub}")
        if not adapted:
            raise MmsegCheckpointError(
                f"{path!r} has RecycleLoRA adapters (r_main={r_main}, r_sub={r_sub}) on "
                f"{len(file_layers)} layers but the model has none: {_rank_hint(r_main, r_sub)}"
            )
        config = _model_config(model)
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
                f"blocks): adapted only in the file: {_sample(only_file) or '-'}; only in the "
                f"model: {_sample(only_model) or '-'}"
            )
        alpha, source = _find_alpha(meta)
        if alpha is None:
            alpha = config.alpha
            report.notes.append(
                f"lora_alpha not recorded in the file; assumed the model's {alpha:g} "
                f"(the authors' configs all use {_AUTHORS_ALPHA:g})"
            )
        elif not math.isclose(alpha, config.alpha, rel_tol=1e-9):
            raise MmsegCheckpointError(
                f"{path!r}: lora_alpha = {alpha:g} in {source} but the model has alpha = "
                f"{config.alpha:g} (scaling alpha / (r_main + r_sub) would differ): build it with "
                f"RecycleLoRAConfig({r_main}, {r_sub}, alpha={alpha:g})"
            )
        report.alpha = alpha
    elif adapted:
        plain = sorted(n for n in adapted if f"{n}.weight" in mapped)
        if plain:
            raise MmsegCheckpointError(
                f"{path!r} holds a plain (un-adapted or merged) DINOv2 backbone but the model has "
                f"RecycleLoRA adapters ({_sample(plain, 3)}): build it with "
                "build_model(..., adapters=None), or start new adapters from these weights"
            )
    elif any(k.startswith("backbone.") for k in mapped):
        fmt.append("plain backbone")

    # ---- shapes, missing, unexpected
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(model_sd[k].shape)}"
        for k, v in mapped.items()
        if k in model_sd and tuple(v.shape) != tuple(model_sd[k].shape)
    ]
    if bad:
        raise MmsegCheckpointError(
            f"{path!r}: shapes differ from the model's (another preset, img_size or "
            f"num_classes?): {_sample(bad, 5)}"
        )
    report.missing = [k for k in model_sd if k not in mapped and k not in factor_keys]
    report.unexpected = [k for k in mapped if k not in model_sd]
    if strict and (report.missing or report.unexpected):
        hint = ""
        if any(k.startswith("backbone.reins.") for k, _ in report.skipped):
            hint = " (a Rein checkpoint holds no DINOv2 weights and a different head)"
        raise MmsegCheckpointError(
            f"{path!r} does not match the model{hint}: missing {len(report.missing)} keys "
            f"({_sample(report.missing) or '-'}); unexpected {len(report.unexpected)} keys "
            f"({_sample(report.unexpected) or '-'}); pass strict=False to load the rest"
        )

    # ---- initial factors (decided before anything is loaded)
    loaded_layers = {n: layer for n, layer in adapted.items() if f"{n}.weight" in mapped}
    factors: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
    unknown: list[str] = []
    new_init = new_qr = None
    if loaded_layers:
        stored = _file_factors(state, sections)
        for name, layer in loaded_layers.items():
            f = _resolve_file_factors(stored.get(name, {}), layer) if name in stored else None
            if f is not None:
                factors[name] = f
        ours = meta.get("recyclelora")
        file_cfg = ours.get("config") if isinstance(ours, Mapping) else None
        if isinstance(file_cfg, Mapping):
            new_init, new_qr = file_cfg.get("init"), file_cfg.get("qr_dtype")
            try:  # validate before anything is loaded
                dataclasses.replace(_model_config(model), init=new_init, qr_dtype=new_qr)
            except (TypeError, ValueError):
                report.notes.append("ignored meta['recyclelora']['config'] init/qr_dtype")
                new_init = new_qr = None
        else:
            new_init = "rrqr"  # the authors' method
        todo = {n: layer for n, layer in loaded_layers.items() if n not in factors}
        if factors:
            report.notes.append(f"initial factors of {len(factors)} layers read from the file")
        if todo and base_weights is not None:
            if new_init not in (None, "rrqr"):
                raise MmsegCheckpointError(
                    f"{path!r}: adapters were initialised with {new_init!r}; base_weights can "
                    "only reconstruct RRQR initial factors"
                )
            config = _model_config(model)
            dtype = next(iter(todo.values())).weight.dtype
            inputs = {
                n: (
                    mapped[f"{n}.weight"].to(dtype),
                    mapped[f"{n}.bias"].to(dtype) if f"{n}.bias" in mapped else None,
                    dict(layer.ranks),
                )
                for n, layer in todo.items()
            }
            rebuilt, notes, qr_used = _reconstruct_all(inputs, base_weights, config, atol)
            factors.update(rebuilt)
            report.notes.extend(notes)
            new_qr = qr_used or new_qr
        elif factors and base_weights is not None:
            report.notes.append("base_weights not needed: the file stores the initial factors")
        unknown = [n for n in loaded_layers if n not in factors]
        if not unknown:
            report.initial_factors = (
                "stored" if base_weights is None or not todo else "reconstructed"
            )
        elif len(unknown) == len(loaded_layers):
            report.initial_factors = "unknown"
        else:
            report.initial_factors = f"unknown for {len(unknown)} of {len(loaded_layers)} layers"
        if unknown:
            report.notes.append(
                "initial factors unknown (the file has no A0/B0): the forward is exact, but "
                "save_adapters refuses until reconstruct_initial_factors(model, base_weights) "
                "or load_mmseg_checkpoint(..., base_weights=...) recovers them"
            )

    # ---- load
    to_load = {k: v for k, v in mapped.items() if k in model_sd}
    with torch.no_grad():
        result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    report.loaded = list(to_load)
    for name, layer in loaded_layers.items():
        if name in factors:
            _set_factors(layer, factors[name])
        else:
            _mark_unknown(layer)
        if layer.is_merged:  # refresh the cached merged weight
            layer.merge()
    if loaded_layers:
        _update_config(model, init=new_init, qr_dtype=new_qr)
    report.format = ", ".join(fmt)
    return report


# =============================================================================================
# Export


def _cityscapes_dataset_meta(num_classes: int) -> dict[str, Any] | None:
    if num_classes != 19:
        return None
    try:
        from ..data.labels import CLASS_NAMES, palette
    except Exception:  # pragma: no cover - optional decoration only
        return None
    return {
        "classes": tuple(CLASS_NAMES),
        "palette": [[int(c) for c in row] for row in palette()],
    }


def export_mmseg_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_keys: Literal["recyclelora", "merged"] = "recyclelora",
    include_initial_factors: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` as an mmseg 1.x checkpoint ``{'meta': {...}, 'state_dict': ...}``.

    ``adapter_keys="recyclelora"``: the authors' layout — ``weight`` = residual, adapters as
    ``lora_A_main`` / ``lora_B_main`` / ``lora_A_sub`` / ``lora_B_sub`` (un-merged, whatever
    the layers' merge mode). ``"merged"``: adapters folded in (``W_res + s Σ B A``), plain
    DINOv2 keys. A model without adapters always gets plain keys.

    ``meta`` holds only plain Python (``cfg`` is a short text with ``r_max``, ``r_main``,
    ``lora_alpha`` as in the authors' configs; ``recyclelora`` our config; ``dataset_meta`` for
    19 classes), so the file also loads with ``torch.load(weights_only=True)``. With
    ``include_initial_factors`` the known initial factors go to the top-level section
    :data:`FACTORS_SECTION` (ignored by mmengine), which makes the round trip exact. ``meta``
    entries given here are added. The write is atomic. Returns the path.
    """
    if adapter_keys not in ("recyclelora", "merged"):
        raise ValueError(f"adapter_keys must be 'recyclelora' or 'merged', got {adapter_keys!r}")
    adapted = dict(iter_adapted(model))
    config = _model_config(model) if adapted else None
    state = model.state_dict()
    out: collections.OrderedDict[str, Tensor] = collections.OrderedDict()
    factors: dict[str, Tensor] = {}
    for key, value in state.items():
        layer_name, _, leaf = key.rpartition(".")
        layer = adapted.get(layer_name)
        value = value.detach().cpu()  # as mmengine's weights_to_cpu
        if layer is None:
            out[key] = value
            continue
        if adapter_keys == "merged":
            if leaf == "weight":
                out[key] = layer.merged().cpu()
            elif not leaf.startswith("lora_"):
                out[key] = value
            continue
        m = re.fullmatch(r"lora_(main|sub)_([AB])(0?)", leaf)
        if m is None:
            out[key] = value
        elif not m[3]:
            out[f"{layer_name}.lora_{m[2]}_{m[1]}"] = value
        elif include_initial_factors and layer.initial_factors_known:
            if m[2] == "A":
                cols = _one_hot_columns(value)
                if cols is not None:
                    factors[f"{key}{_COLUMNS}"] = cols
                    continue
            factors[key] = value
    n_unknown = sum(not la.initial_factors_known for la in adapted.values())

    num_classes = getattr(getattr(model, "decode_head", None), "num_classes", None)
    exported_adapters = adapted and adapter_keys == "recyclelora"
    info: dict[str, Any] = {
        "format": FORMAT,
        "adapter_keys": adapter_keys if adapted else "none",
        "config": _plain_config(config) if config is not None else None,
        "num_classes": None if num_classes is None else int(num_classes),
        "initial_factors": (
            "n/a"
            if not exported_adapters
            else "none"
            if not factors
            else "partial"
            if n_unknown
            else "stored"
        ),
    }
    cfg_lines = ["# exported by recyclelora.export_mmseg_checkpoint (summary, not a full config)"]
    if num_classes is not None:
        cfg_lines.append(f"num_classes = {int(num_classes)}")
    if exported_adapters:
        cfg_lines += [
            f"r_max = {config.main_rank + config.sub_rank}",
            f"r_main = {config.main_rank}",
            f"lora_alpha = {config.alpha!r}",
        ]
    file_meta: dict[str, Any] = {
        "cfg": "\n".join(cfg_lines) + "\n",
        "time": time.strftime("%Y%m%d_%H%M%S"),
        "recyclelora": info,
    }
    dataset_meta = _cityscapes_dataset_meta(int(num_classes)) if num_classes else None
    if dataset_meta:
        file_meta["dataset_meta"] = dataset_meta
    file_meta.update(dict(meta or {}))
    checkpoint: dict[str, Any] = {"meta": file_meta, "state_dict": out}
    if exported_adapters and factors:
        checkpoint[FACTORS_SECTION] = factors

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def _one_hot_columns(a0: Tensor) -> Tensor | None:
    if a0.ndim != 2 or a0.shape[0] == 0:
        return None
    cols = a0.argmax(dim=1)
    expected = torch.zeros_like(a0)
    expected[torch.arange(a0.shape[0]), cols] = 1
    return cols if torch.equal(a0, expected) else None


def _plain_config(config: RecycleLoRAConfig) -> dict[str, Any]:
    d = config.to_dict()
    d["target_modules"] = list(d["target_modules"])
    return d


# =============================================================================================
# CLI: inspect a checkpoint without loading it into a model


def _describe(ckpt: Mapping[str, Any]) -> str:
    state, _ = _strip_module_prefix(ckpt["state_dict"])
    lines = [f"container: {ckpt['container']}", f"state_dict: {len(state)} entries"]
    groups = collections.Counter(str(k).split(".", 1)[0] for k in state)
    lines += [f"  {g}.*: {n}" for g, n in sorted(groups.items())]
    mapped = {}
    for k, v in state.items():
        new, _ = _map_key(str(k))
        if new is not None and isinstance(v, Tensor):
            mapped[new] = v
    layout = _adapter_layout(mapped)
    if layout:
        ranks = sorted({(r["main"], r["sub"]) for r in layout.values()})
        lines.append(f"RecycleLoRA adapters on {len(layout)} layers, (r_main, r_sub) {ranks}")
    alpha, source = _find_alpha(ckpt["meta"])
    if alpha is not None:
        lines.append(f"lora_alpha = {alpha:g} ({source})")
    lines.append(f"meta keys: {sorted(map(str, ckpt['meta']))}")
    lines.append(f"other sections: {sorted(ckpt['sections'])}")
    if ckpt["stubbed"]:
        lines.append(f"not loaded (inert stubs): {', '.join(ckpt['stubbed'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recyclelora.models.mmseg_format",
        description="Inspect an mmseg/mmengine checkpoint safely (no pickled code is run).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarise sections, keys, adapter ranks, stubs")
    p.add_argument("path")
    args = parser.parse_args(argv)
    print(_describe(read_mmseg_checkpoint(args.path)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
