"""PNG figures of the analysis: cosine-similarity heatmaps (Fig. 3) and φ per block (Fig. 4)."""

from __future__ import annotations

from pathlib import Path

from .collect import LayerAdapters
from .metrics import cosine_similarity_matrix


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


def phi_per_block_plot(phi: dict[str, float], path: Path) -> Path:
    plt = pyplot()
    blocks = [int(b) for b in phi]
    fig, ax = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
    ax.bar(blocks, list(phi.values()), color="tab:blue")
    ax.set_xlabel("block")
    ax.set_ylabel("φ (main vs sub, A row spaces)")
    ax.set_ylim(0, 1)
    ax.set_title("Subspace similarity between main and sub adapters")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
