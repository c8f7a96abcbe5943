"""AdamW parameter groups from a small declarative rule table (docs/method.md §3).

Same semantics as the authors' mmengine ``paramwise_cfg``: a rule applies to every trainable
parameter whose qualified name contains its key; keys are tried longest first (ties in
alphabetical order) and the first match wins. Parameters of normalisation layers that match no
key get ``norm_decay_mult`` (mmengine's ``norm_decay_mult``: catches e.g. the head's GroupNorms).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm


@dataclass(frozen=True)
class Rule:
    lr_mult: float = 1.0
    decay_mult: float = 1.0


DEFAULT = Rule()
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, _BatchNorm, _InstanceNorm)

# The authors' custom_keys (RecycleLoRA g2cbm config), with our adapter parameter names.
RECIPE_RULES: Mapping[str, Rule] = {
    "backbone": Rule(lr_mult=0.5, decay_mult=1.0),
    "norm": Rule(decay_mult=0.0),
    "query_embed": Rule(lr_mult=1.0, decay_mult=0.0),
    "level_embed": Rule(lr_mult=1.0, decay_mult=0.0),
    "lora_main_A": Rule(lr_mult=1.0, decay_mult=0.0),
    "lora_main_B": Rule(lr_mult=1.0, decay_mult=0.0),
    "lora_sub_A": Rule(lr_mult=0.5, decay_mult=0.0),
    "lora_sub_B": Rule(lr_mult=0.5, decay_mult=0.0),
}

# SoMA's custom_keys (docs/method.md §6.2): its adapters and biases fall under "backbone"
# (lr x 0.5, decayed); the embeddings are neither scaled nor decayed.
SOMA_RULES: Mapping[str, Rule] = {
    "backbone": Rule(lr_mult=0.5, decay_mult=1.0),
    "norm": Rule(decay_mult=0.0),
    "query_embed": Rule(lr_mult=1.0, decay_mult=0.0),
    "query_feat": Rule(lr_mult=1.0, decay_mult=0.0),
    "level_embed": Rule(lr_mult=1.0, decay_mult=0.0),
}
RULES_BY_KIND: Mapping[str, Mapping[str, Rule]] = {"recyclelora": RECIPE_RULES, "soma": SOMA_RULES}


def rules_for(kind: str) -> Mapping[str, Rule]:
    """The rule table of the recipes of an adapter kind ("recyclelora" or "soma")."""
    if kind not in RULES_BY_KIND:
        raise ValueError(f"no parameter rules for adapter kind {kind!r}")
    return RULES_BY_KIND[kind]


def rule_for(name: str, rules: Mapping[str, Rule]) -> tuple[str | None, Rule]:
    """The first key (longest first, ties alphabetical) contained in ``name``, and its rule."""
    for key in sorted(sorted(rules), key=len, reverse=True):
        if key in name:
            return key, rules[key]
    return None, DEFAULT


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    rules: Mapping[str, Rule] = RECIPE_RULES,
    norm_decay_mult: float | None = 0.0,
) -> list[dict]:
    """One group per matched rule (plus ``norm`` and ``default``), frozen parameters left out.

    Each group carries ``lr``, ``weight_decay``, the multipliers and the rule key as ``name``,
    so schedulers can rescale them and logs can say which group is which.
    """
    in_norm = {
        f"{mname}.{pname}" if mname else pname
        for mname, m in model.named_modules()
        if isinstance(m, NORM_LAYERS)
        for pname, _ in m.named_parameters(recurse=False)
    }
    groups: dict[str, dict] = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key, rule = rule_for(pname, rules)
        if key is None and norm_decay_mult is not None and pname in in_norm:
            key, rule = "norm layers", Rule(decay_mult=norm_decay_mult)
        gname = key or "default"
        if gname not in groups:
            groups[gname] = {
                "name": gname,
                "params": [],
                "lr": lr * rule.lr_mult,
                "weight_decay": weight_decay * rule.decay_mult,
                "lr_mult": rule.lr_mult,
                "decay_mult": rule.decay_mult,
            }
        groups[gname]["params"].append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return list(groups.values())
