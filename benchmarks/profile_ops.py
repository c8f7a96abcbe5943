"""Where the time of one forward goes: why PyTorch eager stays short of its floor on a CPU.

The floor of ``latency.py`` is the forward's counted FLOPs over the measured ``n x n`` sgemm
rate: what the forward would take if every FLOP ran at the rate of one large matmul and nothing
else cost anything. This script profiles the same eager forward (``torch.profiler``, CPU, the
ops' *self* time so nothing is counted twice) and splits it by kind of operator, each beside the
FLOPs ``FlopCounterMode`` assigns to it:

- matmul (``addmm``, ``mm``, ``bmm``...): its rate against the sgemm rate says how far the
  model's matmuls, at their actual shapes, are from the large square one;
- attention (fused ``scaled_dot_product_attention``), convolution: FLOPs at their own rate;
- normalisation, activation, resampling, element-wise arithmetic, data movement (copies,
  reshapes, gathers of the deformable attention), other (dispatch wrappers...): time spent on no
  counted FLOP at all, which the floor does not cover.

The fraction of the floor reached is then (share of time in counted FLOPs) x (their rate as a
fraction of sgemm): the table says which of the two limits it.

    python benchmarks/profile_ops.py                    # large preset, 512 x 512, batch 1
    python benchmarks/profile_ops.py --quick            # tiny preset, a smoke run

Writes ``OUT/profile_ops.json`` and prints a markdown table per variant.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import LARGE, TINY, build_variants  # noqa: E402
from measure import (  # noqa: E402
    environment,
    forward_flop_counts,
    markdown_table,
    matmul_rate,
    write_json,
)

#: operator categories, first match wins (aten names without the ``aten::`` prefix)
CATEGORIES: tuple[tuple[str, re.Pattern], ...] = (
    ("attention", re.compile(r"scaled_dot_product|_flash_attention|_efficient_attention")),
    ("matmul", re.compile(r"^(addmm|mm|bmm|baddbmm|matmul|linear|addbmm|dot|mv)$")),
    ("convolution", re.compile(r"conv|mkldnn_convolution")),
    ("normalisation", re.compile(r"norm")),
    (
        "activation",
        re.compile(r"gelu|relu|softmax|sigmoid|tanh|silu|exp|erf|log_softmax|clamp"),
    ),
    ("resampling", re.compile(r"upsample|grid_sampler|interpolate")),
    (
        "element-wise",
        re.compile(
            r"^(add|sub|mul|div|neg|pow|sqrt|rsqrt|abs|floor|ceil|round|lt|le|gt|ge|eq|"
            r"ne|logical_\w+|bitwise_\w+|remainder|fmod|maximum|minimum|add_|mul_|div_|"
            r"sub_|reciprocal|sum|mean|amax|max|min|any|all|arange|linspace|sort|topk|"
            r"argmax|nonzero)$"
        ),
    ),
    (
        "data movement",
        re.compile(
            r"copy|cat|stack|clone|contiguous|index|gather|scatter|permute|transpose|view|"
            r"^t$|reshape|expand|slice|select|unbind|split|chunk|pad|flatten|squeeze|repeat|"
            r"empty|zeros|ones|fill|as_strided|to$|_to_copy|narrow|roll|flip|where|masked"
        ),
    ),
)
FLOP_CATEGORIES = ("matmul", "attention", "convolution")


def category(op: str) -> str:
    name = op.removeprefix("aten::").removeprefix("aten.").split(".")[0]
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def flops_by_category(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """The counted FLOPs of one forward (what the floor is made of), summed by category."""
    out: dict[str, int] = {}
    for op, n in forward_flop_counts(model, x).items():
        key = category(op)
        out[key] = out.get(key, 0) + n
    return out


def profile_forward(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, float], float]:
    """Self CPU seconds per category of one forward, and its wall time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    times: dict[str, float] = {}
    for event in prof.key_averages():
        key = category(event.key)
        times[key] = times.get(key, 0.0) + event.self_cpu_time_total / 1e6
    return times, sum(times.values())


def measure(model: nn.Module, x: torch.Tensor, repeats: int, rate: float) -> dict[str, Any]:
    flops = flops_by_category(model, x)
    with torch.inference_mode():
        model(x)  # warm-up
    runs = [profile_forward(model, x) for _ in range(repeats)]
    labels = sorted({k for t, _ in runs for k in t} | set(flops), key=_order)
    seconds = {k: float(np.median([t.get(k, 0.0) for t, _ in runs])) for k in labels}
    total = float(np.median([s for _, s in runs]))
    rows = {}
    for k in labels:
        f = flops.get(k, 0)
        achieved = f / seconds[k] if seconds[k] > 0 and f else None
        rows[k] = {
            "seconds": seconds[k],
            "share": seconds[k] / total if total else 0.0,
            "flops": f,
            "flop_rate": achieved,
            "fraction_of_sgemm": achieved / rate if achieved else None,
        }
    counted = sum(flops.values())
    in_flops = sum(rows[k]["seconds"] for k in FLOP_CATEGORIES if k in rows)
    return {
        "categories": rows,
        "total_seconds": total,
        "flops": counted,
        "floor_seconds": counted / rate,
        "fraction_of_floor": counted / rate / total if total else None,
        "share_in_counted_flops": in_flops / total if total else None,
        "rate_in_counted_flops": counted / in_flops if in_flops else None,
    }


def _order(label: str) -> int:
    names = [c for c, _ in CATEGORIES] + ["other"]
    return names.index(label) if label in names else len(names)


def _row(variant: str, label: str, seconds: float, share: float, flops: int, rate: float) -> list:
    achieved = flops / seconds if flops and seconds > 0 else None
    return [
        variant,
        label,
        f"{seconds * 1e3:,.0f}",
        f"{100 * share:.1f}%",
        f"{flops / 1e9:,.1f}" if flops else "-",
        f"{achieved / 1e9:,.1f}" if achieved else "-",
        f"{100 * achieved / rate:.0f}%" if achieved else "-",
    ]


def markdown(report: dict[str, Any]) -> str:
    """One table, the variants one after the other: each category, then the ops with counted
    FLOPs together, then the whole forward (whose rate over sgemm is the fraction of floor)."""
    rate = report["matmul_rate_flops"]
    m = report["meta"]
    rows = []
    for variant, r in report["results"].items():
        for k, c in r["categories"].items():
            rows.append(_row(variant, k, c["seconds"], c["share"], c["flops"], rate))
        counted = r["share_in_counted_flops"] * r["total_seconds"]
        rows.append(
            _row(variant, "*counted FLOPs*", counted, r["share_in_counted_flops"], r["flops"], rate)
        )
        rows.append(_row(variant, "**forward**", r["total_seconds"], 1.0, r["flops"], rate))
    head = (
        f"{m['preset']}, {m['crop']}x{m['crop']} batch 1, PyTorch eager fp32, median of the "
        f"profiled forwards; sgemm {rate / 1e9:.1f} GFLOP/s (the floor's rate)"
    )
    headers = ["variant", "operators", "self ms", "share", "GFLOP", "GFLOP/s", "of sgemm rate"]
    return f"{head}\n\n{markdown_table(headers, rows, 'll' + 'r' * 5)}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny preset at 128 x 128, 2 repeats")
    p.add_argument("--preset", choices=(LARGE, TINY))
    p.add_argument("--crop", type=int, help="crop side (default 512)")
    p.add_argument("--variants", default="base,merged", help="of: base, merged, unmerged")
    p.add_argument("--repeats", type=int, help="profiled forwards per variant (default 3)")
    p.add_argument("--matmul-size", type=int, help="n of the n x n sgemm rate (default 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args(argv)
    args.preset = args.preset or (TINY if args.quick else LARGE)
    args.crop = args.crop or (128 if args.quick else 512)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.matmul_size = args.matmul_size or (1024 if args.quick else 4096)
    args.variants = args.variants.split(",")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rate = matmul_rate("cpu", torch.float32, args.matmul_size)
    models = build_variants(args.preset, args.crop, args.variants, args.seed)
    x = torch.randn(1, 3, args.crop, args.crop, generator=torch.Generator().manual_seed(0))
    report: dict[str, Any] = {
        "meta": {**environment(), "preset": args.preset, "crop": args.crop},
        "matmul_rate_flops": rate,
        "results": {},
    }
    for variant, model in models.items():
        print(f"  profiling {variant} ({args.repeats} forwards)", flush=True)
        report["results"][variant] = measure(model, x, args.repeats, rate)
    print()
    print(markdown(report))
    print(f"wrote {write_json(args.out / 'profile_ops.json', report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
