"""Evaluate a trained checkpoint on the target domains (REFERENCE §4 protocol).

    python training/evaluate.py --checkpoint runs/syn2real/checkpoints/iter_40000.pth
    torchrun --nproc_per_node 4 training/evaluate.py --checkpoint C --targets cityscapes,bdd

Per target: the image is rescaled to the target's evaluation size, predicted with a sliding
window (crop 512, stride 341), the scores resized back to the label and accumulated in an int64
confusion matrix (summed over DDP ranks). Writes metrics.json and metrics.md (mIoU per target and
Avg., as the paper's Tables 3-4, then per-class IoU) and, with --save-predictions, colour PNGs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from recyclelora.data import DataError, build_eval_dataset
from recyclelora.engine import distributed
from recyclelora.engine.checkpoint import load_trained_model
from recyclelora.engine.evaluator import evaluate
from recyclelora.engine.trainer import autocast_dtype
from recyclelora.evaluation import markdown_table, write_report
from recyclelora.recipes import DATASET_DIRS, replace_data_root


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    p.add_argument("--targets", help="comma-separated (default: the recipe's targets)")
    p.add_argument("--data-root", help="folder holding the datasets (default: the recipe's)")
    p.add_argument("--mode", choices=("slide", "whole"), help="default: the recipe's (slide)")
    p.add_argument("--out", help="output folder (default: <work_dir>/eval/iter_N)")
    p.add_argument("--save-predictions", action="store_true", help="colour PNG per image")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="fp32")
    p.add_argument("--workers", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    ctx = distributed.init(args.device)
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING)
    try:
        model, recipe, iteration = load_trained_model(args.checkpoint, ctx.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.data_root:
        recipe = replace_data_root(recipe, args.data_root)
    names = args.targets.split(",") if args.targets else list(recipe.data.targets)
    unknown = [n for n in names if n not in DATASET_DIRS]
    if unknown:
        print(
            f"error: unknown targets {unknown}; choose from {sorted(DATASET_DIRS)}", file=sys.stderr
        )
        return 2
    try:
        targets = {
            n: build_eval_dataset(n, Path(recipe.data.root) / DATASET_DIRS[n]) for n in names
        }
    except (DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(recipe.work_dir) / "eval" / f"iter_{iteration}")
    results = evaluate(
        model,
        targets,
        ctx,
        mode=args.mode or recipe.eval.mode,
        crop=recipe.eval.crop,
        stride=recipe.eval.stride,
        autocast_dtype=autocast_dtype(args.precision, ctx.device),
        workers=args.workers,
        save_predictions=out / "predictions" if args.save_predictions else None,
    )
    if ctx.is_main:
        class_names = list(next(iter(results["targets"].values()))["IoU"])
        write_report(results, class_names, out)
        print(markdown_table(results, class_names))
        print(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
