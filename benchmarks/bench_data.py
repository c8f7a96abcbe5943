"""Training-data throughput at GTAV size (1914x1052): decoding, the full training augmentation
(docs/method.md §3), and the DataLoader with 0, 1 and 2 workers, measured side by side in one run.

Images are procedural street scenes with sensor noise (PNG decoding cost depends on how well an
image compresses; noise makes them GTAV-like rather than flat). Prints a table, writes JSON.

    python benchmarks/bench_data.py [--images 16] [--batches 12] [--out benchmarks/out]  # data.json
    python benchmarks/bench_data.py --quick         # 4 images, 2 batches: a smoke run
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import markdown_table, write_json  # noqa: E402

from recyclelora.data import TrainSet, build_loader, build_train_sampler  # noqa: E402
from recyclelora.data.datasets import GTAV  # noqa: E402
from recyclelora.data.synthetic import label_ids, render_scene, stylize  # noqa: E402
from recyclelora.data.transforms import TrainTransform  # noqa: E402

GTAV_HW = (1052, 1914)


def write_gtav(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        lab = render_scene(rng, *GTAV_HW)
        img = stylize(lab, rng, "real")  # noisy, blurred: compresses like a rendered frame
        cv2.imwrite(str(root / "images" / f"{i:05d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(root / "labels" / f"{i:05d}.png"), label_ids(lab))


def per_sample(fn, n: int) -> list[float]:
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 images, 2 batches per loader")
    p.add_argument("--images", type=int, help="GTAV-size files (default 16)")
    p.add_argument("--batches", type=int, help="batches of 4 per loader variant (default 12)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="folder for the JSON")
    args = p.parse_args()
    args.images = args.images or (4 if args.quick else 16)
    args.batches = args.batches or (2 if args.quick else 12)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "gta"
        write_gtav(root, args.images)
        ds = GTAV(root, converted=False)
        ts = TrainSet([ds], TrainTransform())
        rng = np.random.default_rng(0)
        decode = per_sample(lambda i: ds.load(i % len(ds)), args.images)
        pairs = [ds.load(i) for i in range(min(4, len(ds)))]
        augment = per_sample(
            lambda i: ts.transform(*pairs[i % len(pairs)], np.random.default_rng(i)), args.images
        )
        full = per_sample(lambda i: ts[(i % len(ts), int(rng.integers(1 << 31)))], args.images)
        for name, times in (
            ("decode image+label", decode),
            ("augment only", augment),
            ("decode+augment", full),
        ):
            med = statistics.median(times)
            rows.append(
                {"variant": name, "median_ms_per_image": 1e3 * med, "images_per_s": 1 / med}
            )
        for workers in (0, 1, 2):
            sampler = build_train_sampler(ts, 4, seed=0, gtav_subset=None)
            loader = build_loader(ts, sampler, num_workers=workers, persistent_workers=False)
            it = iter(loader)
            next(it)  # worker start-up excluded
            t = time.perf_counter()
            for _ in range(args.batches):
                batch = next(it)
            dt = time.perf_counter() - t
            del it, loader  # stop the workers before the temporary folder goes
            assert batch["image"].shape == (4, 3, 512, 512)
            rows.append(
                {
                    "variant": f"DataLoader, {workers} worker(s), batch 4",
                    "median_ms_per_image": 1e3 * dt / (4 * args.batches),
                    "images_per_s": 4 * args.batches / dt,
                }
            )
    table = [
        [r["variant"], f"{r['median_ms_per_image']:.1f}", f"{r['images_per_s']:.1f}"] for r in rows
    ]
    print(markdown_table(["variant", "ms / image", "images / s"], table))
    meta = {
        "image_hw": GTAV_HW,
        "cpu_cores": torch.get_num_threads(),
        "opencv": cv2.__version__,
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"wrote {write_json(args.out / 'data.json', {'meta': meta, 'rows': rows})}")


if __name__ == "__main__":
    main()
