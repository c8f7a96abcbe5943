"""Where a forward's time goes (benchmarks/profile_ops.py) and the attention FLOPs of the floor.

No assertion is about speed: shares and rates are checked for consistency, not for values.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import measure  # noqa: E402
import profile_ops  # noqa: E402


class Attention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def test_cpu_attention_is_counted_as_its_two_matmuls():
    """q kᵀ: 2 n m d per head; (softmax) v: 2 n m dv. torch's own table misses the CPU kernel."""
    b, h, n, m, d, dv = 2, 3, 50, 40, 16, 8
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, m, d), torch.randn(b, h, m, dv)
    assert measure.forward_flops(Attention(), q, k, v) == 2 * b * h * n * m * (d + dv)


def test_the_backbone_attention_is_in_the_count():
    """DINOv2's blocks call scaled_dot_product_attention: per block 2 T² (d + d) per image."""
    from recyclelora.models import build_model

    model = build_model("tiny", adapters=None, img_size=64).eval()
    bb = model.backbone
    counts = measure.forward_flop_counts(bb, torch.rand(1, 3, 64, 64))
    tokens = bb.num_prefix_tokens + (64 // bb.patch_size) ** 2
    dim = bb.embed_dim
    attention = sum(n for op, n in counts.items() if "scaled_dot_product" in op)
    assert attention == len(bb.blocks) * 2 * tokens * tokens * 2 * dim


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ("aten::addmm", "matmul"),
        ("aten.bmm", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::mkldnn_convolution", "convolution"),
        ("aten::native_layer_norm", "normalisation"),
        ("aten::gelu", "activation"),
        ("aten::upsample_bilinear2d", "resampling"),
        ("aten::add", "element-wise"),
        ("aten::copy_", "data movement"),
        ("aten::index_select", "data movement"),
        ("aten::einsum", "other"),
    ],
)
def test_operator_categories(op, expected):
    assert profile_ops.category(op) == expected


def test_quick_profile_adds_up(tmp_path):
    """Shares sum to one, the categories' FLOPs to the whole forward's count, the floor is
    FLOPs over the measured rate; the JSON and the printed table agree."""
    from latency import build_variants

    assert (
        profile_ops.main(
            ["--quick", "--variants", "base", "--repeats", "1", "--out", str(tmp_path)]
        )
        == 0
    )
    report = json.loads((tmp_path / "profile_ops.json").read_text())
    r = report["results"]["base"]
    cats = r["categories"]
    assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0, abs=1e-9)
    assert sum(c["seconds"] for c in cats.values()) == pytest.approx(r["total_seconds"])
    model = build_variants("tiny", 128, ["base"], 0)["base"]
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    assert sum(c["flops"] for c in cats.values()) == r["flops"] == measure.forward_flops(model, x)
    assert r["floor_seconds"] == pytest.approx(r["flops"] / report["matmul_rate_flops"])
    assert {"matmul", "attention", "convolution", "data movement"} <= set(cats)
    assert cats["normalisation"]["flops"] == 0 and cats["matmul"]["flops"] > 0


def test_latency_takes_cases_and_backends_per_preset():
    """A long large-preset run can leave out the costly frame while the tiny preset runs all."""
    import latency

    args = latency.parse_args(
        [
            "--preset-cases",
            f"{latency.LARGE}=crop_b1,crop_b4",
            "--preset-backends",
            f"{latency.LARGE}=eager,ort",
        ]
    )
    assert args.preset_cases == {latency.LARGE: ["crop_b1", "crop_b4"]}
    assert args.preset_backends == {latency.LARGE: ["eager", "ort"]}
    for bad in (["--preset-cases", "tiny=crop_b9"], ["--preset-backends", "huge=eager"]):
        with pytest.raises(SystemExit):
            latency.parse_args(bad)


def test_a_preset_runs_only_its_cases_and_backends(tmp_path):
    import latency

    out = tmp_path / "lat"
    argv = ["--quick", "--repeats", "1", "--backends", "eager", "--out", str(out)]
    argv += ["--preset-cases", "tiny=crop_b4", "--preset-backends", "tiny=eager"]
    assert latency.main(argv) == 0
    results = json.loads((out / "latency.json").read_text())["results"]["tiny"]
    assert list(results) == ["eager"] and list(results["eager"]) == ["crop_b4"]
