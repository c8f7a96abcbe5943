"""Load released DINOv2 weights into :class:`~recyclelora.models.dinov2.DinoVisionTransformer`.

Accepted files (the format is detected from the file's bytes and keys, not its name):

* Meta's release, e.g. ``dinov2_vitl14_pretrain.pth``: a plain state dict whose keys are the
  model's own names (patch 14, 37x37 position grid for image size 518);
* Hugging Face ``facebook/dinov2-*`` ``model.safetensors`` (separate query/key/value
  projections, fused here into ``attn.qkv`` in q, k, v order; SwiGLU ``weights_in/out`` →
  ``w12/w3``);
* either of those wrapped in a checkpoint dict (``state_dict`` / ``model`` / ``teacher``) and/or
  under a ``module.`` / ``backbone.`` / ``dinov2.`` prefix (mmseg, DDP, HF task models).

The geometry is then converted to the model's: the patch-embedding kernel is resized bicubically
(e.g. 14x14 → 16x16) and the position grid too (e.g. 37x37 → 32x32), class position kept. Both
resizes are plain ``F.interpolate(..., mode="bicubic", align_corners=False)`` — the same as the
Rein / RecycleLoRA conversion script (``tools/convert_models/convert_dinov2_large_512x512.py``);
the kernel is *not* renormalised, so its response to a flat patch grows by about (16/14)^2.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DinoV2CheckpointError",
    "LoadReport",
    "convert_hf_to_meta",
    "load_dinov2_weights",
    "read_checkpoint",
    "resize_patch_embed",
    "resize_pos_embed",
]

_EXPECTED = (
    "expected Meta's dinov2_vit*14_pretrain.pth (e.g. dinov2_vitl14_pretrain.pth) or a Hugging "
    "Face facebook/dinov2-* model.safetensors (e.g. facebook/dinov2-large)"
)
# Linear layers that the adapters replace; they must still be plain nn.Linear when loading.
_ADAPTED_LINEARS = ("qkv", "proj", "fc1", "fc2", "w12", "w3")
_WRAPPER_KEYS = ("state_dict", "model", "teacher")
_PREFIXES = ("module.", "backbone.", "teacher.backbone.", "dinov2.", "module.backbone.")


class DinoV2CheckpointError(ValueError):
    """A checkpoint that cannot be read, recognised, converted or (strictly) loaded."""


@dataclass
class LoadReport:
    """What :func:`load_dinov2_weights` did.

    ``missing``: model keys the file did not provide (left at their current values).
    ``unexpected``: file keys (after renaming) the model has no place for (not loaded).
    ``converted``: one line per renamed-and-reshaped or fused tensor.
    ``skipped``: keys outside the backbone prefix (e.g. a decode head), not loaded.
    """

    path: str
    format: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        lines = [f"DINOv2 weights from {self.path} ({self.format})"]
        for name, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("converted", self.converted),
        ):
            lines.append(f"  {name} ({len(items)})" + (":" if items else ""))
            lines.extend(f"    {item}" for item in items)
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} keys outside the backbone prefix")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Pure conversion functions.


def resize_patch_embed(weight: Tensor, new_size: int | Sequence[int]) -> Tensor:
    """Resize a patch-embedding kernel (D, C, kh, kw) -> (D, C, *new_size).

    Plain bicubic interpolation of the kernel values (align_corners=False, no renormalisation),
    each (out, in) channel pair independently; computed in at least float32, returned in the
    input dtype. The input is not modified.
    """
    if weight.ndim != 4:
        raise ValueError(f"patch kernel must be 4-D (D, C, kh, kw), got {tuple(weight.shape)}")
    size = (new_size, new_size) if isinstance(new_size, int) else tuple(int(s) for s in new_size)
    if tuple(weight.shape[-2:]) == size:
        return weight.clone()
    d, c, kh, kw = weight.shape
    dtype = torch.promote_types(weight.dtype, torch.float32)
    flat = weight.reshape(d * c, 1, kh, kw).to(dtype)
    out = F.interpolate(flat, size=size, mode="bicubic", align_corners=False)
    return out.reshape(d, c, *size).to(weight.dtype)


def resize_pos_embed(
    pos_embed: Tensor,
    new_grid: int | Sequence[int],
    num_prefix_tokens: int = 1,
    old_grid: Sequence[int] | None = None,
) -> Tensor:
    """Resize a position embedding (1, P + gh*gw, D) -> (1, P + nh*nw, D).

    The first ``num_prefix_tokens`` positions (the class token) are kept; the patch grid
    (row-major, ``old_grid`` or square by default) is resized bicubically (align_corners=False)
    in at least float32 and returned in the input dtype. The input is not modified.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, tokens, D), got {tuple(pos_embed.shape)}")
    nh, nw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n) if n >= 0 else -1
        if side * side != n:
            raise ValueError(f"pos_embed has {n} patch positions, not a square grid; pass old_grid")
        old_grid = (side, side)
    gh, gw = int(old_grid[0]), int(old_grid[1])
    if gh * gw != n:
        raise ValueError(f"old_grid {gh}x{gw} does not match {n} patch positions")
    if (gh, gw) == (nh, nw):
        return pos_embed.clone()
    dtype = torch.promote_types(pos_embed.dtype, torch.float32)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = grid.reshape(1, gh, gw, -1).permute(0, 3, 1, 2).to(dtype)
    grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, nh * nw, -1).to(pos_embed.dtype)
    return torch.cat((prefix, grid), dim=1)


_HF_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc1|fc2|w12|w3)\.", r"blocks.\1.mlp.\2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
    (r"^layernorm\.", "norm."),
)
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(\w+)$")


def convert_hf_to_meta(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a Hugging Face Dinov2Model state dict to Meta's names; fuse q, k, v into qkv.

    Returns ``(state, notes)``. Keys without a Meta counterpart keep their HF name (so they show
    up as unexpected); a layer with only some of query/key/value keeps those under HF names too.
    """
    out: dict[str, Tensor] = {}
    notes: list[str] = []
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        m = _HF_QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, repl in _HF_RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            out[key] = value
    for (layer, param), parts in sorted(qkv.items(), key=lambda kv: (int(kv[0][0]), kv[0][1])):
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat(
                (parts["query"], parts["key"], parts["value"]), dim=0
            )
            notes.append(f"blocks.{layer}.attn.qkv.{param}: fused from HF query/key/value")
        else:
            for part, value in parts.items():
                out[f"encoder.layer.{layer}.attention.attention.{part}.{param}"] = value
    return out, notes


# ---------------------------------------------------------------------------------------------
# Reading files.


def checkpoint_kind(path: str) -> str:
    """'safetensors', 'torch-zip', 'torch-pickle' or 'unknown', from the first bytes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-pickle"
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    # A safetensors name with a broken header: let the reader report what is wrong.
    return "safetensors" if path.endswith(".safetensors") else "unknown"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], str, list[str]]:
    """Read a DINOv2 checkpoint file into a flat state dict with *source* key names.

    Returns ``(state, format, skipped)`` where format is ``"meta"`` or ``"huggingface"`` (with
    ``"+wrapper"``/``"+prefix"`` notes) and ``skipped`` lists keys outside a stripped prefix.
    Raises FileNotFoundError / DinoV2CheckpointError with the file name and what was expected.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DINOv2 checkpoint not found: {path!r}; {_EXPECTED}")
    kind = checkpoint_kind(path)
    if kind == "unknown":
        raise DinoV2CheckpointError(
            f"{path!r} is neither a PyTorch checkpoint (zip/pickle) nor a safetensors file; "
            f"{_EXPECTED}"
        )
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # every reader failure becomes one clear message
        hint = (
            "it holds arbitrary Python objects: extract and save its state_dict alone"
            if "weights_only" in str(e).lower()
            else "the file may be truncated or corrupt (re-download it)"
        )
        raise DinoV2CheckpointError(
            f"cannot read {path!r} as a {kind} file ({type(e).__name__}: "
            f"{str(e).strip().rstrip('.')}); {hint}; {_EXPECTED}"
        ) from e

    fmt_notes: list[str] = []
    for _ in range(2):  # e.g. {"model": {...}} or {"teacher": {...}}
        if isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
            wrapper = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if wrapper is None:
                break
            obj = obj[wrapper]
            fmt_notes.append(f"in {wrapper!r}")
    if not isinstance(obj, Mapping) or not obj:
        raise DinoV2CheckpointError(
            f"{path!r} ({kind}) does not hold a state dict (got {type(obj).__name__}); {_EXPECTED}"
        )
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    non_tensor = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))

    def detect(keys: Sequence[str]) -> str | None:
        if "cls_token" in keys or any(k.startswith("blocks.") for k in keys):
            return "meta"
        if "embeddings.cls_token" in keys or any(k.startswith("encoder.layer.") for k in keys):
            return "huggingface"
        return None

    skipped: list[str] = []
    fmt = detect(list(state))
    if fmt is None:
        for prefix in _PREFIXES:
            inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            fmt = detect(list(inner)) if inner else None
            if fmt is not None:
                skipped = sorted(k for k in state if not k.startswith(prefix))
                state = inner
                fmt_notes.append(f"prefix {prefix!r}")
                break
    if fmt is None:
        sample = ", ".join(sorted(state)[:5]) or "(no tensors)"
        raise DinoV2CheckpointError(
            f"{path!r} ({kind}) is not a DINOv2 backbone checkpoint: found keys like {sample}; "
            f"{_EXPECTED}"
        )
    skipped += non_tensor
    if fmt == "meta":  # DINOv2 training checkpoints chunk the blocks: blocks.<chunk>.<i>.*
        state = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}
    return state, fmt + "".join(f" ({n})" for n in fmt_notes), skipped


# ---------------------------------------------------------------------------------------------
# Loading.


def _check_plain_linears(model: nn.Module) -> None:
    """Refuse a model whose block linears were already replaced (e.g. by adapters)."""
    for name, module in model.named_modules():
        parts = name.split(".")
        adapted = len(parts) >= 2 and parts[-2] in ("attn", "mlp") and parts[-1] in _ADAPTED_LINEARS
        if adapted and type(module) is not nn.Linear:
            raise DinoV2CheckpointError(
                f"{name} is a {type(module).__name__}, not a plain nn.Linear: load the "
                "DINOv2 weights before the adapters are applied"
            )


def load_dinov2_weights(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True
) -> LoadReport:
    """Load a DINOv2 checkpoint into ``model``, converting names and geometry.

    The patch kernel and position grid are resized to the model's (see the module docstring);
    every other shape must match. Nothing is loaded when anything fails: unreadable file, unknown
    format, unconvertible shape, or — with ``strict`` — any missing or unexpected key. With
    ``strict=False`` the report lists them and the rest is loaded. A model on the meta device gets
    the checkpoint tensors assigned (``load_state_dict(assign=True)``); it then needs every key.
    """
    path = os.fspath(path)
    _check_plain_linears(model)
    source, fmt, skipped = read_checkpoint(path)
    state: dict[str, Tensor]
    converted: list[str] = []
    if fmt.startswith("huggingface"):
        state, converted = convert_hf_to_meta(source)
    else:
        state = dict(source)

    target = model.state_dict()
    num_prefix = int(getattr(model, "num_prefix_tokens", 1))

    def fail(msg: str) -> DinoV2CheckpointError:
        return DinoV2CheckpointError(f"{path!r} ({fmt}): {msg}; {_EXPECTED}")

    for key in list(state):
        if key not in target:
            continue
        src, dst = state[key], target[key]
        if tuple(src.shape) == tuple(dst.shape):
            continue
        if key == "patch_embed.proj.weight" and src.ndim == 4 and src.shape[:2] == dst.shape[:2]:
            state[key] = resize_patch_embed(src, tuple(dst.shape[-2:]))
            converted.append(
                f"{key}: kernel {src.shape[-2]}x{src.shape[-1]} -> "
                f"{dst.shape[-2]}x{dst.shape[-1]} (bicubic, align_corners=False)"
            )
        elif key == "pos_embed" and src.ndim == 3 and src.shape[-1] == dst.shape[-1]:
            grid = getattr(model, "grid_size", None)
            if grid is None:
                side = math.isqrt(dst.shape[1] - num_prefix)
                grid = (side, side)
            try:
                state[key] = resize_pos_embed(src, grid, num_prefix_tokens=num_prefix)
            except ValueError as e:
                raise fail(f"cannot convert pos_embed {tuple(src.shape)}: {e}") from e
            old = math.isqrt(src.shape[1] - num_prefix)
            converted.append(
                f"{key}: grid {old}x{old} -> {grid[0]}x{grid[1]} "
                "(bicubic, align_corners=False, class position kept)"
            )
        elif key == "mask_token" and src.numel() == dst.numel():
            state[key] = src.reshape(dst.shape)
            converted.append(f"{key}: reshaped {tuple(src.shape)} -> {tuple(dst.shape)}")
        else:
            raise fail(
                f"shape mismatch for {key}: file {tuple(src.shape)}, model {tuple(dst.shape)} "
                "(a different model size? build the matching preset)"
            )

    report = LoadReport(
        path=path,
        format=fmt,
        missing=sorted(k for k in target if k not in state),
        unexpected=sorted(k for k in state if k not in target),
        converted=converted,
        skipped=skipped,
    )
    if strict and not report.ok:
        raise DinoV2CheckpointError(
            f"strict load of {path!r} ({fmt}) failed: {len(report.missing)} missing, "
            f"{len(report.unexpected)} unexpected keys (pass strict=False to load the rest)\n"
            f"{report}"
        )
    on_meta = any(t.is_meta for t in target.values())
    if on_meta and report.missing:
        raise fail(f"model is on the meta device and these keys are missing: {report.missing}")
    loadable = {k: v.to(target[k].dtype) for k, v in state.items() if k in target}
    model.load_state_dict(loadable, strict=False, assign=on_meta)
    return report
