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
Exit codes: 0 done, 1 some files failed (listed), 2 wrong root or nothing to convert.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..data.convert import LayoutError, check_urbansyn, convert
from . import fail


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
    try:
        if args.dataset == "urbansyn":
            print(check_urbansyn(root))
            return 0
        summary = convert(
            args.dataset,
            root,
            splits=getattr(args, "splits", None),
            workers=args.workers,
            force=args.force,
            quality=getattr(args, "jpeg_quality", 75),
            progress=not args.no_progress,
        )
    except LayoutError as e:
        return fail(e)
    print(summary.report())
    return 1 if summary.failed else 0
