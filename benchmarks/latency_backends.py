"""The inference backends ``latency.py`` times, each behind the deployment ``Runner`` interface
(float32 RGB crops in, float32 class scores out, numpy on both sides), so every backend runs the
same crops and the same ``segment`` sliding window, and host/device copies count alike.

A backend's ``make`` takes what it runs: the variant's ``nn.Module`` (already on the backend's
device) for the PyTorch backends, or the folder holding the variant's ``model.onnx`` for ONNX
Runtime and TensorRT. The GPU backends exist only where ``torch.cuda.is_available()``; they are
written to the libraries' documented APIs and kept to a few lines each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recyclelora.deploy import Manifest, Runner
from recyclelora.deploy.manifest import ONNX

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModuleRunner(Runner):
    """A PyTorch module (eager or ``torch.compile``'d) in inference mode, optionally under
    autocast to ``amp`` (bf16 / fp16 on a GPU)."""

    name = "torch"

    def __init__(
        self, module: Any, manifest: Manifest, device: str, amp: str = "fp32", detail: str = ""
    ) -> None:
        super().__init__(manifest.input_size, manifest.max_batch, manifest.num_classes, detail)
        self.module, self.device, self.amp = module, torch.device(device), amp
        self.manifest = manifest

    def _autocast(self, cache_enabled: bool = True):
        return torch.autocast(
            self.device.type,
            dtype=DTYPES[self.amp],
            enabled=self.amp != "fp32",
            cache_enabled=cache_enabled,
        )

    def _run(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(self.device)
        with torch.inference_mode(), self._autocast():
            y = self.module(x)
        return y.float().cpu().numpy()


class CUDAGraphRunner(ModuleRunner):
    """The eager module captured into one CUDA graph per batch size (``torch.cuda.graph``),
    replayed on static input and output tensors. Autocast's weight cache is off during capture,
    as ``torch.cuda.graph`` requires."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def _capture(self, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode(), self._autocast(False):
            for _ in range(3):  # warm-up on a side stream before capture
                self.module(x)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode(), self._autocast(False):
            y = self.module(x)
        return graph, x, y

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) not in self.graphs:
            self.graphs[len(batch)] = self._capture(torch.from_numpy(batch).to(self.device))
        graph, x, y = self.graphs[len(batch)]
        x.copy_(torch.from_numpy(batch))
        graph.replay()
        return y.float().cpu().numpy()


@dataclass(frozen=True)
class Backend:
    """name: as in tables and ``--backends``; device, precision: where it runs and the matmul
    rate of its floor; graph: whether ``make`` takes the ONNX folder (else the module);
    compiles: its first call compiles (bounded by ``--compile-timeout``)."""

    name: str
    device: str
    precision: str
    graph: bool
    make: Callable[[Any, Manifest], Runner]
    compiles: bool = False


def _eager(device: str, amp: str) -> Callable[[nn.Module, Manifest], Runner]:
    return lambda module, m: ModuleRunner(module, m, device, amp, f"torch eager {device} {amp}")


def _compiled(device: str, amp: str) -> Callable[[nn.Module, Manifest], Runner]:
    def make(module: nn.Module, m: Manifest) -> Runner:
        detail = f"torch.compile {device} {amp}"
        return ModuleRunner(torch.compile(module), m, device, amp, detail)

    return make


def _cuda_graph(amp: str) -> Callable[[nn.Module, Manifest], Runner]:
    return lambda module, m: CUDAGraphRunner(module, m, "cuda", amp, f"CUDA graph {amp}")


def _onnxruntime(provider: str) -> Callable[[Path, Manifest], Runner]:
    def make(folder: Path, m: Manifest) -> Runner:
        from recyclelora.deploy.runners import OnnxRuntimeRunner

        # one arena for all variants: three large graphs with one each do not fit in 24 GB
        runner = OnnxRuntimeRunner(folder / ONNX, m, providers=[provider], shared_arena=True)
        if runner.provider != provider:
            raise RuntimeError(f"onnxruntime ran {runner.provider}, not {provider}")
        runner.manifest = m
        return runner

    return make


def _tensorrt(precision: str) -> Callable[[Path, Manifest], Runner]:
    """The variant's graph in ``precision`` (``onnx_precision``) built into an engine for this
    GPU, both cached in the graph's folder."""

    def make(folder: Path, m: Manifest) -> Runner:
        from recyclelora.deploy.onnx_precision import reduced_precision_onnx
        from recyclelora.deploy.tensorrt import (
            TensorRTRunner,
            build_engine,
            engine_name,
            local_environment,
            onnx_for,
        )

        env = local_environment()  # raises TensorRTUnavailable where it cannot run
        graph = folder / onnx_for(precision)
        if not graph.is_file():
            reduced_precision_onnx(folder / ONNX, graph, precision)
        engine = folder / engine_name(env["gpu"], env["tensorrt"], precision)
        if not engine.is_file():
            engine, _ = build_engine(
                graph, folder, precision=precision, input_size=m.input_size, max_batch=m.max_batch
            )
        runner = TensorRTRunner(engine, m.input_size, m.max_batch, m.num_classes)
        runner.manifest = m
        return runner

    return make


CPU_BACKENDS = (
    Backend("eager", "cpu", "fp32", False, _eager("cpu", "fp32")),
    Backend("compile", "cpu", "fp32", False, _compiled("cpu", "fp32"), compiles=True),
    Backend("ort", "cpu", "fp32", True, _onnxruntime("CPUExecutionProvider")),
)
GPU_BACKENDS = (
    *(Backend(f"eager-{p}", "cuda", p, False, _eager("cuda", p)) for p in ("bf16", "fp16")),
    *(
        Backend(f"compile-{p}", "cuda", p, False, _compiled("cuda", p), compiles=True)
        for p in ("bf16", "fp16")
    ),
    *(Backend(f"cudagraph-{p}", "cuda", p, False, _cuda_graph(p)) for p in ("bf16", "fp16")),
    Backend("ort-cuda", "cuda", "fp32", True, _onnxruntime("CUDAExecutionProvider")),
    *(Backend(f"trt-{p}", "cuda", p, True, _tensorrt(p)) for p in ("fp16", "bf16")),
)
BACKENDS = {b.name: b for b in CPU_BACKENDS + GPU_BACKENDS}
