"""Independent float64 reference of docs/method.md §1, written from the paper's eqs. 2-9.

Greedy column pivoting by explicit Gram-Schmidt (eq. 3: pick the column with the largest norm
after projecting out the already chosen ones) — no LAPACK, no scipy.
"""

from __future__ import annotations

import numpy as np


def greedy_pivoted_qr(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q (d, m), P (m,)) with ``W[:, P[j]]``'s orthogonal component normalised in ``Q[:, j]``."""
    d, k = w.shape
    m = min(d, k)
    residual = w.astype(np.float64).copy()
    q = np.zeros((d, m))
    pivots: list[int] = []
    for j in range(m):
        norms = np.linalg.norm(residual, axis=0)
        norms[pivots] = -1.0
        p = int(np.argmax(norms))
        qj = residual[:, p] / np.linalg.norm(residual[:, p])
        # Project the new direction out of every column (twice, for float64 orthogonality).
        for _ in range(2):
            residual -= np.outer(qj, qj @ residual)
        q[:, j] = qj
        pivots.append(p)
    return q, np.array(pivots)


def reference_init(w: np.ndarray, r_main: int, r_sub: int, alpha: float = 1.0) -> dict:
    """B/A of both adapters in float64 (B up to the sign of each column)."""
    d, k = w.shape
    m = min(d, k)
    q, piv = greedy_pivoted_qr(w)
    s = alpha / (r_main + r_sub)
    out = {"scaling": s, "pivots": piv}
    for name, cols in (("main", range(m - r_main, m)), ("sub", range(r_sub))):
        cols = list(cols)
        b = q[:, cols]
        a = np.zeros((len(cols), k))
        a[np.arange(len(cols)), piv[cols]] = 1.0
        out[name] = (b, a)
    return out
