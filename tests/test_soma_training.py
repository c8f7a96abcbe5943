"""SoMA's recipe in the trainer (docs/method.md §6.2-6.3): the EMA against its recursive formula
(alone, and over the weights a real run trained), validation and checkpoints on the average,
exact resume, and ``train.py soma --demo`` through export and loading."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from recyclelora.adapters import SoMAConfig, SoMALinear, iter_adapted
from recyclelora.data.synthetic import write_demo_datasets
from recyclelora.engine import distributed, trainer
from recyclelora.engine.ema import WeightEMA
from recyclelora.engine.trainer import train
from recyclelora.models import build_model
from recyclelora.recipes import RECIPES, from_dict, shrink, to_dict

from .test_training import TRAIN_PY, datasets, tiny_recipe

MOMENTUM = 0.25  # large, so that the average visibly lags the weights


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return write_demo_datasets(root, n_source=8, n_target=2, size=(64, 128))


def reference_average(sources: list[dict[str, torch.Tensor]], begin: int, m: float) -> dict:
    """mmengine's recursion in float64: after iteration ``begin`` the average is the weights,
    then ``avg = (1 - m) avg + m w`` per iteration (``sources[i]`` = weights after i + 1)."""
    avg = None
    for done, weights in enumerate(sources, start=1):
        if done < begin:
            continue
        w = {k: v.double() for k, v in weights.items()}
        avg = w if avg is None else {k: (1 - m) * avg[k] + m * w[k] for k in w}
    return avg


def test_ema_follows_the_recursive_formula_and_swaps_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[1].weight.requires_grad_(False)  # a frozen parameter is its own average
    frozen = model[1].weight.detach().clone()
    ema = WeightEMA(model, MOMENTUM, begin=3)
    sources = []
    for done in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p))
        sources.append(
            {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        )
        ema.update(done)
        assert ema.steps == max(0, done - 2)
    expected = reference_average(sources, 3, MOMENTUM)
    assert expected.keys() == ema.average.keys() == {"0.weight", "0.bias", "1.bias"}
    for k, v in expected.items():
        torch.testing.assert_close(ema.average[k].double(), v, rtol=0, atol=1e-6)
        assert not torch.allclose(ema.average[k], sources[-1][k])  # it does lag
    own = {n: p.detach().clone() for n, p in model.named_parameters()}
    average = {k: v.clone() for k, v in ema.average.items()}
    with ema.applied():
        params = dict(model.named_parameters())
        for k, v in average.items():
            assert torch.equal(params[k], v), k
    for n, p in model.named_parameters():
        assert torch.equal(p, own[n]), n  # restored bit for bit
    assert all(torch.equal(ema.average[k], v) for k, v in average.items())
    assert torch.equal(model[1].weight, frozen)


def test_ema_before_its_first_iteration_is_the_weights():
    model = nn.Linear(2, 2)
    ema = WeightEMA(model, MOMENTUM, begin=5)
    for done in range(1, 5):
        ema.update(done)
    assert ema.steps == 0 and not ema.average and ema.state_dict()["source"] == {}
    state = ema.model_state(model)
    assert all(torch.equal(state[n], p) for n, p in model.named_parameters())


def soma_recipe(work: Path, iterations: int = 5, **train_kw):
    base = tiny_recipe(work, iterations, **train_kw)
    train_cfg = replace(
        base.train,
        ema=True,
        ema_begin=2,
        ema_momentum=MOMENTUM,
        ckpt_interval=1,
        keep_checkpoints=10,
    )
    return replace(
        base,
        name="soma",
        adapters=SoMAConfig(rank=2, alpha=2.0, first_block=1),
        train=train_cfg,
    )


def checkpoint(work: Path, it: int) -> dict:
    return torch.load(work / "checkpoints" / f"iter_{it}.pth", weights_only=True)


def test_checkpoints_hold_the_average_of_the_trained_weights_and_resume_is_exact(
    tmp_path, data, monkeypatch
):
    seen = []  # a trained tensor as validation sees it
    real_evaluate = trainer.evaluate

    def spy(model, *args, **kwargs):
        seen.append(model.decode_head.cls_embed.weight.detach().clone())
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", spy)
    ctx = distributed.Context()
    full = soma_recipe(tmp_path / "full")
    result = train(full, ctx, *datasets(data))
    states = [checkpoint(tmp_path / "full", i) for i in range(1, 6)]
    assert [s["ema"]["steps"] for s in states] == [0, 1, 2, 3, 4]
    assert states[0]["ema"]["source"] == {}  # before iteration 2: the weights are the average
    sources = [states[0]["model"]] + [s["ema"]["source"] for s in states[1:]]
    trained = sorted(states[-1]["ema"]["source"])
    assert any(".lora_q_A" in k for k in trained) and any(k.endswith("qkv.bias") for k in trained)
    assert any(k.startswith("decode_head.") for k in trained)
    expected = reference_average([{k: s[k] for k in trained} for s in sources], 2, MOMENTUM)
    final = states[-1]
    for k in trained:
        torch.testing.assert_close(final["model"][k].double(), expected[k], rtol=0, atol=1e-6)
    assert not torch.equal(
        final["model"]["decode_head.cls_embed.weight"],
        final["ema"]["source"]["decode_head.cls_embed.weight"],
    )
    # validation (at the end), the returned model and the adapters file use the average
    assert len(seen) == 1 and torch.equal(seen[0], final["model"]["decode_head.cls_embed.weight"])
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, final["model"][k]), k
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "full" / "adapters.safetensors")
    key = "blocks.1.attn.qkv.lora_q_A"
    assert torch.equal(saved[key], final["model"][f"backbone.{key}"])

    part = soma_recipe(tmp_path / "part")
    assert train(part, ctx, *datasets(data), stop_at=3).stopped
    train(part, ctx, *datasets(data), resume=True)
    resumed = checkpoint(tmp_path / "part", 5)
    for section in ("model",):
        for k, v in final[section].items():
            assert torch.equal(resumed[section][k], v), k
    assert resumed["ema"]["steps"] == final["ema"]["steps"]
    for k, v in final["ema"]["source"].items():
        assert torch.equal(resumed["ema"]["source"][k], v), k


def test_soma_recipes_and_the_demo_scaling():
    soma, r2r = RECIPES["soma"], RECIPES["soma_real2real"]
    assert soma.adapters == SoMAConfig(rank=16, alpha=16.0, first_block=8)
    assert soma.adapters.scaling == 1.0
    assert soma.data.targets == ("cityscapes", "bdd", "mapillary") and soma.data.sources == (
        "gtav",
    )
    assert r2r.data.sources == ("cityscapes",) and r2r.data.targets == ("bdd", "mapillary")
    for r in (soma, r2r):
        t = r.train
        assert (t.ema, t.ema_momentum, t.ema_begin) == (True, 2e-4, 12_000)
        assert (t.iterations, t.batch_size, t.lr, t.weight_decay, t.wd_min) == (
            40_000,
            4,
            1e-4,
            0.05,
            1e-5,
        )
        assert from_dict(json.loads(json.dumps(to_dict(r)))) == r
    assert not RECIPES["syn2real"].train.ema
    small = shrink(soma, iterations=1000, depth=4)
    assert (small.train.iterations, small.train.ema_begin, small.adapters.first_block) == (
        1000,
        300,
        1,
    )
    assert small.train.ema_momentum == pytest.approx(8e-3)  # a horizon of 1/8 of the run
    with pytest.raises(ValueError, match="ema_begin 12000 exceeds iterations 100"):
        replace(soma.train, iterations=100)


def test_every_recipe_demos_in_its_own_run_folder_on_shared_data():
    """``train.py soma --demo`` after ``train.py syn2real --demo`` must not resume the other."""
    from recyclelora.cli.train import demo_recipe

    demos = {name: demo_recipe(RECIPES[name]) for name in ("syn2real", "soma", "soma_real2real")}
    assert {n: r.work_dir for n, r in demos.items()} == {
        n: str(Path("runs/demo") / n) for n in demos
    }
    assert {r.data.root for r in demos.values()} == {str(Path("runs/demo/data"))}


@pytest.mark.slow
def test_demo_trains_evaluates_exports_and_its_export_serves(tmp_path):
    """The demo shortened to 20 iterations (the EMA from 10); the full demo is 1,000. Its own
    export (ONNX graph included) is served by the real BentoML server, whose label map equals
    the inference API's on the same export and frame."""
    from safetensors.torch import load_file

    from recyclelora.checkpoints import load_model
    from recyclelora.deploy import load_export, segment

    from .serving_server import encoded, scene, serving

    args = ["--train.iterations", "20", "--train.val_interval", "20", "--train.ckpt_interval", "20"]
    cmd = [sys.executable, str(TRAIN_PY), "soma", "--demo", "--data.workers", "0", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*cmd, "--train.ema_begin", "10"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "runs/demo/soma"
    res = json.loads((run / "demo_results.json").read_text())
    assert res["trained"]["targets"]["target (real)"]["pixels"] > 0
    ckpt = run / "checkpoints/iter_20.pth"
    loaded = load_model(ckpt)
    assert loaded.recipe.name == "soma_demo" and loaded.recipe.adapters.first_block == 1
    layers = dict(iter_adapted(loaded.model.backbone))
    assert layers and all(isinstance(la, SoMALinear) for la in layers.values())
    assert min(int(n.split(".")[1]) for n in layers) == 1  # block 0 untouched

    export = tmp_path / "exports/demo-soma-iter20"
    assert "RECYCLELORA_EXPORT=exports/demo-soma-iter20 make serve" in result.stdout
    assert (export / "model.onnx").is_file()
    merged = load_file(export / "model.safetensors")
    plain = build_model("tiny", adapters=None, img_size=128).state_dict()
    assert {k: tuple(v.shape) for k, v in merged.items()} == {
        k: tuple(v.shape) for k, v in plain.items()
    }
    # the merged weights are the checkpoint's (EMA) model with its adapters folded in
    qkv = loaded.model.backbone.blocks[1].attn.qkv
    torch.testing.assert_close(merged["backbone.blocks.1.attn.qkv.weight"], qkv.merged())

    frame = scene(0, 120, 240)
    expected = segment(load_export(export, "onnxruntime"), frame)
    assert len(np.unique(expected)) > 1  # a label map with several classes to agree on
    with serving(export, tmp_path / "bentoml") as server:
        response = httpx.post(
            server.url + "/segment",
            files={"image": ("frame.png", encoded(frame, "PNG"), "image/png")},
            timeout=60,
        )
    assert response.status_code == 200, response.text
    labels = Image.open(io.BytesIO(response.content))
    assert labels.mode == "L" and labels.size == (240, 120)
    assert np.array_equal(np.asarray(labels), expected)
