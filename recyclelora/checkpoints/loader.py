"""``load_model(path)``: one entry point for every checkpoint this project reads.

The kind is told by content, not by a flag: the container from the first bytes
(``checkpoint_kind``), then the top-level object, read once without running pickled code. Each
kind is a row of a table (how to recognise it, how to build the model, how to describe it); a
directory kind (e.g. an export folder) is a row of :data:`DIRECTORY_KINDS`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters.config import AdapterConfig, RecycleLoRAConfig
from ..adapters.names import ADAPTERS
from ..recipes import Recipe
from .errors import CheckpointError, MmsegCheckpointError, TrainingCheckpointError
from .mmseg_keys import (
    AUTHORS_ALPHA,
    adapter_layout,
    find_alpha,
    map_key,
    ordered_targets,
    sample,
    strip_module_prefix,
)
from .mmseg_load import MmsegLoadReport, load_mmseg_file
from .mmseg_read import MmsegFile, describe, looks_like_mmseg, mmseg_sections
from .safe_pickle import RawCheckpoint, read_raw
from .soma_keys import soma_config, soma_keys, soma_to_ours
from .soma_mmseg import describe_soma, load_soma_file, soma_ema_entry
from .training import is_training_state, not_training_message

Device = str | torch.device


@dataclass
class LoadedModel:
    """A model ready for inference (``eval()``), and what it was loaded from.

    ``kind``: "training", "mmseg" or "soma". ``iteration``: the training iteration when the
    file says it. ``recipe``: a training checkpoint's recipe (None for other kinds). ``report``:
    what the mmseg loader mapped, skipped and noted (None for training checkpoints). ``ema``: a
    training checkpoint's ``ema`` entry (the training weights beside the average), or a SoMA
    file's EMA section in that form, if any.
    """

    model: nn.Module
    kind: str
    source: Path
    iteration: int | None
    recipe: Recipe | None
    report: MmsegLoadReport | None
    ema: dict[str, Any] | None = None

    def __str__(self) -> str:
        at = "" if self.iteration is None else f", iteration {self.iteration}"
        name = "" if self.recipe is None else f", recipe {self.recipe.name}"
        head = f"{self.kind} checkpoint {self.source}{at}{name}"
        return head if self.report is None else f"{head}\n{self.report}"


@dataclass(frozen=True)
class FileKind:
    """One kind of checkpoint file: recognised from its top-level object."""

    name: str
    description: str
    matches: Callable[[Any], bool]
    load: Callable[[RawCheckpoint, Path, Device], LoadedModel]
    describe: Callable[[RawCheckpoint, Path], str]


@dataclass(frozen=True)
class DirectoryKind:
    """One kind of checkpoint directory: recognised from its files."""

    name: str
    description: str
    matches: Callable[[Path], bool]
    load: Callable[[Path, Device], LoadedModel]
    describe: Callable[[Path], str]


# ---------------------------------------------------------------------------------------------
# Training checkpoints (ours)


def _recipe(state: Mapping[str, Any], path: Path) -> Recipe:
    from ..recipes import from_dict

    try:
        return from_dict(state["recipe"])
    except (TypeError, ValueError) as e:
        raise TrainingCheckpointError(
            f"{str(path)!r}: the recipe stored in it is invalid ({e})"
        ) from e


def _refuse_stubs(raw: RawCheckpoint, path: Path) -> None:
    if raw.stubbed:
        raise TrainingCheckpointError(
            f"{str(path)!r} looks like a training checkpoint but refers to "
            f"{', '.join(raw.stubbed[:4])}, which training/train.py never writes: it was written "
            "by another program and is not loaded"
        )


def _load_training(raw: RawCheckpoint, path: Path, device: Device) -> LoadedModel:
    """Rebuild the model from the stored recipe, without the adapters' decomposition (the
    checkpoint has every tensor)."""
    from ..models import build_model

    _refuse_stubs(raw, path)
    state = raw.obj
    recipe = _recipe(state, path)
    model = build_model(
        recipe.model, adapters=recipe.adapters, img_size=recipe.data.crop, init_adapters=False
    )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise TrainingCheckpointError(
            f"{str(path)!r}: its weights do not fit the {recipe.model} model its recipe "
            f"describes ({_mismatch(model.state_dict(), state['model'])}): the file was changed "
            "or written by another program; export the checkpoint training/train.py wrote"
        ) from e
    ema = state.get("ema") if isinstance(state.get("ema"), Mapping) else None
    return LoadedModel(
        model.to(device).eval(), "training", path, int(state["iteration"]), recipe, None, ema
    )


def _mismatch(want: Mapping[str, Tensor], got: Mapping[str, Any]) -> str:
    """Which keys are missing, unexpected or of another shape: a line, not load_state_dict's
    page of every key."""
    shape = [
        f"{k} {tuple(v.shape)} for {tuple(want[k].shape)}"
        for k, v in got.items()
        if k in want and isinstance(v, Tensor) and v.shape != want[k].shape
    ]
    parts = [
        f"{len(keys)} {what} ({sample(keys, 3)})"
        for what, keys in (
            ("missing", [k for k in want if k not in got]),
            ("unexpected", [k for k in got if k not in want]),
            ("of another shape", shape),
        )
        if keys
    ]
    return "; ".join(parts) or "the tensors do not load"


def _describe_training(raw: RawCheckpoint, path: Path) -> str:
    state = raw.obj
    model = state["model"]
    recipe = state["recipe"] if isinstance(state["recipe"], Mapping) else {}
    lines = [
        f"training checkpoint {path} ({raw.container})",
        f"iteration: {state['iteration']}",
        f"recipe: {recipe.get('name', '?')} (model {recipe.get('model', '?')})",
        f"model: {len(model)} tensors" if isinstance(model, Mapping) else "model: ?",
        f"sections: {sorted(map(str, state))}",
    ]
    if raw.stubbed:
        lines.append(f"not loaded (inert stubs): {', '.join(raw.stubbed)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# mmseg-format checkpoints (the authors' releases, ours exported)


def _mapped_tensors(ckpt: MmsegFile) -> dict[str, Tensor]:
    state, _ = strip_module_prefix(ckpt["state_dict"])
    out = {}
    for key, value in state.items():
        new, _ = map_key(str(key))
        if new is not None and isinstance(value, Tensor):
            out[new] = value
    return out


def _ours(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    info = meta.get("recyclelora")
    return info if isinstance(info, Mapping) else {}


def _num_classes(mapped: Mapping[str, Tensor], meta: Mapping[str, Any], path: str) -> int:
    cls = mapped.get("decode_head.cls_embed.weight")
    if cls is not None:
        return int(cls.shape[0]) - 1  # + the "no object" class
    if isinstance(_ours(meta).get("num_classes"), int):
        return int(_ours(meta)["num_classes"])
    raise MmsegCheckpointError(
        f"{path!r} has no decode_head.cls_embed.weight: not a Mask2Former segmentor checkpoint "
        "(a backbone alone loads with load_dinov2_weights)"
    )


def _img_size(
    mapped: Mapping[str, Tensor], meta: Mapping[str, Any], path: str
) -> int | tuple[int, int]:
    stored = _ours(meta).get("img_size")
    if isinstance(stored, (list, tuple)) and len(stored) == 2:
        return (int(stored[0]), int(stored[1]))
    pos, patch = mapped.get("backbone.pos_embed"), mapped.get("backbone.patch_embed.proj.weight")
    if pos is None or patch is None:
        raise MmsegCheckpointError(
            f"{path!r} has no backbone.pos_embed / backbone.patch_embed: no DINOv2 backbone "
            "(a Rein checkpoint holds none)"
        )
    n = int(pos.shape[1]) - 1  # + the class token
    grid = math.isqrt(n)
    if grid * grid != n:
        raise MmsegCheckpointError(
            f"{path!r}: a {n}-position grid is not square, so the training image size cannot "
            "be told; load it into a model built with build_model(..., img_size=(H, W))"
        )
    return grid * int(patch.shape[-1])


def _adapter_config(
    mapped: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> tuple[RecycleLoRAConfig | None, list[str]]:
    """The adapters the file implies (ranks from shapes, alpha from meta), and notes."""
    layout = adapter_layout(mapped)
    if not layout:
        return None, []
    stored = _ours(meta).get("config")
    if isinstance(stored, Mapping):
        try:
            return RecycleLoRAConfig.from_dict(dict(stored)), []
        except (TypeError, ValueError):
            pass
    ranks = next(iter(layout.values()))
    alpha, _ = find_alpha(meta)
    notes = []
    if alpha is None:
        alpha = AUTHORS_ALPHA
        notes.append(f"lora_alpha not recorded; built with the authors' {AUTHORS_ALPHA:g}")
    target_modules = ordered_targets(layout, RecycleLoRAConfig.target_modules)
    config = RecycleLoRAConfig(
        ranks[ADAPTERS[0]], ranks[ADAPTERS[1]], alpha, target_modules=target_modules
    )
    return config, notes


def _fits(model: nn.Module, mapped: Mapping[str, Tensor]) -> bool:
    return all(
        k in mapped and tuple(mapped[k].shape) == tuple(v.shape)
        for k, v in model.state_dict().items()
    )


def _preset(mapped: Mapping[str, Tensor], num_classes: int, img_size, path: str) -> str:
    """The preset whose plain model has every key of the file, with the same shapes."""
    from ..models import PRESETS, build_model

    for name in PRESETS:
        plain = build_model(name, num_classes, adapters=None, device="meta", img_size=img_size)
        if _fits(plain, mapped):
            return name
    raise MmsegCheckpointError(
        f"{path!r}: its backbone and head shapes match none of the presets {sorted(PRESETS)} "
        f"(num_classes {num_classes}, img_size {img_size})"
    )


def _load_mmseg(raw: RawCheckpoint, path: Path, device: Device) -> LoadedModel:
    ckpt = mmseg_sections(raw, str(path))
    mapped = _mapped_tensors(ckpt)
    config, notes = _adapter_config(mapped, ckpt["meta"])
    return _build_and_load("mmseg", path, ckpt, mapped, config, notes, load_mmseg_file, device)


def _build_and_load(
    kind: str,
    path: Path,
    ckpt: MmsegFile,
    mapped: Mapping[str, Tensor],
    config: AdapterConfig | None,
    notes: list[str],
    load: Callable[[nn.Module, MmsegFile, str], MmsegLoadReport],
    device: Device,
    ema: dict[str, Any] | None = None,
) -> LoadedModel:
    """The preset an mmseg-format file's tensors (in our names) fit, built with ``config``'s
    adapters and loaded by ``load``; the iteration is the one its meta says, ``ema`` the file's
    EMA section (SoMA files) in a training checkpoint's form."""
    from ..models import build_model

    where = str(path)
    num_classes = _num_classes(mapped, ckpt["meta"], where)
    img_size = _img_size(mapped, ckpt["meta"], where)
    preset = _preset(mapped, num_classes, img_size, where)
    model = build_model(
        preset, num_classes, adapters=config, img_size=img_size, init_adapters=False
    )
    report = load(model, ckpt, where)
    report.notes[:0] = [f"built preset {preset!r}, {num_classes} classes, img_size {img_size}"]
    report.notes.extend(notes)
    iteration = ckpt["meta"].get("iter")
    iteration = (
        iteration if isinstance(iteration, int) and not isinstance(iteration, bool) else None
    )
    return LoadedModel(model.to(device).eval(), kind, path, iteration, None, report, ema)


def _describe_mmseg(raw: RawCheckpoint, path: Path) -> str:
    return f"mmseg-format checkpoint {path}\n" + describe(mmseg_sections(raw, str(path)))


# ---------------------------------------------------------------------------------------------
# SoMA's mmseg-format checkpoints (theirs, or ours exported in their layout)


def _is_soma(obj: Any) -> bool:
    if not looks_like_mmseg(obj):
        return False
    state = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
    return bool(soma_keys(strip_module_prefix(state)[0]))


def _load_soma(raw: RawCheckpoint, path: Path, device: Device) -> LoadedModel:
    where = str(path)
    ckpt = mmseg_sections(raw, where)
    mapped = soma_to_ours(strip_module_prefix(ckpt["state_dict"])[0], repr(where)).state
    if "backbone.pos_embed" not in mapped:
        raise MmsegCheckpointError(
            f"{where!r} is a partial SoMA file (adapters, biases and head, no frozen backbone "
            "weights): build the model from the DINOv2 weights its adapters started from, "
            "build_model(preset, backbone_weights=..., adapters=SoMAConfig(...)), and load it "
            "with load_soma_checkpoint(model, path, strict=False)"
        )
    config, notes = soma_config(mapped, ckpt["meta"], repr(where))
    ema = soma_ema_entry(ckpt, where)
    return _build_and_load("soma", path, ckpt, mapped, config, notes, load_soma_file, device, ema)


def _describe_soma(raw: RawCheckpoint, path: Path) -> str:
    return f"SoMA mmseg-format checkpoint {path}\n" + describe_soma(mmseg_sections(raw, str(path)))


# ---------------------------------------------------------------------------------------------
# Dispatch


FILE_KINDS: tuple[FileKind, ...] = (  # first match wins: a training state also holds tensors
    FileKind(
        "training",
        "a training checkpoint (runs/<recipe>/checkpoints/iter_N.pth)",
        is_training_state,
        _load_training,
        _describe_training,
    ),
    FileKind(
        "soma",
        "a SoMA mmseg-format checkpoint (SoMA's release, or ours exported in their layout)",
        _is_soma,
        _load_soma,
        _describe_soma,
    ),
    FileKind(
        "mmseg",
        "an mmseg-format checkpoint (the authors' release, or ours exported in their layout)",
        looks_like_mmseg,
        _load_mmseg,
        _describe_mmseg,
    ),
)
DIRECTORY_KINDS: tuple[DirectoryKind, ...] = ()


def _expected() -> str:
    return " or ".join(k.description for k in FILE_KINDS + DIRECTORY_KINDS)


def _open(path: str | os.PathLike) -> tuple[Path, FileKind | DirectoryKind, RawCheckpoint | None]:
    path = Path(path)
    if path.is_dir():
        kind = next((k for k in DIRECTORY_KINDS if k.matches(path)), None)
        if kind is None:
            raise CheckpointError(f"{str(path)!r} is a directory; expected a file: {_expected()}")
        return path, kind, None
    raw = read_raw(path, _expected())
    kind = next((k for k in FILE_KINDS if k.matches(raw.obj)), None)
    if kind is None:
        raise CheckpointError(
            f"{not_training_message(str(path), raw.obj)}; nor is it an mmseg-format checkpoint "
            "(no 'state_dict')"
        )
    return path, kind, raw


def load_model(path: str | os.PathLike, device: Device = "cpu") -> LoadedModel:
    """Open any checkpoint this project reads and return the model, in ``eval()`` mode.

    A training checkpoint rebuilds the model of its recipe; an mmseg-format file builds the
    preset its shapes match, with the adapters it holds (ranks from the shapes, ``lora_alpha``
    from its meta): RecycleLoRA's, or SoMA's for a file in SoMA's layout (first block and
    targets from its adapted layers). Nothing in the file is executed. Raises
    FileNotFoundError, or :class:`~recyclelora.checkpoints.errors.CheckpointError` saying
    what the file is not.
    """
    path, kind, raw = _open(path)
    if raw is None:
        return kind.load(path, device)
    return kind.load(raw, path, device)


def inspect_checkpoint(path: str | os.PathLike) -> str:
    """What a checkpoint holds, without building a model."""
    path, kind, raw = _open(path)
    return kind.describe(path) if raw is None else kind.describe(raw, path)


def load_trained_model(path: str | os.PathLike, device: Device = "cpu"):
    """(model, recipe, iteration) of a training checkpoint: :func:`load_model`, for callers
    that need the recipe (evaluation)."""
    loaded = load_model(path, device)
    if loaded.recipe is None:
        raise TrainingCheckpointError(
            f"{str(path)!r} is an {loaded.kind} checkpoint, which carries no training recipe; "
            "pass a training checkpoint (runs/<recipe>/checkpoints/iter_N.pth)"
        )
    return loaded.model, loaded.recipe, loaded.iteration
