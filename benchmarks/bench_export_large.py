"""Export the paper's model (random weights) to ONNX and run one 512x512 crop through ONNX
Runtime on the CPU against PyTorch: export time, inference times, peak memory, agreement.

    python benchmarks/bench_export_large.py [--out large.onnx] [--json out.json]

Not run in CI: it needs several GB of memory and minutes of CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from recyclelora.deploy.export import onnxruntime_logits, runtime_check
from recyclelora.deploy.onnx_graph import export_onnx, graph_facts
from recyclelora.models import build_model


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, help="where to keep the graph (default: a temporary)")
    p.add_argument("--json", type=Path, default=Path("benchmarks/out/export_large.json"))
    args = p.parse_args()
    result: dict = {"device": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    torch.manual_seed(0)
    model = build_model(
        "dinov2_large_mask2former", adapters=None, deform_attn_impl="gather", img_size=512
    ).eval()
    images = np.random.default_rng(0).uniform(0, 255, (1, 3, 512, 512)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or Path(tmp) / "large.onnx"
        start = time.perf_counter()
        export_onnx(model, path, (512, 512), max_batch=8)
        result["export_s"] = time.perf_counter() - start
        result["export_peak_gib"] = peak_gib()
        facts = graph_facts(path)
        result["graph"] = {
            "opset": facts.opset,
            "nodes": sum(facts.ops.values()),
            "weights": facts.parameters,
        }
        start = time.perf_counter()
        with torch.no_grad():
            want = model(torch.from_numpy(images)).numpy()
        result["pytorch_cpu_s"] = time.perf_counter() - start
        start = time.perf_counter()
        got = onnxruntime_logits(path, images, max_batch=8)
        result["onnxruntime_cpu_with_session_s"] = time.perf_counter() - start
        result["agreement"] = runtime_check(want, got)
        result["peak_gib"] = peak_gib()
    rows = [
        ("ONNX export", f"{result['export_s']:.0f} s (peak {result['export_peak_gib']:.1f} GiB)"),
        ("graph", f"opset {result['graph']['opset']}, {result['graph']['nodes']} nodes"),
        ("PyTorch CPU, 1 crop", f"{result['pytorch_cpu_s']:.1f} s"),
        ("ONNX Runtime CPU, 1 crop + session", f"{result['onnxruntime_cpu_with_session_s']:.1f} s"),
        ("max error / logit range", f"{result['agreement']['rel_error']:.2e}"),
        ("argmax agreement", f"{result['agreement']['argmax_agreement']:.4%}"),
        ("peak memory", f"{result['peak_gib']:.1f} GiB"),
    ]
    print("| large preset, 512 x 512 | |\n|---|---|")
    print("\n".join(f"| {k} | {v} |" for k, v in rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
