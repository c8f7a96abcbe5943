"""``recyclelora-export``: training checkpoint -> mmseg layout (authors' keys or merged),
the default checkpoint under runs/, --inspect, and one-line errors with exit code 2."""

from __future__ import annotations

import pytest
import torch

from recyclelora import load_model
from recyclelora.adapters import iter_adapted
from recyclelora.checkpoints import save_checkpoint
from recyclelora.cli.export import main

from .test_checkpoints_loader import assert_same_state, make_run, outputs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


def test_training_checkpoint_to_mmseg_layout(run, tmp_path, capsys):
    model, _, path = run
    out = tmp_path / "ours_mmseg.pth"
    assert main(["--checkpoint", str(path), "--mmseg", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"training checkpoint {path}, iteration 7" in printed and f"wrote {out}" in printed
    keys = torch.load(out, weights_only=True)["state_dict"].keys()
    assert "backbone.blocks.0.attn.qkv.lora_A_main" in keys
    back = load_model(out)
    assert back.kind == "mmseg" and back.report.initial_factors == "stored"
    assert_same_state(model, back.model)


def test_merged_export(run, tmp_path):
    model, _, path = run
    out = tmp_path / "merged.pth"
    assert main(["--checkpoint", str(path), "--mmseg", str(out), "--merged"]) == 0
    keys = torch.load(out, weights_only=True)["state_dict"].keys()
    assert keys and not any(".lora_" in k for k in keys)
    plain = load_model(out).model
    assert not list(iter_adapted(plain))
    assert torch.allclose(outputs(plain), outputs(model), atol=1e-4, rtol=1e-4)


def test_default_is_the_newest_checkpoint_under_runs(run, tmp_path, monkeypatch, capsys):
    _, _, path = run
    monkeypatch.chdir(tmp_path)
    assert main(["--inspect"]) == 2
    assert capsys.readouterr().err == "error: no checkpoint under runs/; pass --checkpoint PATH\n"
    state = torch.load(path, weights_only=True)
    saved = save_checkpoint({**state, "iteration": 12}, tmp_path / "runs/tiny/checkpoints", 12)
    assert main(["--inspect"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"checkpoint: {saved.relative_to(tmp_path)} (iteration 12)\n")
    assert "training checkpoint" in printed and "iteration: 12" in printed


def test_errors_are_one_line_with_exit_code_2(run, tmp_path, capsys):
    _, _, path = run
    cases = [
        ["--checkpoint", str(tmp_path / "missing.pth"), "--mmseg", str(tmp_path / "o.pth")],
        ["--checkpoint", str(tmp_path), "--inspect"],
        ["--checkpoint", str(path), "--mmseg", str(tmp_path / "o.pth"), "--trt"],
        ["--checkpoint", str(path), "--inspect", "--merged"],
    ]
    expected = [
        "missing.pth",
        "is a directory",
        "apply to the export",
        "--merged applies to --mmseg",
    ]
    for argv, text in zip(cases, expected, strict=True):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and text in err, err
    assert not (tmp_path / "o.pth").exists()
