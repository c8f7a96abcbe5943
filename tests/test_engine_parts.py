"""Schedules against mmengine's recursive (chainable) formulas, the checkpoint store, recipes."""

import argparse
import math

import pytest
import torch

from recyclelora.engine.checkpoint import list_checkpoints, load_latest, save_checkpoint
from recyclelora.engine.schedules import RecipeSchedule
from recyclelora.recipes import RECIPES, add_override_arguments, apply_overrides, from_dict, to_dict


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
    # a run killed while writing iteration 20 leaves only a temp file: resume ignores it
    (tmp_path / "iter_20.pth.tmp").write_bytes(b"PK\x03\x04 partial")
    state, path = load_latest(tmp_path)
    assert state["iteration"] == 16 and path.name == "iter_16.pth"
    # a damaged final file (e.g. disk trouble) falls back to the previous complete one
    (tmp_path / "iter_24.pth").write_bytes(b"garbage")
    state, path = load_latest(tmp_path)
    assert state["iteration"] == 16
    save_checkpoint({"iteration": 28}, tmp_path, 28, keep=3)
    assert not list(tmp_path.glob("*.tmp"))
    assert load_latest(tmp_path / "nothing") is None


def test_recipes_match_table_8():
    s, r = RECIPES["syn2real"], RECIPES["real2real"]
    assert (s.adapters.main_rank, s.adapters.sub_rank, r.adapters.sub_rank) == (32, 4, 2)
    assert s.data.sources == ("gtav",) and s.data.targets == ("cityscapes", "bdd", "mapillary")
    assert r.data.sources == ("cityscapes",) and r.data.targets == ("bdd", "mapillary")
    for rec in (s, r):
        t = rec.train
        assert (t.iterations, t.batch_size, t.lr, t.weight_decay) == (40_000, 4, 1e-4, 0.05)
        assert (t.val_interval, t.ckpt_interval, t.keep_checkpoints) == (4000, 4000, 3)
    assert RECIPES["gsu2cbm"].data.sources == ("gtav", "synthia", "urbansyn")
    assert RECIPES["syn2real_main_only"].adapters.sub_rank == 0
    assert RECIPES["syn2real_kaiming"].adapters.init == "kaiming"
    assert len({rec.work_dir for rec in RECIPES.values()}) == len(RECIPES)


def test_overrides_and_round_trip():
    base = RECIPES["syn2real"]
    parser = argparse.ArgumentParser()
    add_override_arguments(parser, base)
    args = parser.parse_args(
        [
            "--train.lr",
            "2e-4",
            "--adapters.sub_rank",
            "2",
            "--data.targets",
            "bdd",
            "--adapters.init",
            "svd",
        ]
    )
    r = apply_overrides(base, args)
    assert (r.train.lr, r.adapters.sub_rank, r.data.targets, r.adapters.init) == (
        2e-4,
        2,
        ("bdd",),
        "svd",
    )
    assert base.train.lr == 1e-4  # the preset itself is untouched
    assert from_dict(to_dict(r)) == r
    with pytest.raises(SystemExit, match="init"):
        apply_overrides(base, parser.parse_args(["--adapters.init", "pissa"]))
    with pytest.raises(SystemExit, match="iterations"):
        apply_overrides(base, parser.parse_args(["--train.iterations", "many"]))
