"""Train RecycleLoRA (DINOv2 + Mask2Former) with one of the paper's recipes.

    python training/train.py syn2real                  # GTAV -> Cityscapes, BDD, Mapillary (32/4)
    python training/train.py real2real --resume        # continue from the last checkpoint
    torchrun --nproc_per_node 4 training/train.py syn2real --train.batch_size 4
    python training/train.py syn2real --dry-run        # print the resolved recipe, count params
    python training/train.py syn2real --demo           # CPU demo, generated data, minutes
    python training/train.py soma --demo --no-export   # the SoMA baseline's demo, no export

(``recyclelora-train`` is the same command.) Every recipe value can be overridden (see the list
below); the resolved recipe is printed and saved as <work_dir>/recipe.json. Outputs in <work_dir>
(default runs/<recipe>): checkpoints/iter_N.pth (last 3), val/iter_N/metrics.{json,md},
tensorboard/, and at the end adapters.safetensors. Export and serving start from the last
checkpoint. A demo trains in runs/demo/<recipe> (the generated data is shared in runs/demo/data)
and ends by exporting its last checkpoint to exports/demo-<recipe>-iter<N>/, ready to serve.
Exit codes: 0 done, 2 bad arguments, recipe or missing inputs, 3 non-finite loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch

from .. import build_model
from ..adapters.model import trainable_biases
from ..atomic import write_text
from ..data import DataError, EvalTransform, build_eval_dataset, build_train_set
from ..data.convert import convert
from ..data.datasets import GTAV, Cityscapes
from ..data.synthetic import write_demo_datasets
from ..data.transforms import TrainTransform
from ..engine import distributed
from ..engine.evaluator import evaluate
from ..engine.trainer import NonFiniteLoss, train
from ..evaluation import markdown_table
from ..recipes import (
    RECIPES,
    Recipe,
    add_override_arguments,
    apply_overrides,
    dataset_root,
    shrink,
    to_json,
)
from . import fail
from .export import export_checkpoint

log = logging.getLogger("recyclelora.train")
DEMO_DIR = Path("runs/demo")
DEMO_ITERATIONS, DEMO_DEPTH = 1000, 4  # the demo's run length; the tiny preset's blocks
# the demo's two evaluation sets, as demo_results.json names them
DEMO_SOURCE, DEMO_TARGET = "source (synthetic)", "target (real)"

WEIGHTS_HELP = (
    "The DINOv2-L backbone weights are expected at {path}. Download Meta's "
    "dinov2_vitl14_pretrain.pth (the ViT-L/14 backbone of the facebookresearch/dinov2 release) "
    "or the Hugging Face facebook/dinov2-large model.safetensors, put it there or pass "
    "--backbone_weights PATH; it is converted to patch 16 / 512 on load."
)


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Recipe]:
    """The arguments and the resolved recipe; a bad override raises ValueError."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("recipe", nargs="?", choices=sorted(RECIPES))
    known, _ = first.parse_known_args(argv)
    base = RECIPES[known.recipe or "syn2real"]
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("recipe", choices=sorted(RECIPES), help="the paper's setting to train")
    p.add_argument("--demo", action="store_true", help="CPU demo on generated data (minutes)")
    p.add_argument(
        "--no-export",
        action="store_true",
        help="with --demo: train and evaluate only, do not export the final checkpoint",
    )
    p.add_argument("--dry-run", action="store_true", help="print recipe and parameter counts")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    add_override_arguments(p, base)
    args = p.parse_args(argv)
    recipe = demo_recipe(base) if args.demo else base
    return args, apply_overrides(recipe, args)


def demo_recipe(base: Recipe) -> Recipe:
    """The full recipe machinery at CPU scale: tiny model, generated two-domain data, a run
    folder of the recipe's own (runs/demo/<recipe>), so that demos of two recipes never resume
    each other."""
    base = shrink(base, iterations=DEMO_ITERATIONS, depth=DEMO_DEPTH)
    return replace(
        base,
        name=f"{base.name}_demo",
        model="tiny",
        backbone_weights="",
        data=replace(
            base.data,
            root=str(DEMO_DIR / "data"),
            sources=("gtav",),
            targets=("cityscapes",),
            gtav_subset=32,
            crop=128,
            workers=2,
        ),
        train=replace(
            base.train,
            lr=1e-3,
            val_interval=500,
            ckpt_interval=250,
            log_interval=50,
        ),
        eval=replace(base.eval, mode="whole"),
        work_dir=str(DEMO_DIR / base.name),
    )


def missing_inputs(recipe: Recipe) -> list[str]:
    """Everything the recipe needs that is not on disk, each with what to do about it."""
    problems = []
    if recipe.backbone_weights and not Path(recipe.backbone_weights).is_file():
        problems.append(WEIGHTS_HELP.format(path=recipe.backbone_weights))
    for name in dict.fromkeys(recipe.data.sources + recipe.data.targets):
        try:
            if name in recipe.data.sources:
                build_train_set({name: dataset_root(recipe, name)})
            if name in recipe.data.targets:
                build_eval_dataset(name, dataset_root(recipe, name))
        except (DataError, OSError, ValueError) as e:
            problems.append(str(e))
    return problems


def build_sets(recipe: Recipe) -> tuple:
    train_set = build_train_set(
        {n: dataset_root(recipe, n) for n in recipe.data.sources},
        transform=TrainTransform(crop_size=recipe.data.crop),
    )
    targets = {n: build_eval_dataset(n, dataset_root(recipe, n)) for n in recipe.data.targets}
    return train_set, targets


def prepare_demo_data(recipe: Recipe, ctx: distributed.Context) -> dict:
    """Generate the two-domain scenes (once, on rank 0) and convert their labels like real
    releases."""
    root = Path(recipe.data.root)
    if ctx.is_main and not (root / "cityscapes" / "gtFine").is_dir():
        log.info("generating the demo datasets in %s", root)
        roots = write_demo_datasets(root)
        write_demo_datasets(root / "source_val", n_source=16, n_target=0, seed=1)
        for name, path in (
            ("gtav", roots["gtav"]),
            ("cityscapes", roots["cityscapes"]),
            ("gtav", root / "source_val" / "gta"),
        ):
            log.info("%s", convert(name, path).report())
    distributed.barrier(ctx)
    scale = EvalTransform((256, 128))
    return {
        DEMO_SOURCE: GTAV(root / "source_val" / "gta", transform=scale),
        DEMO_TARGET: Cityscapes(root / "cityscapes", "val", transform=scale),
    }


def run_demo(recipe: Recipe, ctx: distributed.Context, resume: bool, export: bool = True) -> int:
    """Train the demo, evaluate it against the untrained model (demo_results.json) and, with
    ``export``, export the final checkpoint as ``export/merge_and_export.py --checkpoint`` would.
    A rerun trains its run folder anew, so it replaces that run's export too."""
    evals = prepare_demo_data(recipe, ctx)
    train_set = build_train_set(
        {"gtav": dataset_root(recipe, "gtav")}, transform=TrainTransform(crop_size=recipe.data.crop)
    )
    torch.manual_seed(recipe.train.seed)
    untrained = build_model(
        "tiny", adapters=recipe.adapters, img_size=recipe.data.crop, progress=False
    ).to(ctx.device)
    before = evaluate(untrained, evals, ctx, mode="whole", workers=0)
    result = train(recipe, ctx, train_set, evals, resume=resume)
    if not ctx.is_main or result.stopped:  # the trainer said how to resume
        return 0
    if not result.metrics:
        print(f"nothing to train: {recipe.work_dir} already reached {result.iteration} iterations")
        return 0
    work = Path(recipe.work_dir)
    write_text(
        work / "demo_results.json",
        json.dumps({"untrained": before, "trained": result.metrics}, indent=2),
    )
    names = list(next(iter(before["targets"].values()))["IoU"])
    for title, res in (
        ("untrained model", before),
        (f"after {result.iteration} iterations", result.metrics),
    ):
        print(f"\n{title} (mIoU %):\n" + markdown_table(res, names).split("\n\n")[0])
    adapters = work / "adapters.safetensors"
    print(f"\ncheckpoint: {result.checkpoint}\nadapters:   {adapters}")
    if not export:
        print("export and serving start from the checkpoint")
        return 0
    out = export_checkpoint(result.checkpoint, force=True)
    print(f"\nexport:     {out}\nserve it:   RECYCLELORA_EXPORT={out} make serve")
    return 0


def parameter_counts(recipe: Recipe) -> dict[str, int]:
    """Parameter counts of the recipe's model, built on the meta device (nothing allocated):
    the backbone, its trainable adapter numbers and biases, and the (trainable) decode head."""
    model = build_model(recipe.model, adapters=recipe.adapters, device="meta")
    trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    biases = sum(p.numel() for p in trainable_biases(model.backbone))
    return {
        "backbone": sum(p.numel() for p in model.backbone.parameters()),
        "adapters": trainable - biases,
        "biases": biases,
        "head": sum(p.numel() for p in model.decode_head.parameters()),
    }


def dry_run(recipe: Recipe) -> None:
    """Print :func:`parameter_counts`."""
    n = parameter_counts(recipe)
    adapters, biases = n["adapters"], n["biases"]
    print(
        f"backbone {n['backbone']:,} parameters, of which trainable adapter parameters "
        f"{adapters:,} ({adapters / 1e6:.2f}M)"
        + (f" plus {biases:,} biases" if biases else "")
        + f"; decode head {n['head']:,} (trainable)"
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args, recipe = parse(argv)
        ctx = distributed.init(args.device, deterministic=recipe.train.deterministic)
    except (ValueError, RuntimeError) as e:  # bad override or recipe; no such device
        return fail(e)
    logging.basicConfig(
        level=logging.INFO if ctx.is_main else logging.WARNING,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if ctx.is_main:
            print(f"recipe {recipe.name}:\n{to_json(recipe)}")
        if args.dry_run:
            dry_run(recipe)
            return 0
        if args.demo:
            return run_demo(recipe, ctx, args.resume, export=not args.no_export)
        problems = missing_inputs(recipe)
        if problems:
            print(
                "cannot start training: inputs are missing.\n\n- " + "\n- ".join(problems),
                file=sys.stderr,
            )
            return 2
        train_set, targets = build_sets(recipe)
        result = train(recipe, ctx, train_set, targets, resume=args.resume)
        if ctx.is_main:
            print(f"done at iteration {result.iteration}; checkpoint {result.checkpoint}")
        return 0
    except NonFiniteLoss as e:
        return fail(e, 3)
    except (ValueError, DataError) as e:  # a recipe the trainer refuses; a damaged dataset
        return fail(e)
    finally:
        distributed.shutdown()
