"""Infinite, seedable, resumable source sampler (docs/method.md §3 source sampling).

The training stream is a sequence of *passes*. Pass ``p`` lists, for every source, either all its
images or (GTAV) a fresh random subset of ``subset_size`` of them, concatenates the sources and
shuffles the result; all of it depends only on ``(seed, p)``. Passes follow each other without a
gap, so the stream is an infinite sequence of positions ``p * pass_length + offset``, and global
batch ``k`` is positions ``[k * B, (k + 1) * B)`` - batches may straddle two passes.

Each position yields a sample key ``(dataset index, sample seed)``; the sample seed is derived from
``(seed, pass, dataset index)`` alone, so a sample's augmentation does not depend on the number of
DataLoader workers, on the number of DDP ranks, or on resuming. With ``world_size`` ranks, rank
``r`` gets the ``r``-th contiguous ``B / world_size`` slice of every global batch: the union over
ranks of one global batch is the single-process global batch.

``state_dict()`` holds the exact position (pass, offset); :class:`.loader.TrainLoader` tracks the
batches actually handed out (DataLoader workers prefetch ahead of the trainer).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from .imageio import DataWarning

__all__ = ["GTAV_SUBSET_SIZE", "InfiniteSourceSampler", "sample_seed"]

GTAV_SUBSET_SIZE = 12403
_PASS_STREAM = 0x5EED_0001  # separates the pass-order stream from the per-sample seeds


def sample_seed(seed: int, pass_index: int, dataset_index: int) -> int:
    """The 63-bit augmentation seed of one sample: a hash of (seed, pass, dataset index)."""
    state = np.random.SeedSequence([int(seed), int(pass_index), int(dataset_index)])
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class InfiniteSourceSampler(Sampler):
    """Batch sampler: yields this rank's share of each global batch as ``[(index, seed), ...]``.

    Args:
        source_sizes: number of images of each source, in the order they are concatenated in
            the training set (global index = offset of the source + local index).
        batch_size: the *global* batch size (summed over ranks); divisible by ``world_size``.
        subset_sizes: per source, ``None`` (read whole) or the size of the random subset drawn
            afresh each pass (GTAV: 12,403). Larger than the source -> the whole source, warned.
        seed: global seed; pass orders and sample seeds derive from it.
        rank, world_size: DDP sharding.
        shuffle: False keeps each pass in index order (subsets sorted); for debugging.
    """

    def __init__(
        self,
        source_sizes: Sequence[int],
        batch_size: int,
        *,
        subset_sizes: Sequence[int | None] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        self.source_sizes = tuple(int(n) for n in source_sizes)
        if not self.source_sizes or min(self.source_sizes) <= 0:
            raise ValueError(f"every source needs at least one image, got {self.source_sizes}")
        subset_sizes = subset_sizes or [None] * len(self.source_sizes)
        if len(subset_sizes) != len(self.source_sizes):
            raise ValueError("subset_sizes needs one entry (int or None) per source")
        subsets = []
        for n, k in zip(self.source_sizes, subset_sizes, strict=True):
            if k is not None and k > n:
                warnings.warn(
                    f"a subset of {k} images per pass was asked from a source of {n}: reading "
                    f"the whole source each pass (the full GTAV release has 24,966 images)",
                    DataWarning,
                    stacklevel=2,
                )
                k = None
            if k is not None and k <= 0:
                raise ValueError(f"subset size must be positive, got {k}")
            subsets.append(None if k is None or k == n else int(k))
        self.subset_sizes = tuple(subsets)
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size/rank/world_size: {batch_size}/{rank}/{world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"global batch size {batch_size} is not divisible by world size {world_size}"
            )
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.per_rank = self.batch_size // self.world_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.offsets = np.cumsum((0,) + self.source_sizes)[:-1]
        self.pass_length = sum(
            n if k is None else k for n, k in zip(self.source_sizes, self.subset_sizes, strict=True)
        )
        self._start = 0  # absolute stream position where the next iteration begins
        self._cache: tuple[int, np.ndarray] | None = None

    # -- the stream ---------------------------------------------------------------------------
    def pass_indices(self, pass_index: int) -> np.ndarray:
        """Dataset indices of pass ``pass_index`` in stream order (int64, ``pass_length``)."""
        if self._cache is not None and self._cache[0] == pass_index:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, int(pass_index), _PASS_STREAM])
        parts = []
        for off, n, k in zip(self.offsets, self.source_sizes, self.subset_sizes, strict=True):
            if k is None:
                parts.append(np.arange(n, dtype=np.int64) + off)
            else:
                chosen = rng.choice(n, size=k, replace=False).astype(np.int64)
                parts.append(np.sort(chosen) + off)
        order = np.concatenate(parts)
        if self.shuffle:
            order = rng.permutation(order)
        self._cache = (int(pass_index), order)
        return order

    def keys_at(self, start: int, count: int) -> list[tuple[int, int]]:
        """The ``count`` sample keys from absolute stream position ``start``."""
        out = []
        pos = start
        while len(out) < count:
            p, o = divmod(pos, self.pass_length)
            idx = self.pass_indices(p)
            take = min(count - len(out), self.pass_length - o)
            for i in idx[o : o + take]:
                out.append((int(i), sample_seed(self.seed, p, int(i))))
            pos += take
        return out

    def global_batch(self, k: int, start: int = 0) -> list[tuple[int, int]]:
        """All ``batch_size`` keys of global batch ``k`` counted from position ``start``."""
        return self.keys_at(start + k * self.batch_size, self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        pos = self._start
        lo = self.rank * self.per_rank
        while True:
            yield self.keys_at(pos + lo, self.per_rank)
            pos += self.batch_size

    # -- position / resume --------------------------------------------------------------------
    @property
    def position(self) -> int:
        """Absolute stream position where the next ``iter()`` starts."""
        return self._start

    def set_position(self, position: int) -> None:
        if position < 0 or position % self.batch_size:
            raise ValueError(f"position {position} is not a multiple of the global batch size")
        self._start = int(position)

    def state_dict(self, consumed_batches: int = 0) -> dict[str, Any]:
        """Exact stream position after ``consumed_batches`` global batches from ``position``."""
        pos = self._start + int(consumed_batches) * self.batch_size
        p, o = divmod(pos, self.pass_length)
        return {
            "pass": int(p),
            "offset": int(o),
            "seed": self.seed,
            "global_batch_size": self.batch_size,
            "source_sizes": list(self.source_sizes),
            "subset_sizes": list(self.subset_sizes),
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken (any world size, same data and seed)."""
        expected = {
            "seed": self.seed,
            "global_batch_size": self.batch_size,
            "source_sizes": list(self.source_sizes),
            "subset_sizes": list(self.subset_sizes),
            "shuffle": self.shuffle,
        }
        diff = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a} vs now {b}" for k, (a, b) in diff.items())
            raise ValueError(
                "cannot resume the sampler: the run's data or seed changed "
                f"({detail}); resume with the same datasets, subset sizes, seed and global "
                "batch size"
            )
        self.set_position(int(state["pass"]) * self.pass_length + int(state["offset"]))
