"""Named training recipes (docs/method.md §3, paper Table 8) and command-line overrides.

A recipe is plain data: ``Recipe`` with nested ``data``, ``train`` and ``eval`` sections and the
adapters' config (``RecycleLoRAConfig``, or ``SoMAConfig`` for the SoMA baseline: its ``kind``
travels in the dict). Every field can be overridden as ``--section.field value``
(tuples as comma-separated lists); the resolved recipe is printed and saved with the run, and
:func:`from_dict` rebuilds it from the dataclass fields themselves, so no section can be left out.
Fields typed ``Literal[...]`` only take their listed values. Invalid values raise ``ValueError``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from .adapters.config import AdapterConfig, RecycleLoRAConfig, SoMAConfig, config_class

DatasetName = Literal["gtav", "synthia", "urbansyn", "cityscapes", "bdd", "mapillary"]
Precision = Literal["fp32", "bf16", "fp16"]
CITYSCAPES_BDD_MAPILLARY: tuple[DatasetName, ...] = ("cityscapes", "bdd", "mapillary")
# dataset name -> its folder under DataConfig.root (the folder names of Rein's configs)
DATASET_DIRS: dict[DatasetName, str] = {
    "gtav": "gta",
    "synthia": "synthia",
    "urbansyn": "urbansyn",
    "cityscapes": "cityscapes",
    "bdd": "bdd100k",
    "mapillary": "mapillary",
}


def _check_choices(section: Any) -> None:
    """Raise ValueError for a ``Literal`` field (or tuple of them) holding another value."""
    for name, kind in get_type_hints(type(section)).items():
        value = getattr(section, name)
        if get_origin(kind) is tuple:
            kind, values = kind.__args__[0], value
        else:
            values = (value,)
        if get_origin(kind) is Literal:
            wrong = [v for v in values if v not in get_args(kind)]
            if wrong:
                choices = ", ".join(map(repr, get_args(kind)))
                raise ValueError(f"{name} must be among {choices}, got {wrong[0]!r}")


@dataclass
class DataConfig:
    root: str = "data"  # holds one folder per dataset, named as in DATASET_DIRS
    sources: tuple[DatasetName, ...] = ("gtav",)
    targets: tuple[DatasetName, ...] = CITYSCAPES_BDD_MAPILLARY
    gtav_subset: int = 12403  # fresh random subset of GTAV per pass (0 = all images)
    crop: int = 512
    workers: int = 4

    def __post_init__(self) -> None:
        _check_choices(self)


@dataclass
class TrainConfig:
    iterations: int = 40_000
    batch_size: int = 4  # global: split over DDP ranks
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    wd_min: float = 1e-5  # cosine-annealed weight decay, as SoMA
    poly_power: float = 0.9
    val_interval: int = 4_000
    ckpt_interval: int = 4_000
    keep_checkpoints: int = 3
    log_interval: int = 50
    # "fp32" as the authors (no autocast; PyTorch's default TF32 settings); "bf16" or "fp16"
    # autocast on a GPU for speed (docs/method.md §3). CPU runs fp32 whatever is asked.
    precision: Precision = "fp32"
    deterministic: bool = False  # torch.use_deterministic_algorithms on a GPU (slower)
    seed: int = 0
    # EMA of the weights, as mmengine's ExponentialMovingAverage (SoMA's recipe, docs/method.md
    # §6.3): after iteration ema_begin, average = (1 - m) average + m weights every iteration;
    # validation, checkpoints' weights and the adapters file use the average
    ema: bool = False
    ema_momentum: float = 2e-4
    ema_begin: int = 12_000

    def __post_init__(self) -> None:
        _check_choices(self)
        if not 0 < self.ema_momentum < 1:
            raise ValueError(f"ema_momentum must lie in (0, 1), got {self.ema_momentum}")
        if self.ema_begin < 0:
            raise ValueError(f"ema_begin must be >= 0, got {self.ema_begin}")
        if self.ema and self.ema_begin > self.iterations:
            raise ValueError(
                f"ema_begin {self.ema_begin} exceeds iterations {self.iterations}: the EMA would "
                "never start; lower --train.ema_begin"
            )


@dataclass
class EvalConfig:
    mode: Literal["slide", "whole"] = "slide"  # docs/method.md §2 test mode
    crop: int = 512
    stride: int = 341
    precision: Precision = "fp32"  # validation during training and evaluate.py alike

    def __post_init__(self) -> None:
        _check_choices(self)


@dataclass
class Recipe:
    name: str
    model: str = "dinov2_large_mask2former"
    backbone_weights: str = "weights/dinov2_vitl14_pretrain.pth"  # "" = random init (demo)
    adapters: AdapterConfig = field(default_factory=RecycleLoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    work_dir: str = ""  # default: runs/<name>

    def __post_init__(self) -> None:
        if not self.work_dir:
            self.work_dir = f"runs/{self.name}"


def _syn2real(**adapters: Any) -> Recipe:
    return Recipe(
        "syn2real", adapters=RecycleLoRAConfig(**{"main_rank": 32, "sub_rank": 4, **adapters})
    )


RECIPES: dict[str, Recipe] = {
    # G -> C, B, M with 32/4 [Table 3]
    "syn2real": _syn2real(),
    # C -> B, M with 32/2 [Table 4]
    "real2real": Recipe(
        "real2real",
        adapters=RecycleLoRAConfig(32, 2),
        data=DataConfig(sources=("cityscapes",), targets=("bdd", "mapillary")),
    ),
    # multi-source [Table 3]: each source whole except GTAV (subset rule)
    "gs2cbm": Recipe("gs2cbm", data=DataConfig(sources=("gtav", "synthia"))),
    "gsu2cbm": Recipe("gsu2cbm", data=DataConfig(sources=("gtav", "synthia", "urbansyn"))),
    # ablations [Tables 5, 12]; init and ranks are also overridable on any recipe
    "syn2real_main_only": replace(_syn2real(sub_rank=0), name="syn2real_main_only"),
    "syn2real_sub_only": replace(_syn2real(main_rank=0), name="syn2real_sub_only"),
    "syn2real_svd": replace(_syn2real(init="svd"), name="syn2real_svd"),
    "syn2real_kaiming": replace(_syn2real(init="kaiming"), name="syn2real_kaiming"),
    # the SoMA baseline [docs/method.md §6]: its adapters, parameter rules and EMA
    "soma": Recipe("soma", adapters=SoMAConfig(), train=TrainConfig(ema=True)),
    "soma_real2real": Recipe(
        "soma_real2real",
        adapters=SoMAConfig(),
        data=DataConfig(sources=("cityscapes",), targets=("bdd", "mapillary")),
        train=TrainConfig(ema=True),
    ),
}
for _name, _r in RECIPES.items():
    _r.work_dir = f"runs/{_name}"


#: DINOv2-L's depth: the block numbers of the recipes count its blocks
FULL_DEPTH = 24


def shrink(recipe: Recipe, iterations: int, depth: int) -> Recipe:
    """``recipe`` for ``iterations`` on a backbone of ``depth`` blocks (the demo): what counts
    iterations or blocks keeps its fraction of the run and of the depth — the EMA's first
    iteration and its horizon (``1 / momentum`` iterations), SoMA's first adapted block (8 of 24
    -> 1 of 4)."""
    t = recipe.train
    factor = t.iterations / iterations
    train = replace(
        t,
        iterations=iterations,
        ema_begin=round(t.ema_begin / factor),
        ema_momentum=min(t.ema_momentum * factor, 0.5),
    )
    adapters = recipe.adapters
    if isinstance(adapters, SoMAConfig):
        adapters = replace(adapters, first_block=adapters.first_block * depth // FULL_DEPTH)
    return replace(recipe, adapters=adapters, train=train)


def replace_data_root(recipe: Recipe, root: str) -> Recipe:
    return replace(recipe, data=replace(recipe.data, root=str(root)))


def dataset_root(recipe: Recipe, name: str) -> Path:
    return Path(recipe.data.root) / DATASET_DIRS[name]


def to_dict(obj: Any) -> Any:
    """A JSON-able nested dict of a recipe (an adapter config with its ``kind``)."""
    if isinstance(obj, (RecycleLoRAConfig, SoMAConfig)):
        return {"kind": obj.kind, **{f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}}
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def to_json(recipe: Recipe) -> str:
    return json.dumps(to_dict(recipe), indent=2)


def flat_fields(obj: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{"train.lr": (type, value), ...}`` for every leaf field."""
    out = {}
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            out.update(flat_fields(value, key + "."))
        else:
            out[key] = (hints[f.name], value)
    return out


def parse_value(kind: Any, text: str) -> Any:
    origin = getattr(kind, "__origin__", None)
    if origin is tuple:
        inner = kind.__args__[0]
        return tuple(parse_value(inner, t) for t in text.split(",") if t != "")
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if kind in (int, float, str):
        return kind(text)
    return text  # Literal[...] and str-like: validated by the dataclass itself


def add_override_arguments(parser: argparse.ArgumentParser, base: Recipe) -> None:
    group = parser.add_argument_group("recipe overrides (defaults shown for the chosen recipe)")
    for key, (_, value) in flat_fields(base).items():
        if key == "name":
            continue
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        group.add_argument(
            f"--{key}", dest=f"override:{key}", metavar="V", help=f"(default: {shown})"
        )


def apply_overrides(recipe: Recipe, args: argparse.Namespace) -> Recipe:
    """A copy of ``recipe`` with every ``--section.field`` given on the command line."""
    flat = flat_fields(recipe)
    data = to_dict(recipe)
    for dest, text in vars(args).items():
        if not dest.startswith("override:") or text is None:
            continue
        key = dest.split(":", 1)[1]
        kind, _ = flat[key]
        try:
            value = parse_value(kind, text)
        except ValueError as e:
            raise ValueError(f"--{key}: {e}") from None
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return from_dict(data)


def from_dict(d: dict) -> Recipe:
    """Inverse of ``to_dict``: rebuilds (and so re-validates) a recipe, section by section from
    the dataclass fields. A field missing from ``d`` takes its default; an unknown one raises."""
    try:
        return _build(Recipe, d, "")
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid recipe: {e}") from None


def _build(cls: type, d: Any, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise TypeError(f"{prefix.rstrip('.') or 'a recipe'} must be a mapping, got {d!r}")
    hints = get_type_hints(cls)
    unknown = sorted(d.keys() - hints.keys())
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(prefix + k for k in unknown)}")
    values = {}
    for key, value in d.items():
        kind = hints[key]
        if kind == AdapterConfig:
            values[key] = _build_adapters(value, f"{prefix}{key}.")
        elif is_dataclass(kind):
            values[key] = _build(kind, value, f"{prefix}{key}.")
        else:
            values[key] = _leaf(kind, value, prefix + key)
    try:
        return cls(**values)
    except ValueError as e:  # a section's own check: say which section
        raise ValueError(f"{prefix}{e}") from None


def _build_adapters(d: Any, prefix: str) -> AdapterConfig:
    """The adapter config its ``kind`` names (RecycleLoRA's when it names none)."""
    if not isinstance(d, dict):
        raise TypeError(f"{prefix.rstrip('.')} must be a mapping, got {d!r}")
    rest = dict(d)
    kind = rest.pop("kind", RecycleLoRAConfig.kind)
    try:
        cls = config_class(kind)
    except ValueError as e:
        raise ValueError(f"{prefix}kind: {e}") from None
    return _build(cls, rest, prefix)


def _leaf(kind: Any, value: Any, key: str) -> Any:
    """``value`` as a field of type ``kind`` (JSON lists become tuples), or TypeError."""
    if get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{key} must be a list, got {value!r}")
        return tuple(_leaf(kind.__args__[0], v, key) for v in value)
    if get_origin(kind) is Literal:
        kind = type(get_args(kind)[0])  # the values themselves are checked by the section
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(kind, True)
    if not ok:
        raise TypeError(f"{key} must be {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


__all__ = [
    "RECIPES",
    "DATASET_DIRS",
    "DataConfig",
    "EvalConfig",
    "Recipe",
    "TrainConfig",
    "add_override_arguments",
    "apply_overrides",
    "dataset_root",
    "replace_data_root",
    "shrink",
    "from_dict",
    "to_json",
]
