"""The segmentation model: input normalisation, DINOv2 backbone (with adapters), Mask2Former head.

:class:`Segmentor` follows mmseg 1.x's ``EncoderDecoder`` + ``SegDataPreProcessor`` as the
authors' configuration uses them (docs/method.md §2):

- inputs are float RGB images on 0-255, (B, 3, H, W); they are normalised with the ImageNet mean
  and std (buffers, not saved in the state dict);
- an input whose size is not a multiple of the backbone's patch size is padded at the bottom and
  right with 0 *after* normalisation (mmseg's ``pad_val=0``; labels with 255) and the logits are
  cropped back, so every input size works;
- ``forward`` is whole-image inference, returning per-class scores at the input size (what the
  ONNX export traces); ``predict(mode="slide")`` is mmseg's ``slide_inference`` (crop 512, stride
  341): overlapping windows, scores summed and divided by the per-pixel window count;
- ``loss`` turns the label map into per-class binary masks (255 = ignore) and returns the
  Mask2Former losses plus their sum under ``"loss"``.

:func:`build_model` assembles the presets: ``"dinov2_large_mask2former"`` (the paper: ViT-L/16
at 512, Mask2Former 256 wide, 100 queries, 9 layers) and ``"tiny"`` (a 4-block, 64-wide backbone
and a 64-wide head with 8 queries and 2 decoder layers, for fast CPU tests).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import RecycleLoRAConfig, apply_recyclelora
from ..geometry import slide_windows
from .dinov2 import DinoVisionTransformer, dinov2_tiny, dinov2_vitl
from .dinov2_weights import load_dinov2_weights
from .mask2former.head import Mask2FormerHead
from .mask2former.losses import semantic_to_instance_targets
from .mask2former.ms_deform_attn import DeformAttnImpl, set_deform_attn_impl

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "Segmentor",
    "build_model",
]

#: docs/method.md §2: RGB mean and std on 0-255.
IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

_DEFAULT_ADAPTERS = RecycleLoRAConfig(32, 4)


class Segmentor(nn.Module):
    """Backbone + decode head + data normalisation (see the module docstring).

    Args:
        backbone: maps normalised images (B, 3, H, W) to the head's input maps; its
            ``patch_size`` attribute (1 if absent) is the size inputs are padded to a multiple of.
        decode_head: a head with ``forward(feats)``, ``loss(feats, targets, generator)``,
            ``predict(feats, out_size)`` and ``num_classes`` (``Mask2FormerHead``).
        mean, std: RGB normalisation on 0-255.
        ignore_index: label of unlabelled pixels (255).

    Submodules are named as in mmseg checkpoints: ``backbone`` and ``decode_head`` (``head`` is an
    alias of the latter).
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: nn.Module,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.ignore_index = ignore_index
        self.size_divisor = int(getattr(backbone, "patch_size", 1))
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    @property
    def head(self) -> nn.Module:
        return self.decode_head

    @property
    def num_classes(self) -> int:
        return int(self.decode_head.num_classes)

    def normalize(self, images: Tensor, valid_hw: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) RGB on 0-255 -> normalised, in the images' floating dtype.

        ``valid_hw`` (B, 2): each image's unpadded top-left size; the padding beyond it is set to
        0 after normalisation, as mmseg pads (the data pipeline pads crops before this).
        """
        if not images.is_floating_point():
            images = images.float()
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        if valid_hw is not None:
            h, w = x.shape[-2:]
            rows = torch.arange(h, device=x.device).view(1, 1, -1, 1)
            cols = torch.arange(w, device=x.device).view(1, 1, 1, -1)
            vh = valid_hw[:, 0].to(x.device).view(-1, 1, 1, 1)
            vw = valid_hw[:, 1].to(x.device).view(-1, 1, 1, 1)
            x = x.masked_fill((rows >= vh) | (cols >= vw), 0.0)
        return x

    def _pad(self, x: Tensor, value: float) -> Tensor:
        """Pad the last two dims at the bottom/right up to a multiple of ``size_divisor``."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        d = self.size_divisor
        pad_h, pad_w = (-h) % d, (-w) % d
        if pad_h == 0 and pad_w == 0:
            return x
        return F.pad(x, (0, pad_w, 0, pad_h), value=value)

    def encode_decode(self, x: Tensor) -> Tensor:
        """Normalised images (B, 3, H, W) -> class scores (B, K, H, W) (padding handled)."""
        h, w = int(x.shape[-2]), int(x.shape[-1])
        padded = self._pad(x, 0.0)
        logits = self.decode_head.predict(self.backbone(padded), out_size=padded.shape[-2:])
        if logits.shape[-2:] != (h, w):
            logits = logits[..., :h, :w]
        return logits

    def forward(self, images: Tensor) -> Tensor:
        """Whole-image inference: RGB 0-255 (B, 3, H, W) -> class scores (B, K, H, W)."""
        return self.encode_decode(self.normalize(images))

    def loss(
        self,
        images: Tensor,
        labels: Tensor,
        valid_hw: Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> dict[str, Tensor]:
        """Training losses.

        Args:
            images: (B, 3, H, W) RGB on 0-255.
            labels: (B, H, W) integer train ids, ``ignore_index`` for unlabelled pixels.
            valid_hw: optional (B, 2) unpadded sizes of padded crops (see ``normalize``).
            generator: optional ``torch.Generator`` for matching and point sampling, or one per
                image (the trainer seeds them per sample, so DDP equals one process).

        Returns:
            mmdet-named losses (``loss_cls``, ``loss_mask``, ``loss_dice``, ``d{i}.loss_*``) and
            their sum under ``"loss"``.
        """
        if labels.dim() == 4 and labels.shape[1] == 1:
            labels = labels.squeeze(1)
        if labels.shape[-2:] != images.shape[-2:] or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}"
            )
        x = self._pad(self.normalize(images, valid_hw), 0.0)
        labels = self._pad(labels.long(), self.ignore_index)
        targets = semantic_to_instance_targets(labels, self.ignore_index)
        losses = dict(self.decode_head.loss(self.backbone(x), targets, generator=generator))
        losses["loss"] = sum(losses.values())
        return losses

    def slide_inference(
        self, x: Tensor, crop: int | Sequence[int] = 512, stride: int | Sequence[int] = 341
    ) -> Tensor:
        """mmseg ``EncoderDecoder.slide_inference`` on normalised images -> (B, K, H, W).

        Each window (see :func:`recyclelora.geometry.slide_windows`) is decoded on its own (scores
        at the window's size); the scores are summed into place and divided by how many windows
        cover each pixel.
        """
        b, _, h, w = x.shape
        preds = x.new_zeros((b, self.num_classes, h, w))
        count = x.new_zeros((1, 1, h, w))
        for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
            crop_logits = self.encode_decode(x[:, :, y1:y2, x1:x2])
            preds[:, :, y1:y2, x1:x2] += crop_logits.to(preds.dtype)
            count[:, :, y1:y2, x1:x2] += 1
        return preds / count

    def predict(
        self,
        images: Tensor,
        mode: Literal["whole", "slide"] = "whole",
        crop: int | Sequence[int] = 512,
        stride: int | Sequence[int] = 341,
    ) -> Tensor:
        """Class scores (B, K, H, W) at the input size, whole-image or sliding-window (the paper's
        test mode: crop 512, stride 341). Images smaller than the crop get a single window, i.e.
        whole inference. Runs in the caller's grad mode (wrap in ``torch.no_grad()``)."""
        if mode == "whole":
            return self(images)
        if mode == "slide":
            return self.slide_inference(self.normalize(images), crop, stride)
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")

    @property
    def deform_attn_impl(self) -> DeformAttnImpl:
        return self.decode_head.deform_attn_impl

    @deform_attn_impl.setter
    def deform_attn_impl(self, impl: DeformAttnImpl) -> None:
        set_deform_attn_impl(self, impl)


# ---------------------------------------------------------------------------------------------
# Presets

BackboneFactory = Callable[..., DinoVisionTransformer]

#: name -> (backbone factory, head keyword arguments beyond in_channels/strides/num_classes).
PRESETS: dict[str, tuple[BackboneFactory, dict[str, Any]]] = {
    # docs/method.md §2 / the authors' mmseg config (Rein's dinov2_mask2former.py).
    "dinov2_large_mask2former": (
        dinov2_vitl,
        {
            "num_queries": 100,
            "feat_channels": 256,
            "out_channels": 256,
            "num_transformer_feat_level": 3,
            "num_decoder_layers": 9,
            "num_heads": 8,
            "decoder_ffn_channels": 2048,
        },
    ),
    # 4 blocks x 64 wide backbone; head 64 wide (GroupNorm(32): 2 channels a group, so even a
    # 1x1 stride-32 map normalises), 8 queries, 2 decoder layers, 1 encoder layer, small FFNs.
    "tiny": (
        dinov2_tiny,
        {
            "num_queries": 8,
            "feat_channels": 64,
            "out_channels": 64,
            "num_transformer_feat_level": 3,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "decoder_ffn_channels": 128,
            "pixel_decoder_cfg": {
                "num_encoder_layers": 1,
                "num_heads": 4,
                "num_points": 4,
                "feedforward_channels": 128,
            },
            "loss_cfg": {"num_points": 1024},
        },
    ),
}


def build_model(
    preset: str,
    num_classes: int = 19,
    adapters: RecycleLoRAConfig | None = _DEFAULT_ADAPTERS,
    backbone_weights: str | os.PathLike | None = None,
    deform_attn_impl: DeformAttnImpl = "grid_sample",
    device: torch.device | str | None = None,
    img_size: int | Sequence[int] = 512,
    *,
    head_cfg: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    generator: torch.Generator | None = None,
    init_adapters: bool = True,
) -> Segmentor:
    """Build a :class:`Segmentor` from a preset.

    Order: backbone -> load ``backbone_weights`` (Meta or Hugging Face DINOv2 checkpoint, patch
    and positions converted) -> ``apply_recyclelora(backbone, adapters)`` (the backbone is then
    frozen except the adapters; ``adapters=None`` leaves it plain and fully trainable) -> head
    (trainable) -> move to ``device``.

    Args:
        preset: ``"dinov2_large_mask2former"`` or ``"tiny"`` (see :data:`PRESETS`).
        num_classes: K (19).
        adapters: adapter config; the paper's G-> setting is ``RecycleLoRAConfig(32, 4)``.
        backbone_weights: optional checkpoint path for the backbone.
        deform_attn_impl: "grid_sample" (training) or "gather" (export) in the pixel decoder.
        device: where the model ends up. ``"meta"`` builds shapes only (parameter counting, no
            memory, no weights, adapters not initialised); otherwise the model is built and
            adapted on the CPU (the pivoted QR runs there anyway) and then moved.
        img_size: the backbone's training image size (its stored position grid).
        head_cfg: overrides of the preset's head arguments (e.g. ``{"loss_cfg": {...}}``).
        progress: adapter-initialisation progress bar (None: only on a terminal).
        generator: random generator for the Kaiming ablation init of the adapters.
        init_adapters: False skips the adapters' decomposition (uninitialised tensors): for a
            model that a full checkpoint is loaded into next (evaluation, resume, export).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    factory, head_kwargs = PRESETS[preset]
    head_kwargs = {**head_kwargs, **dict(head_cfg or {})}
    is_meta = device is not None and torch.device(device).type == "meta"
    if is_meta and backbone_weights is not None:
        raise ValueError("backbone_weights cannot be loaded on the meta device")
    build_device = torch.device("meta") if is_meta else torch.device("cpu")

    with build_device:
        backbone = factory(img_size=img_size)
    if backbone_weights is not None:
        load_dinov2_weights(backbone, backbone_weights)
    if adapters is not None:
        apply_recyclelora(
            backbone, adapters, generator=generator, progress=progress, initialize=init_adapters
        )
    with build_device:
        head = Mask2FormerHead(
            in_channels=(backbone.embed_dim,) * len(backbone.feature_strides),
            strides=tuple(int(s) for s in backbone.feature_strides),
            num_classes=num_classes,
            deform_attn_impl=deform_attn_impl,
            **head_kwargs,
        )
        model = Segmentor(backbone, head)
    if device is not None and not is_meta:
        model = model.to(device)
    return model
