"""Evaluate a trained checkpoint on the target domains (docs/method.md §4 protocol).

    python training/evaluate.py --checkpoint runs/syn2real/checkpoints/iter_40000.pth
    torchrun --nproc_per_node 4 training/evaluate.py --checkpoint C --targets cityscapes,bdd

(``recyclelora-eval`` is the same command.) Per target: the image is rescaled to the target's
evaluation size, predicted with a sliding window (the recipe's crop 512, stride 341), the scores
resized back to the label and accumulated in an int64 confusion matrix (summed over DDP ranks).
Mode and precision default to the checkpoint recipe's eval section. Writes metrics.json and
metrics.md (mIoU per target and Avg., as the paper's Tables 3-4, then per-class IoU) and, with
--save-predictions, colour PNGs. Exit code 2: bad checkpoint, targets or dataset.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..checkpoints import load_trained_model
from ..data import DataError, build_eval_dataset
from ..engine import distributed
from ..engine.evaluator import evaluate
from ..engine.trainer import autocast_dtype
from ..evaluation import markdown_table, write_report
from ..recipes import DATASET_DIRS, Recipe, dataset_root, replace_data_root
from . import fail


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train.py")
    p.add_argument("--targets", help="comma-separated (default: the recipe's targets)")
    p.add_argument("--data-root", help="folder holding the datasets (default: the recipe's)")
    p.add_argument("--mode", choices=("slide", "whole"), help="default: the recipe's eval.mode")
    p.add_argument("--out", help="output folder (default: <work_dir>/eval/iter_N)")
    p.add_argument("--save-predictions", action="store_true", help="colour PNG per image")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument(
        "--precision", choices=("bf16", "fp16", "fp32"), help="default: the recipe's eval.precision"
    )
    p.add_argument("--workers", type=int, default=2)
    return p.parse_args(argv)


def evaluation_options(recipe: Recipe, args: argparse.Namespace) -> dict[str, Any]:
    """The recipe's eval section, with what the command line overrides."""
    return {
        "mode": args.mode or recipe.eval.mode,
        "crop": recipe.eval.crop,
        "stride": recipe.eval.stride,
        "precision": args.precision or recipe.eval.precision,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        ctx = distributed.init(args.device)
    except (ValueError, RuntimeError) as e:
        return fail(e)
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.WARNING)
    try:
        return _evaluate(args, ctx)
    except (OSError, ValueError, DataError) as e:  # checkpoint, targets, datasets
        return fail(e)
    finally:
        distributed.shutdown()


def _evaluate(args: argparse.Namespace, ctx: distributed.Context) -> int:
    model, recipe, iteration = load_trained_model(args.checkpoint, ctx.device)
    if args.data_root:
        recipe = replace_data_root(recipe, args.data_root)
    names = args.targets.split(",") if args.targets else list(recipe.data.targets)
    unknown = [n for n in names if n not in DATASET_DIRS]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; choose from {sorted(DATASET_DIRS)}")
    targets = {n: build_eval_dataset(n, dataset_root(recipe, n)) for n in names}
    out = Path(args.out or Path(recipe.work_dir) / "eval" / f"iter_{iteration}")
    options = evaluation_options(recipe, args)
    results = evaluate(
        model,
        targets,
        ctx,
        mode=options["mode"],
        crop=options["crop"],
        stride=options["stride"],
        autocast_dtype=autocast_dtype(options["precision"], ctx.device),
        workers=args.workers,
        save_predictions=out / "predictions" if args.save_predictions else None,
    )
    if ctx.is_main:
        class_names = list(next(iter(results["targets"].values()))["IoU"])
        write_report(results, class_names, out)
        print(markdown_table(results, class_names))
        print(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}")
    return 0
