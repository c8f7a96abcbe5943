"""Initialisation of RecycleLoRALinear against the independent float64 reference."""

import numpy as np
import pytest
import torch
from torch import nn

from recyclelora import RecycleLoRAConfig, RecycleLoRALinear
from recyclelora.analysis.metrics import row_space_basis, subspace_similarity

from .adapter_reference import reference_init

SHAPES = {"tall": (48, 20), "square": (32, 32), "wide": (20, 48)}


def make_linear(out_f: int, in_f: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():  # a spread of column norms, like trained weights
        lin.weight.mul_(torch.linspace(0.2, 3.0, in_f)[torch.randperm(in_f)])
    return lin


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_rrqr_init_matches_float64_reference(shape, bias):
    out_f, in_f = SHAPES[shape]
    lin = make_linear(out_f, in_f, bias)
    cfg = RecycleLoRAConfig(main_rank=6, sub_rank=3, init="rrqr")
    layer = RecycleLoRALinear.from_linear(lin, cfg)
    ref = reference_init(lin.weight.detach().double().numpy(), 6, 3)

    assert layer.scaling == pytest.approx(ref["scaling"])
    w0 = lin.weight.detach().double().numpy()
    residual = w0.copy()
    for name in ("main", "sub"):
        b_ref, a_ref = ref[name]
        a = getattr(layer, f"lora_{name}_A").detach().double().numpy()
        b = getattr(layer, f"lora_{name}_B").detach().double().numpy()
        np.testing.assert_array_equal(a, a_ref)  # one-hot at the same pivot columns
        signs = np.sign(np.sum(b * b_ref, axis=0))
        np.testing.assert_allclose(b, b_ref * signs, atol=1e-6)  # Q columns up to sign
        # the residual follows the sign of each column of B (RRQR fixes it, the test cannot)
        residual -= ref["scaling"] * (b_ref * signs) @ a_ref
    np.testing.assert_allclose(layer.weight.detach().double().numpy(), residual, atol=1e-6, rtol=0)

    x = torch.randn(7, in_f)
    y0, y = lin(x), layer(x)
    assert ((y - y0).norm() / y0.norm()).item() < 1e-6


def test_pivots_are_the_greedy_order():
    lin = make_linear(40, 24, True, seed=3)
    ref = reference_init(lin.weight.detach().double().numpy(), 4, 2)
    layer = RecycleLoRALinear.from_linear(lin, RecycleLoRAConfig(main_rank=4, sub_rank=2))
    m = 24
    np.testing.assert_array_equal(layer.lora_main_A.argmax(1).numpy(), ref["pivots"][m - 4 : m])
    np.testing.assert_array_equal(layer.lora_sub_A.argmax(1).numpy(), ref["pivots"][:2])


def test_main_and_sub_subspaces_orthogonal_at_init():
    layer = RecycleLoRALinear.from_linear(make_linear(64, 48, True), RecycleLoRAConfig(8, 4))
    bm, bs = layer.lora_main_B.double(), layer.lora_sub_B.double()
    assert (bm.T @ bs).abs().max().item() < 1e-6
    torch.testing.assert_close(bm.T @ bm, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)
    am, asub = layer.lora_main_A, layer.lora_sub_A
    assert subspace_similarity(row_space_basis(am), row_space_basis(asub)) == pytest.approx(0)


def test_svd_init_is_truncated_component():
    lin = make_linear(30, 22, True)
    cfg = RecycleLoRAConfig(main_rank=5, sub_rank=2, init="svd")
    layer = RecycleLoRALinear.from_linear(lin, cfg)
    u, s, vt = np.linalg.svd(lin.weight.detach().double().numpy(), full_matrices=False)
    m = 22
    for name, idx in (("main", slice(m - 5, m)), ("sub", slice(0, 2))):
        comp = (u[:, idx] * s[idx]) @ vt[idx]
        b = getattr(layer, f"lora_{name}_B").detach().double().numpy()
        a = getattr(layer, f"lora_{name}_A").detach().double().numpy()
        np.testing.assert_allclose(layer.scaling * b @ a, comp, atol=1e-5)
        # balanced split: B and A carry the same singular values
        np.testing.assert_allclose(np.linalg.norm(b, axis=0), np.linalg.norm(a, axis=1), rtol=1e-5)
    x = torch.randn(4, 22)
    assert ((layer(x) - lin(x)).norm() / lin(x).norm()).item() < 1e-6


def test_kaiming_init_is_zero_update():
    lin = make_linear(30, 22, False)
    g = torch.Generator().manual_seed(0)
    layer = RecycleLoRALinear.from_linear(lin, RecycleLoRAConfig(4, 2, init="kaiming"), g)
    assert layer.lora_main_B.abs().max() == 0 and layer.lora_sub_B.abs().max() == 0
    bound = 1 / np.sqrt(22)
    assert layer.lora_main_A.abs().max() <= bound and layer.lora_main_A.std() > bound / 4
    torch.testing.assert_close(layer.weight, lin.weight)  # zero update: residual = W0
    x = torch.randn(4, 22)
    torch.testing.assert_close(layer(x), lin(x))


@pytest.mark.parametrize(("main", "sub"), [(6, 0), (0, 3)])
def test_single_adapter_ablations(main, sub):
    lin = make_linear(32, 24, True)
    layer = RecycleLoRALinear.from_linear(lin, RecycleLoRAConfig(main, sub))
    keys = {k for k in layer.state_dict() if "lora" in k}
    present = "main" if main else "sub"
    assert keys == {f"lora_{present}_{p}" for p in ("A", "B", "A0", "B0")}
    assert layer.scaling == pytest.approx(1 / (main + sub))
    assert layer.adapter_numel() == (main + sub) * (32 + 24)
    x = torch.randn(5, 24)
    assert ((layer(x) - lin(x)).norm() / lin(x).norm()).item() < 1e-6


def test_float32_decomposition_close_to_float64():
    lin = make_linear(40, 30, True)
    l64 = RecycleLoRALinear.from_linear(lin, RecycleLoRAConfig(4, 2, qr_dtype="float64"))
    l32 = RecycleLoRALinear.from_linear(lin, RecycleLoRAConfig(4, 2, qr_dtype="float32"))
    torch.testing.assert_close(l32.lora_sub_A, l64.lora_sub_A)
    x = torch.randn(5, 30)
    torch.testing.assert_close(l32(x), lin(x), rtol=1e-5, atol=1e-5)


def test_ranks_too_large_for_layer():
    with pytest.raises(ValueError, match="exceeds min"):
        RecycleLoRALinear.from_linear(nn.Linear(16, 8), RecycleLoRAConfig(6, 4))


@pytest.mark.parametrize(
    "kwargs", [{"main_rank": 0, "sub_rank": 0}, {"main_rank": -1}, {"init": "pissa"}]
)
def test_config_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        RecycleLoRAConfig(**kwargs)
