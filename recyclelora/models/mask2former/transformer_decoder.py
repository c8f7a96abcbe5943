"""Mask2Former's masked-attention transformer decoder (mmdet 3.x ``Mask2FormerTransformerDecoder``).

Configuration reproduced (docs/method.md §2): 9 layers of 256 dims, each

    query = norms[0](query + cross_attn(query + query_pos, key + key_pos, key; attn_mask))
    query = norms[1](query + self_attn(query + query_pos, query + query_pos, query))
    query = norms[2](query + ffn(query))                  # FFN 2048, ReLU

(masked cross-attention first, then self-attention, post-norm), 8 heads, dropout 0, and a shared
final ``post_norm`` LayerNorm that the head applies before every prediction. Values never get
the positional encoding (mmcv's ``MultiheadAttention`` adds ``query_pos``/``key_pos`` to the
query and key only).

Attention-mask convention (as ``nn.MultiheadAttention`` and mmdet): boolean, ``True`` = this key
is NOT attended. Here the mask may be (Q, K), (B, Q, K) (shared by all heads) or (B, heads, Q, K);
mmdet materialises it per head as (B * heads, Q, K), which is the same thing repeated.

State-dict keys equal mmdet 3.x's, relative to ``decode_head.transformer_decoder.``:
``layers.N.cross_attn.attn.{in_proj_weight,in_proj_bias,out_proj.weight,out_proj.bias}``,
``layers.N.self_attn.attn.*`` likewise, ``layers.N.ffn.layers.0.0.*`` and
``layers.N.ffn.layers.1.*`` (mmcv ``FFN``), ``layers.N.norms.{0,1,2}.*`` and ``post_norm.*``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pixel_decoder import FFN

__all__ = [
    "Mask2FormerTransformerDecoder",
    "Mask2FormerTransformerDecoderLayer",
    "MultiheadAttention",
    "MultiheadAttentionCore",
    "multi_head_attention",
]


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor | None,
    out_proj: nn.Linear,
    num_heads: int,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Batch-first multi-head attention with ``nn.MultiheadAttention``'s packed parameters.

    Args:
        query: (B, Q, E); key, value: (B, K, E).
        in_proj_weight: (3E, E) packed q, k, v projections; in_proj_bias: (3E,) or None.
        out_proj: the output projection.
        attn_mask: bool, ``True`` = masked out; (Q, K), (B, Q, K) or (B, heads, Q, K).

    Returns:
        (B, Q, E). Softmax scale ``head_dim ** -0.5``; a fully masked row gives NaN, as in
        PyTorch (the Mask2Former head unmasks such rows before calling).
    """
    b, q_len, e = query.shape
    k_len = key.shape[1]
    head_dim = e // num_heads
    w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q = b_k = b_v = None
    if in_proj_bias is not None:
        b_q, b_k, b_v = in_proj_bias.chunk(3)
    q = F.linear(query, w_q, b_q).view(b, q_len, num_heads, head_dim).transpose(1, 2)
    k = F.linear(key, w_k, b_k).view(b, k_len, num_heads, head_dim).transpose(1, 2)
    v = F.linear(value, w_v, b_v).view(b, k_len, num_heads, head_dim).transpose(1, 2)
    mask = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise TypeError(f"attn_mask must be bool (True = masked), got {attn_mask.dtype}")
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)  # shared by all heads
        elif attn_mask.dim() not in (2, 4):
            raise ValueError(f"attn_mask must be 2-, 3- or 4-D, got {tuple(attn_mask.shape)}")
        mask = ~attn_mask  # SDPA's boolean convention: True = takes part
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, Q, head_dim)
    return out_proj(out.transpose(1, 2).reshape(b, q_len, e))


class MultiheadAttentionCore(nn.Module):
    """Parameters of ``nn.MultiheadAttention`` (same names, shapes and init), batch-first forward.

    Keys: ``in_proj_weight`` (3E, E), ``in_proj_bias`` (3E,), ``out_proj.{weight,bias}``. The
    forward broadcasts a per-image mask over the heads instead of repeating it (see
    :func:`multi_head_attention`); no attention dropout (the configuration has none).
    """

    def __init__(self, embed_dims: int, num_heads: int, bias: bool = True) -> None:
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} not divisible by num_heads {num_heads}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dims, embed_dims))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dims)) if bias else None
        self.out_proj = nn.Linear(embed_dims, embed_dims, bias=bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``nn.MultiheadAttention._reset_parameters``: xavier-uniform in_proj, zero biases."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None
    ) -> Tensor:
        """(B, Q, E), (B, K, E), (B, K, E) -> (B, Q, E)."""
        return multi_head_attention(
            query,
            key,
            value,
            self.in_proj_weight,
            self.in_proj_bias,
            self.out_proj,
            self.num_heads,
            attn_mask,
        )

    def extra_repr(self) -> str:
        return f"embed_dims={self.embed_dims}, num_heads={self.num_heads}"


class MultiheadAttention(nn.Module):
    """mmcv ``MultiheadAttention`` (batch-first): positions added to query and key, residual.

    ``out = identity + proj_drop(attn(query + query_pos, key + key_pos, value))`` with
    ``identity = query``, ``key = query`` and ``value = key`` when not given, and ``key_pos``
    defaulting to ``query_pos`` when the shapes agree (mmcv's rule). Parameters live in ``attn``
    so the keys read ``<name>.attn.in_proj_weight`` etc. as in mmdet checkpoints.
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.attn = MultiheadAttentionCore(embed_dims, num_heads)
        self.proj_drop = nn.Dropout(dropout)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        query_pos: Tensor | None = None,
        key_pos: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """query (B, Q, E), key/value (B, K, E), positions broadcastable to them -> (B, Q, E)."""
        if key is None:
            key = query
        if value is None:
            value = key
        identity = query
        if key_pos is None and query_pos is not None and query_pos.shape == key.shape:
            key_pos = query_pos
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        return identity + self.proj_drop(self.attn(query, key, value, attn_mask))


class Mask2FormerTransformerDecoderLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, each followed by its LayerNorm."""

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        feedforward_channels: int = 2048,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed_dims = embed_dims
        self.cross_attn = MultiheadAttention(embed_dims, num_heads, dropout)
        self.self_attn = MultiheadAttention(embed_dims, num_heads, dropout)
        self.ffn = FFN(embed_dims, feedforward_channels, dropout)
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(3)])

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor | None = None,
        query_pos: Tensor | None = None,
        key_pos: Tensor | None = None,
        cross_attn_mask: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Args:
            query: (B, Q, E) queries; query_pos: their embedding (B or 1, Q, E).
            key, value: (B, K, E) flattened image features (value defaults to key);
                key_pos: (B or 1, K, E) their positional encoding.
            cross_attn_mask: bool, True = masked; (B, Q, K), (B, heads, Q, K) or (Q, K).
            self_attn_mask: optional bool mask for the self-attention (unused by Mask2Former).

        Returns:
            (B, Q, E), before the decoder's ``post_norm``.
        """
        query = self.cross_attn(
            query, key, value, query_pos=query_pos, key_pos=key_pos, attn_mask=cross_attn_mask
        )
        query = self.norms[0](query)
        query = self.self_attn(
            query, query, query, query_pos=query_pos, key_pos=query_pos, attn_mask=self_attn_mask
        )
        query = self.norms[1](query)
        query = self.norms[2](query + self.ffn(query))
        return query


class Mask2FormerTransformerDecoder(nn.Module):
    """``num_layers`` decoder layers and the shared ``post_norm``.

    A container: the Mask2Former head drives the layers one by one (each needs the attention
    mask predicted from the previous output) and applies ``post_norm`` to every output.
    """

    def __init__(
        self,
        num_layers: int = 9,
        embed_dims: int = 256,
        num_heads: int = 8,
        feedforward_channels: int = 2048,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.layers = nn.ModuleList(
            [
                Mask2FormerTransformerDecoderLayer(
                    embed_dims, num_heads, feedforward_channels, dropout
                )
                for _ in range(num_layers)
            ]
        )
        self.post_norm = nn.LayerNorm(embed_dims)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """mmdet ``Mask2FormerHead.init_weights``: xavier-normal for every tensor with dim > 1.

        Biases keep their defaults (attention biases 0, FFN biases PyTorch's uniform), norms 1/0.
        """
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
