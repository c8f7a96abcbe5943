"""Write an export directory from a loaded checkpoint: merged weights, ONNX, checks, manifest.

Everything is written into a hidden temporary sibling of the target and renamed into place at
the end, so an interrupted or failed export never leaves a directory that looks complete. The
checks (docs/method.md §2: a merged model is the base architecture with other weights):

- ``merge``: merged vs adapted model in PyTorch fp32, max |difference| / max |logit| < 1e-5;
- ``weights``: the merged state dict has exactly the keys and shapes of
  ``build_model(preset, adapters=None)``;
- ``graph``: the ONNX checker with full shape inference, opset >= 17, no GridSample, no op
  outside TensorRT's ONNX parser support list;
- ``onnxruntime``: ONNX Runtime vs the adapted PyTorch model on the given images, max |difference|
  relative to the logit range < 1e-4 and argmax agreement >= 99.9 %;
- ``zero_overhead``: the merged graph and the graph of ``adapters=None`` have identical op-type
  histograms and initializer name -> shape maps: a merged model costs what the base model costs.

A failed check raises :class:`ExportError` with its numbers and writes nothing. This module
never reads a recipe or the data package: the caller passes class names, palette, images and the
sliding-window geometry in.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import temporary_sibling, write_text
from .manifest import MANIFEST, ONNX, REPORT, WEIGHTS, ExportError, Manifest, is_export_directory

MERGE_LIMIT = 1e-5
ONNX_LIMIT = 1e-4
ARGMAX_LIMIT = 0.999
Log = Callable[[str], None]


@dataclass
class ExportRequest:
    """What to write and where (see :class:`~recyclelora.deploy.manifest.Manifest` for the
    fields that end up in ``model.json``).

    images: (N, 3, H, W) float32 RGB on 0-255 at ``input_size``, the checks' inputs.
    input_size: (H, W) of the graph, a multiple of the patch size.
    """

    out: Path
    classes: Sequence[str]
    palette: Sequence[Sequence[int]]
    images: np.ndarray
    input_size: tuple[int, int]
    crop: tuple[int, int]
    stride: tuple[int, int]
    eval_scale: tuple[int, int]
    max_batch: int = 8
    onnx: bool = True
    force: bool = False


class Stages:
    """Prints one progress line per stage with its duration, and keeps the durations."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.log(f"{name}: {self.seconds[name]:.1f} s")


def check_input_size(size: Sequence[int], patch: int, source: Path) -> None:
    """Refuse a graph size that is not a positive multiple of the patch size."""
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0 or h % patch or w % patch:
        raise ExportError(
            f"input size {h}x{w} is not a positive multiple of the patch size {patch} of "
            f"{source}: pass --input-size H W with multiples of {patch} (e.g. "
            f"{max(h // patch, 1) * patch} {max(w // patch, 1) * patch})"
        )


def check_request(model: Any, source: Path, request: ExportRequest) -> None:
    """Refuse, before any work, a request that cannot succeed (the message says what to do)."""
    out = request.out
    if out.exists() and not request.force:
        raise ExportError(
            f"{out} already exists: pass --force to replace it, or choose another --out"
        )
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory: choose another --out")
    if out.exists() and any(out.iterdir()) and not is_export_directory(out):
        raise ExportError(
            f"{out} is not an export directory (it has no readable {MANIFEST}) and --force "
            "replaces only an earlier export: choose another --out, or empty it yourself"
        )
    check_input_size(request.input_size, int(model.size_divisor), source)
    h, w = request.input_size
    if request.max_batch < 1:
        raise ExportError(f"--max-batch must be at least 1, got {request.max_batch}")
    k = model.num_classes
    if len(request.classes) != k or len(request.palette) != k:
        raise ExportError(
            f"{source} predicts {k} classes but {len(request.classes)} class names and "
            f"{len(request.palette)} colours were given: export a checkpoint trained on these "
            "classes"
        )
    images = request.images
    if images.ndim != 4 or images.shape[1:] != (3, h, w) or len(images) == 0:
        raise ExportError(f"check images must be (N, 3, {h}, {w}), got {images.shape}")


def find_preset(state: dict[str, Any], num_classes: int, train_size: tuple[int, int]) -> str:
    """The preset whose ``adapters=None`` model has exactly these keys and shapes."""
    from ..models import PRESETS, build_model

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name in PRESETS:
        plain = build_model(name, num_classes, adapters=None, device="meta", img_size=train_size)
        if {k: tuple(v.shape) for k, v in plain.state_dict().items()} == shapes:
            return name
    raise ExportError(
        f"the merged weights match no preset's plain model ({sorted(PRESETS)}, {num_classes} "
        f"classes, train size {train_size}): adapter tensors or extra buffers remain"
    )


def _logits(model: Any, images: np.ndarray, max_batch: int) -> np.ndarray:
    import torch

    with torch.no_grad():
        parts = [
            model(torch.from_numpy(images[i : i + max_batch])).numpy()
            for i in range(0, len(images), max_batch)
        ]
    return np.concatenate(parts)


def merge_check(reference: np.ndarray, merged: np.ndarray) -> dict[str, Any]:
    """max |merged - adapted| / max |adapted|, against :data:`MERGE_LIMIT`."""
    error = float(np.abs(merged - reference).max() / max(np.abs(reference).max(), 1e-12))
    return {"max_rel_error": error, "limit": MERGE_LIMIT, "passed": error < MERGE_LIMIT}


def runtime_check(reference: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """max |got - reference| / (max - min of reference), and argmax agreement."""
    span = float(reference.max() - reference.min())
    error = float(np.abs(got - reference).max())
    rel = error / max(span, 1e-12)
    agree = float((got.argmax(1) == reference.argmax(1)).mean())
    return {
        "max_abs_error": error,
        "logit_range": span,
        "rel_error": rel,
        "limit": ONNX_LIMIT,
        "argmax_agreement": agree,
        "argmax_limit": ARGMAX_LIMIT,
        "passed": rel < ONNX_LIMIT and agree >= ARGMAX_LIMIT,
    }


def onnxruntime_logits(path: Path, images: np.ndarray, max_batch: int) -> np.ndarray:
    import onnxruntime as ort

    from .onnx_graph import INPUT, OUTPUT

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parts = [
        session.run([OUTPUT], {INPUT: images[i : i + max_batch]})[0]
        for i in range(0, len(images), max_batch)
    ]
    return np.concatenate(parts)


def structure_check(merged: Any, base: Any) -> dict[str, Any]:
    """Op-type histograms and initializer maps of the merged and the base graph."""
    ops_equal = merged.ops == base.ops
    inits_equal = merged.initializers == base.initializers
    differing_ops = sorted(
        k for k in set(merged.ops) | set(base.ops) if merged.ops.get(k) != base.ops.get(k)
    )
    differing_inits = sorted(set(merged.initializers) ^ set(base.initializers)) + sorted(
        k
        for k in set(merged.initializers) & set(base.initializers)
        if merged.initializers[k] != base.initializers[k]
    )
    return {
        "op_types_equal": ops_equal,
        "initializers_equal": inits_equal,
        "nodes": sum(merged.ops.values()),
        "base_nodes": sum(base.ops.values()),
        "initializers": len(merged.initializers),
        "parameters": merged.parameters,
        "base_parameters": base.parameters,
        "differing_ops": {k: [merged.ops.get(k, 0), base.ops.get(k, 0)] for k in differing_ops},
        "differing_initializers": differing_inits[:20],
        "passed": ops_equal and inits_equal,
    }


def graph_check(facts: Any) -> dict[str, Any]:
    from .onnx_graph import MIN_OPSET, TENSORRT_OPS_VERSION

    return {
        "checker": "onnx.checker full_check passed",
        "opset": facts.opset,
        "min_opset": MIN_OPSET,
        "inputs": facts.inputs,
        "outputs": facts.outputs,
        "op_types": facts.ops,
        "forbidden_ops": facts.forbidden,
        "not_in_tensorrt": facts.not_in_tensorrt,
        "tensorrt_ops_version": TENSORRT_OPS_VERSION,
        "passed": facts.opset >= MIN_OPSET and not facts.forbidden and not facts.not_in_tensorrt,
    }


def _require(name: str, check: dict[str, Any], source: Path) -> None:
    if not check["passed"]:
        figures = {k: v for k, v in check.items() if k not in ("op_types", "inputs", "outputs")}
        raise ExportError(
            f"the {name} check failed for {source}, nothing was written: {json.dumps(figures)}"
        )


def versions() -> dict[str, str]:
    """Versions of the package and of the libraries the artefacts were made with."""
    out = {}
    for name in ("recyclelora", "torch", "onnx", "onnxruntime", "onnxscript", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temporary directory to ``out`` (replacing an old export).

    Its files get the permissions of the manifest (the user's umask): some writers create
    private files, and a serving process may run as another user.
    """
    for f in tmp.iterdir():
        if f.is_file():
            shutil.copymode(tmp / MANIFEST, f)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_directory(
    loaded: Any,
    request: ExportRequest,
    *,
    engine: Callable[[Path, Manifest, dict[str, Any]], None] | None = None,
    engine_stage: str = "engine",
    log: Log = print,
) -> Manifest:
    """Merge ``loaded.model`` (a :class:`~recyclelora.checkpoints.LoadedModel`), run the checks
    and write the export directory ``request.out``; returns its manifest.

    ``engine(directory, manifest, report)``: optional, builds more artefacts into the temporary
    directory before it is published (:func:`add_engine`, :func:`add_precision_graph`), listing
    them in the manifest and their checks in the report, as the progress stage ``engine_stage``.
    """
    from safetensors.torch import save_file

    from ..adapters import merge_recyclelora
    from .onnx_graph import base_graph_facts, export_onnx, graph_facts

    model, source = loaded.model.eval(), Path(loaded.source)
    check_request(model, source, request)
    stages = Stages(log)
    images = np.ascontiguousarray(request.images, dtype=np.float32)
    train_size = tuple(int(s) for s in model.backbone.img_size)
    report: dict[str, Any] = {"source": str(source), "images": len(images), "checks": {}}
    checks = report["checks"]

    out = request.out
    tmp = temporary_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise ExportError(f"cannot write into {out.parent} ({e}): choose another --out") from e
    try:
        with stages.stage("merge"):
            merged = merge_recyclelora(copy.deepcopy(model)).eval()
            state = merged.state_dict()
            preset = find_preset(state, model.num_classes, train_size)
            checks["weights"] = {"preset": preset, "keys": len(state), "passed": True}
        with stages.stage("check"):
            reference = _logits(model, images, request.max_batch)
            checks["merge"] = merge_check(reference, _logits(merged, images, request.max_batch))
            _require("merge", checks["merge"], source)
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
        if request.onnx:
            merged.deform_attn_impl = "gather"
            with stages.stage("ONNX export"):
                export_onnx(merged, tmp / ONNX, request.input_size, request.max_batch)
            with stages.stage("ONNX check"):
                facts = graph_facts(tmp / ONNX)
                checks["graph"] = graph_check(facts)
                _require("graph", checks["graph"], source)
                got = onnxruntime_logits(tmp / ONNX, images, request.max_batch)
                checks["onnxruntime"] = runtime_check(reference, got)
                _require("ONNX Runtime", checks["onnxruntime"], source)
                base = base_graph_facts(
                    preset,
                    model.num_classes,
                    train_size,
                    state,
                    request.input_size,
                    request.max_batch,
                )
                checks["zero_overhead"] = structure_check(facts, base)
                _require("zero-overhead", checks["zero_overhead"], source)

        manifest = Manifest(
            preset=preset,
            classes=list(request.classes),
            palette=[[int(c) for c in rgb] for rgb in request.palette],
            mean=[float(v) for v in model.mean.flatten()],
            std=[float(v) for v in model.std.flatten()],
            input_size=list(request.input_size),
            max_batch=request.max_batch,
            train_size=list(train_size),
            patch_size=int(model.size_divisor),
            crop=list(request.crop),
            stride=list(request.stride),
            eval_scale=list(request.eval_scale),
            source=_source(loaded),
            versions=versions(),
        )
        manifest.add_artefact(tmp, WEIGHTS, keys=len(state))
        if request.onnx:
            manifest.add_artefact(tmp, ONNX, opset=facts.opset, precision="fp32")
            data = tmp / f"{ONNX}.data"
            if data.exists():
                manifest.add_artefact(tmp, data.name)
        if engine is not None:
            manifest.write(tmp)  # the engine builder reads the directory's model.json
            with stages.stage(engine_stage):
                engine(tmp, manifest, report)
        report["timings_s"] = stages.seconds
        write_text(tmp / REPORT, json.dumps(report, indent=2))
        manifest.add_artefact(tmp, REPORT)
        manifest.write(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}")
    return manifest


def _source(loaded: Any) -> dict[str, Any]:
    from .manifest import sha256_file

    path = Path(loaded.source)
    return {
        "path": str(path.resolve()),
        "sha256": sha256_file(path),
        "kind": loaded.kind,
        "iteration": loaded.iteration,
    }


#: TensorRT engines and fp16 / bf16 graphs vs ONNX Runtime fp32, per precision: (max error
#: relative to the logit range, argmax agreement). fp32 engines may use TF32 tensor cores.
ENGINE_LIMITS: dict[str, tuple[float, float]] = {
    "fp32": (1e-3, 0.999),
    "fp16": (1e-2, 0.99),
    "bf16": (8e-2, 0.99),  # bf16 keeps 8 mantissa bits: 5.3 % max error measured on the graph
}


def precision_check(reference: np.ndarray, got: np.ndarray, precision: str) -> dict[str, Any]:
    """:func:`runtime_check` against the bounds of ``precision`` (:data:`ENGINE_LIMITS`)."""
    check = runtime_check(reference, got)
    limit, agreement = ENGINE_LIMITS[precision]
    check.update(limit=limit, argmax_limit=agreement)
    check["passed"] = check["rel_error"] < limit and check["argmax_agreement"] >= agreement
    return check


def add_precision_graph(
    directory: Path, manifest: Manifest, report: dict[str, Any], precision: str, images: np.ndarray
) -> str:
    """Write the fp16 / bf16 variant of ``model.onnx`` (``onnx_precision``) into an export
    directory, checked against the fp32 graph with ONNX Runtime's CPU provider on ``images``,
    and list it in model.json. Returns its name (``model.onnx`` itself for fp32).

    The CPU provider has no bfloat16 kernels: a bf16 graph is recorded as unchecked there (the
    engine built from it is checked against fp32 on the GPU). A failed check raises
    :class:`ExportError` with the figures and leaves the variant out.
    """
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as NoKernel

    from .onnx_precision import reduced_precision_onnx
    from .tensorrt import onnx_for

    graph = onnx_for(precision)
    if graph in manifest.artefacts:
        return graph
    path = reduced_precision_onnx(directory / ONNX, directory / graph, precision)
    data = path.with_name(f"{graph}.data")
    images = np.ascontiguousarray(images, dtype=np.float32)
    try:
        got = onnxruntime_logits(path, images, manifest.max_batch)
    except NoKernel as e:
        check = {"checked": False, "why": f"ONNX Runtime CPU cannot run it: {str(e)[:200]}"}
    else:
        reference = onnxruntime_logits(directory / ONNX, images, manifest.max_batch)
        check = {**precision_check(reference, got, precision), "checked": True}
        if not check["passed"]:
            path.unlink(missing_ok=True)
            data.unlink(missing_ok=True)
        _require(f"ONNX {precision}", check, path)
    report["checks"][f"onnx_{precision}"] = check
    manifest.add_artefact(directory, graph, precision=precision)
    if data.exists():
        manifest.add_artefact(directory, data.name)
    manifest.write(directory)
    return graph


def add_engine(
    directory: Path, manifest: Manifest, report: dict[str, Any], precision: str, images: np.ndarray
) -> Path:
    """Build the TensorRT engine of ``precision`` into an export directory (its graph variant
    first, for fp16 / bf16: :func:`add_precision_graph`) and check it against ONNX Runtime on
    ``images``.

    The directory's model.json is rewritten with the new artefacts; a failed check removes the
    engine again and raises :class:`ExportError` with the figures.
    """
    from .tensorrt import TensorRTRunner, engine_for

    add_precision_graph(directory, manifest, report, precision, images)
    engine = engine_for(directory, manifest, precision)
    runner = TensorRTRunner(engine, manifest.input_size, manifest.max_batch, manifest.num_classes)
    images = np.ascontiguousarray(images, dtype=np.float32)
    reference = onnxruntime_logits(directory / ONNX, images, manifest.max_batch)
    check = precision_check(reference, runner.predict_crops(images), precision)
    check["engine"] = engine.name
    if not check["passed"]:
        engine.unlink(missing_ok=True)
        manifest.artefacts.pop(engine.name, None)
        manifest.write(directory)
    _require(f"TensorRT {precision}", check, directory / engine.name)
    report["checks"][f"tensorrt_{precision}"] = check
    return engine


def engine_into_export(
    directory: Path, precision: str, images: np.ndarray, log: Log = print
) -> Path:
    """``--from-export``: add an engine to an existing export directory and its report."""
    from .manifest import verify_artefact

    manifest = Manifest.read(directory)
    verify_artefact(directory, manifest, ONNX)
    report_path = verify_artefact(directory, manifest, REPORT)
    report = json.loads(report_path.read_text(encoding="utf-8"))
    stages = Stages(log)
    with stages.stage("engine"):
        engine = add_engine(directory, manifest, report, precision, images)
    report.setdefault("timings_s", {}).update(stages.seconds)
    write_text(report_path, json.dumps(report, indent=2))
    manifest.add_artefact(directory, REPORT)
    manifest.write(directory)
    log(f"wrote {directory / engine.name}")
    return engine
