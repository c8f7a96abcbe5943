"""The one object that says how a model is adapted: RecycleLoRA's, or SoMA's (the baseline)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Literal

InitKind = Literal["rrqr", "svd", "kaiming"]


@dataclass(frozen=True)
class RecycleLoRAConfig:
    """Dual-adapter settings (docs/method.md §1).

    main_rank: rank of the main adapter, initialised from the minor RRQR directions.
    sub_rank: rank of the sub adapter, initialised from the major RRQR directions.
    alpha: the scaling is ``alpha / (main_rank + sub_rank)``; the authors use 1.
    init: "rrqr" (the paper), "svd" (SoMA-style minor / PiSSA-style major singular triplets) or
        "kaiming" (standard LoRA: Kaiming-uniform A, zero B) — the ablations of Tables 3 and 12.
    target_modules: an ``nn.Linear`` is adapted when the last component of its qualified name is
        one of these (DINOv2: ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``).
    qr_dtype: precision of RRQR's pivoted QR. "float32" (LAPACK sgeqp3, one BLAS thread) is the
        authors' arithmetic and selects their pivots. "float64" (dgeqp3, about 2x slower) may
        select other trailing pivots, i.e. other main-adapter columns: near-tied trailing
        pivots follow rounding (and BLAS threads). The output at initialisation is unchanged
        either way.
    """

    kind: ClassVar[str] = "recyclelora"
    main_rank: int = 32
    sub_rank: int = 4
    alpha: float = 1.0
    init: InitKind = "rrqr"
    target_modules: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")
    qr_dtype: Literal["float32", "float64"] = "float32"

    def __post_init__(self) -> None:
        if self.main_rank < 0 or self.sub_rank < 0:
            raise ValueError(f"ranks must be >= 0, got main={self.main_rank} sub={self.sub_rank}")
        if self.main_rank + self.sub_rank == 0:
            raise ValueError("main_rank + sub_rank must be > 0: there would be nothing to train")
        if self.init not in ("rrqr", "svd", "kaiming"):
            raise ValueError(f"init must be 'rrqr', 'svd' or 'kaiming', got {self.init!r}")
        if self.qr_dtype not in ("float32", "float64"):
            raise ValueError(f"qr_dtype must be 'float32' or 'float64', got {self.qr_dtype!r}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scaling(self) -> float:
        return self.alpha / (self.main_rank + self.sub_rank)

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RecycleLoRAConfig:
        return _from_dict(cls, d)


@dataclass(frozen=True)
class SoMAConfig:
    """SoMA's adapters, the baseline (docs/method.md §6).

    One adapter per layer, initialised from the layer's ``rank`` minor singular triplets
    (float32 SVD); a fused ``qkv`` layer gets three, one per row block (q, k, v), each from the
    SVD of its own block. The biases of the adapted layers train too.

    rank: of every adapter. alpha: the scaling is ``alpha / rank`` (16 / 16 = 1 for SoMA).
    first_block: blocks ``0 .. first_block - 1`` carry no adapter (SoMA leaves DINOv2-L's first
        8 untouched); a layer is in block i when the first integer in its name is i.
    target_modules: as :class:`RecycleLoRAConfig`.
    """

    kind: ClassVar[str] = "soma"
    init: ClassVar[str] = "soma-svd"
    rank: int = 16
    alpha: float = 16.0
    first_block: int = 8
    target_modules: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"rank must be > 0, got {self.rank}")
        if self.first_block < 0:
            raise ValueError(f"first_block must be >= 0, got {self.first_block}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SoMAConfig:
        return _from_dict(cls, d)


AdapterConfig = RecycleLoRAConfig | SoMAConfig
CONFIG_KINDS: dict[str, type[RecycleLoRAConfig] | type[SoMAConfig]] = {
    c.kind: c for c in (RecycleLoRAConfig, SoMAConfig)
}


def config_class(kind: str) -> type[RecycleLoRAConfig] | type[SoMAConfig]:
    if kind not in CONFIG_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; expected one of {sorted(CONFIG_KINDS)}")
    return CONFIG_KINDS[kind]


def config_from_dict(d: dict) -> AdapterConfig:
    """Either config from its ``to_dict()``; a dict without ``kind`` (files written before SoMA
    existed) is RecycleLoRA's."""
    return config_class(d.get("kind", RecycleLoRAConfig.kind)).from_dict(d)


def _to_dict(config: AdapterConfig) -> dict:
    return {"kind": config.kind, **asdict(config)}


def _from_dict(cls: type, d: dict):
    d = dict(d)
    kind = d.pop("kind", cls.kind)
    if kind != cls.kind:
        raise ValueError(f"a {kind!r} adapter config is not a {cls.__name__}")
    return cls(**{**d, "target_modules": tuple(d.get("target_modules", cls.target_modules))})
