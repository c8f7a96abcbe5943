"""Initialisation of RecycleLoRALinear against the independent float64 reference, the authors'
float32 LAPACK call, and torch's own Kaiming initialiser."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from threadpoolctl import threadpool_info, threadpool_limits
from torch import nn

from recyclelora import RecycleLoRAConfig, RecycleLoRALinear
from recyclelora.adapters import init
from recyclelora.adapters.init import (
    QR_BLAS_THREADS,
    init_arithmetic,
    kaiming_factors,
    rrqr_factors,
    svd_factors,
)
from recyclelora.analysis.metrics import row_space_basis, subspace_similarity

from .adapter_reference import reference_init

SHAPES = {"tall": (48, 20), "square": (32, 32), "wide": (20, 48)}


def make_linear(out_f: int, in_f: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():  # a spread of column norms, like trained weights
        lin.weight.mul_(torch.linspace(0.2, 3.0, in_f)[torch.randperm(in_f)])
    return lin


@pytest.mark.parametrize("qr_dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_rrqr_init_matches_float64_reference(shape, bias, qr_dtype):
    """Well-separated column norms: both precisions pick the greedy pivots of eq. 3."""
    out_f, in_f = SHAPES[shape]
    lin = make_linear(out_f, in_f, bias)
    cfg = RecycleLoRAConfig(main_rank=6, sub_rank=3, init="rrqr", qr_dtype=qr_dtype)
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


# ------------------------------------------------------------------------------ QR arithmetic


def decaying_spectrum(d: int, k: int, decay: float, seed: int = 0) -> torch.Tensor:
    """float32 weight with singular values exp(-i / decay): near-tied trailing pivots."""
    rng = np.random.default_rng(seed)
    m = min(d, k)
    u, _ = np.linalg.qr(rng.standard_normal((d, m)))
    v, _ = np.linalg.qr(rng.standard_normal((k, m)))
    return torch.from_numpy(((u * np.exp(-np.arange(m) / decay)) @ v.T).astype(np.float32))


def authors_qr(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The authors' arithmetic: scipy's pivoted QR of the float32 weight (sgeqp3), one thread."""
    with threadpool_limits(1, user_api="blas"):
        q, _, piv = scipy.linalg.qr(w.numpy(), pivoting=True, mode="economic")
    assert q.dtype == np.float32
    return q, piv


def test_default_init_selects_the_authors_pivots():
    w = decaying_spectrum(40, 40, decay=1.5)
    lin = nn.Linear(40, 40)
    with torch.no_grad():
        lin.weight.copy_(w)
    q32, piv32 = authors_qr(w)
    piv64 = scipy.linalg.qr(w.double().numpy(), pivoting=True, mode="economic")[2]
    # the trailing pivots follow rounding: float64 selects other main-adapter columns here
    assert not np.array_equal(piv32[-6:], piv64[-6:])

    cfg = RecycleLoRAConfig(main_rank=6, sub_rank=4)
    assert cfg.qr_dtype == "float32"
    layer = RecycleLoRALinear.from_linear(lin, cfg)
    np.testing.assert_array_equal(layer.lora_main_A.argmax(1).numpy(), piv32[-6:])
    np.testing.assert_array_equal(layer.lora_sub_A.argmax(1).numpy(), piv32[:4])
    # B0 is the authors' float32 Q, bit for bit
    np.testing.assert_array_equal(layer.lora_main_B.detach().numpy(), q32[:, -6:])
    np.testing.assert_array_equal(layer.lora_sub_B.detach().numpy(), q32[:, :4])

    l64 = RecycleLoRALinear.from_linear(lin, RecycleLoRAConfig(6, 4, qr_dtype="float64"))
    np.testing.assert_array_equal(l64.lora_main_A.argmax(1).numpy(), piv64[-6:])
    x = torch.randn(5, 40)
    for adapted in (layer, l64):  # the output at initialisation is unchanged either way
        torch.testing.assert_close(adapted(x), lin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qr_dtype", ["float32", "float64"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_qr_runs_in_the_requested_dtype_on_one_blas_thread(monkeypatch, qr_dtype, weight_dtype):
    seen = []
    real_qr = scipy.linalg.qr

    def spy(a, *args, **kwargs):
        blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
        out = real_qr(a, *args, **kwargs)
        seen.append((a.dtype, blas, out[0].shape))
        return out

    monkeypatch.setattr(init.scipy.linalg, "qr", spy)
    w = make_linear(20, 12, False).weight.detach().to(weight_dtype)
    with threadpool_limits(2, user_api="blas"):  # whatever the caller allows
        main, sub = rrqr_factors(w, 3, 2, qr_dtype)
    assert [d for d, _, _ in seen] == [np.dtype(qr_dtype)]
    assert set(seen[0][1]) == {1} and QR_BLAS_THREADS == 1
    assert seen[0][2] == (20, 12)  # economic Q: no d x d matrix for a tall weight
    assert main[0].dtype == sub[0].dtype == torch.float64  # the factors' contract


def test_init_arithmetic_names_the_lapack_routine():
    assert init_arithmetic(RecycleLoRAConfig()) == {
        "init": "rrqr",
        "torch": str(torch.__version__),
        "qr_dtype": "float32",
        "qr_blas_threads": 1,
        "lapack_routine": "sgeqp3",
        "scipy": scipy.__version__,
    }
    assert init_arithmetic(RecycleLoRAConfig(qr_dtype="float64"))["lapack_routine"] == "dgeqp3"
    svd = init_arithmetic(RecycleLoRAConfig(init="svd"))
    assert svd == {"init": "svd", "torch": str(torch.__version__)}  # no QR ran


# ------------------------------------------------------------------------------ edge ranks


@pytest.mark.parametrize("kind", ["rrqr", "svd"])
@pytest.mark.parametrize(("shape", "main", "sub"), [((12, 8), 5, 3), ((8, 12), 8, 0)])
def test_full_rank_adapters(kind, shape, main, sub):
    """main_rank + sub_rank == min(d, k) is allowed; the residual is W0 - s Σ B0 A0 exactly."""
    lin = make_linear(*shape, True, seed=1)
    cfg = RecycleLoRAConfig(main, sub, init=kind)
    layer = RecycleLoRALinear.from_linear(lin, cfg)
    w0 = lin.weight.detach().double()
    delta = torch.zeros_like(w0)
    for _, b, a in layer.adapter_pairs(initial=True):
        delta += b.double() @ a.double()
    assert torch.equal(layer.weight, (w0 - cfg.scaling * delta).float())
    if kind == "svd":  # all singular triplets taken: nothing is left in the residual
        assert layer.weight.abs().max() < 1e-5
    else:  # all pivots, each once
        cols = torch.cat([a.argmax(1) for _, _, a in layer.adapter_pairs(initial=True)])
        assert sorted(cols.tolist()) == sorted(set(cols.tolist())) and len(cols) == min(shape)
    x = torch.randn(4, shape[1])
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)
    d, k = shape
    message = (
        rf"main_rank \+ sub_rank = {main + sub + 1} exceeds min\(out, in\) = {min(shape)} of a "
        rf"{d}x{k} layer.*exclude this layer from target_modules\.$"
    )
    with pytest.raises(ValueError, match=message):
        RecycleLoRALinear.from_linear(lin, RecycleLoRAConfig(main + 1, sub, init=kind))


@pytest.mark.parametrize(("main", "sub"), [(4, 0), (0, 3), (4, 3)])
def test_factor_contract_and_zero_ranks(main, sub):
    """(B0 (d, r), A0 (r, k)) in float64 on the CPU per adapter; None for a rank of 0."""
    w = make_linear(20, 12, False).weight.detach()
    g = torch.Generator().manual_seed(0)
    for factors in (
        rrqr_factors(w, main, sub),
        svd_factors(w, main, sub, 0.25),
        kaiming_factors(w, main, sub, g),
    ):
        for pair, r in zip(factors, (main, sub), strict=True):
            assert (pair is None) == (r == 0)
            if pair is not None:
                b, a = pair
                assert b.shape == (20, r) and a.shape == (r, 12)
                assert b.dtype == a.dtype == torch.float64
                assert b.device.type == a.device.type == "cpu"


def test_kaiming_draws_every_row_from_the_generator():
    w = torch.zeros(10, 22)
    main, sub = kaiming_factors(w, 4, 2, torch.Generator().manual_seed(3))
    # reference: nn.Linear's initialiser, main drawn first, sub next from the same generator
    g = torch.Generator().manual_seed(3)
    for r, (b, a) in ((4, main), (2, sub)):
        ref = torch.empty(r, 22, dtype=torch.float64)
        nn.init.kaiming_uniform_(ref, a=math.sqrt(5), generator=g)
        torch.testing.assert_close(a, ref, rtol=0, atol=1e-15)
        assert torch.equal(b, torch.zeros(10, r, dtype=torch.float64))
    assert len({tuple(row.tolist()) for row in main[1]}) == 4  # rows differ
    torch.manual_seed(123)  # the global generator plays no part
    again, _ = kaiming_factors(w, 4, 2, torch.Generator().manual_seed(3))
    assert torch.equal(again[1], main[1])
    other, _ = kaiming_factors(w, 4, 2, torch.Generator().manual_seed(4))
    assert not torch.equal(other[1], main[1])
