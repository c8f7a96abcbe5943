"""The benchmark scripts: FLOP counts against hand counts, the bootstrap interval against an
exact enumeration, the RESULTS.md rewriting, and the smoke runs of the scripts themselves.

No assertion here is about speed: timings on a shared machine say nothing reliable.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from recyclelora.adapters import iter_adapted, merge_recyclelora
from recyclelora.models import build_model
from recyclelora.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import measure  # noqa: E402
import run_all  # noqa: E402

CASES = ("crop_b1", "crop_b4", "frame")
PER_FIGURE = ("median_s", "p90_s", "flops", "floor_s", "fraction_of_floor")


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_forward_flops_of_linear_layers_is_two_per_multiply_add():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).requires_grad_(True)
    x = torch.rand(4, 6, 5)
    assert measure.forward_flops(model, x) == 2 * 4 * 6 * (5 * 7 + 7 * 3)
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards


def test_merged_costs_the_base_flops_and_unmerged_adds_exactly_the_adapters():
    """Tiny preset on a 32 x 48 image (a 2 x 3 token grid): the un-merged model pays, per
    adapted layer, x A^T (2 T r in) and then B (2 T r out) with r = r_main + r_sub."""
    cfg = RECIPES["syn2real"].adapters
    torch.manual_seed(0)
    base = build_model("tiny", adapters=None, deform_attn_impl="gather", img_size=64).eval()
    torch.manual_seed(0)
    adapted = build_model(
        "tiny", adapters=cfg, deform_attn_impl="gather", img_size=64, progress=False
    ).eval()
    merged = merge_recyclelora(copy.deepcopy(adapted))
    batch, (h, w) = 2, (32, 48)
    images = torch.rand(batch, 3, h, w) * 255
    flops = {n: measure.forward_flops(m, images) for n, m in [("base", base), ("merged", merged)]}
    flops["unmerged"] = measure.forward_flops(adapted, images)

    bb = adapted.backbone
    tokens = batch * (bb.num_prefix_tokens + (h // bb.patch_size) * (w // bb.patch_size))
    layers = list(iter_adapted(adapted))
    assert len(layers) == 4 * len(bb.blocks)  # qkv, proj, fc1, fc2 of every block
    extra = sum(
        2 * tokens * (cfg.main_rank + cfg.sub_rank) * (layer.in_features + layer.out_features)
        for _, layer in layers
    )
    assert flops["merged"] == flops["base"] > 0
    assert flops["unmerged"] - flops["base"] == extra


# ---------------------------------------------------------------------------------------------
# The bootstrap interval of merged / base


def test_ratio_ci_of_identical_samples_is_one():
    t = [0.31, 0.29, 0.35, 0.30, 0.52, 0.28, 0.33]
    assert measure.ratio_of_medians_ci(t, t, resamples=500) == (1.0, 1.0, 1.0)


def test_ratio_ci_is_paired_by_repetition():
    """Numerator = 1.1 x denominator, repetition by repetition, while the load varies 10x across
    repetitions: resampling repetitions keeps the pairs, so the interval is the ratio itself.
    Resampling the two samples independently would give a wide interval."""
    b = np.random.default_rng(1).lognormal(0.0, 1.0, size=21)
    r, lo, hi = measure.ratio_of_medians_ci(1.1 * b, b, resamples=2000, seed=3)
    assert r == pytest.approx(1.1, rel=1e-12)
    assert lo == pytest.approx(1.1, rel=1e-12) and hi == pytest.approx(1.1, rel=1e-12)


def test_ratio_ci_matches_the_exact_bootstrap_distribution():
    """For 6 repetitions the bootstrap distribution is enumerable (6^6 equally likely
    resamples): the Monte-Carlo bounds fall between its 2 / 3 % and 97 / 98 % quantiles."""
    rng = np.random.default_rng(0)  # quantiles 2.5 % and 5 % differ: the level is checked
    b, a = rng.uniform(1.0, 2.0, 6), rng.uniform(1.0, 2.0, 6)
    every = np.array(list(itertools.product(range(6), repeat=6)))
    exact = np.median(a[every], axis=1) / np.median(b[every], axis=1)
    q = np.quantile(exact, [0.02, 0.03, 0.97, 0.98])
    r, lo, hi = measure.ratio_of_medians_ci(a, b, resamples=50_000, seed=0)
    assert r == np.median(a) / np.median(b)
    assert q[0] <= lo <= q[1] and q[2] <= hi <= q[3]
    assert measure.ratio_of_medians_ci(a, b, resamples=50_000, seed=0) == (r, lo, hi)  # seeded


def test_ratio_ci_refuses_unpaired_samples():
    with pytest.raises(ValueError, match="paired"):
        measure.ratio_of_medians_ci([1.0, 2.0], [1.0, 2.0, 3.0])


# ---------------------------------------------------------------------------------------------
# RESULTS.md sections


def with_old_sections(text: str, names) -> str:
    """The real RESULTS.md with each benchmark's section body replaced by ``old NAME``."""
    for n in names:
        text = run_all.replace_section(text, n, f"old {n}")
    return text


def outside(text: str) -> str:
    """The text with every results section's content cut out."""
    return re.sub(r"(<!-- results:(\w+) -->).*?(<!-- /results:\2 -->)", r"\1\3", text, flags=re.S)


def test_replace_section_keeps_the_text_around():
    text = "intro\n<!-- results:a -->\nold\n<!-- /results:a -->\nprose\n"
    new = run_all.replace_section(text, "a", "| x |\n")
    assert new == "intro\n<!-- results:a -->\n| x |\n<!-- /results:a -->\nprose\n"
    with pytest.raises(ValueError, match="exactly one"):
        run_all.replace_section(text, "b", "x")
    with pytest.raises(ValueError, match="before"):
        run_all.replace_section("<!-- /results:a --> <!-- results:a -->", "a", "x")


def test_tables_are_the_runs_of_pipe_lines():
    printed = "progress\n| a | b |\n| --- | --- |\n| 1 | 2 |\nwrote x\n| c |\n"
    assert run_all.tables(printed) == ["| a | b |\n| --- | --- |\n| 1 | 2 |", "| c |"]


# ---------------------------------------------------------------------------------------------
# Smoke runs (slow: minutes of CPU in all)


def run_script(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def check_latency_report(path: Path, backends: set[str]) -> dict:
    report = json.loads(path.read_text())
    results = report["results"]["tiny"]
    assert set(results) == backends
    for backend, cases in results.items():
        assert set(cases) == set(CASES), backend
        rate = report["matmul_rate_flops"][f"cpu-{cases['crop_b1']['precision']}"]
        for case, r in cases.items():
            lo, hi = r["merged_over_base_ci95"]
            assert lo <= r["merged_over_base"] <= hi
            med = r["median_s"]
            assert r["merged_over_base"] == pytest.approx(med["merged"] / med["base"])
            for key in PER_FIGURE:
                assert set(r[key]) >= {"base", "merged"}, (backend, case, key)
            assert r["flops"]["merged"] == r["flops"]["base"]
            for v, floor in r["floor_s"].items():
                assert floor == pytest.approx(r["flops"][v] / rate)
                assert r["fraction_of_floor"][v] == pytest.approx(floor / med[v])
                assert med[v] <= r["p90_s"][v]
    per_crop = report["flops_per_crop"]["tiny"]
    frame = results["eager"]["frame"]["flops"]["base"]
    assert frame == 18 * per_crop["base"]  # the frame's 18 windows, one crop's FLOPs each
    assert per_crop["merged_equals_base"] and per_crop["unmerged"] > per_crop["base"]
    return report


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``run_all.py --quick`` into a temporary folder and a marked copy of RESULTS.md."""
    root = tmp_path_factory.mktemp("bench")
    names = [n for n in run_all.BENCHMARKS if n != "serving"]  # the serving bench has its own
    results = root / "RESULTS.md"
    results.write_text(with_old_sections((BENCH / "RESULTS.md").read_text(), names))
    before = results.read_text()
    stdout = run_script(
        str(BENCH / "run_all.py"),
        "--quick",
        "--only",
        ",".join(names),
        "--out",
        str(root / "out"),
        "--results",
        str(results),
    )
    return root, before, results.read_text(), stdout, names


@pytest.mark.slow
def test_run_all_quick_rewrites_only_the_sections(quick_run):
    root, before, after, stdout, names = quick_run
    assert outside(after) == outside(before)
    for name in names:
        start, end = run_all.markers(name)
        body = after.split(start)[1].split(end)[0]
        assert f"old {name}" not in body
        assert "- Device: " in body and "- Date: " in body and "torch " in body
        command = re.search(r"- Command: `([^`]*)`", body).group(1)
        assert command.startswith(f"python benchmarks/{run_all.BENCHMARKS[name]} --quick --out ")
        assert re.search(r"^\| .* \|$", body, flags=re.M), f"no table in the {name} section"
    assert "no GPU: GPU backends skipped" in stdout


@pytest.mark.slow
def test_latency_quick_writes_the_json_keys_and_a_png(quick_run):
    out = quick_run[0] / "out"
    check_latency_report(out / "latency.json", {"eager"})
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("rrqr_init", "data", "train_step"):
        assert json.loads((out / f"{name}.json").read_text())["rows"]


@pytest.mark.slow
def test_latency_compile_is_bounded_and_adaptive_repeats_the_primary_case(tmp_path):
    stdout = run_script(
        str(BENCH / "latency.py"),
        "--quick",
        "--backends",
        "eager,compile",
        "--compile-timeout",
        "1",
        "--repeats",
        "2",
        "--adaptive",
        "--target-half-width",
        "0",
        "--max-repeats",
        "5",
        "--out",
        str(tmp_path),
    )
    report = json.loads((tmp_path / "latency.json").read_text())
    assert set(report["results"]["tiny"]) == {"eager"}
    reasons = [s["reason"] for s in report["skipped"] if s["backend"] == "compile"]
    assert reasons and all("--compile-timeout" in r for r in reasons)
    assert "compile" in stdout and "skipped" in stdout
    eager = report["results"]["tiny"]["eager"]
    assert set(eager["crop_b1"]["repeats"].values()) == {5}  # the primary case, adaptively
    assert set(eager["frame"]["repeats"].values()) == {2}


@pytest.mark.slow
def test_latency_onnxruntime_graph_agrees_and_is_cached(tmp_path):
    """One exported graph (the merged variant's) through ONNX Runtime computes the eager base
    model's scores (RRQR-initialised adapters leave the output unchanged); a rerun reuses it."""
    args = [
        str(BENCH / "latency.py"),
        "--quick",
        "--backends",
        "ort",
        "--variants",
        "base,merged",
        "--graph-variants",
        "merged",
        "--cases",
        "crop_b1",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    first = run_script(*args)
    assert "merged: exported in" in first
    report = json.loads((tmp_path / "latency.json").read_text())
    r = report["results"]["tiny"]["ort"]["crop_b1"]
    assert set(r["median_s"]) == {"merged"}
    assert r["rel_error_vs_eager_base"]["merged"] < 1e-4
    again = run_script(*args)
    assert "merged: cached graph" in again and "exported in" not in again
