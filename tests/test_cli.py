"""The command-line entry points: overrides reach the run, library exceptions become exit code 2
with ``error: ...`` on stderr, and the console scripts and training/*.py wrappers resolve."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from recyclelora.cli import evaluate as cli_evaluate
from recyclelora.cli import train as cli_train
from recyclelora.data import DataError
from recyclelora.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[1]


def _printed_recipe(out: str) -> dict:
    """The JSON recipe that train's main prints after ``recipe NAME:``."""
    text = out[out.index("recipe ") :].split("\n", 1)[1]
    return json.JSONDecoder().raw_decode(text)[0]


def test_dry_run_prints_the_overridden_eval_section(capsys):
    argv = ["syn2real", "--dry-run", "--eval.mode", "whole", "--eval.stride", "100"]
    assert cli_train.main([*argv, "--eval.precision", "bf16", "--train.deterministic", "1"]) == 0
    recipe = _printed_recipe(capsys.readouterr().out)
    assert recipe["eval"] == {"mode": "whole", "crop": 512, "stride": 100, "precision": "bf16"}
    assert recipe["train"]["deterministic"] is True


@pytest.mark.parametrize(
    "override, message",
    [
        (["--train.iterations", "many"], "error: --train.iterations: invalid literal"),
        (["--eval.mode", "wide"], "error: invalid recipe: eval.mode must be among"),
    ],
)
def test_bad_override_exits_2(capsys, override, message):
    assert cli_train.main(["syn2real", "--dry-run", *override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err


def test_train_turns_library_errors_into_exit_codes(monkeypatch, capsys):
    """What the device set-up, the trainer and the data raise is reported, not a traceback."""

    no_cuda = "--device cuda was asked for, but this machine has no CUDA device"

    def no_device(*args, **kwargs):
        raise RuntimeError(no_cuda)

    monkeypatch.setattr(cli_train.distributed, "init", no_device)
    assert cli_train.main(["syn2real", "--device", "cuda"]) == 2
    assert capsys.readouterr().err == f"error: {no_cuda}\n"
    monkeypatch.undo()

    monkeypatch.setattr(cli_train, "missing_inputs", lambda recipe: [])
    monkeypatch.setattr(cli_train, "build_sets", lambda recipe: (None, {}))
    for error, code in (
        (ValueError("the global batch of 4 does not split over 3 processes"), 2),
        (DataError("too many unreadable training files"), 2),
        (cli_train.NonFiniteLoss("loss is nan at iteration 3"), 3),
    ):

        def failing(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(cli_train, "train", failing)
        assert cli_train.main(["syn2real", "--device", "cpu"]) == code
        assert capsys.readouterr().err == f"error: {error}\n"


def test_evaluate_defaults_to_the_recipe_eval_section():
    recipe = replace(
        RECIPES["syn2real"],
        eval=replace(RECIPES["syn2real"].eval, mode="whole", stride=200, precision="bf16"),
    )
    args = cli_evaluate.parse(["--checkpoint", "c.pth"])
    assert cli_evaluate.evaluation_options(recipe, args) == {
        "mode": "whole",
        "crop": 512,
        "stride": 200,
        "precision": "bf16",
    }
    args = cli_evaluate.parse(["--checkpoint", "c.pth", "--precision", "fp16", "--mode", "slide"])
    options = cli_evaluate.evaluation_options(recipe, args)
    assert (options["mode"], options["precision"]) == ("slide", "fp16")


def test_evaluate_bad_checkpoint_exits_2(tmp_path, capsys):
    assert cli_evaluate.main(["--checkpoint", str(tmp_path / "nope.pth"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.pth" in err and "Traceback" not in err


def test_console_scripts_resolve():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    expected = {
        "recyclelora-train": "recyclelora.cli.train:main",
        "recyclelora-eval": "recyclelora.cli.evaluate:main",
        "recyclelora-prepare": "recyclelora.cli.prepare:main",
        "recyclelora-export": "recyclelora.cli.export:main",
    }
    assert expected.items() <= scripts.items()
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


@pytest.mark.parametrize(
    "script, argv",
    [
        ("train.py", ["syn2real", "--eval.mode", "wide"]),
        ("evaluate.py", ["--checkpoint", "nope.pth", "--device", "cpu"]),
    ],
)
def test_training_scripts_are_thin_wrappers(tmp_path, script, argv):
    """The README's commands run the cli modules, with their exit codes, from any folder."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "training" / script), *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
