"""The training loop of the recipe (docs/method.md §3), readable top to bottom.

One iteration: next batch -> set lr / weight decay for this iteration -> loss (plain fp32 as the
authors, or bf16 / fp16 autocast) -> backward -> AdamW step. No iteration waits for the device:
the losses stay there, and one collective every ``log_interval`` iterations, and always right
before a validation or a checkpoint, checks them for a non-finite value and asks every rank
whether a stop (SIGTERM) was requested. A checkpoint therefore never holds an unchecked step.
Around it: logging with ETA (console and TensorBoard), validation and atomic checkpoints every
few thousand iterations, exact resume, and a clean stop with a checkpoint on SIGTERM. A recipe
with ``train.ema`` (SoMA's) keeps an EMA of the weights (``ema``): validation, the checkpoints'
weights and the adapters file are the average's.

Every random draw is a function of (seed, data position): the augmentation of each sample and the
point sampling / matching of each image are seeded from the sample's seed. A resumed run and a
DDP run over the same global batches therefore compute what an uninterrupted single process does.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ..adapters import save_adapters
from ..adapters.init import init_arithmetic
from ..atomic import write_text
from ..checkpoints import load_latest, save_checkpoint
from ..data import build_loader, build_train_sampler
from ..evaluation import write_report
from ..models import build_model
from ..param_groups import build_param_groups, rules_for
from ..recipes import Recipe, to_dict
from .distributed import (
    Context,
    barrier,
    gather_objects,
    min_over_ranks_,
    use_deterministic_algorithms,
    wrap_ddp,
)
from .ema import WeightEMA
from .evaluator import evaluate
from .schedules import RecipeSchedule

log = logging.getLogger("recyclelora.train")

# the losses kept per iteration: the total (checked for finiteness) and the last layer's terms
LOGGED = ("loss", "loss_cls", "loss_mask", "loss_dice")


class NonFiniteLoss(RuntimeError):
    """A loss was NaN or infinite: the run stops, its last checkpoint is intact."""


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
    # the trained Segmentor (not its DDP wrapper), with the weights it was validated with (the
    # EMA's, when the recipe keeps one)
    model: nn.Module | None = None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 / fp16 autocast on CUDA; full precision on the CPU (and for "fp32")."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def describe_precision(precision: str, dtype: torch.dtype | None) -> str:
    """What a precision setting does on this device, for the start-up log line."""
    if dtype is not None:
        return f"{precision} autocast"
    return "fp32" if precision == "fp32" else f"fp32 ({precision} applies on CUDA only)"


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict) -> str | None:
    """Load a checkpoint's GradScaler state; returns a note when it does not apply.

    Only fp16 uses a loss scale: a bf16 / fp32 run saves an empty state, which an enabled scaler
    refuses to load. Resuming such a run in fp16 starts the scale afresh; resuming an fp16 run in
    bf16 / fp32 drops it.
    """
    if scaler.is_enabled() and not state:
        return "the checkpoint has no fp16 loss scale: it starts from its initial value"
    if not scaler.is_enabled() and state:
        return "the checkpoint's fp16 loss scale is not used: this run does not train in fp16"
    scaler.load_state_dict(state)
    return None


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


class LossWindow:
    """The losses of the iterations since the last log line, kept on the device (no host sync
    per iteration), with each iteration's files, so that a check can name the first bad one."""

    def __init__(self, start: int) -> None:
        self.start = start  # 0-based index of the first iteration held
        self.rows: list[torch.Tensor] = []
        self.paths: list[list[str]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, losses: Mapping[str, torch.Tensor], paths: list[str]) -> None:
        self.rows.append(torch.stack([losses[k].detach().float() for k in LOGGED]))
        self.paths.append(list(paths))

    def add_non_finite(self, paths: list[str], device: torch.device) -> None:
        """An iteration whose predictions were already non-finite (no loss was computed)."""
        self.add({k: torch.tensor(math.nan, device=device) for k in LOGGED}, paths)

    def first_non_finite(self) -> torch.Tensor:
        """Index of the first iteration with a non-finite total loss, else ``start + len``
        (a device scalar: nothing waits for it)."""
        bad = ~torch.isfinite(torch.stack(self.rows)[:, 0])
        return self.start + torch.where(bad.any(), bad.int().argmax(), len(self.rows))

    def means(self) -> dict[str, float]:
        return dict(zip(LOGGED, torch.stack(self.rows).mean(0).tolist(), strict=True))


def non_finite_error(
    window: LossWindow, iteration: int, last_ckpt: Path | None, ctx: Context
) -> NonFiniteLoss:
    """The error for the first non-finite ``iteration``, naming every rank's files of it."""
    i = iteration - window.start
    reports = gather_objects((window.rows[i].tolist(), window.paths[i]), ctx)
    losses = next(r for r, _ in reports if not math.isfinite(r[0]))
    parts = ", ".join(f"{k} {v:.4g}" for k, v in zip(LOGGED, losses, strict=True))
    files = ", ".join(p for _, paths in reports for p in paths)
    return NonFiniteLoss(
        f"non-finite loss at iteration {iteration + 1} ({parts}); the run is stopped. "
        f"Its last checkpoint ({last_ckpt or 'none yet'}) is intact: lower --train.lr, use "
        "--train.precision bf16/fp32 instead of fp16, or check the labels of this batch: " + files
    )


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
    ``recipe.train.deterministic`` turns on PyTorch's deterministic algorithms for the process.
    """
    say = on_log or (lambda msg: log.info(msg))
    t, work = recipe.train, Path(recipe.work_dir)
    ckpt_dir = work / "checkpoints"
    if t.batch_size % ctx.world_size:
        raise ValueError(
            f"the global batch of {t.batch_size} does not split over {ctx.world_size} processes; "
            f"set --train.batch_size to a multiple of {ctx.world_size}"
        )
    if t.deterministic:
        use_deterministic_algorithms()
    torch.manual_seed(t.seed + ctx.rank)
    amp = autocast_dtype(t.precision, ctx.device)
    eval_amp = autocast_dtype(recipe.eval.precision, ctx.device)

    found = load_latest(ckpt_dir) if resume else None
    model = build_model(
        recipe.model,
        adapters=recipe.adapters,
        backbone_weights=None if found else (recipe.backbone_weights or None),
        img_size=recipe.data.crop,
        generator=torch.Generator().manual_seed(t.seed),
        # a checkpoint overwrites every tensor; under DDP, rank 0's factors are broadcast
        init_adapters=found is None and ctx.is_main,
    ).to(ctx.device)
    step = TrainStep(model)
    if ctx.world_size > 1:
        step = wrap_ddp(step, ctx)
    groups = build_param_groups(model, t.lr, t.weight_decay, rules_for(recipe.adapters.kind))
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
    ema = WeightEMA(model, t.ema_momentum, t.ema_begin, enabled=t.ema)

    start = 0
    if resume and found is None:
        say(f"--resume: no checkpoint in {ckpt_dir}, starting from iteration 0")
    if found is not None:
        state, path = found
        model.load_state_dict(state["model"])
        if t.ema:  # a checkpoint without one: as mmengine, the average starts from its weights
            ema.load_state_dict(state.get("ema", {"steps": 0, "source": {}}))
        optimizer.load_state_dict(state["optimizer"])
        note = load_scaler_state(scaler, state["scaler"])
        loader.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        start = int(state["iteration"])
        say(f"resumed from {path} at iteration {start}" + (f" ({note})" if note else ""))
    if ctx.is_main:
        work.mkdir(parents=True, exist_ok=True)
        write_text(work / "recipe.json", json.dumps(to_dict(recipe), indent=2))
    writer = tensorboard_writer(work / "tensorboard") if ctx.is_main else None
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(
        f"training {recipe.name}: {recipe.model}, {n_train:,} trainable parameters, "
        f"{t.iterations} iterations of {t.batch_size} images on {ctx.world_size} process(es) "
        f"({ctx.device}; training {describe_precision(t.precision, amp)}, validation "
        f"{describe_precision(recipe.eval.precision, eval_amp)}; TF32 left at PyTorch's defaults"
        f"{'; deterministic algorithms' if t.deterministic else ''}"
        f"{f'; EMA of the weights from iteration {t.ema_begin}' if t.ema else ''})"
    )

    def checkpoint(iteration: int) -> Path | None:
        path = None
        if ctx.is_main:
            state = {
                "iteration": iteration,
                "model": ema.model_state(model),  # the validated weights
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "data": loader.state_dict(),
                "rng": torch.get_rng_state(),
                "recipe": to_dict(recipe),
                "adapter_init": init_arithmetic(recipe.adapters),
            }
            if t.ema:
                state["ema"] = ema.state_dict()
            path = save_checkpoint(state, ckpt_dir, iteration, keep=t.keep_checkpoints)
        barrier(ctx)
        return path

    def validate(iteration: int) -> dict:
        with ema.applied():
            results = evaluate(
                model,
                targets,
                ctx,
                mode=recipe.eval.mode,
                crop=recipe.eval.crop,
                stride=recipe.eval.stride,
                autocast_dtype=eval_amp,
                workers=min(2, recipe.data.workers),
            )
        if ctx.is_main:
            names = list(next(iter(results["targets"].values()))["IoU"])
            write_report(results, names, work / "val" / f"iter_{iteration}")
            summary = ", ".join(f"{k} {v['mIoU']:.2f}" for k, v in results["targets"].items())
            say(f"validation at iteration {iteration}: mIoU {summary} | Avg. {results['Avg']:.2f}")
            if writer is not None:
                for k, v in results["targets"].items():
                    writer.add_scalar(f"val/mIoU_{k}", v["mIoU"], iteration)
        return results

    # [first non-finite iteration, -(stop requested)]: one MIN over the ranks answers both
    status = torch.zeros(2, dtype=torch.int64, device=ctx.device)

    def check(window: LossWindow, stop_requested: bool) -> bool:
        """Raise on a non-finite loss on any rank; True when any rank was asked to stop."""
        status[0] = window.first_non_finite()
        status[1] = -int(stop_requested)
        bad_at, neg_stop = min_over_ranks_(status, ctx).tolist()
        if bad_at < window.start + len(window):
            raise non_finite_error(window, bad_at, last_ckpt, ctx)
        return neg_stop < 0

    batches = iter(loader)
    last_ckpt, metrics, stopped, done = None, {}, False, start
    window = LossWindow(start)
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
            generators = [
                torch.Generator(device=ctx.device).manual_seed(int(s)) for s in batch["seed"]
            ]
            try:
                with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None):
                    losses = step(images, labels, valid_hw, generators)
            except FloatingPointError:  # the matcher met non-finite predictions
                window.add_non_finite(batch["path"], ctx.device)
                check(window, stop.requested)  # raises, naming the first non-finite iteration
                raise
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            window.add(losses, batch["path"])
            done = it + 1
            ema.update(done)

            log_due = done % t.log_interval == 0 or done == t.iterations
            val_due = done % t.val_interval == 0 or done == t.iterations
            ckpt_due = done % t.ckpt_interval == 0 or done == t.iterations
            stop_due = stop_at is not None and done >= stop_at
            if not (log_due or val_due or ckpt_due or stop_due):
                continue
            stopped = check(window, stop.requested) or stop_due
            if log_due:
                m = window.means()
                per_it = (time.perf_counter() - tic) / len(window)
                lr = optimizer.param_groups[0]["lr"]
                mem = ""
                if ctx.device.type == "cuda":
                    mem = f" | mem {torch.cuda.max_memory_allocated(ctx.device) / 2**30:.1f} GiB"
                say(
                    f"iter {done}/{t.iterations} | loss {m['loss']:.4f} "
                    f"(cls {m['loss_cls']:.3f} mask {m['loss_mask']:.3f} "
                    f"dice {m['loss_dice']:.3f}) | lr {lr:.2e} | {per_it:.3f} s/it "
                    f"(data {data_time:.3f}){mem} | "
                    f"ETA {format_eta(per_it * (t.iterations - done))}"
                )
                if writer is not None:
                    writer.add_scalar("train/loss", m["loss"], done)
                    for g in optimizer.param_groups:
                        writer.add_scalar(f"lr/{g['name']}", g["lr"], done)
                window, tic = LossWindow(done), time.perf_counter()
            if val_due:
                metrics = validate(done)
            if ckpt_due or stopped:
                last_ckpt = checkpoint(done)
            if stopped:
                say(f"stopped at iteration {done}; resume with --resume (checkpoint {last_ckpt})")
                break
    ema.apply()
    if ctx.is_main and not stopped:
        save_adapters(
            model.backbone, work / "adapters.safetensors", metadata={"recipe": recipe.name}
        )
    if writer is not None:
        writer.close()
    return TrainResult(done, last_ckpt, stopped, metrics, model)
