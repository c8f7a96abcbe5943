"""apply / merge / unmerge / save / load / parameter groups on whole models."""

import json

import pytest
import torch
from torch import nn

from recyclelora import (
    RecycleLoRAConfig,
    RecycleLoRALinear,
    apply_recyclelora,
    build_param_groups,
    iter_adapted,
    load_adapters,
    merge_recyclelora,
    save_adapters,
    unmerge_recyclelora,
)
from recyclelora.adapters.init import init_arithmetic
from recyclelora.adapters.io import read_adapter_file

from .tiny_transformer import TinyTransformer

CFG = RecycleLoRAConfig(main_rank=8, sub_rank=2)


def trained_model(steps: int = 5, cfg: RecycleLoRAConfig = CFG) -> tuple[nn.Module, nn.Module]:
    """(base, adapted copy after a few AdamW steps): adapters far from their initial values."""
    torch.manual_seed(0)
    base = TinyTransformer()
    model = TinyTransformer()
    model.load_state_dict(base.state_dict())
    apply_recyclelora(model.blocks, cfg, progress=False)
    opt = torch.optim.AdamW(build_param_groups(model, lr=1e-2, weight_decay=0.05))
    x, y = torch.randn(4, 6, 48), torch.randint(0, 5, (4, 6))
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return base, model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_apply_reports_and_preserves_output():
    torch.manual_seed(0)
    model = TinyTransformer()
    x = torch.randn(2, 6, 48)
    y0 = model(x)
    report = apply_recyclelora(model.blocks, CFG, progress=False)
    assert len(report.layers) == 8  # 2 blocks x qkv, proj, fc1, fc2
    assert {n.rsplit(".", 1)[1] for n, _ in report.layers} == {"qkv", "proj", "fc1", "fc2"}
    # (r_main + r_sub) * (d + k) per layer, computed from the shapes
    expected = sum(10 * (d + k) for _, (d, k) in report.layers)
    assert report.adapter_params == expected
    assert "adapted 8 linear layers" in str(report)
    assert rel_err(model(x), y0) < 1e-6


def test_no_matching_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="target_modules"):
        apply_recyclelora(nn.Sequential(nn.Linear(4, 4)), CFG)


def test_gradients_reach_only_adapters_and_groups_carry_multipliers():
    torch.manual_seed(0)
    model = TinyTransformer()
    apply_recyclelora(model.blocks, CFG, progress=False)
    model(torch.randn(2, 6, 48)).sum().backward()
    for name, p in model.blocks.named_parameters():
        is_adapter = name.rsplit(".", 1)[1] in {
            f"lora_{a}_{b}" for a in ("main", "sub") for b in "AB"
        }
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None) == is_adapter, name
    # the head outside the adapted part keeps training
    assert model.head.weight.grad is not None and model.norm.weight.grad is not None

    groups = {g["name"]: g for g in build_param_groups(model, lr=1e-4, weight_decay=0.05)}
    adapter_keys = {"lora_main_A", "lora_main_B", "lora_sub_A", "lora_sub_B"}
    assert set(groups) == adapter_keys | {"norm", "default"}
    for key in adapter_keys:
        lr = 1e-4 if "main" in key else 5e-5
        assert groups[key]["lr"] == pytest.approx(lr) and groups[key]["weight_decay"] == 0
        assert len(groups[key]["params"]) == 8  # 2 blocks x 4 layers
    assert groups["norm"]["weight_decay"] == 0.0
    assert groups["default"]["weight_decay"] == pytest.approx(0.05)
    assert groups["default"]["lr"] == pytest.approx(1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups["default"]["params"]} == {"head.weight", "head.bias"}
    assert all(p.requires_grad for g in groups.values() for p in g["params"])


def test_authors_key_order_and_norm_layers():
    """mmengine's custom_keys order: longest first, ties alphabetical; unmatched norms no decay."""
    from recyclelora.param_groups import RECIPE_RULES, Rule, rule_for

    rules = {"norm": Rule(decay_mult=0.0), "decode_head.norm": Rule(lr_mult=3.0)}
    assert rule_for("decode_head.norm.weight", rules) == ("decode_head.norm", Rule(lr_mult=3.0))
    assert rule_for("backbone.norm.weight", rules) == ("norm", Rule(decay_mult=0.0))
    assert rule_for("backbone.fc.weight", rules)[0] is None
    tie = {"lora_sub": Rule(lr_mult=0.5), "backbone": Rule(lr_mult=0.1)}
    assert rule_for("backbone.blocks.0.attn.qkv.lora_sub_A", tie)[0] == "backbone"
    # our adapter keys are longer than "backbone": adapters inside a backbone keep their rules
    assert rule_for("backbone.blocks.0.mlp.fc2.lora_sub_B", RECIPE_RULES)[0] == "lora_sub_B"
    assert rule_for("backbone.blocks.0.mlp.fc2.lora_main_A", RECIPE_RULES)[0] == "lora_main_A"

    head = nn.Sequential(nn.Conv2d(4, 8, 1), nn.GroupNorm(2, 8), nn.Linear(8, 3))
    groups = {g["name"]: g for g in build_param_groups(head, lr=1e-4, weight_decay=0.05)}
    assert set(groups) == {"norm layers", "default"}
    assert (
        groups["norm layers"]["weight_decay"] == 0.0 and len(groups["norm layers"]["params"]) == 2
    )
    assert len(groups["default"]["params"]) == 4


def test_merge_gives_plain_linears_with_same_output_and_base_keys():
    base, model = trained_model()
    x = torch.randn(3, 6, 48)
    y_adapted = model(x)
    assert rel_err(y_adapted, base(x)) > 1e-3  # training moved it
    merge_recyclelora(model)
    assert not list(iter_adapted(model))
    assert all(type(m) is not RecycleLoRALinear for m in model.modules())
    sd, base_sd = model.state_dict(), base.state_dict()
    assert list(sd) == list(base_sd)
    assert all(sd[k].shape == base_sd[k].shape for k in sd)
    assert not any("lora" in k for k in sd)
    assert rel_err(model(x), y_adapted) < 1e-5


def test_merge_matches_float64_formula():
    _, model = trained_model()
    layer = model.blocks[0].mlp.fc2
    expected = layer.weight.double() + layer.scaling * (
        layer.lora_main_B.double() @ layer.lora_main_A.double()
        + layer.lora_sub_B.double() @ layer.lora_sub_A.double()
    )
    torch.testing.assert_close(layer.to_linear().weight.double(), expected, rtol=0, atol=1e-6)


def test_unmerge_restores_training_state_exactly():
    _, model = trained_model()
    x = torch.randn(3, 6, 48)
    y = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merge_recyclelora(model, unload=False)
    assert all(layer.is_merged for _, layer in iter_adapted(model))
    assert rel_err(model(x), y) < 1e-5
    unmerge_recyclelora(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(x), y)
    model(x).sum().backward()  # trains again
    assert model.blocks[0].attn.qkv.lora_main_A.grad is not None


@pytest.mark.parametrize(
    "cfg", [CFG, RecycleLoRAConfig(8, 0), RecycleLoRAConfig(4, 2, init="svd")], ids=str
)
def test_save_load_round_trip_bit_exact(tmp_path, cfg):
    base, model = trained_model(cfg=cfg)
    path = save_adapters(model.blocks, tmp_path / "adapters.safetensors", metadata={"note": "t"})
    fresh = TinyTransformer()
    fresh.load_state_dict(base.state_dict())
    loaded_cfg = load_adapters(fresh.blocks, path)
    assert loaded_cfg == cfg
    # the header says how the initial factors were computed (QR dtype, BLAS threads, LAPACK)
    arithmetic = json.loads(read_adapter_file(path)[0]["arithmetic"])
    assert arithmetic == init_arithmetic(cfg)
    assert arithmetic.get("qr_dtype") == ("float32" if cfg.init == "rrqr" else None)
    sd, sd2 = model.blocks.state_dict(), fresh.blocks.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    # the head trained outside the adapted part: an adapter file does not carry it
    fresh.head.load_state_dict(model.head.state_dict())
    fresh.norm.load_state_dict(model.norm.state_dict())
    x = torch.randn(2, 6, 48)
    assert torch.equal(fresh(x), model(x))
    # small: only adapters and initial factors, no residual weights
    n_base = sum(p.numel() for p in base.blocks.parameters())
    assert path.stat().st_size < 4 * n_base / 2


def test_adapter_file_errors(tmp_path):
    _, model = trained_model(steps=1)
    path = save_adapters(model.blocks, tmp_path / "a.safetensors")
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated"):
        load_adapters(TinyTransformer().blocks, truncated)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapters(TinyTransformer().blocks, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="144x48 in the adapter file but 96x32"):
        load_adapters(TinyTransformer(dim=32).blocks, path)


DINOV2_L_LAYERS = {"attn.qkv": (3072, 1024), "attn.proj": (1024, 1024), "mlp.fc1": (4096, 1024)}
DINOV2_L_LAYERS["mlp.fc2"] = (1024, 4096)


@pytest.mark.parametrize(
    ("main", "sub", "table9"), [(32, 4, 14.16), (32, 2, 13.37), (16, 2, 7.08), (32, 0, 12.58)]
)
def test_dinov2_large_adapter_count_on_meta(main, sub, table9):
    """Table 9 "Params." column: (r_main + r_sub) x 393,216 over 24 blocks x 4 layers."""
    with torch.device("meta"):
        blocks = nn.ModuleList()
        for _ in range(24):
            blk = nn.Module()
            blk.attn, blk.mlp = nn.Module(), nn.Module()
            for name, (d, k) in DINOV2_L_LAYERS.items():
                parent, child = name.split(".")
                setattr(getattr(blk, parent), child, nn.Linear(k, d))
            blocks.append(blk)
    report = apply_recyclelora(blocks, RecycleLoRAConfig(main, sub), progress=False)
    assert len(report.layers) == 96
    assert report.adapter_params == (main + sub) * 393_216
    assert round(report.adapter_params / 1e6, 2) == table9
    assert all(p.is_meta for p in blocks.parameters())


def test_adapter_demo_runs(tmp_path, capsys):
    from recyclelora.demo import main

    main(["--steps", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "outputs bit-identical: True" in out
    assert "state_dict keys and shapes equal to the base model's: True" in out
    assert (tmp_path / "adapters.safetensors").is_file()
