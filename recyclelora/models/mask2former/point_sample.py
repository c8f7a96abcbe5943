"""Point sampling for Mask2Former's point-based mask losses (PointRend scheme).

Mask2Former never compares full-resolution masks: it reads predictions and ground truth at
a set of points given in normalised image coordinates, so a 1/4-scale prediction and a
full-scale label map are compared at the same places without resizing either.

Coordinates follow mmcv / detectron2: a point is ``(x, y)`` in ``[0, 1]``, ``x`` along the
width, ``y`` along the height, ``(0, 0)`` the top-left corner of the image (not the centre of
the top-left pixel). Sampling is bilinear with ``align_corners=False`` and zero padding, so a
point within half a pixel of the border mixes in zeros (mmcv's ``point_sample``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "calculate_uncertainty",
    "generator_on",
    "point_sample",
    "rand_points",
    "uncertain_point_coords_with_randomness",
]


def point_sample(input: Tensor, points: Tensor, align_corners: bool = False) -> Tensor:
    """Bilinearly read ``input`` at normalised points.

    Args:
        input: (B, C, H, W) feature map or mask logits.
        points: (B, P, 2) points ``(x, y)`` in ``[0, 1]``.
        align_corners: passed to ``grid_sample``; the Mask2Former losses use False.

    Returns:
        (B, C, P) sampled values.
    """
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be (B, P, 2), got {tuple(points.shape)}")
    # grid_sample wants (B, H_out, W_out, 2) in [-1, 1] and the same dtype as the input.
    grid = (2.0 * points - 1.0).unsqueeze(2).to(dtype=input.dtype)
    out = F.grid_sample(
        input, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners
    )
    return out.squeeze(3)


def calculate_uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of class-agnostic mask logits: ``-|logit|`` (highest at the 0.5 boundary).

    Args:
        logits: (N, 1, P) point logits.

    Returns:
        (N, 1, P) uncertainties.
    """
    return -logits.abs()


def generator_on(
    device: torch.device | str, generator: torch.Generator | None
) -> torch.Generator | None:
    """``generator`` itself if it lives on ``device``, else a generator there seeded from it.

    Drawing on the device of the tensors being sampled avoids generating millions of numbers
    on the CPU and copying them over every step. The derived generator is seeded from one
    63-bit draw of ``generator``, so its stream stays a function of ``generator``'s state
    alone (a per-sample seed keeps deciding every draw of that sample).
    """
    if generator is None:
        return None
    device, here = torch.device(device), generator.device
    # "cuda" means the current device; the CPU's index does not matter.
    same_index = device.type == "cpu" or device.index is None or device.index == here.index
    if here.type == device.type and same_index:
        return generator
    seed = torch.randint(0, 2**63 - 1, (), generator=generator, device=here)
    return torch.Generator(device=device).manual_seed(int(seed))


def rand_points(
    shape: tuple[int, ...],
    device: torch.device | str | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Uniform float32 points in ``[0, 1)`` of ``shape``, drawn on ``device``.

    ``generator`` may be a list with one generator per row (``shape[0]``): each row then
    depends only on its own generator, so per-image draws do not depend on the batch split.
    A generator on another device than ``device`` is replaced by one derived from it
    (``generator_on``); ``device=None`` draws on the generator's device.
    """
    if generator is None:
        return torch.rand(shape, device=device)
    if isinstance(generator, (list, tuple)):  # one generator per row, e.g. per image
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
        rows = [rand_points((1, *shape[1:]), device, g) for g in generator]
        return torch.cat(rows) if rows else torch.rand(shape, device=device)
    device = generator.device if device is None else torch.device(device)
    return torch.rand(shape, generator=generator_on(device, generator), device=device)


def uncertain_point_coords_with_randomness(
    mask_logits: Tensor,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PointRend importance sampling: favour points where the mask is least certain.

    ``int(num_points * oversample_ratio)`` candidates are drawn uniformly; the
    ``int(importance_sample_ratio * num_points)`` candidates with the highest uncertainty
    (``-|logit|``) come first in the output, followed by fresh uniform points to fill up to
    ``num_points``. Random draws happen in that order (candidates, then the uniform
    remainder), which is what makes the result reproducible from a generator's state.

    Args:
        mask_logits: (N, 1, H, W) class-agnostic mask logits (no gradient is needed).
        num_points: P, points per mask.
        oversample_ratio: candidates per output point, >= 1.
        importance_sample_ratio: share of points chosen by uncertainty, in [0, 1].
        generator: optional ``torch.Generator`` for deterministic draws; one on another device
            than ``mask_logits`` is replaced once by a generator derived from it there.

    Returns:
        (N, P, 2) point coordinates ``(x, y)`` in ``[0, 1]``.
    """
    if mask_logits.dim() != 4 or mask_logits.shape[1] != 1:
        raise ValueError(f"mask_logits must be (N, 1, H, W), got {tuple(mask_logits.shape)}")
    if oversample_ratio < 1:
        raise ValueError("oversample_ratio must be >= 1")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError("importance_sample_ratio must lie in [0, 1]")
    n = mask_logits.shape[0]
    device = mask_logits.device
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    generator = generator_on(device, generator)

    candidates = rand_points((n, num_sampled, 2), device, generator)
    if n > 0 and num_uncertain > 0:
        with torch.no_grad():
            uncertainty = calculate_uncertainty(point_sample(mask_logits.detach(), candidates))
        idx = uncertainty[:, 0, :].topk(num_uncertain, dim=1).indices  # (N, num_uncertain)
        chosen = candidates.gather(1, idx.unsqueeze(-1).expand(-1, -1, 2))
    else:
        chosen = candidates.new_zeros((n, num_uncertain, 2))
    if num_random > 0:
        chosen = torch.cat([chosen, rand_points((n, num_random, 2), device, generator)], dim=1)
    return chosen
