"""Adapted linear layers: a frozen residual plus trainable low-rank adapters.

``AdaptedLinear`` holds what both kinds share; ``RecycleLoRALinear`` (two adapters) is defined
here, SoMA's layer in ``soma``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig, RecycleLoRAConfig
from .init import Factors, initial_factors
from .names import ADAPTERS, tensor_name

UNMERGE_TO_TRAIN = (
    "backward through a merged adapted layer: its merged weight is an inference cache that "
    "gradients cannot flow through to the adapters. Unmerge before training: "
    "unmerge_recyclelora(model), or layer.unmerge() on one layer"
)


class _RefuseBackward(torch.autograd.Function):
    """Passes the merged weight through; fails the backward pass, which would otherwise leave
    the adapters silently without gradients. The sources are inputs only to be seen by autograd."""

    @staticmethod
    def forward(ctx, merged: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
        return merged.view_as(merged)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> None:
        raise RuntimeError(UNMERGE_TO_TRAIN)


def _fingerprint(tensors: list[torch.Tensor]) -> tuple:
    """What changes when a tensor is replaced or converted (``.to()``: new storage) or updated in
    place (an optimizer step or ``load_state_dict`` bumps ``_version``); writes through ``.data``
    do not."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


class AdaptedLinear(nn.Module):
    """A linear layer as a frozen residual plus trainable low-rank adapters: what both adapter
    kinds share (residual, forward, merge, initial-factor bookkeeping).

    Parameters (state_dict keys): ``weight`` (d, k) the frozen residual, ``bias`` (d,),
    ``lora_<adapter>_A`` (r, k) and ``lora_<adapter>_B`` (rows, r) trainable. Each adapter adds
    ``s B A`` to a block of output rows: all d rows (RecycleLoRA's two adapters), or its own
    block (SoMA's q, k and v adapters of a fused qkv layer, block-diagonal in the rows). The
    buffers ``lora_<adapter>_{A0,B0}`` keep the initial factors: they define the residual
    (``W_res = W0 - s Σ B0 A0``), so adapters can be re-attached to a fresh base model. An adapter
    of rank 0 has no tensors.

    The forward runs all adapters as one branch (their factors stacked); the parameters stay
    separate, as they may train at different learning rates.

    ``merge()`` switches to a single linear with the cached ``W_res + s Σ B A``. The cache is
    rebuilt on the next forward whenever a tensor it was summed from has changed, and a backward
    pass through it raises (unmerge to train). The training tensors are untouched, so
    ``unmerge()`` restores the training state bit-exactly.
    """

    #: whether the bias trains with the adapters (SoMA's ``bias="all"``)
    trains_bias: bool = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ranks: dict[str, int],
        scaling: float,
        rows: dict[str, tuple[int, int]] | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``rows``: each adapter's output rows ``[start, stop)``, disjoint and in order; None:
        every adapter spans all rows."""
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.ranks = dict(ranks)
        self.scaling = scaling
        self.block_diagonal = rows is not None
        self.rows = dict(rows) if rows is not None else {n: (0, out_features) for n in ranks}
        self.init_kind = "unset"
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), False)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), False) if bias else None
        for name, r in self.ranks.items():
            if r == 0:
                continue
            lo, hi = self.rows[name]
            for part, shape in (("A", (r, in_features)), ("B", (hi - lo, r))):
                self.register_parameter(
                    tensor_name(name, part), nn.Parameter(torch.empty(shape, **kw))
                )
                self.register_buffer(
                    tensor_name(name, part, initial=True), torch.empty(shape, **kw)
                )
        self._merged = False
        self.register_buffer("merged_weight", None, persistent=False)
        self._merged_from: tuple | None = None  # _fingerprint of merged_weight's sources

    @classmethod
    def shaped_like(cls, linear: nn.Linear, config: AdapterConfig, name: str = "") -> AdaptedLinear:
        """``linear`` (qualified ``name`` in its model) adapted by ``config``: shapes only,
        uninitialised tensors."""
        raise NotImplementedError

    def initial_factors_of(
        self, weight: torch.Tensor, config: AdapterConfig, generator: torch.Generator | None
    ) -> dict[str, Factors]:
        """``{adapter: (B0, A0) or None}`` from the pre-trained ``weight``."""
        raise NotImplementedError

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        config: AdapterConfig,
        generator: torch.Generator | None = None,
        initialize: bool = True,
        name: str = "",
    ) -> AdaptedLinear:
        """Adapt a pre-trained ``nn.Linear``; its output is unchanged at initialisation.

        On the meta device, or with ``initialize=False`` (a state_dict will be loaded next), only
        shapes are built: no decomposition, uninitialised tensors.
        """
        layer = cls.shaped_like(linear, config, name)
        w = linear.weight
        if w.is_meta or not initialize:
            return layer
        layer.reset_to_initial(w, linear.bias, layer.initial_factors_of(w, config, generator))
        return layer

    @torch.no_grad()
    def reset_to_initial(
        self, base_weight: torch.Tensor, base_bias: torch.Tensor | None, factors: dict[str, Factors]
    ) -> None:
        """Set ``A = A0``, ``B = B0`` and the residual ``W0 - s Σ B0 A0`` (summed in float64)."""
        delta = torch.zeros(base_weight.shape, dtype=torch.float64, device=base_weight.device)
        for name, pair in factors.items():
            if (pair is None) != (self.ranks[name] == 0):
                raise ValueError(f"{name} adapter: factors do not match rank {self.ranks[name]}")
            if pair is None:
                continue
            b0, a0 = pair
            for part, t in (("A", a0), ("B", b0)):
                getattr(self, tensor_name(name, part)).copy_(t)
                getattr(self, tensor_name(name, part, initial=True)).copy_(t)
            # from the stored (layer-dtype) factors, so a re-attached layer gets the same bits
            b0, a0 = (getattr(self, tensor_name(name, p, initial=True)) for p in "BA")
            lo, hi = self.rows[name]
            delta[lo:hi] += b0.double() @ a0.double()
        self.weight.copy_(base_weight.double() - self.scaling * delta)
        if self.bias is not None:
            self.bias.copy_(base_bias)
        self.merged_weight = None

    def adapter_pairs(self, initial: bool = False) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """``[(name, B (rows, r), A (r, k))]`` for the adapters of non-zero rank."""
        return [
            (
                n,
                getattr(self, tensor_name(n, "B", initial)),
                getattr(self, tensor_name(n, "A", initial)),
            )
            for n in self.ranks
            if self.ranks[n]
        ]

    def delta_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``s Σ B A`` (d, k), each product on its rows: what the adapters add to the residual."""
        delta = torch.zeros(self.weight.shape, dtype=dtype, device=self.weight.device)
        for name, b, a in self.adapter_pairs():
            lo, hi = self.rows[name]
            delta[lo:hi] += b.to(dtype) @ a.to(dtype)
        return self.scaling * delta

    def stacked_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B (d, Σr), A (Σr, k))``: all adapters as one pair. Adapters on all rows stack B side
        by side (``B_main A_main + B_sub A_sub = [B_main B_sub] [A_main; A_sub]``); adapters on
        consecutive row blocks make B block-diagonal."""
        pairs = self.adapter_pairs()
        if len(pairs) == 1 and not self.block_diagonal:
            return pairs[0][1], pairs[0][2]
        bs = [b for _, b, _ in pairs]
        b = torch.block_diag(*bs) if self.block_diagonal else torch.cat(bs, dim=1)
        return b, torch.cat([a for _, _, a in pairs])

    @torch.no_grad()
    def merged(self) -> torch.Tensor:
        """``W_res + s Σ B A`` in the layer's dtype, summed in float64."""
        return (self.weight.double() + self.delta_weight()).to(self.weight.dtype)

    def merge(self) -> None:
        """Serve the merged weight from now on. It is always rebuilt here: the way to refresh it
        after writes that its staleness check cannot see (through ``.data``)."""
        self._merged = True
        self.merged_weight = None
        self._refresh_merged_weight()

    def unmerge(self) -> None:
        self._merged = False
        self.merged_weight = None

    def _refresh_merged_weight(self) -> list[torch.Tensor]:
        """Rebuild ``merged_weight`` if a tensor it is summed from changed; returns those."""
        sources = [self.weight] + [t for _, b, a in self.adapter_pairs() for t in (b, a)]
        fingerprint = _fingerprint(sources)
        if self.merged_weight is None or self._merged_from != fingerprint:
            self.merged_weight = self.merged()
            self._merged_from = fingerprint
        return sources

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        # the cached merged weight is about to be stale: free it now, rebuild on the next forward
        self.merged_weight = None
        super()._load_from_state_dict(state_dict, prefix, *args)

    @torch.no_grad()
    def set_initial_factors(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Record ``{adapter: (B0 (d, r), A0 (r, k))}`` as the origin of the current residual.

        Only the bookkeeping buffers change: the residual and the trainable factors stay, so the
        layer's output does not. For checkpoints that carry a residual but not its factors,
        once they have been reconstructed from the base weights.
        """
        for name, (b0, a0) in factors.items():
            r = self.ranks[name]
            lo, hi = self.rows[name]
            if tuple(b0.shape) != (hi - lo, r) or tuple(a0.shape) != (r, self.in_features):
                raise ValueError(
                    f"{name} adapter: initial factors of shapes {tuple(b0.shape)} and "
                    f"{tuple(a0.shape)} do not fit a rank-{r} {hi - lo}x{self.in_features} "
                    "adapter"
                )
            getattr(self, tensor_name(name, "B", initial=True)).copy_(b0)
            getattr(self, tensor_name(name, "A", initial=True)).copy_(a0)

    @torch.no_grad()
    def forget_initial_factors(self) -> None:
        """Mark the initial factors unknown (NaN): ``save_adapters`` then refuses this layer,
        which cannot be re-attached to a base model without them."""
        for _, b0, a0 in self.adapter_pairs(initial=True):
            b0.fill_(float("nan"))
            a0.fill_(float("nan"))

    @property
    def initial_factors_known(self) -> bool:
        """False when ``lora_*_A0/B0`` hold NaN: the layer was loaded from a checkpoint without
        them (e.g. the authors' mmseg files), so its residual's origin cannot be re-derived."""
        return all(
            bool(torch.isfinite(t).all())
            for _, b, a in self.adapter_pairs(initial=True)
            for t in (b, a)
        )

    @property
    def is_merged(self) -> bool:
        return self._merged

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the merged weight: the base layer's shapes and keys."""
        w = self.weight
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, w.device, w.dtype
        )
        linear.weight = nn.Parameter(self.merged() if not w.is_meta else w.clone(), False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., k) -> (..., d)."""
        if self._merged:
            sources = self._refresh_merged_weight()
            return F.linear(x, _RefuseBackward.apply(self.merged_weight, *sources), self.bias)
        b, a = self.stacked_factors()
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, a) * self.scaling, b)

    def adapter_numel(self) -> int:
        return sum(a.numel() + b.numel() for _, b, a in self.adapter_pairs())

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}_rank={r}" for n, r in self.ranks.items())
        return (
            f"in={self.in_features}, out={self.out_features}, {ranks}, "
            f"scaling={self.scaling:.4g}, init={self.init_kind}, merged={self.is_merged}"
        )


class RecycleLoRALinear(AdaptedLinear):
    """``y = x W_res^T + b + s (x A_main^T B_main^T + x A_sub^T B_sub^T)`` (docs/method.md §1.3):
    the main and sub adapters on all rows, ``s = alpha / (r_main + r_sub)``, bias frozen."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        main_rank: int,
        sub_rank: int,
        alpha: float = 1.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        ranks = dict(zip(ADAPTERS, (main_rank, sub_rank), strict=True))
        scaling = alpha / (main_rank + sub_rank)
        super().__init__(
            in_features, out_features, ranks, scaling, bias=bias, device=device, dtype=dtype
        )
        self.alpha = alpha

    @classmethod
    def shaped_like(
        cls, linear: nn.Linear, config: RecycleLoRAConfig, name: str = ""
    ) -> RecycleLoRALinear:
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            config.main_rank,
            config.sub_rank,
            config.alpha,
            bias=linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        layer.init_kind = config.init
        return layer

    def initial_factors_of(
        self,
        weight: torch.Tensor,
        config: RecycleLoRAConfig,
        generator: torch.Generator | None = None,
    ) -> dict[str, Factors]:
        main, sub = initial_factors(
            weight,
            config.main_rank,
            config.sub_rank,
            config.init,
            self.scaling,
            config.qr_dtype,
            generator,
        )
        return {"main": main, "sub": sub}
