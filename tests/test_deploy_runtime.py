"""The inference API: ``load_export`` on every backend installed here, ``segment`` on frames of
any size, and ``evaluate.py --export``.

References: the PyTorch checkpoint path (the adapted, un-merged model of ``load_model`` through
the evaluator's ``predict_labels``: ``Segmentor.predict(mode="slide")``, torch interpolation,
argmax), the model itself on hand-padded crops, and the checkpoint's own evaluation.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recyclelora import load_model
from recyclelora.checkpoints import save_checkpoint
from recyclelora.cli import evaluate as cli_evaluate
from recyclelora.data import CLASS_NAMES, EvalTransform
from recyclelora.data.transforms import EVAL_SCALES
from recyclelora.deploy import (
    BackendUnavailable,
    ExportError,
    Manifest,
    load_export,
    predict_scores,
    segment,
)
from recyclelora.deploy import load as deploy_load
from recyclelora.deploy.manifest import ONNX, WEIGHTS
from recyclelora.deploy.runners import OnnxRuntimeRunner, TorchRunner
from recyclelora.engine.evaluator import predict_labels
from recyclelora.geometry import slide_windows
from recyclelora.models import build_model
from recyclelora.recipes import RECIPES, DataConfig, EvalConfig, to_dict

from .test_checkpoints_mmseg import CFG

CROP, STRIDE = 128, 85  # the paper's 512 / 341, scaled to the tiny model
TRAIN = 64  # the checkpoint's training crop (its backbone position grid)
MAX_BATCH = 3
EVAL_SCALE = (320, 192)  # (long, short) of the export's manifest: frames here stay small
BACKENDS = ("torch", "onnxruntime")


def trained_tiny() -> torch.nn.Module:
    """A tiny adapted model whose adapters and head moved away from their initialisation, with
    sharper class and mask embeddings so that its labels form several regions (a random head
    predicts one class everywhere, against which every comparison would pass)."""
    torch.manual_seed(0)
    model = build_model("tiny", adapters=CFG, img_size=TRAIN, progress=False)
    g = torch.Generator().manual_seed(1)
    head = model.decode_head
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        head.cls_embed.weight.mul_(10)
        head.query_feat.weight.mul_(3)
        head.query_embed.weight.mul_(3)
        head.mask_embed[4].weight.mul_(10)
    return model.eval()


def write_checkpoint(work: Path, data_root: Path) -> Path:
    recipe = replace(
        RECIPES["syn2real"],
        model="tiny",
        adapters=CFG,
        backbone_weights="",
        data=DataConfig(root=str(data_root), crop=TRAIN, workers=0, targets=("cityscapes",)),
        eval=EvalConfig(crop=CROP, stride=STRIDE),
        work_dir=str(work),
    )
    state = {
        "iteration": 3,
        "model": trained_tiny().state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "rng": torch.get_rng_state(),
        "recipe": to_dict(recipe),
    }
    return save_checkpoint(state, work / "checkpoints", 3)


def write_export(checkpoint: Path, out: Path) -> Path:
    """The exporter's directory for ``checkpoint`` (its checks passed), the graph at the
    evaluation crop; only the evaluation scale in model.json is made small, so that frames
    here stay small."""
    from recyclelora.cli.export import export_checkpoint

    export_checkpoint(checkpoint, out, input_size=[CROP, CROP], max_batch=MAX_BATCH)
    manifest = Manifest.read(out)
    assert (manifest.crop, manifest.stride) == ([CROP, CROP], [STRIDE, STRIDE])
    manifest.eval_scale = list(EVAL_SCALE)
    manifest.write(out)
    return out


@pytest.fixture(scope="module")
def run(demo_run):
    """(training checkpoint, its export directory, the synthetic data root)."""
    return demo_run


@pytest.fixture(scope="module")
def reference(run):
    """The adapted, un-merged model of the training checkpoint."""
    return load_model(run[0]).model.eval()


@pytest.fixture(scope="module")
def runners(run):
    return {b: load_export(run[1], backend=b) for b in BACKENDS}


def frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB frame (blocks upsampled), so that labels form regions."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def checkpoint_labels(model, image: np.ndarray) -> np.ndarray:
    """The evaluator's path: rescale (EvalTransform), slide, scores resized to the frame."""
    scaled = EvalTransform(EVAL_SCALE)(image)
    chw = torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))
    return predict_labels(model, chw, image.shape[:2], "slide", CROP, STRIDE).numpy()


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((a == b).mean())


# ---------------------------------------------------------------------------------------------
# segment() against the PyTorch checkpoint path


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_matches_the_checkpoint_on_a_frame_larger_than_a_crop(runners, reference, backend):
    image = frame(150, 260, seed=1)  # rescaled to 185 x 320: 2 x 4 windows, 3 predict batches
    want = checkpoint_labels(reference, image)
    assert len(np.unique(want)) >= 3, "the reference must not be one class everywhere"
    labels, scores = segment(runners[backend], image, return_scores=True)
    assert labels.dtype == np.uint8 and labels.shape == image.shape[:2]
    assert scores.dtype == np.float32 and scores.shape == (len(CLASS_NAMES), *image.shape[:2])
    np.testing.assert_array_equal(labels, scores.argmax(0))
    assert agreement(labels, want) >= 0.999


def test_backends_agree_with_each_other(runners):
    image = frame(200, 140, seed=2)  # portrait
    torch_labels, torch_scores = segment(runners["torch"], image, return_scores=True)
    ort_labels, ort_scores = segment(runners["onnxruntime"], image, return_scores=True)
    assert agreement(torch_labels, ort_labels) >= 0.999
    spread = float(torch_scores.max() - torch_scores.min())
    assert float(np.abs(torch_scores - ort_scores).max()) <= 1e-4 * spread


def test_scores_are_the_window_average(runners):
    """Stitching against a brute-force float64 sum / count over the windows' own predictions."""
    runner = runners["onnxruntime"]
    image = frame(150, 230, seed=4)  # at the evaluation scale already: 2 x 3 windows
    got = predict_scores(runner, image)
    total = np.zeros(got.shape, np.float64)
    count = np.zeros(got.shape[1:], np.float64)
    for y1, y2, x1, x2 in slide_windows(*image.shape[:2], CROP, STRIDE):
        crop = image[y1:y2, x1:x2].transpose(2, 0, 1)[None].astype(np.float32)
        total[:, y1:y2, x1:x2] += runner.predict_crops(crop)[0]
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1 and count.max() > 1
    np.testing.assert_allclose(got, total / count, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frame_smaller_than_a_crop(runners, reference, backend):
    """One window, padded with the mean colour (0 once normalised) up to the graph's input and
    cropped back: the model on that hand-padded crop."""
    image = frame(60, 90, seed=3)
    runner = runners[backend]
    runner.manifest.eval_scale = [90, 60]  # keep the frame at its size
    try:
        labels, scores = segment(runner, image, return_scores=True)
    finally:
        runner.manifest.eval_scale = list(EVAL_SCALE)
    padded = torch.tensor(runner.manifest.mean).view(1, 3, 1, 1).repeat(1, 1, CROP, CROP)
    padded[0, :, :60, :90] = torch.from_numpy(image.transpose(2, 0, 1)).float()
    with torch.no_grad():
        want = reference(padded)[0, :, :60, :90].numpy()
    assert labels.shape == (60, 90)
    np.testing.assert_allclose(scores, want, rtol=0, atol=1e-4 * float(np.ptp(want)))
    assert agreement(labels, want.argmax(0)) >= 0.999


def test_whole_mode_resizes_the_frame_to_the_graph_input(runners, reference):
    image = frame(150, 260, seed=5)
    labels, scores = segment(runners["onnxruntime"], image, mode="whole", return_scores=True)
    scaled = EvalTransform(EVAL_SCALE)(image)
    x = cv2.resize(scaled, (CROP, CROP), interpolation=cv2.INTER_LINEAR)
    with torch.no_grad():
        logits = reference(torch.from_numpy(x.transpose(2, 0, 1)).float()[None])
        for size in (scaled.shape[:2], image.shape[:2]):  # to the rescaled frame, then the frame
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    want = logits[0]
    assert agreement(labels, want.argmax(0).numpy()) >= 0.999
    np.testing.assert_allclose(scores, want.numpy(), rtol=0, atol=1e-4 * float(np.ptp(want)))


def test_segment_refuses_what_is_not_an_rgb_uint8_frame(runners):
    with pytest.raises(ValueError, match="RGB uint8"):
        segment(runners["torch"], np.zeros((40, 50, 3), np.float32))
    with pytest.raises(ValueError, match="mode"):
        segment(runners["torch"], frame(40, 50), mode="tiles")


# ---------------------------------------------------------------------------------------------
# Runners and batches


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_beyond_max_batch_are_split(runners, backend):
    runner = runners[backend]
    seen = []
    run_batch = runner._run
    runner._run = lambda b: seen.append(len(b)) or run_batch(b)
    try:
        crops = np.random.default_rng(6).uniform(0, 255, (7, 3, CROP, CROP)).astype(np.float32)
        together = runner.predict_crops(crops)
        one_by_one = np.concatenate([runner.predict_crops(c[None]) for c in crops])
    finally:
        del runner._run
    assert seen[:3] == [MAX_BATCH, MAX_BATCH, 1]
    assert together.shape == (7, len(CLASS_NAMES), CROP, CROP)
    np.testing.assert_allclose(together, one_by_one, rtol=0, atol=1e-5)


def test_sessions_sharing_one_arena_compute_what_a_session_of_its_own_does(run):
    """Two sessions on the process's shared CPU arena, the second registration a no-op, give
    the scores of a session with an arena of its own."""
    manifest, graph = Manifest.read(run[1]), run[1] / ONNX
    alone = OnnxRuntimeRunner(graph, manifest, providers=["CPUExecutionProvider"])
    shared = [
        OnnxRuntimeRunner(graph, manifest, providers=["CPUExecutionProvider"], shared_arena=True)
        for _ in range(2)
    ]
    crops = np.random.default_rng(7).uniform(0, 255, (3, 3, CROP, CROP)).astype(np.float32)
    want = alone.predict_crops(crops)
    for runner in shared:
        options = runner.session.get_session_options()
        assert options.get_session_config_entry("session.use_env_allocators") == "1"
        np.testing.assert_allclose(runner.predict_crops(crops), want, rtol=0, atol=1e-5)


def test_the_torch_runner_is_the_merged_base_architecture(runners):
    runner = runners["torch"]
    assert isinstance(runner, TorchRunner)
    assert not any("lora" in k for k in runner.model.state_dict())
    assert runner.model.deform_attn_impl == "gather"
    assert not any(p.requires_grad for p in runner.model.parameters())


def test_auto_picks_onnxruntime_cpu_here_and_says_why(run, caplog):
    with caplog.at_level(logging.INFO, logger="recyclelora.deploy.load"):
        runner = load_export(run[1])
    assert isinstance(runner, OnnxRuntimeRunner)
    assert runner.provider == "CPUExecutionProvider"
    assert "tensorrt" in runner.reason and "no CUDA" in runner.reason
    assert runner.reason in caplog.text


def test_auto_falls_back_to_torch_for_an_export_without_a_graph(copied):
    manifest = Manifest.read(copied)
    del manifest.artefacts[ONNX]
    manifest.write(copied)
    (copied / ONNX).unlink()
    runner = load_export(copied)
    assert isinstance(runner, TorchRunner)
    assert f"has no {ONNX}" in runner.reason


def test_auto_passes_over_a_backend_whose_package_is_missing(run, monkeypatch):
    monkeypatch.setattr(deploy_load, "_installed", lambda module: module != "onnxruntime")
    runner = load_export(run[1])
    assert isinstance(runner, TorchRunner)
    assert "onnxruntime: backend 'onnxruntime' needs the onnxruntime package" in runner.reason


def test_auto_names_every_backend_it_passed_over_when_none_can_run(run):
    """A CUDA device asked for on a machine without one: no backend runs, and the error gives
    each one's reason."""
    with pytest.raises(BackendUnavailable) as e:
        load_export(run[1], device="cuda")
    text = str(e.value)
    assert f"no backend can run {run[1]} here" in text
    assert "tensorrt: " in text
    assert "onnxruntime: onnxruntime on cuda needs" in text and "onnxruntime-gpu" in text
    assert "torch: backend 'torch' has no CUDA device here" in text


def test_an_explicit_backend_that_cannot_run_says_what_to_install(run):
    with pytest.raises(ExportError, match="tensorrt"):
        load_export(run[1], backend="tensorrt")
    with pytest.raises(ExportError, match="onnxruntime-gpu"):
        load_export(run[1], backend="onnxruntime", device="cuda")
    with pytest.raises(ExportError, match="choose one of"):
        load_export(run[1], backend="openvino")


# ---------------------------------------------------------------------------------------------
# Integrity


@pytest.fixture
def copied(run, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(run[1], out)
    return out


@pytest.mark.parametrize(("backend", "name"), [("torch", WEIGHTS), ("onnxruntime", ONNX)])
def test_a_missing_artefact_is_refused(copied, backend, name):
    (copied / name).unlink()
    with pytest.raises(ExportError, match=f"{name} is missing"):
        load_export(copied, backend=backend)


@pytest.mark.parametrize(("backend", "name"), [("torch", WEIGHTS), ("onnxruntime", ONNX)])
def test_a_tampered_artefact_is_refused(copied, backend, name):
    data = bytearray((copied / name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    (copied / name).write_bytes(bytes(data))
    with pytest.raises(ExportError, match=f"{name} differs"):
        load_export(copied, backend=backend)


def test_auto_never_falls_back_past_a_tampered_graph(copied):
    with open(copied / ONNX, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ExportError, match="SHA-256") as e:
        load_export(copied)
    assert not isinstance(e.value, BackendUnavailable)


def test_a_directory_without_manifest_is_refused(tmp_path):
    with pytest.raises(ExportError, match="no model.json"):
        load_export(tmp_path)


# ---------------------------------------------------------------------------------------------
# evaluate.py --export


def test_evaluate_export_gives_the_checkpoints_miou(run, tmp_path, monkeypatch):
    """Both commands at a small evaluation scale: 128 x 256, 3 windows (Cityscapes' 2048 x 1024
    makes 288 windows of this crop a frame)."""
    monkeypatch.setitem(EVAL_SCALES, "cityscapes", (256, 128))
    checkpoint, export, data = run
    common = ["--targets", "cityscapes", "--data-root", str(data), "--workers", "0"]
    by_checkpoint, by_export = tmp_path / "checkpoint", tmp_path / "export"
    assert (
        cli_evaluate.main(
            ["--checkpoint", str(checkpoint), "--device", "cpu", "--out", str(by_checkpoint)]
            + common
        )
        == 0
    )
    assert (
        cli_evaluate.main(
            ["--export", str(export), "--backend", "onnxruntime", "--out", str(by_export)]
            + ["--save-predictions"]
            + common
        )
        == 0
    )
    want = json.loads((by_checkpoint / "metrics.json").read_text())
    got = json.loads((by_export / "metrics.json").read_text())
    w, g = want["targets"]["cityscapes"], got["targets"]["cityscapes"]
    assert w["mIoU"] > 0
    assert abs(g["mIoU"] - w["mIoU"]) <= 0.1
    assert set(g) == set(w)
    assert len(list((by_export / "predictions" / "cityscapes").glob("*.png"))) == 1


def test_evaluate_export_needs_targets_and_a_data_root(run, capsys):
    assert cli_evaluate.main(["--export", str(run[1])]) == 2
    assert "--data-root" in capsys.readouterr().err
