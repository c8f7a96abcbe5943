"""Adapter demo on any CPU, in seconds: adapt, train, save/reload, merge — and check each step.

    python -m recyclelora.demo [--steps 60] [--out runs/adapter_demo]

A tiny DINOv2 (random weights) learns a toy patch-labelling problem through its RecycleLoRA adapters
and a linear head. The demo shows the three promises of the method: the adapted model starts
exactly where the base model is, only the adapters (and the head) train, and merging gives a model
with the base model's layers, keys and parameter count and the adapted model's outputs.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import (
    RecycleLoRAConfig,
    apply_recyclelora,
    build_param_groups,
    load_adapters,
    merge_recyclelora,
    save_adapters,
)
from .analysis import load_source, summarise
from .models.dinov2 import dinov2_tiny

NUM_CLASSES = 4
COLOURS = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.9, 0.2], [0.2, 0.2, 0.9]])


class PatchSegmenter(nn.Module):
    """Backbone + 1x1 conv on stride-16 features: x (B, 3, H, W) -> logits (B, C, H/16, W/16)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = dinov2_tiny(img_size=64, patch_size=16, layerscale_init=1.0)
        self.head = nn.Conv2d(self.backbone.embed_dim, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[2])


def toy_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (n, 3, 64, 64) of 16x16-aligned coloured rectangles on noise; labels per patch."""
    labels = torch.zeros(n, 4, 4, dtype=torch.long)
    for i in range(n):
        for _ in range(2):
            y0, x0 = torch.randint(0, 3, (2,), generator=g).tolist()
            h, w = torch.randint(1, 3, (2,), generator=g).tolist()
            labels[i, y0 : y0 + h, x0 : x0 + w] = int(
                torch.randint(1, NUM_CLASSES, (1,), generator=g)
            )
    img = COLOURS[labels].permute(0, 3, 1, 2).repeat_interleave(16, 2).repeat_interleave(16, 3)
    return img + 0.15 * torch.randn(img.shape, generator=g), labels


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--out", default="runs/adapter_demo", help="where the adapter file goes")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()

    model = PatchSegmenter()
    base = copy.deepcopy(model)  # the "pre-trained" model, kept to compare against
    x_val, y_val = toy_batch(32, g)
    feats0 = base.backbone(x_val)

    print("1. adapt the backbone")
    report = apply_recyclelora(model.backbone, RecycleLoRAConfig(main_rank=8, sub_rank=2))
    print(f"   {report}")
    err = max(rel(a, b) for a, b in zip(model.backbone(x_val), feats0, strict=True))
    print(f"   backbone output vs. base model at init: relative error {err:.1e}")

    print(f"2. train adapters + head for {args.steps} steps (AdamW, recipe parameter groups)")
    groups = build_param_groups(model, lr=3e-3, weight_decay=0.05)
    print("   groups: " + ", ".join(f"{gr['name']} lr={gr['lr']:.1e}" for gr in groups))
    opt = torch.optim.AdamW(groups)
    before = {n: t.clone() for n, t in model.backbone.state_dict().items()}
    for step in range(args.steps):
        x, y = toy_batch(16, g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (0, args.steps - 1):
            print(f"   step {step + 1:3d}  loss {loss.item():.3f}")
    changed = {n for n, t in model.backbone.state_dict().items() if not torch.equal(t, before[n])}
    print(
        f"   backbone tensors changed by training: {sorted({n.rsplit('.', 1)[1] for n in changed})}"
    )
    with torch.no_grad():
        acc = (model(x_val).argmax(1) == y_val).float().mean().item()
    print(f"   patch accuracy on held-out images: {acc:.1%} (chance {1 / NUM_CLASSES:.0%})")

    print("3. save the adapters alone and re-attach them to a fresh copy of the base model")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = save_adapters(model.backbone, out / "adapters.safetensors")
    fresh = copy.deepcopy(base)
    load_adapters(fresh.backbone, path)
    fresh.head.load_state_dict(model.head.state_dict())
    same = all(torch.equal(a, b) for a, b in zip(fresh(x_val), model(x_val), strict=True))
    print(f"   {path} ({path.stat().st_size / 1e3:.0f} kB): outputs bit-identical: {same}")

    stats = summarise(load_source(model.backbone))["summary"]
    print(
        f"   analysis: main effective rank {stats['main']['effective_rank_mean']:.2f} of 8, "
        f"φ(main, sub) {stats['phi_mean']:.3f}"
    )

    print("4. merge: fold the adapters into plain nn.Linear weights")
    with torch.no_grad():
        y_adapted = model(x_val)
        merge_recyclelora(model.backbone)
        y_merged = model(x_val)
    count = lambda m: sum(t.numel() for t in m.backbone.parameters())  # noqa: E731
    base_keys = {k: v.shape for k, v in base.state_dict().items()}
    merged_keys = {k: v.shape for k, v in model.state_dict().items()}
    print(f"   merged vs. adapted outputs: relative error {rel(y_merged, y_adapted):.1e}")
    print(f"   backbone parameters: base {count(base):,}, merged {count(model):,}")
    print(f"   state_dict keys and shapes equal to the base model's: {base_keys == merged_keys}")
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
