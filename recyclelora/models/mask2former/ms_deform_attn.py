"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch, two equivalent samplers.

Sampling semantics are exactly mmcv's ``multi_scale_deformable_attn_pytorch`` (and CUDA kernel):
bilinear interpolation with zero padding outside the map and ``align_corners=False``, i.e. a
normalised location ``(x, y)`` in [0, 1] lands on pixel coordinate ``(x * W - 0.5, y * H - 0.5)``
(pixel ``i`` has its centre at ``(i + 0.5) / W``), and every bilinear corner outside the map
contributes zero.

* ``"grid_sample"``: one ``F.grid_sample`` per level. Fastest for training.
* ``"gather"``: floor / clamp / masks / a row gather (``index_select``) on the flattened value
  map and a small matmul. No ``GridSample`` node, so the ONNX graph runs under TensorRT (whose
  GridSample-based deformable attention is known to miscompile). No data-dependent Python control
  flow; the batch size stays dynamic under export, the spatial shapes become constants.

Both give the same forward values and the same gradients for value, locations and weights
(tests/test_ms_deform_attn.py). Switch a built model with :func:`set_deform_attn_impl`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Union, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DeformAttnImpl = Literal["grid_sample", "gather"]
DEFORM_ATTN_IMPLS: tuple[str, ...] = get_args(DeformAttnImpl)

SpatialShapes = Union[Tensor, Sequence[Sequence[int]]]  # noqa: UP007 (runtime alias, py3.10)

__all__ = [
    "DEFORM_ATTN_IMPLS",
    "DeformAttnImpl",
    "MSDeformAttn",
    "ms_deform_attn_sample",
    "ms_deform_attn_sample_gather",
    "ms_deform_attn_sample_grid_sample",
    "set_deform_attn_impl",
    "spatial_shapes_as_ints",
]


def _check_impl(impl: str) -> str:
    if impl not in DEFORM_ATTN_IMPLS:
        raise ValueError(
            f"unknown deformable-attention impl {impl!r}; pick one of {DEFORM_ATTN_IMPLS}"
        )
    return impl


def spatial_shapes_as_ints(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """``[(H_l, W_l), ...]`` as Python ints, from a list or an (L, 2) LongTensor.

    The level sizes decide tensor shapes (split sizes, views), so they must be Python ints; under
    tracing/export a tensor here becomes a constant, which is what we want (static image size,
    dynamic batch).
    """
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def _split_levels(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[list[tuple[int, int]], list[Tensor], Tensor, Tensor, int, int]:
    """Common reshaping: heads folded into the batch, math in at least float32.

    Pixel coordinates need float32: in bf16 ``loc * W`` is off by up to half a pixel at W = 128.
    Half/bf16 inputs are computed in float32 and the callers cast the result back (autocast runs
    ``grid_sample`` in float32 anyway). Returns shapes, per-level values (B, H*W, heads, C),
    locations (B*heads, Q, L, P, 2), weights (B*heads, Q, L, P), heads, C.
    """
    shapes = spatial_shapes_as_ints(spatial_shapes)
    num_heads, head_dim = value.shape[2], value.shape[3]
    if not torch.jit.is_tracing() and sampling_locations.shape[3] != len(shapes):
        raise ValueError(
            f"sampling_locations has {sampling_locations.shape[3]} levels, "
            f"spatial_shapes has {len(shapes)}"
        )
    dtype = torch.promote_types(value.dtype, torch.float32)
    values = value.to(dtype).split([h * w for h, w in shapes], dim=1)
    # (B, Q, heads, L, P, 2) -> (B*heads, Q, L, P, 2); same for the weights.
    locs = sampling_locations.to(dtype).transpose(1, 2).flatten(0, 1)
    weights = attention_weights.to(dtype).transpose(1, 2).flatten(0, 1)
    return shapes, list(values), locs, weights, num_heads, head_dim


def _merge_heads(out: Tensor, batch: int, num_heads: int) -> Tensor:
    """(B*heads, Q, C) -> (B, Q, heads*C)."""
    q, c = out.shape[1], out.shape[2]
    return out.reshape(batch, num_heads, q, c).permute(0, 2, 1, 3).reshape(batch, q, num_heads * c)


def ms_deform_attn_sample_grid_sample(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: Tensor | Sequence[int] | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Deformable sampling with ``F.grid_sample`` (bilinear, zeros padding, align_corners=False).

    Args:
        value: (B, S, heads, C_head), S = sum_l H_l * W_l, levels concatenated in order.
        spatial_shapes: [(H_l, W_l)] or LongTensor (L, 2).
        level_start_index: accepted for mmcv signature compatibility; the level offsets are
            derived from ``spatial_shapes`` (they are its cumulative sizes by definition).
        sampling_locations: (B, Q, heads, L, P, 2), normalised (x, y); outside [0, 1] allowed.
        attention_weights: (B, Q, heads, L, P).

    Returns:
        (B, Q, heads * C_head), dtype of ``value`` (computed in at least float32).
    """
    del level_start_index
    batch = value.shape[0]
    shapes, values, locs, weights, num_heads, head_dim = _split_levels(
        value, spatial_shapes, sampling_locations, attention_weights
    )
    grids = 2.0 * locs - 1.0  # grid_sample's [-1, 1] convention
    out: Tensor | None = None
    for lvl, (h, w) in enumerate(shapes):
        # (B, H*W, heads, C) -> (B*heads, C, H, W)
        v = values[lvl].permute(0, 2, 3, 1).reshape(-1, head_dim, h, w)
        # (B*heads, C, Q, P)
        sampled = F.grid_sample(
            v, grids[:, :, lvl], mode="bilinear", padding_mode="zeros", align_corners=False
        )
        part = (sampled * weights[:, None, :, lvl]).sum(-1)  # (B*heads, C, Q)
        out = part if out is None else out + part
    assert out is not None
    return _merge_heads(out.transpose(1, 2), batch, num_heads).to(value.dtype)


def _bilinear_corners(x: Tensor, y: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Flat indices and weights of the 4 bilinear corners of pixel coordinates ``(x, y)``.

    ``x``, ``y``: (...) pixel coordinates (already ``loc * size - 0.5``). Returns ``index`` (..., 4)
    int64 into a row-major (h, w) map, clamped in range, and ``weight`` (..., 4) that is zero for
    corners outside the map (so clamped indices never contribute).
    """
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    fx = x - x0  # floor has zero gradient: d/dx flows through fx, as in grid_sample's backward
    fy = y - y0
    x1 = x0 + 1
    y1 = y0 + 1
    dt = x.dtype
    wx0 = (1 - fx) * ((x0 >= 0) & (x0 <= w - 1)).to(dt)
    wx1 = fx * ((x1 >= 0) & (x1 <= w - 1)).to(dt)
    wy0 = (1 - fy) * ((y0 >= 0) & (y0 <= h - 1)).to(dt)
    wy1 = fy * ((y1 >= 0) & (y1 <= h - 1)).to(dt)
    ix0 = x0.clamp(0, w - 1).long()
    ix1 = x1.clamp(0, w - 1).long()
    row0 = y0.clamp(0, h - 1).long() * w
    row1 = y1.clamp(0, h - 1).long() * w
    index = torch.stack([row0 + ix0, row0 + ix1, row1 + ix0, row1 + ix1], dim=-1)
    weight = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], dim=-1)
    return index, weight


def ms_deform_attn_sample_gather(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: Tensor | Sequence[int] | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Deformable sampling from gathers and elementwise ops only (no ``grid_sample``).

    Same arguments, result and semantics as :func:`ms_deform_attn_sample_grid_sample`. Per level:
    4 corner indices (clamped) and weights (bilinear x in-bounds mask x attention weight), one
    row gather (``index_select`` on the flattened (B*heads*H*W, C) map; ONNX ``Gather``) of
    B*heads*Q*P*4 rows and a (1, P*4) @ (P*4, C) matmul per query. Peak extra memory is the
    gathered rows of one level.
    """
    del level_start_index
    batch = value.shape[0]
    shapes, values, locs, weights, num_heads, head_dim = _split_levels(
        value, spatial_shapes, sampling_locations, attention_weights
    )
    num_queries, num_points = locs.shape[1], locs.shape[3]
    out: Tensor | None = None
    for lvl, (h, w) in enumerate(shapes):
        # (B, H*W, heads, C) -> (B*heads, H*W, C)
        v = values[lvl].transpose(1, 2).reshape(-1, h * w, head_dim)
        loc = locs[:, :, lvl]  # (B*heads, Q, P, 2)
        index, corner_w = _bilinear_corners(loc[..., 0] * w - 0.5, loc[..., 1] * h - 0.5, h, w)
        corner_w = corner_w * weights[:, :, lvl, :, None]  # (B*heads, Q, P, 4)
        # one flat row index into (B*heads*H*W, C); arange over the (dynamic) B*heads dim
        base = torch.arange(v.shape[0], device=v.device).view(-1, 1, 1, 1) * (h * w)
        rows = v.reshape(-1, head_dim).index_select(0, (index + base).reshape(-1))
        rows = rows.reshape(-1, num_queries, num_points * 4, head_dim)  # (B*heads, Q, P*4, C)
        part = torch.matmul(corner_w.reshape(-1, num_queries, 1, num_points * 4), rows)
        part = part.reshape(-1, num_queries, head_dim)  # (B*heads, Q, C); no If node in ONNX
        out = part if out is None else out + part
    assert out is not None
    return _merge_heads(out, batch, num_heads).to(value.dtype)


def ms_deform_attn_sample(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: Tensor | Sequence[int] | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    impl: DeformAttnImpl = "grid_sample",
) -> Tensor:
    """Dispatch to the chosen sampler; shapes as :func:`ms_deform_attn_sample_grid_sample`."""
    fn = (
        ms_deform_attn_sample_grid_sample
        if _check_impl(impl) == "grid_sample"
        else ms_deform_attn_sample_gather
    )
    return fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with mmcv's ``MultiScaleDeformableAttention`` names.

    State-dict keys map 1:1 to mmcv's: ``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj`` (weight, bias each).

    Differences from mmcv, by design: this module is batch-first only and returns the projected
    attention output WITHOUT the residual and WITHOUT dropout (mmcv returns
    ``dropout(out) + identity``). The residual and dropout live in the caller
    (``MSDeformAttnEncoderLayer`` in ``pixel_decoder.py``), which keeps this module reusable for
    the decoder-style cross-attention where the identity differs from the query.

    ``impl`` ("grid_sample" | "gather") is a plain attribute: set it at construction, assign it
    later, or switch a whole model with :func:`set_deform_attn_impl`.
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 3,
        num_points: int = 4,
        impl: DeformAttnImpl = "grid_sample",
    ) -> None:
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f"embed_dims {embed_dims} not divisible by num_heads {num_heads}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.impl: DeformAttnImpl = _check_impl(impl)  # type: ignore[assignment]
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deformable-DETR / mmcv init: offsets start on a ring of directions, uniform weights.

        Head ``k`` points along angle ``2 pi k / heads`` (scaled so the larger |component| is 1),
        point ``p`` at distance ``p + 1`` pixels, on every level; attention logits all zero;
        value/output projections xavier-uniform with zero bias.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (
            2.0 * math.pi / self.num_heads
        )
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: SpatialShapes,
        level_start_index: Tensor | Sequence[int] | None = None,
        query_pos: Tensor | None = None,
        value_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from each query to ``num_points`` learned offsets around its reference point.

        Args:
            query: (B, Q, E) — offsets and weights come from ``query + query_pos``.
            reference_points: (B or 1, Q, L, 2) normalised (x, y) per level.
            value: (B, S, E), S = sum_l H_l * W_l (no positional encoding, as in mmcv).
            spatial_shapes: [(H_l, W_l)] or LongTensor (L, 2).
            level_start_index: unused (derived from ``spatial_shapes``); kept for mmcv parity.
            query_pos: (B or 1, Q, E) or None.
            value_padding_mask: (B, S) bool, True = padded key (zeroed), or None.

        Returns:
            (B, Q, E): ``output_proj(sampled)``; no residual, no dropout (see class docstring).
        """
        shapes = spatial_shapes_as_ints(spatial_shapes)
        if not torch.jit.is_tracing() and reference_points.shape[-1] != 2:
            raise ValueError("only point references (..., 2) are supported")
        if query_pos is not None:
            query = query + query_pos
        batch, num_query = query.shape[0], query.shape[1]
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.reshape(batch, -1, self.num_heads, self.embed_dims // self.num_heads)
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(batch, num_query, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_query, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_query, heads, levels, points)
        # offsets are in pixels of each level: divide by (W_l, H_l)
        offsets = offsets.to(torch.promote_types(offsets.dtype, torch.float32))
        normalizer = torch.tensor(
            [[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device
        )
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[:, None, :]
        out = ms_deform_attn_sample(v, shapes, level_start_index, locations, weights, self.impl)
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return (
            f"embed_dims={self.embed_dims}, num_heads={self.num_heads}, "
            f"num_levels={self.num_levels}, num_points={self.num_points}, impl={self.impl!r}"
        )


def set_deform_attn_impl(model: nn.Module, impl: DeformAttnImpl) -> int:
    """Switch every :class:`MSDeformAttn` inside ``model`` to ``impl``; returns how many.

    Parameters are untouched, so e.g. a model trained with "grid_sample" exports with "gather".
    Modules that carry their own ``deform_attn_impl`` attribute (the pixel decoder) are updated too.
    """
    _check_impl(impl)
    count = 0
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.impl = impl
            count += 1
        elif hasattr(module, "_deform_attn_impl"):
            module._deform_attn_impl = impl
    return count
