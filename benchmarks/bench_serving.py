"""Serving under load: latency and throughput of the HTTP service against ``segment()`` called
directly on the same export, frames and concurrency, measured in one run.

- "service": ``/segment`` requests from concurrent clients (``serving/client.py``), each
  latency from upload to decoded label map. The service is started here on the export
  (ONNX Runtime, the direct path's backend, so the ratio is the serving overhead alone), or
  ``--url`` names a running one, which must serve the same export;
- "direct": ``segment(load_export(export, "onnxruntime"), frame)`` in this process, one frame
  at a time, then from as many threads as the service has clients.

Frames are the demo scene generator's street scenes ("real" style), twice the export's crop
high and four times wide (Cityscapes' 1024x2048 for the paper's 512 crop), sent as JPEG as a
camera would. Every request must succeed: the script exits 1 if any failed.

    python benchmarks/bench_serving.py [--quick] [--out DIR] [--export DIR] [--url URL]

Prints a markdown table and writes DIR/serving_load.json (default benchmarks/out).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from recyclelora.data.synthetic import render_scene, stylize
from recyclelora.deploy import Manifest, load_export, segment
from recyclelora.deploy.manifest import MANIFEST
from recyclelora.serving.settings import MAKE_ONE, newest_export

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import REPO, environment, markdown_table, write_json  # noqa: E402

sys.path.insert(0, str(REPO))
from serving.client import SegmentationClient, ServiceError  # noqa: E402

SERVICE = "serving.service:SegmentationAPI"
DISTINCT_FRAMES = 8
JPEG_QUALITY = 90


class BenchmarkError(RuntimeError):
    """A setting the benchmark cannot run with (exit code 2)."""


def make_frames(manifest: Manifest, n: int) -> tuple[list[bytes], list[np.ndarray]]:
    """``n`` street scenes as JPEG bytes (what is sent) and as the RGB arrays they decode to
    (what ``segment()`` gets: the very pixels the service decodes)."""
    crop_h, crop_w = manifest.crop
    rng = np.random.default_rng(0)
    jpegs, frames = [], []
    for _ in range(n):
        rgb = stylize(render_scene(rng, 2 * crop_h, 4 * crop_w), rng, "real")
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=JPEG_QUALITY)
        jpegs.append(buf.getvalue())
        frames.append(np.asarray(Image.open(io.BytesIO(jpegs[-1])).convert("RGB")))
    return jpegs, frames


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started_service(export: Path, timeout: float = 300) -> Iterator[str]:
    """``bentoml serve`` of the export on 127.0.0.1 (a private BentoML home); yields its URL
    once ``/readyz`` answers, stops it afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as home:
        port = _free_port()
        env = {
            **os.environ,
            "RECYCLELORA_EXPORT": str(export.resolve()),
            "RECYCLELORA_BACKEND": "onnxruntime",
            "BENTOML_HOME": home,
            "BENTOML_DO_NOT_TRACK": "True",
        }
        command = [str(Path(sys.executable).parent / "bentoml"), "serve", SERVICE]
        log_path = Path(home) / "serve.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(port)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            with SegmentationClient(url, timeout=5) as probe:
                deadline = time.monotonic() + timeout
                while not probe.ready():
                    if process.poll() is not None or time.monotonic() > deadline:
                        tail = log_path.read_text(errors="replace").splitlines()[-40:]
                        raise BenchmarkError("the service did not start:\n" + "\n".join(tail))
                    time.sleep(0.5)
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def load(
    call: Callable[[int], np.ndarray], requests: int, concurrency: int
) -> tuple[dict, dict[int, np.ndarray]]:
    """Issue ``call(i)`` for i < requests from ``concurrency`` threads, after one untimed wave
    of warm-up calls. Returns the row (latency percentiles, throughput, errors) and the labels
    of the requests that succeeded."""
    errors: list[str] = []
    labels: dict[int, np.ndarray] = {}
    latencies: list[float] = []

    def one(i: int) -> None:
        start = time.perf_counter()
        try:
            labels[i] = call(i)
        except (ServiceError, OSError, ValueError) as e:
            errors.append(f"request {i}: {e}")
            return
        latencies.append(time.perf_counter() - start)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(call, range(concurrency)))  # warm-up: a failure aborts the benchmark
        start = time.perf_counter()
        list(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
    p50, p90, p99 = (
        np.percentile(np.asarray(latencies) * 1e3, [50, 90, 99]) if latencies else [np.nan] * 3
    )
    row = {
        "requests": requests,
        "concurrency": concurrency,
        "errors": len(errors),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "req_per_s": len(latencies) / wall,
        "wall_s": wall,
        "error_messages": errors[:10],
    }
    return row, labels


def agreement(got: dict[int, np.ndarray], want: dict[int, np.ndarray]) -> float:
    """Fraction of label-map pixels the two runs agree on, over requests both answered."""
    same = sum(int((got[i] == want[i]).sum()) for i in got.keys() & want.keys())
    total = sum(want[i].size for i in got.keys() & want.keys())
    return same / total if total else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="24 requests from 4 clients")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    p.add_argument("--export", type=Path, help="export directory (default: newest in exports/)")
    p.add_argument("--url", help="a running service of the same export (default: start one)")
    p.add_argument(
        "--max-side",
        type=int,
        default=512,
        help="longest evaluated side, both paths (default 512: 18 windows of a 128 crop per "
        "frame; 0 = the export's evaluation scale, e.g. 2048 x 1024, hundreds of windows)",
    )
    args = p.parse_args(argv)
    max_side = args.max_side or None
    requests, concurrency = (24, 4) if args.quick else (200, 16)
    try:
        export = args.export or newest_export()
        if export is None:
            raise BenchmarkError(f"no export under exports/: make one with\n    {MAKE_ONE}")
        manifest = Manifest.read(export)
        jpegs, frames = make_frames(manifest, min(DISTINCT_FRAMES, requests))
        with contextlib.ExitStack() as stack:
            url = args.url or stack.enter_context(started_service(export))
            client = stack.enter_context(SegmentationClient(url))
            served = client.metadata()
            sha256 = hashlib.sha256((export / MANIFEST).read_bytes()).hexdigest()
            if served["export_sha256"] != sha256:
                raise BenchmarkError(f"{url} serves {served['export']}, not {export}")
            service, served_labels = load(
                lambda i: client.segment(jpegs[i % len(jpegs)], max_side=max_side),
                requests,
                concurrency,
            )
        runner = load_export(export, "onnxruntime")
        direct = [
            load(
                lambda i: segment(runner, frames[i % len(frames)], max_side=max_side),
                requests,
                threads,
            )
            for threads in (1, concurrency)
        ]
    except (BenchmarkError, ServiceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    concurrent = direct[1][0]
    rows = {
        f"service, {concurrency} clients": service,
        "segment() direct, sequential": direct[0][0],
        f"segment() direct, {concurrency} threads": concurrent,
    }
    overhead = {
        "throughput_ratio": service["req_per_s"] / concurrent["req_per_s"],
        "p50_latency_ratio": service["p50_ms"] / concurrent["p50_ms"],
    }
    result = {
        "meta": {
            **environment(),
            "export": str(export),
            "preset": manifest.preset,
            "frame_hw": list(frames[0].shape[:2]),
            "max_side": max_side,
            "distinct_frames": len(frames),
            "jpeg_quality": JPEG_QUALITY,
            "service": args.url or "started by the benchmark",
            "service_backend": served["backend"],
            "direct_backend": runner.detail,
        },
        "rows": [{"variant": name, **row} for name, row in rows.items()],
        "overhead_vs_direct_same_concurrency": overhead,
        "label_agreement_service_vs_direct": agreement(served_labels, direct[1][1]),
        "errors": sum(r["errors"] for r in rows.values()),
    }
    h, w = frames[0].shape[:2]
    scale = f"max_side {max_side}" if max_side else "the export's evaluation scale"
    print(f"{manifest.preset} export, {w}x{h} JPEG frames at {scale}, {requests} requests each")
    print(
        markdown_table(
            ["variant", "errors", "p50 ms", "p90 ms", "p99 ms", "req/s"],
            [
                [
                    name,
                    r["errors"],
                    f"{r['p50_ms']:.0f}",
                    f"{r['p90_ms']:.0f}",
                    f"{r['p99_ms']:.0f}",
                    f"{r['req_per_s']:.2f}",
                ]
                for name, r in rows.items()
            ],
        )  # fmt: skip
    )
    print(
        f"service / direct ({concurrency} threads): throughput x{overhead['throughput_ratio']:.2f}"
        f", median latency x{overhead['p50_latency_ratio']:.2f}; label agreement "
        f"{result['label_agreement_service_vs_direct']:.4%}"
    )
    path = write_json(args.out / "serving_load.json", result)
    print(f"wrote {path}")
    for name, row in rows.items():
        for message in row["error_messages"]:
            print(f"error: {name}: {message}", file=sys.stderr)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
