"""Initial adapter factors from a pre-trained weight: RRQR (the paper), SVD and Kaiming ablations,
and SoMA's minor singular triplets (the baseline).

Every RecycleLoRA function returns ``(main, sub)``, each a pair ``(B0, A0)`` with ``B0`` (d, r) and
``A0`` (r, k) in float64 on the CPU, or ``None`` when that adapter has rank 0. The caller builds
the frozen residual ``W0 - s (B0_main A0_main + B0_sub A0_sub)`` from them. ``soma_factors``
returns SoMA's one pair the same way.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from .config import AdapterConfig, RecycleLoRAConfig
from .names import one_hot_rows

Factors = tuple[torch.Tensor, torch.Tensor] | None
# BLAS threads of the pivoted QR. The trailing pivots depend on the summation order, so the
# count is part of the arithmetic (recorded in adapter files and checkpoints); one thread is
# also the fastest here (geqp3 is memory-bound).
QR_BLAS_THREADS = 1


# SoMA's SVD runs in float32, as the authors' (docs/method.md §6.1)
SOMA_SVD_DTYPE = torch.float32


def init_arithmetic(config: AdapterConfig) -> dict:
    """What decides the initial factors' bits beyond the weights, for files and checkpoints.

    RRQR's trailing pivots (the main adapter's columns) move with rounding: the QR's dtype,
    the LAPACK routine and its BLAS thread count are part of the result (docs/method.md §1.6).
    SoMA's minor singular vectors depend on the SVD's precision (float32).
    """
    out: dict = {"init": config.init, "torch": str(torch.__version__)}
    if config.kind == "soma":
        out["svd_dtype"] = str(SOMA_SVD_DTYPE).removeprefix("torch.")
    elif config.init == "rrqr":
        geqp3 = scipy.linalg.get_lapack_funcs("geqp3", dtype=np.dtype(config.qr_dtype))
        out |= {
            "qr_dtype": config.qr_dtype,
            "qr_blas_threads": QR_BLAS_THREADS,
            "lapack_routine": f"{geqp3.typecode}geqp3",
            "scipy": scipy.__version__,
        }
    return out


def check_ranks(shape: tuple[int, int], main_rank: int, sub_rank: int) -> None:
    """Main and sub take disjoint directions among the m = min(d, k) available ones."""
    m = min(shape)
    if main_rank + sub_rank > m:
        raise ValueError(
            f"main_rank + sub_rank = {main_rank + sub_rank} exceeds min(out, in) = {m} of a "
            f"{shape[0]}x{shape[1]} layer: the two adapters would overlap. Lower the ranks or "
            "exclude this layer from target_modules."
        )


def rrqr_factors(
    weight: torch.Tensor, main_rank: int, sub_rank: int, qr_dtype: str = RecycleLoRAConfig.qr_dtype
) -> tuple[Factors, Factors]:
    """docs/method.md §1 steps 1-3 with a single column-pivoted QR (LAPACK geqp3) for both adapters.

    ``W0[:, P] = Q R`` with m = min(d, k): the main adapter takes the minor directions
    ``Q[:, m-r:m]`` with one-hot A rows at ``P[m-r:m]``; the sub adapter the major ``Q[:, :r]``
    with one-hot rows at ``P[:r]``. PyTorch has no pivoted QR (nor has cuSOLVER), so this runs on
    the CPU whatever the layer's device. ``qr_dtype`` is the precision LAPACK runs in: float32
    (sgeqp3, the authors' arithmetic) or float64 (dgeqp3).
    """
    d, k = weight.shape
    check_ranks((d, k), main_rank, sub_rank)
    w = weight.detach().to("cpu", getattr(torch, qr_dtype)).numpy()
    # geqp3 is memory-bound: extra BLAS threads gain little, and right after a torch op they
    # fight torch's spinning OpenMP workers (measured here: 0.7 s single-threaded vs up to 18 s).
    with threadpool_limits(QR_BLAS_THREADS, user_api="blas"):
        q, _, piv = scipy.linalg.qr(w, pivoting=True, mode="economic")
    m = min(d, k)
    q = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float64))
    main = sub = None
    if main_rank:
        main = (q[:, m - main_rank : m].clone(), one_hot_rows(piv[m - main_rank : m], k))
    if sub_rank:
        sub = (q[:, :sub_rank].clone(), one_hot_rows(piv[:sub_rank], k))
    return main, sub


def svd_factors(
    weight: torch.Tensor, main_rank: int, sub_rank: int, scaling: float
) -> tuple[Factors, Factors]:
    """Minor singular triplets for main (SoMA), major for sub (PiSSA), split as
    ``B = U sqrt(S / s)``, ``A = sqrt(S / s) V^T`` so that ``s B A`` is the truncated component."""
    d, k = weight.shape
    check_ranks((d, k), main_rank, sub_rank)
    u, s, vh = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=False)
    m = s.numel()
    root = (s / scaling).sqrt()

    def pick(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        return u[:, lo:hi] * root[lo:hi], root[lo:hi, None] * vh[lo:hi]

    main = pick(m - main_rank, m) if main_rank else None
    sub = pick(0, sub_rank) if sub_rank else None
    return main, sub


def soma_factors(
    weight: torch.Tensor, rank: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SoMA's ``(B0, A0)``: the ``rank`` minor singular triplets of ``weight`` (docs/method.md
    §6.1).

    ``W0 = U S V^T`` by a full SVD in float32 on the weight's device (the authors' arithmetic);
    ``A = diag(sqrt(S_r / s)) V_r^T`` and ``B = U_r diag(sqrt(S_r / s))``, so that ``s B A`` is
    the minor component. Returned in float64 on the CPU (exact: widened from float32).
    """
    check_ranks(tuple(weight.shape), rank, 0)
    u, s, vh = torch.linalg.svd(weight.detach().to(SOMA_SVD_DTYPE), full_matrices=False)
    root = (s[-rank:] / scaling).sqrt()
    b, a = u[:, -rank:] * root, root[:, None] * vh[-rank:]
    return b.to("cpu", torch.float64), a.to("cpu", torch.float64)


def kaiming_factors(
    weight: torch.Tensor, main_rank: int, sub_rank: int, generator: torch.Generator | None = None
) -> tuple[Factors, Factors]:
    """Standard LoRA: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zero — a zero update."""
    d, k = weight.shape
    bound = 1.0 / math.sqrt(k)  # kaiming_uniform_(a=sqrt(5)) on fan_in k

    def pick(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.rand(r, k, dtype=torch.float64, generator=generator) * (2 * bound) - bound
        return torch.zeros(d, r, dtype=torch.float64), a

    return (pick(main_rank) if main_rank else None), (pick(sub_rank) if sub_rank else None)


def initial_factors(
    weight: torch.Tensor,
    main_rank: int,
    sub_rank: int,
    init: str,
    scaling: float,
    qr_dtype: str = RecycleLoRAConfig.qr_dtype,
    generator: torch.Generator | None = None,
) -> tuple[Factors, Factors]:
    if init == "rrqr":
        return rrqr_factors(weight, main_rank, sub_rank, qr_dtype)
    if init == "svd":
        return svd_factors(weight, main_rank, sub_rank, scaling)
    if init == "kaiming":
        return kaiming_factors(weight, main_rank, sub_rank, generator)
    raise ValueError(f"unknown init {init!r}; expected 'rrqr', 'svd' or 'kaiming'")
