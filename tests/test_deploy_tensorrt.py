"""TensorRT backend: names, the trtexec line, availability, the build lock and model.json.

The locking and manifest tests inject a fake build function (it writes a file and records each
call), so they test the cache logic on any machine; the engine tests at the end need an NVIDIA
GPU with the tensorrt package and skip elsewhere.
"""

from __future__ import annotations

import multiprocessing
import os
import shlex
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from recyclelora.deploy import tensorrt as rt
from recyclelora.deploy.manifest import Artefact, ExportError, Manifest, sha256_file

from .onnx_trace import trace

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.7.0"}
ENGINE = "model.nvidia-h100-80gb-hbm3.trt10.7.0.fp16.plan"
NO_GPU = "needs an NVIDIA GPU with the tensorrt package; this machine has neither"


def test_engine_and_cache_names():
    assert rt.engine_name(ENV["gpu"], ENV["tensorrt"], "fp16") == ENGINE
    assert (
        rt.engine_name("Orin (nvgpu)", "11.0.0.4", "bf16")
        == "model.orin-nvgpu.trt11.0.0.4.bf16.plan"
    )
    assert (
        rt.timing_cache_name(ENV["gpu"], "10.7.0")
        == "model.nvidia-h100-80gb-hbm3.trt10.7.0.timing.cache"
    )
    assert [rt.onnx_for(p) for p in rt.PRECISIONS] == [
        "model.onnx",
        "model.fp16.onnx",
        "model.bf16.onnx",
    ]
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        rt.engine_name(ENV["gpu"], "10.7.0", "int8")


def test_trtexec_command_builds_what_build_engine_builds(tmp_path):
    export = tmp_path / "my export"  # a space: the line must stay one argument per option
    line = rt.trtexec_command(
        export,
        "fp16",
        gpu_name=ENV["gpu"],
        trt_version="10.7.0",
        input_size=(512, 512),
        max_batch=18,
        opt_batch=6,
        workspace_gib=2,
    )
    assert shlex.split(line) == [
        "trtexec",
        f"--onnx={export}/model.fp16.onnx",
        f"--saveEngine={export}/{ENGINE}",
        "--minShapes=images:1x3x512x512",
        "--optShapes=images:6x3x512x512",
        "--maxShapes=images:18x3x512x512",
        "--memPoolSize=workspace:2048M",
        f"--timingCacheFile={export}/model.nvidia-h100-80gb-hbm3.trt10.7.0.timing.cache",
        "--stronglyTyped",
    ]
    fp32 = shlex.split(
        rt.trtexec_command(
            export, "fp32", gpu_name="A100", trt_version="11.0", input_size=(128, 256)
        )
    )
    assert f"--onnx={export}/model.onnx" in fp32 and "--maxShapes=images:18x3x128x256" in fp32
    assert "--optShapes=images:18x3x128x256" in fp32  # opt defaults to the max batch
    assert not {"--fp16", "--bf16"} & set(fp32)  # removed in TensorRT 11


def test_importing_the_backend_pulls_in_no_heavy_package():
    """A serving image without torch / tensorrt can still import it (and ask trt_available)."""
    code = (
        "import sys, recyclelora.deploy.tensorrt, recyclelora.deploy.onnx_precision\n"
        "print(sorted({'torch', 'tensorrt', 'onnx', 'onnxruntime'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_trt_available_says_why_not(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    ok, why = rt.trt_available()
    assert not ok and "tensorrt package is not installed" in why and "[gpu]" in why

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    assert rt.trt_available() == (False, "TensorRT 8.6.1 is too old: 10.0 or newer")

    torch = pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.7.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, why = rt.trt_available()
    assert not ok and "no CUDA GPU" in why


def test_from_export_raises_a_runtime_error_where_tensorrt_cannot_run(monkeypatch, tmp_path):
    """load_export("auto") falls back on RuntimeError: the runner must raise one here."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(rt.TensorRTUnavailable, match="not installed") as e:
        rt.TensorRTRunner.from_export(tmp_path, make_manifest(), device="cuda:0")
    assert isinstance(e.value, RuntimeError)


def make_manifest(**artefacts: Artefact) -> Manifest:
    return Manifest(
        preset="tiny",
        classes=["road", "car"],
        palette=[[1, 2, 3], [4, 5, 6]],
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        input_size=[64, 96],
        max_batch=18,
        train_size=[64, 64],
        patch_size=16,
        crop=[64, 96],
        stride=[43, 64],
        eval_scale=[2048, 1024],
        source={"kind": "training"},
        versions={},
        artefacts=dict(artefacts),
    )


@pytest.fixture
def export(tmp_path) -> Path:
    """An export directory with a (fake) fp16 graph listed in model.json."""
    (tmp_path / "model.fp16.onnx").write_bytes(b"graph")
    manifest = make_manifest()
    manifest.add_artefact(tmp_path, "model.fp16.onnx")
    manifest.write(tmp_path)
    return tmp_path


def fake_build(onnx_path, out_dir, *, precision, input_size, max_batch, opt_batch, pause=0.0):
    """Stands in for build_engine: logs the call (one line per build), writes an engine."""
    with open(Path(out_dir) / "builds.log", "a") as log:
        shape = f"{input_size} {opt_batch}/{max_batch}"
        log.write(f"{os.getpid()} {Path(onnx_path).name} {precision} {shape}\n")
    time.sleep(pause)  # a build takes minutes: long enough for the other process to arrive
    engine = Path(out_dir) / rt.engine_name(ENV["gpu"], ENV["tensorrt"], precision)
    engine.write_bytes(f"engine built by {os.getpid()}".encode())
    return engine, {**ENV, "precision": precision}


def builds(export: Path) -> list[str]:
    log = export / "builds.log"
    return log.read_text().splitlines() if log.exists() else []


def test_engine_for_builds_once_and_lists_the_engine(export):
    stale = Manifest.read(export)
    # meanwhile another tool adds a file to model.json: the rewrite must keep it
    current = Manifest.read(export)
    (export / "extra.txt").write_text("x")
    current.add_artefact(export, "extra.txt")
    current.write(export)

    path = rt.engine_for(export, stale, "fp16", environment=ENV, build=fake_build)
    assert path == export / ENGINE
    assert builds(export) == [f"{os.getpid()} model.fp16.onnx fp16 [64, 96] 18/18"]
    on_disk = Manifest.read(export)
    assert set(on_disk.artefacts) == {"model.fp16.onnx", "extra.txt", ENGINE}
    art = on_disk.artefacts[ENGINE]
    assert art.sha256 == sha256_file(path) and art.bytes == path.stat().st_size
    assert art.info == {**ENV, "precision": "fp16"}
    assert stale.artefacts[ENGINE] == art  # the caller's manifest sees it too

    again = rt.engine_for(export, Manifest.read(export), "fp16", environment=ENV, build=fake_build)
    assert again == path and len(builds(export)) == 1  # cached: no second build


def test_the_engine_profile_takes_a_whole_frame_and_is_tuned_for_the_exports_batch(export):
    manifest = Manifest.read(export)
    manifest.max_batch = 4  # segment sends batches of 4; a 1024 x 2048 frame has 18 windows
    manifest.write(export)
    rt.engine_for(export, manifest, "fp16", environment=ENV, build=fake_build)
    assert builds(export) == [f"{os.getpid()} model.fp16.onnx fp16 [64, 96] 4/18"]
    assert rt.profile_batches(32) == (32, 32)


def test_engine_for_refuses_a_modified_engine_and_a_missing_graph(export):
    manifest = Manifest.read(export)
    rt.engine_for(export, manifest, "fp16", environment=ENV, build=fake_build)
    (export / ENGINE).write_bytes(b"tampered")
    with pytest.raises(ExportError, match="SHA-256 mismatch"):
        rt.engine_for(export, manifest, "fp16", environment=ENV, build=fake_build)
    with pytest.raises(ExportError, match="model.bf16.onnx: not listed"):
        rt.engine_for(export, manifest, "bf16", environment=ENV, build=fake_build)
    assert len(builds(export)) == 1


def test_engine_for_refuses_an_engine_of_another_name(export):
    def wrong_gpu(onnx_path, out_dir, **kw):
        path, info = fake_build(onnx_path, out_dir, **kw)
        return path.rename(path.with_name("model.other.plan")), info

    with pytest.raises(rt.EngineBuildError, match="model.other.plan"):
        rt.engine_for(export, Manifest.read(export), "fp16", environment=ENV, build=wrong_gpu)
    assert ENGINE not in Manifest.read(export).artefacts


def _contend(export: str, barrier, results) -> None:
    barrier.wait()  # both processes ask at the same moment
    path = rt.engine_for(
        export, Manifest.read(export), "fp16", environment=ENV, build=fake_build, pause=1.0
    )
    results.put((os.getpid(), str(path), Path(path).read_bytes()))


def test_two_processes_build_once_and_share_the_engine(export):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(export), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    log = builds(export)
    assert len(log) == 1, log  # one build: the other process waited, then loaded it
    builder = int(log[0].split()[0])
    assert {pid for pid, _, _ in got} == {p.pid for p in procs} and builder in {
        p.pid for p in procs
    }
    assert {path for _, path, _ in got} == {str(export / ENGINE)}
    assert {data for _, _, data in got} == {f"engine built by {builder}".encode()}
    assert Manifest.read(export).artefacts[ENGINE].sha256 == sha256_file(export / ENGINE)


gpu = pytest.mark.skipif(not rt.trt_available()[0], reason=NO_GPU)


@gpu
def test_tensorrt_engines_match_onnxruntime(tmp_path):
    """fp32 and fp16 engines of the tiny model against ONNX Runtime's fp32 graph: max |error|
    < 0.5 % (fp32, TF32 matmuls) / 1 % (fp16) of the range, argmax agreement >= 99 %."""
    import onnxruntime as ort
    import torch

    from recyclelora.deploy.onnx_precision import reduced_precision_onnx
    from recyclelora.models.segmentor import build_model

    torch.manual_seed(0)
    model = build_model("tiny", adapters=None, deform_attn_impl="gather", img_size=64).eval()
    x = (np.random.default_rng(0).random((3, 3, 64, 64)) * 255).astype(np.float32)
    onnx_path = tmp_path / "model.onnx"
    trace(model, torch.from_numpy(x), onnx_path)
    reduced_precision_onnx(onnx_path, tmp_path / "model.fp16.onnx", "fp16")
    manifest = make_manifest()
    manifest.classes, manifest.input_size, manifest.max_batch = (
        [str(i) for i in range(19)],
        [64, 64],
        4,
    )
    for name in ("model.onnx", "model.fp16.onnx"):
        manifest.add_artefact(tmp_path, name)
    manifest.write(tmp_path)
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"images": x}
    )[0]
    for precision, bound in (("fp32", 5e-3), ("fp16", 1e-2)):  # fp32 engines may use TF32
        runner = rt.TensorRTRunner.from_export(tmp_path, manifest, precision=precision)
        got = runner.predict_crops(np.concatenate([x, x]))  # 6 crops: split into 4 + 2
        assert got.shape == (6, 19, 64, 64) and got.dtype == np.float32
        np.testing.assert_array_equal(got[:3], got[3:])
        assert np.abs(got[:3] - ref).max() < bound * np.ptp(ref)
        assert (got[:3].argmax(1) == ref.argmax(1)).mean() >= 0.99
    info = (
        Manifest.read(tmp_path)
        .artefacts[
            rt.engine_name(torch.cuda.get_device_name(), rt.local_environment()["tensorrt"], "fp16")
        ]
        .info
    )
    assert info["batch"] == [1, 4, 4] and info["precision"] == "fp16"
