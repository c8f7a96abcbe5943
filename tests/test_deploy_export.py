"""The exporter: ``recyclelora-export`` writes an export directory whose figures hold.

Independent references: the report's figures are recomputed here from the files alone
(``model.safetensors`` loaded into a freshly built ``adapters=None`` model, ``model.onnx`` run
by ONNX Runtime) and from the adapted model that was saved; the structural claim is checked
against ``build_model(preset, adapters=None).state_dict()``; the authors' key layout comes from
the hand-written renaming of the mmseg tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from pathlib import Path

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

from .onnx_trace import trace
from .test_checkpoints_loader import tiny_recipe, trained_tiny
from .test_checkpoints_mmseg import CFG, authors_state, write_mmengine_checkpoint

CROP = 64
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
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
    stderr, stdout)."""
    root = tmp_path_factory.mktemp("export")
    model, path = training_checkpoint(root / "runs" / "tiny")
    out = root / "exports" / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        no_tensorrt(mp)
        err, printed = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(printed):
            rc = cli.main(["--checkpoint", str(path), "--out", str(out), "--trt"])
    return model, out, rc, err.getvalue(), printed.getvalue()


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
    _, out, rc, err, printed = exported
    assert rc == 3
    assert "no TensorRT engine was built: the tensorrt package is not installed" in err
    assert f"--from-export {out} --trt --precision fp16" in err
    assert f"trtexec --onnx={out}/model.fp16.onnx --saveEngine={out}/model.trtexec.fp16" in err
    # the profile: tuned for the export's batch of 8, up to the 18 windows of a 1024 x 2048 frame
    assert "--optShapes=images:8x3x64x64 --maxShapes=images:18x3x64x64" in err
    manifest = Manifest.read(out)
    assert set(manifest.artefacts) == {
        "model.safetensors",
        "model.onnx",
        "model.fp16.onnx",
        "export_report.json",
    }
    assert manifest.artefacts["model.fp16.onnx"].info == {"precision": "fp16"}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    timings = json.loads((out / "export_report.json").read_text())["timings_s"]
    stages = ("load", "merge", "check", "ONNX export", "ONNX check", "ONNX fp16")
    for stage in stages[1:]:  # one progress line per stage, with the time the report keeps
        assert f"{stage}: {timings[stage]:.1f} s" in printed
    assert printed.startswith("load: ") and printed.rstrip().endswith(f"wrote {out}")


def test_a_non_square_input_size_gives_a_graph_of_that_size(tmp_path):
    _, path = training_checkpoint(tmp_path / "runs" / "tiny")
    out = tmp_path / "wide"
    argv = ["--checkpoint", str(path), "--out", str(out), "--input-size", "64", "96"]
    assert cli.main([*argv, "--max-batch", "2"]) == 0
    manifest = Manifest.read(out)
    assert (manifest.input_size, manifest.crop, manifest.stride) == ([64, 96], [64, 96], [42, 64])
    logits = run_onnx(out / "model.onnx", cli.check_images(64, 96, n=3))  # 3 > the max batch
    assert logits.shape == (3, 19, 64, 96)


def test_the_fp16_graph_is_checked_against_fp32_and_the_report_says_so(exported):
    """Recomputed with ONNX Runtime on the two files: the report's figures, within the stated
    fp16 bounds (1 % of the logit range, 99 % argmax agreement)."""
    _, out, _, _, _ = exported
    images = cli.check_images(64, 64)
    fp32, fp16 = run_onnx(out / "model.onnx", images), run_onnx(out / "model.fp16.onnx", images)
    rel = np.abs(fp16 - fp32).max() / (fp32.max() - fp32.min())
    agree = (fp16.argmax(1) == fp32.argmax(1)).mean()
    check = json.loads((out / "export_report.json").read_text())["checks"]["onnx_fp16"]
    assert (
        check["checked"]
        and check["passed"]
        and (check["limit"], check["argmax_limit"])
        == (
            1e-2,
            0.99,
        )
    )
    assert 0 < rel < 1e-2 and agree >= 0.99
    assert check["rel_error"] == pytest.approx(rel, rel=1e-6)
    assert check["argmax_agreement"] == pytest.approx(agree)


def test_weights_are_the_base_architecture_and_the_adapted_model(exported):
    """Keys and shapes equal build_model(preset, adapters=None); outputs equal the adapted
    model's (merge error of fp32 rounding only)."""
    from safetensors.torch import load_file

    model, out, _, _, _ = exported
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
    model, out, _, _, _ = exported
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
    import onnx

    _, out, _, _, _ = exported
    facts = graph_facts(out / "model.onnx")
    plain = plain_from_safetensors(out, Manifest.read(out))
    base_path = out.parent / "plain.onnx"  # traced here, with torch's exporter directly
    trace(plain, torch.full((2, 3, CROP, CROP), 128.0), base_path)

    def histogram_and_initializers(path):
        graph = onnx.load(str(path)).graph
        ops = {}
        for node in graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        return ops, {t.name: list(t.dims) for t in graph.initializer}

    merged_ops, merged_inits = histogram_and_initializers(out / "model.onnx")
    base_ops, base_inits = histogram_and_initializers(base_path)
    base_path.unlink()
    assert merged_ops == base_ops and merged_inits == base_inits
    base = base_graph_facts("tiny", 19, (CROP, CROP), plain.state_dict(), (CROP, CROP), 8)
    assert (base.ops, base.initializers) == (merged_ops, merged_inits)  # the exporter's view
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
    _, out, _, _, _ = exported
    m = Manifest.read(out)
    assert m.classes[0] == "road" and len(m.palette) == 19 and m.palette[0] == [128, 64, 128]
    assert m.mean == pytest.approx([123.675, 116.28, 103.53])
    assert m.std == pytest.approx([58.395, 57.12, 57.375])
    assert (m.crop, m.stride, m.eval_scale, m.patch_size) == ([64, 64], [42, 42], [2048, 1024], 16)
    assert m.source["kind"] == "training" and m.source["iteration"] == 7
    source = Path(m.source["path"])
    assert m.source["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    for name in m.artefacts:
        from recyclelora.deploy.manifest import verify_artefact

        verify_artefact(out, m, name)
    assert {"torch", "onnx", "onnxruntime"} <= set(m.versions)
    assert m.versions["torch"] == torch.__version__
    declared = re.search(r'^version = "([^"]+)"', PYPROJECT.read_text(), re.M)
    assert m.versions["recyclelora"] == declared[1]
    # one permission for every file (safetensors alone would write its file private)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_an_engine_that_fails_to_build_is_exit_4_with_tensorrts_words(tmp_path, monkeypatch):
    """TensorRT's parser messages reach the user verbatim, without a traceback, and the export
    that was to hold the engine is not published."""
    from recyclelora.deploy import export as deploy_export
    from recyclelora.deploy.tensorrt import EngineBuildError

    def parser_fails(directory, manifest, report, precision, images):
        raise EngineBuildError("TensorRT cannot parse model.fp16.onnx:\nIn node 12: Unsupported")

    monkeypatch.setattr(cli, "_tensorrt_missing", lambda: None)
    monkeypatch.setattr(deploy_export, "add_engine", parser_fails)
    _, path = training_checkpoint(tmp_path / "runs" / "tiny")
    out = tmp_path / "exports" / "tiny"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["--checkpoint", str(path), "--out", str(out), "--trt"])
    assert rc == cli.ENGINE_FAILED == 4
    text = err.getvalue()
    assert text.startswith("error: ") and "In node 12: Unsupported" in text
    assert "nothing was written" in text and "Traceback" not in text
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".")]


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
    """(argv, the file the error must name, text it must hold) per refused input."""
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
    precious = tmp_path / "precious"  # a directory of the user's, not an export
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    blocked = tmp_path / "file"
    blocked.write_text("x")
    ckpt = ["--checkpoint", str(good)]
    return [
        (["--checkpoint", str(tmp_path / "missing.pth")], "missing.pth", "missing.pth"),
        (["--checkpoint", str(truncated)], truncated, "truncated"),
        (["--checkpoint", str(foreign)], foreign, "not a training checkpoint"),
        (["--checkpoint", str(other)], other, "do not fit the dinov2_large_mask2former model"),
        (["--checkpoint", str(seven)], seven, "predicts 7 classes but 19 class names"),
        (["--checkpoint", str(unmapped)], unmapped, "extra_proj"),
        ([*ckpt, "--out", str(existing)], existing, "already exists: pass --force"),
        ([*ckpt, "--out", str(precious), "--force"], precious, "not an export directory"),
        ([*ckpt, "--out", str(blocked / "x")], blocked, "cannot write into"),
        ([*ckpt, "--input-size", "60", "64"], good, "not a positive multiple of the patch"),
        ([*ckpt, "--input-size", "0", "64"], good, "not a positive multiple of the patch"),
        ([*ckpt, "--input-size", "-16", "64"], good, "not a positive multiple of the patch"),
    ]


def test_bad_inputs_are_one_paragraph_exit_2_nothing_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cases = bad_inputs(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    for argv, named, text in cases:
        assert cli.main([*argv, "--no-onnx"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert text in err and str(named) in err, (text, named, err)
        assert len(err) < 700, err  # a paragraph, not a dump of keys
        assert not any(a in err for a in UNSAFE_ADVICE), err
        assert "Traceback" not in err
    assert sorted(p for p in tmp_path.rglob("*")) == before
