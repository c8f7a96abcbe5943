"""One-off conversions of the official releases into what training and evaluation read.

- Cityscapes, GTAV: official labels (Cityscapes ids) -> train-id labels written beside them; a
  GTAV label whose size differs from its image (a few in the release) is resized to the image
  (nearest) and reported.
- SYNTHIA: 16-bit labels (class id in the red channel) -> train-id labels beside them.
- Mapillary Vistas v1.2: the validation split -> a half-size evaluation copy (bicubic images,
  antialiased like Pillow's; labels mapped 66 -> 19 by name, then nearest).
- UrbanSyn: nothing to convert; :func:`check_urbansyn` checks that images and labels pair up.

Every run is resumable: complete outputs are skipped, each output is written atomically (a killed
run never leaves a half-written file; stale temporaries are removed on the next run). The files
are found through :mod:`.layouts`, as the dataset readers find them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from ..atomic import remove_stale_temporaries, write_bytes
from . import labels as L
from .datasets import UrbanSyn
from .imageio import (
    DataError,
    encode_jpeg,
    encode_png,
    image_size,
    is_complete,
    read_image,
    read_label,
)
from .layouts import (
    CITYSCAPES_LAYOUT,
    GTAV_LAYOUT,
    MAPILLARY_HALF_LAYOUT,
    MAPILLARY_LAYOUT,
    SYNTHIA_LAYOUT,
    Layout,
)

__all__ = [
    "CONVERTIBLE",
    "Job",
    "LayoutError",
    "Result",
    "Summary",
    "check_urbansyn",
    "convert",
    "find_jobs",
    "halve_image",
    "halve_label",
    "run_jobs",
]

CONVERTIBLE = ("cityscapes", "gtav", "synthia", "mapillary")


class LayoutError(DataError):
    """A dataset root does not hold the release it should; the message says what was expected."""


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
    import torch

    torch.set_num_threads(1)


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


def _run_job(args: tuple[Job, bool, int]) -> Result:
    job, force, quality = args
    if job.src2 is None:
        return _convert_label(job, force)
    return _halve_mapillary(job, force, quality)


# -- discovery ---------------------------------------------------------------------------------


def _wrong_root(layout: Layout, root: Path, detail: str = "") -> LayoutError:
    if root.is_dir():
        found = sorted(p.name + "/" for p in root.iterdir() if p.is_dir())
        what = f"it contains: {', '.join(found[:12]) or 'no subfolders'}"
    else:
        what = "it does not exist"
    return LayoutError(
        f"{root} does not look like the {layout.title} release ({what}).\n"
        f"Expected: {layout.describe()}{detail}\n"
        f"Point ROOT at the folder the official archives were extracted into ({layout.source}).",
        path=root,
    )


def _label_jobs(layout: Layout, root: Path, split: str = "") -> list[Job]:
    """One job per official label of ``split``: converted to train ids beside the original."""
    img_dir, lab_dir = layout.image_dir(root, split), layout.label_dir(root, split)
    table = "synthia" if layout is SYNTHIA_LAYOUT else "cityscapes"
    jobs = []
    for key, label in sorted(layout.label_files(lab_dir).items()):
        image = layout.image_path(img_dir, key)
        jobs.append(
            Job(
                str(label),
                str(layout.converted_path(label)),
                table,
                # GTAV ships a few labels whose size differs from their image's: fixed on disk
                image=str(image) if layout is GTAV_LAYOUT and image.exists() else None,
            )
        )
    return jobs


def jobs_cityscapes(root: Path, splits: list[str] | None = None) -> list[Job]:
    layout = CITYSCAPES_LAYOUT
    if not (root / layout.labels.format(split="")).is_dir():
        raise _wrong_root(layout, root)
    if not splits:  # default: the annotated splits present
        splits = [s for s in layout.splits if layout.label_dir(root, s).is_dir()]
        if not splits:
            shown = " or ".join(str(layout.label_dir(".", s)) for s in layout.splits)
            raise _wrong_root(layout, root, f"; no {shown}")
    jobs = []
    for split in splits:
        if not layout.label_dir(root, split).is_dir():
            raise _wrong_root(layout, root, f"; no {layout.label_dir('.', split)}/")
        jobs += _label_jobs(layout, root, split)
    return jobs


def _single_split_jobs(layout: Layout, root: Path) -> list[Job]:
    if not layout.image_dir(root).is_dir() or not layout.label_dir(root).is_dir():
        raise _wrong_root(layout, root)
    return _label_jobs(layout, root)


def jobs_mapillary(root: Path) -> list[Job]:
    layout, half = MAPILLARY_LAYOUT, MAPILLARY_HALF_LAYOUT
    split = layout.splits[0]
    img_dir, lab_dir = layout.image_dir(root, split), layout.label_dir(root, split)
    config = root / layout.config
    if not img_dir.is_dir() or not lab_dir.is_dir() or not config.is_file():
        raise _wrong_root(layout, root)
    out_img, out_lab = half.image_dir(root), half.label_dir(root)
    out_img.mkdir(parents=True, exist_ok=True)
    out_lab.mkdir(parents=True, exist_ok=True)
    table = f"mapillary:{config.resolve()}"
    labels = layout.label_files(lab_dir)
    jobs, lonely = [], []
    for key, image in sorted(layout.image_files(img_dir).items()):
        if key not in labels:
            lonely.append(image.name)
            continue
        jobs.append(
            Job(
                str(image),
                str(out_img / image.name),
                table,
                src2=str(labels[key]),
                out2=str(out_lab / labels[key].name),
            )
        )
    if lonely:
        raise LayoutError(
            f"{len(lonely)} images in {img_dir} have no label in {lab_dir} "
            f"(e.g. {', '.join(lonely[:3])}); re-extract the validation archive.",
            path=img_dir,
        )
    return jobs


def find_jobs(dataset: str, root: str | Path, splits: list[str] | None = None) -> list[Job]:
    """The per-file jobs that convert ``dataset`` (one of :data:`CONVERTIBLE`) at ``root``."""
    root = Path(root)
    if dataset == "cityscapes":
        return jobs_cityscapes(root, splits)
    if dataset == "gtav":
        return _single_split_jobs(GTAV_LAYOUT, root)
    if dataset == "synthia":
        return _single_split_jobs(SYNTHIA_LAYOUT, root)
    if dataset == "mapillary":
        return jobs_mapillary(root)
    raise ValueError(f"nothing to convert for {dataset!r}; choose from {', '.join(CONVERTIBLE)}")


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
    jobs: list[Job],
    *,
    workers: int = 1,
    force: bool = False,
    quality: int = 75,
    progress: bool = False,
) -> Summary:
    """Run the per-file jobs (in a Pool when workers > 1) and collect a summary."""
    folders = {Path(j.out).parent for j in jobs} | {Path(j.out2).parent for j in jobs if j.out2}
    for folder in folders:
        remove_stale_temporaries(folder)
    summary = Summary(name, total=len(jobs))
    args = [(j, force, quality) for j in jobs]
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


def convert(
    dataset: str,
    root: str | Path,
    *,
    splits: list[str] | None = None,
    workers: int = 1,
    force: bool = False,
    quality: int = 75,
    progress: bool = False,
) -> Summary:
    """Convert ``dataset`` at ``root`` (resumable); raises :class:`LayoutError` for a root that
    does not hold the release or holds no labels."""
    jobs = find_jobs(dataset, root, splits)
    if not jobs:
        raise LayoutError(f"no label files found under {root} for {dataset}", path=root)
    return run_jobs(dataset, jobs, workers=workers, force=force, quality=quality, progress=progress)


def check_urbansyn(root: str | Path) -> str:
    """UrbanSyn needs no conversion: check that its files pair up and say so."""
    try:
        ds = UrbanSyn(root)
    except DataError as e:
        raise LayoutError(str(e), path=e.path) from None
    return (
        f"urbansyn: {len(ds)} image/label pairs found; nothing to convert (the ss/ labels are "
        f"train ids; 19 is mapped to 255 when they are read)."
    )
