"""``load_export(dir, backend)``: an export directory -> a ready :class:`Runner`.

"auto" takes the fastest backend this machine can run: a TensorRT engine (needs the
``tensorrt`` package and a CUDA GPU), else ONNX Runtime on its best execution provider
(TensorRT EP, CUDA EP, CPU EP), else PyTorch on the merged weights. The runner's ``reason``
says what was picked and why; it is also logged. Each artefact is checked against its SHA-256 in
``model.json`` before it is opened.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from .manifest import ONNX, WEIGHTS, BackendUnavailable, ExportError, Manifest, verify_artefact
from .runner import Runner

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _onnx_files(directory: Path, manifest: Manifest) -> Path:
    """The verified graph, and its external-data file when the export wrote one."""
    sidecar = f"{ONNX}.data"
    if sidecar in manifest.artefacts:
        verify_artefact(directory, manifest, sidecar)
    return verify_artefact(directory, manifest, ONNX)


def _tensorrt(directory: Path, manifest: Manifest, device: str | None) -> Runner:
    from .tensorrt import TensorRTRunner, TensorRTUnavailable

    try:
        return TensorRTRunner.from_export(directory, manifest, device=device)
    except TensorRTUnavailable as e:
        raise BackendUnavailable(f"backend 'tensorrt' cannot run here: {e}") from e


def _onnxruntime(directory: Path, manifest: Manifest, device: str | None) -> Runner:
    if not _installed("onnxruntime"):
        raise BackendUnavailable(
            "backend 'onnxruntime' needs the onnxruntime package: pip install onnxruntime "
            "(onnxruntime-gpu for CUDA)"
        )
    from .runners import OnnxRuntimeRunner, available_providers

    providers = available_providers()
    if device == "cpu":
        providers = ["CPUExecutionProvider"]
    elif device is not None and device.startswith("cuda"):
        gpu = {"device_id": int(device.partition(":")[2] or 0)}  # both GPU providers take it
        providers = [(p, gpu) for p in providers if p != "CPUExecutionProvider"]
        if not providers:
            raise BackendUnavailable(
                "onnxruntime on cuda needs a build with the CUDA execution provider: "
                "pip install onnxruntime-gpu"
            )
    return OnnxRuntimeRunner(_onnx_files(directory, manifest), manifest, providers)


def _torch(directory: Path, manifest: Manifest, device: str | None) -> Runner:
    if not (_installed("torch") and _installed("safetensors")):
        raise BackendUnavailable(
            "backend 'torch' needs torch and safetensors: pip install torch safetensors"
        )
    import torch

    from .runners import TorchRunner

    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(f"backend 'torch' has no CUDA device here for {device!r}")

    return TorchRunner(verify_artefact(directory, manifest, WEIGHTS), manifest, device)


LOADERS = {"tensorrt": _tensorrt, "onnxruntime": _onnxruntime, "torch": _torch}


def load_export(directory: str | Path, backend: str = "auto", device: str | None = None) -> Runner:
    """Open an export directory on ``backend`` ("auto", "tensorrt", "onnxruntime", "torch").

    device: None (the backend's best), "cpu", or "cuda[:N]". Raises :class:`ExportError` for a
    missing or modified artefact, and for an explicit backend this machine cannot run (saying
    what to install). The runner carries the ``manifest`` (``segment`` reads its geometry) and a
    ``reason`` for the choice.
    """
    if backend not in BACKENDS:
        raise ExportError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    directory = Path(directory)
    manifest = Manifest.read(directory)
    if backend == "auto":
        runner, reason = _pick(directory, manifest, device)
    else:
        runner, reason = LOADERS[backend](directory, manifest, device), "requested"
    runner.manifest = manifest
    runner.reason = f"{runner.detail}: {reason}"
    log.info("inference backend %s", runner.reason)
    return runner


def _pick(directory: Path, manifest: Manifest, device: str | None) -> tuple[Runner, str]:
    """The first of tensorrt, onnxruntime, torch that this machine runs, and why the faster ones
    were passed over. A missing or modified artefact raises: it is never a reason to fall back.
    """
    from .tensorrt import trt_available

    runs, why = (False, "device cpu requested") if device == "cpu" else trt_available()
    if runs:
        try:
            return _tensorrt(directory, manifest, device), "fastest available"
        except (RuntimeError, BackendUnavailable) as e:  # no engine builds or loads here
            why = str(e)
    passed = [f"tensorrt: {why}"]
    if ONNX not in manifest.artefacts:
        passed.append(f"onnxruntime: the export has no {ONNX}")
    else:
        try:
            runner = _onnxruntime(directory, manifest, device)
        except BackendUnavailable as e:
            passed.append(f"onnxruntime: {e}")
        else:
            if device is None and getattr(runner, "provider", "") == "CPUExecutionProvider":
                passed.append("no CUDA execution provider in this onnxruntime build")
            return runner, "; ".join(passed)
    try:
        return _torch(directory, manifest, device), "; ".join(passed)
    except BackendUnavailable as e:
        passed.append(f"torch: {e}")
        raise BackendUnavailable(
            f"no backend can run {directory} here ({'; '.join(passed)})"
        ) from e
