"""The key map between mmseg 1.x checkpoints and our models (``docs/mmseg_checkpoint_layout.md``).

``backbone.*`` and ``decode_head.*`` keep their names (our modules are named as mmdet 3.x's);
the authors' adapter tensors ``lora_{A|B}_{main|sub}`` are our ``lora_{main|sub}_{A|B}``; mmdet
2.x head names are renamed; known foreign entries are skipped with a reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor

from ..adapters.names import ADAPTER_KEY, COLUMNS_SUFFIX
from .safe_pickle import StubObject

#: ``meta['recyclelora']['format']`` of our exports.
FORMAT = "recyclelora-mmseg/1"
#: Top-level section of our exports holding the initial factors (mmengine ignores it).
FACTORS_SECTION = "recyclelora_initial_factors"
#: ``lora_alpha`` of every configuration the authors released.
AUTHORS_ALPHA = 1.0

SKIP_RULES: tuple[tuple[re.Pattern, str], ...] = (
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
_DECODER = r"^(decode_head\.transformer_decoder\.layers\.\d+\.)"
_ENCODER = r"^(decode_head\.pixel_decoder\.encoder\.layers\.\d+\.)"
#: mmcv 1.x BaseTransformerLayer keeps attentions / ffns in operation order
MMDET2_RENAMES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(_DECODER + r"attentions\.0\."), "cross_attn"),
    (re.compile(_DECODER + r"attentions\.1\."), "self_attn"),
    (re.compile(_DECODER + r"ffns\.0\."), "ffn"),
    (re.compile(_ENCODER + r"attentions\.0\."), "self_attn"),
    (re.compile(_ENCODER + r"ffns\.0\."), "ffn"),
)
MMDET2 = "mmdet 2.x name"
_AUTHORS_ADAPTER = re.compile(r"^(backbone\..+)\.lora_([AB])_(main|sub)$")
_ALPHA_IN_CFG = re.compile(r"\blora_alpha\s*=\s*([0-9.eE+-]+)")


def authors_name(adapter: str, part: str) -> str:
    """The authors' parameter name of one adapter tensor: ``lora_A_main``, ``lora_B_sub``..."""
    return f"lora_{part}_{adapter}"


def is_initial_factor(key: str) -> bool:
    m = ADAPTER_KEY.match(key)
    return bool(m and m[4])


def map_key(key: str) -> tuple[str | None, str]:
    """File key -> (our key, how it was renamed; "" if not) or (None, why it is skipped)."""
    for pattern, reason in SKIP_RULES:
        if pattern.search(key):
            return None, reason
    m = _AUTHORS_ADAPTER.match(key)
    if m:
        return f"{m[1]}.lora_{m[3]}_{m[2]}", "authors' adapter name"
    for pattern, new in MMDET2_RENAMES:
        m = pattern.match(key)
        if m:
            return f"{m[1]}{new}.{key[m.end() :]}", MMDET2
    return key, ""


def strip_module_prefix(state: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """Drop the ``module.`` of a DDP-wrapped model's keys; True if it was there."""
    keys = [k for k in state if k != "steps"]
    if keys and all(k.startswith("module.") for k in keys):
        return {k.removeprefix("module."): v for k, v in state.items()}, True
    return dict(state), False


def soma_message(path: str, keys: list[str]) -> str:
    return (
        f"{path!r} is a SoMA checkpoint (keys like {keys[0]!r}: SoraModel wraps the backbone "
        "as backbone.model.*, attention split into q/k/v, LoRA as lora_A.weight / "
        "lora_B.weight modules): load it with load_soma_checkpoint(model, path) into a model "
        "built with build_model(..., adapters=SoMAConfig(...)), or let load_model(path) build "
        "the model"
    )


def adapter_layout(mapped: Mapping[str, Tensor]) -> dict[str, dict[str, int]]:
    """``{layer: {"main": r, "sub": r, ...}}`` from our-named adapter keys (rank from the
    shapes; SoMA's ``q``, ``k``, ``v`` adapters too)."""
    layers: dict[str, dict[str, int]] = {}
    for key, t in mapped.items():
        m = ADAPTER_KEY.match(key)
        if m and not m[4] and m[1] and m[1].startswith("backbone."):
            r = t.shape[0] if m[3] == "A" else t.shape[-1]
            ranks = layers.setdefault(m[1], {"main": 0, "sub": 0})
            ranks[m[2]] = max(ranks.get(m[2], 0), int(r))
    return layers


def ordered_targets(layers: Iterable[str], order: Sequence[str]) -> tuple[str, ...]:
    """The last name components of ``layers``, in a config's ``order`` (others after, sorted)."""
    targets = {name.rpartition(".")[2] for name in layers}
    return tuple(t for t in order if t in targets) + tuple(sorted(targets - set(order)))


def _alpha_in_config_dict(cfg: Any) -> float | None:
    """A ``lora_alpha`` entry a few levels deep in a ConfigDict read as a stub (or a dict)."""
    todo: list[tuple[Any, int]] = [(cfg, 0)]
    while todo:
        obj, depth = todo.pop()
        items = obj.dict_items if isinstance(obj, StubObject) else obj
        if not isinstance(items, Mapping) or depth > 6:
            continue
        value = items.get("lora_alpha")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        todo.extend((v, depth + 1) for v in items.values())
    return None


def find_alpha(meta: Mapping[str, Any]) -> tuple[float | None, str]:
    """``lora_alpha`` recorded in ``meta`` and where: our config, mmengine's config text
    (``cfg``) or mmcv 1.x's (``config``), or a ConfigDict."""
    ours = meta.get("recyclelora")
    if isinstance(ours, Mapping) and isinstance(ours.get("config"), Mapping):
        alpha = ours["config"].get("alpha")
        if isinstance(alpha, (int, float)):
            return float(alpha), "meta['recyclelora']"
    for key in ("cfg", "config"):
        cfg = meta.get(key)
        if isinstance(cfg, str):
            m = _ALPHA_IN_CFG.search(cfg)
            if m:
                try:
                    return float(m[1]), f"meta[{key!r}]"
                except ValueError:
                    pass
            continue
        alpha = _alpha_in_config_dict(cfg)
        if alpha is not None:
            return alpha, f"meta[{key!r}] (ConfigDict)"
    return None, ""


def stored_factors(
    state: Mapping[str, Any], sections: Mapping[str, Any]
) -> dict[str, dict[str, Tensor]]:
    """``{layer: {"lora_main_A0.columns": t, "lora_main_B0": t, ...}}`` from our factors section,
    or from initial-factor keys in the state itself (our full state dicts)."""
    found: dict[str, dict[str, Tensor]] = {}
    section = sections.get(FACTORS_SECTION)
    items = list(section.items()) if isinstance(section, Mapping) else []
    items += [(k, v) for k, v in state.items() if isinstance(k, str) and is_initial_factor(k)]
    for key, value in items:
        if not isinstance(key, str) or not isinstance(value, Tensor):
            continue
        m = ADAPTER_KEY.match(key.removesuffix(COLUMNS_SUFFIX))
        if m and m[4] and m[1]:
            leaf = key[len(m[1]) + 1 :]
            found.setdefault(m[1], {})[leaf] = value
    return found


def sample(keys: Iterable[str], n: int = 8) -> str:
    """The first ``n`` keys, and how many there are in all."""
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")
