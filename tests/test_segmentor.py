"""Segmentor and build_model: parameter budget, normalisation/padding, slide inference, training.

Independent references written here: the parameter counts of the paper (Table 9) and by hand;
mmseg's ``EncoderDecoder.slide_inference`` re-implemented literally (F.pad accumulation, count
matrix) around a window-dependent stub model; a tiny-preset overfit run on generated shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import recyclelora
from recyclelora import RecycleLoRAConfig, build_model, build_param_groups, merge_recyclelora
from recyclelora.adapters import iter_adapted
from recyclelora.geometry import slide_windows
from recyclelora.models import Segmentor
from recyclelora.models.mask2former import MSDeformAttn
from recyclelora.models.segmentor import IMAGENET_MEAN, IMAGENET_STD

VITL_PARAMS = 304_199_680  # DINOv2 ViT-L at 512/16 (tests/test_dinov2.py)
HEAD_PARAMS = 20_565_204  # tests/test_head.py derives it by hand


# ---------------------------------------------------------------- parameter budget (meta)


@pytest.mark.parametrize(
    ("adapters", "adapter_params"),
    [(RecycleLoRAConfig(32, 4), 14_155_776), (RecycleLoRAConfig(32, 2), 13_369_344)],
)
def test_large_preset_parameter_budget(adapters, adapter_params):
    model = build_model("dinov2_large_mask2former", adapters=adapters, device="meta")
    assert adapter_params == (adapters.main_rank + adapters.sub_rank) * 393_216  # docs/method.md §1
    bb = list(model.backbone.parameters())
    trainable = sum(p.numel() for p in bb if p.requires_grad)
    assert trainable == adapter_params
    assert sum(p.numel() for p in bb) == VITL_PARAMS + adapter_params
    lora = sum(p.numel() for n, p in model.backbone.named_parameters() if ".lora_" in n)
    assert lora == adapter_params
    assert len(list(iter_adapted(model.backbone))) == 96
    head = list(model.decode_head.parameters())
    assert sum(p.numel() for p in head) == HEAD_PARAMS
    assert all(p.requires_grad for p in head)
    assert all(p.is_meta for p in model.parameters())
    assert model.num_classes == 19


def test_build_model_variants():
    assert recyclelora.build_model is build_model
    plain = build_model("dinov2_large_mask2former", adapters=None, device="meta")
    assert all(p.requires_grad for p in plain.parameters())
    assert sum(p.numel() for p in plain.backbone.parameters()) == VITL_PARAMS
    tiny = build_model("tiny", num_classes=7, progress=False)
    assert tiny.decode_head.cls_embed.out_features == 8
    assert tiny.backbone.patch_size == 16 and tiny.size_divisor == 16
    assert tiny.head is tiny.decode_head
    assert {k.split(".")[0] for k in tiny.state_dict()} == {"backbone", "decode_head"}
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("nope")
    with pytest.raises(ValueError, match="meta"):
        build_model("tiny", backbone_weights="x.pth", device="meta")


# ---------------------------------------------------------------- whole inference, padding


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=5, progress=False).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking adapters and query-dependent sampling offsets
        for _, layer in iter_adapted(model.backbone):
            for _, b, a in layer.adapter_pairs():
                b.add_(torch.randn(b.shape, generator=g) * 0.05)
                a.add_(torch.randn(a.shape, generator=g) * 0.05)
        for m in model.modules():
            if isinstance(m, MSDeformAttn):
                m.sampling_offsets.weight.normal_(0, 0.05, generator=g)
                m.attention_weights.weight.normal_(0, 0.05, generator=g)
    return model


def images_for(b, h, w, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


def test_forward_normalises_and_predicts(tiny):
    x = images_for(2, 64, 48)
    with torch.no_grad():
        out = tiny(x)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        norm = (x - mean) / std
        ref = tiny.decode_head.predict(tiny.backbone(norm), (64, 48))
    assert out.shape == (2, 5, 64, 48)
    torch.testing.assert_close(out, ref)
    assert "mean" not in tiny.state_dict()


def test_non_multiple_input_is_padded_with_zero_after_normalisation(tiny):
    x = images_for(1, 50, 37, seed=1)
    with torch.no_grad():
        out = tiny(x)
        norm = tiny.normalize(x)
        padded = F.pad(norm, (0, 48 - 37, 0, 64 - 50), value=0.0)
        ref = tiny.decode_head.predict(tiny.backbone(padded), (64, 48))[..., :50, :37]
    assert out.shape == (1, 5, 50, 37)
    torch.testing.assert_close(out, ref)


def test_gather_and_grid_sample_give_the_same_output(tiny):
    x = images_for(2, 64, 80, seed=2)
    outs = {}
    try:
        for impl in ("grid_sample", "gather"):
            tiny.deform_attn_impl = impl
            assert {m.impl for m in tiny.modules() if isinstance(m, MSDeformAttn)} == {impl}
            with torch.no_grad():
                outs[impl] = tiny(x)
    finally:
        tiny.deform_attn_impl = "grid_sample"
    a, b = outs["grid_sample"], outs["gather"]
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    built = build_model("tiny", adapters=None, deform_attn_impl="gather", device="meta")
    assert built.deform_attn_impl == "gather"


def test_merge_recyclelora_keeps_outputs():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=5, progress=False).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in iter_adapted(model.backbone):
            for _, b, _ in layer.adapter_pairs():
                b.add_(torch.randn(b.shape, generator=g) * 0.05)
    x = images_for(1, 64, 64, seed=3)
    with torch.no_grad():
        before = model(x)
        merge_recyclelora(model.backbone)
        after = model(x)
    assert not list(iter_adapted(model))
    assert all(type(m) is nn.Linear for n, m in model.backbone.named_modules() if n.endswith("qkv"))
    assert (before - after).abs().max() <= 1e-5 * before.abs().max()


# ---------------------------------------------------------------- slide inference


class PatchStub(nn.Module):
    """Backbone stub: passes the (normalised) crop through; patch size 1 (no padding)."""

    patch_size = 1

    def forward(self, x):
        return [x]


class WindowDependentHead(nn.Module):
    """Per-pixel channel mix plus the crop's global mean: the output depends on the window."""

    num_classes = 4

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(4, 3, generator=g))

    def predict(self, feats, out_size):
        x = feats[0]
        assert tuple(x.shape[-2:]) == tuple(out_size)
        local = torch.einsum("kc,bchw->bkhw", self.w, x)
        return local + x.mean(dim=(1, 2, 3))[:, None, None, None] * torch.arange(1.0, 5.0).view(
            1, 4, 1, 1
        )


def mmseg_slide_inference(model, inputs, crop, stride):
    """mmseg 1.x EncoderDecoder.slide_inference, literally (on normalised inputs)."""
    h_stride, w_stride = stride
    h_crop, w_crop = crop
    batch_size, _, h_img, w_img = inputs.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = inputs.new_zeros((batch_size, model.num_classes, h_img, w_img))
    count_mat = inputs.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = inputs[:, :, y1:y2, x1:x2]
            crop_seg_logit = model.decode_head.predict(model.backbone(crop_img), crop_img.shape[2:])
            preds += F.pad(
                crop_seg_logit,
                (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)),
            )
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


@pytest.mark.parametrize(
    ("size", "crop", "stride"),
    [
        ((70, 100), (32, 48), (20, 30)),  # several windows per axis, last ones shifted back
        ((64, 64), (32, 32), (32, 32)),  # exact tiling
        ((20, 100), (32, 48), (20, 30)),  # image lower than the crop: one row of windows
        ((50, 50), (64, 64), (40, 40)),  # image smaller than the crop: one window
        ((97, 61), (512, 512), (341, 341)),  # the paper's setting on a small image
    ],
)
def test_slide_inference_equals_mmseg(size, crop, stride):
    model = Segmentor(PatchStub(), WindowDependentHead())
    x = images_for(2, *size, seed=4)
    out = model.predict(x, mode="slide", crop=crop, stride=stride)
    ref = mmseg_slide_inference(model, model.normalize(x), crop, stride)
    assert out.shape == (2, 4, *size)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    whole = model.predict(x, mode="whole")
    windows = slide_windows(*size, crop, stride)
    if len(windows) > 1:
        assert (out - whole).abs().max() > 1e-3  # the stub really is window-dependent
    else:
        torch.testing.assert_close(out, whole)


def test_slide_windows_cover_the_image():
    assert slide_windows(1024, 2048, 512, 341) == [
        (y1, y1 + 512, x1, x1 + 512)
        for y1 in (0, 341, 512)
        for x1 in (0, 341, 682, 1023, 1364, 1536)
    ]
    assert slide_windows(300, 400, 512, 341) == [(0, 300, 0, 400)]
    with pytest.raises(ValueError):
        slide_windows(10, 10, 0, 5)


def test_slide_on_crop_sized_image_equals_whole(tiny):
    x = images_for(1, 64, 64, seed=5)
    with torch.no_grad():
        whole = tiny.predict(x, mode="whole")
        slide = tiny.predict(x, mode="slide", crop=64, stride=43)
        small = tiny.predict(x[..., :48, :40], mode="slide", crop=64, stride=43)
        small_whole = tiny(x[..., :48, :40])
        multi = tiny.predict(images_for(1, 80, 96, seed=6), mode="slide", crop=64, stride=32)
    torch.testing.assert_close(slide, whole)
    torch.testing.assert_close(small, small_whole)
    assert multi.shape == (1, 5, 80, 96) and torch.isfinite(multi).all()
    with pytest.raises(ValueError, match="mode"):
        tiny.predict(x, mode="tiles")


# ---------------------------------------------------------------- training


def shapes_dataset(n=4, size=64, seed=0):
    """n images with 3 coloured rectangles on a dark background (classes 0-3), light noise,
    and a few ignored (255) label pixels."""
    g = torch.Generator().manual_seed(seed)
    colors = torch.tensor(
        [[40.0, 40.0, 40.0], [220.0, 30.0, 30.0], [30.0, 200.0, 40.0], [40.0, 60.0, 230.0]]
    )
    images, labels = [], []
    for _ in range(n):
        lab = torch.zeros(size, size, dtype=torch.long)
        for c in (1, 2, 3):
            h, w = (torch.randint(2, 5, (2,), generator=g) * 8).tolist()
            y = int(torch.randint(0, (size - h) // 8 + 1, (1,), generator=g)) * 8
            x = int(torch.randint(0, (size - w) // 8 + 1, (1,), generator=g)) * 8
            lab[y : y + h, x : x + w] = c
        img = colors[lab].permute(2, 0, 1) + torch.randn(3, size, size, generator=g) * 5
        lab[torch.rand(size, size, generator=g) < 0.003] = 255
        images.append(img.clamp(0, 255))
        labels.append(lab)
    return torch.stack(images), torch.stack(labels)


def test_loss_keys_total_and_padding():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=4, progress=False)
    images, labels = shapes_dataset(n=2, size=64)
    losses = model.loss(
        images[..., :60, :52], labels[..., :60, :52], generator=torch.Generator().manual_seed(0)
    )
    assert len(losses) == 3 * 3 + 1
    torch.testing.assert_close(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    losses["loss"].backward()
    frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(model.backbone.get_parameter(n).grad is None for n in frozen)
    with pytest.raises(ValueError, match="labels"):
        model.loss(images, labels[:, :32])


def test_tiny_preset_overfits_generated_shapes():
    torch.manual_seed(0)
    images, labels = shapes_dataset()
    model = build_model("tiny", num_classes=4, progress=False)
    opt = torch.optim.AdamW(build_param_groups(model, 3e-3, 0.0))
    g = torch.Generator().manual_seed(0)
    history = []
    model.train()
    for _ in range(200):
        loss = model.loss(images, labels, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    final = sum(history[-10:]) / 10  # point sampling makes single steps noisy
    assert final < 0.1 * history[0], (history[0], final)
    model.eval()
    with torch.no_grad():
        pred = model.predict(images).argmax(1)
    valid = labels != 255
    accuracy = (pred[valid] == labels[valid]).float().mean().item()
    assert accuracy > 0.95, accuracy


@pytest.mark.slow
def test_large_preset_forward_backward_reaches_adapters_and_head_only():
    torch.manual_seed(0)
    # Kaiming adapters skip the 96 pivoted QRs (~90 s on 2 cores); B is nudged off zero so that
    # every adapter tensor gets a non-zero gradient.
    model = build_model(
        "dinov2_large_mask2former",
        adapters=RecycleLoRAConfig(32, 4, init="kaiming"),
        progress=False,
        head_cfg={"loss_cfg": {"num_points": 1024}},
    )
    with torch.no_grad():
        for _, layer in iter_adapted(model.backbone):
            for _, b, _ in layer.adapter_pairs():
                b.normal_(0, 1e-3)
    images, labels = shapes_dataset(n=1, size=64)
    images = F.interpolate(images, size=(64, 80), mode="bilinear", align_corners=False)
    labels = F.interpolate(labels[:, None].float(), size=(64, 80), mode="nearest")[:, 0].long()
    losses = model.loss(images, labels, generator=torch.Generator().manual_seed(0))
    assert len(losses) == 10 * 3 + 1 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    for name, p in model.backbone.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    missing = [n for n, p in model.decode_head.named_parameters() if p.grad is None]
    assert missing == []
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out.shape == (1, 19, 64, 80) and torch.isfinite(out).all()


def test_normalize_zeroes_padding_like_mmseg():
    """mmseg pads after normalisation: padded pixels are 0, valid ones (x - mean) / std."""
    model = build_model("tiny", adapters=None, img_size=64)
    x = torch.full((2, 3, 4, 5), 200, dtype=torch.uint8)
    valid = torch.tensor([[4, 5], [2, 3]])
    y = model.normalize(x, valid)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
    torch.testing.assert_close(y[0], ((200 - mean) / std).expand(3, 4, 5))
    assert (y[1, :, 2:] == 0).all() and (y[1, :, :, 3:] == 0).all()
    torch.testing.assert_close(y[1, :, :2, :3], ((200 - mean) / std).expand(3, 2, 3))
