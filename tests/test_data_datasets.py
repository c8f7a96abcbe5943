"""Readers, dataset loaders and the source sampler, on fake releases in the official layouts.

Expected labels come from the raw values the fake writers put in the files, mapped through
tables written out in tests/test_data_labels.py (not the library's tables).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from recyclelora.data import (
    BDD100K,
    DATASETS,
    GTAV,
    Cityscapes,
    DataError,
    DataWarning,
    InfiniteSourceSampler,
    Mapillary,
    Synthia,
    TrainSet,
    TrainTransform,
    UrbanSyn,
    build_dataset,
    build_eval_dataset,
    build_loader,
    build_train_sampler,
    read_image,
    read_label,
    sample_seed,
)
from recyclelora.data.imageio import image_size, is_complete

from . import fake_datasets as F
from .test_data_labels import CITYSCAPES_ID_TO_TRAIN, MAPILLARY_EXPECTED, SYNTHIA_TABLE


def _map(raw: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.full(raw.shape, 255, np.int64)
    for k, v in table.items():
        out[raw == k] = v
    return out


URBANSYN_TABLE = {i: i for i in range(19)}
MAPILLARY_TABLE = {i: MAPILLARY_EXPECTED[n] for i, n in enumerate(F.MAPILLARY_V12_NAMES)}


def _write_converted(rel: F.FakeRelease, table: dict[int, int], suffix_of) -> None:
    """Converted *_labelTrainIds.png written independently (zlib encoder, own table)."""
    for it in rel.items:
        trainids = _map(it.raw, table).astype(np.uint8)
        suffix_of(it.label).write_bytes(F.png_bytes(trainids))


def _gtav_conv(p):
    return p.with_name(p.stem + "_labelTrainIds.png")


def _city_conv(p):
    return p.with_name(p.name.replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"))


# -- reading -----------------------------------------------------------------------------------


def test_read_palette_png_gives_indices_not_colours(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 66, size=(23, 31), dtype=np.uint8)
    pal = np.zeros((256, 3), np.uint8)  # all-black palette: colours carry no information
    p = tmp_path / "pal.png"
    p.write_bytes(F.png_bytes(raw, palette=pal))
    out = read_label(p)
    assert out.dtype == np.uint8 and out.shape == raw.shape
    np.testing.assert_array_equal(out, raw)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_read_low_bit_depth_palette_against_pillow(tmp_path, bits):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(bits)
    raw = rng.integers(0, 2**bits, size=(17, 29)).astype(np.uint8)
    im = Image.fromarray(raw, mode="P")
    im.putpalette([(i * 37) % 256 for i in range(3 * 2**bits)])
    p = tmp_path / f"p{bits}.png"
    im.save(p, bits=bits)
    np.testing.assert_array_equal(read_label(p), np.asarray(Image.open(p)))


def test_read_16bit_red_channel_and_channel_errors(tmp_path):
    rng = np.random.default_rng(1)
    cls = rng.integers(0, 23, size=(12, 20)).astype(np.uint16)
    other = rng.integers(300, 60000, size=(12, 20)).astype(np.uint16)
    p = tmp_path / "syn.png"
    p.write_bytes(F.png_bytes(np.stack([cls, other, other + 1], -1)))  # file order R, G, B
    out = read_label(p, red_channel=True)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, cls)
    with pytest.raises(DataError, match=r"syn\.png.*3 channels"):
        read_label(p)
    grey = tmp_path / "grey.png"
    grey.write_bytes(F.png_bytes(cls.astype(np.uint8)))
    with pytest.raises(DataError, match="red channel"):
        read_label(grey, red_channel=True)


def test_read_image_is_rgb_and_errors_name_the_file(tmp_path):
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[..., 0] = 200  # red
    p = tmp_path / "red.png"
    p.write_bytes(F.png_bytes(rgb))
    np.testing.assert_array_equal(read_image(p), rgb)
    assert image_size(p) == (5, 7) and is_complete(p)

    F.truncate(p, 0.7)
    assert not is_complete(p)
    with pytest.raises(DataError, match=r"red\.png.*truncated") as e:
        read_image(p)
    assert e.value.path == str(p) and "Re-extract" in str(e.value)
    with pytest.raises(DataError, match=r"nothere\.png: file not found"):
        read_image(tmp_path / "nothere.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_label(tmp_path / "empty.png")
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8not a jpeg at all")
    with pytest.raises(DataError, match=r"junk\.jpg.*cannot decode"):
        read_image(tmp_path / "junk.jpg")


# -- loaders -----------------------------------------------------------------------------------


def _check_items(ds, rel, table, *, exact_pixels=True):
    assert len(ds) == len(rel)
    by_key = {str(it.image): it for it in rel.items}
    assert sorted(ds.images) == sorted(by_key)
    for i in range(len(ds)):
        s = ds[i]
        it = by_key[s["path"]]
        lp = Path(s["label_path"])
        assert lp.parent == it.label.parent and it.key.split("/")[-1] in lp.name
        img, lab = s["image"], s["label"]
        assert img.dtype == torch.uint8 and img.shape == (3, *it.rgb.shape[:2])
        assert lab.dtype == torch.int64 and lab.shape == it.raw.shape
        np.testing.assert_array_equal(lab.numpy(), _map(it.raw, table))
        got = img.permute(1, 2, 0).numpy()
        if exact_pixels:
            np.testing.assert_array_equal(got, it.rgb)
        else:  # JPEG: close on average, and channel order right (no R/B swap)
            err = np.abs(got.astype(int) - it.rgb.astype(int)).mean()
            swapped = np.abs(got[..., ::-1].astype(int) - it.rgb.astype(int)).mean()
            assert err < 8 and err < swapped


def test_gtav_on_the_fly_and_converted(tmp_path):
    rel = F.make_gtav(tmp_path / "gtav", n=3)
    _check_items(GTAV(rel.root, converted=False), rel, CITYSCAPES_ID_TO_TRAIN)
    with pytest.raises(DataError) as e:
        GTAV(rel.root)
    assert "not been converted" in str(e.value)
    assert f"prepare_data.py gtav {rel.root}" in str(e.value)
    _write_converted(rel, CITYSCAPES_ID_TO_TRAIN, _gtav_conv)
    ds = GTAV(rel.root)
    assert all(p.endswith("_labelTrainIds.png") for p in ds.labels)
    _check_items(ds, rel, CITYSCAPES_ID_TO_TRAIN)


def test_gtav_partial_conversion_names_the_command(tmp_path):
    rel = F.make_gtav(tmp_path / "gtav", n=3)
    _write_converted(rel, CITYSCAPES_ID_TO_TRAIN, _gtav_conv)
    _gtav_conv(rel.items[1].label).unlink()
    with pytest.raises(DataError, match=r"1 of 3 converted.*00002\.png.*interrupted") as e:
        GTAV(rel.root)
    assert "training/prepare_data.py gtav" in str(e.value)


def test_gtav_size_mismatch_warns_and_resizes_label(tmp_path):
    rel = F.make_gtav(tmp_path / "gtav", n=2, mismatched=(1,))
    ds = GTAV(rel.root, converted=False)
    with pytest.warns(
        DataWarning, match=r"00002\.png is 64x42 but its image .*00002\.png is 60x40"
    ):
        s = ds[1]
    assert s["label"].shape == (40, 60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[0]  # matching pair: no warning


def test_synthia_red_channel_rule(tmp_path):
    rel = F.make_synthia(tmp_path / "syn", n=2)
    _check_items(Synthia(rel.root, converted=False), rel, SYNTHIA_TABLE)
    with pytest.raises(DataError, match="prepare_data.py synthia"):
        Synthia(rel.root)
    _write_converted(rel, SYNTHIA_TABLE, _gtav_conv)
    _check_items(Synthia(rel.root), rel, SYNTHIA_TABLE)


def test_urbansyn_pairs_prefixed_names_and_ignores_19(tmp_path):
    rel = F.make_urbansyn(tmp_path / "us", n=3)
    ds = UrbanSyn(rel.root)
    _check_items(ds, rel, URBANSYN_TABLE)
    assert any((it.raw == 19).any() for it in rel.items)


def test_cityscapes_converted_and_on_the_fly(tmp_path):
    rel = F.make_cityscapes(tmp_path / "cs", cities=("frankfurt", "munster"), per_city=2)
    ds = Cityscapes(rel.root, "val", converted=False)
    _check_items(ds, rel, CITYSCAPES_ID_TO_TRAIN)
    assert all(p.endswith("_gtFine_labelIds.png") for p in ds.labels)
    _write_converted(rel, CITYSCAPES_ID_TO_TRAIN, _city_conv)
    ds = Cityscapes(rel.root, "val")
    assert all(p.endswith("_gtFine_labelTrainIds.png") for p in ds.labels)
    _check_items(ds, rel, CITYSCAPES_ID_TO_TRAIN)
    with pytest.raises(DataError, match=r"leftImg8bit/train not found"):
        Cityscapes(rel.root, "train")


def test_bdd100k_jpg_images(tmp_path):
    rel = F.make_bdd100k(tmp_path / "bdd", n=3)
    _check_items(BDD100K(rel.root, "val"), rel, URBANSYN_TABLE, exact_pixels=False)


def test_mapillary_full_and_half(tmp_path):
    rel = F.make_mapillary(tmp_path / "map")
    _check_items(Mapillary(rel.root, half=False), rel, MAPILLARY_TABLE, exact_pixels=False)
    with pytest.raises(DataError, match="prepare_data.py mapillary") as e:
        Mapillary(rel.root)
    assert "half" in str(e.value)
    # a (hand-made) half-size copy is read as train ids
    half_img, half_lab = rel.root / "half" / "val_img", rel.root / "half" / "val_label"
    half_img.mkdir(parents=True)
    half_lab.mkdir(parents=True)
    for it in rel.items:
        small = it.rgb[::2, ::2]
        (half_img / it.image.name).write_bytes(F.jpeg_bytes(small))
        lab = _map(it.raw[::2, ::2], MAPILLARY_TABLE).astype(np.uint8)
        (half_lab / it.label.name).write_bytes(F.png_bytes(lab))
    ds = Mapillary(rel.root)
    assert len(ds) == 3
    s = ds[0]
    it = next(i for i in rel.items if i.image.name == s["path"].split("/")[-1])
    np.testing.assert_array_equal(s["label"].numpy(), _map(it.raw[::2, ::2], MAPILLARY_TABLE))
    # an interrupted copy is reported
    (half_img / rel.items[0].image.name).unlink()
    (half_lab / rel.items[0].label.name).unlink()
    with pytest.raises(DataError, match=r"incomplete \(2 of 3"):
        Mapillary(rel.root)


def test_eval_dataset_rescales_image_only(tmp_path):
    rel = F.make_cityscapes(tmp_path / "cs", cities=("lindau",), per_city=1, hw=(32, 64))
    ds = build_eval_dataset("cityscapes", rel.root, converted=False)
    s = ds[0]
    assert s["image"].shape == (3, 1024, 2048)  # fit 2048x1024 keeping the ratio
    assert s["label"].shape == (32, 64)  # untouched
    rel = F.make_bdd100k(tmp_path / "bdd", n=1, hw=(36, 64))
    s = build_eval_dataset("bdd", rel.root)[0]  # recipe alias
    assert s["image"].shape == (3, 720, 1280) and s["label"].shape == (36, 64)


# -- layout errors -----------------------------------------------------------------------------


def test_missing_root_and_folder_errors(tmp_path):
    with pytest.raises(DataError, match=r"gtav: .*nowhere not found.*images/NNNNN\.png") as e:
        GTAV(tmp_path / "nowhere")
    assert "Playing for Data" in str(e.value)
    rel = F.make_gtav(tmp_path / "gtav", n=1)
    for p in (rel.root / "labels").iterdir():
        p.unlink()
    (rel.root / "labels").rmdir()
    with pytest.raises(DataError, match=r"labels not found \(the GTAV labels folder\)"):
        GTAV(rel.root, converted=False)
    with pytest.raises(DataError, match="BDD100K.*bdd-data.berkeley.edu"):
        BDD100K(tmp_path / "bdd")
    with pytest.raises(DataError, match="synthia-dataset.net"):
        Synthia(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'kitti'"):
        build_dataset("kitti", tmp_path)


def test_empty_split_error(tmp_path):
    (tmp_path / "images" / "10k" / "val").mkdir(parents=True)
    (tmp_path / "labels" / "sem_seg" / "masks" / "val").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images in .*images/10k/val \(expected"):
        BDD100K(tmp_path, "val")


def test_unpaired_files_error(tmp_path):
    rel = F.make_urbansyn(tmp_path / "us", n=4)
    rel.items[2].label.unlink()
    (rel.root / "ss" / "ss_9999.png").write_bytes(F.png_bytes(np.zeros((4, 4), np.uint8)))
    with pytest.raises(DataError) as e:
        UrbanSyn(rel.root)
    msg = str(e.value)
    assert "do not pair up" in msg and "1 of 4 images" in msg and "rgb_0003.png" in msg
    assert "1 labels" in msg and "ss_9999.png" in msg and "urbansyn.org" in msg


def test_corrupt_file_is_named_at_load_time(tmp_path):
    rel = F.make_gtav(tmp_path / "gtav", n=3)
    F.truncate(rel.items[1].image)
    ds = GTAV(rel.root, converted=False)
    with pytest.raises(DataError, match=r"images/00002\.png: truncated PNG"):
        ds[1]


# -- training set: replacement of unreadable samples ------------------------------------------


def _train_set(root, n=6, **kw):
    rel = F.make_gtav(root, n=n, hw=(24, 32))
    tf = TrainTransform(crop_size=16, short_edges=(24,), max_size=64)
    return rel, TrainSet([GTAV(rel.root, converted=False)], tf, **kw)


def test_trainset_replaces_unreadable_sample_deterministically(tmp_path):
    rel, ts = _train_set(tmp_path / "g")
    F.truncate(rel.items[2].image)
    with pytest.warns(DataWarning, match=r"unreadable training sample 2 .*00003\.png.*instead"):
        a = ts[(2, 1234)]
    assert a["index"] == 2 and a["loaded_index"] != 2
    assert a["image"].shape == (3, 16, 16)
    _, ts2 = _train_set(tmp_path / "g2")
    F.truncate(ts2.sources[0].images[2])
    with pytest.warns(DataWarning):
        b = ts2[(2, 1234)]
    assert b["loaded_index"] == a["loaded_index"]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert ts.bad_files == {str(rel.items[2].image)}


def test_trainset_raises_after_too_many_bad_files(tmp_path):
    rel, ts = _train_set(tmp_path / "g", n=6)  # limit: max(1, 1% of 6) = 1 distinct bad file
    F.truncate(rel.items[0].image)
    F.truncate(rel.items[1].image)
    with pytest.warns(DataWarning), pytest.raises(DataError, match="too many unreadable"):
        for i in range(6):
            ts[(i, 7)]
    rel, ts = _train_set(tmp_path / "h", n=4, max_bad_fraction=1.0, max_consecutive_bad=2)
    for it in rel.items:
        F.truncate(it.image)
    with pytest.warns(DataWarning), pytest.raises(DataError, match="in a row"):
        ts[(0, 1)]


# -- sampler -----------------------------------------------------------------------------------


def test_sampler_gtav_subset_per_pass():
    s = InfiniteSourceSampler([100, 30], 10, subset_sizes=[40, None], seed=3)
    assert s.pass_length == 70
    subsets = []
    for p in range(3):
        idx = s.pass_indices(p)
        assert len(idx) == 70 and len(set(idx.tolist())) == 70
        g = idx[idx < 100]
        assert len(g) == 40 and g.min() >= 0
        np.testing.assert_array_equal(np.sort(idx[idx >= 100]), np.arange(100, 130))
        subsets.append(frozenset(g.tolist()))
    assert len(set(subsets)) == 3  # a fresh subset each pass
    # the stream is the passes back to back
    keys = s.keys_at(0, 140)
    assert [k[0] for k in keys[:70]] == s.pass_indices(0).tolist()
    assert [k[0] for k in keys[70:]] == s.pass_indices(1).tolist()
    assert keys[75][1] == sample_seed(3, 1, keys[75][0])


def test_sampler_oversized_subset_reads_whole_source():
    with pytest.warns(DataWarning, match="whole source"):
        s = InfiniteSourceSampler([5], 2, subset_sizes=[12403])
    assert s.pass_length == 5


@pytest.mark.parametrize("world", [2, 4])
def test_sampler_ddp_shards_union_is_global_batch(world):
    single = InfiniteSourceSampler([50, 7], 8, subset_sizes=[20, None], seed=5)
    ranks = [
        InfiniteSourceSampler([50, 7], 8, subset_sizes=[20, None], seed=5, rank=r, world_size=world)
        for r in range(world)
    ]
    it1 = iter(single)
    its = [iter(r) for r in ranks]
    for _ in range(10):  # crosses pass boundaries (pass length 27)
        glob = next(it1)
        parts = [next(i) for i in its]
        assert all(len(p) == 8 // world for p in parts)
        assert sum(parts, []) == glob


def test_sampler_resume_continues_exactly():
    a = InfiniteSourceSampler([13, 4], 4, subset_sizes=[9, None], seed=11)
    it = iter(a)
    seen = [next(it) for _ in range(7)]
    state = a.state_dict(consumed_batches=7)
    assert (state["pass"], state["offset"]) == divmod(7 * 4, 13)
    more = [next(it) for _ in range(5)]
    b = InfiniteSourceSampler([13, 4], 4, subset_sizes=[9, None], seed=11)
    b.load_state_dict(state)
    assert [x for _, x in zip(range(5), iter(b), strict=False)] == more
    # a different world size resumes the same global stream
    halves = [
        InfiniteSourceSampler([13, 4], 4, subset_sizes=[9, None], seed=11, rank=r, world_size=2)
        for r in range(2)
    ]
    for h in halves:
        h.load_state_dict(state)
    firsts = [next(iter(h)) for h in halves]
    assert firsts[0] + firsts[1] == more[0]
    assert seen[0] != more[0]
    other = InfiniteSourceSampler([13, 4], 4, subset_sizes=[9, None], seed=12)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="divisible"):
        InfiniteSourceSampler([13], 5, world_size=2)


def test_train_loader_state_dict_is_exact(tmp_path):
    rel, ts = _train_set(tmp_path / "g", n=5)
    mk = lambda: InfiniteSourceSampler([5], 2, subset_sizes=[3], seed=2)  # noqa: E731
    loader = build_loader(ts, mk(), num_workers=0)
    it = iter(loader)
    first = [next(it) for _ in range(4)]
    state = loader.state_dict()
    assert (state["pass"], state["offset"]) == divmod(4 * 2, 3)
    fifth = next(it)
    resumed = build_loader(ts, mk(), num_workers=0)
    resumed.load_state_dict(state)
    again = next(iter(resumed))
    assert again["index"].tolist() == fifth["index"].tolist()
    assert torch.equal(again["image"], fifth["image"]) and torch.equal(
        again["label"], fifth["label"]
    )
    assert first[0]["image"].shape == (2, 3, 16, 16) and first[0]["label"].dtype == torch.int64


def test_build_train_sampler_subsets_gtav_only(tmp_path):
    g = F.make_gtav(tmp_path / "g", n=6, hw=(24, 32))
    u = F.make_urbansyn(tmp_path / "u", n=3, hw=(24, 32))
    ts = TrainSet([GTAV(g.root, converted=False), UrbanSyn(u.root)])
    s = build_train_sampler(ts, 4, seed=1, gtav_subset=4)
    assert s.subset_sizes == (4, None) and s.pass_length == 7
    idx = s.pass_indices(0)
    assert (idx < 6).sum() == 4 and sorted(idx[idx >= 6].tolist()) == [6, 7, 8]
    assert build_train_sampler(ts, 4, gtav_subset=0).pass_length == 9
    assert ts.locate(7) == (1, 1) and ts[(7, 5)]["source"] == "urbansyn"


def test_layouts_describe_the_official_releases():
    """The one place the layouts are spelled, against the releases' documented structure."""
    from recyclelora.data.layouts import LAYOUTS

    assert {n: layout.describe() for n, layout in LAYOUTS.items()} == {
        "gtav": "images/NNNNN.png and labels/NNNNN.png",
        "synthia": "RGB/NNNNNNN.png and GT/LABELS/NNNNNNN.png",
        "urbansyn": "rgb/rgb_NNNN.png and ss/ss_NNNN.png",
        "cityscapes": "leftImg8bit/{train,val}/CITY/*_leftImg8bit.png and "
        "gtFine/{train,val}/CITY/*_gtFine_labelIds.png",
        "bdd100k": "images/10k/{train,val}/X.jpg and labels/sem_seg/masks/{train,val}/X.png",
        "mapillary": "config_v1.2.json, validation/images/X.jpg and validation/v1.2/labels/X.png",
    }
    assert set(LAYOUTS) == set(DATASETS) and all(DATASETS[n].layout is LAYOUTS[n] for n in LAYOUTS)
    city = LAYOUTS["cityscapes"]
    assert city.pairing("val", converted=True) == (
        "leftImg8bit/val/CITY/X_leftImg8bit.png <-> gtFine/val/CITY/X_gtFine_labelTrainIds.png"
    )
    with pytest.raises(ValueError, match="read as they are"):
        LAYOUTS["bdd100k"].label_files(Path("."), converted=True)
