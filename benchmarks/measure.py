"""What the benchmark scripts share: summaries, the bootstrap interval of a ratio, FLOP counts,
the device's matmul rate, the environment a figure was measured in, markdown and JSON output.

Scripts import it as a sibling module (``sys.path`` holds the script's folder when it runs).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recyclelora.atomic import write_text

REPO = Path(__file__).resolve().parents[1]
VERSIONED = ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "matplotlib")


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, 10th and 90th percentiles (seconds) and the number of samples."""
    t = np.asarray(times, dtype=np.float64)
    p10, med, p90 = np.percentile(t, [10, 50, 90])
    return {"median_s": float(med), "p10_s": float(p10), "p90_s": float(p90), "n": len(t)}


def paired_ratio_ci(
    numerator: Sequence[float],
    denominator: Sequence[float],
    *,
    resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """The geometric mean of the paired ratios ``numerator[i] / denominator[i]`` and its
    percentile-bootstrap interval. Returns (ratio, lo, hi).

    Sample ``i`` of both was measured in the same repetition, back to back, so their ratio
    cancels the load the machine put on that repetition; averaging the log-ratios of every
    repetition uses all of them (a ratio of medians keeps the middle one of each variant and
    needs about twice the repetitions for the same interval). A resample draws repetitions,
    pairs intact. Seeded: the same data give the same interval.
    """
    a = np.asarray(numerator, dtype=np.float64)
    b = np.asarray(denominator, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two paired 1-d samples of one length, got {a.shape} and {b.shape}")
    if not (np.all(a > 0) and np.all(b > 0)):
        raise ValueError("times must be positive")
    logs = np.log(a / b)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    tail = 100 * (1 - level) / 2
    lo, hi = np.exp(np.percentile(logs[idx].mean(axis=1), [tail, 100 - tail]))
    return float(np.exp(logs.mean())), float(lo), float(hi)


def _attention_flops(q_shape, k_shape, v_shape, *args: Any, **kwargs: Any) -> int:
    """``softmax(q kᵀ) v`` of shapes (..., n, d), (..., m, d), (..., m, dv): two matmuls."""
    *batch, n, d = q_shape
    m, dv = k_shape[-2], v_shape[-1]
    return 2 * math.prod(batch) * n * m * (d + dv)


def _cpu_attention_formulas() -> dict[Any, Any]:
    """Formulas ``FlopCounterMode`` lacks: torch's table counts the CUDA flash-attention kernel
    but not the CPU one (``_scaled_dot_product_flash_attention_for_cpu``, what DINOv2's
    attention runs here), which would leave the backbone's attention out of the floor."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _attention_flops} if op is not None else {}


def forward_flop_counts(model: nn.Module, *inputs: torch.Tensor) -> dict[str, int]:
    """FLOPs of one forward per operator (``aten.addmm``...), counted by
    ``torch.utils.flop_counter`` (matmuls, convolutions, attention: a multiply-add is 2 FLOPs;
    element-wise ops are not counted), the CPU attention kernel included.

    ``FlopCounterMode`` fails on the segmentor under ``torch.no_grad()``, so autograd stays on
    and no parameter requires a gradient (restored afterwards): nothing is recorded for backward.
    """
    from torch.utils.flop_counter import FlopCounterMode

    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas()) as counter:
            model(*inputs)
        counts = counter.get_flop_counts().get("Global", {})
        return {str(op): int(n) for op, n in counts.items()}
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def forward_flops(model: nn.Module, *inputs: torch.Tensor) -> int:
    """Total FLOPs of one forward (:func:`forward_flop_counts`)."""
    return sum(forward_flop_counts(model, *inputs).values())


def matmul_rate(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    n: int = 4096,
    repeats: int = 3,
    warmup: int = 2,
) -> float:
    """FLOP/s of an ``n x n`` matmul on ``device`` in ``dtype``: the best of ``repeats`` after
    ``warmup`` untimed ones, i.e. what the device's matmul kernel reaches here and now."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(n, n, generator=g).to(device, dtype) for _ in range(2))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    best = float("inf")
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        if i >= warmup:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_line() -> str:
    """The CPU with its core count, and the GPU where one is visible."""
    cpu = f"{cpu_name()}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); {cpu}"
    return f"{cpu}, no GPU"


def versions() -> dict[str, str]:
    import cv2  # its distribution has several names (opencv-python, -headless, ...)

    out = {"python": platform.python_version(), "opencv": cv2.__version__}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def shown(path: str | Path) -> str:
    """A path as the repository's text shows it: relative to the root where it is inside."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


def _shown_argument(arg: str) -> str:
    """An absolute path inside the repository, alone or as ``--option=PATH``, shown relative."""
    flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    return f"{flag}{eq}{shown(value)}" if Path(value).is_absolute() else arg


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed from the repository root: ``python <script> args``, with paths
    inside the repository relative to it (no machine's folders in recorded results)."""
    argv = list(sys.argv if argv is None else argv)
    return shlex.join(["python", shown(argv[0]), *map(_shown_argument, argv[1:])])


def environment() -> dict[str, Any]:
    return {
        "device": device_line(),
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(),
        "command": command_line(),
        "torch_threads": torch.get_num_threads(),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A GitHub markdown table; ``align`` holds one of 'l' / 'r' per column (default: the first
    column left, the others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = [headers, rule, *[[str(c) for c in r] for r in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` atomically as indented JSON (the parent folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(data, indent=2) + "\n")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out
