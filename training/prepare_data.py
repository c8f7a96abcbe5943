#!/usr/bin/env python
"""One-off conversions of the official dataset releases into what training/evaluation reads.

Run once per dataset, pointing at the folder the official archives were extracted into:

  cityscapes ROOT   gtFine/{train,val}/CITY/*_gtFine_labelIds.png -> *_gtFine_labelTrainIds.png
                    (Cityscapes ids -> the 19 train ids, 255 ignore; written next to the input)
  gtav ROOT         labels/X.png (palette PNG of Cityscapes ids) -> labels/X_labelTrainIds.png;
                    a label whose size differs from images/X.png (a few in the release) is
                    resized to the image (nearest) and reported
  synthia ROOT      GT/LABELS/X.png (16-bit, class id in the red channel) ->
                    GT/LABELS/X_labelTrainIds.png
  urbansyn ROOT     nothing to convert (labels are train ids; 19 is mapped to 255 when read):
                    checks that rgb/ and ss/ pair up
  mapillary ROOT    validation/images/X.jpg and validation/v1.2/labels/X.png -> a half-size
                    evaluation copy half/val_img/X.jpg (bicubic, antialiased like Pillow's) and
                    half/val_label/X.png (66 labels -> 19 train ids by name from
                    config_v1.2.json, nearest)

Every run is resumable: outputs that exist and are complete are skipped; each output is written
to a hidden temporary and renamed, so a killed run never leaves a half-written file behind
(stale temporaries are removed on the next run). Work is spread over --workers processes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from recyclelora.atomic import is_temporary, remove_stale_temporaries, write_bytes
from recyclelora.data import labels as L
from recyclelora.data.datasets import TRAIN_IDS, Mapillary, UrbanSyn
from recyclelora.data.imageio import (
    DataError,
    encode_jpeg,
    encode_png,
    image_size,
    is_complete,
    read_image,
    read_label,
)

# -- per-file jobs (run in worker processes) ---------------------------------------------------


@dataclass(frozen=True)
class Job:
    src: str  # input label (or image for mapillary)
    out: str  # output label (or image)
    table: str  # "cityscapes" | "synthia" | "mapillary:<config path>"
    image: str | None = None  # gtav: the image whose size the label must match
    src2: str | None = None  # mapillary: the label
    out2: str | None = None  # mapillary: the output label


@dataclass
class Result:
    job: Job
    status: str  # "done" | "skipped" | "failed"
    resized: tuple[tuple[int, int], tuple[int, int]] | None = None  # (label hw, image hw)
    error: str = ""


@lru_cache(maxsize=4)
def _table(name: str) -> np.ndarray:
    if name == "cityscapes":
        return L.cityscapes_lut()
    if name == "synthia":
        return L.synthia_lut()
    if name.startswith("mapillary:"):
        return L.mapillary_lut(name.split(":", 1)[1])
    raise ValueError(name)


def _init_worker() -> None:
    # OpenCV's threads are switched off by the parent before forking (run_jobs): calling
    # cv2.setNumThreads in a forked child whose parent used OpenCV's thread pool hangs.
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


def _convert_label(job: Job, force: bool) -> Result:
    if not force and is_complete(job.out):
        return Result(job, "skipped")
    try:
        raw = read_label(job.src, red_channel=job.table == "synthia")
        label = L.apply_lut(raw, _table(job.table))
        resized = None
        if job.image is not None:
            ih, iw = image_size(job.image)
            if label.shape != (ih, iw):
                resized = (label.shape, (ih, iw))
                label = cv2.resize(label, (iw, ih), interpolation=cv2.INTER_NEAREST)
        write_bytes(job.out, encode_png(label))
    except DataError as e:
        return Result(job, "failed", error=str(e))
    return Result(job, "done", resized=resized)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    # Pillow's NEAREST: source index floor((i + 0.5) * n_in / n_out)
    scale = n_in / n_out
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * scale).astype(np.int64), n_in - 1)


def halve_image(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H // 2, W // 2, 3): antialiased bicubic (a = -0.5), as Pillow's BICUBIC
    (within +-2 grey levels: Pillow rounds between its two passes)."""
    import torch
    import torch.nn.functional as F

    h, w = rgb.shape[0] // 2, rgb.shape[1] // 2
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return t.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0).contiguous().numpy()


def halve_label(label: np.ndarray) -> np.ndarray:
    """(H, W) -> (H // 2, W // 2) nearest, with Pillow's sampling positions."""
    h, w = label.shape[0] // 2, label.shape[1] // 2
    return label[_nearest_indices(label.shape[0], h)][:, _nearest_indices(label.shape[1], w)]


def _halve_mapillary(job: Job, force: bool, quality: int) -> Result:
    if not force and is_complete(job.out) and is_complete(job.out2):
        return Result(job, "skipped")
    try:
        image = read_image(job.src)
        label = L.apply_lut(read_label(job.src2), _table(job.table))
        resized = None
        if label.shape != image.shape[:2]:
            resized = (label.shape, image.shape[:2])
            label = cv2.resize(
                label, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST
            )
        write_bytes(job.out2, encode_png(halve_label(label)))
        write_bytes(job.out, encode_jpeg(halve_image(image), quality=quality))
    except DataError as e:
        return Result(job, "failed", error=str(e))
    return Result(job, "done", resized=resized)


def _run_job(args: tuple) -> Result:
    kind, job, force, quality = args
    if kind == "label":
        return _convert_label(job, force)
    return _halve_mapillary(job, force, quality)


# -- discovery ---------------------------------------------------------------------------------


class LayoutError(SystemExit):
    pass


def _wrong_root(name: str, root: Path, expected: str, source: str) -> LayoutError:
    if root.is_dir():
        found = sorted(p.name + "/" for p in root.iterdir() if p.is_dir())
        seen = ", ".join(found[:12]) or "no subfolders"
        what = f"it contains: {seen}"
    else:
        what = "it does not exist"
    return LayoutError(
        f"error: {root} does not look like the {name} release ({what}).\n"
        f"Expected: {expected}\n"
        f"Point ROOT at the folder the official archives were extracted into ({source})."
    )


def _originals(folder: Path, pattern: str) -> list[Path]:
    return sorted(
        p for p in folder.glob(pattern) if not p.name.endswith(TRAIN_IDS) and not is_temporary(p)
    )


def jobs_cityscapes(root: Path, splits: list[str] | None = None) -> list[Job]:
    from recyclelora.data.datasets import Cityscapes

    expected = "gtFine/{train,val}/CITY/*_gtFine_labelIds.png (and leftImg8bit/...)"
    if not (root / "gtFine").is_dir():
        raise _wrong_root("Cityscapes", root, expected, Cityscapes.source)
    if not splits:  # default: the annotated splits present
        splits = [s for s in ("train", "val") if (root / "gtFine" / s).is_dir()]
        if not splits:
            raise _wrong_root(
                "Cityscapes", root, f"{expected}; no gtFine/train or gtFine/val", Cityscapes.source
            )
    jobs = []
    for split in splits:
        folder = root / "gtFine" / split
        if not folder.is_dir():
            raise _wrong_root(
                "Cityscapes", root, f"{expected}; no gtFine/{split}/", Cityscapes.source
            )
        for p in _originals(folder, "*/*_gtFine_labelIds.png"):
            out = p.with_name(p.name.replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"))
            jobs.append(Job(str(p), str(out), "cityscapes"))
    return jobs


def jobs_gtav(root: Path) -> list[Job]:
    from recyclelora.data.datasets import GTAV

    expected = "images/NNNNN.png and labels/NNNNN.png"
    if not (root / "images").is_dir() or not (root / "labels").is_dir():
        raise _wrong_root("GTAV", root, expected, GTAV.source)
    jobs = []
    for p in _originals(root / "labels", "*.png"):
        image = root / "images" / p.name
        jobs.append(
            Job(
                str(p),
                str(p.with_name(p.stem + TRAIN_IDS)),
                "cityscapes",
                image=str(image) if image.exists() else None,
            )
        )
    return jobs


def jobs_synthia(root: Path) -> list[Job]:
    from recyclelora.data.datasets import Synthia

    expected = "RGB/NNNNNNN.png and GT/LABELS/NNNNNNN.png"
    if not (root / "GT" / "LABELS").is_dir() or not (root / "RGB").is_dir():
        raise _wrong_root("SYNTHIA RAND_CITYSCAPES", root, expected, Synthia.source)
    return [
        Job(str(p), str(p.with_name(p.stem + TRAIN_IDS)), "synthia")
        for p in _originals(root / "GT" / "LABELS", "*.png")
    ]


def jobs_mapillary(root: Path) -> list[Job]:
    expected = "config_v1.2.json, validation/images/X.jpg and validation/v1.2/labels/X.png"
    img_dir = root / "validation" / "images"
    lab_dir = root / "validation" / "v1.2" / "labels"
    config = root / "config_v1.2.json"
    if not img_dir.is_dir() or not lab_dir.is_dir() or not config.is_file():
        raise _wrong_root("Mapillary Vistas v1.2", root, expected, Mapillary.source)
    out_img, out_lab = root / Mapillary.HALF_IMAGES, root / Mapillary.HALF_LABELS
    out_img.mkdir(parents=True, exist_ok=True)
    out_lab.mkdir(parents=True, exist_ok=True)
    table = f"mapillary:{config.resolve()}"
    jobs, lonely = [], []
    for p in sorted(img_dir.glob("*.jpg")):
        label = lab_dir / (p.stem + ".png")
        if not label.exists():
            lonely.append(p.name)
            continue
        jobs.append(
            Job(
                str(p),
                str(out_img / p.name),
                table,
                src2=str(label),
                out2=str(out_lab / label.name),
            )
        )
    if lonely:
        raise LayoutError(
            f"error: {len(lonely)} images in {img_dir} have no label in {lab_dir} "
            f"(e.g. {', '.join(lonely[:3])}); re-extract the validation archive."
        )
    return jobs


# -- running -----------------------------------------------------------------------------------


@dataclass
class Summary:
    name: str
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[Result] = field(default_factory=list)
    resized: list[Result] = field(default_factory=list)

    def report(self) -> str:
        lines = [
            f"{self.name}: {self.total} files: {self.done} converted, {self.skipped} already "
            f"done (skipped), {len(self.failed)} failed"
        ]
        if self.resized:
            lines.append(
                f"  {len(self.resized)} label(s) differed in size from their image and were "
                f"resized to it (nearest):"
            )
            for r in self.resized[:50]:
                (lh, lw), (ih, iw) = r.resized
                lines.append(f"    {r.job.src}: {lw}x{lh} -> {iw}x{ih}")
            if len(self.resized) > 50:
                lines.append(f"    ... and {len(self.resized) - 50} more")
        for r in self.failed[:50]:
            lines.append(f"  FAILED {r.job.src}: {r.error}")
        if self.failed:
            lines.append(
                "  Re-extract the failed inputs from the official archives and run this command "
                "again (finished files are skipped)."
            )
        return "\n".join(lines)


def run_jobs(
    name: str,
    kind: str,
    jobs: list[Job],
    *,
    workers: int,
    force: bool = False,
    quality: int = 75,
    progress: bool = True,
) -> Summary:
    """Run the per-file jobs (in a Pool when workers > 1) and collect a summary."""
    folders = {Path(j.out).parent for j in jobs} | {Path(j.out2).parent for j in jobs if j.out2}
    for folder in folders:
        remove_stale_temporaries(folder)
    summary = Summary(name, total=len(jobs))
    args = [(kind, j, force, quality) for j in jobs]
    bar = tqdm(total=len(jobs), desc=name, unit="file", disable=not progress, dynamic_ncols=True)

    def collect(results: Iterable[Result]) -> None:
        for r in results:
            if r.status == "done":
                summary.done += 1
            elif r.status == "skipped":
                summary.skipped += 1
            else:
                summary.failed.append(r)
            if r.resized is not None:
                summary.resized.append(r)
            bar.update()

    cv_threads = cv2.getNumThreads()
    try:
        if workers <= 1 or len(jobs) <= 1:
            collect(map(_run_job, args))
        else:
            cv2.setNumThreads(0)  # inherited by the forked workers: one process = one thread
            with Pool(workers, initializer=_init_worker) as pool:
                chunk = max(1, min(32, len(jobs) // (workers * 8)))
                collect(pool.imap_unordered(_run_job, args, chunksize=chunk))
    finally:
        cv2.setNumThreads(cv_threads)
        bar.close()
    return summary


def check_urbansyn(root: Path) -> str:
    try:
        ds = UrbanSyn(root)
    except DataError as e:
        raise LayoutError(f"error: {e}") from None
    return (
        f"urbansyn: {len(ds)} image/label pairs found; nothing to convert (the ss/ labels are "
        f"train ids; 19 is mapped to 255 when they are read)."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_data.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("root", type=Path, help="folder the official archives were extracted into")
        p.add_argument(
            "--workers",
            type=int,
            default=min(8, os.cpu_count() or 1),
            help="parallel processes (default: min(8, CPU count))",
        )
        p.add_argument("--force", action="store_true", help="redo outputs that already exist")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        return p

    p = add("cityscapes", "gtFine *_gtFine_labelIds.png -> *_gtFine_labelTrainIds.png")
    p.add_argument(
        "--splits", nargs="+", default=None, help="default: those of train, val that exist"
    )
    add("gtav", "labels/X.png -> labels/X_labelTrainIds.png, fixing size-mismatched labels")
    add("synthia", "GT/LABELS/X.png (red channel) -> GT/LABELS/X_labelTrainIds.png")
    add("urbansyn", "check the rgb/ss pairs (no conversion needed)")
    p = add("mapillary", "validation -> half-size half/val_img (jpg) + half/val_label (train ids)")
    p.add_argument(
        "--jpeg-quality",
        type=int,
        default=75,
        help="quality of the half-size JPEGs (default 75: Pillow's default, as in Rein's copy)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root: Path = args.root.expanduser()
    progress = not args.no_progress
    try:
        if args.dataset == "urbansyn":
            print(check_urbansyn(root))
            return 0
        makers: dict[str, Callable[[], list[Job]]] = {
            "cityscapes": lambda: jobs_cityscapes(root, args.splits),
            "gtav": lambda: jobs_gtav(root),
            "synthia": lambda: jobs_synthia(root),
            "mapillary": lambda: jobs_mapillary(root),
        }
        jobs = makers[args.dataset]()
    except LayoutError as e:
        print(e.code, file=sys.stderr)
        return 2
    if not jobs:
        print(f"error: no label files found under {root} for {args.dataset}", file=sys.stderr)
        return 2
    kind = "mapillary" if args.dataset == "mapillary" else "label"
    summary = run_jobs(
        args.dataset,
        kind,
        jobs,
        workers=args.workers,
        force=args.force,
        quality=getattr(args, "jpeg_quality", 75),
        progress=progress,
    )
    print(summary.report())
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
