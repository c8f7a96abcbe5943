"""The training engine end to end on the tiny preset: exact resume (also after SIGTERM and
SIGKILL in a real process), DDP against one process, non-finite loss, the CLI and the demo."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from recyclelora.adapters import layer as adapter_layer
from recyclelora.adapters.init import QR_BLAS_THREADS
from recyclelora.data import EvalTransform, TrainSet, build_loader, build_train_sampler
from recyclelora.data.datasets import GTAV, Cityscapes
from recyclelora.data.synthetic import write_demo_datasets
from recyclelora.data.transforms import TrainTransform
from recyclelora.engine import distributed, trainer
from recyclelora.engine.trainer import NonFiniteLoss, train
from recyclelora.models import Segmentor
from recyclelora.recipes import RECIPES, DataConfig, EvalConfig, TrainConfig

TRAIN_PY = Path(__file__).resolve().parents[1] / "training" / "train.py"


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    return write_demo_datasets(
        tmp_path_factory.mktemp("data"), n_source=8, n_target=2, size=(64, 128)
    )


def tiny_recipe(work: Path, iterations: int = 6, **train_kw):
    return replace(
        RECIPES["syn2real"],
        model="tiny",
        backbone_weights="",
        data=DataConfig(crop=64, workers=0, gtav_subset=6),
        train=TrainConfig(
            iterations=iterations,
            lr=1e-3,
            val_interval=1000,
            ckpt_interval=2,
            log_interval=1,
            **train_kw,
        ),
        eval=EvalConfig(mode="whole"),
        work_dir=str(work),
    )


def datasets(roots: dict[str, Path]):
    train_set = TrainSet([GTAV(roots["gtav"], converted=False)], TrainTransform(crop_size=64))
    targets = {
        "real": Cityscapes(
            roots["cityscapes"], "val", converted=False, transform=EvalTransform((128, 64))
        )
    }
    return train_set, targets


def final_state(work: Path, iteration: int) -> dict[str, torch.Tensor]:
    return torch.load(work / "checkpoints" / f"iter_{iteration}.pth", weights_only=True)["model"]


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_resume_is_bit_exact_and_survives_a_killed_write(tmp_path, demo_data):
    ctx = distributed.Context()
    full = tiny_recipe(tmp_path / "full")
    result = train(full, ctx, *datasets(demo_data))
    assert (
        result.iteration == 6
        and not result.stopped
        and result.metrics["targets"]["real"]["pixels"] > 0
    )
    assert [p.name for p in sorted((tmp_path / "full" / "checkpoints").iterdir())] == [
        "iter_2.pth",
        "iter_4.pth",
        "iter_6.pth",
    ]
    assert (tmp_path / "full" / "adapters.safetensors").is_file()
    assert list((tmp_path / "full" / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "full" / "recipe.json").read_text())["model"] == "tiny"
    saved = torch.load(tmp_path / "full" / "checkpoints" / "iter_6.pth", weights_only=True)
    init = saved["adapter_init"]  # the arithmetic that produced the initial factors
    expected = ("rrqr", full.adapters.qr_dtype, QR_BLAS_THREADS, torch.__version__)
    assert (init["init"], init["qr_dtype"], init["qr_blas_threads"], init["torch"]) == expected

    part = tiny_recipe(tmp_path / "part")
    stopped = train(part, ctx, *datasets(demo_data), stop_at=3)
    assert stopped.stopped and stopped.iteration == 3
    train(part, ctx, *datasets(demo_data), resume=True)
    assert_same(final_state(tmp_path / "part", 6), final_state(tmp_path / "full", 6))

    # a run killed while writing iteration 4 left only a partial temp file: resume from 2
    killed = tiny_recipe(tmp_path / "killed")
    train(killed, ctx, *datasets(demo_data), stop_at=4)
    ckpts = tmp_path / "killed" / "checkpoints"
    data = (ckpts / "iter_4.pth").read_bytes()
    (ckpts / "iter_4.pth").unlink()
    (ckpts / "iter_4.pth.tmp").write_bytes(data[: len(data) // 3])
    logs: list[str] = []
    train(killed, ctx, *datasets(demo_data), resume=True, on_log=logs.append)
    assert any("iter_2.pth at iteration 2" in m for m in logs)
    assert_same(final_state(tmp_path / "killed", 6), final_state(tmp_path / "full", 6))


def nan_loss_at_call(monkeypatch, n: int, combine) -> dict[str, int]:
    """Make the ``n``-th ``Segmentor.loss`` call return ``combine(loss, nan)`` as its total;
    returns the call counter."""
    real_loss = Segmentor.loss
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        out = real_loss(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == n:
            out["loss"] = combine(out["loss"], torch.tensor(float("nan")))
        return out

    monkeypatch.setattr(Segmentor, "loss", flaky)
    return calls


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, demo_data, monkeypatch):
    """log_interval 1: the check runs after every iteration, so the bad one is the last."""
    nan_loss_at_call(monkeypatch, 3, lambda loss, nan: loss * nan)
    with pytest.raises(NonFiniteLoss, match=r"iteration 3 .*iter_2\.pth.*--train\.lr"):
        train(tiny_recipe(tmp_path), distributed.Context(), *datasets(demo_data))
    assert (tmp_path / "checkpoints" / "iter_2.pth").is_file()


def batch_paths(recipe, train_set, n: int) -> list[list[str]]:
    """The files of the first ``n`` batches, read here from a loader of their own."""
    t = recipe.train
    sampler = build_train_sampler(
        train_set, t.batch_size, seed=t.seed, gtav_subset=recipe.data.gtav_subset
    )
    batches = iter(build_loader(train_set, sampler, num_workers=0))
    return [next(batches)["path"] for _ in range(n)]


@pytest.mark.parametrize("corrupts_parameters", [False, True])
def test_non_finite_loss_is_found_at_the_next_check(
    tmp_path, demo_data, monkeypatch, corrupts_parameters
):
    """log_interval 4, ckpt_interval 2: checks after iterations 2 and 4 only. Iteration 3's loss
    is NaN; the check before the iteration-4 checkpoint names iteration 3 and its files (not
    iteration 4's), and iteration 4 is never saved. ``loss + nan`` keeps the gradients finite, so
    iteration 4 runs; ``loss * nan`` makes the parameters NaN, so iteration 4's matching meets
    non-finite predictions and the check runs right then."""
    calls = nan_loss_at_call(
        monkeypatch,
        3,
        (lambda loss, nan: loss * nan) if corrupts_parameters else (lambda loss, nan: loss + nan),
    )

    recipe = replace(
        tiny_recipe(tmp_path), train=replace(tiny_recipe(tmp_path).train, log_interval=4)
    )
    train_set, targets = datasets(demo_data)
    third, fourth = batch_paths(recipe, train_set, 4)[2:]
    assert third != fourth
    with pytest.raises(NonFiniteLoss, match=r"iteration 3 \(loss nan.*iter_2\.pth") as e:
        train(recipe, distributed.Context(), train_set, targets)
    assert str(e.value).endswith(", ".join(third))
    assert calls["n"] == (3 if corrupts_parameters else 4)  # NaN parameters: matching raised
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_2.pth"]


# AdamW divides by sqrt(v) + eps: with the recipe's eps 1e-8, float rounding noise in gradients
# that are mathematically 0 (e.g. attention key biases: softmax ignores them) becomes lr-sized
# updates that differ between any two summation orders. eps 1e-4 leaves real gradients (~1e-3)
# almost untouched and keeps that noise from moving parameters, so the parameters compare the
# gradients DDP computes with the single-process ones.
DDP_EPS = 1e-4


def ddp_worker(rank: int, port: int, work: str, roots: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    torch.set_num_threads(1)
    decompositions = []
    real = adapter_layer.initial_factors

    def counted(*args, **kwargs):
        decompositions.append(1)
        return real(*args, **kwargs)

    adapter_layer.initial_factors = counted  # this process only
    ctx = distributed.init("cpu")
    try:
        result = train(tiny_recipe(Path(work), iterations=4, eps=DDP_EPS), ctx, *datasets(roots))
        state = {"decompositions": len(decompositions), "model": result.model.state_dict()}
        torch.save(state, Path(work) / f"rank{rank}.pth")
    finally:
        distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(tmp_path, demo_data):
    """Global batch 4 = 2 ranks x 2 images, gloo: same parameters as one process with batch 4."""
    single = tiny_recipe(tmp_path / "single", iterations=4, eps=DDP_EPS)
    train(single, distributed.Context(), *datasets(demo_data))
    mp.spawn(ddp_worker, args=(free_port(), str(tmp_path / "ddp"), demo_data), nprocs=2, join=True)
    a, b = final_state(tmp_path / "ddp", 4), final_state(tmp_path / "single", 4)
    # AdamW moves a parameter by at most about lr per step: differences stay below 1% of that
    # budget (measured: about 6e-6), orders of magnitude under any real update.
    lr, iters = single.train.lr, single.train.iterations
    assert_same(a, b, atol=0.01 * lr * iters)
    trained = [k for k in a if "lora_main_A" in k]
    assert trained and any(not torch.equal(a[k], a[k.replace("_A", "_A0")]) for k in trained)
    # only rank 0 decomposed (16 adapted layers); rank 1 holds exactly its tensors, buffers too
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pth", weights_only=True) for r in (0, 1)]
    assert [r["decompositions"] for r in ranks] == [16, 0]
    assert_same(ranks[1]["model"], a)
    assert any(k.endswith("lora_sub_B0") for k in ranks[1]["model"])


class Probe(torch.nn.Module):
    """A parameter and a constant buffer, both different on every rank before DDP."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((3,), float(rank)))
        self.register_buffer("c", torch.full((3,), 10.0 + rank))

    def forward(self, x):
        return x * self.w + self.c


class DDPBefore213(torch.nn.parallel.DistributedDataParallel):
    """DDP's signature before torch 2.13 (no ``forward_sync_buffers``)."""

    def __init__(self, module, device_ids=None, broadcast_buffers=True):
        super().__init__(module, device_ids=device_ids, broadcast_buffers=broadcast_buffers)


def wrap_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    ctx = distributed.init("cpu")
    seen = []
    try:
        for ddp_class in (torch.nn.parallel.DistributedDataParallel, DDPBefore213):
            distributed.DistributedDataParallel = ddp_class  # this process only
            probe = Probe(rank)
            ddp = distributed.wrap_ddp(probe, ctx)
            at_start = (probe.w.detach().clone(), probe.c.clone())
            probe.c += rank  # a forward must not re-broadcast buffers: rank 1's change stays
            ddp(torch.ones(3)).sum().backward()
            seen.append((*at_start, probe.c.clone()))
        torch.save(seen, Path(out) / f"rank{rank}.pth")
    finally:
        distributed.shutdown()


def test_ddp_syncs_buffers_once_at_construction_on_every_torch(tmp_path):
    """Both DDP signatures: rank 0's parameters and buffers at construction, no buffer traffic
    in forward (the adapters' initial factors are constants)."""
    mp.spawn(wrap_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1)]
    for rank, seen in enumerate(ranks):
        for w, c, after_forward in seen:
            assert torch.equal(w, torch.zeros(3)) and torch.equal(c, torch.full((3,), 10.0))
            assert torch.equal(after_forward, torch.full((3,), 10.0 + rank))


def test_validation_uses_the_eval_precision(tmp_path, demo_data, monkeypatch):
    """Validation runs under recipe.eval.precision, whatever the training precision; the CPU
    has no autocast, so precisions map to dtypes here as on CUDA."""
    as_on_cuda = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    monkeypatch.setattr(trainer, "autocast_dtype", lambda precision, device: as_on_cuda[precision])
    seen = []
    real_evaluate = trainer.evaluate

    def spy(*args, autocast_dtype=None, **kwargs):
        seen.append(autocast_dtype)
        return real_evaluate(*args, **kwargs)  # the CPU evaluates in fp32

    monkeypatch.setattr(trainer, "evaluate", spy)
    recipe = tiny_recipe(tmp_path, iterations=1)
    recipe = replace(recipe, eval=replace(recipe.eval, precision="bf16"))
    logs: list[str] = []
    train(recipe, distributed.Context(), *datasets(demo_data), on_log=logs.append)
    assert seen == [torch.bfloat16]
    assert "training fp32, validation bf16 autocast; TF32 left at PyTorch's defaults" in logs[0]


def run_cli(cwd: Path, *args: str, wait: bool = True, env_extra: dict | None = None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, str(TRAIN_PY), "syn2real", "--demo", "--data.workers", "0", *args]
    if wait:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_and_sigkill_then_resume_match_an_uninterrupted_run(tmp_path):
    args = ["--train.iterations", "16", "--train.ckpt_interval", "2", "--train.val_interval", "100"]
    args.append("--no-export")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    done = run_cli(tmp_path / "a", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpts = tmp_path / "b" / "runs" / "demo" / "syn2real" / "checkpoints"

    proc = run_cli(tmp_path / "b", *args, wait=False)
    wait_for(ckpts / "iter_2.pth", proc)
    # a scheduler ending the job: checkpoint, clean exit. The request is read at the next check
    # (every log_interval iterations and before each checkpoint: here every 2 iterations)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "stopped at iteration" in out, out[-2000:]

    proc = run_cli(tmp_path / "b", *args, "--resume", wait=False)
    wait_for(ckpts / "iter_10.pth", proc)
    proc.kill()  # SIGKILL at an arbitrary moment
    proc.wait(timeout=60)
    resumed = run_cli(tmp_path / "b", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(
        tmp_path / "a" / "runs/demo/syn2real/checkpoints/iter_16.pth", weights_only=True
    )["model"]
    b = torch.load(ckpts / "iter_16.pth", weights_only=True)["model"]
    assert_same(a, b)


def test_dry_run_counts_without_allocating(capsys):
    from recyclelora.cli.train import main

    assert main(["syn2real", "--dry-run"]) == 0
    assert "trainable adapter parameters 14,155,776 (14.16M)" in capsys.readouterr().out
    assert main(["real2real", "--dry-run"]) == 0
    assert "trainable adapter parameters 13,369,344 (13.37M)" in capsys.readouterr().out


def test_missing_data_and_weights_say_what_to_do(tmp_path, capsys):
    from recyclelora.cli.train import main

    code = main(
        ["syn2real", "--data.root", str(tmp_path), "--backbone_weights", str(tmp_path / "w.pth")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(tmp_path / "w.pth") in err and "dinov2_vitl14_pretrain.pth" in err
    for folder in ("gta", "cityscapes", "bdd100k", "mapillary"):
        assert str(tmp_path / folder) in err
    # unconverted labels: the exact prepare_data command is printed
    write_demo_datasets(tmp_path, n_source=2, n_target=1, size=(32, 64))
    assert main(["syn2real", "--data.root", str(tmp_path), "--backbone_weights", ""]) == 2
    assert f"python training/prepare_data.py gtav {tmp_path / 'gta'}" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_beats_an_untrained_model(tmp_path):
    args = ["--train.iterations", "200", "--train.val_interval", "200", "--no-export"]
    result = run_cli(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    res = json.loads((tmp_path / "runs/demo/syn2real/demo_results.json").read_text())
    before = res["untrained"]["targets"]["target (real)"]["mIoU"]
    after = res["trained"]["targets"]["target (real)"]["mIoU"]
    assert after > 10 and after > 3 * before, (before, after)
    assert "checkpoint: runs/demo/syn2real/checkpoints/iter_200.pth" in result.stdout
    assert (tmp_path / "runs/demo/syn2real/adapters.safetensors").is_file()
    assert not (tmp_path / "exports").exists()  # --no-export: training only


def test_evaluate_cli_matches_an_independent_computation(tmp_path, demo_data, capsys):
    """metrics.json of evaluate.py vs. predictions and IoU recomputed here with numpy."""
    import cv2
    import numpy as np

    from recyclelora.checkpoints import load_trained_model
    from recyclelora.cli import prepare as prepare_data
    from recyclelora.cli.evaluate import main as evaluate_main
    from recyclelora.data.labels import cityscapes_lut

    train(tiny_recipe(tmp_path / "run", iterations=2), distributed.Context(), *datasets(demo_data))
    root = demo_data["cityscapes"].parent
    assert prepare_data.main(["cityscapes", str(demo_data["cityscapes"]), "--workers", "1"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "iter_2.pth"
    out = tmp_path / "eval"
    args = ["--checkpoint", str(ckpt), "--data-root", str(root), "--targets", "cityscapes"]
    assert evaluate_main([*args, "--mode", "whole", "--out", str(out), "--save-predictions"]) == 0
    got = json.loads((out / "metrics.json").read_text())["targets"]["cityscapes"]

    model, _, _ = load_trained_model(ckpt)
    inter, union = np.zeros(19), np.zeros(19)
    for img_path in sorted((demo_data["cityscapes"] / "leftImg8bit" / "val").rglob("*.png")):
        img = cv2.cvtColor(cv2.imread(str(img_path)), cv2.COLOR_BGR2RGB)
        lab_path = (
            str(img_path)
            .replace("leftImg8bit", "gtFine", 1)
            .replace("_leftImg8bit", "_gtFine_labelIds")
        )
        label = cityscapes_lut()[cv2.imread(lab_path, cv2.IMREAD_UNCHANGED)]
        h, w = label.shape
        scale = min(2048 / max(h, w), 1024 / min(h, w))  # Cityscapes: fit 2048 x 1024
        img = cv2.resize(
            img, (int(w * scale + 0.5), int(h * scale + 0.5)), interpolation=cv2.INTER_LINEAR
        )
        with torch.no_grad():
            logits = model(torch.from_numpy(img).permute(2, 0, 1)[None].float())
            logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear")
        pred = logits[0].argmax(0).numpy()
        valid = label != 255
        for c in range(19):
            p, g = (pred == c) & valid, (label == c) & valid
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    present = union > 0
    assert got["mIoU"] == pytest.approx(100 * (inter[present] / union[present]).mean(), abs=1e-6)
    pngs = list((out / "predictions" / "cityscapes").glob("*.png"))
    assert len(pngs) == 2 and cv2.imread(str(pngs[0])).shape[:2] == (64, 128)
    assert "| cityscapes |" in capsys.readouterr().out

    assert evaluate_main(["--checkpoint", str(tmp_path / "nope.pth")]) == 2
    assert str(tmp_path / "nope.pth") in capsys.readouterr().err  # names the missing file
    assert (
        evaluate_main([*args[:2], "--data-root", str(tmp_path / "void"), "--targets", "bdd"]) == 2
    )
    assert str(tmp_path / "void" / "bdd100k") in capsys.readouterr().err
