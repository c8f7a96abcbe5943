"""Mask2Former decode head for semantic segmentation (mmdet 3.x ``Mask2FormerHead`` as mmseg 1.x
drives it), in plain PyTorch.

Forward (mmdet's ``Mask2FormerHead.forward``):

1. the pixel decoder turns the 4 backbone maps into 1/4-scale ``mask_features`` and 3 multi-scale
   maps (strides 32, 16, 8, coarsest first);
2. each of those is projected (Identity when the widths agree), flattened and offset by its
   ``level_embed``; its sine positional encoding is the key position;
3. ``query_feat`` (content) and ``query_embed`` (position) start the decoder; a prediction is made
   before the first layer and after each layer: ``post_norm`` -> ``cls_embed`` (K+1 logits) and
   ``mask_embed`` (3-layer MLP) dotted with ``mask_features`` -> mask logits at 1/4 scale;
4. each prediction's mask logits, resized bilinearly to the next layer's level, give the next
   cross-attention mask: ``sigmoid < 0.5`` = masked (detached); a query whose mask would block every
   key attends everywhere instead (mmdet's "all background" fix); layer ``i`` reads level ``i % 3``.

Semantic inference (mmseg ``Mask2FormerHead.predict``): the last set's mask logits are upsampled
bilinearly (align_corners=False) to the input size, then
``seg[b, c, h, w] = sum_q softmax(cls[b, q])[c] * sigmoid(mask[b, q, h, w])`` with the no-object
class dropped from the softmax output (not from the softmax).

State-dict keys equal mmdet 3.x's (relative to ``decode_head.``): ``pixel_decoder.*``,
``transformer_decoder.*``, ``query_embed.weight``, ``query_feat.weight``, ``level_embed.weight``,
``cls_embed.{weight,bias}``, ``mask_embed.{0,2,4}.{weight,bias}``; ``decoder_input_projs`` are
Identity (no keys) in this configuration. The loss criterion holds no persistent state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import InstanceTargets, Mask2FormerLoss
from .ms_deform_attn import DeformAttnImpl, set_deform_attn_impl
from .pixel_decoder import MSDeformAttnPixelDecoder
from .positional_encoding import SinePositionalEncoding
from .transformer_decoder import Mask2FormerTransformerDecoder

__all__ = ["Mask2FormerHead", "semantic_inference", "unmask_full_rows"]

Predictions = list[tuple[Tensor, Tensor]]


def unmask_full_rows(attn_mask: Tensor) -> Tensor:
    """mmdet's fix ``attn_mask[where(attn_mask.sum(-1) == K)] = False``, without indexing.

    A query whose mask covers every key (predicted all background) attends to all keys instead.
    attn_mask: (..., K) bool, True = masked. Returns a new tensor of the same shape.
    """
    return attn_mask & ~attn_mask.all(dim=-1, keepdim=True)


def semantic_inference(
    cls_logits: Tensor, mask_logits: Tensor, out_size: Sequence[int] | None = None
) -> Tensor:
    """Per-class scores from query classes and masks (docs/method.md §2).

    Args:
        cls_logits: (B, Q, K+1), the last column being "no object".
        mask_logits: (B, Q, h, w).
        out_size: (H, W) to upsample the mask logits to first (bilinear, align_corners=False);
            ``None`` keeps (h, w).

    Returns:
        (B, K, H, W): ``einsum("bqc,bqhw->bchw", softmax(cls)[..., :-1], sigmoid(mask))``.
    """
    if out_size is not None and tuple(mask_logits.shape[-2:]) != tuple(out_size):
        mask_logits = F.interpolate(
            mask_logits, size=tuple(int(s) for s in out_size), mode="bilinear", align_corners=False
        )
    cls_prob = cls_logits.softmax(dim=-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", cls_prob, mask_logits.sigmoid())


class Mask2FormerHead(nn.Module):
    """Mask2Former head: pixel decoder, masked-attention decoder, class/mask predictors, loss.

    Args:
        in_channels: channels of the backbone maps, finest first (4 x 1024 for ViT-L).
        strides: their strides (4, 8, 16, 32).
        num_classes: K (19); the class predictor has K+1 outputs (the last is "no object").
        num_queries: 100.
        feat_channels: width of the pixel decoder, the queries and the transformer decoder (256).
        out_channels: channels of the mask features and mask embeddings (256).
        num_transformer_feat_level: levels fed to the decoder (3) = pixel-decoder encoder levels.
        num_decoder_layers: 9.
        num_heads: decoder attention heads (8).
        decoder_ffn_channels: decoder FFN width (2048).
        dropout: decoder dropout (0).
        enforce_decoder_input_project: 1x1 conv projections even when widths agree (mmdet flag).
        pixel_decoder_cfg: extra ``MSDeformAttnPixelDecoder`` arguments (``num_encoder_layers``,
            ``num_heads``, ``num_points``, ``feedforward_channels``, ``num_groups``, ``dropout``).
        loss_cfg: ``Mask2FormerLoss`` arguments (``num_points``, loss weights, ...).
        deform_attn_impl: "grid_sample" or "gather" for the pixel decoder.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (1024, 1024, 1024, 1024),
        strides: Sequence[int] = (4, 8, 16, 32),
        num_classes: int = 19,
        num_queries: int = 100,
        feat_channels: int = 256,
        out_channels: int = 256,
        num_transformer_feat_level: int = 3,
        num_decoder_layers: int = 9,
        num_heads: int = 8,
        decoder_ffn_channels: int = 2048,
        dropout: float = 0.0,
        enforce_decoder_input_project: bool = False,
        pixel_decoder_cfg: Mapping[str, Any] | None = None,
        loss_cfg: Mapping[str, Any] | None = None,
        deform_attn_impl: DeformAttnImpl = "grid_sample",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_transformer_feat_level = num_transformer_feat_level
        self.num_heads = num_heads
        self.num_transformer_decoder_layers = num_decoder_layers
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels=tuple(in_channels),
            strides=tuple(strides),
            feat_channels=feat_channels,
            out_channels=out_channels,
            num_outs=num_transformer_feat_level,
            num_encoder_levels=num_transformer_feat_level,
            deform_attn_impl=deform_attn_impl,
            **dict(pixel_decoder_cfg or {}),
        )
        self.transformer_decoder = Mask2FormerTransformerDecoder(
            num_layers=num_decoder_layers,
            embed_dims=feat_channels,
            num_heads=num_heads,
            feedforward_channels=decoder_ffn_channels,
            dropout=dropout,
        )
        self.decoder_embed_dims = self.transformer_decoder.embed_dims
        # from low resolution to high resolution
        self.decoder_input_projs = nn.ModuleList(
            [
                nn.Conv2d(feat_channels, self.decoder_embed_dims, kernel_size=1)
                if enforce_decoder_input_project or self.decoder_embed_dims != feat_channels
                else nn.Identity()
                for _ in range(num_transformer_feat_level)
            ]
        )
        self.decoder_positional_encoding = SinePositionalEncoding(
            self.decoder_embed_dims // 2, normalize=True
        )
        self.query_embed = nn.Embedding(num_queries, feat_channels)
        self.query_feat = nn.Embedding(num_queries, feat_channels)
        self.level_embed = nn.Embedding(num_transformer_feat_level, feat_channels)
        self.cls_embed = nn.Linear(feat_channels, num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(feat_channels, feat_channels),
            nn.ReLU(inplace=True),
            nn.Linear(feat_channels, feat_channels),
            nn.ReLU(inplace=True),
            nn.Linear(feat_channels, out_channels),
        )
        self.criterion = Mask2FormerLoss(num_classes, **dict(loss_cfg or {}))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """mmdet ``Mask2FormerHead.init_weights`` for the head's own layers: projections
        caffe2-xavier with zero bias. The pixel decoder and the transformer decoder (xavier-normal
        for every tensor with dim > 1) initialise themselves when built; embeddings (N(0, 1)) and
        the class/mask predictors keep PyTorch's defaults. Only elementwise initialisers: runs (as
        a no-op) on the meta device.
        """
        for m in self.decoder_input_projs:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)

    @property
    def deform_attn_impl(self) -> DeformAttnImpl:
        return self.pixel_decoder.deform_attn_impl

    @deform_attn_impl.setter
    def deform_attn_impl(self, impl: DeformAttnImpl) -> None:
        set_deform_attn_impl(self, impl)

    def _forward_head(
        self, decoder_out: Tensor, mask_features: Tensor, attn_mask_target_size: Sequence[int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One prediction from the decoder state.

        Args:
            decoder_out: (B, Q, C) decoder output before ``post_norm``.
            mask_features: (B, C_out, h, w).
            attn_mask_target_size: (h_l, w_l) of the level the next layer attends to.

        Returns:
            cls logits (B, Q, K+1), mask logits (B, Q, h, w) and the next cross-attention mask
            (B, Q, h_l * w_l) bool, True = masked, detached (shared by all heads).
        """
        decoder_out = self.transformer_decoder.post_norm(decoder_out)
        cls_pred = self.cls_embed(decoder_out)
        mask_embed = self.mask_embed(decoder_out)
        mask_pred = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        attn_mask = F.interpolate(
            mask_pred,
            size=tuple(int(s) for s in attn_mask_target_size),
            mode="bilinear",
            align_corners=False,
        )
        attn_mask = (attn_mask.flatten(2).sigmoid() < 0.5).detach()
        return cls_pred, mask_pred, attn_mask

    def forward(self, feats: Sequence[Tensor]) -> Predictions:
        """Args:
            feats: the backbone maps, finest first, (B, C_i, H / s_i, W / s_i).

        Returns:
            ``num_decoder_layers + 1`` pairs ``(cls_logits (B, Q, K+1), mask_logits (B, Q, H/4,
            W/4))``: the prediction before the first layer first, the final one last.
        """
        mask_features, memories = self.pixel_decoder(feats)
        batch = mask_features.shape[0]
        keys, key_pos = [], []
        for i in range(self.num_transformer_feat_level):
            x = self.decoder_input_projs[i](memories[i])
            h, w = int(x.shape[-2]), int(x.shape[-1])
            x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
            keys.append(x + self.level_embed.weight[i].to(x.dtype).view(1, 1, -1))
            pos = self.decoder_positional_encoding.embed_shape(h, w, device=x.device)
            key_pos.append(pos.to(x.dtype).flatten(2).transpose(1, 2))  # (1, h*w, C)
        query = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
        query_pos = self.query_embed.weight.unsqueeze(0)  # (1, Q, C), broadcast over the batch

        predictions: Predictions = []
        cls_pred, mask_pred, attn_mask = self._forward_head(
            query, mask_features, memories[0].shape[-2:]
        )
        predictions.append((cls_pred, mask_pred))
        for i, layer in enumerate(self.transformer_decoder.layers):
            level = i % self.num_transformer_feat_level
            query = layer(
                query,
                keys[level],
                keys[level],
                query_pos=query_pos,
                key_pos=key_pos[level],
                cross_attn_mask=unmask_full_rows(attn_mask),
            )
            next_level = (i + 1) % self.num_transformer_feat_level
            cls_pred, mask_pred, attn_mask = self._forward_head(
                query, mask_features, memories[next_level].shape[-2:]
            )
            predictions.append((cls_pred, mask_pred))
        return predictions

    def loss(
        self,
        feats: Sequence[Tensor],
        targets: Sequence[InstanceTargets],
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> dict[str, Tensor]:
        """Deep-supervised Mask2Former losses (mmdet names: ``loss_cls``, ``d0.loss_mask``, ...).

        targets: one ``InstanceTargets`` per image (``semantic_to_instance_targets``).
        """
        return self.criterion(self(feats), targets, generator=generator)

    def predict(self, feats: Sequence[Tensor], out_size: Sequence[int]) -> Tensor:
        """Semantic logits (B, K, H, W) at ``out_size`` from the final prediction set."""
        cls_logits, mask_logits = self(feats)[-1]
        return semantic_inference(cls_logits, mask_logits, out_size)
