"""SoMA's adapter (docs/method.md §6.1): the minor-triplet init against a float64 numpy SVD, q/k/v
row blocks adapted independently, blocks 0-7 untouched, the parameter counts worked out by hand
from the layer shapes, and the shared machinery (merge to plain keys, save/load, parameter
groups)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from recyclelora.adapters import (
    RecycleLoRALinear,
    SoMAConfig,
    SoMALinear,
    apply_recyclelora,
    iter_adapted,
    load_adapters,
    merge_recyclelora,
    save_adapters,
)
from recyclelora.models import build_model
from recyclelora.param_groups import build_param_groups, rules_for


def spectrum_linear(d: int, k: int, seed: int, bias: bool = True) -> nn.Linear:
    """A float32 layer with well-separated singular values (so the minor triplets are well
    defined in float32) and its exact float64 weight."""
    rng = np.random.default_rng(seed)
    m = min(d, k)
    u, _ = np.linalg.qr(rng.standard_normal((d, m)))
    v, _ = np.linalg.qr(rng.standard_normal((k, m)))
    s = np.linspace(3.0, 0.2, m)
    lin = nn.Linear(k, d, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy((u * s) @ v.T))
        if bias:
            lin.bias.normal_(generator=torch.Generator().manual_seed(seed))
    return lin


def reference_factors(w: torch.Tensor, rank: int, scaling: float):
    """(B, A, s B A) of the ``rank`` minor singular triplets, float64 numpy SVD."""
    u, s, vt = np.linalg.svd(w.double().numpy(), full_matrices=False)
    root = np.sqrt(s[-rank:] / scaling)
    b, a = u[:, -rank:] * root, root[:, None] * vt[-rank:]
    return b, a, scaling * b @ a


def assert_factors_match(b: torch.Tensor, a: torch.Tensor, ref_b, ref_a) -> None:
    """Equal up to the sign of each singular pair (an SVD fixes only that much)."""
    b, a = b.detach().double().numpy(), a.detach().double().numpy()
    signs = np.sign(np.sum(b * ref_b, axis=0))
    assert np.all(signs != 0)
    np.testing.assert_allclose(b * signs, ref_b, atol=2e-5)
    np.testing.assert_allclose(a * signs[:, None], ref_a, atol=2e-5)


@pytest.mark.parametrize(("d", "k"), [(24, 16), (16, 40)])
def test_init_is_the_minor_triplets_of_a_float64_svd(d, k):
    lin = spectrum_linear(d, k, seed=d + k)
    config = SoMAConfig(rank=4, alpha=8.0)  # scaling 2: sqrt(S / s) differs from sqrt(S)
    layer = SoMALinear.from_linear(lin, config)
    assert layer.scaling == 2.0 and set(layer.ranks) == {"main"}
    ref_b, ref_a, ref_delta = reference_factors(lin.weight.detach(), 4, 2.0)
    assert_factors_match(layer.lora_main_B, layer.lora_main_A, ref_b, ref_a)
    assert_factors_match(layer.lora_main_B0, layer.lora_main_A0, ref_b, ref_a)
    # the frozen residual is W0 without its minor component
    w0 = lin.weight.detach().double().numpy()
    np.testing.assert_allclose(layer.weight.detach().double().numpy(), w0 - ref_delta, atol=1e-5)
    # the singular values of the removed component are the smallest ones
    removed = np.linalg.svd(w0 - layer.weight.detach().double().numpy(), compute_uv=False)[:4]
    np.testing.assert_allclose(removed, np.linspace(3.0, 0.2, min(d, k))[-4:], atol=1e-5)


def test_output_unchanged_at_init_and_only_adapters_and_bias_train():
    lin = spectrum_linear(24, 16, seed=1)
    layer = SoMALinear.from_linear(lin, SoMAConfig(rank=4, alpha=4.0))
    x = torch.randn(5, 16, dtype=torch.float64)
    expected = x @ lin.weight.double().T + lin.bias.double()
    got = layer(x.float()).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    model = nn.Sequential()
    model.add_module("blocks", nn.ModuleList([nn.Sequential()]))
    model.blocks[0].add_module("qkv", spectrum_linear(12, 8, seed=2))
    report = apply_recyclelora(model, SoMAConfig(rank=2, alpha=2.0, first_block=0))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "blocks.0.qkv.bias",
        *[f"blocks.0.qkv.lora_{a}_{p}" for a in "kqv" for p in "AB"],
    ]
    assert (report.adapter_params, report.bias_params) == (3 * 2 * (4 + 8), 12)


def test_qkv_blocks_are_adapted_independently():
    d, k, r = 8, 8, 3
    lin = spectrum_linear(3 * d, k, seed=3)
    rng = np.random.default_rng(4)
    with torch.no_grad():  # give each row block its own, well-separated spectrum
        for i in range(3):
            u, _ = np.linalg.qr(rng.standard_normal((d, d)))
            v, _ = np.linalg.qr(rng.standard_normal((k, d)))
            lin.weight[i * d : (i + 1) * d] = torch.from_numpy(
                (u * np.linspace(4, 0.1 + i, d)) @ v.T
            )
    layer = SoMALinear.from_linear(
        lin, SoMAConfig(rank=r, alpha=float(r)), name="blocks.9.attn.qkv"
    )
    assert layer.ranks == {"q": r, "k": r, "v": r} and layer.split == 3
    w = lin.weight.detach()
    fused_delta = reference_factors(w, r, 1.0)[2]
    delta = layer.delta_weight().detach().numpy()
    for i, name in enumerate("qkv"):
        rows = slice(i * d, (i + 1) * d)
        ref_b, ref_a, ref_delta = reference_factors(w[rows], r, 1.0)
        b, a = getattr(layer, f"lora_{name}_B"), getattr(layer, f"lora_{name}_A")
        assert b.shape == (d, r) and a.shape == (r, k)
        assert_factors_match(b, a, ref_b, ref_a)
        np.testing.assert_allclose(delta[rows], ref_delta, atol=1e-5)  # only its own rows
        assert np.abs(delta[rows] - fused_delta[rows]).max() > 0.1  # not the fused SVD's
    # gradients: a loss on the k outputs reaches the k adapter only
    x = torch.randn(4, k)
    layer(x)[:, d : 2 * d].sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if n.startswith("lora_")}
    for name, g in grads.items():
        assert (g is not None and bool(g.abs().sum() > 0)) == name.startswith("lora_k_"), name
    # merged: the plain fused weight, its three blocks each W_res + s B A of its own block
    merged = layer.merged().double()
    for i, name in enumerate("qkv"):
        rows = slice(i * d, (i + 1) * d)
        b, a = getattr(layer, f"lora_{name}_B"), getattr(layer, f"lora_{name}_A")
        expected = layer.weight[rows].double() + b.double() @ a.double()
        torch.testing.assert_close(merged[rows], expected.float().double())


def test_blocks_0_to_7_carry_no_adapter_and_the_counts_follow_from_the_shapes():
    """DINOv2-L on the meta device; the counts are worked out from the plain model's shapes."""
    model = build_model("dinov2_large_mask2former", adapters=SoMAConfig(), device="meta")
    plain = build_model("dinov2_large_mask2former", adapters=None, device="meta")
    adapted = dict(iter_adapted(model.backbone))
    expected = {
        f"blocks.{i}.{m}"
        for i in range(8, 24)
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert set(adapted) == expected
    for i in range(8):
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert type(model.backbone.get_submodule(f"blocks.{i}.{m}")) is nn.Linear
    r, adapters, biases = 16, 0, 0
    for name in expected:
        lin = plain.backbone.get_submodule(name)
        out, inp = lin.weight.shape
        blocks = 3 if name.endswith("qkv") else 1  # q, k, v: three (out/3) x in matrices
        adapters += blocks * r * (out // blocks + inp)
        biases += out
    assert (adapters, biases) == (4_718_592, 147_456)  # the numbers of SoMA's recipe
    trainable = {n: p.numel() for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert sum(v for n, v in trainable.items() if ".lora_" in n) == adapters
    assert sum(v for n, v in trainable.items() if n.endswith(".bias")) == biases
    assert all(".lora_" in n or n.endswith(".bias") for n in trainable)


def test_dry_run_reports_the_counts(capsys):
    from recyclelora.cli.train import main

    assert main(["soma", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trainable adapter parameters 4,718,592 (4.72M) plus 147,456 biases" in out
    assert main(["soma_real2real", "--dry-run"]) == 0
    assert "4,718,592 (4.72M) plus 147,456 biases" in capsys.readouterr().out


def trained_soma_tiny() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("tiny", adapters=SoMAConfig(rank=4, alpha=4.0, first_block=1), img_size=64)
    with torch.no_grad():  # as after training: adapters and biases moved, LayerScale visible
        for name, p in model.backbone.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
            if name.endswith(".gamma"):
                p.fill_(0.5)
    return model.eval()


def test_merge_gives_the_plain_models_keys_and_the_adapted_output():
    model = trained_soma_tiny()
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        adapted = model(x)
        merge_recyclelora(model.backbone)
        merged = model(x)
    plain = build_model("tiny", adapters=None, img_size=64).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in plain.items()
    }
    assert not list(iter_adapted(model))
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_save_and_load_adapters_restores_the_trained_biases_exactly(tmp_path):
    model = trained_soma_tiny()
    path = save_adapters(model.backbone, tmp_path / "soma.safetensors")
    torch.manual_seed(0)
    fresh = build_model("tiny", adapters=None, img_size=64)  # the same base weights
    with torch.no_grad():
        for name, p in fresh.backbone.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(0.5)
    config = load_adapters(fresh.backbone, path)
    assert config == SoMAConfig(rank=4, alpha=4.0, first_block=1)
    fresh.decode_head.load_state_dict(model.decode_head.state_dict())
    fresh.eval()
    for name, layer in iter_adapted(fresh.backbone):
        assert isinstance(layer, SoMALinear) and layer.bias.requires_grad, name
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert fresh.backbone.state_dict().keys() == model.backbone.state_dict().keys()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(fresh.backbone.state_dict()[k], v), k


def test_parameter_groups_follow_somas_rules():
    model = trained_soma_tiny()
    groups = build_param_groups(model, lr=1e-4, weight_decay=0.05, rules=rules_for("soma"))
    by_param = {id(p): g for g in groups for p in g["params"]}
    expect = {
        "backbone.blocks.1.attn.qkv.lora_q_A": (5e-5, 0.05),
        "backbone.blocks.2.mlp.fc1.bias": (5e-5, 0.05),
        "decode_head.query_embed.weight": (1e-4, 0.0),
        "decode_head.query_feat.weight": (1e-4, 0.0),
        "decode_head.level_embed.weight": (1e-4, 0.0),
        "decode_head.transformer_decoder.post_norm.weight": (1e-4, 0.0),
        "decode_head.pixel_decoder.input_convs.0.gn.weight": (1e-4, 0.0),
        "decode_head.cls_embed.weight": (1e-4, 0.05),
    }
    params = dict(model.named_parameters())
    for name, (lr, wd) in expect.items():
        g = by_param[id(params[name])]
        assert (g["lr"], g["weight_decay"]) == pytest.approx((lr, wd)), name
    # RecycleLoRA's table gives its adapters lr x 1.0 without decay: the kinds differ
    assert rules_for("recyclelora")["lora_main_A"].decay_mult == 0.0
    assert not any(isinstance(m, RecycleLoRALinear) for m in model.modules())
