"""serving/client.py (library and CLI) and benchmarks/bench_serving.py against the real
``bentoml serve`` of a tiny export; the references are the inference API's own answers."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from recyclelora.deploy import Manifest, load_export, segment
from recyclelora.deploy.manifest import MANIFEST
from recyclelora.serving.render import blend
from serving.client import SegmentationClient, ServiceError, main

from .serving_server import REPO, encoded, free_port, scene, serving

HW = (90, 170)  # not the export's eval scale (160 x 320 after rescaling) nor a crop multiple


def frame(seed: int, hw: tuple[int, int] = HW) -> np.ndarray:
    return scene(seed, *hw)


def png(rgb: np.ndarray) -> bytes:
    return encoded(rgb, "PNG")


def jpeg(rgb: np.ndarray) -> bytes:
    return encoded(rgb, "JPEG", quality=85)


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def server(demo_export, tmp_path_factory):
    with serving(demo_export, tmp_path_factory.mktemp("bentoml_home")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with SegmentationClient(server.url, api_key="") as c:
        yield c


@pytest.fixture(scope="module")
def runner(demo_export):
    return load_export(demo_export, "onnxruntime")


def test_segment_equals_the_inference_api_for_a_path_bytes_and_an_array(client, runner, tmp_path):
    a, b, c = frame(1), frame(2), frame(3)
    (tmp_path / "a.png").write_bytes(png(a))
    b_jpeg = jpeg(b)  # the server decodes it as Pillow does here
    for image, rgb in ((tmp_path / "a.png", a), (b_jpeg, decoded(b_jpeg)), (c, c)):
        got = client.segment(image)
        want = segment(runner, rgb)
        assert got.dtype == np.uint8 and got.shape == HW
        np.testing.assert_array_equal(got, want)
    assert len(np.unique(want)) > 1  # a label map, not a constant


def test_segment_whole_mode_and_max_side_reach_the_server(client, runner):
    rgb = frame(4)
    np.testing.assert_array_equal(client.segment(rgb, mode="whole"), segment(runner, rgb, "whole"))
    want = segment(runner, rgb, max_side=85)
    assert not np.array_equal(want, segment(runner, rgb))  # a coarser evaluation scale
    np.testing.assert_array_equal(client.segment(rgb, max_side=85), want)


def test_segment_json_fractions_and_masks_match_the_label_map(client, runner):
    rgb = frame(5)
    want = segment(runner, rgb)
    answer = client.segment_json(rgb, masks=True)
    classes = runner.manifest.classes
    assert (answer["width"], answer["height"], answer["mode"]) == (HW[1], HW[0], "slide")
    counts = np.bincount(want.ravel(), minlength=len(classes))
    expected = {n: c / want.size for n, c in zip(classes, counts, strict=True)}
    assert answer["fractions"] == pytest.approx(expected, abs=1e-12)
    assert sorted(m["id"] for m in answer["masks"]) == np.unique(want).tolist()
    for m in answer["masks"]:
        rle = {"size": m["rle"]["size"], "counts": m["rle"]["counts"].encode()}
        np.testing.assert_array_equal(coco_mask.decode(rle), want == m["id"])
        assert m["name"] == classes[m["id"]]
    assert "masks" not in client.segment_json(rgb)


def test_overlay_is_the_blended_frame_with_a_legend_panel(client, runner):
    rgb = frame(6)
    labels = segment(runner, rgb)
    m = runner.manifest
    with_legend = decoded(client.overlay(rgb, alpha=0.6))
    want = blend(rgb, labels, m.palette, m.classes, 0.6, legend=True)
    assert with_legend.shape == want.shape and want.shape[1] > HW[1]
    # JPEG loses high frequencies only: blurred, alpha 0.55 or labels one pixel off are > 2
    blurred = [cv2.GaussianBlur(x.astype(np.float32), (7, 7), 2) for x in (with_legend, want)]
    assert np.abs(blurred[0] - blurred[1]).mean() < 1.6
    plain = client.overlay(rgb, legend=False)
    assert plain[:3] == b"\xff\xd8\xff" and decoded(plain).shape == (*HW, 3)


def test_metadata_describes_the_served_export(client, demo_export):
    meta = client.metadata()
    manifest = Manifest.read(demo_export)
    assert meta["classes"] == manifest.classes and meta["crop"] == manifest.crop
    assert (
        meta["export_sha256"] == hashlib.sha256((demo_export / MANIFEST).read_bytes()).hexdigest()
    )
    assert meta["backend"]["name"] == "onnxruntime"
    assert client.ready()


def test_server_errors_raise_with_the_status_and_the_servers_message(client):
    with pytest.raises(ServiceError) as e:
        client.segment(b"this is not an image")
    assert e.value.status == 400
    assert e.value.message == "the upload is not a readable JPEG, PNG or WebP image"
    with pytest.raises(ServiceError) as e:
        client.segment(frame(7), max_side=8)
    assert e.value.status == 400 and e.value.message.startswith("invalid request: query.max_side")


def test_an_unreachable_server_is_not_ready_and_says_how_to_start_one():
    client = SegmentationClient(f"http://127.0.0.1:{free_port()}", timeout=5)
    assert not client.ready()
    with pytest.raises(ServiceError) as e:
        client.metadata()
    assert e.value.status is None and "make serve" in e.value.message


def test_arrays_other_than_rgb_uint8_are_refused_before_sending():
    client = SegmentationClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ValueError, match="RGB uint8"):
        client.segment(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        client.segment(np.zeros((8, 8, 3), np.float32))


def test_cli_writes_label_maps_reports_a_corrupt_frame_and_exits_1(
    server, runner, tmp_path, capsys
):
    frames = tmp_path / "frames"
    frames.mkdir()
    rgbs = {"a": frame(8), "b": frame(9, (120, 100)), "c": frame(10)}
    (frames / "a.png").write_bytes(png(rgbs["a"]))
    (frames / "b.jpg").write_bytes(jpeg(rgbs["b"]))
    (frames / "c.webp").write_bytes(png(rgbs["c"]))  # the server sniffs content, not the name
    (frames / "corrupt.jpg").write_bytes(jpeg(rgbs["a"])[:200])
    (frames / "notes.txt").write_text("not a frame")
    out = tmp_path / "labels"
    code = main([str(frames), "--out", str(out), "--url", server.url, "--concurrency", "2"])
    err = capsys.readouterr().err
    assert code == 1
    assert "corrupt.jpg" in err and "truncated or corrupt" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]
    rgbs["b"] = decoded(jpeg(rgbs["b"]))
    for stem, rgb in rgbs.items():
        written = np.asarray(Image.open(out / f"{stem}.png"))
        np.testing.assert_array_equal(written, segment(runner, rgb))


def test_cli_overlay_of_one_file_exits_0(server, tmp_path):
    (tmp_path / "a.png").write_bytes(png(frame(11)))
    out = tmp_path / "overlays"
    assert main([str(tmp_path / "a.png"), "--out", str(out), "--url", server.url, "--overlay"]) == 0
    assert decoded((out / "a.jpg").read_bytes()).shape[0] == HW[0]


def test_cli_exits_2_for_bad_arguments_and_an_unreachable_server(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(png(frame(12)))
    (tmp_path / "a.jpg").write_bytes(jpeg(frame(12)))
    out = str(tmp_path / "out")
    url = f"http://127.0.0.1:{free_port()}"
    assert main([str(tmp_path / "missing"), "--out", out, "--url", url]) == 2
    assert main([str(tmp_path), "--out", out, "--url", url]) == 2  # a.png, a.jpg -> a.png twice
    assert "would both write a.png" in capsys.readouterr().err
    (tmp_path / "a.jpg").unlink()
    assert main([str(tmp_path), "--out", out, "--url", url]) == 2
    assert "make serve" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_client_imports_neither_torch_nor_bentoml():
    code = "import sys, serving.client; print(sorted({'torch', 'bentoml'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_concurrent_requests_past_a_hundred_model_calls_all_succeed(client, runner):
    """The HTTP process calls the model process once per batch of crops; BentoML's client
    replaces its connection pool every 100 calls, which must not fail the calls in flight."""
    frames = [frame(20 + i) for i in range(3)]
    want = [segment(runner, rgb, "whole") for rgb in frames]  # "whole": one call per request
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda i: client.segment(frames[i % 3], mode="whole"), range(120)))
    for i, labels in enumerate(got):
        np.testing.assert_array_equal(labels, want[i % 3])


@pytest.mark.slow
def test_the_quick_load_benchmark_against_the_server_has_no_errors(server, demo_export, tmp_path):
    command = [sys.executable, "benchmarks/bench_serving.py", "--quick", "--url", server.url]
    command += ["--export", str(demo_export), "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "serving_load.json").read_text())
    assert result["errors"] == 0
    assert [r["requests"] for r in result["rows"]] == [24, 24, 24]
    for r in result["rows"]:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["req_per_s"] > 0
    assert result["label_agreement_service_vs_direct"] > 0.999
    assert result["meta"]["service_backend"]["name"] == "onnxruntime"
    assert "| service, 4 clients | 0 |" in done.stdout
