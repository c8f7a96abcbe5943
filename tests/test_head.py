"""Mask2Former transformer decoder and head: layer semantics, wiring, inference, names, counts.

Independent references written here: the decoder layer from its definition (explicit per-head
attention with the ``True = masked`` convention, post-norm order); ``nn.MultiheadAttention`` for
the packed-parameter attention; a head forward that follows mmdet 3.x ``Mask2FormerHead.forward``
step by step (sequence-first tensors, per-head repeated masks, ``torch.where`` all-masked fix,
``F.multi_head_attention_forward``, mask-based positional encoding); semantic inference as a
broadcast product; the parameter count by hand from the configuration; mmdet 3.x key names.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recyclelora.models.mask2former import (
    InstanceTargets,
    Mask2FormerHead,
    Mask2FormerTransformerDecoder,
    Mask2FormerTransformerDecoderLayer,
    semantic_inference,
    unmask_full_rows,
)
from recyclelora.models.mask2former.positional_encoding import SinePositionalEncoding
from recyclelora.models.mask2former.transformer_decoder import MultiheadAttentionCore

SMALL_HEAD = dict(
    in_channels=(48, 48, 48, 48),
    strides=(4, 8, 16, 32),
    num_classes=5,
    num_queries=8,
    feat_channels=32,
    out_channels=32,
    num_transformer_feat_level=3,
    num_decoder_layers=9,
    num_heads=4,
    decoder_ffn_channels=64,
    pixel_decoder_cfg=dict(num_encoder_layers=1, num_heads=4, feedforward_channels=64),
    loss_cfg=dict(num_points=256),
)
SIZES = [(16, 12), (8, 6), (4, 3), (2, 2)]  # a 64 x 48 image at strides 4/8/16/32 (floor)


def randomize_(module: nn.Module, seed: int, scale: float = 0.3) -> None:
    """Random values everywhere (norm affines included) so no parameter is a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def feats_for(sizes, batch=2, channels=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=g) for h, w in sizes]


# ---------------------------------------------------------------- attention and decoder layer


def reference_attention(q_in, k_in, v_in, w_in, b_in, w_out, b_out, heads, mask):
    """Per-head scaled dot-product attention; mask (B, Q, K) bool, True = not attended."""
    b, nq, e = q_in.shape
    d = e // heads
    wq, wk, wv = w_in.split(e)
    bq, bk, bv = b_in.split(e)
    q = (q_in @ wq.T + bq).view(b, nq, heads, d)
    k = (k_in @ wk.T + bk).view(b, -1, heads, d)
    v = (v_in @ wv.T + bv).view(b, -1, heads, d)
    out = torch.empty(b, nq, heads, d, dtype=q_in.dtype)
    for i in range(b):
        for h in range(heads):
            s = q[i, :, h] @ k[i, :, h].T / math.sqrt(d)
            if mask is not None:
                s = s.masked_fill(mask[i], float("-inf"))
            out[i, :, h] = s.softmax(-1) @ v[i, :, h]
    return out.reshape(b, nq, e) @ w_out.T + b_out


def reference_layer(layer, query, key, qpos, kpos, mask):
    """Definition: masked cross-attn -> norm -> self-attn -> norm -> FFN -> norm, residuals."""
    heads = layer.cross_attn.num_heads

    def attn(mod, q, k, v, m):
        a = mod.attn
        return reference_attention(
            q,
            k,
            v,
            a.in_proj_weight,
            a.in_proj_bias,
            a.out_proj.weight,
            a.out_proj.bias,
            heads,
            m,
        )

    def ln(norm, x):
        return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)

    x = ln(layer.norms[0], query + attn(layer.cross_attn, query + qpos, key + kpos, key, mask))
    x = ln(layer.norms[1], x + attn(layer.self_attn, x + qpos, x + qpos, x, None))
    fc1, fc2 = layer.ffn.layers[0][0], layer.ffn.layers[1]
    return ln(
        layer.norms[2],
        x + F.linear(F.relu(F.linear(x, fc1.weight, fc1.bias)), fc2.weight, fc2.bias),
    )


def random_mask(b, q, k, seed, p=0.6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, q, k, generator=g) < p
    mask[..., 0] = False  # no fully masked row
    return mask


def test_decoder_layer_matches_definition():
    torch.manual_seed(0)
    e, heads, b, nq, nk = 16, 4, 2, 5, 12
    layer = Mask2FormerTransformerDecoderLayer(e, heads, feedforward_channels=24).eval()
    randomize_(layer, 1)
    g = torch.Generator().manual_seed(2)
    query, qpos = torch.randn(b, nq, e, generator=g), torch.randn(1, nq, e, generator=g)
    key, kpos = torch.randn(b, nk, e, generator=g), torch.randn(1, nk, e, generator=g)
    mask = random_mask(b, nq, nk, 3)
    ours = layer(query, key, key, query_pos=qpos, key_pos=kpos, cross_attn_mask=mask)
    ref = reference_layer(layer, query, key, qpos, kpos, mask)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # a (B, heads, Q, K) mask identical for every head gives the same result
    ours4 = layer(
        query, key, key, qpos, kpos, cross_attn_mask=mask[:, None].expand(-1, heads, -1, -1)
    )
    torch.testing.assert_close(ours4, ours)
    # the mask matters
    unmasked = layer(query, key, key, qpos, kpos, cross_attn_mask=None)
    assert (unmasked - ours).abs().max() > 1e-3


def test_attention_core_equals_torch_multihead_attention():
    """Same parameter names/layout and mask convention as nn.MultiheadAttention (mmdet's)."""
    e, heads, b, nq, nk = 16, 4, 3, 6, 10
    core = MultiheadAttentionCore(e, heads)
    randomize_(core, 4)
    ref = nn.MultiheadAttention(e, heads, batch_first=True)
    assert set(ref.state_dict()) == set(core.state_dict())
    ref.load_state_dict(core.state_dict())
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, n, e, generator=g) for n in (nq, nk, nk))
    mask = random_mask(b, nq, nk, 6)
    expected = ref(q, k, v, attn_mask=mask.repeat_interleave(heads, 0), need_weights=False)[0]
    torch.testing.assert_close(core(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError):
        core(q, k, v, mask.float())


def test_decoder_init_xavier_normal():
    torch.manual_seed(0)
    dec = Mask2FormerTransformerDecoder()
    w = dec.layers[0].ffn.layers[0][0].weight  # (2048, 256)
    assert w.std().item() == pytest.approx(math.sqrt(2 / (256 + 2048)), rel=0.03)
    a = dec.layers[0].cross_attn.attn
    assert a.in_proj_weight.std().item() == pytest.approx(math.sqrt(2 / (256 + 768)), rel=0.03)
    assert torch.count_nonzero(a.in_proj_bias) == 0 and torch.count_nonzero(a.out_proj.bias) == 0
    assert torch.all(dec.post_norm.weight == 1)


# ---------------------------------------------------------------- all-masked fix


def test_unmask_full_rows_equals_mmdet_indexing():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 7, 11, generator=g) < 0.7
    mask[0, 3] = True
    mask[4, :2] = True
    expected = mask.clone()
    expected[torch.where(expected.sum(-1) == expected.shape[-1])] = False
    assert (expected != mask).any()
    assert torch.equal(unmask_full_rows(mask), expected)


# ---------------------------------------------------------------- head


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(0)
    return Mask2FormerHead(**SMALL_HEAD).eval()


def test_head_prediction_sets_and_shapes(head):
    feats = feats_for(SIZES)
    with torch.no_grad():
        preds = head(feats)
    assert isinstance(preds, list) and len(preds) == 10
    for cls, mask in preds:
        assert cls.shape == (2, 8, 6)
        assert mask.shape == (2, 8, 16, 12)
        assert torch.isfinite(cls).all() and torch.isfinite(mask).all()


def mmdet_style_forward(head: Mask2FormerHead, feats):
    """mmdet 3.x Mask2FormerHead.forward with mmcv MultiheadAttention, step by step."""
    num_heads, levels = head.num_heads, head.num_transformer_feat_level
    mask_features, memories = head.pixel_decoder(feats)
    batch = mask_features.shape[0]
    pe = SinePositionalEncoding(head.decoder_embed_dims // 2, normalize=True)
    inputs, poss = [], []
    for i in range(levels):
        x = head.decoder_input_projs[i](memories[i]).flatten(2).permute(2, 0, 1)  # (hw, B, C)
        x = x + head.level_embed.weight[i].view(1, 1, -1)
        m = x.new_zeros((batch, *memories[i].shape[-2:]), dtype=torch.bool)
        inputs.append(x)
        poss.append(pe(m).flatten(2).permute(2, 0, 1))
    query_feat = head.query_feat.weight.unsqueeze(1).repeat(1, batch, 1)  # (Q, B, C)
    query_embed = head.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)

    def forward_head(out, size):
        out = head.transformer_decoder.post_norm(out).transpose(0, 1)
        cls = head.cls_embed(out)
        mask = torch.einsum("bqc,bchw->bqhw", head.mask_embed(out), mask_features)
        am = F.interpolate(mask, size, mode="bilinear", align_corners=False)
        am = am.flatten(2).unsqueeze(1).repeat(1, num_heads, 1, 1).flatten(0, 1)
        return cls, mask, (am.sigmoid() < 0.5).detach()

    def mha(mod, query, key, value, qpos, kpos, attn_mask):
        a = mod.attn
        out = F.multi_head_attention_forward(
            query + qpos,
            key + kpos,
            value,
            a.embed_dims,
            num_heads,
            a.in_proj_weight,
            a.in_proj_bias,
            None,
            None,
            False,
            0.0,
            a.out_proj.weight,
            a.out_proj.bias,
            training=False,
            attn_mask=attn_mask,
            need_weights=False,
        )[0]
        return query + out

    results = []
    cls, mask, attn_mask = forward_head(query_feat, memories[0].shape[-2:])
    results.append((cls, mask))
    full_rows = 0
    for i, layer in enumerate(head.transformer_decoder.layers):
        lvl = i % levels
        full_rows += int((attn_mask.sum(-1) == attn_mask.shape[-1]).sum())
        attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
        q = mha(
            layer.cross_attn,
            query_feat,
            inputs[lvl],
            inputs[lvl],
            query_embed,
            poss[lvl],
            attn_mask,
        )
        q = layer.norms[0](q)
        q = layer.norms[1](mha(layer.self_attn, q, q, q, query_embed, query_embed, None))
        query_feat = layer.norms[2](q + layer.ffn.layers[1](layer.ffn.layers[0](q)))
        cls, mask, attn_mask = forward_head(query_feat, memories[(i + 1) % levels].shape[-2:])
        results.append((cls, mask))
    return results, full_rows


def test_head_forward_matches_mmdet_procedure(head):
    feats = feats_for(SIZES, seed=1)
    with torch.no_grad():
        ours = head(feats)
        ref, _ = mmdet_style_forward(head, feats)
        # masks are really partial: some keys masked, some not, in the cross-attention masks
        assert 0.05 < (ref[3][1] < 0).float().mean() < 0.95
    for (c1, m1), (c2, m2) in zip(ours, ref, strict=True):
        torch.testing.assert_close(c1, c2, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m1, m2, rtol=1e-4, atol=1e-5)


def test_head_all_masked_rows_attend_everywhere():
    """Constant mask features: every query's mask is all-in or all-out; the all-out queries
    would produce NaN without mmdet's fix."""
    torch.manual_seed(3)
    h = Mask2FormerHead(**{**SMALL_HEAD, "num_decoder_layers": 3}).eval()
    with torch.no_grad():
        h.pixel_decoder.mask_feature.weight.zero_()
        h.pixel_decoder.mask_feature.bias.normal_()
        feats = feats_for(SIZES, seed=2)
        ours = h(feats)
        ref, full_rows = mmdet_style_forward(h, feats)
    assert full_rows > 0
    for (c1, m1), (c2, m2) in zip(ours, ref, strict=True):
        assert torch.isfinite(c1).all() and torch.isfinite(m1).all()
        torch.testing.assert_close(c1, c2, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m1, m2, rtol=1e-4, atol=1e-5)


def test_semantic_inference_formula(head):
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(2, 8, 6, generator=g)
    mask = torch.randn(2, 8, 5, 7, generator=g)
    out = semantic_inference(cls, mask, (20, 28))
    up = F.interpolate(mask, size=(20, 28), mode="bilinear", align_corners=False)
    p = torch.exp(cls) / torch.exp(cls).sum(-1, keepdim=True)  # softmax over K+1 ...
    p = p[..., :5]  # ... then drop no-object
    expected = (p[:, :, :, None, None] * torch.sigmoid(up)[:, :, None]).sum(1)
    assert out.shape == (2, 5, 20, 28)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # no resize when out_size is None
    torch.testing.assert_close(
        semantic_inference(cls, mask),
        (p[:, :, :, None, None] * torch.sigmoid(mask)[:, :, None]).sum(1),
    )
    # head.predict = the formula on the last prediction set
    feats = feats_for(SIZES, seed=4)
    with torch.no_grad():
        c_last, m_last = head(feats)[-1]
        pred = head.predict(feats, (64, 48))
    torch.testing.assert_close(pred, semantic_inference(c_last, m_last, (64, 48)))
    assert pred.shape == (2, 5, 64, 48)


def test_head_loss_and_gradients():
    torch.manual_seed(0)
    h = Mask2FormerHead(**{**SMALL_HEAD, "num_decoder_layers": 2})
    feats = feats_for(SIZES, batch=2, seed=5)
    labels = torch.randint(0, 5, (2, 64, 48))
    targets = [
        InstanceTargets(torch.unique(lab), lab[None] == torch.unique(lab)[:, None, None])
        for lab in labels
    ]
    losses = h.loss(feats, targets, generator=torch.Generator().manual_seed(0))
    names = {f"{p}loss_{n}" for p in ("", "d0.", "d1.") for n in ("cls", "mask", "dice")}
    assert set(losses) == names
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in h.named_parameters() if p.grad is None]
    assert missing == []


# ---------------------------------------------------------------- names and counts


def mmdet_head_keys(num_layers=9, levels=3) -> set[str]:
    """mmdet 3.x Mask2FormerHead keys outside the pixel decoder (input projections Identity)."""
    keys = {"query_embed.weight", "query_feat.weight", "level_embed.weight"}
    keys |= {f"cls_embed.{p}" for p in ("weight", "bias")}
    keys |= {f"mask_embed.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    keys |= {f"transformer_decoder.post_norm.{p}" for p in ("weight", "bias")}
    for n in range(num_layers):
        pre = f"transformer_decoder.layers.{n}."
        for attn in ("cross_attn", "self_attn"):
            keys |= {f"{pre}{attn}.attn.in_proj_weight", f"{pre}{attn}.attn.in_proj_bias"}
            keys |= {f"{pre}{attn}.attn.out_proj.{p}" for p in ("weight", "bias")}
        for mod in ("ffn.layers.0.0", "ffn.layers.1", "norms.0", "norms.1", "norms.2"):
            keys |= {f"{pre}{mod}.{p}" for p in ("weight", "bias")}
    return keys


@pytest.fixture(scope="module")
def full_head():
    with torch.device("meta"):
        return Mask2FormerHead()


def test_full_head_keys_follow_mmdet3(full_head):
    keys = {k for k in full_head.state_dict() if not k.startswith("pixel_decoder.")}
    assert keys == mmdet_head_keys()
    assert all(isinstance(m, nn.Identity) for m in full_head.decoder_input_projs)
    # no persistent buffers (the criterion's class weight is not saved)
    assert set(full_head.state_dict()) == {n for n, _ in full_head.named_parameters()}


def test_full_head_parameter_count_by_hand(full_head):
    d, k, q, ffn, layers, levels = 256, 19, 100, 2048, 9, 3
    pixel_decoder = 6_101_440  # tests/test_pixel_decoder.py derives it
    mha = (3 * d * d + 3 * d) + (d * d + d)  # packed in_proj + out_proj
    layer = 2 * mha + (d * ffn + ffn) + (ffn * d + d) + 3 * 2 * d  # 2 attn, FFN, 3 LayerNorms
    transformer_decoder = layers * layer + 2 * d  # + post_norm
    embeddings = 2 * q * d + levels * d  # query_embed, query_feat, level_embed
    cls_embed = d * (k + 1) + (k + 1)
    mask_embed = 3 * (d * d + d)
    expected = pixel_decoder + transformer_decoder + embeddings + cls_embed + mask_embed
    assert layer == 1_578_752
    assert transformer_decoder == 14_209_280
    assert expected == 20_565_204
    assert sum(p.numel() for p in full_head.parameters()) == expected
    assert sum(p.numel() for p in full_head.pixel_decoder.parameters()) == pixel_decoder


def test_enforce_decoder_input_project_adds_convs():
    with torch.device("meta"):
        h = Mask2FormerHead(**{**SMALL_HEAD, "enforce_decoder_input_project": True})
    assert all(isinstance(m, nn.Conv2d) for m in h.decoder_input_projs)
    assert {"decoder_input_projs.0.weight", "decoder_input_projs.2.bias"} <= set(h.state_dict())
