"""``recyclelora-analyze``: the paper's adapter analyses on a model's adapters, as JSON and PNGs."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..adapters.names import ADAPTER_NAMES
from ..atomic import write_text
from .collect import load_source
from .figures import cosine_heatmaps, phi_per_block_plot
from .report import summarise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="recyclelora-analyze",
        description=(
            "Analyse RecycleLoRA or SoMA adapters (paper Tables 1-2, Figs. 3-4): effective rank "
            "and rank efficiency of each update, cosine similarity of A rows / B columns (SoMA's "
            "q, k, v and main adapters each on their own), main-sub "
            "subspace similarity φ per block, column-norm ratio of A (RRQR-selected vs other)."
        ),
    )
    p.add_argument("source", help="adapter file (.safetensors from save_adapters) or checkpoint")
    p.add_argument("--out", default="analysis", help="output folder (default: ./analysis)")
    p.add_argument(
        "--heatmap-layers",
        default=None,
        help="regex of layer names to draw cosine heatmaps for (default: the last block's layers)",
    )
    p.add_argument("--no-figures", action="store_true", help="write analysis.json only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        layers = load_source(args.source)
    except (FileNotFoundError, ValueError) as e:
        print(f"recyclelora-analyze: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = summarise(layers)
    write_text(out / "analysis.json", json.dumps(result, indent=2))
    written = [out / "analysis.json"]
    if not args.no_figures:
        if args.heatmap_layers:
            chosen = [ly for n, ly in layers.items() if re.search(args.heatmap_layers, n)]
        else:
            last = max((ly.block for ly in layers.values() if ly.block is not None), default=None)
            chosen = [ly for ly in layers.values() if ly.block == last]
        for layer in chosen:
            written += cosine_heatmaps(layer, out)
        phi = result["summary"].get("phi_per_block")
        if phi:
            written.append(phi_per_block_plot(phi, out / "phi_per_block.png"))
    s = result["summary"]
    print(f"{s['num_layers']} adapted layers")
    for adapter in ADAPTER_NAMES:
        if adapter in s:
            a = s[adapter]
            line = (
                f"{adapter:>4}: rank {a['rank']}, effective rank {a['effective_rank_mean']:.2f}, "
                f"rank efficiency {a['rank_efficiency_mean']:.3f}"
            )
            if "column_norms" in a:
                cn = a["column_norms"]
                line += (
                    f", A column-norm ratio {cn['ratio_mean']:.2f}x (max {cn['ratio_max']:.2f}x)"
                )
            print(line)
    if "phi_mean" in s:
        print(f"φ(main, sub) mean over layers: {s['phi_mean']:.4f}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
