"""The exporter: ``recyclelora-export`` writes an export directory whose figures hold.

Independent references: the report's figures are recomputed here from the files alone
(``model.safetensors`` loaded into a freshly built ``adapters=None`` model, ``model.onnx`` run
by ONNX Runtime) and from the adapted model that was saved; the structural claim is checked
against ``build_model(preset, adapters=None).state_dict()``; the authors' key layout comes from
the hand-written renaming of the mmseg tests.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from recyclelora.checkpoints import save_checkpoint
from recyclelora.cli import export as cli
from recyclelora.deploy import Manifest
from recyclelora.deploy import export as exporter
from recyclelora.deploy.onnx_graph import TENSORRT_OPS, base_graph_facts, graph_facts
from recyclelora.models import build_model
from recyclelora.recipes import to_dict

from .test_checkpoints_loader import tiny_recipe, trained_tiny
from .test_checkpoints_mmseg import CFG, authors_state, write_mmengine_checkpoint

CROP = 64
UNSAFE_ADVICE = ("weights_only", "safe_globals", "trust")


def training_checkpoint(folder, iteration: int = 7):
    recipe = tiny_recipe(folder)
    model = trained_tiny(CROP)
    with torch.no_grad():  # LayerScale at its 1e-5 init would hide the adapters' contribution
        for name, p in model.backbone.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(0.5)
    state = {"iteration": iteration, "model": model.state_dict(), "recipe": to_dict(recipe)}
    return model, save_checkpoint(state, folder / "checkpoints", iteration)


def no_tensorrt(monkeypatch) -> None:
    monkeypatch.setattr(cli, "_tensorrt_missing", lambda: "the tensorrt package is not installed")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export with --trt on a machine without TensorRT: (adapted model, export dir, rc,
    stderr lines)."""
    root = tmp_path_factory.mktemp("export")
    model, path = training_checkpoint(root / "runs" / "tiny")
    out = root / "exports" / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        no_tensorrt(mp)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli.main(["--checkpoint", str(path), "--out", str(out), "--trt"])
    return model, out, rc, err.getvalue()


def plain_from_safetensors(directory, manifest: Manifest, deform_attn_impl: str = "gather"):
    from safetensors.torch import load_file

    model = build_model(
        manifest.preset,
        manifest.num_classes,
        adapters=None,
        deform_attn_impl=deform_attn_impl,
        img_size=manifest.train_size,
    )
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval()


def run_onnx(path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images})[0]


def test_trt_without_tensorrt_writes_everything_then_exits_3(exported):
    _, out, rc, err = exported
    assert rc == 3
    assert "no TensorRT engine was built: the tensorrt package is not installed" in err
    assert f"--from-export {out} --trt --precision fp16" in err
    assert "trtexec --onnx=" in err and "--maxShapes=images:8x3x64x64" in err
    manifest = Manifest.read(out)
    assert set(manifest.artefacts) == {"model.safetensors", "model.onnx", "export_report.json"}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_weights_are_the_base_architecture_and_the_adapted_model(exported):
    """Keys and shapes equal build_model(preset, adapters=None); outputs equal the adapted
    model's (merge error of fp32 rounding only)."""
    from safetensors.torch import load_file

    model, out, _, _ = exported
    manifest = Manifest.read(out)
    state = load_file(str(out / "model.safetensors"))
    base = build_model("tiny", adapters=None, img_size=CROP).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in base.items()
    }
    assert (manifest.preset, manifest.train_size, manifest.input_size) == (
        "tiny",
        [64, 64],
        [64, 64],
    )
    images = cli.check_images(64, 64)
    with torch.no_grad():
        want = model(torch.from_numpy(images)).double()
        # the same sampler as the adapted model: what differs is the merge alone
        plain = plain_from_safetensors(out, manifest, model.deform_attn_impl)
        got = plain(torch.from_numpy(images)).double()
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel > 0  # the adapters matter in this model: a merge error can be seen
    report = json.loads((out / "export_report.json").read_text())
    assert rel < 1e-5
    assert report["checks"]["merge"]["passed"]
    assert report["checks"]["merge"]["max_rel_error"] == pytest.approx(rel, rel=0.5, abs=1e-7)


def test_onnx_matches_pytorch_and_the_report_says_so(exported):
    """ONNX Runtime on the exported graph vs the plain model loaded from model.safetensors,
    recomputed here; batch sizes 1 and max_batch both run (dynamic batch)."""
    model, out, _, _ = exported
    manifest = Manifest.read(out)
    images = cli.check_images(64, 64, n=8)
    with torch.no_grad():
        want = model(torch.from_numpy(images)).numpy()
    got = run_onnx(out / "model.onnx", images)
    assert got.shape == (8, 19, 64, 64)
    span = want.max() - want.min()
    rel = np.abs(got - want).max() / span
    assert rel < 1e-4 and (got.argmax(1) == want.argmax(1)).mean() >= 0.999
    np.testing.assert_allclose(run_onnx(out / "model.onnx", images[:1]), got[:1], atol=1e-5)
    check = json.loads((out / "export_report.json").read_text())["checks"]["onnxruntime"]
    first4 = np.abs(got[:4] - want[:4]).max() / (want[:4].max() - want[:4].min())
    assert check["passed"] and check["rel_error"] == pytest.approx(first4, rel=0.5, abs=1e-7)
    assert check["argmax_agreement"] >= 0.999
    assert manifest.max_batch == 8


def test_graph_has_no_overhead_and_only_tensorrt_ops(exported):
    """The merged graph equals an independent export of the plain architecture (op types and
    initializer shapes); no GridSample; opset >= 17; every op in TensorRT's list."""
    _, out, _, _ = exported
    facts = graph_facts(out / "model.onnx")
    plain = build_model("tiny", adapters=None, img_size=CROP)
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    base = base_graph_facts("tiny", 19, (CROP, CROP), state, (CROP, CROP), 8)
    assert facts.ops == base.ops and facts.initializers == base.initializers
    checks = json.loads((out / "export_report.json").read_text())["checks"]
    assert checks["zero_overhead"]["passed"] and checks["zero_overhead"]["op_types_equal"]
    # every weight of the plain model is in the graph (plus constants such as position codes)
    weights = sum(v.numel() for v in plain.state_dict().values())
    assert checks["zero_overhead"]["parameters"] == base.parameters >= weights
    assert "GridSample" not in facts.ops and facts.opset >= 17
    assert set(facts.ops) <= TENSORRT_OPS
    assert facts.inputs == {"images": ["batch", 3, 64, 64]}
    assert checks["graph"]["passed"] and checks["graph"]["tensorrt_ops_version"] == "10.15"


def test_manifest_describes_the_deployment(exported):
    _, out, _, _ = exported
    m = Manifest.read(out)
    assert m.classes[0] == "road" and len(m.palette) == 19 and m.palette[0] == [128, 64, 128]
    assert m.mean == pytest.approx([123.675, 116.28, 103.53])
    assert (m.crop, m.stride, m.eval_scale, m.patch_size) == ([64, 64], [42, 42], [2048, 1024], 16)
    assert m.source["kind"] == "training" and m.source["iteration"] == 7
    for name in m.artefacts:
        from recyclelora.deploy.manifest import verify_artefact

        verify_artefact(out, m, name)
    assert {"torch", "onnx", "onnxruntime"} <= set(m.versions)
    # one permission for every file (safetensors alone would write its file private)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_structure_check_sees_an_extra_adapter_branch():
    """A graph with one more MatMul and two more initializers is not zero-overhead."""
    from recyclelora.deploy.onnx_graph import GraphFacts

    base = GraphFacts(18, {"MatMul": 2, "Add": 1}, {"w": [4, 4]}, {}, {})
    adapted = GraphFacts(
        18, {"MatMul": 4, "Add": 2}, {"w": [4, 4], "A": [2, 4], "B": [4, 2]}, {}, {}
    )
    check = exporter.structure_check(adapted, base)
    assert not check["passed"] and check["differing_ops"] == {"Add": [2, 1], "MatMul": [4, 2]}
    assert check["differing_initializers"] == ["A", "B"]


def test_authors_mmseg_checkpoint_exports_and_matches(tmp_path, monkeypatch):
    """An mmseg file in the authors' layout (no initial factors) exports; its ONNX matches the
    PyTorch model it was written from."""
    model = trained_tiny(CROP)
    path = tmp_path / "g2cbm_iter_40000.pth"
    write_mmengine_checkpoint(path, authors_state(model))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--checkpoint", str(path)]) == 0
    out = tmp_path / "exports" / "g2cbm_iter_40000-iter40000"
    manifest = Manifest.read(out)
    assert manifest.source["kind"] == "mmseg" and manifest.source["iteration"] == 40000
    images = cli.check_images(64, 64)
    with torch.no_grad():
        want = model(torch.from_numpy(images)).numpy()
    got = run_onnx(out / "model.onnx", images)
    assert np.abs(got - want).max() / (want.max() - want.min()) < 1e-4


def test_a_failed_check_writes_nothing(tmp_path, monkeypatch, capsys):
    _, path = training_checkpoint(tmp_path / "runs" / "tiny")
    monkeypatch.setattr(exporter, "MERGE_LIMIT", 0.0)
    out = tmp_path / "out"
    assert cli.main(["--checkpoint", str(path), "--out", str(out), "--no-onnx"]) == 2
    err = capsys.readouterr().err
    assert "merge check failed" in err and "max_rel_error" in err and str(path) in err
    assert list(tmp_path.iterdir()) == [tmp_path / "runs"]


def test_default_checkpoint_and_out_and_force(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _, path = training_checkpoint(tmp_path / "runs" / "demo" / "run", iteration=12)
    assert cli.main(["--no-onnx"]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "exports" / "demo-run-iter12"
    assert f"checkpoint: {path.relative_to(tmp_path)} (iteration 12)" in printed
    for stage in ("load:", "merge:", "check:"):
        assert stage in printed
    assert set(Manifest.read(out).artefacts) == {"model.safetensors", "export_report.json"}
    assert cli.main(["--no-onnx"]) == 2
    assert "already exists: pass --force" in capsys.readouterr().err
    (out / "marker").write_text("old")
    assert cli.main(["--no-onnx", "--force"]) == 0
    assert not (out / "marker").exists() and Manifest.read(out).source["iteration"] == 12


def bad_inputs(tmp_path):
    """(argv, text the error must hold) per refused input."""
    model, good = training_checkpoint(tmp_path / "runs" / "tiny")
    truncated = tmp_path / "iter_8.pth"
    truncated.write_bytes(good.read_bytes()[:5000])
    foreign = tmp_path / "foreign.pth"
    torch.save({"epoch": 3}, foreign)
    seven_classes = build_model("tiny", num_classes=7, adapters=CFG, img_size=CROP, progress=False)
    seven = tmp_path / "seven_classes.pth"  # the mmseg loader takes the class count it holds
    torch.save({"state_dict": authors_state(seven_classes)}, seven)
    other = tmp_path / "other_preset.pth"
    state = torch.load(good, weights_only=True)
    state["recipe"]["model"] = "dinov2_large_mask2former"
    torch.save(state, other)
    unmapped = tmp_path / "unmapped.pth"
    authors = authors_state(model)
    authors["decode_head.extra_proj.weight"] = torch.zeros(3)
    torch.save({"state_dict": authors}, unmapped)
    existing = tmp_path / "existing"
    existing.mkdir()
    blocked = tmp_path / "file"
    blocked.write_text("x")
    return [
        (["--checkpoint", str(tmp_path / "missing.pth")], "missing.pth"),
        (["--checkpoint", str(truncated)], "truncated"),
        (["--checkpoint", str(foreign)], "not a training checkpoint"),
        (["--checkpoint", str(other)], "do not fit the model its recipe describes"),
        (["--checkpoint", str(seven)], "predicts 7 classes but 19 class names"),
        (["--checkpoint", str(unmapped)], "extra_proj"),
        (["--checkpoint", str(good), "--out", str(existing)], "already exists: pass --force"),
        (["--checkpoint", str(good), "--out", str(blocked / "x")], "cannot write into"),
        (["--checkpoint", str(good), "--input-size", "60", "64"], "not a multiple of the patch"),
    ]


def test_bad_inputs_are_one_paragraph_exit_2_nothing_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cases = bad_inputs(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    for argv, text in cases:
        assert cli.main([*argv, "--no-onnx"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert text in err, (text, err)
        assert not any(a in err for a in UNSAFE_ADVICE), err
        assert "Traceback" not in err
    assert sorted(p for p in tmp_path.rglob("*")) == before
