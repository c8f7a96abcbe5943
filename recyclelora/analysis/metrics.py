"""The paper's adapter analyses (Tables 1-2, Figs. 3-4) as pure float64 functions.

Inputs are an adapter's ``B`` (d, r) and ``A`` (r, k), optionally with their initial values.
"""

from __future__ import annotations

import torch


def lowrank_singular_values(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Singular values of ``b @ a`` (d, k) without forming it: those of ``R_b R_a^T`` (r, r)."""
    rb = torch.linalg.qr(b.detach().double(), mode="r").R
    ra = torch.linalg.qr(a.detach().double().T, mode="r").R
    return torch.linalg.svdvals(rb @ ra.T)


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli: ``exp(H(p))`` with ``p = σ / Σσ``; 0 for a zero matrix."""
    s = singular_values.detach().double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def update_effective_rank(
    b: torch.Tensor, a: torch.Tensor, b0: torch.Tensor | None = None, a0: torch.Tensor | None = None
) -> float:
    """Effective rank of ``B A`` or, given the initial factors, of ``B A - B0 A0``."""
    if b0 is not None:
        b, a = (
            torch.cat([b.detach().double(), -b0.double()], 1),
            torch.cat([a.detach().double(), a0.double()], 0),
        )
    return effective_rank(lowrank_singular_values(b, a))


def cosine_similarity_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """(n, n) cosine similarities between the rows of ``vectors`` (n, dim); zero rows give 0."""
    v = vectors.detach().double()
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return v @ v.T


def mean_offdiagonal_abs(sim: torch.Tensor) -> float:
    n = sim.shape[0]
    if n < 2:
        return 0.0
    return float((sim.abs().sum() - sim.diagonal().abs().sum()) / (n * (n - 1)))


def row_space_basis(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (k, r) of the row space of ``a`` (r, k): its right singular vectors."""
    return torch.linalg.svd(a.detach().double(), full_matrices=False).Vh.T


def subspace_similarity(u: torch.Tensor, v: torch.Tensor) -> float:
    """φ = ‖Uᵀ V‖²_F / min(r_u, r_v) for orthonormal bases ``u`` (n, r_u), ``v`` (n, r_v): 1 for
    nested subspaces, 0 for orthogonal ones (paper eq. 10, the LoRA paper's definition)."""
    return float(
        (u.T.detach().double() @ v.detach().double()).square().sum() / min(u.shape[1], v.shape[1])
    )


def selected_columns(a0: torch.Tensor) -> torch.Tensor | None:
    """Input columns that a one-hot (RRQR) initial ``A0`` selects, or ``None`` for a dense one."""
    nonzero = a0 != 0
    if not bool((nonzero.sum(dim=1) == 1).all()):
        return None
    return nonzero.any(dim=0).nonzero().flatten()


def column_norm_stats(a: torch.Tensor, selected: torch.Tensor) -> dict[str, float]:
    """Table 1: mean ℓ2 norm of ``A``'s columns that RRQR selected vs. the others, and the ratio."""
    norms = a.detach().double().norm(dim=0)
    mask = torch.zeros(norms.numel(), dtype=torch.bool)
    mask[selected] = True
    sel, rest = float(norms[mask].mean()), float(norms[~mask].mean())
    # undefined (None) while the other columns are all zero, as at initialisation
    return {
        "mean_norm_selected": sel,
        "mean_norm_other": rest,
        "ratio": sel / rest if rest else None,
    }
