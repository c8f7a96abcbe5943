"""One place for multi-process concerns: ``torchrun`` environment, devices, DDP, reductions."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# cuBLAS needs a fixed workspace to be deterministic (CUDA >= 10.2); PyTorch's deterministic mode
# checks for it. One of the two values cuBLAS documents.
CUBLAS_DETERMINISTIC = ":4096:8"


@dataclass(frozen=True)
class Context:
    """Where this process runs: its rank among ``world_size`` and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def use_deterministic_algorithms() -> None:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` and the cuBLAS workspace
    setting it needs, which must be in the environment before CUDA initialises.

    ``warn_only``: CUDA's ``grid_sample`` and bilinear ``interpolate`` backward have no
    deterministic implementation, and this model trains through both; PyTorch warns for them and
    keeps their (atomic-add) kernels, so a GPU run is still not bit-exact.
    """
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_initialized():
            raise RuntimeError(
                "deterministic training needs CUBLAS_WORKSPACE_CONFIG set before CUDA "
                f"initialises: export CUBLAS_WORKSPACE_CONFIG={CUBLAS_DETERMINISTIC} or pass "
                "deterministic=True to recyclelora.engine.distributed.init"
            )
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC
    torch.use_deterministic_algorithms(True, warn_only=True)


def init(device: str | None = None, *, deterministic: bool = False) -> Context:
    """Join the process group that ``torchrun`` describes (RANK, WORLD_SIZE, LOCAL_RANK...).

    NCCL on CUDA, gloo on CPU. Without torchrun (or with WORLD_SIZE=1) this is a single process.
    ``device`` forces "cpu" or "cuda"; by default CUDA is used when present. ``deterministic``
    calls :func:`use_deterministic_algorithms` first, before anything initialises CUDA.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but this machine has no CUDA device")
    if deterministic:
        use_deterministic_algorithms()
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if use_cuda:  # binds the group to this GPU (a torch.device: every torch >= 2.4)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return Context(rank, world, local, dev)


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers to every rank (in place)."""
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def wrap_ddp(module: nn.Module, ctx: Context) -> DistributedDataParallel:
    """DDP that copies rank 0's parameters and buffers once, at construction, and never again.

    The buffers are constants (the adapters' initial factors ``lora_*_A0/B0``, 14.16M elements,
    normalisation constants): DDP's default would re-broadcast them before every forward.
    torch >= 2.13 says so with ``forward_sync_buffers=False``, and still syncs buffers at
    construction; before it, ``broadcast_buffers=False`` also skips that first sync, so they are
    broadcast here.
    """
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
    broadcast_buffers(module)
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def min_over_ranks_(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """In-place element-wise minimum over the ranks (one collective); returns ``t``."""
    if ctx.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def gather_objects(obj: Any, ctx: Context) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (picklable objects; not per step)."""
    if ctx.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
