"""Open any ``.pth`` / ``.safetensors`` file without running pickled code.

mmengine checkpoints hold objects of mmengine and numpy classes (``HistoryBuffer``,
``ConfigDict``, arrays) that torch's weights-only unpickler refuses. The restricted unpickler here
resolves only tensor-rebuild functions, storages, ``OrderedDict`` and a few inert builtins; every
other class or function named in the file (``HistoryBuffer``, numpy arrays, ``os.system``...)
becomes an inert :class:`StubObject` that records its arguments and never calls anything.
"""

from __future__ import annotations

import _codecs
import builtins
import collections
import functools
import os
import pickle
import re
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.dinov2_weights import checkpoint_kind
from .errors import CheckpointError, torch_reason


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
        return _shared_stub_class(f"{self.stub_class}(...)")(*args, **kwargs)

    def __reduce__(self) -> tuple:
        state = (self.args, self.kwargs, self.state, self.dict_items, self.list_items)
        return (_make_stub, (self.stub_class, *state))

    def __repr__(self) -> str:
        return f"<stub {self.stub_class}>"


def _new_stub_class(name: str) -> type[StubObject]:
    """A StubObject subclass for one referenced name (pickle's NEWOBJ needs a class)."""
    short = re.sub(r"\W", "_", name.rpartition(".")[2]) or "Stub"
    return type(f"Stub_{short}", (StubObject,), {"stub_class": name, "__module__": __name__})


_shared_stub_class = functools.cache(_new_stub_class)  # re-pickled / weights-only stubs


def _make_stub(name: str, args, kwargs, state, dict_items, list_items) -> StubObject:
    obj = _shared_stub_class(name)(*args, **kwargs)
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


def _per_load_globals(stub_for: Callable[[str], type[StubObject]]) -> dict[tuple[str, str], Any]:
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


def _load_weights_only(path: str, stubbed: set[str], error: type[CheckpointError]) -> Any:
    """Route for ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` (torch refuses custom pickle modules then):
    torch's weights-only unpickler with every non-allowlisted global registered as a stub."""
    ser = torch.serialization
    if not (hasattr(ser, "safe_globals") and hasattr(ser, "get_unsafe_globals_in_checkpoint")):
        raise error(
            f"{path!r}: TORCH_FORCE_WEIGHTS_ONLY_LOAD is set and torch {torch.__version__} has "
            "no safe_globals / get_unsafe_globals_in_checkpoint; unset it to read mmengine "
            "checkpoints (they are still read without running pickled code)"
        )
    names = ser.get_unsafe_globals_in_checkpoint(path)
    stubbed.update(names)
    try:
        with ser.safe_globals([(_shared_stub_class(n), n) for n in names]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # a dict or list subclass (ConfigDict: the weights-only unpickler fills plain dicts and
        # lists only) or a global from a module torch blocks outright (os, subprocess...)
        raise error(
            f"{path!r}: TORCH_FORCE_WEIGHTS_ONLY_LOAD is set and torch's weights-only unpickler "
            f"cannot read this file even with stubs ({torch_reason(e)}); unset it to use the "
            "restricted unpickler (which runs no pickled code either)"
        ) from e


@dataclass
class RawCheckpoint:
    """The top-level object of a file, the names that became stubs, and the container."""

    obj: Any
    stubbed: list[str]
    container: str  # "torch-zip", "torch-pickle" or "safetensors"


def read_raw(
    path: str | os.PathLike,
    expected: str,
    error: type[CheckpointError] = CheckpointError,
) -> RawCheckpoint:
    """Read a torch or safetensors file safely; nothing in it is imported or called.

    ``expected`` (e.g. "an mmseg-format checkpoint") completes the messages of ``error``,
    which is raised for a file that is not a checkpoint at all, or is truncated or damaged.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r} (expected {expected})")
    kind = checkpoint_kind(path)
    if kind == "unknown":
        raise error(
            f"{path!r} is not a PyTorch checkpoint (neither a zip nor a pickle file) nor a "
            f"safetensors file; expected {expected}"
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
                obj = _load_weights_only(path, stubbed, error)
    except CheckpointError:
        raise
    except Exception as e:  # every reader failure becomes one clear message
        raise error(
            f"cannot read {path!r} as a {kind} file ({torch_reason(e)}): it is not "
            f"{expected} that can be read; it may be truncated (an interrupted copy or "
            "download) or damaged — re-download or re-save it"
        ) from e
    return RawCheckpoint(obj, sorted(stubbed), kind)
