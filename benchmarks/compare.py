"""RecycleLoRA against SoMA side by side: the full-size models' trainable parameters (counted on
the meta device, as ``train.py --dry-run``), the paper's Table 3 (docs/method.md §5) and the CPU
demo's source and target mIoU of both methods, trained the same way on the same generated data.

Each demo runs as its own process, ``training/train.py RECIPE --demo --no-export``, one after
the other; its output goes to DIR/compare-RECIPE.log. ``--reuse`` reads the runs' existing
``demo_results.json`` instead of training.

    python benchmarks/compare.py                  # both demos (1,000 iterations each, minutes)
    python benchmarks/compare.py --reuse          # the runs of `train.py syn2real|soma --demo`
    python benchmarks/compare.py --quick          # 20 iterations each: a smoke run
    python benchmarks/run_all.py --only compare   # and rewrite its section of RESULTS.md

Runs are read from and written to RUNS/<recipe> (``--runs``; default runs/demo, the demos' own
folders, for full-length runs and ``--reuse``; DIR/runs for shortened ones, which so never
replace a demo). Prints a markdown table and writes DIR/compare.json and DIR/compare.md (``--out``
DIR, default benchmarks/out). Exit codes: 0 done, 1 a demo failed, 2 a run to reuse is missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from recyclelora.atomic import write_text
from recyclelora.cli.train import (
    DEMO_DEPTH,
    DEMO_ITERATIONS,
    DEMO_SOURCE,
    DEMO_TARGET,
    parameter_counts,
)
from recyclelora.recipes import RECIPES, shrink

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import REPO, environment, markdown_table, write_json  # noqa: E402

TRAIN_PY = REPO / "training" / "train.py"
QUICK_ITERATIONS = 20
RESULTS = "demo_results.json"


@dataclass(frozen=True)
class PaperRow:
    """mIoU (%) of a DINOv2-L model trained on GTAV: the paper's Table 3 (docs/method.md §5)."""

    cityscapes: float
    bdd: float
    mapillary: float
    average: float


#: recipe -> (method, its G -> Citys. / BDD / Map. / Avg. row of Table 3: §5.1 and §5.2)
METHODS: dict[str, tuple[str, PaperRow]] = {
    "syn2real": ("RecycleLoRA", PaperRow(73.01, 61.77, 72.07, 68.95)),
    "soma": ("SoMA", PaperRow(71.82, 61.31, 71.67, 68.27)),
}


class MissingRun(FileNotFoundError):
    """A run without results: not trained yet (``--reuse``), or stopped before its end."""


class DemoFailed(RuntimeError):
    """A demo's process exited with an error."""


def demo_command(recipe: str, iterations: int, runs: Path) -> list[str]:
    """``train.py RECIPE --demo --no-export`` for ``iterations``, in RUNS/RECIPE on RUNS/data.
    A shortened run keeps the EMA's share of the run as the demo does (recipes.shrink)."""
    cmd = [sys.executable, str(TRAIN_PY), recipe, "--demo", "--no-export"]
    cmd += ["--work_dir", str(runs / recipe), "--data.root", str(runs / "data")]
    if iterations != DEMO_ITERATIONS:
        train = shrink(RECIPES[recipe], iterations, DEMO_DEPTH).train
        cmd += ["--train.iterations", str(iterations)]
        if train.ema:
            cmd += ["--train.ema_begin", str(train.ema_begin)]
            cmd += ["--train.ema_momentum", repr(train.ema_momentum)]
    return cmd


def run_demo(recipe: str, iterations: int, runs: Path, log: Path) -> float:
    """Train one demo in its own process (output to ``log``); the seconds it took."""
    cmd = demo_command(recipe, iterations, runs)
    print(f"{recipe}: training {iterations} iterations in {runs / recipe} (log {log})", flush=True)
    (runs / recipe / RESULTS).unlink(missing_ok=True)  # a run stopped early leaves none
    start = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        rc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise DemoFailed(f"{recipe}: the demo failed (exit {rc}) after {seconds:.0f} s:\n{tail}")
    print(f"{recipe}: done in {seconds:.0f} s", flush=True)
    return seconds


def read_run(run: Path) -> dict:
    """A demo run's mIoU (untrained and trained, source and target) and iterations."""
    path = run / RESULTS
    if not path.is_file():
        raise MissingRun(
            f"{path} does not exist: no finished demo there "
            f"(`python training/train.py {run.name} --demo` makes one)"
        )
    results = json.loads(path.read_text())
    recipe = json.loads((run / "recipe.json").read_text())

    def miou(stage: str) -> dict[str, float]:
        targets = results[stage]["targets"]
        return {"source": targets[DEMO_SOURCE]["mIoU"], "target": targets[DEMO_TARGET]["mIoU"]}

    return {
        "run": str(run),
        "iterations": recipe["train"]["iterations"],
        "trained": miou("trained"),
        "untrained": miou("untrained"),
    }


def compare(runs: Path, iterations: int, reuse: bool, logs: Path) -> dict[str, dict]:
    """Per recipe of METHODS: method, parameter counts, the paper's row and the demo's mIoU
    (``logs``: the folder of the demos' logs)."""
    out = {}
    for recipe, (method, paper) in METHODS.items():
        log = logs / f"compare-{recipe}.log"
        seconds = None if reuse else run_demo(recipe, iterations, runs, log)
        n = parameter_counts(RECIPES[recipe])
        out[recipe] = {
            "method": method,
            "parameters": {"adapters": n["adapters"], "biases": n["biases"]},
            "paper_table3": vars(paper),
            "demo": {**read_run(runs / recipe), "seconds": seconds},
        }
    return out


def table(methods: dict[str, dict]) -> str:
    headers = [
        "method",
        "trainable parameters (DINOv2-L)",
        "paper G→Citys.",
        "G→BDD",
        "G→Map.",
        "Avg.",
        "demo iterations",
        "demo source mIoU",
        "demo target mIoU",
    ]
    rows = []
    for m in methods.values():
        n, paper, demo = m["parameters"], m["paper_table3"], m["demo"]
        params = f"{n['adapters']:,}" + (f" + {n['biases']:,} biases" if n["biases"] else "")
        rows.append(
            [
                m["method"],
                params,
                *(f"{paper[k]:.2f}" for k in ("cityscapes", "bdd", "mapillary", "average")),
                demo["iterations"],
                f"{demo['trained']['source']:.2f}",
                f"{demo['trained']['target']:.2f}",
            ]
        )
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{QUICK_ITERATIONS} iterations a demo")
    p.add_argument(
        "--iterations",
        type=int,
        help=f"a demo's length (default {DEMO_ITERATIONS}; --reuse reports the runs' own)",
    )
    p.add_argument("--reuse", action="store_true", help="read the existing runs, train nothing")
    p.add_argument("--runs", type=Path, help="folder of the runs (see above)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="output folder")
    args = p.parse_args(argv)
    iterations = args.iterations or (QUICK_ITERATIONS if args.quick else DEMO_ITERATIONS)
    if iterations < 1:
        p.error(f"--iterations must be positive, got {iterations}")
    out = args.out.resolve()
    runs = args.runs
    if runs is None:
        runs = REPO / "runs/demo" if args.reuse or iterations == DEMO_ITERATIONS else out / "runs"
    try:
        methods = compare(runs.resolve(), iterations, args.reuse, out)
    except MissingRun as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DemoFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    printed = table(methods)
    print(printed)
    report = {"environment": environment(), "methods": methods}
    write_json(out / "compare.json", report)
    note = (
        "Trainable parameters: the full-size recipes' backbones (the head trains in both). "
        "Paper: mIoU (%) of Table 3, trained on GTAV (docs/method.md §5). Demo: mIoU (%) of the "
        "tiny CPU demo on generated data, trained on the synthetic source domain."
    )
    write_text(out / "compare.md", f"{printed}\n\n{note}\n")
    print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
