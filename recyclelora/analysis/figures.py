"""PNG figures of the analysis: cosine-similarity heatmaps (Fig. 3) and φ per block (Fig. 4)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .collect import LayerAdapters
from .metrics import cosine_similarity_matrix

if TYPE_CHECKING:  # matplotlib is an optional dependency
    from matplotlib.figure import Figure


def pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "figures need matplotlib: pip install 'recyclelora[analysis]' (or pass --no-figures)"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cosine_heatmaps(layer: LayerAdapters, out_dir: Path) -> list[Path]:
    """One PNG per adapter: |cos| among A's rows (left) and among B's columns (right)."""
    plt = pyplot()
    paths = []
    for name, ad in layer.adapters.items():
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), constrained_layout=True)
        for ax, mat, title in (
            (axes[0], cosine_similarity_matrix(ad.A), "rows of A"),
            (axes[1], cosine_similarity_matrix(ad.B.T), "columns of B"),
        ):
            im = ax.imshow(mat.abs().numpy(), vmin=0, vmax=1, cmap="Blues")
            ax.set_title(f"|cos| {title}")
            ax.set_xlabel("component")
            ax.set_ylabel("component")
        fig.colorbar(im, ax=axes, shrink=0.8)
        fig.suptitle(f"{layer.name} — {name} adapter (rank {ad.rank})")
        path = out_dir / f"cosine_{layer.name.replace('.', '_')}_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def phi_per_block_figure(phi: dict[str, float]) -> Figure:
    """Bar chart of φ per block (Fig. 4), readable when every value is tiny.

    RRQR-initialised adapters give φ near 0 (the values of interest), so the y-axis spans the
    data rather than φ's full 0..1 range, each bar carries its value, and the block axis has
    one integer tick per block. Returns the matplotlib figure (closed by the caller).
    """
    plt = pyplot()
    blocks = [int(b) for b in phi]
    values = [float(v) for v in phi.values()]
    top = max(values, default=0.0)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.42 * len(blocks)), 3.4), constrained_layout=True)
    bars = ax.bar(blocks, values, color="tab:blue")
    rotation = 90 if len(blocks) > 8 else 0  # upright labels only where they fit side by side
    ax.bar_label(
        bars, labels=[f"{v:.2g}" for v in values], fontsize=7, rotation=rotation, padding=2
    )
    ax.set_xticks(blocks)
    ax.set_xlim(min(blocks) - 0.6, max(blocks) + 0.6)
    # Headroom for the value labels; φ = 0 everywhere still gets a visible axis.
    ax.set_ylim(0, 1.35 * top if top > 0 else 1.0)
    ax.set_xlabel("block")
    ax.set_ylabel("φ (main vs sub, A row spaces)")
    ax.set_title(
        f"Subspace similarity between main and sub adapters (mean {sum(values) / len(values):.2g})"
    )
    return fig


def phi_per_block_plot(phi: dict[str, float], path: Path) -> Path:
    """Write :func:`phi_per_block_figure` as a PNG."""
    plt = pyplot()
    fig = phi_per_block_figure(phi)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
