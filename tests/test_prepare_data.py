"""Dataset conversion (recyclelora-prepare, training/prepare_data.py) on fake releases: outputs,
resumability, killed runs, wrong roots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from recyclelora.cli.prepare import main
from recyclelora.data import GTAV, Cityscapes, DataError, Mapillary, Synthia, read_image, read_label
from recyclelora.data.convert import LayoutError, convert, halve_image
from recyclelora.data.imageio import is_complete

from . import fake_datasets as F
from .test_data_labels import CITYSCAPES_ID_TO_TRAIN, MAPILLARY_EXPECTED, SYNTHIA_TABLE

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "prepare_data.py"
DEAD_PID = 4194304 + 4242  # above Linux's largest pid_max: never a live process


def _map(raw, table):
    out = np.full(raw.shape, 255, np.uint8)
    for k, v in table.items():
        out[raw == k] = v
    return out


def _run(*argv):
    return main([*argv, "--no-progress"])


def test_help_explains_every_dataset(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("cityscapes ROOT", "gtav ROOT", "synthia ROOT", "urbansyn ROOT", "mapillary ROOT"):
        assert word in out
    assert "_labelTrainIds.png" in out and "resumable" in out and "--workers" in out


def test_gtav_converts_fixes_sizes_and_resumes(tmp_path, capsys):
    rel = F.make_gtav(tmp_path / "gtav", n=5, mismatched=(3,))
    assert _run("gtav", str(rel.root), "--workers", "2") == 0
    report = capsys.readouterr().out
    assert "5 converted" in report and "1 label(s) differed in size" in report
    assert "00004.png: 64x42 -> 60x40" in report
    for it in rel.items:
        out = it.label.with_name(it.label.stem + "_labelTrainIds.png")
        got = read_label(out)
        expected = _map(it.raw, CITYSCAPES_ID_TO_TRAIN)
        if it.key == "00004":
            assert got.shape == it.rgb.shape[:2]
            expected = cv2.resize(expected, (60, 40), interpolation=cv2.INTER_NEAREST)
        np.testing.assert_array_equal(got, expected)
    ds = GTAV(rel.root)  # the dataset now reads the converted files, no warnings
    assert len(ds) == 5 and ds[3]["label"].shape == (40, 60)

    mtimes = {p: p.stat().st_mtime_ns for p in (rel.root / "labels").glob("*_labelTrainIds.png")}
    assert _run("gtav", str(rel.root), "--workers", "1") == 0
    assert "0 converted, 5 already done (skipped)" in capsys.readouterr().out
    assert mtimes == {p: p.stat().st_mtime_ns for p in mtimes}


def test_killed_run_is_redone(tmp_path, capsys):
    rel = F.make_gtav(tmp_path / "gtav", n=4)
    assert _run("gtav", str(rel.root), "--workers", "1") == 0
    capsys.readouterr()
    outs = sorted((rel.root / "labels").glob("*_labelTrainIds.png"))
    F.truncate(outs[1], 0.5)  # a cut-off output
    outs[2].unlink()  # ... and a missing one with its temp file left behind
    stale = outs[2].with_name(f".{outs[2].name}.{DEAD_PID}.tmp")
    stale.write_bytes(b"\x89PNG half")
    assert not is_complete(outs[1])
    assert _run("gtav", str(rel.root), "--workers", "1") == 0
    assert "2 converted, 2 already done (skipped)" in capsys.readouterr().out
    assert not stale.exists() and is_complete(outs[1]) and is_complete(outs[2])
    assert not list((rel.root / "labels").glob(".*.tmp"))
    for it in rel.items:
        out = it.label.with_name(it.label.stem + "_labelTrainIds.png")
        np.testing.assert_array_equal(read_label(out), _map(it.raw, CITYSCAPES_ID_TO_TRAIN))


def test_unreadable_input_is_reported(tmp_path, capsys):
    rel = F.make_gtav(tmp_path / "gtav", n=3)
    F.truncate(rel.items[0].label)
    assert _run("gtav", str(rel.root), "--workers", "1") == 1
    out = capsys.readouterr().out
    assert "2 converted" in out and "1 failed" in out and "FAILED" in out and "00001.png" in out


def test_cityscapes_and_synthia(tmp_path, capsys):
    cs = F.make_cityscapes(tmp_path / "cs", split="train", cities=("aachen",), per_city=2)
    F.make_cityscapes(tmp_path / "cs", split="val", cities=("lindau",), per_city=1, seed=8)
    assert _run("cityscapes", str(cs.root)) == 0
    assert "3 converted" in capsys.readouterr().out
    for it in cs.items:
        out = it.label.with_name(it.label.name.replace("labelIds", "labelTrainIds"))
        np.testing.assert_array_equal(read_label(out), _map(it.raw, CITYSCAPES_ID_TO_TRAIN))
    assert len(Cityscapes(cs.root, "train")) == 2 and len(Cityscapes(cs.root, "val")) == 1

    syn = F.make_synthia(tmp_path / "syn", n=2)
    assert _run("synthia", str(syn.root), "--workers", "2") == 0
    for it in syn.items:
        out = it.label.with_name(it.label.stem + "_labelTrainIds.png")
        np.testing.assert_array_equal(read_label(out), _map(it.raw, SYNTHIA_TABLE))
    assert len(Synthia(syn.root)) == 2


def test_mapillary_half_size_copy(tmp_path, capsys):
    rel = F.make_mapillary(tmp_path / "map", sizes=((65, 97), (64, 96)))
    assert _run("mapillary", str(rel.root)) == 0
    assert "2 converted" in capsys.readouterr().out
    table = {i: MAPILLARY_EXPECTED[n] for i, n in enumerate(F.MAPILLARY_V12_NAMES)}
    for it in rel.items:
        h, w = it.raw.shape
        img = read_image(rel.root / "half" / "val_img" / it.image.name)
        lab = read_label(rel.root / "half" / "val_label" / it.label.name)
        assert img.shape == (h // 2, w // 2, 3) and lab.shape == (h // 2, w // 2)
        # Pillow's NEAREST samples source index floor((i + 0.5) * n_in / n_out)
        ys = np.floor((np.arange(h // 2) + 0.5) * (h / (h // 2))).astype(int)
        xs = np.floor((np.arange(w // 2) + 0.5) * (w / (w // 2))).astype(int)
        np.testing.assert_array_equal(lab, _map(it.raw[ys][:, xs], table))
        if h % 2 == 0 and w % 2 == 0:
            np.testing.assert_array_equal(lab, _map(it.raw[1::2, 1::2], table))
    ds = Mapillary(rel.root)
    assert len(ds) == 2 and ds[0]["label"].shape[0] in (32,)
    assert _run("mapillary", str(rel.root)) == 0
    assert "2 already done" in capsys.readouterr().out


def test_halve_image_close_to_pillow_bicubic():
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:61, 0:90]
    img = np.stack([128 + 90 * np.sin(x / (4 + c) + y / 7) for c in range(3)], -1)
    img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    ours = halve_image(img)
    ref = np.asarray(Image.fromarray(img).resize((45, 30), resample=Image.BICUBIC))
    assert ours.shape == ref.shape == (30, 45, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2


def test_urbansyn_needs_no_conversion(tmp_path, capsys):
    rel = F.make_urbansyn(tmp_path / "us", n=2)
    assert _run("urbansyn", str(rel.root)) == 0
    assert "2 image/label pairs" in capsys.readouterr().out
    assert _run("urbansyn", str(tmp_path / "nope")) == 2
    assert "urbansyn" in capsys.readouterr().err


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("gtav", "images/NNNNN.png and labels/NNNNN.png"),
        ("synthia", "RGB/NNNNNNN.png and GT/LABELS/NNNNNNN.png"),
        ("cityscapes", "gtFine/{train,val}/CITY/*_gtFine_labelIds.png"),
        ("mapillary", "config_v1.2.json, validation/images/X.jpg"),
    ],
)
def test_wrong_root_says_what_was_expected(tmp_path, capsys, dataset, expected):
    (tmp_path / "something_else").mkdir()
    assert _run(dataset, str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "does not look like" in err and expected in err and "something_else/" in err


def test_library_raises_and_only_the_command_exits(tmp_path, capsys):
    """convert() raises an exception (a DataError, not SystemExit); main() turns it into 2."""
    (tmp_path / "something_else").mkdir()
    with pytest.raises(LayoutError, match="does not look like the GTAV release") as e:
        convert("gtav", tmp_path)
    assert isinstance(e.value, DataError) and not isinstance(e.value, SystemExit)
    assert e.value.path == str(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(LayoutError, match="no label files found"):
        convert("gtav", tmp_path)
    with pytest.raises(ValueError, match="nothing to convert for 'bdd100k'"):
        convert("bdd100k", tmp_path)
    assert _run("gtav", str(tmp_path)) == 2
    assert capsys.readouterr().err.startswith("error: no label files found")


def test_script_runs_as_a_program(tmp_path):
    """The README's command: the thin wrapper, run from another folder."""
    rel = F.make_gtav(tmp_path / "gtav", n=1)
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "gtav", str(rel.root), "--no-progress"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "1 converted" in r.stdout
