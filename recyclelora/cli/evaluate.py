"""Evaluate a trained checkpoint, or an export directory, on the target domains (docs/method.md
§4 protocol).

    python training/evaluate.py --checkpoint runs/syn2real/checkpoints/iter_40000.pth
    torchrun --nproc_per_node 4 training/evaluate.py --checkpoint C --targets cityscapes,bdd
    python training/evaluate.py --export exports/syn2real --targets cityscapes --data-root data

(``recyclelora-eval`` is the same command.) Per target: the image is rescaled to the target's
evaluation size, predicted with a sliding window (the recipe's crop 512, stride 341), the scores
resized back to the label and accumulated in an int64 confusion matrix (summed over DDP ranks).
Mode and precision default to the checkpoint recipe's eval section. Writes metrics.json and
metrics.md (mIoU per target and Avg., as the paper's Tables 3-4, then per-class IoU) and, with
--save-predictions, colour PNGs. Exit code 2: bad checkpoint, export, targets or dataset.

``--export DIR`` evaluates what a deployment runs (``recyclelora.deploy.load_export`` on
``--backend``, one process): ``segment``'s sliding window with the export's crop and stride on
each image at the target's evaluation scale, the same confusion matrix and report. No recipe is
read, so ``--targets`` and ``--data-root`` are required.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..checkpoints import load_trained_model
from ..data import DataError, build_eval_dataset, build_loader, colorize
from ..engine import distributed
from ..engine.evaluator import evaluate
from ..engine.trainer import autocast_dtype
from ..evaluation import confusion_matrix, markdown_table, summarise, write_report
from ..recipes import DATASET_DIRS, Recipe, replace_data_root
from . import fail


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint written by train.py")
    source.add_argument("--export", help="an export directory (export/merge_and_export.py)")
    p.add_argument(
        "--backend",
        choices=("auto", "tensorrt", "onnxruntime", "torch"),
        default="auto",
        help="inference backend of --export (default: the fastest this machine runs)",
    )
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
    if args.export:
        logging.basicConfig(level=logging.INFO)
        try:
            return _evaluate_export(args)
        except (OSError, ValueError, DataError) as e:  # export, backend, targets, datasets
            return fail(e)
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


def _targets(names: list[str], root: str | Path) -> dict[str, Any]:
    unknown = [n for n in names if n not in DATASET_DIRS]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; choose from {sorted(DATASET_DIRS)}")
    return {n: build_eval_dataset(n, Path(root) / DATASET_DIRS[n]) for n in names}


def _save_prediction(folder: Path, target: str, image_path: str, pred: np.ndarray) -> None:
    out = folder / target / (Path(image_path).stem + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(colorize(pred.astype(np.uint8)), cv2.COLOR_RGB2BGR))


def evaluate_export(
    runner: Any,
    targets: dict[str, Any],
    mode: str = "slide",
    workers: int = 2,
    save_predictions: Path | None = None,
) -> dict:
    """``evaluation.summarise`` results of a loaded export (``recyclelora.deploy.load_export``):
    per image at the dataset's evaluation scale, ``predict_scores`` resized to the label."""
    from ..deploy import predict_scores, resize_scores

    k = runner.num_classes
    confusions = {}
    for name, dataset in targets.items():
        cm = torch.zeros(k, k, dtype=torch.int64)
        for batch in build_loader(dataset, num_workers=workers, persistent_workers=False):
            for image, label, path in zip(
                batch["image"], batch["label"], batch["path"], strict=True
            ):
                scores = predict_scores(runner, image.numpy().transpose(1, 2, 0), mode)
                pred = resize_scores(scores, tuple(label.shape)).argmax(0)
                cm += confusion_matrix(torch.from_numpy(pred), label, k)
                if save_predictions is not None:
                    _save_prediction(save_predictions, name, path, pred)
        confusions[name] = cm
    return summarise(confusions, runner.manifest.classes)


def _evaluate_export(args: argparse.Namespace) -> int:
    from ..deploy import load_export

    if not (args.targets and args.data_root):
        raise ValueError("--export needs --targets and --data-root: an export has no recipe")
    if args.precision:
        raise ValueError("--precision applies to checkpoints: an export runs as it was built")
    runner = load_export(args.export, args.backend, args.device)
    print(f"backend: {runner.reason}")
    targets = _targets(args.targets.split(","), args.data_root)
    export = Path(args.export)
    out = Path(args.out or export.parent / f"{export.name}_eval")
    results = evaluate_export(
        runner,
        targets,
        mode=args.mode or "slide",
        workers=args.workers,
        save_predictions=out / "predictions" if args.save_predictions else None,
    )
    class_names = runner.manifest.classes
    write_report(results, class_names, out)
    print(markdown_table(results, class_names))
    print(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}")
    return 0


def _evaluate(args: argparse.Namespace, ctx: distributed.Context) -> int:
    model, recipe, iteration = load_trained_model(args.checkpoint, ctx.device)
    if args.data_root:
        recipe = replace_data_root(recipe, args.data_root)
    names = args.targets.split(",") if args.targets else list(recipe.data.targets)
    targets = _targets(names, recipe.data.root)
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
