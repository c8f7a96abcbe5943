"""Mask2Former's deformable-attention pixel decoder (mmdet 3.x ``MSDeformAttnPixelDecoder``).

Configuration reproduced (docs/method.md §2, the authors' mmseg 1.x config): inputs 4 maps of 1024
channels at strides 4/8/16/32; the 3 coarsest (32, 16, 8) are projected to 256 channels
(1x1 conv + GroupNorm(32)), flattened, and refined by a 6-layer deformable-attention encoder
(256 dims, 8 heads, 3 levels, 4 points, FFN 1024 ReLU, dropout 0, post-norm); the finest map
(stride 4) joins FPN-style (lateral 1x1 conv + GN, add the upsampled stride-8 output, 3x3 conv +
GN + ReLU); a 1x1 conv gives the mask features.

Outputs (same order as mmdet): ``mask_features`` (B, 256, H/4, W/4) and ``multi_scale_features``
= [stride 32, stride 16, stride 8], low to high resolution — the order the Mask2Former
transformer decoder consumes (its layer ``i`` attends to level ``i % 3``, coarsest first).

State-dict names follow mmdet 3.x / mmseg 1.x checkpoints (prefix
``decode_head.pixel_decoder.`` there); :data:`MMDET_KEY_NOTES` lists every difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ms_deform_attn import DeformAttnImpl, MSDeformAttn, _check_impl, set_deform_attn_impl
from .positional_encoding import SinePositionalEncoding

__all__ = [
    "FFN",
    "MMDET_KEY_NOTES",
    "ConvNormAct",
    "MSDeformAttnEncoder",
    "MSDeformAttnEncoderLayer",
    "MSDeformAttnPixelDecoder",
    "encoder_reference_points",
]

#: Where our module tree differs from mmdet 3.x's (state-dict keys are otherwise identical,
#: relative to ``decode_head.pixel_decoder.`` in an mmseg 1.x Mask2Former checkpoint).
MMDET_KEY_NOTES: dict[str, str] = {
    "positional_encoding": (
        "mmdet spells the attribute 'postional_encoding' (sic). It has no parameters or buffers "
        "in either implementation, so no state-dict key is affected."
    ),
    "point_generator": (
        "mmdet holds an MlvlPointGenerator (no state); we compute the same reference points in "
        "encoder_reference_points(). No key affected."
    ),
    "encoder.layers.N.self_attn.*": (
        "Same keys as mmdet 3.x (sampling_offsets, attention_weights, value_proj, output_proj). "
        "mmdet 2.x / mmseg 0.x checkpoints (mmcv BaseTransformerLayer) name it "
        "'encoder.layers.N.attentions.0.*' instead."
    ),
    "encoder.layers.N.ffn.layers.{0.0,1}": (
        "Same keys as mmdet 3.x / mmcv FFN (layers.0 = Sequential(Linear, ReLU, Dropout), "
        "layers.1 = Linear, layers.2 = Dropout). mmdet 2.x names it 'encoder.layers.N.ffns.0.*'. "
        "mmcv's FFN adds the identity inside; ours returns the branch only and the encoder layer "
        "adds the residual (same math)."
    ),
    "encoder.layers.N.norms.{0,1}": "Same keys as mmdet 2.x and 3.x (LayerNorm, eps 1e-5).",
    "encoder.layers.N.self_attn (residual)": (
        "mmcv's MultiScaleDeformableAttention returns dropout(out) + identity; our MSDeformAttn "
        "returns out only, the residual/dropout live in MSDeformAttnEncoderLayer. No key affected."
    ),
    "lateral_convs.i / output_convs.i": (
        "Index i is the input level the conv is applied to (feats[i]), exactly as mmdet's forward "
        "indexes them; with a single FPN level (this config) only index 0 exists."
    ),
    "*.activate": "ConvModule's ReLU (no parameters) is called 'activate' in both.",
}


class ConvNormAct(nn.Module):
    """mmcv ``ConvModule`` subset: conv -> GroupNorm -> optional ReLU; keys ``conv.*``, ``gn.*``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool,
        num_groups: int = 32,
        act: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias
        )
        self.gn = nn.GroupNorm(num_groups, out_channels)
        self.activate = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W)."""
        return self.activate(self.gn(self.conv(x)))


class FFN(nn.Module):
    """mmcv ``FFN`` (num_fcs=2) without the built-in identity: ``Linear -> ReLU -> Linear``.

    ``layers`` = Sequential(Sequential(Linear, ReLU, Dropout), Linear, Dropout) so keys are
    ``layers.0.0.*`` and ``layers.1.*`` as in mmcv. The caller adds the residual.
    """

    def __init__(
        self, embed_dims: int = 256, feedforward_channels: int = 1024, dropout: float = 0.0
    ):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(
                nn.Linear(embed_dims, feedforward_channels),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
            ),
            nn.Linear(feedforward_channels, embed_dims),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(..., E) -> (..., E), the branch only (no identity)."""
        return self.layers(x)


class MSDeformAttnEncoderLayer(nn.Module):
    """mmdet ``DeformableDetrTransformerEncoderLayer``: post-norm deformable self-attention + FFN.

    ``x = norms[0](x + drop(self_attn(x + pos -> offsets/weights, value=x)))``,
    ``x = norms[1](x + ffn(x))``.
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 3,
        num_points: int = 4,
        feedforward_channels: int = 1024,
        dropout: float = 0.0,
        deform_attn_impl: DeformAttnImpl = "grid_sample",
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(
            embed_dims, num_heads, num_levels, num_points, deform_attn_impl
        )
        self.attn_drop = nn.Dropout(dropout)
        self.ffn = FFN(embed_dims, feedforward_channels, dropout)
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(2)])

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Sequence[tuple[int, int]] | Tensor,
        level_start_index: Tensor | Sequence[int] | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """query (B, S, E), query_pos (B|1, S, E), reference_points (B|1, S, L, 2) -> (B, S, E)."""
        attn = self.self_attn(
            query,
            reference_points,
            query,
            spatial_shapes,
            level_start_index,
            query_pos=query_pos,
            value_padding_mask=padding_mask,
        )
        query = self.norms[0](query + self.attn_drop(attn))
        return self.norms[1](query + self.ffn(query))


class MSDeformAttnEncoder(nn.Module):
    """Stack of encoder layers (mmdet ``Mask2FormerTransformerEncoder``; no final norm)."""

    def __init__(self, num_layers: int = 6, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [MSDeformAttnEncoderLayer(**layer_kwargs) for _ in range(num_layers)]
        )

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Sequence[tuple[int, int]] | Tensor,
        level_start_index: Tensor | Sequence[int] | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """(B, S, E) -> (B, S, E); same arguments for every layer."""
        for layer in self.layers:
            query = layer(
                query, query_pos, reference_points, spatial_shapes, level_start_index, padding_mask
            )
        return query


def encoder_reference_points(
    spatial_shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    num_levels: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Pixel-centre reference points of every encoder query, (1, S, L, 2) normalised (x, y).

    As mmdet's pixel decoder: ``MlvlPointGenerator`` centres ``((j + 0.5) * s, (i + 0.5) * s)``
    divided by ``(W * s, H * s)``, row-major per level, levels concatenated, the same point for
    all ``L`` levels (valid ratios are all 1 for unpadded inputs, so no rescaling). Same float32
    ops as mmdet (equal up to the last ulp). Batch dim 1: it broadcasts.
    """
    num_levels = len(spatial_shapes) if num_levels is None else num_levels
    refs = []
    for (h, w), s in zip(spatial_shapes, strides, strict=True):
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) * s / (w * s)
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) * s / (h * s)
        grid = torch.stack((xs[None, :].expand(h, w), ys[:, None].expand(h, w)), dim=-1)
        refs.append(grid.reshape(h * w, 2))
    ref = torch.cat(refs, dim=0)
    return ref[None, :, None, :].expand(1, ref.shape[0], num_levels, 2)


class MSDeformAttnPixelDecoder(nn.Module):
    """Multi-scale deformable-attention pixel decoder; see the module docstring.

    Args:
        in_channels: channels of the input maps, finest (stride 4) first.
        strides: their strides.
        feat_channels: width of the encoder and FPN (256).
        out_channels: channels of ``mask_features`` (256).
        num_outs: how many encoder/FPN maps are returned in ``multi_scale_features`` (3).
        num_encoder_levels: how many of the coarsest inputs enter the encoder (3).
        num_encoder_layers, num_heads, num_points, feedforward_channels, dropout: encoder config.
        num_groups: GroupNorm groups (32).
        deform_attn_impl: "grid_sample" (training) or "gather" (ONNX/TensorRT export); switch
            later by assigning ``deform_attn_impl`` or with ``set_deform_attn_impl``.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (1024, 1024, 1024, 1024),
        strides: Sequence[int] = (4, 8, 16, 32),
        feat_channels: int = 256,
        out_channels: int = 256,
        num_outs: int = 3,
        num_encoder_levels: int = 3,
        num_encoder_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        feedforward_channels: int = 1024,
        dropout: float = 0.0,
        num_groups: int = 32,
        deform_attn_impl: DeformAttnImpl = "grid_sample",
    ) -> None:
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError("in_channels and strides must have the same length")
        if not 1 <= num_encoder_levels <= len(in_channels):
            raise ValueError("num_encoder_levels must be in [1, len(in_channels)]")
        self.strides = tuple(strides)
        self.num_input_levels = len(in_channels)
        self.num_encoder_levels = num_encoder_levels
        self.num_outs = num_outs
        self._deform_attn_impl: DeformAttnImpl = _check_impl(deform_attn_impl)  # type: ignore[assignment]
        # input_convs[i] projects feats[num_input_levels - 1 - i]: coarsest first
        self.input_convs = nn.ModuleList(
            [
                ConvNormAct(in_channels[lvl], feat_channels, 1, bias=True, num_groups=num_groups)
                for lvl in range(
                    self.num_input_levels - 1, self.num_input_levels - num_encoder_levels - 1, -1
                )
            ]
        )
        self.encoder = MSDeformAttnEncoder(
            num_encoder_layers,
            embed_dims=feat_channels,
            num_heads=num_heads,
            num_levels=num_encoder_levels,
            num_points=num_points,
            feedforward_channels=feedforward_channels,
            dropout=dropout,
            deform_attn_impl=deform_attn_impl,
        )
        self.positional_encoding = SinePositionalEncoding(feat_channels // 2, normalize=True)
        self.level_encoding = nn.Embedding(num_encoder_levels, feat_channels)
        # FPN for the finer inputs that skip the encoder; index i <-> feats[i] (mmdet's forward)
        num_fpn = self.num_input_levels - num_encoder_levels
        self.lateral_convs = nn.ModuleList(
            [
                ConvNormAct(in_channels[i], feat_channels, 1, bias=False, num_groups=num_groups)
                for i in range(num_fpn)
            ]
        )
        self.output_convs = nn.ModuleList(
            [
                ConvNormAct(
                    feat_channels, feat_channels, 3, bias=False, num_groups=num_groups, act=True
                )
                for _ in range(num_fpn)
            ]
        )
        self.mask_feature = nn.Conv2d(feat_channels, out_channels, kernel_size=1)
        self.init_weights()

    @property
    def deform_attn_impl(self) -> DeformAttnImpl:
        return self._deform_attn_impl

    @deform_attn_impl.setter
    def deform_attn_impl(self, impl: DeformAttnImpl) -> None:
        set_deform_attn_impl(self, impl)

    @torch.no_grad()
    def init_weights(self) -> None:
        """mmdet's ``MSDeformAttnPixelDecoder.init_weights``.

        input convs xavier-uniform (gain 1); lateral/output/mask convs caffe2-xavier
        (kaiming-uniform, a=1, fan_in); biases 0; level encoding N(0, 1); every encoder tensor with
        dim > 1 xavier-normal, then each deformable attention re-initialised to its own scheme.
        GroupNorm/LayerNorm 1/0 and the FFN biases keep PyTorch defaults (mmdet leaves them).
        """
        for conv in self.input_convs:
            nn.init.xavier_uniform_(conv.conv.weight, gain=1.0)
            nn.init.zeros_(conv.conv.bias)
        caffe2 = [m.conv for m in self.lateral_convs] + [m.conv for m in self.output_convs]
        for conv in [*caffe2, self.mask_feature]:
            nn.init.kaiming_uniform_(conv.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.level_encoding.weight, mean=0.0, std=1.0)
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        for m in self.encoder.modules():
            if isinstance(m, MSDeformAttn):
                m.init_weights()

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Args:
            feats: ``num_input_levels`` maps, finest first, (B, C_i, H / s_i, W / s_i).

        Returns:
            ``(mask_features, multi_scale_features)``: (B, out_channels, H/4, W/4) and
            ``num_outs`` maps (B, feat_channels, h, w), coarsest first (strides 32, 16, 8).
        """
        if len(feats) != self.num_input_levels:
            raise ValueError(f"expected {self.num_input_levels} feature maps, got {len(feats)}")
        batch = feats[0].shape[0]
        tokens, pos_tokens, shapes, strides = [], [], [], []
        for i in range(self.num_encoder_levels):
            lvl = self.num_input_levels - 1 - i
            x = self.input_convs[i](feats[lvl])
            h, w = int(x.shape[-2]), int(x.shape[-1])
            # unpadded input: the encoding depends on (h, w) only -> (1, C, h, w), broadcast later
            pos = self.positional_encoding.embed_shape(h, w, device=x.device).to(x.dtype)
            pos = pos + self.level_encoding.weight[i].to(x.dtype).view(1, -1, 1, 1)
            tokens.append(x.flatten(2).transpose(1, 2))  # (B, h*w, C)
            pos_tokens.append(pos.flatten(2).transpose(1, 2))  # (1, h*w, C)
            shapes.append((h, w))
            strides.append(self.strides[lvl])
        query = torch.cat(tokens, dim=1)
        query_pos = torch.cat(pos_tokens, dim=1)
        # float32 at least: reference + offset / size must resolve sub-pixel positions
        ref_dtype = torch.promote_types(query.dtype, torch.float32)
        ref = encoder_reference_points(shapes, strides, device=query.device).to(ref_dtype)
        level_start_index = [0]
        for h, w in shapes[:-1]:
            level_start_index.append(level_start_index[-1] + h * w)
        memory = self.encoder(query, query_pos, ref, shapes, level_start_index)

        # (B, S, C) -> per level (B, C, h, w), coarsest first
        outs = [
            m.transpose(1, 2).reshape(batch, -1, h, w)
            for m, (h, w) in zip(
                memory.split([h * w for h, w in shapes], dim=1), shapes, strict=True
            )
        ]
        for i in range(self.num_input_levels - self.num_encoder_levels - 1, -1, -1):
            lateral = self.lateral_convs[i](feats[i])
            up = F.interpolate(
                outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
            )
            outs.append(self.output_convs[i](lateral + up))
        return self.mask_feature(outs[-1]), outs[: self.num_outs]
