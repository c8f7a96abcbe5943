"""Export the paper's model (random weights) to ONNX and run one 512x512 crop through ONNX
Runtime on the CPU against PyTorch: export time, inference times, peak memory, agreement.

    python benchmarks/bench_export_large.py [--out /tmp/large.onnx]

Not run in CI: it needs several GB of memory and minutes of CPU.
"""

from __future__ import annotations

import argparse
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
    args = p.parse_args()
    torch.manual_seed(0)
    model = build_model(
        "dinov2_large_mask2former", adapters=None, deform_attn_impl="gather", img_size=512
    ).eval()
    images = np.random.default_rng(0).uniform(0, 255, (1, 3, 512, 512)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.out or Path(tmp) / "large.onnx"
        start = time.perf_counter()
        export_onnx(model, path, (512, 512), max_batch=8)
        print(f"ONNX export: {time.perf_counter() - start:.0f} s, peak {peak_gib():.1f} GiB")
        facts = graph_facts(path)
        nodes = sum(facts.ops.values())
        print(f"graph: opset {facts.opset}, {nodes} nodes, {facts.parameters:,} weights")
        start = time.perf_counter()
        with torch.no_grad():
            want = model(torch.from_numpy(images)).numpy()
        print(f"PyTorch CPU: {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        got = onnxruntime_logits(path, images, max_batch=8)
        print(f"ONNX Runtime CPU (incl. session): {time.perf_counter() - start:.1f} s")
        print(runtime_check(want, got))
        print(f"peak memory {peak_gib():.1f} GiB")


if __name__ == "__main__":
    main()
