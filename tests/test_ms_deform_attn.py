"""Multi-scale deformable attention: both torch samplers against a brute-force float64 sampler.

The reference below is written from the definition (mmcv's ``multi_scale_deformable_attn_pytorch``
semantics: bilinear, zero padding, align_corners=False, location (x, y) in [0, 1] -> pixel
coordinate (x * W - 0.5, y * H - 0.5)), one point and one corner at a time with explicit bounds
checks, so it shares no code with the implementation.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from recyclelora.models.mask2former.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn_sample,
    ms_deform_attn_sample_gather,
    ms_deform_attn_sample_grid_sample,
    set_deform_attn_impl,
)

SHAPES = [(5, 7), (3, 4), (2, 6)]  # three levels, non-square, H != W in both directions
IMPLS = ("grid_sample", "gather")


def brute_force_sample(value, shapes, locations, weights):
    """float64 numpy loops. value (B,S,h,C), locations (B,Q,h,L,P,2), weights (B,Q,h,L,P)."""
    value = np.asarray(value, dtype=np.float64)
    locations = np.asarray(locations, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    b_, _, heads, c = value.shape
    _, q_, _, levels, points, _ = locations.shape
    starts = np.cumsum([0] + [h * w for h, w in shapes])[:-1]
    out = np.zeros((b_, q_, heads * c))
    for b in range(b_):
        for q in range(q_):
            for hd in range(heads):
                acc = np.zeros(c)
                for lvl in range(levels):
                    height, width = shapes[lvl]
                    for p in range(points):
                        px = locations[b, q, hd, lvl, p, 0] * width - 0.5
                        py = locations[b, q, hd, lvl, p, 1] * height - 0.5
                        x0, y0 = math.floor(px), math.floor(py)
                        fx, fy = px - x0, py - y0
                        sample = np.zeros(c)
                        for cy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                            for cx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                                if 0 <= cy < height and 0 <= cx < width:
                                    sample += wy * wx * value[b, starts[lvl] + cy * width + cx, hd]
                        acc += weights[b, q, hd, lvl, p] * sample
                out[b, q, hd * c : (hd + 1) * c] = acc
    return out


def make_inputs(batch=2, queries=9, heads=3, head_dim=4, points=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = len(SHAPES)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, s, heads, head_dim, generator=g, dtype=dtype)
    locs = torch.rand(batch, queries, heads, levels, points, 2, generator=g, dtype=dtype)
    locs = locs * 1.6 - 0.3  # [-0.3, 1.3]: many points (and corners) outside the map
    # exact borders and pixel-grid hits: 0, 1, pixel centres/edges just in/outside, per level
    for lvl, (h, w) in enumerate(SHAPES):
        xs = [0.0, 1.0, 0.5 / w, -0.5 / w, (w + 0.5) / w, 1.0 / w, (w - 0.5) / w]
        ys = [0.0, 1.0, 0.5 / h, -0.5 / h, (h + 0.5) / h, 1.0 / h, (h - 0.5) / h]
        for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
            locs[0, k % queries, k % heads, lvl, k % points] = torch.tensor([x, y], dtype=dtype)
            if batch > 1:  # one border coordinate at a time, the other well inside
                locs[1, (k + 1) % queries, 0, lvl, 0] = torch.tensor([x, 0.5], dtype=dtype)
                locs[1, (k + 2) % queries, 1 % heads, lvl, 1 % points] = torch.tensor(
                    [0.5, y], dtype=dtype
                )
    weights = torch.rand(batch, queries, heads, levels, points, generator=g, dtype=dtype)
    return value, locs, weights


def level_start_index():
    return torch.tensor([0] + list(np.cumsum([h * w for h, w in SHAPES])[:-1]))


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_inputs_really_leave_the_map():
    _, locs, _ = make_inputs()
    outside = ((locs < 0) | (locs > 1)).any(-1).double().mean().item()
    assert outside > 0.3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shapes_as_tensor", [False, True])
def test_matches_brute_force_float64(impl, shapes_as_tensor):
    value, locs, weights = make_inputs()
    shapes = torch.tensor(SHAPES) if shapes_as_tensor else SHAPES
    out = ms_deform_attn_sample(value, shapes, level_start_index(), locs, weights, impl=impl)
    ref = brute_force_sample(value.numpy(), SHAPES, locs.numpy(), weights.numpy())
    assert out.shape == (2, 9, 3 * 4)
    assert out.dtype == torch.float64
    assert rel_err(out.numpy(), ref) < 1e-12


def test_float32_paths_agree_with_reference_and_each_other():
    value, locs, weights = make_inputs(batch=2, queries=13, heads=2, head_dim=8, seed=1)
    ref = brute_force_sample(value.numpy(), SHAPES, locs.numpy(), weights.numpy())
    v32, l32, w32 = value.float(), locs.float(), weights.float()
    a = ms_deform_attn_sample_grid_sample(v32, SHAPES, None, l32, w32)
    b = ms_deform_attn_sample_gather(v32, SHAPES, None, l32, w32)
    assert rel_err(a.numpy(), ref) < 1e-5
    assert rel_err(b.numpy(), ref) < 1e-5
    assert rel_err(a.numpy(), b.numpy()) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_low_precision_value_keeps_float32_coordinates(impl):
    """bf16 values: result in bf16, but pixel coordinates resolved in float32 (W = 128)."""
    g = torch.Generator().manual_seed(7)
    shapes = [(4, 128)]
    value = torch.randn(1, 4 * 128, 2, 8, generator=g).bfloat16()
    locs = torch.rand(1, 50, 2, 1, 4, 2, generator=g)
    weights = torch.rand(1, 50, 2, 1, 4, generator=g)
    out = ms_deform_attn_sample(value, shapes, None, locs, weights, impl=impl)
    assert out.dtype == torch.bfloat16
    ref = brute_force_sample(value.float().numpy(), shapes, locs.numpy(), weights.numpy())
    assert rel_err(out.float().numpy(), ref) < 1e-2  # only the final bf16 rounding


def test_points_far_outside_contribute_nothing():
    value, locs, weights = make_inputs(batch=1, queries=4, seed=2)
    far = locs.clone()
    far[..., 0] = far[..., 0] + 5.0  # every point > 1.5 map widths to the right
    for impl in IMPLS:
        out = ms_deform_attn_sample(value, SHAPES, None, far, weights, impl=impl)
        assert torch.count_nonzero(out) == 0


def test_gradients_agree_between_paths():
    value, locs, weights = make_inputs(batch=2, queries=5, heads=2, head_dim=3, seed=3)
    # keep the gradient test off the measure-zero pixel-grid kinks (set exactly in make_inputs)
    locs = locs + 1e-3 * torch.rand_like(locs)
    grad_out = torch.randn(2, 5, 6, dtype=torch.float64)
    grads = {}
    for impl in IMPLS:
        v, loc, w = (t.clone().requires_grad_(True) for t in (value, locs, weights))
        out = ms_deform_attn_sample(v, SHAPES, None, loc, w, impl=impl)
        out.backward(grad_out)
        grads[impl] = (v.grad, loc.grad, w.grad)
    for name, ga, gb in zip(("value", "locations", "weights"), *grads.values(), strict=True):
        assert ga.abs().max() > 0, name
        assert rel_err(ga.numpy(), gb.numpy()) < 1e-10, name


def test_gather_gradcheck():
    value, locs, weights = make_inputs(batch=1, queries=3, heads=2, head_dim=2, points=2, seed=4)
    locs = locs + 1e-3 * torch.rand_like(locs)  # off the kinks, where finite differences are fine
    inputs = tuple(t.clone().requires_grad_(True) for t in (value, locs, weights))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_sample_gather(v, SHAPES, None, loc, w), inputs, eps=1e-7
    )


def test_unknown_impl_rejected():
    value, locs, weights = make_inputs(batch=1, queries=2)
    with pytest.raises(ValueError, match="unknown"):
        ms_deform_attn_sample(value, SHAPES, None, locs, weights, impl="cuda")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        MSDeformAttn(impl="nope")  # type: ignore[arg-type]


# ---------------------------------------------------------------- module


def small_module(impl="grid_sample"):
    torch.manual_seed(0)
    m = MSDeformAttn(embed_dims=16, num_heads=2, num_levels=3, num_points=2, impl=impl).double()
    with torch.no_grad():  # move off the init so offsets/weights depend on the query
        for lin in (m.sampling_offsets, m.attention_weights):
            lin.weight.normal_(0, 0.5)
            lin.bias.normal_(0, 1.0)
    return m


def test_init_matches_deformable_detr():
    m = MSDeformAttn()  # 256 dims, 8 heads, 3 levels, 4 points
    assert m.sampling_offsets.weight.shape == (8 * 3 * 4 * 2, 256)
    assert m.attention_weights.weight.shape == (8 * 3 * 4, 256)
    assert torch.count_nonzero(m.sampling_offsets.weight) == 0
    assert torch.count_nonzero(m.attention_weights.weight) == 0
    assert torch.count_nonzero(m.attention_weights.bias) == 0
    assert torch.count_nonzero(m.value_proj.bias) == 0
    assert torch.count_nonzero(m.output_proj.bias) == 0
    bias = m.sampling_offsets.bias.view(8, 3, 4, 2)
    # head k points along angle k * 45 deg, scaled so max(|dx|, |dy|) = 1, point p at p + 1
    directions = torch.tensor(
        [[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]]
    )
    for k in range(8):
        for p in range(4):
            expected = (p + 1) * directions[k].float()
            torch.testing.assert_close(bias[k, :, p], expected.expand(3, 2), atol=1e-6, rtol=1e-6)
    # xavier-uniform bound for a square 256x256 matrix
    bound = math.sqrt(6 / (256 + 256))
    assert m.value_proj.weight.abs().max() <= bound
    assert m.value_proj.weight.abs().max() > 0.9 * bound


def test_module_matches_manual_recomputation():
    m = small_module()
    g = torch.Generator().manual_seed(5)
    s = sum(h * w for h, w in SHAPES)
    b, q = 2, 6
    query = torch.randn(b, q, 16, generator=g, dtype=torch.float64)
    pos = torch.randn(b, q, 16, generator=g, dtype=torch.float64)
    value = torch.randn(b, s, 16, generator=g, dtype=torch.float64)
    ref_pts = torch.rand(b, q, 3, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        outs = {}
        for impl in IMPLS:
            m.impl = impl
            outs[impl] = m(query, ref_pts, value, SHAPES, query_pos=pos)
        # independent recomputation, mmcv's MultiScaleDeformableAttention without the identity
        qp = (query + pos).numpy()
        v = value.numpy() @ m.value_proj.weight.numpy().T + m.value_proj.bias.numpy()
        off = qp @ m.sampling_offsets.weight.numpy().T + m.sampling_offsets.bias.numpy()
        logits = qp @ m.attention_weights.weight.numpy().T + m.attention_weights.bias.numpy()
    off = off.reshape(b, q, 2, 3, 2, 2)
    logits = logits.reshape(b, q, 2, 3 * 2)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn = (attn / attn.sum(-1, keepdims=True)).reshape(b, q, 2, 3, 2)
    wh = np.array([[w, h] for h, w in SHAPES], dtype=np.float64)  # offsets in pixels of (W, H)
    locs = ref_pts.numpy()[:, :, None, :, None, :] + off / wh[None, None, None, :, None, :]
    sampled = brute_force_sample(v.reshape(b, s, 2, 8), SHAPES, locs, attn)
    ref = sampled @ m.output_proj.weight.detach().numpy().T + m.output_proj.bias.detach().numpy()
    for impl in IMPLS:
        assert rel_err(outs[impl].numpy(), ref) < 1e-12, impl


def test_value_padding_mask_zeroes_keys():
    m = small_module()
    s = sum(h * w for h, w in SHAPES)
    query = torch.randn(1, 4, 16, dtype=torch.float64)
    value = torch.randn(1, s, 16, dtype=torch.float64)
    ref_pts = torch.rand(1, 4, 3, 2, dtype=torch.float64)
    mask = torch.ones(1, s, dtype=torch.bool)
    with torch.no_grad():
        out = m(query, ref_pts, value, SHAPES, value_padding_mask=mask)
        # everything masked -> sampled values 0 -> output is the output_proj bias
        torch.testing.assert_close(out, m.output_proj.bias.expand_as(out))


def test_set_deform_attn_impl_walks_a_model():
    model = torch.nn.Sequential(
        MSDeformAttn(16, 2, 3, 2), torch.nn.Linear(2, 2), MSDeformAttn(16, 2, 3, 2)
    )
    assert set_deform_attn_impl(model, "gather") == 2
    assert all(m.impl == "gather" for m in model.modules() if isinstance(m, MSDeformAttn))
    assert set_deform_attn_impl(model, "grid_sample") == 2
    with pytest.raises(ValueError):
        set_deform_attn_impl(model, "bogus")  # type: ignore[arg-type]


# ---------------------------------------------------------------- export


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def _dispatched_ops(impl):
    m = small_module(impl).float()
    s = sum(h * w for h, w in SHAPES)
    query = torch.randn(2, 5, 16, requires_grad=True)
    value = torch.randn(2, s, 16, requires_grad=True)
    ref_pts = torch.rand(2, 5, 3, 2)
    with _OpRecorder() as rec:
        m(query, ref_pts, value, SHAPES).sum().backward()
    return rec.ops


def test_gather_path_dispatches_no_grid_sampler():
    """Always runs: the ATen ops actually executed (forward and backward) by each path."""
    grid_ops = _dispatched_ops("grid_sample")
    assert any("grid_sampler" in op for op in grid_ops)  # the recorder does see it
    gather_ops = _dispatched_ops("gather")
    assert not any("grid_sampler" in op for op in gather_ops), sorted(gather_ops)
    assert "index_select" in gather_ops  # the row gather


class _Wrapper(torch.nn.Module):
    """Fixed spatial shapes (Python ints): the export signature is tensors only."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, query, value, reference_points):
        return self.attn(query, reference_points, value, SHAPES)


def test_onnx_export_has_no_gridsample():
    onnx = pytest.importorskip(
        "onnx", reason="onnx not installed (the ONNX export extra is missing)"
    )
    import inspect

    def export(impl):
        m = _Wrapper(small_module(impl).float()).eval()
        s = sum(h * w for h, w in SHAPES)
        args = (torch.randn(2, 5, 16), torch.randn(2, s, 16), torch.rand(2, 5, 3, 2))
        kwargs = {}
        if "dynamo" in inspect.signature(torch.onnx.export).parameters:
            kwargs["dynamo"] = False  # TorchScript exporter: no onnxscript needed
        buf = io.BytesIO()
        torch.onnx.export(
            m,
            args,
            buf,
            input_names=["query", "value", "reference_points"],
            output_names=["out"],
            dynamic_axes={"query": {0: "b"}, "value": {0: "b"}, "reference_points": {0: "b"}},
            opset_version=17,
            **kwargs,
        )
        return m, onnx.load_from_string(buf.getvalue())

    _, grid_model = export("grid_sample")
    assert any(n.op_type == "GridSample" for n in grid_model.graph.node)
    m, gather_model = export("gather")
    assert not any(n.op_type == "GridSample" for n in gather_model.graph.node)
    try:
        import onnxruntime as ort
    except ImportError:
        return
    sess = ort.InferenceSession(
        gather_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    s = sum(h * w for h, w in SHAPES)
    for batch in (1, 3):  # dynamic batch, different from the traced one
        q, v, r = torch.randn(batch, 5, 16), torch.randn(batch, s, 16), torch.rand(batch, 5, 3, 2)
        r = r * 1.6 - 0.3
        (got,) = sess.run(
            None, {"query": q.numpy(), "value": v.numpy(), "reference_points": r.numpy()}
        )
        with torch.no_grad():
            want = m(q, v, r).numpy()
        assert rel_err(got, want) < 1e-5


def test_grid_sample_semantics_reminder():
    """Pin the convention the brute force encodes: align_corners=False pixel centres."""
    img = torch.arange(6.0).view(1, 1, 2, 3)
    # location of pixel (row 1, col 2) centre: ((2 + 0.5) / 3, (1 + 0.5) / 2)
    grid = torch.tensor([[[[2 * 2.5 / 3 - 1, 2 * 1.5 / 2 - 1]]]])
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    assert out.item() == pytest.approx(5.0)
