"""Inference latency of the merged RecycleLoRA model against the base model it claims to cost
the same as (docs/method.md §2), and against the un-merged adapted model (serving the adapters
without merging, the usual PEFT way), on every backend this machine runs.

Variants: ``base`` = ``build_model(preset, adapters=None)``; ``merged`` = the paper's adapters
(``RECIPES["syn2real"].adapters``) folded in by ``merge_recyclelora``; ``unmerged`` = the adapted
model as trained. Random weights, seeded alike (speed does not depend on them; the adapters'
RRQR start leaves the output unchanged, so all variants compute the same scores, which the
``agreement`` figures check). Every backend runs behind the deployment ``Runner`` interface
with the gather sampler of the exported graphs: crops of batch 1 and 4, and one frame through
``segment``'s sliding window. The variants are interleaved repetition by repetition (their order
rotating), so the machine's load hits them alike.

Reported per preset x backend x input: median and p90 of each variant; merged/base (and
unmerged/base) as the geometric mean of the per-repetition ratios (the two variants of a
repetition run back to back, so a ratio cancels the machine's load of the moment) with a
seeded bootstrap 95 % interval over repetitions; and the floor: the FLOPs of one forward
(``FlopCounterMode``) over this device's matmul rate measured in the same run, with "fraction
of floor" = floor / median. Writes ``OUT/latency.json``, ``OUT/latency.png`` and prints a
markdown table. ONNX graphs are exported once and cached under ``OUT/graphs`` (keyed by preset,
variant, geometry, weights, versions and the model's source).

    python benchmarks/latency.py                       # both presets, all backends
    python benchmarks/latency.py --adaptive            # + repetitions of the primary case
    python benchmarks/latency.py --primary             # the primary case alone, until ±0.02
    python benchmarks/latency.py --quick               # tiny, small inputs, eager: a smoke run
    python benchmarks/latency.py --reanalyse benchmarks/out/latency.json

``torch.compile`` of the large preset can take very long on a small CPU: its compilation is
bounded by ``--compile-timeout`` seconds per preset (the backend is then skipped, and the output
says so); leave it out with ``--backends eager,ort``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency_backends import BACKENDS, CPU_BACKENDS, DTYPES, GPU_BACKENDS, Backend  # noqa: E402
from measure import (  # noqa: E402
    environment,
    forward_flops,
    markdown_table,
    matmul_rate,
    paired_ratio_ci,
    summarize,
    timed,
    write_json,
)

from recyclelora.adapters import merge_recyclelora  # noqa: E402
from recyclelora.atomic import temporary_sibling  # noqa: E402
from recyclelora.data.labels import CLASS_NAMES, palette  # noqa: E402
from recyclelora.deploy import Manifest, Runner, segment  # noqa: E402
from recyclelora.deploy.export import runtime_check  # noqa: E402
from recyclelora.deploy.manifest import ONNX  # noqa: E402
from recyclelora.geometry import slide_windows  # noqa: E402
from recyclelora.models import build_model  # noqa: E402
from recyclelora.models.segmentor import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from recyclelora.recipes import RECIPES  # noqa: E402

LARGE, TINY = "dinov2_large_mask2former", "tiny"
VARIANTS = ("base", "merged", "unmerged")
CASES = ("crop_b1", "crop_b4", "frame")
PRIMARY_CASE, PRIMARY_BACKENDS = "crop_b1", ("eager", "ort")
MAX_BATCH = 8  # the export's default: a frame's 18 windows run as 8 + 8 + 2
NO_GPU = "no GPU: GPU backends skipped"
RATIO = "geometric mean of the per-repetition ratios, percentile bootstrap over repetitions"
SOURCES = ("models", "adapters", "deploy/onnx_graph.py")  # what a cached graph depends on
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Geometry:
    """Crop side and sliding-window stride, the frame (H, W), the batch sizes of the crops."""

    crop: int = 512
    stride: int = 341
    frame: tuple[int, int] = (1024, 2048)
    batches: tuple[int, ...] = (1, 4)

    @property
    def windows(self) -> int:
        return len(slide_windows(*self.frame, self.crop, self.stride))

    def label(self, case: str) -> str:
        if case == "frame":
            h, w = self.frame
            return f"{h}x{w} frame ({self.windows} windows)"
        return f"{self.crop}x{self.crop} batch {case.removeprefix('crop_b')}"

    def crops_per_call(self, case: str) -> int:
        return self.windows if case == "frame" else int(case.removeprefix("crop_b"))


def manifest_for(preset: str, g: Geometry, patch_size: int) -> Manifest:
    """What ``segment`` and the runners read: the geometry of an export of this preset."""
    crop = [g.crop, g.crop]
    return Manifest(
        preset=preset,
        classes=list(CLASS_NAMES),
        palette=palette().tolist(),
        mean=list(IMAGENET_MEAN),
        std=list(IMAGENET_STD),
        input_size=crop,
        max_batch=MAX_BATCH,
        train_size=crop,
        patch_size=patch_size,
        crop=crop,
        stride=[g.stride, g.stride],
        eval_scale=[max(g.frame), min(g.frame)],  # the frame is at the evaluation scale
        source={"kind": "random weights"},
        versions={},
    )


def build_variants(preset: str, crop: int, variants: Sequence[str], seed: int) -> dict:
    """The requested variants with identical base weights (same seed), frozen, in eval mode."""
    models: dict[str, nn.Module] = {}
    kw = {"deform_attn_impl": "gather", "img_size": crop}
    if "base" in variants:
        torch.manual_seed(seed)
        models["base"] = build_model(preset, adapters=None, **kw)
    if {"merged", "unmerged"} & set(variants):
        torch.manual_seed(seed)
        adapted = build_model(preset, adapters=RECIPES["syn2real"].adapters, progress=False, **kw)
        if "merged" in variants:
            both = "unmerged" in variants
            models["merged"] = merge_recyclelora(copy.deepcopy(adapted) if both else adapted)
        if "unmerged" in variants:
            models["unmerged"] = adapted
    for m in models.values():
        m.eval().requires_grad_(False)
    return {v: models[v] for v in VARIANTS if v in models}


def _digest(model: nn.Module, preset: str, variant: str, g: Geometry) -> str:
    h = hashlib.sha256(json.dumps([preset, variant, g.crop, MAX_BATCH]).encode())
    h.update(json.dumps(environment()["versions"], sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    for source in SOURCES:
        root = REPO / "recyclelora" / source
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def graph_folder(model: nn.Module, preset: str, variant: str, g: Geometry, root: Path) -> Path:
    """The folder holding ``model.onnx`` of this variant, exported on first use and cached."""
    from recyclelora.deploy.onnx_graph import export_onnx

    folder = root / f"{preset}-{variant}-{g.crop}-b{MAX_BATCH}-{_digest(model, preset, variant, g)}"
    if (folder / ONNX).is_file():
        print(f"  {preset} {variant}: cached graph {folder.name}")
        return folder
    tmp = temporary_sibling(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    export_onnx(model, tmp / ONNX, (g.crop, g.crop), MAX_BATCH)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    print(f"  {preset} {variant}: exported in {time.perf_counter() - start:.0f} s")
    return folder


class CompileTimeout(RuntimeError):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`CompileTimeout` in the main thread once ``seconds`` have passed."""

    def alarm(signum: int, frame: Any) -> None:
        raise CompileTimeout(f"compilation exceeded --compile-timeout ({seconds:.0f} s)")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Figure:
    """One backend x input x variant: its call and what was measured of it."""

    backend: Backend
    case: str
    variant: str
    call: Callable[[], Any]
    times: list[float] = field(default_factory=list)
    warmup_s: float = 0.0


def case_input(case: str, g: Geometry, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if case == "frame":
        return rng.integers(0, 256, (*g.frame, 3), dtype=np.uint8)
    return rng.uniform(0, 255, (g.crops_per_call(case), 3, g.crop, g.crop)).astype(np.float32)


def case_call(case: str, runner: Runner, x: np.ndarray) -> Callable[[], Any]:
    if case == "frame":
        return lambda: segment(runner, x)
    return lambda: runner.predict_crops(x)


def repetition(figures: Sequence[Figure], rep: int) -> None:
    """Every figure once; the variants of one backend and input back to back, their order
    rotated by ``rep`` so no variant always runs first."""
    groups: dict[tuple[str, str], list[Figure]] = {}
    for f in figures:
        groups.setdefault((f.case, f.backend.name), []).append(f)
    for group in groups.values():
        k = rep % len(group)
        for f in group[k:] + group[:k]:
            start = time.perf_counter()
            f.call()
            f.times.append(time.perf_counter() - start)


def ratios(times: dict[str, Sequence[float]], args: argparse.Namespace) -> dict[str, Any]:
    """``merged_over_base`` and ``unmerged_over_base`` with their ``..._ci95`` intervals from the
    variants' times of one backend and input (:func:`measure.paired_ratio_ci`); the interval is
    None from a single repetition, which gives a ratio but no spread."""
    out: dict[str, Any] = {}
    for v in ("merged", "unmerged"):
        if v in times and "base" in times:
            k = min(len(times[v]), len(times["base"]))  # whole repetitions only
            r, lo, hi = paired_ratio_ci(
                times[v][:k], times["base"][:k], resamples=args.resamples, seed=args.seed
            )
            out[f"{v}_over_base"], out[f"{v}_over_base_ci95"] = r, [lo, hi] if k > 1 else None
    return out


def half_width(figures: Sequence[Figure], args: argparse.Namespace) -> float:
    """The widest distance from merged/base to its CI bounds over the given figures' groups."""
    worst = 0.0
    for group in _groups(figures).values():
        rec = ratios({v: f.times for v, f in group.items()}, args)
        if "merged_over_base" in rec:
            if rec["merged_over_base_ci95"] is None:  # one repetition: no width yet
                return math.inf
            lo, hi = rec["merged_over_base_ci95"]
            worst = max(worst, rec["merged_over_base"] - lo, hi - rec["merged_over_base"])
    return worst


def _groups(figures: Sequence[Figure]) -> dict[tuple[str, str], dict[str, Figure]]:
    out: dict[tuple[str, str], dict[str, Figure]] = {}
    for f in figures:
        out.setdefault((f.case, f.backend.name), {})[f.variant] = f
    return out


class Preset:
    """Everything measured for one preset: its models, graphs, runners and figures."""

    def __init__(self, name: str, args: argparse.Namespace, backends: Sequence[Backend]) -> None:
        self.name, self.args = name, args
        self.cases = args.preset_cases.get(name, args.cases)
        only = args.preset_backends.get(name)
        backends = [b for b in backends if only is None or b.name in only]
        self.g: Geometry = args.geometry
        self.skipped: list[dict[str, str]] = []
        start = time.perf_counter()
        self.models = build_variants(name, self.g.crop, args.variants, args.seed)
        print(f"{name}: variants built in {time.perf_counter() - start:.0f} s")
        patch = int(next(iter(self.models.values())).size_divisor)
        self.manifest = manifest_for(name, self.g, patch)
        one_crop = torch.from_numpy(case_input("crop_b1", self.g, args.seed))
        self.flops = {v: forward_flops(m, one_crop) for v, m in self.models.items()}
        self.backends = list(backends)
        self._on_device: dict[tuple[str, str], nn.Module] = {}
        self._graphs: dict[str, Path] = {}

    def skip(self, backend: str, reason: str, case: str | None = None) -> None:
        self.skipped.append({"preset": self.name, "backend": backend, "case": case or "all"})
        self.skipped[-1]["reason"] = reason
        print(f"  {self.name} {backend}{' ' + case if case else ''}: skipped ({reason})")

    def source(self, backend: Backend, variant: str) -> Any:
        if backend.graph:
            if variant not in self._graphs:
                self._graphs[variant] = graph_folder(
                    self.models[variant], self.name, variant, self.g, self.args.out / "graphs"
                )
            return self._graphs[variant]
        key = (variant, backend.device)
        if key not in self._on_device:
            model = self.models[variant]
            self._on_device[key] = (
                model if backend.device == "cpu" else copy.deepcopy(model).to(backend.device)
            )
        return self._on_device[key]

    def runners(self, backend: Backend) -> dict[str, Runner]:
        variants = [v for v in self.models if not backend.graph or v in self.args.graph_variants]
        try:
            return {v: backend.make(self.source(backend, v), self.manifest) for v in variants}
        except Exception as e:  # one backend failing must not end a long run: say why
            self.skip(backend.name, f"{type(e).__name__}: {e}")
            return {}

    def figures(self) -> list[Figure]:
        """Build every runner and warm every figure up (compilation happens here)."""
        out: list[Figure] = []
        inputs = {c: case_input(c, self.g, self.args.seed) for c in self.cases}
        reference = None
        if "base" in self.models and PRIMARY_CASE in inputs:
            with torch.inference_mode():
                crops = torch.from_numpy(inputs[PRIMARY_CASE])
                reference = self.models["base"](crops).numpy()
        self.agreement: dict[tuple[str, str], dict[str, float]] = {}
        for backend in self.backends:
            runners = self.runners(backend)
            budget = self.args.compile_timeout
            for case in self.cases if runners else ():
                group, failed = [], None
                for variant, runner in runners.items():
                    f = Figure(backend, case, variant, case_call(case, runner, inputs[case]))
                    start = time.perf_counter()
                    try:
                        with time_limit(budget) if backend.compiles else contextlib.nullcontext():
                            for _ in range(self.args.warmup):
                                result = f.call()
                    except Exception as e:
                        failed = f"{type(e).__name__}: {e}"
                        break
                    finally:
                        f.warmup_s = time.perf_counter() - start
                        budget -= f.warmup_s
                    if case == PRIMARY_CASE and reference is not None:
                        self.agreement.setdefault((backend.name, case), {})[variant] = (
                            runtime_check(reference, result)["rel_error"]
                        )
                    group.append(f)
                if failed is not None:
                    self.skip(backend.name, failed, case)
                    if backend.compiles:
                        torch._dynamo.reset()
                    continue
                out += group
                print(
                    f"  {self.name} {backend.name} {case}: warm-up "
                    + ", ".join(f"{f.variant} {f.warmup_s:.1f} s" for f in group)
                )
        return out

    def measure(self, rates: MatmulRates) -> list[Figure]:
        """Warm-ups, then the interleaved repetitions, each followed by a matmul rate sample."""
        args = self.args
        figures = self.figures()
        for rep in range(args.repeats):
            seconds, _ = timed(lambda rep=rep: repetition(figures, rep))
            rates.sample()
            print(f"  {self.name}: repetition {rep + 1}/{args.repeats} in {seconds:.1f} s")
        primary = [
            f for f in figures if f.case == PRIMARY_CASE and f.backend.name in PRIMARY_BACKENDS
        ]
        rep = args.repeats
        if args.adaptive and primary:
            start, width = time.perf_counter(), half_width(primary, args)
            while (
                width > args.target_half_width
                and rep < args.max_repeats
                and time.perf_counter() - start < args.time_budget
            ):
                repetition(primary, rep)
                rates.sample()
                rep, width = rep + 1, half_width(primary, args)
                print(f"  {self.name}: repetition {rep}, merged/base within ±{width:.3f}")
            print(
                f"  {self.name}: primary case after {rep} repetitions, merged/base within "
                f"±{width:.3f} (target ±{args.target_half_width})"
            )
        return figures

    def results(self, figures: Sequence[Figure], rates: dict[str, float]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for (case, backend_name), group in _groups(figures).items():
            backend = BACKENDS[backend_name]
            rate = rates[rate_key(backend)]
            n = self.g.crops_per_call(case)
            flops = {v: n * self.flops[v] for v in group}
            stats = {v: summarize(f.times) for v, f in group.items()}
            rec: dict[str, Any] = {
                "input": self.g.label(case),
                "device": backend.device,
                "precision": backend.precision,
                "repeats": {v: len(f.times) for v, f in group.items()},
                "warmup_s": {v: f.warmup_s for v, f in group.items()},
                "median_s": {v: s["median_s"] for v, s in stats.items()},
                "p10_s": {v: s["p10_s"] for v, s in stats.items()},
                "p90_s": {v: s["p90_s"] for v, s in stats.items()},
                "flops": flops,
                "matmul_rate_flops": rate,
                "floor_s": {v: flops[v] / rate for v in group},
                "fraction_of_floor": {v: flops[v] / rate / stats[v]["median_s"] for v in group},
            }
            rec.update(ratios({v: f.times for v, f in group.items()}, self.args))
            if (backend_name, case) in self.agreement:
                rec["rel_error_vs_eager_base"] = self.agreement[(backend_name, case)]
            rec["times_s"] = {v: f.times for v, f in group.items()}
            out.setdefault(backend_name, {})[case] = rec
        return out


def rate_key(backend: Backend) -> str:
    return f"{backend.device}-{backend.precision}"


class MatmulRates:
    """The matmul rate of every device and precision the backends run on, sampled once before
    the run and again after every repetition. The floor takes the best sample: the rate this
    hardware showed it reaches during the run. One sample, taken while the machine was busy or
    not yet at speed, would understate the rate and flatter every fraction of the floor."""

    def __init__(self, backends: Sequence[Backend], n: int) -> None:
        self.n = n
        self.samples: dict[str, list[float]] = {k: [] for k in sorted(map(rate_key, backends))}
        self.sample()
        for key, (rate,) in self.samples.items():
            print(f"matmul rate {key} ({n}x{n}): {rate / 1e9:.1f} GFLOP/s (first sample)")

    def sample(self) -> None:
        for key, samples in self.samples.items():
            device, precision = key.split("-")
            samples.append(matmul_rate(device, DTYPES[precision], self.n))

    @property
    def best(self) -> dict[str, float]:
        return {key: max(samples) for key, samples in self.samples.items()}


def select_backends(names: Sequence[str] | None) -> tuple[list[Backend], list[dict[str, str]]]:
    """The backends to time; GPU ones only where CUDA is available (else one skip entry)."""
    unknown = sorted(set(names or ()) - set(BACKENDS))
    if unknown:
        raise ValueError(f"unknown backends {unknown}; choose among {', '.join(BACKENDS)}")
    chosen = [b for b in CPU_BACKENDS + GPU_BACKENDS if names is None or b.name in names]
    skipped = []
    if not torch.cuda.is_available():
        print(NO_GPU)
        skipped.append({"preset": "all", "backend": "gpu", "case": "all", "reason": NO_GPU})
        chosen = [b for b in chosen if b.device == "cpu"]
    return chosen, skipped


def _ms(s: float) -> str:
    return f"{1e3 * s:,.1f}" if s < 10 else f"{1e3 * s:,.0f}"


def _ratio_cell(rec: dict[str, Any], variant: str) -> str:
    if f"{variant}_over_base" not in rec:
        return "-"
    ratio, interval = rec[f"{variant}_over_base"], rec[f"{variant}_over_base_ci95"]
    if interval is None:
        return f"{ratio:.3f} (1 repetition)"
    n = min(rec["repeats"][variant], rec["repeats"]["base"])  # a few give a loose interval
    return f"{ratio:.3f} [{interval[0]:.3f}, {interval[1]:.3f}] n={n}"


def markdown(report: dict[str, Any]) -> str:
    headers = [
        "preset",
        "input",
        "backend",
        "base ms",
        "merged ms",
        "un-merged ms",
        "merged / base (95% CI)",
        "un-merged / base (95% CI)",
        "floor ms (base, un-merged)",
        "fraction of floor (base, merged, un-merged)",
    ]
    rows = []
    for preset, backends in report["results"].items():
        for case in CASES:
            for backend, cases in backends.items():
                if case not in cases:
                    continue
                r = cases[case]
                cell = {
                    v: f"{_ms(r['median_s'][v])} (p90 {_ms(r['p90_s'][v])})"
                    if v in r["median_s"]
                    else "-"
                    for v in VARIANTS
                }
                ratio, unmerged = (_ratio_cell(r, v) for v in ("merged", "unmerged"))
                floor = r["floor_s"]
                floors = ", ".join(_ms(floor[v]) for v in ("base", "unmerged") if v in floor)
                fractions = r["fraction_of_floor"]
                frac = ", ".join(f"{fractions[v]:.0%}" for v in VARIANTS if v in fractions)
                rows.append(
                    [
                        preset,
                        r["input"],
                        backend,
                        cell["base"],
                        cell["merged"],
                        cell["unmerged"],
                        ratio,
                        unmerged,
                        floors,
                        frac or "-",
                    ]
                )
    return markdown_table(headers, rows, "lll" + "r" * 7)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Median per variant, side by side per backend, p10-p90 error bars, floors as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (p, c)
        for p, bs in report["results"].items()
        for c in CASES
        if any(c in x for x in bs.values())
    ]
    fig, axes = plt.subplots(
        1, max(len(panels), 1), figsize=(4.5 * max(len(panels), 1), 4), squeeze=False
    )
    colours = {"base": "tab:blue", "merged": "tab:orange", "unmerged": "tab:green"}
    width = 0.8 / len(VARIANTS)
    for ax, (preset, case) in zip(axes[0], panels, strict=False):
        backends = [b for b, cases in report["results"][preset].items() if case in cases]
        for i, backend in enumerate(backends):
            r = report["results"][preset][backend][case]
            shown = [v for v in VARIANTS if v in r["median_s"]]
            for j, v in enumerate(shown):
                x = i + (j - (len(shown) - 1) / 2) * width  # centred on the backend's tick
                med, p10, p90 = (1e3 * r[k][v] for k in ("median_s", "p10_s", "p90_s"))
                ax.bar(x, med, width, color=colours[v], label=v if i == 0 else None)
                ax.errorbar(x, med, yerr=[[med - p10], [p90 - med]], color="black", capsize=3)
                floor = 1e3 * r["floor_s"][v]
                ax.hlines(floor, x - width / 2, x + width / 2, colors="black", linestyles="--")
        ax.set_xticks(range(len(backends)), backends)
        ax.set_title(
            f"{preset}\n{report['results'][preset][backends[0]][case]['input']}", fontsize=9
        )
        ax.set_ylabel("ms (median, p10-p90; dashed: FLOP floor)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _per_preset(
    p: argparse.ArgumentParser, flag: str, values: Sequence[str], allowed: Sequence[str]
) -> dict[str, list[str]]:
    """``["PRESET=a,b", ...]`` -> ``{PRESET: [a, b]}``, every name checked."""
    out: dict[str, list[str]] = {}
    for value in values:
        preset, sep, items = value.partition("=")
        names = items.split(",") if items else []
        if not sep or preset not in (LARGE, TINY) or not names or set(names) - set(allowed):
            p.error(
                f"{flag} takes PRESET=a,b with PRESET one of {LARGE}, {TINY} and names of "
                f"{', '.join(allowed)}; got {value!r}"
            )
        out[preset] = names
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny preset at a quarter size, 3 reps")
    p.add_argument(
        "--primary",
        action="store_true",
        help="only the primary case (512x512 batch 1 of base and merged on eager and ONNX\n"
        "Runtime), adaptive up to --max-repeats 1000 or --time-budget 7200 s; written as\n"
        "OUT/latency_primary.json (large preset; with --quick: tiny, eager, 30 at most)",
    )
    p.add_argument(
        "--reanalyse",
        type=Path,
        metavar="JSON",
        help="recompute the ratios of a finished run's stored times with this version's\n"
        "statistics: rewrites JSON and its chart beside it and prints the table",
    )
    p.add_argument("--name", help="OUT/NAME.json and OUT/NAME.png (default latency)")
    p.add_argument("--preset", action="append", choices=(LARGE, TINY), help="repeatable")
    p.add_argument("--backends", help=f"comma-separated, of: {', '.join(BACKENDS)}")
    p.add_argument("--cases", help=f"comma-separated, of: {', '.join(CASES)}")
    p.add_argument(
        "--preset-cases",
        action="append",
        default=[],
        metavar="PRESET=CASES",
        help="the cases of one preset (repeatable; default --cases)",
    )
    p.add_argument(
        "--preset-backends",
        action="append",
        default=[],
        metavar="PRESET=BACKENDS",
        help="a subset of --backends for one preset (repeatable)",
    )
    p.add_argument("--variants", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--graph-variants", help="variants exported for ONNX Runtime / TensorRT")
    p.add_argument("--repeats", type=int, help="interleaved repetitions (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="calls per figure before timing")
    p.add_argument("--adaptive", action="store_true", help="repeat the primary case until ...")
    p.add_argument("--target-half-width", type=float, default=0.02, help="... merged/base ± this")
    p.add_argument("--max-repeats", type=int, help="... or this many repetitions (default 60)")
    p.add_argument("--time-budget", type=float, help="... or this many seconds (default 3600)")
    p.add_argument("--compile-timeout", type=float, default=1800, help="s of compiling / preset")
    p.add_argument("--crop", type=int, help="crop side (default 512)")
    p.add_argument("--stride", type=int, help="sliding-window stride (default 341)")
    p.add_argument("--frame", type=int, nargs=2, metavar=("H", "W"), help="default 1024 2048")
    p.add_argument("--matmul-size", type=int, help="n of the n x n matmul rate (default 4096)")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args(argv)
    quick = args.quick
    if args.primary:
        args.preset = args.preset or [TINY if quick else LARGE]
        if not quick:  # the quick run leaves graphs out (see below)
            args.backends = args.backends or ",".join(PRIMARY_BACKENDS)
        args.cases, args.variants = args.cases or PRIMARY_CASE, args.variants or "base,merged"
        args.adaptive = True
    args.name = args.name or ("latency_primary" if args.primary else "latency")
    args.max_repeats = args.max_repeats or ((30 if quick else 1000) if args.primary else 60)
    args.time_budget = args.time_budget or (7200 if args.primary else 3600)
    args.variants = args.variants or ",".join(VARIANTS)
    args.preset = args.preset or ([TINY] if quick else [LARGE, TINY])
    args.geometry = Geometry(
        crop=args.crop or (128 if quick else 512),
        stride=args.stride or (85 if quick else 341),
        frame=tuple(args.frame) if args.frame else ((256, 512) if quick else (1024, 2048)),
    )
    # an ONNX export takes ~40 s even for the tiny preset: the quick run leaves graphs out
    args.backends = args.backends.split(",") if args.backends else (["eager"] if quick else None)
    args.cases = args.cases.split(",") if args.cases else list(CASES)
    args.variants = args.variants.split(",")
    args.graph_variants = (args.graph_variants or ",".join(args.variants)).split(",")
    args.repeats = args.repeats or (3 if quick else 5)
    if args.warmup < 1 or args.repeats < 1:
        p.error("--warmup and --repeats must be at least 1")
    args.matmul_size = args.matmul_size or (2048 if quick else 4096)
    args.preset_cases = _per_preset(p, "--preset-cases", args.preset_cases, CASES)
    args.preset_backends = _per_preset(p, "--preset-backends", args.preset_backends, BACKENDS)
    for name, values, allowed in (
        ("--cases", args.cases, CASES),
        ("--variants", args.variants, VARIANTS),
        ("--graph-variants", args.graph_variants, VARIANTS),
    ):
        if set(values) - set(allowed):
            p.error(f"{name} takes {', '.join(allowed)}; got {', '.join(values)}")
    return args


def reanalyse(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The report at ``path`` with every ratio recomputed from its stored times."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        for cases in (c for backends in report["results"].values() for c in backends.values()):
            for rec in cases.values():
                rec.update(ratios(rec["times_s"], args))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a latency report this script can read ({e})") from e
    report["meta"]["ratio"] = RATIO
    return report


def report_out(report: dict[str, Any], json_path: Path) -> int:
    """Print the table and the skips, write the JSON and the chart beside it."""
    print()
    print(markdown(report))
    for s in report["skipped"]:
        print(f"\nskipped: {s['preset']} {s['backend']} {s['case']}: {s['reason']}", end="")
    print()
    chart = plot(report, json_path.with_suffix(".png"))
    print(f"wrote {write_json(json_path, report)} and {chart}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.reanalyse is not None:
        try:
            report = reanalyse(args.reanalyse, args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return report_out(report, args.reanalyse)
    backends, skipped = select_backends(args.backends)
    if "compile" in {b.name for b in backends}:
        print(f"torch.compile: bounded to {args.compile_timeout:.0f} s of compiling per preset")
    rates = MatmulRates(backends, args.matmul_size)
    report: dict[str, Any] = {
        "meta": {
            **environment(),
            "geometry": {**vars(args.geometry), "windows": args.geometry.windows},
            "max_batch": MAX_BATCH,
            "adapters": RECIPES["syn2real"].adapters.to_dict(),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "adaptive": args.adaptive,
            "ratio": RATIO,
            "seed": args.seed,
        },
        "matmul_rate_flops": rates.best,
        "matmul_rate_samples_flops": rates.samples,
        "flops_per_crop": {},
        "results": {},
        "skipped": skipped,
    }
    out = args.out / f"{args.name}.json"
    for name in args.preset:
        preset = Preset(name, args, backends)
        flops = preset.flops
        report["flops_per_crop"][name] = {
            **flops,
            "merged_equals_base": flops.get("merged") == flops.get("base"),
        }
        print(
            f"  {name}: GFLOP per crop " + ", ".join(f"{v} {n / 1e9:.3f}" for v, n in flops.items())
        )
        figures = preset.measure(rates)
        report["matmul_rate_flops"] = rates.best
        report["results"][name] = preset.results(figures, rates.best)
        report["skipped"] += preset.skipped
        write_json(out, report)  # after each preset: a long run keeps what it measured
        del preset, figures
        gc.collect()
    return report_out(report, out)


if __name__ == "__main__":
    sys.exit(main())
