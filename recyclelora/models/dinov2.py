"""DINOv2 Vision Transformer backbone for dense prediction, in plain PyTorch.

Module and parameter names match Meta's released checkpoints (``dinov2_vit*14_pretrain.pth``)
exactly, so a state dict loads without renaming (see :mod:`recyclelora.models.dinov2_weights` for
the Hugging Face layout and the 14 → 16 patch conversion).

Every linear layer inside a block (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` — or
``mlp.w12``, ``mlp.w3`` for the SwiGLU FFN of ViT-g) is a plain ``nn.Linear`` that the forward
only *calls*; the adapter code swaps these modules with ``setattr`` and everything keeps working.

The dense-prediction forward follows the backbone of Rein / RecycleLoRA for mmseg
(``rein/models/backbones/dino_v2.py``): the outputs of four blocks, patch tokens only, *without*
the final ``norm``, reshaped to feature maps and rescaled bilinearly by 4, 2, 1 and 1/2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "Block",
    "DinoVisionTransformer",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFN",
    "OUT_FRACTIONS_THIRDS",
    "OUT_FRACTIONS_QUARTERS",
    "POS_EMBED_OFFSET",
    "PosEmbedResize",
    "proportional_out_indices",
    "swiglu_hidden_dim",
    "dinov2_tiny",
    "dinov2_vits",
    "dinov2_vitb",
    "dinov2_vitl",
    "dinov2_vitg",
]

# Rescale factors of the four output levels: stride p/4, p/2, p, 2p (4, 8, 16, 32 for p = 16).
FEATURE_SCALES: tuple[float, float, float, float] = (4.0, 2.0, 1.0, 0.5)

#: Block ends at 1/3, 1/2, 2/3 and all of the depth — Rein's / RecycleLoRA's (7, 11, 15, 23) for
#: ViT-L, (3, 5, 7, 11) for the depth-12 models, (0, 1, 2, 3) for depth 4.
OUT_FRACTIONS_THIRDS: tuple[float, ...] = (1 / 3, 1 / 2, 2 / 3, 1.0)
#: Evenly spaced quarters — Meta's (9, 19, 29, 39) for ViT-g.
OUT_FRACTIONS_QUARTERS: tuple[float, ...] = (1 / 4, 1 / 2, 3 / 4, 1.0)

#: How the stored position grid is resized to another token grid (docs/method.md §2):
#: ``"authors"`` — Meta's DINOv2 code, which the authors' backbone runs: bicubic by the scale
#: factor ``(g + POS_EMBED_OFFSET) / N`` per axis (g the token grid, N the stored grid);
#: ``"size"`` — the Hugging Face way: bicubic to the target size (samples every N / g).
PosEmbedResize = Literal["authors", "size"]
#: Meta's offset, added so the scale factor never rounds the output one token short.
POS_EMBED_OFFSET = 0.1


def proportional_out_indices(
    depth: int, fractions: Sequence[float] = OUT_FRACTIONS_THIRDS
) -> tuple[int, ...]:
    """0-based indices of the blocks that end at the given fractions of the depth.

    Index ``i = round(f * depth) - 1`` for each fraction ``f``. No single set of fractions gives
    all the published defaults, hence two: thirds (ViT-S/B/L as in Rein / RecycleLoRA, and the
    tiny test model) and quarters (ViT-g, as in Meta's DINOv2 segmentation configs).
    Raises ValueError when the indices collide (depth < 4).

    >>> proportional_out_indices(24)
    (7, 11, 15, 23)
    >>> proportional_out_indices(40, OUT_FRACTIONS_QUARTERS)
    (9, 19, 29, 39)
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    indices = tuple(max(0, round(f * depth) - 1) for f in fractions)
    if len(set(indices)) != len(indices) or any(not 0 <= i < depth for i in indices):
        raise ValueError(
            f"fractions {tuple(fractions)} give indices {indices} for depth {depth}: they must be "
            f"distinct and within [0, {depth}); pass out_indices explicitly"
        )
    return indices


def swiglu_hidden_dim(embed_dim: int, mlp_ratio: float = 4.0) -> int:
    """Hidden width of DINOv2's fused SwiGLU FFN: 2/3 of the MLP width, rounded up to 8.

    For ViT-g (1536, ratio 4): ``(int(6144 * 2 / 3) + 7) // 8 * 8 = 4096``, the width of the
    released ``mlp.w3`` weight.
    """
    hidden = int(embed_dim * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    a, b = x
    return (int(a), int(b))


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection, (B, C, H, W) -> (B, H/p * W/p, D).

    A strided convolution, as in the checkpoint (``patch_embed.proj`` is a ``Conv2d``).
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) with H, W multiples of p -> (B, H/p * W/p, D), row-major tokens."""
        _, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (q, k, v order along the output)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, D) -> (B, N, D). Softmax scale is head_dim ** -0.5 (the SDPA default)."""
        b, n, d = x.shape
        # Call the module (never read .weight): adapters replace self.qkv / self.proj.
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> GELU (exact, erf) -> fc2."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """DINOv2's fused SwiGLU FFN (ViT-g): ``w3(silu(x1) * x2)`` with ``[x1, x2] = w12(x)``."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, D) -> (B, N, D)."""
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel residual-branch scale ``gamma`` (CaiT); DINOv2 initialises it to 1e-5."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., D) -> (..., D)."""
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        layerscale_init: float | None = 1e-5,
        ln_eps: float = 1e-6,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        ffn_layer: str = "mlp",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        if ffn_layer == "mlp":
            self.mlp: nn.Module = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        elif ffn_layer == "swiglu":
            self.mlp = SwiGLUFFN(dim, swiglu_hidden_dim(dim, mlp_ratio), bias=ffn_bias)
        else:
            raise ValueError(f"ffn_layer must be 'mlp' or 'swiglu', got {ffn_layer!r}")
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 1 + N, D) -> (B, 1 + N, D)."""
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT returning four feature maps at strides p/4, p/2, p, 2p.

    The defaults are RecycleLoRA's backbone: ViT-L at patch 16 and image size 512 (a 32x32
    position grid), outputs of blocks (7, 11, 15, 23).

    Features are taken *before* the final ``norm`` (as in Rein's / RecycleLoRA's mmseg backbone,
    whose ``forward_features`` never calls ``self.norm``). ``norm`` is still built so that the
    released checkpoint loads strictly; it does not take part in :meth:`forward`.

    ``mask_token`` (1, D) is kept for the same reason; this dense forward never masks tokens.

    Inputs whose token grid differs from the stored one (whole-image inference) get resized
    position embeddings, by the authors' rule unless ``pos_embed_resize="size"``.

    Attributes read by the decode-head builder: ``embed_dim``, ``out_indices``,
    ``feature_strides`` (p/4, p/2, p, 2p).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 512,
        patch_size: int = 16,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        out_indices: Sequence[int] | None = None,
        layerscale_init: float | None = 1e-5,
        ln_eps: float = 1e-6,
        in_chans: int = 3,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        ffn_layer: str = "mlp",
        pos_embed_resize: PosEmbedResize = "authors",
    ) -> None:
        """
        Args:
            img_size: training image size (int or (H, W)); sets the stored position grid.
            patch_size: patch size p; the input H and W must be multiples of it.
            out_indices: four 0-based block indices; default ``proportional_out_indices(depth)``.
            layerscale_init: LayerScale initial value; ``None``/0 disables LayerScale.
            ffn_layer: ``"mlp"`` (fc1/GELU/fc2) or ``"swiglu"`` (w12/w3, ViT-g).
            pos_embed_resize: rule for token grids other than the stored one (see
                :data:`PosEmbedResize`); ``"authors"`` gives the authors' checkpoints their
                whole-image results, ``"size"`` is the Hugging Face way (by target size).
        """
        super().__init__()
        img_hw = _pair(img_size)
        if img_hw[0] % patch_size or img_hw[1] % patch_size:
            raise ValueError(f"img_size {img_hw} is not a multiple of patch_size {patch_size}")
        if out_indices is None:
            out_indices = proportional_out_indices(depth)
        out_indices = tuple(int(i) for i in out_indices)
        if len(out_indices) != len(FEATURE_SCALES):
            raise ValueError(f"need exactly 4 out_indices (one per stride), got {out_indices}")
        if any(not 0 <= i < depth for i in out_indices) or list(out_indices) != sorted(
            set(out_indices)
        ):
            raise ValueError(f"out_indices {out_indices} must be increasing and in [0, {depth})")
        if pos_embed_resize not in get_args(PosEmbedResize):
            raise ValueError(
                f"pos_embed_resize must be one of {get_args(PosEmbedResize)}, "
                f"got {pos_embed_resize!r}"
            )

        self.img_size = img_hw
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.out_indices = out_indices
        self.pos_embed_resize = pos_embed_resize
        self.num_prefix_tokens = 1  # one class token, no register tokens
        self.grid_size = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        self.feature_strides = tuple(patch_size / s for s in FEATURE_SCALES)
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                layerscale_init=layerscale_init,
                ln_eps=ln_eps,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                ffn_layer=ffn_layer,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=ln_eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """DINOv2's random init (timm ViT): only matters when no checkpoint is loaded.

        Uses only elementwise initialisers, so it runs (as a no-op) on the meta device.
        """
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def interpolate_pos_embed(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embedding for a (grid_h, grid_w) token grid: (1, 1 + grid_h*grid_w, D).

        Returns the stored parameter unchanged when the grid matches (training crops; sliding
        windows at the training size); otherwise resizes the patch positions bicubically
        (align_corners=False, no antialias) by the ``pos_embed_resize`` rule and keeps the class
        position. Computed in at least float32 (bicubic is not implemented for half on every
        device), as Meta's code does.
        """
        if (grid_h, grid_w) == self.grid_size:
            return self.pos_embed
        pos = self.pos_embed
        gh0, gw0 = self.grid_size
        dtype = torch.promote_types(pos.dtype, torch.float32)
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, gh0, gw0, -1).permute(0, 3, 1, 2).to(dtype)
        if self.pos_embed_resize == "authors":
            scale = ((grid_h + POS_EMBED_OFFSET) / gh0, (grid_w + POS_EMBED_OFFSET) / gw0)
            resize: dict = {"scale_factor": scale}
        else:
            resize = {"size": (grid_h, grid_w)}
        patch_pos = F.interpolate(
            patch_pos, mode="bicubic", align_corners=False, antialias=False, **resize
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(pos.dtype)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> tokens (B, 1 + H/p * W/p, D) with class token and positions."""
        b, _, h, w = x.shape
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(b, -1, -1).to(tokens.dtype)
        tokens = torch.cat((cls, tokens), dim=1)
        return tokens + self.interpolate_pos_embed(h // self.patch_size, w // self.patch_size)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """x: (B, C, H, W) -> 4 maps (B, D, H/p, W/p): blocks ``out_indices``, no final norm.

        Stops after the last requested block (later blocks cannot affect the outputs).
        """
        b, _, h, w = x.shape
        gh, gw = h // self.patch_size, w // self.patch_size
        tokens = self.prepare_tokens(x)
        outs: list[Tensor] = []
        last = self.out_indices[-1]
        for idx, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if idx in self.out_indices:
                patch = tokens[:, self.num_prefix_tokens :]  # drop the class token
                outs.append(patch.transpose(1, 2).reshape(b, -1, gh, gw).contiguous())
            if idx == last:
                break
        return outs

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: (B, 3, H, W) -> [(B, D, 4H/p, 4W/p), (B, D, 2H/p, 2W/p), (B, D, H/p, W/p),
        (B, D, H/2p, W/2p)], i.e. strides 4, 8, 16, 32 for p = 16.

        Bilinear rescale (align_corners=False, by scale factor, as in Rein's backbone); the
        stride-p level is returned as is. Odd grids give floor sizes at the 1/2 level.
        """
        feats = self.forward_features(x)
        return [
            f
            if s == 1.0
            else F.interpolate(f, scale_factor=s, mode="bilinear", align_corners=False)
            for f, s in zip(feats, FEATURE_SCALES, strict=True)
        ]


# ---------------------------------------------------------------------------------------------
# Presets. Defaults: the paper's setting, image 512 at patch 16 (a 32x32 position grid).


@dataclass(frozen=True)
class Size:
    """One DINOv2 size: width, depth, heads, and which fractions of the depth feed the head."""

    embed_dim: int
    depth: int
    num_heads: int
    fractions: Sequence[float] = OUT_FRACTIONS_THIRDS
    ffn_layer: str = "mlp"


SIZES: dict[str, Size] = {
    "tiny": Size(64, 4, 4),  # fast CPU tests; outputs blocks (0, 1, 2, 3)
    "s": Size(384, 12, 6),  # outputs (3, 5, 7, 11)
    "b": Size(768, 12, 12),  # outputs (3, 5, 7, 11)
    "l": Size(1024, 24, 16),  # outputs (7, 11, 15, 23), as RecycleLoRA
    # released dinov2_vitg14: SwiGLU ("swiglufused": mlp.w12 1536->8192, mlp.w3 4096->1536)
    "g": Size(1536, 40, 24, OUT_FRACTIONS_QUARTERS, "swiglu"),  # outputs (9, 19, 29, 39)
}


def dinov2(
    size: str,
    img_size: int | Sequence[int] = 512,
    patch_size: int = 16,
    out_indices: Sequence[int] | None = None,
    **kwargs,
) -> DinoVisionTransformer:
    """A DINOv2 of one of ``SIZES``; ``out_indices`` default to its proportional pyramid blocks."""
    z = SIZES[size]
    if out_indices is None:
        out_indices = proportional_out_indices(z.depth, z.fractions)
    kwargs.setdefault("ffn_layer", z.ffn_layer)
    return DinoVisionTransformer(
        img_size, patch_size, z.embed_dim, z.depth, z.num_heads, out_indices=out_indices, **kwargs
    )


def dinov2_tiny(**kwargs) -> DinoVisionTransformer:
    """4 blocks, 64 wide, 4 heads: for fast CPU tests and the demo."""
    return dinov2("tiny", **kwargs)


def dinov2_vits(**kwargs) -> DinoVisionTransformer:
    return dinov2("s", **kwargs)


def dinov2_vitb(**kwargs) -> DinoVisionTransformer:
    return dinov2("b", **kwargs)


def dinov2_vitl(**kwargs) -> DinoVisionTransformer:
    """ViT-L: 304,199,680 parameters at 512/16 and 304,368,640 at 518/14 (the released model)."""
    return dinov2("l", **kwargs)


def dinov2_vitg(**kwargs) -> DinoVisionTransformer:
    return dinov2("g", **kwargs)
