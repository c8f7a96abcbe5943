"""Time to RRQR-initialise every DINOv2-L linear layer (docs/method.md §1), four ways.

One pivoted QR per layer serving both adapters (what the library does) against one QR per
adapter (two per layer, the pattern of the authors' code), each with the decomposition in
float32 and in float64. Variants run interleaved, layer by layer, so machine load hits them
alike. Weights are random with DINOv2-L shapes (the time does not depend on their values).
Prints a table and writes JSON.

    python benchmarks/bench_rrqr_init.py [--blocks 24] [--out benchmarks/out]   # -> rrqr_init.json
    python benchmarks/bench_rrqr_init.py --quick    # one block at a quarter of the width
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import markdown_table, write_json  # noqa: E402

from recyclelora import RecycleLoRAConfig, RecycleLoRALinear  # noqa: E402
from recyclelora.adapters.init import rrqr_factors  # noqa: E402

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
    p.add_argument("--quick", action="store_true", help="1 block, shapes at a quarter width")
    p.add_argument("--blocks", type=int, help="DINOv2-L blocks (default 24 = all 96 layers)")
    p.add_argument("--width", type=int, help="model width (default 1024, DINOv2-L's)")
    p.add_argument("--main-rank", type=int, default=32)
    p.add_argument("--sub-rank", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="folder for the JSON")
    args = p.parse_args()
    args.blocks = args.blocks or (1 if args.quick else 24)
    args.width = args.width or (256 if args.quick else 1024)
    shapes = [(d * args.width // 1024, k * args.width // 1024) for d, k in SHAPES.values()]

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
    n = args.blocks * len(shapes)
    for i in range(n):
        d, k = shapes[i % len(shapes)]
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
    table = [
        [
            r["variant"],
            f"{r['total_s']:.2f}",
            f"{r['median_layer_s']:.3f}",
            f"{r['median_ratio_vs_one_qr_f64']:.2f}",
        ]
        for r in rows
    ]
    headers = ["variant", "total s", "median s / layer", "median ratio vs one QR, float64"]
    print(markdown_table(headers, table))
    meta = {
        "layers": n,
        "width": args.width,
        "ranks": [args.main_rank, args.sub_rank],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"wrote {write_json(args.out / 'rrqr_init.json', {'meta': meta, 'rows': rows})}")


if __name__ == "__main__":
    main()
