"""Analysis metrics against brute-force numpy computations, and the CLI end to end, on
RecycleLoRA and SoMA adapters."""

import json
import re

import numpy as np
import pytest
import torch

from recyclelora import RecycleLoRAConfig, apply_recyclelora, save_adapters
from recyclelora.adapters import SoMAConfig, iter_adapted
from recyclelora.analysis import load_source, summarise
from recyclelora.analysis.cli import main as analyze
from recyclelora.analysis.figures import phi_per_block_figure
from recyclelora.analysis.metrics import (
    column_norm_stats,
    cosine_similarity_matrix,
    effective_rank,
    row_space_basis,
    subspace_similarity,
    update_effective_rank,
)

from .test_adapter_model import trained_model
from .tiny_transformer import TinyTransformer


def np_effective_rank(m: np.ndarray) -> float:
    s = np.linalg.svd(m, compute_uv=False)
    p = s[s > 1e-12 * s.max()] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def test_effective_rank_matches_full_svd():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(40, 6, generator=g, dtype=torch.float64)
    a = (
        torch.randn(6, 30, generator=g, dtype=torch.float64)
        * torch.tensor([5, 3, 1, 1, 0.1, 0.1])[:, None].double()
    )
    assert update_effective_rank(b, a) == pytest.approx(
        np_effective_rank((b @ a).numpy()), rel=1e-9
    )
    b0, a0 = torch.randn(40, 6, generator=g).double(), torch.randn(6, 30, generator=g).double()
    ref = np_effective_rank((b @ a - b0 @ a0).numpy())
    assert update_effective_rank(b, a, b0, a0) == pytest.approx(ref, rel=1e-9)
    assert effective_rank(torch.ones(4)) == pytest.approx(4.0)  # flat spectrum: full rank
    assert effective_rank(torch.tensor([1.0, 0, 0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_subspace_similarity_definition():
    g = torch.Generator().manual_seed(1)
    a1, a2 = torch.randn(4, 20, generator=g), torch.randn(2, 20, generator=g)
    u1 = np.linalg.svd(a1.numpy().astype(np.float64))[2][:4].T  # right singular vectors
    u2 = np.linalg.svd(a2.numpy().astype(np.float64))[2][:2].T
    ref = np.linalg.norm(u1.T @ u2) ** 2 / 2
    assert subspace_similarity(row_space_basis(a1), row_space_basis(a2)) == pytest.approx(ref)
    # nested subspaces give 1, disjoint coordinate subspaces give 0
    assert subspace_similarity(row_space_basis(a1), row_space_basis(a1[:2] * 3)) == pytest.approx(1)
    e = torch.eye(20)
    assert subspace_similarity(row_space_basis(e[:3]), row_space_basis(e[3:5])) == 0


def test_cosine_and_column_norms_direct():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 12, generator=g)
    sim = cosine_similarity_matrix(a).numpy()
    an = a.numpy().astype(np.float64)
    for i in range(5):
        for j in range(5):
            ref = an[i] @ an[j] / np.linalg.norm(an[i]) / np.linalg.norm(an[j])
            assert sim[i, j] == pytest.approx(ref, abs=1e-12)
    sel = torch.tensor([1, 4, 7])
    stats = column_norm_stats(a, sel)
    norms = np.linalg.norm(an, axis=0)
    other = np.setdiff1d(np.arange(12), sel.numpy())
    assert stats["mean_norm_selected"] == pytest.approx(norms[sel.numpy()].mean())
    assert stats["mean_norm_other"] == pytest.approx(norms[other].mean())
    assert stats["ratio"] == pytest.approx(norms[sel.numpy()].mean() / norms[other].mean())


def test_at_init_main_and_sub_are_orthogonal():
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_recyclelora(model.blocks, RecycleLoRAConfig(8, 2), progress=False)
    result = summarise(load_source(model))
    s = result["summary"]
    assert s["phi_mean"] == pytest.approx(0, abs=1e-12)
    assert set(s["phi_per_block"]) == {"0", "1"}
    for layer in result["layers"].values():
        assert layer["phi_A"] == pytest.approx(0, abs=1e-12)
        assert layer["phi_B"] == pytest.approx(0, abs=1e-12)
        # one-hot A rows and orthonormal B columns: BA has r equal singular values
        assert layer["main"]["effective_rank"] == pytest.approx(8)
        assert layer["main"]["cos_A_rows"] == 0
        assert layer["main"]["column_norms"]["ratio"] is None  # others are exactly zero
    assert s["main"]["rank_efficiency_mean"] == pytest.approx(1.0)


def test_kaiming_init_is_not_orthogonal():
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_recyclelora(model.blocks, RecycleLoRAConfig(8, 2, init="kaiming"), progress=False)
    assert summarise(load_source(model))["summary"]["phi_mean"] > 0.05


def test_cli_on_adapter_file_and_checkpoint(tmp_path, capsys):
    _, model = trained_model(steps=5)
    path = save_adapters(model.blocks, tmp_path / "adapters.safetensors")
    out = tmp_path / "analysis"
    assert analyze([str(path), "--out", str(out)]) == 0
    result = json.loads((out / "analysis.json").read_text())
    s = result["summary"]
    assert s["num_layers"] == 8
    assert s["main"]["column_norms"]["ratio_max"] >= s["main"]["column_norms"]["ratio_mean"] > 0
    assert 0 < s["main"]["rank_efficiency_mean"] <= 1
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "phi_per_block.png" in pngs
    assert len([p for p in pngs if p.startswith("cosine_1_")]) == 8  # last block: 4 layers x 2
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert "rank efficiency" in capsys.readouterr().out

    ckpt = tmp_path / "ckpt.pth"
    torch.save({"state_dict": model.state_dict(), "iteration": 5}, ckpt)
    out2 = tmp_path / "analysis2"
    assert analyze([str(ckpt), "--out", str(out2), "--no-figures"]) == 0
    result2 = json.loads((out2 / "analysis.json").read_text())
    main2 = result2["summary"]["main"]
    assert main2.pop("column_norms") == pytest.approx(s["main"].pop("column_norms"))
    assert main2 == pytest.approx(s["main"])


def test_cli_errors_are_clear(tmp_path, capsys):
    empty = tmp_path / "plain.pth"
    torch.save({"state_dict": TinyTransformer().state_dict()}, empty)
    assert analyze([str(empty)]) == 2
    assert "no RecycleLoRA adapter tensors" in capsys.readouterr().err
    assert analyze([str(tmp_path / "nope.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("n_blocks", [2, 24])
def test_phi_figure_shows_near_zero_values(n_blocks):
    """φ of RRQR adapters is ~1e-3: the bars must be visible, labelled, on integer blocks."""
    pytest.importorskip("matplotlib")
    values = np.random.default_rng(n_blocks).uniform(1e-4, 3e-3, n_blocks)
    phi = {str(b): float(v) for b, v in enumerate(values)}
    fig = phi_per_block_figure(phi)
    try:
        fig.canvas.draw()
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(b) for b in range(n_blocks)]
        assert list(ax.get_xticks()) == list(range(n_blocks))
        lo, hi = ax.get_ylim()
        # The axis covers every bar, and the tallest bar fills more than half of it.
        assert lo == 0 and values.max() < hi < 2 * values.max()
        written = [float(t.get_text()) for t in ax.texts]
        assert written == pytest.approx(list(values), rel=0.05)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


SOMA_RANK = 4


def soma_model() -> TinyTransformer:
    """SoMA on block 1 of the tiny transformer (q, k, v on qkv; main on proj, fc1, fc2), its
    adapters moved off their initial values as training would."""
    torch.manual_seed(0)
    model = TinyTransformer()
    cfg = SoMAConfig(rank=SOMA_RANK, alpha=4.0, first_block=1)
    apply_recyclelora(model.blocks, cfg, progress=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def direct_effective_rank(b: torch.Tensor, a: torch.Tensor, b0=None, a0=None) -> float:
    """Roy & Vetterli's effective rank from the full SVD of ``B A`` (minus ``B0 A0``), float64."""
    m = b.detach().double() @ a.detach().double()
    if b0 is not None:
        m = m - b0.double() @ a0.double()
    s = torch.linalg.svdvals(m)
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def test_soma_q_k_v_and_main_adapters_are_analysed_one_by_one():
    model = soma_model()
    result = summarise(load_source(model.blocks))
    layers, summary = result["layers"], result["summary"]
    assert {n: sorted(k for k in s if k != "block") for n, s in layers.items()} == {
        "1.attn.qkv": ["k", "q", "v"],
        "1.attn.proj": ["main"],
        "1.mlp.fc1": ["main"],
        "1.mlp.fc2": ["main"],
    }
    expected: dict[str, list[float]] = {}
    for name, layer in iter_adapted(model.blocks):
        for adapter, b, a in layer.adapter_pairs():
            b0, a0 = (getattr(layer, f"lora_{adapter}_{p}0") for p in "BA")
            got = layers[name][adapter]
            rank = direct_effective_rank(b, a)
            assert got["rank"] == SOMA_RANK
            assert got["effective_rank"] == pytest.approx(rank, rel=1e-9), (name, adapter)
            assert got["rank_efficiency"] == pytest.approx(rank / SOMA_RANK, rel=1e-9)
            update = direct_effective_rank(b, a, b0, a0)
            assert got["update_effective_rank"] == pytest.approx(update, rel=1e-9)
            an = a.detach().double().numpy()
            unit = an / np.linalg.norm(an, axis=1, keepdims=True)
            cos = np.abs(unit @ unit.T)
            off = (cos.sum() - np.trace(cos)) / (SOMA_RANK * (SOMA_RANK - 1))
            assert got["cos_A_rows"] == pytest.approx(off, rel=1e-9)
            expected.setdefault(adapter, []).append(rank)
    assert len(expected["main"]) == 3 and all(len(expected[n]) == 1 for n in "qkv")
    for adapter, ranks in expected.items():
        assert summary[adapter]["effective_rank_mean"] == pytest.approx(np.mean(ranks), rel=1e-9)
        assert summary[adapter]["rank_efficiency_mean"] == pytest.approx(
            np.mean(ranks) / SOMA_RANK, rel=1e-9
        )
    assert "sub" not in summary and "phi_mean" not in summary  # φ is main vs sub


def test_cli_on_a_soma_checkpoint_and_adapter_file(tmp_path, capsys):
    model = soma_model()
    ckpt = tmp_path / "iter_5.pth"
    torch.save({"model": model.blocks.state_dict(), "iteration": 5}, ckpt)
    assert analyze([str(ckpt), "--out", str(tmp_path / "ckpt")]) == 0
    printed = capsys.readouterr().out
    for adapter in ("main", "q", "k", "v"):
        assert re.search(rf"^ *{adapter}: rank {SOMA_RANK}, effective rank ", printed, re.M)
    pngs = sorted(p.name for p in (tmp_path / "ckpt").glob("*.png"))
    assert pngs == sorted(
        [f"cosine_1_attn_qkv_{n}.png" for n in "qkv"]
        + [f"cosine_1_{n}_main.png" for n in ("attn_proj", "mlp_fc1", "mlp_fc2")]
    )
    path = save_adapters(model.blocks, tmp_path / "adapters.safetensors")
    assert analyze([str(path), "--out", str(tmp_path / "file"), "--no-figures"]) == 0
    from_ckpt, from_file = (
        json.loads((tmp_path / d / "analysis.json").read_text()) for d in ("ckpt", "file")
    )
    # the same tensors, whichever way they arrive: the same figures
    assert from_file == from_ckpt
    assert from_ckpt == json.loads(json.dumps(summarise(load_source(model.blocks))))
