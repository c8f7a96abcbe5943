"""Training-step time, iterations per second and peak GPU memory of a preset.

The full step (forward, losses, backward, AdamW) of the model with its adapters, measured two
ways side by side in one process:

- "synthetic batch": random images and labels, so the figure is the model and optimiser alone;
- "GTAV-size files": the real TrainSet, augmentation and DataLoader over 1914x1052 PNG scenes,
  so the figure includes data loading (the synthetic-to-real recipe's step).

Defaults: the large preset (DINOv2-L + Mask2Former), batch 4, 512x512 crops, bf16 autocast;
``--precision fp32`` measures the recipe's own arithmetic (docs/method.md §3).

    python benchmarks/bench_train_step.py                              # GPU: large, bs 4, bf16
    python benchmarks/bench_train_step.py --precision fp32             # GPU: the recipe's fp32
    python benchmarks/bench_train_step.py --preset tiny --size 128 --iters 3   # CPU smoke run
    python benchmarks/bench_train_step.py --quick      # the same, 2 steps, 4 files, 1 worker

Prints a table and writes JSON (``--out`` folder, default benchmarks/out: train_step.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from recyclelora import RecycleLoRAConfig, build_model, build_param_groups
from recyclelora.data import TrainSet, build_loader, build_train_sampler
from recyclelora.data.datasets import GTAV
from recyclelora.data.transforms import TrainTransform
from recyclelora.engine.trainer import autocast_dtype

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import write_gtav  # noqa: E402
from measure import markdown_table, write_json  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(model, optimizer, batches, device, amp, iters: int, warmup: int) -> dict:
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + iters):
        t = time.perf_counter()
        batch = next(batches)
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = model.loss(images, labels, valid_hw=batch["valid_hw"].to(device))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"median_step_s": med, "it_per_s": 1 / med, "peak_mem_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny, 128, 2 steps, 1 worker")
    p.add_argument("--preset", help="default dinov2_large_mask2former")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, help="crop side (default 512)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--iters", type=int, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5)")
    p.add_argument("--workers", type=int, help="DataLoader workers (default 4)")
    p.add_argument("--images", type=int, help="GTAV-size files to generate (default 32)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="folder for the JSON")
    args = p.parse_args()
    quick = {"preset": "tiny", "size": 128, "iters": 2, "warmup": 1, "workers": 1, "images": 4}
    full = {
        "preset": "dinov2_large_mask2former",
        "size": 512,
        "iters": 20,
        "warmup": 5,
        "workers": 4,
        "images": 32,
    }
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = autocast_dtype(args.precision, device)
    torch.manual_seed(0)
    # Kaiming-initialised adapters skip the RRQR start-up; a step costs the same either way.
    model = build_model(
        args.preset, adapters=RecycleLoRAConfig(32, 4, init="kaiming"), img_size=args.size
    ).to(device)
    optimizer = torch.optim.AdamW(build_param_groups(model, 1e-4, 0.05))

    def synthetic():
        g = torch.Generator().manual_seed(0)
        while True:
            yield {
                "image": torch.randint(0, 256, (args.batch, 3, args.size, args.size), generator=g),
                "label": torch.randint(0, 19, (args.batch, args.size, args.size), generator=g),
                "valid_hw": torch.tensor([[args.size, args.size]] * args.batch),
            }

    rows = [
        {
            "variant": "synthetic batch",
            **run(model, optimizer, synthetic(), device, amp, args.iters, args.warmup),
        }
    ]
    with tempfile.TemporaryDirectory() as tmp:
        write_gtav(Path(tmp) / "gta", args.images)
        ts = TrainSet(
            [GTAV(Path(tmp) / "gta", converted=False)], TrainTransform(crop_size=args.size)
        )
        sampler = build_train_sampler(ts, args.batch, seed=0, gtav_subset=None)
        loader = build_loader(ts, sampler, num_workers=args.workers, persistent_workers=False)
        batches = iter(loader)
        rows.append(
            {
                "variant": f"GTAV-size files, {args.workers} workers",
                **run(model, optimizer, batches, device, amp, args.iters, args.warmup),
            }
        )
        del batches, loader
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    precision = args.precision if amp else "fp32"
    print(f"{args.preset}, batch {args.batch}, {args.size}x{args.size}, {precision}, {name}")
    table = [
        [
            r["variant"],
            f"{r['median_step_s']:.3f}",
            f"{r['it_per_s']:.2f}",
            "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}",
        ]
        for r in rows
    ]
    print(markdown_table(["variant", "s / step", "it / s", "peak GiB"], table))
    meta = {
        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": name,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"wrote {write_json(args.out / 'train_step.json', {'meta': meta, 'rows': rows})}")


if __name__ == "__main__":
    main()
