"""AdamW parameter groups from a small declarative rule table (REFERENCE §3).

A rule applies to every trainable parameter whose qualified name contains its key; when several
keys match, the longest wins (the mmengine ``custom_keys`` convention the authors' config uses).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Rule:
    lr_mult: float = 1.0
    decay_mult: float = 1.0


DEFAULT = Rule()

RECIPE_RULES: Mapping[str, Rule] = {
    "lora_main": Rule(lr_mult=1.0, decay_mult=0.0),
    "lora_sub": Rule(lr_mult=0.5, decay_mult=0.0),
    "norm": Rule(decay_mult=0.0),
    "query_embed": Rule(decay_mult=0.0),
    "level_embed": Rule(decay_mult=0.0),
}


def rule_for(name: str, rules: Mapping[str, Rule]) -> tuple[str | None, Rule]:
    """The longest key of ``rules`` contained in ``name``, and its rule (``None``: default)."""
    matches = [k for k in rules if k in name]
    if not matches:
        return None, DEFAULT
    key = max(matches, key=len)
    return key, rules[key]


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    rules: Mapping[str, Rule] = RECIPE_RULES,
) -> list[dict]:
    """One group per matched rule (plus one for the rest), frozen parameters left out.

    Each group carries ``lr``, ``weight_decay``, the multipliers and the rule key as ``name``,
    so schedulers can rescale them and logs can say which group is which.
    """
    groups: dict[str, dict] = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key, rule = rule_for(pname, rules)
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
