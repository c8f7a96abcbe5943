"""Training augmentation and evaluation rescale against independent references (docs/method.md §3).

The references re-implement the mmseg / mmcv steps directly as those libraries write them
(BGR images, ``np.unique`` counts, float32 ``convert`` on the whole image, separate HSV round
trips), driven by the same random draws, plus sizes computed by hand.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from recyclelora.data import (
    GTAV,
    EvalTransform,
    InfiniteSourceSampler,
    PhotoMetricDistortion,
    TrainSet,
    TrainTransform,
    build_loader,
)
from recyclelora.data.transforms import (
    TRAIN_SHORT_EDGES,
    crop_bbox,
    shortest_edge_size,
)
from recyclelora.geometry import rescale_size

from . import fake_datasets as F


class NoPhotometric:
    def __call__(self, img, rng):
        return img


def test_short_edge_scales():
    assert TRAIN_SHORT_EDGES == (
        256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024,
    )  # fmt: skip


@pytest.mark.parametrize(
    "hw, short, expected",
    [
        ((1052, 1914), 512, (512, 932)),  # GTAV
        ((1052, 1914), 1024, (1024, 1863)),
        ((1024, 2048), 1024, (1024, 2048)),  # Cityscapes: long edge exactly at the cap
        ((1024, 2048), 972, (972, 1944)),
        ((500, 2500), 1024, (410, 2048)),  # long edge capped at 2048
        ((2500, 500), 256, (1280, 256)),  # portrait
        ((40, 60), 256, (256, 384)),
    ],
)
def test_shortest_edge_size_hand_computed(hw, short, expected):
    assert shortest_edge_size(hw, short, 2048) == expected


def test_rescale_size_fit():
    assert rescale_size((1024, 2048), (2048, 1024)) == (1024, 2048)
    assert rescale_size((720, 1280), (1280, 720)) == (720, 1280)
    assert rescale_size((1500, 2000), (2048, 1024)) == (1024, 1365)  # half-size Mapillary
    assert rescale_size((2000, 1500), (2048, 1024)) == (1365, 1024)  # portrait: short <= 1024
    assert rescale_size((36, 64), (1280, 720)) == (720, 1280)  # upsampled like mmcv


def _reference_crop(label, crop, rng, cat_max_ratio=0.75, ignore=255):
    """mmseg RandomCrop.crop_bbox, written as mmseg does (np.unique)."""
    margin_h, margin_w = max(label.shape[0] - crop, 0), max(label.shape[1] - crop, 0)

    def gen():
        oh = rng.integers(0, margin_h + 1)
        ow = rng.integers(0, margin_w + 1)
        return oh, oh + crop, ow, ow + crop

    bbox = gen()
    for _ in range(10):
        seg = label[bbox[0] : bbox[1], bbox[2] : bbox[3]]
        labels, cnt = np.unique(seg, return_counts=True)
        cnt = cnt[labels != ignore]
        if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
            break
        bbox = gen()
    return tuple(int(v) for v in bbox)


def _stripe_label():
    # class 0 everywhere except the last 512 columns (class 1): only crops whose x-offset lies
    # in (1152, 1408) have both classes under 75%
    label = np.zeros((512, 2048), np.uint8)
    label[:, 1536:] = 1
    return label


def test_cat_max_ratio_matches_mmseg_and_redraws():
    label = _stripe_label()
    ok_with = ok_without = 0
    for seed in range(300):
        got = crop_bbox(label, (512, 512), np.random.default_rng(seed))
        assert got == _reference_crop(label, 512, np.random.default_rng(seed))
        x = got[2]
        ok_with += 1152 < x < 1408
        x0 = crop_bbox(label, (512, 512), np.random.default_rng(seed), cat_max_ratio=1.0)[2]
        ok_without += 1152 < x0 < 1408
    assert ok_without / 300 < 0.3  # ~17% of single draws are balanced
    assert ok_with / 300 > 0.7  # ~84% after up to 10 re-draws


def test_cat_max_ratio_needs_two_classes_and_ignores_255():
    one_class = np.full((600, 600), 3, np.uint8)
    one_class[:50] = 255
    rng = np.random.default_rng(0)
    got = crop_bbox(one_class, (512, 512), rng)
    ref = np.random.default_rng(0)
    draws = [(int(ref.integers(0, 89)), int(ref.integers(0, 89))) for _ in range(11)]
    assert (got[0], got[2]) == draws[-1]  # every crop rejected: the 11th draw is kept
    # 255 is not a class: >= 77% ignore + two balanced classes is accepted at the first draw
    mixed = np.full((700, 700), 255, np.uint8)
    mixed[560:, :350] = 1
    mixed[560:, 350:] = 2
    for seed in range(5):
        got = crop_bbox(mixed, (600, 600), np.random.default_rng(seed))
        ref = np.random.default_rng(seed)
        first = (int(ref.integers(0, 101)), int(ref.integers(0, 101)))
        assert (got[0], got[2]) == first


def _mmseg_photometric_bgr(img_bgr, rng):
    """mmseg PhotoMetricDistortion.transform on a BGR image, as written there."""

    def convert(img, alpha=1, beta=0):
        img = img.astype(np.float32) * alpha + beta
        img = np.clip(img, 0, 255)
        return img.astype(np.uint8)

    def brightness(img):
        if rng.integers(2):
            return convert(img, beta=rng.uniform(-32, 32))
        return img

    def contrast(img):
        if rng.integers(2):
            return convert(img, alpha=rng.uniform(0.5, 1.5))
        return img

    def saturation(img):
        if rng.integers(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 1] = convert(img[:, :, 1], alpha=rng.uniform(0.5, 1.5))
            img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        return img

    def hue(img):
        if rng.integers(2):
            img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
            img[:, :, 0] = (img[:, :, 0].astype(int) + rng.integers(-18, 18)) % 180
            img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
        return img

    img = brightness(img_bgr)
    mode = rng.integers(2)
    if mode == 1:
        img = contrast(img)
    img = saturation(img)
    img = hue(img)
    if mode == 0:
        img = contrast(img)
    return img


def test_photometric_bit_exact_vs_mmseg_reference():
    img = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    pmd = PhotoMetricDistortion()
    changed = 0
    for seed in range(60):
        got = pmd(img.copy(), np.random.default_rng(seed))
        ref = _mmseg_photometric_bgr(img[:, :, ::-1].copy(), np.random.default_rng(seed))
        np.testing.assert_array_equal(got, ref[:, :, ::-1])
        changed += not np.array_equal(got, img)
    assert changed > 40


def _big_pair(seed=0, hw=(700, 1000)):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    lab = F.blocky_labels(rng, hw, np.array([0, 1, 2, 5, 255], np.uint8), block=50)
    return img, lab


def test_train_transform_shapes_padding_and_determinism():
    img, lab = _big_pair()
    tf = TrainTransform()
    for seed in range(8):
        a = tf(img, lab, np.random.default_rng(seed))
        b = tf(img, lab, np.random.default_rng(seed))
        assert a[0].shape == (512, 512, 3) and a[0].dtype == np.uint8
        assert a[1].shape == (512, 512) and a[1].dtype == np.uint8
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert set(np.unique(a[1])) <= {0, 1, 2, 5, 255}
    # small input: short edge 256 -> 256 x 366 crop region, padded bottom/right
    small, slab = _big_pair(hw=(70, 100))
    tf = TrainTransform(short_edges=(256,))
    out, olab, valid = tf(small, slab, np.random.default_rng(3))
    assert valid == (256, 366)
    assert (out[256:] == 0).all() and (out[:, 366:] == 0).all()
    assert (olab[256:] == 255).all() and (olab[:, 366:] == 255).all()
    different = [
        not np.array_equal(tf(img, lab, np.random.default_rng(s))[0], out) for s in range(4, 8)
    ]
    assert all(different)


def test_flip_flips_image_and_label_together():
    img, lab = _big_pair(1)
    for seed in range(5):
        kw = dict(short_edges=(700,), photometric=PhotoMetricDistortion())
        f = TrainTransform(flip_prob=1.0, **kw)(img, lab, np.random.default_rng(seed))
        n = TrainTransform(flip_prob=0.0, **kw)(img, lab, np.random.default_rng(seed))
        np.testing.assert_array_equal(f[0], n[0][:, ::-1])
        np.testing.assert_array_equal(f[1], n[1][:, ::-1])


def test_photometric_leaves_labels_alone():
    img, lab = _big_pair(2)
    changed = 0
    for seed in range(6):
        a = TrainTransform()(img, lab, np.random.default_rng(seed))
        b = TrainTransform(photometric=NoPhotometric())(img, lab, np.random.default_rng(seed))
        np.testing.assert_array_equal(a[1], b[1])
        changed += not np.array_equal(a[0], b[0])
    assert changed >= 3


def test_resize_is_bilinear_image_nearest_label():
    img, lab = _big_pair(3, hw=(300, 400))
    out, olab, valid = TrainTransform(
        crop_size=2000, short_edges=(450,), flip_prob=0.0, photometric=NoPhotometric(), pad=False
    )(img, lab, np.random.default_rng(0))
    assert valid == (450, 600)
    np.testing.assert_array_equal(out, cv2.resize(img, (600, 450), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(
        olab, cv2.resize(lab, (600, 450), interpolation=cv2.INTER_NEAREST)
    )


def test_eval_transform():
    img = np.zeros((1500, 2000, 3), np.uint8)
    assert EvalTransform((2048, 1024))(img).shape == (1024, 1365, 3)


def test_loader_batches_identical_for_0_and_2_workers(tmp_path):
    rel = F.make_gtav(tmp_path / "g", n=6, hw=(40, 60))
    ts = TrainSet(
        [GTAV(rel.root, converted=False)], TrainTransform(crop_size=32, short_edges=(40, 48))
    )

    def batches(workers):
        sampler = InfiniteSourceSampler([6], 4, subset_sizes=[4], seed=9)
        loader = build_loader(ts, sampler, num_workers=workers, persistent_workers=False)
        it = iter(loader)
        return [next(it) for _ in range(3)]

    a, b = batches(0), batches(2)
    for x, y in zip(a, b, strict=True):
        assert x["image"].shape == (4, 3, 32, 32) and x["label"].shape == (4, 32, 32)
        assert x["index"].tolist() == y["index"].tolist() and x["seed"] == y["seed"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        assert torch.equal(x["valid_hw"], y["valid_hw"])
