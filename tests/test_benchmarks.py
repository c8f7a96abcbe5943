"""The benchmark scripts: FLOP counts against hand counts, the bootstrap interval against an
exact enumeration, the RESULTS.md rewriting, and the smoke runs of the scripts themselves.

No assertion here is about speed: timings on a shared machine say nothing reliable.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
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
import compare  # noqa: E402
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
    assert measure.paired_ratio_ci(t, t, resamples=500) == (1.0, 1.0, 1.0)


def test_ratio_ci_is_paired_by_repetition():
    """Numerator = 1.1 x denominator, repetition by repetition, while the load varies 10x across
    repetitions: the pairs are kept, so the interval is the ratio itself. Resampling the two
    samples independently would give a wide interval."""
    b = np.random.default_rng(1).lognormal(0.0, 1.0, size=21)
    r, lo, hi = measure.paired_ratio_ci(1.1 * b, b, resamples=2000, seed=3)
    assert r == pytest.approx(1.1, rel=1e-12)
    assert lo == pytest.approx(1.1, rel=1e-12) and hi == pytest.approx(1.1, rel=1e-12)


def test_ratio_is_the_geometric_mean_of_the_paired_ratios():
    a, b = [2.0, 3.0, 5.0], [1.0, 4.0, 2.5]
    expected = (2.0 / 1.0 * 3.0 / 4.0 * 5.0 / 2.5) ** (1 / 3)  # by hand: 3 ** (1/3)
    assert measure.paired_ratio_ci(a, b, resamples=10)[0] == pytest.approx(expected, rel=1e-14)


def test_ratio_ci_matches_the_exact_bootstrap_distribution():
    """For 6 repetitions the bootstrap distribution is enumerable (6^6 equally likely
    resamples): the Monte-Carlo bounds fall between its 2 / 3 % and 97 / 98 % quantiles."""
    rng = np.random.default_rng(0)  # quantiles 2.5 % and 5 % differ: the level is checked
    b, a = rng.uniform(1.0, 2.0, 6), rng.uniform(1.0, 2.0, 6)
    every = np.array(list(itertools.product(range(6), repeat=6)))
    ratio = a / b
    exact = np.array([math.prod(ratio[i]) ** (1 / 6) for i in every])
    q = np.quantile(exact, [0.02, 0.03, 0.97, 0.98])
    r, lo, hi = measure.paired_ratio_ci(a, b, resamples=50_000, seed=0)
    assert r == pytest.approx(math.prod(ratio) ** (1 / 6), rel=1e-12)
    assert q[0] <= lo <= q[1] and q[2] <= hi <= q[3]
    assert measure.paired_ratio_ci(a, b, resamples=50_000, seed=0) == (r, lo, hi)  # seeded


def test_ratio_ci_refuses_unpaired_or_non_positive_samples():
    with pytest.raises(ValueError, match="paired"):
        measure.paired_ratio_ci([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="positive"):
        measure.paired_ratio_ci([1.0, 0.0], [1.0, 2.0])


def test_recorded_commands_name_repository_paths_relative_to_it():
    inside = str(measure.REPO / "benchmarks" / "out")
    got = measure.command_line(
        [str(BENCH / "latency.py"), "--out", inside, f"--results={inside}/R.md", "--x=/elsewhere"]
    )
    assert got == (
        "python benchmarks/latency.py --out benchmarks/out --results=benchmarks/out/R.md "
        "--x=/elsewhere"
    )


def test_one_repetition_gives_a_ratio_but_no_interval():
    import latency

    args = argparse.Namespace(resamples=1000, seed=0)
    one = latency.ratios({"base": [2.0], "merged": [1.8]}, args)
    assert one["merged_over_base"] == pytest.approx(0.9) and one["merged_over_base_ci95"] is None
    assert latency._ratio_cell(one, "merged") == "0.900 (1 repetition)"
    two = latency.ratios({"base": [2.0, 1.0], "merged": [1.8, 1.1]}, args)
    two["repeats"] = {"base": 2, "merged": 2}
    assert latency._ratio_cell(two, "merged").endswith("] n=2")  # the interval's sample size
    lo, hi = two["merged_over_base_ci95"]
    assert lo == pytest.approx(0.9) and hi == pytest.approx(1.1)  # the two ratios bound it
    assert two["merged_over_base"] == pytest.approx(math.sqrt(0.9 * 1.1))


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


def geometric_mean_ratio(rec: dict, variant: str) -> float:
    """``variant``/base of a latency record, recomputed by hand from its stored times."""
    pairs = list(zip(rec["times_s"][variant], rec["times_s"]["base"], strict=False))
    return math.prod(v / b for v, b in pairs) ** (1 / len(pairs))


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
            assert r["merged_over_base"] == pytest.approx(geometric_mean_ratio(r, "merged"))
            for key in PER_FIGURE:
                assert set(r[key]) >= {"base", "merged"}, (backend, case, key)
            assert r["flops"]["merged"] == r["flops"]["base"]
            for v, floor in r["floor_s"].items():
                assert floor == pytest.approx(r["flops"][v] / rate)
                assert r["fraction_of_floor"][v] == pytest.approx(floor / med[v])
                assert med[v] <= r["p90_s"][v]
    # the floor's rate: the best of a sample before the run and one after every repetition
    samples = report["matmul_rate_samples_flops"]
    assert report["matmul_rate_flops"] == {k: max(v) for k, v in samples.items()}
    assert {len(v) for v in samples.values()} == {1 + report["meta"]["repeats"]}
    per_crop = report["flops_per_crop"]["tiny"]
    frame = results["eager"]["frame"]["flops"]["base"]
    assert frame == 18 * per_crop["base"]  # the frame's 18 windows, one crop's FLOPs each
    assert per_crop["merged_equals_base"] and per_crop["unmerged"] > per_crop["base"]
    return report


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``run_all.py --quick`` into a temporary folder and a marked copy of RESULTS.md."""
    root = tmp_path_factory.mktemp("bench")
    names = [n for n in run_all.BENCHMARKS if n not in ("serving", "compare")]  # own tests
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
    for name in run_all.FULL_SIZE_ONLY:  # asked for, but they have no smoke run
        start, end = run_all.markers(name)
        assert after.split(start)[1].split(end)[0].strip() == f"old {name}"
        assert f"skipped {name}: a full-size run only" in stdout
    for name in set(names) - run_all.FULL_SIZE_ONLY:
        start, end = run_all.markers(name)
        body = after.split(start)[1].split(end)[0]
        assert f"old {name}" not in body
        assert "- Device: " in body and "- Date: " in body and "torch " in body
        command = re.search(r"- Command: `([^`]*)`", body).group(1)
        script = " ".join(run_all.BENCHMARKS[name])
        assert command.startswith(f"python benchmarks/{script} --quick --out ")
        assert re.search(r"^\| .* \|$", body, flags=re.M), f"no table in the {name} section"
    assert "no GPU: GPU backends skipped" in stdout
    # the figures behind the latency sections are kept beside RESULTS.md, as written
    for name in ("latency", "latency_primary"):
        for ext in (".json", ".png"):
            kept, written = root / "results" / f"{name}{ext}", root / "out" / f"{name}{ext}"
            assert kept.read_bytes() == written.read_bytes()


@pytest.mark.slow
def test_latency_quick_writes_the_json_keys_and_a_png(quick_run):
    out = quick_run[0] / "out"
    check_latency_report(out / "latency.json", {"eager"})
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("rrqr_init", "data", "train_step"):
        assert json.loads((out / f"{name}.json").read_text())["rows"]


@pytest.mark.slow
def test_latency_primary_repeats_base_and_merged_alone(quick_run):
    report = json.loads((quick_run[0] / "out" / "latency_primary.json").read_text())
    assert report["meta"]["adaptive"] and "geometric mean" in report["meta"]["ratio"]
    assert list(report["results"]) == ["tiny"] and list(report["results"]["tiny"]) == ["eager"]
    r = report["results"]["tiny"]["eager"]
    assert list(r) == ["crop_b1"]
    r = r["crop_b1"]
    assert set(r["times_s"]) == {"base", "merged"}
    n = r["repeats"]["base"]
    assert r["repeats"]["merged"] == n and 3 <= n <= 30
    lo, hi = r["merged_over_base_ci95"]
    # it stopped at ±0.02 or at its 30 repetitions
    assert n == 30 or max(r["merged_over_base"] - lo, hi - r["merged_over_base"]) <= 0.02
    assert r["merged_over_base"] == pytest.approx(geometric_mean_ratio(r, "merged"), rel=1e-12)


@pytest.mark.slow
def test_reanalyse_recomputes_the_ratios_of_stored_times(quick_run, tmp_path):
    """Merged times scaled by 1.25 after the run: the reanalysed ratio and interval scale
    exactly (a geometric mean of ratios), the medians are left as measured."""
    report = json.loads((quick_run[0] / "out" / "latency_primary.json").read_text())
    r = report["results"]["tiny"]["eager"]["crop_b1"]
    before = r["merged_over_base"], *r["merged_over_base_ci95"]
    r["times_s"]["merged"] = [1.25 * t for t in r["times_s"]["merged"]]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(report))
    stdout = run_script(str(BENCH / "latency.py"), "--reanalyse", str(path))
    again = json.loads(path.read_text())["results"]["tiny"]["eager"]["crop_b1"]
    after = again["merged_over_base"], *again["merged_over_base_ci95"]
    assert after == pytest.approx([1.25 * x for x in before], rel=1e-12)
    assert again["median_s"] == r["median_s"]
    assert f"{after[0]:.3f} [{after[1]:.3f}, {after[2]:.3f}]" in stdout
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path.write_text('{"results": {"tiny": []}}')
    proc = subprocess.run(
        [sys.executable, str(BENCH / "latency.py"), "--reanalyse", str(path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "not a latency report" in proc.stderr


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


# ---------------------------------------------------------------------------------------------
# RecycleLoRA against SoMA (benchmarks/compare.py)

DEMO_EVALS = ("source (synthetic)", "target (real)")


def doc_row(section: str, first_cells: tuple[str, ...]) -> list[float]:
    """The →Citys., →BDD, →Map., Avg. cells of the docs/method.md table row that starts with
    ``first_cells``, in the section whose heading starts with ``section``."""
    text = (ROOT / "docs" / "method.md").read_text().split(f"### {section}")[1].split("\n### ")[0]
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if tuple(cells[: len(first_cells)]) == first_cells:
            return [float(c) for c in cells[len(first_cells) : len(first_cells) + 4]]
    raise AssertionError(f"no row {first_cells} in {section}")


def test_compare_holds_the_papers_table3_rows_of_docs_method():
    rows = {
        "syn2real": doc_row("§5.1", ("G →", "32 / 4")),
        "soma": doc_row("§5.2", ("SoMA", "G")),
    }
    assert rows["soma"] == [71.82, 61.31, 71.67, 68.27]
    for recipe, (_, paper) in compare.METHODS.items():
        assert [paper.cityscapes, paper.bdd, paper.mapillary, paper.average] == rows[recipe]
    assert {m for m, _ in compare.METHODS.values()} == {"RecycleLoRA", "SoMA"}


def test_compare_demo_command_keeps_the_emas_share_of_a_shortened_run(tmp_path):
    """20 iterations of SoMA's 40,000: the EMA starts at 12,000 / 2,000 = 6 with momentum
    2e-4 x 2,000 = 0.4 (train.py's own --demo for 1,000 iterations needs no override)."""
    cmd = compare.demo_command("soma", 20, tmp_path)
    flags = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert cmd[2:5] == ["soma", "--demo", "--no-export"]
    assert flags == {
        "--work_dir": str(tmp_path / "soma"),
        "--data.root": str(tmp_path / "data"),
        "--train.iterations": "20",
        "--train.ema_begin": "6",
        "--train.ema_momentum": "0.4",
    }
    assert "--train.ema_begin" not in compare.demo_command("syn2real", 20, tmp_path)
    assert "--train.iterations" not in compare.demo_command("soma", 1000, tmp_path)


def fake_run(runs: Path, recipe: str, iterations: int, seed: int) -> dict:
    """A finished demo's recipe.json and demo_results.json with made-up mIoU."""
    rng = np.random.default_rng(seed)
    results = {
        stage: {"targets": {name: {"mIoU": float(rng.uniform(0, 100))} for name in DEMO_EVALS}}
        for stage in ("untrained", "trained")
    }
    (runs / recipe).mkdir(parents=True)
    (runs / recipe / "recipe.json").write_text(json.dumps({"train": {"iterations": iterations}}))
    (runs / recipe / "demo_results.json").write_text(json.dumps(results))
    return results


def check_compare_report(report: dict, runs: Path, iterations: int) -> None:
    """Parameter counts against the meta-device models, mIoU against the runs' files."""
    methods = report["methods"]
    assert list(methods) == ["syn2real", "soma"]
    assert methods["soma"]["parameters"] == {"adapters": 4_718_592, "biases": 147_456}
    recipe = RECIPES["syn2real"]
    model = build_model(recipe.model, adapters=recipe.adapters, device="meta")
    trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    assert methods["syn2real"]["parameters"] == {"adapters": trainable, "biases": 0}
    assert trainable == 14_155_776  # train.py syn2real --dry-run
    for recipe, m in methods.items():
        res = json.loads((runs / recipe / "demo_results.json").read_text())
        for stage in ("untrained", "trained"):
            t = res[stage]["targets"]
            expected = {"source": t[DEMO_EVALS[0]]["mIoU"], "target": t[DEMO_EVALS[1]]["mIoU"]}
            assert m["demo"][stage] == expected, (recipe, stage)
        assert m["demo"]["iterations"] == iterations


def test_compare_reuse_reads_the_runs_and_run_all_writes_its_section(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    fake = {r: fake_run(runs, r, 1000, seed) for seed, r in enumerate(compare.METHODS)}
    results = tmp_path / "RESULTS.md"
    results.write_text(with_old_sections((BENCH / "RESULTS.md").read_text(), ["compare"]))
    before = results.read_text()
    stdout = run_script(
        str(BENCH / "run_all.py"),
        "--only",
        "compare",
        "--compare-args",
        f"--reuse --runs {runs}",
        "--out",
        str(out),
        "--results",
        str(results),
    )
    report = json.loads((out / "compare.json").read_text())
    check_compare_report(report, runs, 1000)
    assert all(m["demo"]["seconds"] is None for m in report["methods"].values())
    after = results.read_text()
    assert outside(after) == outside(before)
    start, end = run_all.markers("compare")
    body = after.split(start)[1].split(end)[0]
    assert "old compare" not in body and "- Command: `python benchmarks/compare.py" in body
    soma = fake["soma"]["trained"]["targets"]
    row = next(line for line in body.splitlines() if line.startswith("| SoMA |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:6] == ["4,718,592 + 147,456 biases", "71.82", "61.31", "71.67", "68.27"]
    assert cells[6:] == ["1000", *(f"{soma[n]['mIoU']:.2f}" for n in DEMO_EVALS)]
    assert row in (out / "compare.md").read_text() and row in stdout


def test_compare_reuse_of_a_missing_run_says_how_to_make_it(tmp_path, capsys):
    fake_run(tmp_path / "runs", "syn2real", 1000, 0)
    code = compare.main(["--reuse", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)])
    assert code == 2
    assert "python training/train.py soma --demo" in capsys.readouterr().err
    assert not (tmp_path / "compare.json").exists()


@pytest.mark.slow
def test_compare_quick_trains_both_demos(tmp_path):
    """Both demos for real (20 iterations each), each in its own run folder under --out."""
    stdout = run_script(str(BENCH / "compare.py"), "--quick", "--out", str(tmp_path))
    report = json.loads((tmp_path / "compare.json").read_text())
    check_compare_report(report, tmp_path / "runs", compare.QUICK_ITERATIONS)
    for recipe in compare.METHODS:
        assert (tmp_path / "runs" / recipe / "checkpoints" / "iter_20.pth").is_file()
        assert "after 20 iterations (mIoU %)" in (tmp_path / f"compare-{recipe}.log").read_text()
    assert re.search(r"^\| RecycleLoRA \| 14,155,776 \| 73\.01 \|", stdout, flags=re.M)
