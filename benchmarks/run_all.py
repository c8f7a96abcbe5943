"""Run the benchmarks and rewrite their sections of ``benchmarks/RESULTS.md``.

Each benchmark runs as ``python benchmarks/<script> [--quick] --out DIR`` from the repository
root; the markdown tables it prints replace the text between its markers in RESULTS.md::

    <!-- results:NAME -->
    (device, date, versions, the exact command, then the printed tables)
    <!-- /results:NAME -->

Everything outside the markers (the prose that explains the figures) is kept byte for byte. A
section without markers is reported and left alone; a benchmark that fails keeps its old
section and makes the exit status 1; a script that does not exist is skipped with a message.
The JSON and chart a run writes under its section's name are copied to ``results/`` beside
RESULTS.md, so that the figures of every section can be checked and re-plotted.
RESULTS.md is rewritten atomically after each benchmark, so an interrupted run keeps what it
measured.

    python benchmarks/run_all.py                 # everything; the latency run takes hours
    python benchmarks/run_all.py --quick --out /tmp/bench --results /tmp/RESULTS.md
    python benchmarks/run_all.py --only latency --latency-args="--adaptive"
    python benchmarks/run_all.py --only latency_frame,latency_compile   # large preset, ~1 h
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import REPO, device_line, shown, versions  # noqa: E402

from recyclelora.atomic import write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
#: marker name -> script and its own arguments, in the order they run
BENCHMARKS: dict[str, tuple[str, ...]] = {
    "latency": ("latency.py",),
    "latency_primary": ("latency.py", "--primary"),
    # the large preset's full frame and its torch.compile: each a separate run of its own
    "latency_frame": (
        "latency.py",
        "--name=latency_frame",
        "--preset=dinov2_large_mask2former",
        "--backends=eager,ort",
        "--cases=frame",
        "--repeats=1",
    ),
    "latency_compile": (
        "latency.py",
        "--name=latency_compile",
        "--preset=dinov2_large_mask2former",
        "--backends=compile",
        "--cases=crop_b1",
        "--repeats=20",
        "--compile-timeout=3600",
    ),
    # the floor of the large preset's crop with the matmul rate sampled after every repetition
    "latency_floor": (
        "latency.py",
        "--name=latency_floor",
        "--preset=dinov2_large_mask2former",
        "--backends=eager,ort",
        "--cases=crop_b1",
        "--repeats=10",
    ),
    "profile": ("profile_ops.py",),
    "rrqr_init": ("bench_rrqr_init.py",),
    "data": ("bench_data.py",),
    "train_step": ("bench_train_step.py",),
    "serving": ("bench_serving.py",),
    "compare": ("compare.py",),
}
#: full-size runs with no smoke version: ``--quick`` skips them
FULL_SIZE_ONLY = frozenset({"latency_frame", "latency_compile", "latency_floor"})
#: what a run leaves in --out under its section's name, kept beside RESULTS.md (in results/)
KEPT = (".json", ".png")


def markers(name: str) -> tuple[str, str]:
    return f"<!-- results:{name} -->", f"<!-- /results:{name} -->"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the content between the markers of ``name`` replaced by ``body``.

    Raises ValueError when the markers are missing, repeated or out of order.
    """
    start, end = markers(name)
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"needs exactly one {start} and one {end}")
    i, j = text.index(start) + len(start), text.index(end)
    if j < i:
        raise ValueError(f"{end} comes before {start}")
    return f"{text[:i]}\n{body.strip()}\n{text[j:]}"


def tables(stdout: str) -> list[str]:
    """The markdown tables a script printed: runs of lines that start with '|'."""
    out, current = [], []
    for line in stdout.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line.rstrip())
        elif current:
            out.append("\n".join(current))
            current = []
    return out


def section(command: str, seconds: float, printed: Sequence[str]) -> str:
    v = versions()
    listed = ", ".join(f"{k} {v[k]}" for k in v)
    lines = [
        f"- Device: {device_line()}",
        f"- Date: {time.strftime('%Y-%m-%d')}",
        f"- Versions: {listed}",
        f"- Command: `{command}` ({seconds:.0f} s, run by `benchmarks/run_all.py`)",
        "",
        "\n\n".join(printed) or "(the script printed no table)",
    ]
    return "\n".join(lines)


def run(script: Path, extra: Sequence[str]) -> tuple[int, str, float]:
    """Run a benchmark from the repository root, echoing its output; (rc, stdout, seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(script), *extra], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    return proc.wait(), "".join(lines), time.perf_counter() - start


def keep(out: Path, name: str, folder: Path) -> list[Path]:
    """Copy the run's ``NAME.json`` and chart from ``out`` into ``folder``: the figures behind
    a section stay in the repository beside it (``--out`` is scratch)."""
    kept = []
    for ext in KEPT:
        src = out / f"{name}{ext}"
        if src.is_file():
            folder.mkdir(exist_ok=True)
            kept.append(Path(shutil.copyfile(src, folder / src.name)))
            print(f"== {name}: kept {shown(kept[-1])}", flush=True)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every benchmark's smoke run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="the scripts' --out")
    p.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="file to rewrite")
    p.add_argument("--only", help=f"comma-separated, of: {', '.join(BENCHMARKS)}")
    for name in BENCHMARKS:
        p.add_argument(f"--{name.replace('_', '-')}-args", default="", help=f"extra for {name}")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    if set(names) - set(BENCHMARKS):
        p.error(f"--only takes {', '.join(BENCHMARKS)}; got {args.only}")
    if not args.results.is_file():
        p.error(f"{args.results} does not exist")
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    failed = []
    for name in names:
        script_name, *own = BENCHMARKS[name]
        script = HERE / script_name
        if not script.is_file():
            print(f"skipped {name}: {shown(script)} does not exist", flush=True)
            continue
        if args.quick and name in FULL_SIZE_ONLY:
            print(f"skipped {name}: a full-size run only, it has no --quick version", flush=True)
            continue
        extra = [*own, *(["--quick"] if args.quick else []), "--out", str(out)]
        extra += shlex.split(getattr(args, f"{name}_args"))
        command = shlex.join(
            ["python", shown(script), *(shown(out) if a == str(out) else a for a in extra)]
        )
        print(f"== {name}: {command}", flush=True)
        rc, stdout, seconds = run(script, extra)
        if rc != 0:
            print(f"== {name} failed (exit {rc}): its section is left as it was", flush=True)
            failed.append(name)
            continue
        text = args.results.read_text(encoding="utf-8")
        try:
            text = replace_section(text, name, section(command, seconds, tables(stdout)))
        except ValueError as e:
            print(f"== {name}: {shown(args.results)} not updated: {e}", flush=True)
            continue
        write_text(args.results, text)
        print(f"== {name}: {seconds:.0f} s, section written to {shown(args.results)}", flush=True)
        keep(out, name, args.results.parent / "results")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
