"""SoMA's own mmseg checkpoints: read and written against an independent reference of their
layout (separate q/k/v ``nn.Linear`` layers whose ``weight`` is the residual, adapters as
``lora_A`` / ``lora_B`` sub-Linears, minor singular triplets from a float64 numpy SVD), with
the EMA section mmengine writes, partial release files, and the load_model / export paths."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from recyclelora import load_model
from recyclelora.adapters import RecycleLoRAConfig, SoMAConfig, iter_adapted, save_adapters
from recyclelora.checkpoints import (
    MmsegCheckpointError,
    export_soma_checkpoint,
    inspect_checkpoint,
    load_mmseg_checkpoint,
    load_soma_checkpoint,
    save_checkpoint,
)
from recyclelora.checkpoints.soma_keys import ours_to_soma, soma_to_ours
from recyclelora.cli.export import main
from recyclelora.models import build_model
from recyclelora.recipes import to_dict

from .test_checkpoints_loader import CROP, outputs, tiny_recipe

RANK, ALPHA, FIRST = 2, 4.0, 1  # scaling 2: alpha and rank are told apart
CFG = SoMAConfig(rank=RANK, alpha=ALPHA, first_block=FIRST)
TARGETS = ("q", "k", "v", "proj", "fc1", "fc2")
CFG_TEXT = (
    "model = dict(backbone=dict(type='SoraModel', r = 2, lora_alpha=4, start_lora_idx=1, "
    "target_modules=['q', 'k', 'v', 'proj', 'fc1', 'fc2']))\n"
)


# ------------------------------------------------------------------------ the reference


class RefLoRALinear(nn.Linear):
    """SoMA's adapted layer: ``weight`` the frozen residual, adapters as sub-Linears."""

    def __init__(self, w0: torch.Tensor, b0: torch.Tensor, r: int, alpha: float):
        d, k = w0.shape
        super().__init__(k, d, dtype=torch.float64)
        self.lora_A = nn.Linear(k, r, bias=False, dtype=torch.float64)
        self.lora_B = nn.Linear(r, d, bias=False, dtype=torch.float64)
        self.scaling = alpha / r
        u, s, vh = np.linalg.svd(w0.double().numpy(), full_matrices=False)
        root = np.sqrt(s[-r:] / self.scaling)
        a, b = torch.from_numpy(root[:, None] * vh[-r:]), torch.from_numpy(u[:, -r:] * root)
        self.minor = self.scaling * b @ a  # what the adapter starts as
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
            self.weight.copy_(w0.double() - self.minor)
            self.bias.copy_(b0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x)) * self.scaling

    def merged(self) -> torch.Tensor:
        return self.weight + self.scaling * self.lora_B.weight @ self.lora_A.weight


def plain_linear(w: torch.Tensor, b: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return layer


def soma_reference(plain: nn.Module, r: int = RANK, alpha: float = ALPHA) -> nn.Module:
    """SoMA's segmentor from a plain one, float64: ``backbone.model`` (SoraModel) holding the
    DINOv2 with separate q, k, v; blocks >= FIRST adapted; adapters and biases "trained"."""
    backbone = copy.deepcopy(plain.backbone).double()
    for i, block in enumerate(backbone.blocks):
        qkv = block.attn.qkv
        del block.attn.qkv
        parts = zip("qkv", qkv.weight.detach().chunk(3), qkv.bias.detach().chunk(3), strict=True)
        for name, w, b in parts:
            adapt = i >= FIRST and name in TARGETS
            setattr(
                block.attn, name, RefLoRALinear(w, b, r, alpha) if adapt else plain_linear(w, b)
            )
        for parent, name in ((block.attn, "proj"), (block.mlp, "fc1"), (block.mlp, "fc2")):
            if i >= FIRST:
                old = getattr(parent, name)
                setattr(
                    parent, name, RefLoRALinear(old.weight.detach(), old.bias.detach(), r, alpha)
                )
    sora = nn.Module()
    sora.model = backbone
    ref = nn.Module()
    ref.backbone = sora
    ref.decode_head = copy.deepcopy(plain.decode_head).double()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".lora_" in name or name.endswith("bias") or name.startswith("decode_head."):
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            p.copy_(p.float().double())  # float32 values: the file is exact
    return ref


def merged_plain_state(ref: nn.Module, plain: nn.Module) -> dict[str, torch.Tensor]:
    """The reference folded into our plain layout (fused qkv), float64."""
    bb, ref_sd = ref.backbone.model, ref.state_dict()

    def weight(m: nn.Module) -> torch.Tensor:
        return m.merged() if isinstance(m, RefLoRALinear) else m.weight

    out = {}
    for key in plain.state_dict():
        name = key.removeprefix("backbone.")
        if key.startswith("backbone.") and ".attn.qkv." in name:
            prefix, leaf = name.split(".attn.qkv.")
            attn = bb.get_submodule(f"{prefix}.attn")
            get = weight if leaf == "weight" else (lambda m: m.bias)
            out[key] = torch.cat([get(getattr(attn, p)) for p in "qkv"]).detach()
        elif key.startswith("backbone.") and name.endswith(".weight"):
            module = bb.get_submodule(name.rsplit(".", 1)[0])
            out[key] = (
                weight(module).detach()
                if isinstance(module, RefLoRALinear)
                else (ref_sd[f"backbone.model.{name}"])
            )
        elif key.startswith("backbone."):
            out[key] = ref_sd[f"backbone.model.{name}"]
        else:
            out[key] = ref_sd[key]
    return out


def write_soma(path: Path, state: dict, ema: dict | None = None, cfg: str = CFG_TEXT) -> Path:
    """A file as SoMA's mmengine run writes it (float32)."""
    ckpt = {
        "meta": {"cfg": cfg, "iter": 40000},
        "state_dict": {k: v.float() for k, v in state.items()},
    }
    if ema is not None:
        ckpt["ema_state_dict"] = {f"module.{k}": v.float() for k, v in ema.items()}
        ckpt["ema_state_dict"]["steps"] = torch.tensor(28000)
    torch.save(ckpt, path)
    return path


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) or (a[k].isnan().all() and b[k].isnan().all()), k


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Base backbone file, plain model, reference, its merged plain state and SoMA files."""
    folder = tmp_path_factory.mktemp("soma")
    torch.manual_seed(0)
    plain = build_model("tiny", adapters=None, img_size=CROP).eval()
    base = folder / "dinov2_tiny_base.pth"
    torch.save(plain.backbone.state_dict(), base)
    ref = soma_reference(plain)
    raw = soma_reference(plain)  # the "training" weights: other trained values
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(0.125)
    merged = merged_plain_state(ref, plain)
    reference = build_model("tiny", adapters=None, img_size=CROP)
    reference.load_state_dict({k: v.float() for k, v in merged.items()})
    full = write_soma(folder / "soma_full.pth", ref.state_dict(), ema=raw.state_dict())
    return {
        "folder": folder,
        "base": base,
        "plain": plain,
        "ref": ref,
        "raw": raw,
        "reference_out": outputs(reference),
        "full": full,
    }


def fresh(cfg: SoMAConfig = CFG, **kw) -> nn.Module:
    return build_model("tiny", adapters=cfg, img_size=CROP, progress=False, **kw)


# ------------------------------------------------------------------------------ key map


def test_key_map_round_trip_and_reference_layout(world):
    ref_sd = {k: v.float() for k, v in world["ref"].state_dict().items()}
    ours = soma_to_ours(ref_sd)
    model = fresh(init_adapters=False)
    model_sd = model.state_dict()
    factors = {k for k in model_sd if k.endswith(("A0", "B0"))}
    assert set(ours.state) == set(model_sd) - factors
    assert all(ours.state[k].shape == model_sd[k].shape for k in ours.state)
    why = {new: how for _, new, how in ours.renamed}
    assert why["backbone.blocks.1.attn.qkv.weight"] == "q, k, v concatenated into qkv"
    assert torch.equal(
        ours.state["backbone.blocks.2.attn.qkv.lora_k_B"],
        ref_sd["backbone.model.blocks.2.attn.k.lora_B.weight"],
    )
    back = ours_to_soma(ours.state).state
    assert back.keys() == ref_sd.keys()
    assert all(torch.equal(back[k], ref_sd[k]) for k in ref_sd)


# ------------------------------------------------------------------------------ loading


def test_full_file_matches_the_reference_forward(world):
    model = fresh(init_adapters=False)
    report = load_soma_checkpoint(model, world["full"])
    assert report.ok and report.initial_factors == "unknown" and report.alpha == ALPHA
    assert "SoMA" in report.format and "evaluated" in report.format
    assert any("[ema_state_dict]" in k for k, _ in report.skipped)
    torch.testing.assert_close(outputs(model), world["reference_out"], rtol=0, atol=1e-5)
    # one adapted layer in float64 against the reference's own forward
    layer = copy.deepcopy(model.backbone.blocks[2].attn.qkv).double()
    attn = world["ref"].backbone.model.blocks[2].attn
    x = torch.randn(5, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = torch.cat([getattr(attn, p)(x) for p in "qkv"], dim=-1)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    assert not any(la.initial_factors_known for _, la in iter_adapted(model))
    with pytest.raises(ValueError, match="initial factors"):
        save_adapters(model, world["folder"] / "unknown.safetensors")


def test_training_weights_are_the_ema_sections(world, tmp_path):
    model = fresh(init_adapters=False)
    report = load_soma_checkpoint(model, world["full"], weights="training")
    assert report.ok and any("[state_dict]" in k for k, _ in report.skipped)
    raw = world["raw"].state_dict()
    sd = model.state_dict()
    for p, ours in (("q", "lora_q_A"), ("v", "lora_v_B")):
        leaf = "lora_A" if ours.endswith("A") else "lora_B"
        expected = raw[f"backbone.model.blocks.3.attn.{p}.{leaf}.weight"].float()
        assert torch.equal(sd[f"backbone.blocks.3.attn.qkv.{ours}"], expected)
    assert torch.equal(sd["decode_head.cls_embed.bias"], raw["decode_head.cls_embed.bias"].float())
    no_ema = write_soma(tmp_path / "no_ema.pth", world["ref"].state_dict())
    before = state_of(model)
    with pytest.raises(MmsegCheckpointError, match="no EMA section.*weights='evaluated'"):
        load_soma_checkpoint(model, no_ema, weights="training")
    assert_state_equal(before, state_of(model))


def _without(state: dict, *parts: str) -> dict:
    return {k: v for k, v in state.items() if not any(p in k for p in parts)}


ERRORS = {
    "rank": (lambda s: s, SoMAConfig(rank=4, alpha=4.0, first_block=FIRST), "SoMAConfig\\(rank=2"),
    "alpha": (lambda s: s, SoMAConfig(rank=2, alpha=2.0, first_block=FIRST), "alpha=4"),
    "q without k, v": (
        lambda s: _without(s, "blocks.2.attn.k.", "blocks.2.attn.v."),
        CFG,
        "blocks.2.attn.q.weight without k/v",
    ),
    "blocks": (lambda s: s, SoMAConfig(rank=2, alpha=4.0, first_block=2), "first_block=1"),
    "partial": (
        lambda s: _without(s, "attn.q.weight", "attn.k.weight", "attn.v.weight"),
        CFG,
        "partial SoMA file.*strict=False.*backbone_weights",
    ),
    "no adapters": (lambda s: s, None, "model has no adapters: build one with build_model"),
    "recyclelora": (lambda s: s, RecycleLoRAConfig(2, 1), "RecycleLoRA adapters"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_leave_the_model_unchanged_and_say_what_to_do(world, tmp_path, case):
    edit, cfg, message = ERRORS[case]
    path = write_soma(tmp_path / "bad.pth", edit(world["ref"].state_dict()))
    model = build_model("tiny", adapters=cfg, img_size=CROP, progress=False)
    before = state_of(model)
    with pytest.raises(MmsegCheckpointError, match=message):
        load_soma_checkpoint(model, path)
    assert_state_equal(before, state_of(model))


def test_partial_file_into_a_model_from_the_same_base(world, tmp_path):
    state = world["ref"].state_dict()
    kept = {
        k: v
        for k, v in state.items()
        if k == "backbone.model.mask_token"
        or k.startswith("decode_head.")
        or "lora" in k
        or k.endswith(".bias")
    }
    raw = {k: world["raw"].state_dict()[k] for k in kept}
    path = write_soma(tmp_path / "partial.pth", kept, ema=raw)
    model = fresh(backbone_weights=world["base"])
    report = load_soma_checkpoint(model, path, strict=False)
    assert report.missing and not report.unexpected and report.initial_factors == "kept"
    torch.testing.assert_close(outputs(model), world["reference_out"], rtol=0, atol=1e-5)
    assert all(la.initial_factors_known for _, la in iter_adapted(model))


def test_base_weights_rebuild_the_factors_and_catch_wrong_files(world, tmp_path):
    model = fresh(init_adapters=False)
    report = load_soma_checkpoint(model, world["full"], base_weights=world["base"])
    assert report.initial_factors == "reconstructed"
    layers = dict(iter_adapted(model))
    ref_fc1 = world["ref"].backbone.model.blocks[1].mlp.fc1
    ((_, b0, a0),) = layers["backbone.blocks.1.mlp.fc1"].adapter_pairs(initial=True)
    torch.testing.assert_close(
        CFG.scaling * b0.double() @ a0.double(), ref_fc1.minor, atol=1e-6, rtol=0
    )
    save_adapters(model, tmp_path / "adapters.safetensors")  # possible again

    torch.manual_seed(99)
    other = tmp_path / "other_base.pth"
    torch.save(build_model("tiny", adapters=None, img_size=CROP).backbone.state_dict(), other)
    merged = {}
    for k, v in world["ref"].state_dict().items():
        owner = _owner(world["ref"], k)
        merged[k] = v if owner is None else owner.merged().detach()
    merged_file = write_soma(tmp_path / "merged.pth", merged)
    for path, base in ((world["full"], other), (merged_file, world["base"])):
        victim = fresh()
        before = state_of(victim)
        with pytest.raises(MmsegCheckpointError, match="wrong base weights.*merged weights"):
            load_soma_checkpoint(victim, path, base_weights=base)
        assert_state_equal(before, state_of(victim))


def _owner(ref: nn.Module, key: str) -> nn.Module | None:
    """The RefLoRALinear whose residual ``key`` is, else None."""
    if not key.endswith(".weight") or ".lora_" in key:
        return None
    module = ref.get_submodule(key.rsplit(".", 1)[0])
    return module if isinstance(module, RefLoRALinear) else None


# ------------------------------------------------------------------------------ export


def test_export_round_trip_is_exact_in_somas_layout(world, tmp_path):
    model = fresh(init_adapters=False)
    load_soma_checkpoint(model, world["full"], base_weights=world["base"])
    out = export_soma_checkpoint(model, tmp_path / "ours.pth")
    ckpt = torch.load(out, weights_only=True)
    ref_sd = world["ref"].state_dict()
    assert ckpt["state_dict"].keys() == ref_sd.keys()
    assert all(ckpt["state_dict"][k].shape == ref_sd[k].shape for k in ref_sd)
    assert "r=2" in ckpt["meta"]["cfg"] and "start_lora_idx=1" in ckpt["meta"]["cfg"]
    again = fresh(init_adapters=False)
    report = load_soma_checkpoint(again, out)
    assert report.initial_factors == "stored"
    assert_state_equal(state_of(model), state_of(again))
    with pytest.raises(MmsegCheckpointError, match="load_soma_checkpoint"):
        load_mmseg_checkpoint(fresh(), out)


def test_load_model_and_the_exporter_take_soma_files(world, tmp_path, capsys):
    loaded = load_model(world["full"])
    assert loaded.kind == "soma" and loaded.iteration == 40000
    config = next(la for _, la in iter_adapted(loaded.model))
    assert (config.ranks["q"], config.alpha) == (RANK, ALPHA)
    names = {n for n, _ in iter_adapted(loaded.model)}
    assert "backbone.blocks.1.attn.qkv" in names and "backbone.blocks.0.attn.qkv" not in names
    torch.testing.assert_close(outputs(loaded.model), world["reference_out"], rtol=0, atol=1e-5)
    assert "SoMA adapters on 12 layers" in inspect_checkpoint(world["full"])
    out = tmp_path / "export"
    assert main(["--checkpoint", str(world["full"]), "--out", str(out), "--no-onnx"]) == 0
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == world["plain"].state_dict().keys()


def test_mmseg_export_of_a_soma_mmseg_file_keeps_its_ema_section(world, tmp_path):
    """SoMA's file in, SoMA's layout out: both sections come back tensor for tensor."""
    out = tmp_path / "again.pth"
    assert main(["--checkpoint", str(world["full"]), "--mmseg", str(out)]) == 0
    before = torch.load(world["full"], weights_only=True)
    after = torch.load(out, weights_only=True)
    for section in ("state_dict", "ema_state_dict"):
        assert after[section].keys() == before[section].keys(), section
        for k, v in before[section].items():
            assert torch.equal(after[section][k], v), (section, k)
    assert int(after["ema_state_dict"]["steps"]) == 28000


def test_mmseg_export_of_a_soma_training_checkpoint(world, tmp_path):
    recipe = replace(tiny_recipe(tmp_path), name="soma", adapters=CFG)
    model = fresh()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    source = {n: p.detach() + 0.5 for n, p in trainable.items()}
    state = {
        "iteration": 9,
        "model": model.state_dict(),  # the average
        "optimizer": {"state": {}, "param_groups": []},
        "rng": torch.get_rng_state(),
        "recipe": to_dict(recipe),
        "ema": {"steps": 4, "momentum": 0.25, "begin": 5, "source": source},
    }
    path = save_checkpoint(state, tmp_path / "checkpoints", 9)
    out = tmp_path / "soma_layout.pth"
    assert main(["--checkpoint", str(path), "--mmseg", str(out)]) == 0
    ckpt = torch.load(out, weights_only=True)
    expected_keys = soma_reference(world["plain"]).state_dict().keys()
    assert ckpt["state_dict"].keys() == expected_keys
    ema = ckpt["ema_state_dict"]
    assert ema.keys() == {f"module.{k}" for k in expected_keys} | {"steps"}
    assert int(ema["steps"]) == 4
    q_a = "backbone.model.blocks.1.attn.q.lora_A.weight"
    assert torch.equal(ema[f"module.{q_a}"], source["backbone.blocks.1.attn.qkv.lora_q_A"])
    assert torch.equal(ckpt["state_dict"][q_a], model.backbone.blocks[1].attn.qkv.lora_q_A)
    for weights, expected in (("evaluated", dict(trainable)), ("training", source)):
        back = fresh(init_adapters=False)
        load_soma_checkpoint(back, out, weights=weights)
        params = dict(back.named_parameters())
        assert all(torch.equal(params[n], expected[n]) for n in trainable), weights
    with torch.no_grad():
        assert torch.equal(outputs(load_model(out).model), outputs(model))
    merged = tmp_path / "merged.pth"
    assert main(["--checkpoint", str(path), "--mmseg", str(merged), "--merged"]) == 0
    keys = torch.load(merged, weights_only=True)["state_dict"].keys()
    assert keys == world["plain"].state_dict().keys()
