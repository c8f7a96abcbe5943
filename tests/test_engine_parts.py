"""Schedules against mmengine's recursive (chainable) formulas, the checkpoint store, and the
trainer's parts that need no training run: loss window, loss-scale resume, errors, determinism."""

import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from recyclelora.atomic import is_temporary
from recyclelora.checkpoints import list_checkpoints, load_latest, save_checkpoint
from recyclelora.engine import distributed
from recyclelora.engine.schedules import RecipeSchedule
from recyclelora.engine.trainer import LOGGED, LossWindow, load_scaler_state, train
from recyclelora.recipes import RECIPES


def mmengine_style(base_lr: float, base_wd: float, total: int, steps: int) -> list[tuple]:
    """The recursive updates mmengine's PolyLR and CosineAnnealingParamScheduler apply each step."""
    lr, wd, eta, out = base_lr, base_wd, 1e-5, [(base_lr, base_wd)]
    for t in range(1, steps + 1):
        lr = lr * (1 - 1 / (total - t + 1)) ** 0.9 if t <= total else lr
        ratio = (1 + math.cos(math.pi * t / total)) / (1 + math.cos(math.pi * (t - 1) / total))
        wd = ratio * (wd - eta) + eta
        out.append((lr, wd))
    return out


def test_schedules_match_mmengine_recursion():
    p = torch.nn.Parameter(torch.zeros(1))
    q = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW(
        [
            {"params": [p], "lr": 1e-4, "weight_decay": 0.05},
            {"params": [q], "lr": 5e-5, "weight_decay": 0},
        ]
    )
    sched = RecipeSchedule(opt, total_iters=100)
    ref_a = mmengine_style(1e-4, 0.05, 100, 99)
    ref_b = mmengine_style(5e-5, 0.0, 100, 99)
    for it in (0, 1, 37, 99):
        sched.step_to(it)
        ga, gb = opt.param_groups
        assert ga["lr"] == pytest.approx(ref_a[it][0], rel=1e-9)
        assert ga["weight_decay"] == pytest.approx(ref_a[it][1], rel=1e-9)
        assert gb["lr"] == pytest.approx(ref_b[it][0], rel=1e-9)
        assert gb["weight_decay"] == pytest.approx(ref_b[it][1], rel=1e-9, abs=1e-15)
    sched.step_to(100)
    assert opt.param_groups[0]["lr"] == 0 and opt.param_groups[0]["weight_decay"] == pytest.approx(
        1e-5
    )
    # a zero-decay group is annealed up to eta_min, as mmengine does
    assert opt.param_groups[1]["weight_decay"] == pytest.approx(1e-5)


def test_checkpoints_rotate_and_survive_a_killed_write(tmp_path):
    for it in (4, 8, 12, 16):
        save_checkpoint({"iteration": it, "w": torch.full((3,), float(it))}, tmp_path, it, keep=3)
    assert [i for i, _ in list_checkpoints(tmp_path)] == [8, 12, 16]
    # a run killed while writing iteration 20 leaves only its temporary: resume ignores it
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a writer process that is gone
    killed = tmp_path / f".iter_20.pth.{child.pid}.tmp"
    assert is_temporary(killed)
    killed.write_bytes(b"PK\x03\x04 partial")
    state, path = load_latest(tmp_path)
    assert state["iteration"] == 16 and path.name == "iter_16.pth"
    # a damaged final file (e.g. disk trouble) falls back to the previous complete one
    (tmp_path / "iter_24.pth").write_bytes(b"garbage")
    state, path = load_latest(tmp_path)
    assert state["iteration"] == 16
    save_checkpoint({"iteration": 28}, tmp_path, 28, keep=3)
    assert not list(tmp_path.glob("*.tmp"))
    assert load_latest(tmp_path / "nothing") is None


def window_of(totals: list[float], start: int) -> LossWindow:
    window = LossWindow(start)
    for i, total in enumerate(totals):
        losses = {k: torch.tensor(total if k == "loss" else 0.5) for k in LOGGED}
        window.add(losses, [f"img_{start + i}_a.png", f"img_{start + i}_b.png"])
    return window


@pytest.mark.parametrize(
    "totals",
    [[1.0, 2.0, 3.0], [1.0, math.nan, 2.0, math.inf], [math.inf, math.nan], [2.0, 1.0, -math.inf]],
)
def test_loss_window_finds_the_first_non_finite_iteration(totals):
    window = window_of(totals, start=40)
    first = next((i for i, v in enumerate(totals) if not math.isfinite(v)), len(totals))
    assert int(window.first_non_finite()) == 40 + first
    if first == len(totals):
        assert window.means()["loss"] == pytest.approx(sum(totals) / len(totals))
        assert window.means()["loss_dice"] == pytest.approx(0.5)
    else:
        assert window.paths[first] == [f"img_{40 + first}_a.png", f"img_{40 + first}_b.png"]


def test_resuming_across_precisions_keeps_or_drops_the_loss_scale():
    """An fp16 run has a loss scale, a bf16 / fp32 run an empty scaler state."""
    fp16 = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7, enabled=True)
    saved_fp16 = fp16.state_dict()
    saved_other = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved_other == {} and saved_fp16["scale"] == 1024.0

    # fp16 resuming a bf16 / fp32 run: torch's own load refuses the empty state
    with pytest.raises(RuntimeError, match="empty"):
        torch.amp.GradScaler("cpu", enabled=True).load_state_dict(saved_other)
    fresh = torch.amp.GradScaler("cpu", enabled=True)
    assert "starts from its initial value" in load_scaler_state(fresh, saved_other)
    assert fresh.state_dict() == torch.amp.GradScaler("cpu", enabled=True).state_dict()

    # bf16 / fp32 resuming an fp16 run: the scale is dropped, the scaler stays off
    off = torch.amp.GradScaler("cpu", enabled=False)
    assert "not used" in load_scaler_state(off, saved_fp16)
    assert not off.is_enabled() and off.state_dict() == {}

    # same precision: the state is restored as saved
    again = torch.amp.GradScaler("cpu", enabled=True)
    assert load_scaler_state(again, saved_fp16) is None
    assert again.state_dict() == saved_fp16


def test_a_batch_that_does_not_split_over_the_ranks_raises_value_error(tmp_path):
    recipe = replace(RECIPES["syn2real"], work_dir=str(tmp_path))
    ctx = distributed.Context(rank=0, world_size=3)
    with pytest.raises(ValueError, match="batch of 4 does not split over 3.*multiple of 3"):
        train(recipe, ctx, train_set=None, targets={})


def test_cuda_asked_for_without_cuda_raises_runtime_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="--device cuda .* no CUDA device"):
        distributed.init("cuda")


@pytest.fixture
def restore_determinism(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_deterministic_mode_sets_cublas_workspace_before_cuda(restore_determinism, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    ctx = distributed.init("cpu", deterministic=True)
    assert ctx.world_size == 1
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # a value cuBLAS documents
    assert torch.are_deterministic_algorithms_enabled()
    # grid_sample / bilinear interpolate backward have no deterministic CUDA kernel: warn only
    assert torch.is_deterministic_algorithms_warn_only_enabled()

    # too late once CUDA is initialised without the variable: cuBLAS would not be deterministic
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="before CUDA initialises"):
        distributed.use_deterministic_algorithms()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # set by the user: respected
    distributed.use_deterministic_algorithms()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
