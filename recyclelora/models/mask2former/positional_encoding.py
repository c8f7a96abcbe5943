"""Sine positional encoding of DETR, numerically identical to mmdet's ``SinePositionalEncoding``.

mmdet 3.x semantics (as Mask2Former uses it: ``num_feats=128, normalize=True``): for a valid
position at 1-based row ``y`` and column ``x`` (cumulative count of valid pixels),

    y' = (y + offset) / (y_last + eps) * scale,   x' likewise,   eps = 1e-6, offset = 0,
    dim_t[k] = temperature ** (2 * (k // 2) / num_feats),          k = 0 .. num_feats - 1,
    pos_y[k] = sin(y' / dim_t[k]) for even k, cos(y' / dim_t[k]) for odd k,   pos_x likewise,

and the output is ``cat(pos_y, pos_x)`` along channels: (B, 2 * num_feats, H, W). ``y_last`` is
the number of valid rows (H when nothing is padded). Note the 1-based count with offset 0: the
first pixel sits at ``scale / H``, not ``0.5 * scale / H`` (Deformable-DETR uses offset -0.5;
Mask2Former does not).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SinePositionalEncoding"]


class SinePositionalEncoding(nn.Module):
    """Fixed 2-D sine/cosine positional encoding (no parameters, no buffers).

    ``forward(mask)`` follows mmdet exactly (padding-aware, data-dependent cumsum);
    ``forward(input=x)`` / :meth:`embed_shape` assume an unpadded map and depend only on its shape,
    so the graph has no data-dependent ops and exports with a dynamic batch. Both give bit-identical
    values when the mask is all valid.
    """

    def __init__(
        self,
        num_feats: int = 128,
        temperature: float = 10000,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
        offset: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        self.offset = offset

    def _encode(self, y_embed: Tensor, x_embed: Tensor) -> tuple[Tensor, Tensor]:
        """(..., ) float32 positions -> (..., num_feats) interleaved sin/cos, for y and x."""
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=y_embed.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_feats)
        out = []
        for embed in (y_embed, x_embed):
            pos = embed[..., None] / dim_t
            pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1)
            out.append(pos.flatten(-2))
        return out[0], out[1]

    def embed_shape(
        self, height: int, width: int, device: torch.device | str | None = None
    ) -> Tensor:
        """Encoding of an unpadded ``height x width`` map: (1, 2 * num_feats, H, W), float32."""
        y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=device)
        x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=device)
        if self.normalize:
            # same op order as mmdet (tensor + eps, then divide) for bit-identical values
            y_embed = (y_embed + self.offset) / (y_embed[-1:] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[-1:] + self.eps) * self.scale
        pos_y, pos_x = self._encode(y_embed, x_embed)  # (H, F), (W, F)
        pos = torch.cat(
            (
                pos_y[:, None, :].expand(height, width, self.num_feats),
                pos_x[None, :, :].expand(height, width, self.num_feats),
            ),
            dim=-1,
        )
        return pos.permute(2, 0, 1)[None]

    def forward(self, mask: Tensor | None = None, input: Tensor | None = None) -> Tensor:
        """Positional encoding, (B, 2 * num_feats, H, W) float32.

        Args:
            mask: (B, H, W) bool/int, non-zero = padded. If given, used as mmdet does.
            input: (B, C, H, W) feature map; used for its shape when ``mask`` is None (all valid).
                The result is then a broadcast (expanded) view of one (1, C', H, W) encoding.
        """
        if mask is None:
            if input is None:
                raise ValueError("SinePositionalEncoding needs a mask or an input feature map")
            height, width = int(input.shape[-2]), int(input.shape[-1])
            pos = self.embed_shape(height, width, device=input.device)
            return pos.expand(input.shape[0], -1, -1, -1)
        not_mask = 1 - mask.to(torch.int)
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        pos_y, pos_x = self._encode(y_embed, x_embed)  # (B, H, W, F) each
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"num_feats={self.num_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale}, eps={self.eps}, offset={self.offset}"
        )
