"""Deep-supervised matching in one host round trip, and per-image random draws on the device.

The batched path is checked against matching each prediction set on its own, the losses
against values of a fixed input, and the draws against replays of each image's generator.
"""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment

import recyclelora.models.mask2former.matcher as matcher_module
from recyclelora.models.mask2former.losses import Mask2FormerLoss, semantic_to_instance_targets
from recyclelora.models.mask2former.matcher import HungarianMatcher
from recyclelora.models.mask2former.point_sample import (
    generator_on,
    rand_points,
    uncertain_point_coords_with_randomness,
)

SEEDS = (5, 6, 7)
cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA-only check (device-side random draws); this machine has no CUDA GPU",
)


def generators(seeds=SEEDS, device: str = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def batch(num_sets: int, device: str = "cpu", seed: int = 0):
    """``num_sets`` prediction sets for 3 images (the second has no GT) and their targets."""
    g = torch.Generator().manual_seed(seed)
    predictions = [
        (
            (2 * torch.randn(3, 8, 5, generator=g)).to(device).requires_grad_(),
            (3 * torch.randn(3, 8, 16, 16, generator=g)).to(device).requires_grad_(),
        )
        for _ in range(num_sets)
    ]
    seg = torch.randint(0, 4, (3, 64, 64), generator=g)
    seg[1] = 255
    seg[2, :, :30] = 255
    targets = semantic_to_instance_targets(seg.to(device))
    return predictions, targets


def fixed_input():
    g = torch.Generator().manual_seed(21)
    cls = 2 * torch.randn(2, 7, 5, generator=g)
    masks = 3 * torch.randn(2, 7, 16, 16, generator=g)
    seg = torch.randint(0, 4, (2, 64, 64), generator=g)
    seg[1, :, :20] = 255
    targets = semantic_to_instance_targets(seg)
    points = torch.rand(8, 50, 2, generator=g)
    return cls, masks, [t.labels for t in targets], [t.masks for t in targets], points


def test_matching_and_losses_keep_their_values_on_a_fixed_input() -> None:
    """Values computed before matching was batched and the losses forced to float32."""
    cls, masks, labels, gt, points = fixed_input()
    crit = Mask2FormerLoss(num_classes=4, num_points=300)
    matches = crit.matcher(cls, masks, labels, gt, generator=generators((5, 6)))
    assert [(q.tolist(), g.tolist()) for q, g in matches] == [
        ([2, 3, 4, 6], [2, 1, 0, 3]),
        ([0, 1, 5, 6], [2, 1, 3, 0]),
    ]
    out = crit.loss_single(cls, masks, labels, gt, points=points, generator=generators((5, 6)))
    for got, want in zip(out, (2.02967000, 5.30035639, 3.50002098), strict=True):
        assert got.item() == pytest.approx(want, rel=1e-6)


def test_match_sets_equals_matching_each_set_in_turn() -> None:
    predictions, targets = batch(4, seed=1)
    labels = [t.labels for t in targets]
    masks = [t.masks for t in targets]
    matcher = HungarianMatcher(num_points=500)
    batched = matcher.match_sets(predictions, labels, masks, generator=generators())
    gens = generators()
    one_by_one = [matcher(c, m, labels, masks, generator=gens) for c, m in predictions]
    assert len(batched) == 4
    for got_set, want_set in zip(batched, one_by_one, strict=True):
        assert [g.numel() for g, _ in got_set] == [4, 0, 4]
        for (q, g), (q_ref, g_ref) in zip(got_set, want_set, strict=True):
            assert torch.equal(q, q_ref) and torch.equal(g, g_ref)
            assert q.dtype == g.dtype == torch.long


def test_all_sets_are_solved_from_one_host_array(monkeypatch: pytest.MonkeyPatch) -> None:
    """One device->host copy per step: every solved block is a view of the same array, which
    holds all sets' and images' costs; the indices come back as views of one tensor."""
    blocks = []

    def spy(cost):
        blocks.append(cost)
        return linear_sum_assignment(cost)

    monkeypatch.setattr(matcher_module, "linear_sum_assignment", spy)
    predictions, targets = batch(10, seed=2)
    crit = Mask2FormerLoss(num_classes=4, num_points=200)
    crit(predictions, targets, generator=generators())
    assert len(blocks) == 10 * 3
    base = blocks[0].base
    assert base is not None and all(b.base is base for b in blocks)
    assert base.shape == (8, 10 * sum(t.labels.numel() for t in targets))

    labels = [t.labels for t in targets]
    masks = [t.masks for t in targets]
    sets = crit.matcher.match_sets(predictions, labels, masks, generator=generators())
    storages = {t.untyped_storage().data_ptr() for pairs in sets for pair in pairs for t in pair}
    assert len(storages) == 1


def reference_losses(crit: Mask2FormerLoss, predictions, targets, gens) -> dict:
    """The criterion's documented draw order, spelled out with the per-set public calls."""
    labels = [t.labels for t in targets]
    masks = [t.masks.float() for t in targets]
    matches = [crit.matcher(c, m, labels, masks, generator=gens) for c, m in predictions]
    values = [
        crit.loss_single(c, m, labels, masks, indices=idx, generator=gens)
        for (c, m), idx in zip(predictions, matches, strict=True)
    ]
    names = ("loss_cls", "loss_mask", "loss_dice")
    out = dict(zip(names, values[-1], strict=True))
    for i, v in enumerate(values[:-1]):
        out.update({f"d{i}.{n}": x for n, x in zip(names, v, strict=True)})
    return out


def test_criterion_equals_per_set_matching_and_losses() -> None:
    predictions, targets = batch(3, seed=3)
    crit = Mask2FormerLoss(num_classes=4, num_points=200)
    got = crit(predictions, targets, generator=generators())
    want = reference_losses(crit, predictions, targets, generators())
    assert list(got) == list(want)
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)


def test_each_image_draws_only_from_its_own_generator() -> None:
    """Batch split independence (DDP == one process): matching a batch equals matching each
    image alone with its generator, and the same seeds give the same losses."""
    predictions, targets = batch(3, seed=4)
    labels = [t.labels for t in targets]
    masks = [t.masks for t in targets]
    matcher = HungarianMatcher(num_points=300)
    together = matcher.match_sets(predictions, labels, masks, generator=generators())
    for i, seed in enumerate(SEEDS):
        alone = matcher.match_sets(
            [(c[i : i + 1], m[i : i + 1]) for c, m in predictions],
            labels[i : i + 1],
            masks[i : i + 1],
            generator=generators((seed,)),
        )
        for s in range(3):
            assert torch.equal(together[s][i][0], alone[s][0][0])
            assert torch.equal(together[s][i][1], alone[s][0][1])
    crit = Mask2FormerLoss(num_classes=4, num_points=200)
    a = crit(predictions, targets, generator=generators())
    b = crit(predictions, targets, generator=generators())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generator_on_its_own_device_is_kept() -> None:
    g = torch.Generator().manual_seed(0)
    assert generator_on("cpu", g) is g
    assert generator_on(torch.device("cpu", 0), g) is g
    assert generator_on("cpu", None) is None
    # Kept means no draw either: the next numbers are the seed's first ones.
    assert torch.equal(
        rand_points((2, 3, 2), "cpu", g),
        torch.rand((2, 3, 2), generator=torch.Generator().manual_seed(0)),
    )


def after_one_draw(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    torch.randint(0, 2**63 - 1, (), generator=g)
    return g.get_state()


def derived_cuda(seed: int) -> torch.Generator:
    """What ``generator_on`` must give for a CPU generator seeded with ``seed``."""
    draw = torch.randint(0, 2**63 - 1, (), generator=torch.Generator().manual_seed(seed))
    return torch.Generator(device="cuda").manual_seed(int(draw))


@cuda
def test_cpu_generators_drive_cuda_draws_with_one_draw_per_image() -> None:
    predictions, targets = batch(3, device="cuda", seed=5)
    crit = Mask2FormerLoss(num_classes=4, num_points=200).cuda()
    gens = generators()
    got = crit(predictions, targets, generator=gens)
    # Each CPU generator gave one 63-bit seed; every other number was drawn on the GPU.
    for g, seed in zip(gens, SEEDS, strict=True):
        assert torch.equal(g.get_state(), after_one_draw(seed))
    want = crit(predictions, targets, generator=[derived_cuda(s) for s in SEEDS])
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert all(v.device.type == "cuda" for v in got.values())


@cuda
def test_cuda_draws_are_a_function_of_each_image_seed() -> None:
    points = rand_points((3, 100, 2), "cuda", generators())
    assert points.device.type == "cuda"
    for i, seed in enumerate(SEEDS):
        alone = rand_points((1, 100, 2), "cuda", generators((seed,)))
        assert torch.equal(points[i : i + 1], alone)
    logits = torch.randn(4, 1, 16, 16, device="cuda")
    g = torch.Generator().manual_seed(9)
    sampled = uncertain_point_coords_with_randomness(logits, 50, generator=g)
    assert sampled.device.type == "cuda"
    assert torch.equal(g.get_state(), after_one_draw(9))
    again = uncertain_point_coords_with_randomness(logits, 50, generator=derived_cuda(9))
    assert torch.equal(sampled, again)
