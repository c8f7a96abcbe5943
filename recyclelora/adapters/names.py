"""The names of adapter tensors, and RRQR's one-hot ``A0`` stored compactly as column indices.

One place for both, so the adapter layer, adapter files and mmseg-format checkpoints agree:

- ``lora_{adapter}_{A|B}``: the trainable factors (state_dict keys of the adapted layers);
- ``lora_{adapter}_{A|B}0``: the initial factors that define the frozen residual;
- ``<key of A0>.columns``: on disk only, the column index of each row of a one-hot ``A0``
  (r integers instead of an r × k matrix).
"""

from __future__ import annotations

import re

import torch

ADAPTERS = ("main", "sub")  # RecycleLoRA's two adapters; SoMA's single one is "main"
QKV_ADAPTERS = ("q", "k", "v")  # SoMA on a fused qkv layer: one adapter per row block
ADAPTER_NAMES = ADAPTERS + QKV_ADAPTERS
COLUMNS_SUFFIX = ".columns"
# "<layer>.lora_<adapter>_<A|B>[0]": groups layer, adapter, part, "0" for an initial factor
ADAPTER_KEY = re.compile(rf"^(?:(.+)\.)?lora_({'|'.join(ADAPTER_NAMES)})_([AB])(0?)$")


def tensor_name(adapter: str, part: str, initial: bool = False) -> str:
    """``lora_main_A``, ``lora_sub_B0``, ...: an attribute / state_dict name in a layer."""
    if adapter not in ADAPTER_NAMES or part not in ("A", "B"):
        raise ValueError(
            f"no adapter tensor {adapter!r}/{part!r}; adapters are {ADAPTER_NAMES}, A or B"
        )
    return f"lora_{adapter}_{part}{'0' if initial else ''}"


def tensor_key(layer: str, adapter: str, part: str, initial: bool = False) -> str:
    """The state_dict key of an adapter tensor of the layer named ``layer``."""
    name = tensor_name(adapter, part, initial)
    return f"{layer}.{name}" if layer else name


def is_adapter_tensor(name: str) -> bool:
    """True for the last component of a key that names an adapter tensor."""
    return name.startswith("lora_")


def one_hot_rows(
    columns: torch.Tensor | list[int],
    k: int,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(r, k) matrix whose row i is the unit vector at ``columns[i]``."""
    cols = torch.as_tensor(columns, dtype=torch.long, device=device)
    if cols.ndim != 1:
        raise ValueError(f"columns must be one-dimensional, got shape {tuple(cols.shape)}")
    if cols.numel() and not 0 <= int(cols.min()) <= int(cols.max()) < k:
        raise ValueError(f"column indices must lie in [0, {k}), got {cols.tolist()}")
    a = torch.zeros(len(cols), k, dtype=dtype, device=device)
    a[torch.arange(len(cols), device=device), cols] = 1
    return a


def one_hot_columns(a0: torch.Tensor) -> torch.Tensor | None:
    """Column index of each row when ``a0`` (r, k) is exactly one-hot per row, else None."""
    if a0.ndim != 2 or a0.shape[0] == 0:
        return None
    cols = a0.argmax(dim=1)
    expected = torch.zeros_like(a0)
    expected[torch.arange(a0.shape[0], device=a0.device), cols] = 1
    return cols if torch.equal(a0, expected) else None


def compress_one_hot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace every one-hot ``*_A0`` by its ``*_A0.columns`` (for writing files)."""
    out = {}
    for key, t in tensors.items():
        m = ADAPTER_KEY.match(key)
        cols = one_hot_columns(t) if m and m[3] == "A" and m[4] else None
        if cols is None:
            out[key] = t
        else:
            out[key + COLUMNS_SUFFIX] = cols
    return out


def expand_one_hot(
    tensors: dict[str, torch.Tensor], widths: dict[str, int] | None = None
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`compress_one_hot`: dense ``*_A0`` again.

    The width k of each ``A0`` comes from ``widths[key of A0]`` when given, else from the
    matching trainable ``*_A`` in ``tensors`` (same shape). Raises ValueError when neither
    says it, or when the indices do not fit.
    """
    out = {}
    for key, t in tensors.items():
        if not key.endswith(COLUMNS_SUFFIX):
            out[key] = t
            continue
        dense = key[: -len(COLUMNS_SUFFIX)]
        if widths is not None and dense in widths:
            k = widths[dense]
        elif dense[:-1] in tensors:
            k = tensors[dense[:-1]].shape[-1]
        else:
            raise ValueError(f"{key}: no width known for the one-hot matrix it encodes")
        if t.is_floating_point():
            raise ValueError(f"{key}: column indices must be integers, got {t.dtype}")
        out[dense] = one_hot_rows(t, k)
    return out
