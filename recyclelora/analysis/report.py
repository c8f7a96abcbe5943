"""Per-layer and summary statistics of a set of adapters, as one JSON-able dict."""

from __future__ import annotations

from collections import defaultdict
from statistics import mean

from ..adapters.names import ADAPTER_NAMES
from .collect import LayerAdapters
from .metrics import (
    column_norm_stats,
    cosine_similarity_matrix,
    mean_offdiagonal_abs,
    row_space_basis,
    selected_columns,
    subspace_similarity,
    update_effective_rank,
)


def layer_stats(layer: LayerAdapters) -> dict:
    """Effective rank / rank efficiency, mean |cos| of A rows and B columns, Table-1 column norms
    (RRQR init only), and main/sub subspace similarity φ of the A row spaces and B column spaces."""
    out: dict = {"block": layer.block}
    for name, ad in layer.adapters.items():
        s: dict = {"rank": ad.rank}
        s["effective_rank"] = update_effective_rank(ad.B, ad.A)
        s["rank_efficiency"] = s["effective_rank"] / ad.rank
        if ad.A0 is not None and ad.B0 is not None:
            s["update_effective_rank"] = update_effective_rank(ad.B, ad.A, ad.B0, ad.A0)
        s["cos_A_rows"] = mean_offdiagonal_abs(cosine_similarity_matrix(ad.A))
        s["cos_B_cols"] = mean_offdiagonal_abs(cosine_similarity_matrix(ad.B.T))
        cols = selected_columns(ad.A0) if ad.A0 is not None else None
        if cols is not None and cols.numel() < ad.A.shape[1]:
            s["column_norms"] = column_norm_stats(ad.A, cols)
        out[name] = s
    if {"main", "sub"} <= layer.adapters.keys():
        main, sub = layer.adapters["main"], layer.adapters["sub"]
        out["phi_A"] = subspace_similarity(row_space_basis(main.A), row_space_basis(sub.A))
        out["phi_B"] = subspace_similarity(row_space_basis(main.B.T), row_space_basis(sub.B.T))
    return out


def summarise(layers: dict[str, LayerAdapters]) -> dict:
    """Per-layer stats plus the paper's aggregates: Table 1 (column-norm ratio, mean and max over
    layers), Table 2 (mean effective rank and rank efficiency) and Fig. 4 (φ per block). Each
    adapter name is aggregated on its own: RecycleLoRA's main and sub, SoMA's main (proj, fc1,
    fc2) and q, k, v (the row blocks of qkv)."""
    per_layer = {name: layer_stats(layer) for name, layer in layers.items()}
    summary: dict = {"num_layers": len(per_layer)}
    for adapter in ADAPTER_NAMES:
        stats = [s[adapter] for s in per_layer.values() if adapter in s]
        if not stats:
            continue
        agg = {
            "rank": stats[0]["rank"],
            "effective_rank_mean": mean(s["effective_rank"] for s in stats),
            "rank_efficiency_mean": mean(s["rank_efficiency"] for s in stats),
            "cos_A_rows_mean": mean(s["cos_A_rows"] for s in stats),
            "cos_B_cols_mean": mean(s["cos_B_cols"] for s in stats),
        }
        norms = [s["column_norms"] for s in stats if s.get("column_norms", {}).get("ratio")]
        if norms:
            agg["column_norms"] = {
                "mean_norm_selected": mean(n["mean_norm_selected"] for n in norms),
                "mean_norm_other": mean(n["mean_norm_other"] for n in norms),
                "ratio_mean": mean(n["ratio"] for n in norms),
                "ratio_max": max(n["ratio"] for n in norms),
            }
        summary[adapter] = agg
    by_block: dict[int, list[float]] = defaultdict(list)
    for s in per_layer.values():
        if "phi_A" in s and s["block"] is not None:
            by_block[s["block"]].append(s["phi_A"])
    if by_block:
        summary["phi_per_block"] = {str(b): mean(v) for b, v in sorted(by_block.items())}
        summary["phi_mean"] = mean(s["phi_A"] for s in per_layer.values() if "phi_A" in s)
    return {"summary": summary, "layers": per_layer}
