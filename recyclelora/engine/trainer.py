"""The training loop of the recipe (REFERENCE §3), readable top to bottom.

One iteration: next batch -> set lr / weight decay for this iteration -> loss under autocast ->
stop on a non-finite loss -> backward -> AdamW step. Around it: logging with ETA (console and
TensorBoard), validation and atomic checkpoints every few thousand iterations, exact resume,
and a clean stop with a checkpoint on SIGTERM.

Every random draw is a function of (seed, data position): the augmentation of each sample and the
point sampling / matching of each image are seeded from the sample's seed. A resumed run and a
DDP run over the same global batches therefore compute what an uninterrupted single process does.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from ..adapters import save_adapters
from ..data import build_loader, build_train_sampler
from ..evaluation import markdown_table
from ..models import build_model
from ..param_groups import build_param_groups
from ..recipes import Recipe, to_dict
from .checkpoint import load_latest, save_checkpoint
from .distributed import Context, any_rank, barrier
from .evaluator import evaluate
from .schedules import RecipeSchedule

log = logging.getLogger("recyclelora.train")


class NonFiniteLoss(RuntimeError):
    pass


class TrainStep(nn.Module):
    """DDP synchronises gradients through ``forward`` only, so the loss goes through here."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images, labels, valid_hw, generators) -> dict[str, torch.Tensor]:
        return self.model.loss(images, labels, valid_hw=valid_hw, generator=generators)


@dataclass
class TrainResult:
    iteration: int
    checkpoint: Path | None
    stopped: bool = False
    metrics: dict = field(default_factory=dict)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 / fp16 autocast on CUDA; full precision on the CPU (and for "fp32")."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def format_eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class StopRequest:
    """SIGTERM (a scheduler ending the job) asks for a checkpoint and a clean exit."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def __enter__(self) -> StopRequest:
        try:
            self.previous = signal.signal(signal.SIGTERM, self.handle)
        except ValueError:  # not the main thread: no signal handling
            self.previous = None
        return self

    def handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: logging to the console only")
        return None
    return SummaryWriter(str(path))


def train(
    recipe: Recipe,
    ctx: Context,
    train_set: Dataset,
    targets: Mapping[str, Dataset],
    *,
    resume: bool = False,
    stop_at: int | None = None,
    on_log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``recipe`` on ``train_set`` (a ``data.TrainSet``), validating on ``targets``.

    ``stop_at`` ends the run early (as SIGTERM would: checkpoint, ``stopped=True``); tests use it.
    """
    say = on_log or (lambda msg: log.info(msg))
    t, work = recipe.train, Path(recipe.work_dir)
    ckpt_dir = work / "checkpoints"
    if t.batch_size % ctx.world_size:
        raise SystemExit(
            f"the global batch of {t.batch_size} does not split over {ctx.world_size} processes; "
            f"set --train.batch_size to a multiple of {ctx.world_size}"
        )
    torch.manual_seed(t.seed + ctx.rank)
    amp = autocast_dtype(t.precision, ctx.device)

    found = load_latest(ckpt_dir) if resume else None
    model = build_model(
        recipe.model,
        adapters=recipe.adapters,
        backbone_weights=None if found else (recipe.backbone_weights or None),
        img_size=recipe.data.crop,
        generator=torch.Generator().manual_seed(t.seed),
        init_adapters=found is None,  # a checkpoint overwrites every tensor
    ).to(ctx.device)
    step = TrainStep(model)
    if ctx.world_size > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        step = DistributedDataParallel(step, device_ids=ids)
    groups = build_param_groups(model, t.lr, t.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps)
    schedule = RecipeSchedule(optimizer, t.iterations, t.poly_power, t.wd_min)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp is torch.float16)
    sampler = build_train_sampler(
        train_set,
        t.batch_size,
        seed=t.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
        gtav_subset=recipe.data.gtav_subset,
    )
    loader = build_loader(train_set, sampler, num_workers=recipe.data.workers)

    start = 0
    if resume and found is None:
        say(f"--resume: no checkpoint in {ckpt_dir}, starting from iteration 0")
    if found is not None:
        state, path = found
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        start = int(state["iteration"])
        say(f"resumed from {path} at iteration {start}")
    if ctx.is_main:
        work.mkdir(parents=True, exist_ok=True)
        (work / "recipe.json").write_text(json.dumps(to_dict(recipe), indent=2))
    writer = tensorboard_writer(work / "tensorboard") if ctx.is_main else None
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(
        f"training {recipe.name}: {recipe.model}, {n_train:,} trainable parameters, "
        f"{t.iterations} iterations of {t.batch_size} images on {ctx.world_size} process(es) "
        f"({ctx.device}, {'fp32' if amp is None else t.precision})"
    )

    def checkpoint(iteration: int) -> Path | None:
        path = None
        if ctx.is_main:
            state = {
                "iteration": iteration,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "data": loader.state_dict(),
                "rng": torch.get_rng_state(),
                "recipe": to_dict(recipe),
            }
            path = save_checkpoint(state, ckpt_dir, iteration, keep=t.keep_checkpoints)
        barrier(ctx)
        return path

    def validate(iteration: int) -> dict:
        results = evaluate(
            model,
            targets,
            ctx,
            mode=recipe.eval.mode,
            crop=recipe.eval.crop,
            stride=recipe.eval.stride,
            autocast_dtype=amp,
            workers=min(2, recipe.data.workers),
        )
        if ctx.is_main:
            out = work / "val" / f"iter_{iteration}"
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(results, indent=2))
            table = markdown_table(results, list(next(iter(results["targets"].values()))["IoU"]))
            (out / "metrics.md").write_text(table)
            summary = ", ".join(f"{k} {v['mIoU']:.2f}" for k, v in results["targets"].items())
            say(f"validation at iteration {iteration}: mIoU {summary} | Avg. {results['Avg']:.2f}")
            if writer is not None:
                for k, v in results["targets"].items():
                    writer.add_scalar(f"val/mIoU_{k}", v["mIoU"], iteration)
        return results

    batches = iter(loader)
    last_ckpt, metrics, stopped, done = None, {}, False, start
    window: list[float] = []
    tic = time.perf_counter()
    with StopRequest() as stop:
        for it in range(start, t.iterations):
            t_data = time.perf_counter()
            batch = next(batches)
            data_time = time.perf_counter() - t_data
            schedule.step_to(it)
            images = batch["image"].to(ctx.device, non_blocking=True)
            labels = batch["label"].to(ctx.device, non_blocking=True)
            valid_hw = batch["valid_hw"].to(ctx.device)
            generators = [torch.Generator().manual_seed(int(s)) for s in batch["seed"]]

            with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
                losses = step(images, labels, valid_hw, generators)
            loss = losses["loss"]
            if any_rank(not bool(torch.isfinite(loss)), ctx):
                parts = {k: round(v.item(), 4) for k, v in losses.items() if "." not in k}
                raise NonFiniteLoss(
                    f"non-finite loss at iteration {it + 1} ({parts}); the run is stopped. "
                    f"Its last checkpoint ({last_ckpt or 'none yet'}) is intact: lower "
                    "--train.lr, use --train.precision bf16/fp32 instead of fp16, or check the "
                    "labels of this batch: " + ", ".join(str(p) for p in batch["path"])
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            done = it + 1

            window.append(loss.item())
            if done % t.log_interval == 0 or done == t.iterations:
                elapsed = time.perf_counter() - tic
                per_it = elapsed / len(window)
                lr = optimizer.param_groups[0]["lr"]
                mem = ""
                if ctx.device.type == "cuda":
                    mem = f" | mem {torch.cuda.max_memory_allocated(ctx.device) / 2**30:.1f} GiB"
                say(
                    f"iter {done}/{t.iterations} | loss {sum(window) / len(window):.4f} "
                    f"(cls {losses['loss_cls'].item():.3f} mask {losses['loss_mask'].item():.3f} "
                    f"dice {losses['loss_dice'].item():.3f}) | lr {lr:.2e} | {per_it:.3f} s/it "
                    f"(data {data_time:.3f}){mem} | "
                    f"ETA {format_eta(per_it * (t.iterations - done))}"
                )
                if writer is not None:
                    writer.add_scalar("train/loss", sum(window) / len(window), done)
                    for g in optimizer.param_groups:
                        writer.add_scalar(f"lr/{g['name']}", g["lr"], done)
                window, tic = [], time.perf_counter()

            stopped = any_rank(stop.requested, ctx) or (stop_at is not None and done >= stop_at)
            if done % t.val_interval == 0 or done == t.iterations:
                metrics = validate(done)
            if done % t.ckpt_interval == 0 or done == t.iterations or stopped:
                last_ckpt = checkpoint(done)
            if stopped:
                say(f"stopped at iteration {done}; resume with --resume (checkpoint {last_ckpt})")
                break
    if ctx.is_main and not stopped:
        save_adapters(
            model.backbone, work / "adapters.safetensors", metadata={"recipe": recipe.name}
        )
    if writer is not None:
        writer.close()
    return TrainResult(done, last_ckpt, stopped, metrics)
