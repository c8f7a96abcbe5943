"""Recipes: the paper's settings (Table 8), command-line overrides, and a lossless round trip."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, is_dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest

from recyclelora.recipes import (
    RECIPES,
    Recipe,
    add_override_arguments,
    apply_overrides,
    flat_fields,
    from_dict,
    to_dict,
    to_json,
)


def _other(kind: Any, value: Any) -> Any:
    """A valid value of type ``kind`` that differs from ``value``."""
    origin = get_origin(kind)
    if origin is Literal:
        return next(c for c in get_args(kind) if c != value)
    if origin is tuple:
        inner = kind.__args__[0]
        if get_origin(inner) is Literal:  # the choices not taken (never empty here)
            return tuple(c for c in get_args(inner) if c not in value)
        return tuple(_other(inner, v) for v in value)
    if kind is bool:
        return not value
    if kind is int:
        return value + 1
    if kind is float:
        return value * 2
    if kind is str:
        return value + "_changed"
    raise AssertionError(f"no rule for a field of type {kind}: extend _other")


def _changed(obj: Any) -> Any:
    """``obj`` with every leaf field changed, built from the dataclass fields themselves."""
    hints = get_type_hints(type(obj))
    values = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        values[f.name] = _changed(value) if is_dataclass(value) else _other(hints[f.name], value)
    return type(obj)(**values)


def _as_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.fixture
def changed() -> Recipe:
    recipe = _changed(Recipe("syn2real"))
    default = flat_fields(Recipe("syn2real"))
    same = [k for k, (_, v) in flat_fields(recipe).items() if v == default[k][1]]
    assert not same, f"the generator left {same} at their defaults"
    return recipe


def test_recipes_match_table_8():
    s, r = RECIPES["syn2real"], RECIPES["real2real"]
    assert (s.adapters.main_rank, s.adapters.sub_rank, r.adapters.sub_rank) == (32, 4, 2)
    assert s.data.sources == ("gtav",) and s.data.targets == ("cityscapes", "bdd", "mapillary")
    assert r.data.sources == ("cityscapes",) and r.data.targets == ("bdd", "mapillary")
    for rec in (s, r):
        t = rec.train
        assert (t.iterations, t.batch_size, t.lr, t.weight_decay) == (40_000, 4, 1e-4, 0.05)
        assert (t.val_interval, t.ckpt_interval, t.keep_checkpoints) == (4000, 4000, 3)
        assert (t.precision, rec.eval.precision) == ("fp32", "fp32")  # the authors' precision
        assert (rec.eval.mode, rec.eval.crop, rec.eval.stride) == ("slide", 512, 341)
    assert RECIPES["gsu2cbm"].data.sources == ("gtav", "synthia", "urbansyn")
    assert RECIPES["syn2real_main_only"].adapters.sub_rank == 0
    assert RECIPES["syn2real_kaiming"].adapters.init == "kaiming"
    assert len({rec.work_dir for rec in RECIPES.values()}) == len(RECIPES)


def test_round_trip_keeps_every_field(changed):
    """A recipe whose every leaf differs from the defaults survives to_dict / JSON / from_dict."""
    assert from_dict(to_dict(changed)) == changed
    assert from_dict(json.loads(to_json(changed))) == changed


def test_every_field_can_be_overridden(changed):
    """``--section.field text`` for every leaf reaches the recipe, eval section included."""
    base = Recipe("syn2real")
    parser = argparse.ArgumentParser()
    add_override_arguments(parser, base)
    argv = []
    for key, (_, value) in flat_fields(changed).items():
        if key != "name":  # the recipe is chosen by name, not overridden
            argv += [f"--{key}", _as_text(value)]
    got = apply_overrides(base, parser.parse_args(argv))
    assert to_dict(got) == {**to_dict(changed), "name": "syn2real"}


def test_overrides_leave_the_preset_alone_and_bad_ones_raise():
    base = RECIPES["syn2real"]
    parser = argparse.ArgumentParser()
    add_override_arguments(parser, base)
    args = ["--train.lr", "2e-4", "--adapters.sub_rank", "2", "--data.targets", "bdd"]
    r = apply_overrides(base, parser.parse_args([*args, "--adapters.init", "svd"]))
    assert (r.train.lr, r.adapters.sub_rank, r.data.targets, r.adapters.init) == (
        2e-4,
        2,
        ("bdd",),
        "svd",
    )
    assert base.train.lr == 1e-4 and base.adapters.init == "rrqr"  # the preset is untouched
    bad = {
        "--adapters.init pissa": "invalid recipe: adapters.init must be",
        "--train.iterations many": "--train.iterations: invalid literal",
        "--train.deterministic maybe": "--train.deterministic: expected true/false",
        "--eval.mode wide": "invalid recipe: eval.mode must be among 'slide', 'whole'",
        "--eval.precision fp8": "invalid recipe: eval.precision must be among",
        "--data.targets bdd,kitti": "data.targets must be among .*got 'kitti'",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message):  # not SystemExit: library code
            apply_overrides(base, parser.parse_args(text.split()))


def test_from_dict_checks_what_it_reads():
    d = to_dict(RECIPES["real2real"])
    with pytest.raises(ValueError, match="unknown field.*eval.strides"):
        from_dict({**d, "eval": {**d["eval"], "strides": 3}})
    with pytest.raises(ValueError, match="train.lr must be float"):
        from_dict({**d, "train": {**d["train"], "lr": "fast"}})
    with pytest.raises(ValueError, match="data.sources must be a list"):
        from_dict({**d, "data": {**d["data"], "sources": "cityscapes"}})
    # a recipe saved before a field existed takes that field's default
    older = {**d, "train": {k: v for k, v in d["train"].items() if k != "deterministic"}}
    assert from_dict(older) == RECIPES["real2real"]
