"""mIoU code against a brute-force per-class loop and an independent scipy.sparse implementation."""

import json
import math

import numpy as np
import pytest
import scipy.sparse
import torch

from recyclelora.evaluation import (
    confusion_matrix,
    iou_per_class,
    markdown_table,
    mean_iou,
    summarise,
    write_report,
)

K = 19


def brute_force_iou(pred: np.ndarray, label: np.ndarray, k: int) -> list[float]:
    """Per class: |pred==c & label==c| / |(pred==c | label==c)| over non-ignored pixels."""
    valid = label != 255
    out = []
    for c in range(k):
        p, g = (pred == c) & valid, (label == c) & valid
        union = int((p | g).sum())
        out.append(float("nan") if union == 0 else int((p & g).sum()) / union)
    return out


def random_case(seed: int, absent=(3, 7, 16)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, K, size=(2, 37, 53))
    for c in absent:  # classes absent from this target's ground truth
        label[label == c] = 0
    label[rng.random(label.shape) < 0.1] = 255
    pred = np.where(rng.random(label.shape) < 0.6, label, rng.integers(0, K, size=label.shape))
    pred[pred == 255] = 1
    pred[pred == 16] = 2  # class 16: absent from both -> excluded from the mean
    return pred, label


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iou_matches_brute_force_and_scipy(seed):
    pred, label = random_case(seed)
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), K)
    assert cm.dtype == torch.int64 and int(cm.sum()) == int((label != 255).sum())

    valid = label != 255
    ref_cm = scipy.sparse.coo_matrix(
        (np.ones(valid.sum(), dtype=np.int64), (label[valid], pred[valid])), shape=(K, K)
    ).toarray()
    np.testing.assert_array_equal(cm.numpy(), ref_cm)

    brute = brute_force_iou(pred, label, K)
    np.testing.assert_allclose(iou_per_class(cm).numpy(), brute, rtol=1e-12, equal_nan=True)
    assert math.isnan(brute[16])  # absent from both: not counted
    assert brute[3] == 0.0  # predicted but absent from the ground truth: IoU 0, counted
    assert mean_iou(cm) == pytest.approx(np.nanmean(brute), rel=1e-12)


def test_confusion_is_additive_like_a_ddp_reduction():
    pred, label = random_case(5)
    whole = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), K)
    parts = [
        confusion_matrix(torch.from_numpy(p), torch.from_numpy(g), K)
        for p, g in zip(pred, label, strict=True)
    ]
    assert torch.equal(parts[0] + parts[1], whole)


def test_bad_labels_are_a_clear_error():
    with pytest.raises(ValueError, match="train ids"):
        confusion_matrix(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 33, 2]), K)
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix(torch.zeros(4), torch.zeros(5), K)


def test_report_files_and_table(tmp_path):
    names = [f"c{i}" for i in range(K)]
    cms = {}
    for t, seed in (("cityscapes", 0), ("bdd", 1)):
        p, g = random_case(seed)
        cms[t] = confusion_matrix(torch.from_numpy(p), torch.from_numpy(g), K)
    results = summarise(cms, names)
    assert results["Avg"] == pytest.approx(
        (100 * mean_iou(cms["cityscapes"]) + 100 * mean_iou(cms["bdd"])) / 2
    )
    assert results["targets"]["bdd"]["IoU"]["c16"] is None
    write_report(results, names, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["Avg"] == pytest.approx(
        results["Avg"]
    )
    table = (tmp_path / "metrics.md").read_text()
    assert table == markdown_table(results, names)
    assert table.splitlines()[0] == "| cityscapes | bdd | Avg. |"
    assert f"{results['Avg']:.2f}" in table.splitlines()[2]
