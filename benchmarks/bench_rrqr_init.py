"""Time to RRQR-initialise every DINOv2-L linear layer (docs/method.md §1), four ways.

One pivoted QR per layer serving both adapters (what the library does) against one QR per
adapter (two per layer, the pattern of the authors' code), each with the decomposition in
float32 and in float64. Variants run interleaved, layer by layer, so machine load hits them
alike. Weights are random with DINOv2-L shapes (the time does not depend on their values).
Prints a table and writes JSON.

    python benchmarks/bench_rrqr_init.py [--blocks 24] [--out benchmarks/out/rrqr_init.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from recyclelora import RecycleLoRAConfig, RecycleLoRALinear
from recyclelora.adapters.init import rrqr_factors

SHAPES = {"attn.qkv": (3072, 1024), "attn.proj": (1024, 1024), "mlp.fc1": (4096, 1024)}
SHAPES["mlp.fc2"] = (1024, 4096)


def init_once(linear: nn.Linear, cfg: RecycleLoRAConfig) -> RecycleLoRALinear:
    return RecycleLoRALinear.from_linear(linear, cfg)


def init_twice(linear: nn.Linear, cfg: RecycleLoRAConfig) -> RecycleLoRALinear:
    """One decomposition per adapter, as the authors' code does."""
    main, _ = rrqr_factors(linear.weight, cfg.main_rank, 0, cfg.qr_dtype)
    _, sub = rrqr_factors(linear.weight, 0, cfg.sub_rank, cfg.qr_dtype)
    layer = RecycleLoRALinear(
        linear.in_features, linear.out_features, cfg.main_rank, cfg.sub_rank, cfg.alpha
    )
    layer.reset_to_initial(linear.weight, linear.bias, {"main": main, "sub": sub})
    return layer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--blocks", type=int, default=24, help="DINOv2-L blocks (24 = all 96 layers)")
    p.add_argument("--main-rank", type=int, default=32)
    p.add_argument("--sub-rank", type=int, default=4)
    p.add_argument("--out", default="benchmarks/out/rrqr_init.json")
    args = p.parse_args()

    cfg64 = RecycleLoRAConfig(args.main_rank, args.sub_rank, qr_dtype="float64")
    cfg32 = RecycleLoRAConfig(args.main_rank, args.sub_rank, qr_dtype="float32")
    variants: dict[str, tuple[Callable, RecycleLoRAConfig]] = {
        "one QR / layer, float64": (init_once, cfg64),
        "two QRs / layer, float64": (init_twice, cfg64),
        "one QR / layer, float32": (init_once, cfg32),
        "two QRs / layer, float32": (init_twice, cfg32),
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    torch.manual_seed(0)
    n = args.blocks * len(SHAPES)
    for i in range(n):
        d, k = list(SHAPES.values())[i % len(SHAPES)]
        linear = nn.Linear(k, d)
        for name, (fn, cfg) in variants.items():
            t = time.perf_counter()
            fn(linear, cfg)
            times[name].append(time.perf_counter() - t)
        print(f"\rlayer {i + 1}/{n}", end="", flush=True)
    print()

    base = "one QR / layer, float64"
    rows = []
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[base], strict=True)]
        rows.append(
            {
                "variant": name,
                "total_s": sum(ts),
                "median_layer_s": statistics.median(ts),
                "median_ratio_vs_one_qr_f64": statistics.median(ratios),
            }
        )
    print(f"{'variant':<38}{'total s':>10}{'median/layer s':>16}{'x 1 QR f64':>12}")
    for r in rows:
        print(
            f"{r['variant']:<38}{r['total_s']:>10.2f}{r['median_layer_s']:>16.3f}"
            f"{r['median_ratio_vs_one_qr_f64']:>12.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "layers": n,
        "ranks": [args.main_rank, args.sub_rank],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
