"""An mmseg / mmengine checkpoint as sections: state dict, meta, the rest; and a summary."""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping
from typing import Any, TypedDict

from torch import Tensor

from .errors import MmsegCheckpointError
from .mmseg_keys import adapter_layout, find_alpha, map_key, strip_module_prefix
from .safe_pickle import RawCheckpoint, read_raw

EXPECTED = "an mmengine/mmseg checkpoint {'meta': ..., 'state_dict': {...}}"


class MmsegFile(TypedDict):
    """What :func:`read_mmseg_checkpoint` returns."""

    state_dict: collections.OrderedDict
    meta: dict[str, Any]
    sections: dict[str, Any]
    stubbed: list[str]
    container: str


def is_tensor_state(obj: Any) -> bool:
    """A mapping of string keys holding at least one tensor: a bare state dict."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, Tensor) for v in obj.values())
    )


def looks_like_mmseg(obj: Any) -> bool:
    """``{'state_dict': {...}, ...}`` or a bare state dict (no ``meta`` mapping beside it)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return True
    return is_tensor_state(obj) and not isinstance(obj.get("meta"), Mapping)


def mmseg_sections(raw: RawCheckpoint, path: str) -> MmsegFile:
    """Split a file's top-level object into state dict, meta and the other sections."""
    obj, container = raw.obj, raw.container
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state, meta = obj["state_dict"], obj.get("meta")
        sections = {str(k): v for k, v in obj.items() if k not in ("state_dict", "meta")}
    elif looks_like_mmseg(obj):
        state, meta, sections = obj, None, {}
        container += ", bare state dict"
    else:
        what = (
            f"top-level keys {sorted(map(str, obj))[:8]}"
            if isinstance(obj, Mapping)
            else f"a {type(obj).__name__}"
        )
        raise MmsegCheckpointError(
            f"{path!r} has no 'state_dict' (found {what}); expected {EXPECTED}"
        )
    return MmsegFile(
        state_dict=collections.OrderedDict(state),
        meta=dict(meta) if isinstance(meta, Mapping) else {},
        sections=sections,
        stubbed=raw.stubbed,
        container=container,
    )


def read_mmseg_checkpoint(path: str | os.PathLike) -> MmsegFile:
    """Read an mmengine / mmseg / mmcv checkpoint safely (no mmengine, no pickled code run).

    - ``"state_dict"``: the model state (tensors exact, any non-tensor value as read);
    - ``"meta"``: the ``meta`` dict (``{}`` if absent), objects of unknown classes inside it as
      :class:`~recyclelora.checkpoints.safe_pickle.StubObject`;
    - ``"sections"``: every other top-level entry (``message_hub``, ``optimizer``,
      ``param_schedulers``, ``ema_state_dict``, our initial factors...), same treatment;
    - ``"stubbed"``: the sorted dotted names that became stubs;
    - ``"container"``: ``"torch-zip"``, ``"torch-pickle"`` or ``"safetensors"`` (+ ``", bare
      state dict"`` for a state dict without the ``state_dict`` wrapper).

    Raises FileNotFoundError, or MmsegCheckpointError (naming the file) for an unreadable,
    truncated or corrupt file and for one without a state dict.
    """
    path = os.fspath(path)
    return mmseg_sections(read_raw(path, "an mmseg-format checkpoint", MmsegCheckpointError), path)


def describe(ckpt: MmsegFile) -> str:
    """Sections, key groups, adapter ranks, alpha and stubs of a file, without a model."""
    state, _ = strip_module_prefix(ckpt["state_dict"])
    lines = [f"container: {ckpt['container']}", f"state_dict: {len(state)} entries"]
    groups = collections.Counter(str(k).split(".", 1)[0] for k in state)
    lines += [f"  {g}.*: {n}" for g, n in sorted(groups.items())]
    mapped = {}
    for k, v in state.items():
        new, _ = map_key(str(k))
        if new is not None and isinstance(v, Tensor):
            mapped[new] = v
    layout = adapter_layout(mapped)
    if layout:
        ranks = sorted({(r["main"], r["sub"]) for r in layout.values()})
        lines.append(f"RecycleLoRA adapters on {len(layout)} layers, (r_main, r_sub) {ranks}")
    alpha, source = find_alpha(ckpt["meta"])
    if alpha is not None:
        lines.append(f"lora_alpha = {alpha:g} ({source})")
    lines.append(f"meta keys: {sorted(map(str, ckpt['meta']))}")
    lines.append(f"other sections: {sorted(ckpt['sections'])}")
    if ckpt["stubbed"]:
        lines.append(f"not loaded (inert stubs): {', '.join(ckpt['stubbed'])}")
    return "\n".join(lines)
