"""DINOv2 backbone and weight loading, checked against independent float64 references.

The references below use only explicit formulas: the Keys cubic kernel (a = -0.75, half-pixel
centres, border clamping) and the linear kernel as interpolation matrices, LayerNorm, softmax
attention, erf-GELU and LayerScale written out with tensor ops. The two position-embedding rules
differ only in the sampling step of the kernel: N / g ("size") or N / (g + 0.1) ("authors", the
scale factor of Meta's DINOv2 code, which PyTorch's kernel inverts).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from recyclelora.models.dinov2 import (
    OUT_FRACTIONS_QUARTERS,
    DinoVisionTransformer,
    dinov2_tiny,
    dinov2_vitb,
    dinov2_vitg,
    dinov2_vitl,
    dinov2_vits,
    proportional_out_indices,
)
from recyclelora.models.dinov2_weights import (
    DinoV2CheckpointError,
    load_dinov2_weights,
    resize_patch_embed,
    resize_pos_embed,
)

# Tiny checkpoint geometry: "released" at patch 14 on a 5x5 grid, loaded at patch 16 on 4x4.
DIM, DEPTH, HEADS, SRC_PATCH, SRC_GRID = 64, 4, 4, 14, 5
PATCH, IMG = 16, 64
GRID = IMG // PATCH


# ---------------------------------------------------------------------------------------------
# Independent references.


def keys_cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def bicubic_matrix(n_in: int, n_out: int, scale: float | None = None) -> np.ndarray:
    """(n_out, n_in): half-pixel centres, 4 taps, out-of-range taps clamped to the border."""
    scale = n_in / n_out if scale is None else scale
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        f = math.floor(src)
        for j in range(-1, 3):
            m[i, min(max(f + j, 0), n_in - 1)] += keys_cubic(src - (f + j))
    return m


def bilinear_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in): half-pixel centres, negative source coordinates clamped to 0."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = math.floor(src)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[i, i0] += 1 - lam
        m[i, i1] += lam
    return m


def resize2d(x: torch.Tensor, mh: np.ndarray, mw: np.ndarray) -> torch.Tensor:
    """x: (..., H, W) float64 -> (..., h, w) = mh @ x @ mw^T."""
    th = torch.from_numpy(mh)
    tw = torch.from_numpy(mw)
    return th @ x @ tw.T


def ref_resize_pos(
    pos: torch.Tensor, src: tuple[int, int], dst: tuple[int, int], rule: str = "size"
) -> torch.Tensor:
    """pos: (1, 1 + src_h*src_w, D) -> (1, 1 + dst_h*dst_w, D), bicubic.

    ``rule="size"`` samples the source every n_in / n_out; ``"authors"`` every n_in / (n_out + 0.1).
    """
    d = pos.shape[-1]
    grid = pos[0, 1:].reshape(src[0], src[1], d).permute(2, 0, 1)
    mh, mw = (
        bicubic_matrix(n_in, n_out, None if rule == "size" else n_in / (n_out + 0.1))
        for n_in, n_out in zip(src, dst, strict=True)
    )
    grid = resize2d(grid, mh, mw)
    return torch.cat((pos[:, :1], grid.permute(1, 2, 0).reshape(1, -1, d)), dim=1)


def ref_layernorm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_forward(
    sd: dict[str, torch.Tensor], x: torch.Tensor, out_indices=(0, 1, 2, 3), rule: str = "authors"
):
    """Float64 forward of a *released-geometry* (patch 14, 5x5) state dict run at patch 16.

    Converts the kernel and grid itself (bicubic matrices, by size, as the checkpoint loader
    does), then the runtime grid, if it differs, by ``rule``.
    """
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    b, c, h, w = x.shape
    gh, gw = h // PATCH, w // PATCH
    kernel = resize2d(
        sd["patch_embed.proj.weight"],
        bicubic_matrix(SRC_PATCH, PATCH),
        bicubic_matrix(SRC_PATCH, PATCH),
    )
    patches = x.reshape(b, c, gh, PATCH, gw, PATCH).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, gh * gw, c * PATCH * PATCH)
    tok = patches @ kernel.reshape(DIM, -1).T + sd["patch_embed.proj.bias"]
    pos = ref_resize_pos(sd["pos_embed"], (SRC_GRID, SRC_GRID), (GRID, GRID))
    if (gh, gw) != (GRID, GRID):
        pos = ref_resize_pos(pos, (GRID, GRID), (gh, gw), rule)
    tok = torch.cat((sd["cls_token"].expand(b, 1, DIM), tok), dim=1) + pos
    hd = DIM // HEADS
    outs = []
    for i in range(DEPTH):
        p = f"blocks.{i}."
        y = ref_layernorm(tok, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        qkv = y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        q, k, v = (t.reshape(b, -1, HEADS, hd).transpose(1, 2) for t in qkv.split(DIM, dim=-1))
        s = q @ k.transpose(-1, -2) / math.sqrt(hd)
        e = torch.exp(s - s.max(-1, keepdim=True).values)
        a = (e / e.sum(-1, keepdim=True)) @ v
        a = a.transpose(1, 2).reshape(b, -1, DIM)
        a = a @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        tok = tok + sd[p + "ls1.gamma"] * a
        y = ref_layernorm(tok, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        y = y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        y = y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        tok = tok + sd[p + "ls2.gamma"] * y
        if i in out_indices:  # patch tokens, no final norm
            outs.append(tok[:, 1:].transpose(1, 2).reshape(b, DIM, gh, gw))
    feats = []
    for f, s in zip(outs, (4.0, 2.0, 1.0, 0.5), strict=True):
        if s != 1.0:
            oh, ow = math.floor(f.shape[-2] * s), math.floor(f.shape[-1] * s)
            f = resize2d(
                f, bilinear_matrix(f.shape[-2], oh, 1 / s), bilinear_matrix(f.shape[-1], ow, 1 / s)
            )
        feats.append(f)
    return feats


def meta_keys(depth: int) -> set[str]:
    """The key set of Meta's released checkpoints (MLP FFN), written out by hand."""
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight"}
    keys |= {"patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(depth):
        for name in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{name}.weight", f"blocks.{i}.{name}.bias"}
        keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    return keys


def random_meta_state(seed: int = 0, dim: int = DIM) -> dict[str, torch.Tensor]:
    """Random float32 weights in Meta's layout, patch 14, 5x5 grid, O(1) activations."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def ru(*shape, lo=0.5, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    sd = {
        "cls_token": rn(1, 1, dim, std=0.5),
        "mask_token": rn(1, dim, std=0.5),
        "pos_embed": rn(1, 1 + SRC_GRID * SRC_GRID, dim, std=0.5),
        "patch_embed.proj.weight": rn(dim, 3, SRC_PATCH, SRC_PATCH, std=1 / math.sqrt(3 * 196)),
        "patch_embed.proj.bias": rn(dim, std=0.1),
        "norm.weight": 1 + rn(dim, std=0.1),
        "norm.bias": rn(dim, std=0.1),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[p + n + ".weight"] = 1 + rn(dim, std=0.1)
            sd[p + n + ".bias"] = rn(dim, std=0.1)
        for n, (o, k) in {
            "attn.qkv": (3 * dim, dim),
            "attn.proj": (dim, dim),
            "mlp.fc1": (4 * dim, dim),
            "mlp.fc2": (dim, 4 * dim),
        }.items():
            sd[p + n + ".weight"] = rn(o, k, std=1 / math.sqrt(k))
            sd[p + n + ".bias"] = rn(o, std=0.1)
        sd[p + "ls1.gamma"] = ru(dim)
        sd[p + "ls2.gamma"] = ru(dim)
    return sd


def to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta -> Hugging Face Dinov2Model names (transformers' convert_dinov2_to_hf.py)."""
    hf = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    for i in range(DEPTH):
        p, q = f"blocks.{i}.", f"encoder.layer.{i}."
        for t in ("weight", "bias"):
            for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1")):
                hf[f"{q}{b}.{t}"] = sd[f"{p}{a}.{t}"]
            hf[f"{q}mlp.fc2.{t}"] = sd[f"{p}mlp.fc2.{t}"]
            hf[f"{q}attention.output.dense.{t}"] = sd[f"{p}attn.proj.{t}"]
            for j, n in enumerate(("query", "key", "value")):
                hf[f"{q}attention.attention.{n}.{t}"] = sd[f"{p}attn.qkv.{t}"][
                    j * DIM : (j + 1) * DIM
                ]
        hf[f"{q}layer_scale1.lambda1"] = sd[f"{p}ls1.gamma"]
        hf[f"{q}layer_scale2.lambda1"] = sd[f"{p}ls2.gamma"]
    return {k: v.clone().contiguous() for k, v in hf.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_meta_state()


@pytest.fixture
def meta_pth(tmp_path, state):
    path = tmp_path / "dinov2_tiny14_pretrain.pth"
    torch.save(state, path)
    return path


@pytest.fixture
def hf_safetensors(tmp_path, state):
    path = tmp_path / "model.safetensors"
    save_file(to_hf(state), str(path))
    return path


def tiny16() -> DinoVisionTransformer:
    return dinov2_tiny(img_size=IMG, patch_size=PATCH)


# ---------------------------------------------------------------------------------------------
# Architecture.


def test_parameter_counts_on_meta_device():
    with torch.device("meta"):
        paper = dinov2_vitl(img_size=512, patch_size=16)
        released = dinov2_vitl(img_size=518, patch_size=14)
    assert all(p.is_meta for p in paper.parameters())
    assert sum(p.numel() for p in paper.parameters()) == 304_199_680
    assert sum(p.numel() for p in released.parameters()) == 304_368_640
    assert released.pos_embed.shape == (1, 1 + 37 * 37, 1024)
    assert set(released.state_dict()) == meta_keys(24)


def test_presets_and_out_indices():
    with torch.device("meta"):
        models = {
            "s": dinov2_vits(),
            "b": dinov2_vitb(),
            "l": dinov2_vitl(),
            "g": dinov2_vitg(img_size=518, patch_size=14),
        }
    assert [(m.embed_dim, m.depth, m.num_heads) for m in models.values()] == [
        (384, 12, 6),
        (768, 12, 12),
        (1024, 24, 16),
        (1536, 40, 24),
    ]
    assert models["s"].out_indices == models["b"].out_indices == (3, 5, 7, 11)
    assert models["l"].out_indices == (7, 11, 15, 23)
    assert models["g"].out_indices == (9, 19, 29, 39)
    assert models["l"].feature_strides == (4.0, 8.0, 16.0, 32.0)
    # Released ViT-g/14: fused SwiGLU, hidden width 4096.
    g_block = models["g"].blocks[0]
    assert g_block.mlp.w12.weight.shape == (8192, 1536)
    assert g_block.mlp.w3.weight.shape == (1536, 4096)
    assert proportional_out_indices(4) == (0, 1, 2, 3)
    assert proportional_out_indices(40, OUT_FRACTIONS_QUARTERS) == (9, 19, 29, 39)
    with pytest.raises(ValueError, match="distinct"):
        proportional_out_indices(3)  # indices collide below depth 4


def test_tiny_builds_runs_and_shapes():
    model = dinov2_tiny(img_size=IMG)
    assert model.out_indices == (0, 1, 2, 3) and model.embed_dim == DIM
    assert set(model.state_dict()) == meta_keys(DEPTH)
    feats = model(torch.randn(2, 3, IMG, IMG))
    assert [tuple(f.shape) for f in feats] == [(2, DIM, 16, 16), (2, DIM, 8, 8), (2, DIM, 4, 4)] + [
        (2, DIM, 2, 2)
    ]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 50, 64))


@pytest.mark.parametrize("rule", ["authors", "size"])
def test_stored_grid_is_not_interpolated(rule):
    model = dinov2_tiny(img_size=IMG, patch_size=PATCH, pos_embed_resize=rule)
    assert model.interpolate_pos_embed(GRID, GRID) is model.pos_embed
    assert model.interpolate_pos_embed(3, 5).shape == (1, 1 + 15, DIM)
    with torch.device("meta"):  # the paper's geometry: 512 crops at patch 16 keep the 32x32 grid
        large = dinov2_vitl(img_size=512, patch_size=16)
    assert large.pos_embed_resize == "authors"
    assert large.interpolate_pos_embed(32, 32) is large.pos_embed


# (grid_h, grid_w) of the runtime token grid: larger, smaller, one axis unchanged, non-square.
RUNTIME_GRIDS = [(6, 6), (3, 3), (GRID, 7), (5, 2)]


@pytest.mark.parametrize("grid", RUNTIME_GRIDS)
def test_pos_embed_resize_rules_match_their_formulas(grid):
    """Each rule against its explicit bicubic matrices in float64; the two rules disagree."""
    got = {}
    for rule in ("authors", "size"):
        model = dinov2_tiny(img_size=IMG, patch_size=PATCH, pos_embed_resize=rule).double()
        pos = model.pos_embed.detach().clone()
        got[rule] = model.interpolate_pos_embed(*grid).detach()
        ref = ref_resize_pos(pos, (GRID, GRID), grid, rule)
        assert got[rule].shape == (1, 1 + grid[0] * grid[1], DIM)
        assert rel_err(got[rule], ref) < 1e-12, rule
        assert torch.equal(got[rule][:, 0], pos[:, 0])  # class position kept
    # The authors' 0.1 offset moves every sample (even on an axis whose size is unchanged).
    assert rel_err(got["authors"], got["size"]) > 1e-3


def test_authors_rule_is_meta_interpolate_call():
    """The authors' rule is one bicubic call with scale factors (g + 0.1) / N, not a size."""
    model = dinov2_tiny(img_size=IMG, patch_size=PATCH).double()
    grid = model.pos_embed.detach()[:, 1:].reshape(1, GRID, GRID, DIM).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(
        grid, scale_factor=((9 + 0.1) / GRID, (2 + 0.1) / GRID), mode="bicubic", antialias=False
    )
    got = model.interpolate_pos_embed(9, 2).detach()[:, 1:]
    assert torch.equal(got, expected.permute(0, 2, 3, 1).reshape(1, 18, DIM))


def test_unknown_pos_embed_rule_is_refused():
    with pytest.raises(ValueError, match="pos_embed_resize must be one of"):
        dinov2_tiny(pos_embed_resize="bilinear")


def test_linears_are_called_not_read():
    """Adapters swap block linears via setattr; the forward must go through the new modules."""

    class Wrapped(nn.Module):
        calls = 0

        def __init__(self, inner: nn.Linear):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            Wrapped.calls += 1
            return self.inner(x)

    model = tiny16().eval()
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        before = model(x)
        for blk in model.blocks:
            for parent, name in ((blk.attn, "qkv"), (blk.attn, "proj")) + tuple(
                (blk.mlp, n) for n in ("fc1", "fc2")
            ):
                assert type(getattr(parent, name)) is nn.Linear
                setattr(parent, name, Wrapped(getattr(parent, name)))
        after = model(x)
    assert Wrapped.calls == 4 * DEPTH
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Conversion functions vs. the explicit Keys-kernel reference.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_resize_patch_embed_matches_keys_bicubic(dtype):
    w = torch.randn(3, 2, 14, 14, dtype=torch.float64)
    got = resize_patch_embed(w.to(dtype), 16)
    ref = resize2d(w, bicubic_matrix(14, 16), bicubic_matrix(14, 16))
    assert got.dtype == dtype and got.shape == (3, 2, 16, 16)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel_err(got, ref) < tol
    # The kernel is not renormalised: its sum grows by about (16/14)^2.
    ratio = (ref.sum((-1, -2)) / w.sum((-1, -2))).median().item()
    assert ratio == pytest.approx((16 / 14) ** 2, rel=0.1)


def test_resize_pos_embed_matches_keys_bicubic():
    pos = torch.randn(1, 1 + 37 * 37, 8, dtype=torch.float64)
    got = resize_pos_embed(pos, 32)
    ref = ref_resize_pos(pos, (37, 37), (32, 32))
    assert got.shape == (1, 1 + 32 * 32, 8)
    assert rel_err(got, ref) < 1e-12
    assert torch.equal(got[:, 0], pos[:, 0])
    # Non-square target and input left untouched.
    copy = pos.clone()
    got = resize_pos_embed(pos, (3, 5))
    assert rel_err(got, ref_resize_pos(pos, (37, 37), (3, 5))) < 1e-12
    assert torch.equal(pos, copy)


# ---------------------------------------------------------------------------------------------
# Loading real-format files.


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_loaded_model_matches_float64_reference(fmt, state, meta_pth, hf_safetensors):
    path = meta_pth if fmt == "meta" else hf_safetensors
    model = tiny16().eval()
    report = load_dinov2_weights(model, path)
    assert report.ok and report.format.startswith("meta" if fmt == "meta" else "huggingface")
    assert any("14x14 -> 16x16" in c for c in report.converted)
    assert any("5x5 -> 4x4" in c for c in report.converted)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(x)
    ref = ref_forward(state, x)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("rule", ["authors", "size"])
def test_non_square_input_interpolates_positions(state, meta_pth, rule):
    model = dinov2_tiny(img_size=IMG, patch_size=PATCH, pos_embed_resize=rule).eval()
    load_dinov2_weights(model, meta_pth)
    x = torch.randn(1, 3, 48, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(x)
    ref = ref_forward(state, x, rule=rule)
    assert [tuple(g.shape[-2:]) for g in got] == [(12, 20), (6, 10), (3, 5), (1, 2)]
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        assert rel_err(g, r) < 1e-5


def test_meta_and_hf_give_identical_models(meta_pth, hf_safetensors):
    a, b = tiny16(), tiny16()
    ra = load_dinov2_weights(a, meta_pth)
    rb = load_dinov2_weights(b, hf_safetensors)
    assert ra.ok and rb.ok
    assert sum("fused from HF query/key/value" in c for c in rb.converted) == 2 * DEPTH
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_same_geometry_loads_exactly(tmp_path, state):
    """A checkpoint already at the model's geometry is copied bit for bit, nothing converted."""
    model = dinov2_tiny(img_size=SRC_PATCH * SRC_GRID, patch_size=SRC_PATCH)
    path = tmp_path / "same.pth"
    torch.save(state, path)
    report = load_dinov2_weights(model, path)
    assert report.ok and report.converted == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_wrapped_checkpoint_with_prefix(tmp_path, state, meta_pth):
    wrapped = {"state_dict": {"backbone." + k: v for k, v in state.items()}, "meta": {"it": 1}}
    wrapped["state_dict"]["decode_head.conv.weight"] = torch.zeros(2)
    path = tmp_path / "mmseg_iter_4000.pth"
    torch.save(wrapped, path)
    a, b = tiny16(), tiny16()
    report = load_dinov2_weights(a, path)
    assert report.ok and report.skipped == ["decode_head.conv.weight"]
    assert "backbone." in report.format
    load_dinov2_weights(b, meta_pth)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_load_into_meta_device_model(meta_pth):
    with torch.device("meta"):
        model = tiny16()
    load_dinov2_weights(model, meta_pth)
    ref = tiny16()
    load_dinov2_weights(ref, meta_pth)
    for k, v in model.state_dict().items():
        assert not v.is_meta and torch.equal(v, ref.state_dict()[k]), k
    assert all(p.requires_grad for p in model.parameters())


def test_missing_and_unexpected_keys(tmp_path, state):
    broken = dict(state)
    del broken["blocks.1.ls2.gamma"]
    broken["blocks.1.extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)

    model = tiny16()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DinoV2CheckpointError) as err:
        load_dinov2_weights(model, path)
    msg = str(err.value)
    assert "broken.pth" in msg and "blocks.1.ls2.gamma" in msg and "blocks.1.extra.weight" in msg
    for k, v in model.state_dict().items():  # strict failure loads nothing
        assert torch.equal(v, before[k]), k

    report = load_dinov2_weights(model, path, strict=False)
    assert report.missing == ["blocks.1.ls2.gamma"]
    assert report.unexpected == ["blocks.1.extra.weight"]
    assert "missing (1)" in str(report) and "blocks.1.extra.weight" in str(report)
    assert torch.equal(model.blocks[1].ls2.gamma, before["blocks.1.ls2.gamma"])
    assert torch.equal(model.blocks[1].ls1.gamma, state["blocks.1.ls1.gamma"])


def test_hf_partial_qkv_is_reported(tmp_path, state):
    hf = to_hf(state)
    del hf["encoder.layer.2.attention.attention.key.weight"]
    path = tmp_path / "model.safetensors"
    save_file(hf, str(path))
    report = load_dinov2_weights(tiny16(), path, strict=False)
    assert report.missing == ["blocks.2.attn.qkv.weight"]
    assert set(report.unexpected) == {
        "encoder.layer.2.attention.attention.query.weight",
        "encoder.layer.2.attention.attention.value.weight",
    }


def test_file_errors_name_the_file(tmp_path, meta_pth, hf_safetensors):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_dinov2_weights(tiny16(), tmp_path / "nowhere.pth")

    for src in (meta_pth, hf_safetensors):
        data = src.read_bytes()
        cut = tmp_path / f"truncated_{src.name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=f"truncated_{src.name}.*dinov2"):
            load_dinov2_weights(tiny16(), cut)

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="notes.txt.*neither a PyTorch checkpoint"):
        load_dinov2_weights(tiny16(), text)

    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3)}, other)
    with pytest.raises(ValueError, match="resnet.pth.*not a DINOv2 backbone checkpoint"):
        load_dinov2_weights(tiny16(), other)


def test_unconvertible_shape_and_adapted_model(tmp_path, meta_pth):
    wide = tmp_path / "wider.pth"
    torch.save(random_meta_state(dim=2 * DIM), wide)
    with pytest.raises(ValueError, match="wider.pth.*shape mismatch"):
        load_dinov2_weights(tiny16(), wide)

    model = tiny16()
    model.blocks[0].attn.qkv = nn.Sequential(model.blocks[0].attn.qkv)
    with pytest.raises(ValueError, match="before the adapters"):
        load_dinov2_weights(model, meta_pth)
