"""Evaluation protocol of docs/method.md §4: per-target rescale, sliding window, predictions resized
back to the label, one int64 confusion matrix per target reduced over DDP ranks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..data import CLASS_NAMES, build_loader, colorize
from ..evaluation import all_reduce_, confusion_matrix, summarise
from .distributed import Context


@torch.no_grad()
def predict_labels(
    model: nn.Module,
    image: torch.Tensor,
    out_hw: tuple[int, int],
    mode: str,
    crop: int,
    stride: int,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """image (3, h, w) uint8 at the evaluation scale -> (H, W) int64 train ids at ``out_hw``."""
    device = next(model.parameters()).device
    x = image[None].to(device, non_blocking=True).float()
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model.predict(x, mode=mode, crop=crop, stride=stride)
    logits = F.interpolate(logits.float(), size=out_hw, mode="bilinear", align_corners=False)
    return logits[0].argmax(0)


def evaluate(
    model: nn.Module,
    targets: Mapping[str, Dataset],
    ctx: Context,
    *,
    mode: str = "slide",
    crop: int = 512,
    stride: int = 341,
    autocast_dtype: torch.dtype | None = None,
    workers: int = 2,
    save_predictions: str | Path | None = None,
) -> dict:
    """Evaluate on every target; returns ``evaluation.summarise`` results (on every rank)."""
    was_training = model.training
    model.eval()
    confusions = {}
    for name, dataset in targets.items():
        loader = build_loader(
            dataset, num_workers=workers, rank=ctx.rank, world_size=ctx.world_size
        )
        cm = torch.zeros(len(CLASS_NAMES), len(CLASS_NAMES), dtype=torch.int64, device=ctx.device)
        bar = tqdm(loader, desc=f"eval {name}", unit="img", disable=not ctx.is_main or None)
        for batch in bar:
            for i in range(len(batch["path"])):
                label = batch["label"][i].to(ctx.device)
                pred = predict_labels(
                    model, batch["image"][i], tuple(label.shape), mode, crop, stride, autocast_dtype
                )
                cm += confusion_matrix(pred, label, len(CLASS_NAMES))
                if save_predictions is not None:
                    out = Path(save_predictions) / name / (Path(batch["path"][i]).stem + ".png")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    rgb = colorize(pred.cpu().numpy().astype(np.uint8))
                    cv2.imwrite(str(out), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        confusions[name] = all_reduce_(cm)
    model.train(was_training)
    return summarise(confusions, CLASS_NAMES)
