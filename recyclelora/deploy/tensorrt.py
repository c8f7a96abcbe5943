"""TensorRT engines for an export directory: build, cache, run.

An engine is specific to one GPU model and one TensorRT version, so it is built where it runs
(or ahead of time on the same hardware) and cached in the export directory under a name that
says both: ``model.<gpu>.trt<version>.<precision>.plan``, with its timing cache beside it. A
file lock makes concurrent processes build once: the others wait and load the first's engine.

Precision lives in the ONNX graph (``model.<precision>.onnx``, see ``onnx_precision``) and the
network is strongly typed: TensorRT 11 removed the FP16/BF16 builder flags and types every
network strongly, and TensorRT 10 takes the same strongly typed path (no weakly typed build,
which would also run LayerNorm and Softmax in fp16), so both build the same engine. Written
against the TensorRT 10 / 11 Python API; ``tensorrt`` and ``torch`` (CUDA memory, the GPU's
name) are imported only by the functions that need them.
"""

from __future__ import annotations

import fcntl
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_bytes
from .manifest import ONNX, BackendUnavailable, Manifest, verify_artefact
from .onnx_precision import variant_name
from .runner import Runner

PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_MAX_BATCH = 18  # the 3 x 6 windows of one 1024 x 2048 frame (crop 512, stride 341)
DEFAULT_WORKSPACE_GIB = 4.0
MIN_TENSORRT_MAJOR = 10
LOCK = ".tensorrt-build.lock"
INPUT, OUTPUT = "images", "logits"

BuildFn = Callable[..., tuple[Path, dict[str, Any]]]


class TensorRTUnavailable(RuntimeError):
    """This machine cannot run TensorRT (no package, too old, no CUDA GPU); the message says
    which. A RuntimeError, so ``load_export(backend="auto")`` falls back to the next backend."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the graph or build the engine; carries its messages verbatim."""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.")


def engine_name(gpu_name: str, trt_version: str, precision: str) -> str:
    """``model.<gpu>.trt<version>.<precision>.plan``, e.g. ``model.nvidia-h100-80gb-hbm3.
    trt10.7.0.plan`` for fp16 engines built by TensorRT 10.7.0 on an H100."""
    _check_precision(precision)
    return f"model.{_slug(gpu_name)}.trt{_slug(trt_version)}.{precision}.plan"


def timing_cache_name(gpu_name: str, trt_version: str) -> str:
    """``model.<gpu>.trt<version>.timing.cache``: tactic timings, shared by all precisions."""
    return f"model.{_slug(gpu_name)}.trt{_slug(trt_version)}.timing.cache"


def profile_batches(max_batch: int) -> tuple[int, int]:
    """(opt, max) batch of the engine profile for an export of ``max_batch``: tuned for the
    batches ``segment`` sends, and taking at least the windows of one 1024 x 2048 frame at once."""
    return max_batch, max(max_batch, DEFAULT_MAX_BATCH)


def onnx_for(precision: str) -> str:
    """The graph an engine of ``precision`` is built from."""
    _check_precision(precision)
    return ONNX if precision == "fp32" else variant_name(precision)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def trt_available() -> tuple[bool, str]:
    """(whether TensorRT can build and run engines here, why not / what it runs on)."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "the tensorrt package is not installed (pip install 'recyclelora[gpu]')"
    major = int(trt.__version__.split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        return False, f"TensorRT {trt.__version__} is too old: {MIN_TENSORRT_MAJOR}.0 or newer"
    import torch

    if not torch.cuda.is_available():
        return False, f"TensorRT {trt.__version__} is installed but no CUDA GPU is visible"
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"


def local_environment(device: int | None = None) -> dict[str, str]:
    """The GPU's name and compute capability (default: the current CUDA device) and the
    TensorRT version, as engines record them."""
    ok, why = trt_available()
    if not ok:
        raise TensorRTUnavailable(why)
    import tensorrt as trt
    import torch

    device = torch.cuda.current_device() if device is None else device
    major, minor = torch.cuda.get_device_capability(device)
    return {
        "gpu": torch.cuda.get_device_name(device),
        "compute_capability": f"{major}.{minor}",
        "tensorrt": trt.__version__,
    }


def build_engine(
    onnx_path: str | Path,
    out_dir: str | Path,
    *,
    precision: str,
    input_size: tuple[int, int] | list[int],
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
) -> tuple[Path, dict[str, Any]]:
    """Build an engine from ``onnx_path`` (the graph already in ``precision``) into ``out_dir``.

    Batch profile 1 / ``opt_batch`` (default ``max_batch``) / ``max_batch`` on input
    ``images`` (B, 3, H, W). The timing cache in ``out_dir`` is loaded when present and saved
    after the build. Returns the engine's path and the facts model.json records about it.
    """
    import tensorrt as trt

    env = local_environment()
    out_dir = Path(out_dir)
    h, w = (int(s) for s in input_size)
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise ValueError(f"need 1 <= opt_batch <= max_batch, got {opt} and {max_batch}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 needs the flag; 11 types every network strongly and ignores (deprecates) it
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external weights beside the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        for line in errors:
            print(line, file=sys.stderr)
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}:\n" + "\n".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT, (1, 3, h, w), (opt, 3, h, w), (max_batch, 3, h, w))
    config.add_optimization_profile(profile)
    cache_path = out_dir / timing_cache_name(env["gpu"], env["tensorrt"])
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(
            f"TensorRT could not build an engine from {onnx_path} (its log above says why)"
        )
    write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    engine = write_bytes(
        out_dir / engine_name(env["gpu"], env["tensorrt"], precision), bytes(memoryview(plan))
    )
    info = {
        **env,
        "precision": precision,
        "onnx": Path(onnx_path).name,
        "input_size": [h, w],
        "batch": [1, opt, max_batch],
        "workspace_gib": workspace_gib,
        "timing_cache": cache_path.name,
    }
    return engine, info


def engine_for(
    export_dir: str | Path,
    manifest: Manifest,
    precision: str,
    *,
    environment: dict[str, str] | None = None,
    build: BuildFn = build_engine,
    **build_options: Any,
) -> Path:
    """The export's engine for this GPU, TensorRT version and ``precision``, built if missing.

    Builds run under an exclusive lock on ``<export>/.tensorrt-build.lock``: a second process
    waits, then finds the first's engine listed in model.json. The new engine is listed there
    (model.json rewritten atomically) and in ``manifest``. ``environment`` (gpu, tensorrt
    version) and ``build`` default to this machine's and :func:`build_engine`.
    """
    export_dir = Path(export_dir)
    env = local_environment() if environment is None else environment
    name = engine_name(env["gpu"], env["tensorrt"], precision)
    if name in manifest.artefacts:
        return verify_artefact(export_dir, manifest, name)
    try:
        lock = open(export_dir / LOCK, "a")  # noqa: SIM115 (closed below, after the unlock)
    except OSError as e:
        raise EngineBuildError(f"cannot build an engine in {export_dir}: {e}") from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            current = Manifest.read(export_dir)  # another process may have built it meanwhile
            if name not in current.artefacts:
                graph = verify_artefact(export_dir, current, onnx_for(precision))
                opt, top = profile_batches(current.max_batch)
                engine, info = build(
                    graph,
                    export_dir,
                    precision=precision,
                    input_size=current.input_size,
                    max_batch=top,
                    opt_batch=opt,
                    **build_options,
                )
                if engine.name != name:
                    raise EngineBuildError(f"the build wrote {engine.name}, expected {name}")
                current.add_artefact(export_dir, name, **info)
                current.write(export_dir)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    manifest.artefacts[name] = current.artefacts[name]
    return verify_artefact(export_dir, manifest, name)


def trtexec_command(
    export_dir: str | Path,
    precision: str,
    *,
    input_size: tuple[int, int] | list[int],
    gpu_name: str = "",
    trt_version: str = "",
    save_as: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
) -> str:
    """The ``trtexec`` line that builds the engine :func:`build_engine` builds.

    Both TensorRT 10 and 11 take ``--stronglyTyped`` (11 types every network strongly anyway)
    on the graph that already holds the precision; 11 has no ``--fp16`` / ``--bf16``. The
    engine is saved as :func:`engine_name` of ``gpu_name`` and ``trt_version``, or ``save_as``.
    """
    d = Path(export_dir)
    engine = save_as or engine_name(gpu_name, trt_version, precision)
    h, w = (int(s) for s in input_size)
    opt = max_batch if opt_batch is None else opt_batch
    args = [
        "trtexec",
        f"--onnx={d / onnx_for(precision)}",
        f"--saveEngine={d / engine}",
        f"--minShapes={INPUT}:1x3x{h}x{w}",
        f"--optShapes={INPUT}:{opt}x3x{h}x{w}",
        f"--maxShapes={INPUT}:{max_batch}x3x{h}x{w}",
        f"--memPoolSize=workspace:{round(workspace_gib * 1024)}M",
        f"--timingCacheFile={d / timing_cache_name(gpu_name, trt_version)}",
        "--stronglyTyped",
    ]
    return shlex.join(args)


class TensorRTRunner(Runner):
    """A deserialised engine with one execution context on one GPU; I/O as torch CUDA tensors."""

    name = "tensorrt"

    def __init__(
        self,
        engine_path: str | Path,
        input_size: tuple[int, int] | list[int],
        max_batch: int,
        num_classes: int,
        device: int = 0,
    ) -> None:
        import tensorrt as trt
        import torch

        self._torch = torch
        self.device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine_path = Path(engine_path)
        with torch.cuda.device(self.device):
            self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if self._engine is None:
                raise EngineBuildError(
                    f"TensorRT {trt.__version__} cannot load {engine_path}: built by another "
                    "TensorRT version or for another GPU? Delete it to rebuild"
                )
            self._context = self._engine.create_execution_context()
            self._stream = torch.cuda.Stream(self.device)
        io = {self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)}
        if io != {INPUT, OUTPUT} or self._engine.get_tensor_dtype(INPUT) != trt.float32:
            raise EngineBuildError(
                f"{engine_path}: expected float32 '{INPUT}' in and '{OUTPUT}' out, got {io}"
            )
        gpu = torch.cuda.get_device_name(self.device)
        detail = f"TensorRT {trt.__version__} on {gpu} ({self.device}), {engine_path.name}"
        super().__init__(input_size, max_batch, num_classes, detail)

    @classmethod
    def from_export(
        cls,
        export_dir: str | Path,
        manifest: Manifest,
        device: str | None = None,
        precision: str | None = None,
    ) -> TensorRTRunner:
        """The export's engine for this GPU (built and cached on first use).

        device: None or "cuda[:N]"; precision: None takes the first of fp16, bf16, fp32 whose
        graph the export holds. Raises :class:`TensorRTUnavailable` where TensorRT cannot run.
        """
        ok, why = trt_available()
        if not ok:
            raise TensorRTUnavailable(why)
        if device is not None and not device.startswith("cuda"):
            raise TensorRTUnavailable(f"TensorRT runs on a CUDA GPU, not on {device!r}")
        index = int(device.partition(":")[2] or 0) if device else 0
        if precision is None:
            held = [p for p in ("fp16", "bf16", "fp32") if onnx_for(p) in manifest.artefacts]
            if not held:
                raise BackendUnavailable(
                    f"{export_dir} has no ONNX graph to build a TensorRT engine from"
                )
            precision = held[0]
        import torch

        with torch.cuda.device(index):  # TensorRT builds on the current device
            engine = engine_for(export_dir, manifest, precision, environment=local_environment())
        return cls(engine, manifest.input_size, manifest.max_batch, manifest.num_classes, index)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            x = torch.from_numpy(batch).to(self.device)
            self._context.set_input_shape(INPUT, tuple(x.shape))
            y = torch.empty(
                tuple(self._context.get_tensor_shape(OUTPUT)),
                dtype=torch.float32,
                device=self.device,
            )
            self._context.set_tensor_address(INPUT, x.data_ptr())
            self._context.set_tensor_address(OUTPUT, y.data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"TensorRT inference failed ({self.detail})")
            out = y.cpu()  # waits for the stream
        return out.numpy()
