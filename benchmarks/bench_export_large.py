"""Export the paper's model (random weights) to ONNX and run one 512x512 crop through ONNX
Runtime on the CPU against PyTorch: export time, inference times, peak memory, agreement.

    python benchmarks/bench_export_large.py [--graph large.onnx] [--out benchmarks/out]
    python benchmarks/bench_export_large.py --quick     # the tiny preset at 128 x 128

The full run needs several GB of memory and minutes of CPU. Writes ``OUT/export_large.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import markdown_table, write_json  # noqa: E402

from recyclelora.deploy.export import onnxruntime_logits, runtime_check  # noqa: E402
from recyclelora.deploy.onnx_graph import export_onnx, graph_facts  # noqa: E402
from recyclelora.models import build_model  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="the tiny preset at 128 x 128")
    p.add_argument("--graph", type=Path, help="where to keep the graph (default: a temporary)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="folder for the JSON")
    args = p.parse_args()
    preset, size = ("tiny", 128) if args.quick else ("dinov2_large_mask2former", 512)
    result: dict = {
        "device": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "preset": preset,
        "size": size,
    }
    torch.manual_seed(0)
    model = build_model(preset, adapters=None, deform_attn_impl="gather", img_size=size).eval()
    images = np.random.default_rng(0).uniform(0, 255, (1, 3, size, size)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.graph or Path(tmp) / f"{preset}.onnx"
        start = time.perf_counter()
        export_onnx(model, path, (size, size), max_batch=8)
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
        (
            "ONNX Runtime CPU, 1 crop + InferenceSession",
            f"{result['onnxruntime_cpu_with_session_s']:.1f} s",
        ),
        ("max error / logit range", f"{result['agreement']['rel_error']:.2e}"),
        ("argmax agreement", f"{result['agreement']['argmax_agreement']:.4%}"),
        ("peak memory", f"{result['peak_gib']:.1f} GiB"),
    ]
    print(markdown_table([f"{preset}, {size} x {size}", ""], rows, "ll"))
    print(f"wrote {write_json(args.out / 'export_large.json', result)}")


if __name__ == "__main__":
    main()
