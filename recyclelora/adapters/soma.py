"""``SoMALinear``: SoMA's adapted layer, the baseline (docs/method.md §6).

One adapter initialised from the layer's minor singular triplets; on a fused ``qkv`` layer one
per row block (q, k, v), each from the SVD of its own block, as SoMA adapts DINOv2's separate
q, k and v projections. The layer stays one ``nn.Linear``-shaped module (block-diagonal in the
output rows), so merging gives the plain ``qkv`` weight. Its bias trains with the adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import SoMAConfig
from .init import Factors, soma_factors
from .layer import AdaptedLinear
from .names import QKV_ADAPTERS

#: the last name component of a fused q/k/v projection (DINOv2's ``attn.qkv``)
FUSED_QKV = "qkv"


class SoMALinear(AdaptedLinear):
    """``y = x W_res^T + b + s Σ_blocks x A^T B^T`` with ``s = alpha / rank`` (docs/method.md §6.1).

    ``split=1``: one adapter ``main`` on all rows. ``split=3``: adapters ``q``, ``k`` and ``v``
    on the three equal row blocks, in that order.
    """

    trains_bias = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        split: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if split == 1:
            names, rows = ("main",), None
        elif split == len(QKV_ADAPTERS) and out_features % split == 0:
            names, n = QKV_ADAPTERS, out_features // split
            rows = {name: (i * n, (i + 1) * n) for i, name in enumerate(names)}
        else:
            raise ValueError(
                f"split must be 1, or 3 on a layer whose outputs divide by 3; got {split} on "
                f"{out_features} outputs"
            )
        super().__init__(
            in_features,
            out_features,
            dict.fromkeys(names, rank),
            alpha / rank,
            rows,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.alpha = alpha
        self.split = split

    @classmethod
    def shaped_like(cls, linear: nn.Linear, config: SoMAConfig, name: str = "") -> SoMALinear:
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            config.rank,
            config.alpha,
            split=len(QKV_ADAPTERS) if name.rpartition(".")[2] == FUSED_QKV else 1,
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        layer.init_kind = config.init
        return layer

    def initial_factors_of(
        self, weight: torch.Tensor, config: SoMAConfig, generator: torch.Generator | None = None
    ) -> dict[str, Factors]:
        return {
            name: soma_factors(weight[lo:hi], self.ranks[name], self.scaling)
            for name, (lo, hi) in self.rows.items()
        }
