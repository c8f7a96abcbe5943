"""DataLoaders: workers, pinned memory, the resumable training stream, batch collation.

Training: :func:`build_loader` with an :class:`~recyclelora.data.sampler.InfiniteSourceSampler`
returns a :class:`TrainLoader` - an endless iterator of batches
``{"image": (B, 3, 512, 512) uint8, "label": (B, 512, 512) int64, "valid_hw": (B, 2) int64,
"path": [...], "index": (B,), "seed": [...]}`` whose ``state_dict()`` is the exact position after
the batches it has handed out (workers prefetch ahead; that is not counted).

Evaluation: without a sampler, a plain sequential DataLoader (optionally sharded ``rank::world``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import torch
from torch.utils.data import DataLoader, Dataset

from .sampler import GTAV_SUBSET_SIZE, InfiniteSourceSampler

__all__ = ["TrainLoader", "build_loader", "build_train_sampler", "collate", "worker_init"]


def worker_init(_worker_id: int) -> None:
    """One torch thread per DataLoader worker: the workers are the parallelism.

    (OpenCV is made single-threaded in the parent by :func:`build_loader` instead: calling
    ``cv2.setNumThreads`` in a forked child whose parent had used OpenCV's thread pool hangs.)
    """
    torch.set_num_threads(1)


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors of equal shape (else keep a list); ints -> int64 tensor; rest -> lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            same = all(v.shape == first.shape for v in values)
            out[key] = torch.stack(values) if same else values
        elif isinstance(first, int) and not isinstance(first, bool) and key != "seed":
            out[key] = torch.tensor(values, dtype=torch.int64)
        else:
            out[key] = values
    return out


def build_train_sampler(
    train_set,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    gtav_subset: int | None = GTAV_SUBSET_SIZE,
) -> InfiniteSourceSampler:
    """The docs/method.md §3 sampler for a :class:`~.datasets.TrainSet`: GTAV sources get a fresh
    random subset of ``gtav_subset`` images per pass (``None`` / 0: all), the others are read
    whole; ``batch_size`` is the global batch size."""
    subsets = [
        gtav_subset if (getattr(src, "name", "") == "gtav" and gtav_subset) else None
        for src in train_set.sources
    ]
    return InfiniteSourceSampler(
        train_set.sizes,
        batch_size,
        subset_sizes=subsets,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )


class TrainLoader:
    """Endless training batches from a DataLoader over an InfiniteSourceSampler, resumable.

    Iterating continues from the current position; ``state_dict()`` / ``load_state_dict()``
    save and restore it exactly (pass, offset), independent of worker count and world size.
    """

    def __init__(self, loader: DataLoader, sampler: InfiniteSourceSampler):
        self.loader = loader
        self.sampler = sampler
        self._position = sampler.position

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.sampler.set_position(self._position)
        for batch in self.loader:
            self._position += self.sampler.batch_size
            yield batch

    def state_dict(self) -> dict[str, Any]:
        consumed = (self._position - self.sampler.position) // self.sampler.batch_size
        return self.sampler.state_dict(consumed_batches=consumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._position = self.sampler.position


def build_loader(
    dataset: Dataset,
    sampler: InfiniteSourceSampler | None = None,
    *,
    batch_size: int = 1,
    num_workers: int = 4,
    pin_memory: bool | None = None,
    persistent_workers: bool = True,
    prefetch_factor: int = 2,
    rank: int = 0,
    world_size: int = 1,
) -> TrainLoader | DataLoader:
    """Training loader (with ``sampler``) or sequential evaluation loader (without).

    ``pin_memory`` defaults to "CUDA is available". With a sampler, batches hold this rank's
    ``sampler.per_rank`` samples of each global batch and ``batch_size`` is ignored. Without
    one, ``rank`` / ``world_size`` shard the dataset as ``range(rank, len, world_size)``.
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    kwargs: dict[str, Any] = {
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "collate_fn": collate,
    }
    if num_workers > 0:
        # Workers run OpenCV single-threaded, as mmengine does: set here, before the fork (a
        # forked child must not touch OpenCV's thread pool). Affects this process's OpenCV too.
        cv2.setNumThreads(0)
        kwargs.update(
            persistent_workers=persistent_workers,
            prefetch_factor=prefetch_factor,
            worker_init_fn=worker_init,
        )
    if sampler is not None:
        return TrainLoader(DataLoader(dataset, batch_sampler=sampler, **kwargs), sampler)
    indices = list(range(rank, len(dataset), world_size))
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, drop_last=False, **kwargs)
