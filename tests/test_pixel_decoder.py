"""Mask2Former pixel decoder: shapes, parameter count, names, init, layer semantics, wiring.

Independent references written here: the parameter count by hand from mmdet's configuration, the
mmdet 3.x state-dict key list, a post-norm encoder layer from its definition, the sine positional
encoding in numpy, and a forward pass that follows mmdet's ``MSDeformAttnPixelDecoder.forward``
step by step (mask-based positional encoding, linspace reference points, ``repeat``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recyclelora.models.mask2former.ms_deform_attn import MSDeformAttn, set_deform_attn_impl
from recyclelora.models.mask2former.pixel_decoder import (
    MMDET_KEY_NOTES,
    MSDeformAttnEncoderLayer,
    MSDeformAttnPixelDecoder,
    encoder_reference_points,
)
from recyclelora.models.mask2former.positional_encoding import SinePositionalEncoding

STRIDES = (4, 8, 16, 32)


@pytest.fixture(scope="module")
def decoder():
    """The real configuration, with query-dependent offsets so sampling really moves around."""
    torch.manual_seed(0)
    m = MSDeformAttnPixelDecoder().eval()
    with torch.no_grad():
        for attn in m.modules():
            if isinstance(attn, MSDeformAttn):
                attn.sampling_offsets.weight.normal_(0, 0.02)
                attn.attention_weights.weight.normal_(0, 0.02)
    return m


def feats_for(sizes, batch=1, channels=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=g) for h, w in sizes]


# ---------------------------------------------------------------- structure


def test_parameter_count_matches_hand_arithmetic(decoder):
    c_in, d, heads, levels, points, ffn = 1024, 256, 8, 3, 4, 1024
    gn = 2 * d
    input_convs = 3 * (c_in * d + d + gn)  # 1x1 conv with bias + GN
    attn = (
        (d * heads * levels * points * 2 + heads * levels * points * 2)  # sampling_offsets
        + (d * heads * levels * points + heads * levels * points)  # attention_weights
        + 2 * (d * d + d)  # value_proj, output_proj
    )
    ffn_params = (d * ffn + ffn) + (ffn * d + d)
    layer = attn + ffn_params + 2 * 2 * d  # two LayerNorms
    encoder = 6 * layer
    level_encoding = 3 * d
    lateral = c_in * d + gn  # 1x1 conv, no bias (norm follows)
    output = d * d * 9 + gn  # 3x3 conv, no bias
    mask_feature = d * d + d
    expected = input_convs + encoder + level_encoding + lateral + output + mask_feature
    assert expected == 6_101_440
    assert sum(p.numel() for p in decoder.parameters()) == expected
    assert len(list(decoder.buffers())) == 0


def test_state_dict_keys_follow_mmdet3(decoder):
    expected = set()
    for i in range(3):
        expected |= {f"input_convs.{i}.conv.{p}" for p in ("weight", "bias")}
        expected |= {f"input_convs.{i}.gn.{p}" for p in ("weight", "bias")}
    for n in range(6):
        pre = f"encoder.layers.{n}."
        for lin in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            expected |= {f"{pre}self_attn.{lin}.{p}" for p in ("weight", "bias")}
        for lin in ("ffn.layers.0.0", "ffn.layers.1", "norms.0", "norms.1"):
            expected |= {f"{pre}{lin}.{p}" for p in ("weight", "bias")}
    expected |= {
        "level_encoding.weight",
        "lateral_convs.0.conv.weight",
        "output_convs.0.conv.weight",
    }
    expected |= {
        f"{m}.gn.{p}" for m in ("lateral_convs.0", "output_convs.0") for p in ("weight", "bias")
    }
    expected |= {"mask_feature.weight", "mask_feature.bias"}
    assert set(decoder.state_dict()) == expected
    assert "positional_encoding" in MMDET_KEY_NOTES


def test_init_follows_mmdet():
    torch.manual_seed(1)
    m = MSDeformAttnPixelDecoder()
    for conv in m.input_convs:
        assert torch.count_nonzero(conv.conv.bias) == 0
        bound = math.sqrt(6 / (1024 + 256))  # xavier-uniform, gain 1
        assert 0.9 * bound < conv.conv.weight.abs().max() <= bound
    # caffe2 xavier = kaiming-uniform(a=1, fan_in): bound sqrt(3 / fan_in)
    for conv, fan_in in ((m.lateral_convs[0].conv, 1024), (m.output_convs[0].conv, 256 * 9)):
        bound = math.sqrt(3 / fan_in)
        assert 0.9 * bound < conv.weight.abs().max() <= bound
        assert conv.bias is None
    assert torch.count_nonzero(m.mask_feature.bias) == 0
    assert m.level_encoding.weight.std().item() == pytest.approx(1.0, abs=0.1)
    for layer in m.encoder.layers:
        a = layer.self_attn
        assert torch.count_nonzero(a.sampling_offsets.weight) == 0
        assert torch.count_nonzero(a.attention_weights.weight) == 0
        assert a.sampling_offsets.bias.abs().max().item() == pytest.approx(4.0)
        bound = math.sqrt(6 / 512)  # value/output proj re-initialised xavier-uniform
        assert a.value_proj.weight.abs().max() <= bound
        fc1 = layer.ffn.layers[0][0].weight  # xavier-normal std sqrt(2 / (256 + 1024))
        assert fc1.std().item() == pytest.approx(math.sqrt(2 / 1280), rel=0.05)
        for norm in layer.norms:
            assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    assert torch.all(m.lateral_convs[0].gn.weight == 1)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize(
    "sizes",
    [
        [(16, 16), (8, 8), (4, 4), (2, 2)],  # 64x64 image
        [(24, 16), (12, 8), (6, 4), (3, 2)],  # 96x64
        [(8, 20), (4, 10), (2, 5), (1, 2)],  # 32x80, wide
        [(20, 12), (10, 6), (5, 3), (2, 1)],  # stride-16 grid of 5x3, halved with floor
    ],
)
def test_shapes_and_order(decoder, sizes):
    feats = feats_for(sizes, batch=2)
    with torch.no_grad():
        mask_features, multi_scale = decoder(feats)
    assert mask_features.shape == (2, 256, *sizes[0])
    assert isinstance(multi_scale, list) and len(multi_scale) == 3
    # coarsest first: strides 32, 16, 8
    for out, size in zip(multi_scale, [sizes[3], sizes[2], sizes[1]], strict=True):
        assert out.shape == (2, 256, *size)
    assert all(torch.isfinite(t).all() for t in [mask_features, *multi_scale])


def test_both_impls_give_the_same_outputs(decoder):
    feats = feats_for([(24, 16), (12, 8), (6, 4), (3, 2)], batch=2, seed=3)
    outs = {}
    try:
        for impl in ("grid_sample", "gather"):
            decoder.deform_attn_impl = impl
            assert all(m.impl == impl for m in decoder.modules() if isinstance(m, MSDeformAttn))
            with torch.no_grad():
                mf, ms = decoder(feats)
            outs[impl] = [mf, *ms]
    finally:
        decoder.deform_attn_impl = "grid_sample"
    for a, b in zip(outs["grid_sample"], outs["gather"], strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_impl_chosen_at_construction():
    m = MSDeformAttnPixelDecoder(
        in_channels=(64,) * 4, feat_channels=64, out_channels=32, num_encoder_layers=2,
        num_groups=8, deform_attn_impl="gather",
    )  # fmt: skip
    assert m.deform_attn_impl == "gather"
    assert [a.impl for a in m.modules() if isinstance(a, MSDeformAttn)] == ["gather", "gather"]
    assert set_deform_attn_impl(m, "grid_sample") == 2
    assert m.deform_attn_impl == "grid_sample"


def mmdet_style_forward(pd: MSDeformAttnPixelDecoder, feats):
    """mmdet's MSDeformAttnPixelDecoder.forward, step by step, using pd's submodules."""
    batch = feats[0].shape[0]
    n_in, n_enc = 4, 3
    inputs, poss, shapes = [], [], []
    pe = SinePositionalEncoding(128, normalize=True)
    for i in range(n_enc):
        level_idx = n_in - i - 1
        feat = feats[level_idx]
        proj = pd.input_convs[i](feat)
        mask = feat.new_zeros((batch, *feat.shape[-2:]), dtype=torch.bool)
        pos = pe(mask) + pd.level_encoding.weight[i].view(1, -1, 1, 1)
        inputs.append(proj.flatten(2).permute(0, 2, 1))
        poss.append(pos.flatten(2).permute(0, 2, 1))
        shapes.append(tuple(feat.shape[-2:]))
    query = torch.cat(inputs, 1)
    query_pos = torch.cat(poss, 1)
    # DeformableDetrTransformerEncoder.get_encoder_reference_points with valid ratios 1
    refs = []
    for h, w in shapes:
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w), indexing="ij"
        )
        refs.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
    ref = torch.cat(refs, 0)[None, :, None].repeat(batch, 1, n_enc, 1)
    memory = query
    for layer in pd.encoder.layers:
        memory = layer(memory, query_pos, ref, torch.tensor(shapes))
    memory = memory.permute(0, 2, 1)
    outs = torch.split(memory, [h * w for h, w in shapes], dim=-1)
    outs = [x.reshape(batch, -1, h, w) for x, (h, w) in zip(outs, shapes, strict=True)]
    cur = pd.lateral_convs[0](feats[0])
    y = cur + F.interpolate(outs[-1], size=cur.shape[-2:], mode="bilinear", align_corners=False)
    outs.append(pd.output_convs[0](y))
    return pd.mask_feature(outs[-1]), outs[:3]


def test_forward_matches_mmdet_style_recomputation(decoder):
    feats = feats_for([(12, 20), (6, 10), (3, 5), (2, 3)], batch=2, seed=4)
    with torch.no_grad():
        mf, ms = decoder(feats)
        rmf, rms = mmdet_style_forward(decoder, feats)
    for a, b in zip([mf, *ms], [rmf, *rms], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- pieces


def test_encoder_layer_is_post_norm():
    torch.manual_seed(2)
    layer = MSDeformAttnEncoderLayer(32, 4, 3, 2, feedforward_channels=64).double().eval()
    with torch.no_grad():
        for norm in layer.norms:  # non-trivial affine so the norm order matters
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
        layer.self_attn.sampling_offsets.weight.normal_(0, 0.3)
    shapes = [(4, 3), (2, 5), (1, 2)]
    s = sum(h * w for h, w in shapes)
    x = torch.randn(2, s, 32, dtype=torch.float64)
    pos = torch.randn(2, s, 32, dtype=torch.float64)
    ref = torch.rand(2, s, 3, 2, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x, pos, ref, shapes)
        attn = layer.self_attn(x, ref, x, shapes, query_pos=pos)  # value = x, no pos
        n0, n1 = layer.norms
        x1 = F.layer_norm(x + attn, (32,), n0.weight, n0.bias, 1e-5)
        fc1, fc2 = layer.ffn.layers[0][0], layer.ffn.layers[1]
        h = torch.relu(x1 @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias
        expected = F.layer_norm(x1 + h, (32,), n1.weight, n1.bias, 1e-5)
        pre_norm = x + layer.self_attn(n0(x), ref, n0(x), shapes, query_pos=pos)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert (out - pre_norm).abs().max() > 1e-3


def numpy_sine_encoding(mask, num_feats=128, temperature=10000, scale=2 * np.pi, eps=1e-6):
    not_mask = 1.0 - np.asarray(mask, dtype=np.float64)
    y = np.cumsum(not_mask, 1)
    x = np.cumsum(not_mask, 2)
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    k = np.arange(num_feats)
    dim_t = temperature ** (2 * (k // 2) / num_feats)
    out = []
    for e in (y, x):
        p = e[..., None] / dim_t
        out.append(np.where(k % 2 == 0, np.sin(p), np.cos(p)))
    return np.concatenate(out, -1).transpose(0, 3, 1, 2)


def test_sine_positional_encoding():
    pe = SinePositionalEncoding()
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    from_mask = pe(mask)
    from_input = pe(input=torch.zeros(2, 3, 5, 7))
    assert from_mask.shape == from_input.shape == (2, 256, 5, 7)
    assert from_mask.dtype == torch.float32
    assert torch.equal(from_mask, from_input)  # bit-identical: export path == mmdet path
    np.testing.assert_allclose(from_mask.numpy(), numpy_sine_encoding(mask.numpy()), atol=2e-6)
    # first valid pixel sits at scale / H (offset 0, 1-based), channel 0 = sin(y'), 128 = sin(x')
    assert from_mask[0, 0, 0, 0].item() == pytest.approx(math.sin(2 * math.pi / 5), abs=1e-6)
    assert from_mask[0, 128, 0, 0].item() == pytest.approx(math.sin(2 * math.pi / 7), abs=1e-6)
    padded = torch.zeros(1, 4, 6, dtype=torch.bool)
    padded[:, 3:, :] = True
    padded[:, :, 4:] = True
    np.testing.assert_allclose(pe(padded).numpy(), numpy_sine_encoding(padded.numpy()), atol=2e-6)
    with pytest.raises(ValueError):
        pe()


def test_reference_points_are_pixel_centres():
    shapes = [(2, 3), (4, 5)]
    ref = encoder_reference_points(shapes, strides=(32, 16), num_levels=2)
    assert ref.shape == (1, 6 + 20, 2, 2)
    expected = []
    for h, w in shapes:
        for i in range(h):
            for j in range(w):
                expected.append(((j + 0.5) / w, (i + 0.5) / h))
    expected = torch.tensor(expected)
    for lvl in range(2):
        torch.testing.assert_close(ref[0, :, lvl], expected, rtol=0, atol=1e-7)
