"""The service's parts without a server: decoding with its limits, the response formats, the
ASGI guards, the settings, the graceful-stop drain and the remote crop runner.

References: arrays written by OpenCV (an independent encoder) and their expected decodings
computed by hand (np.rot90 for EXIF, the high byte for 16-bit), brute-force pixel counts, and
pycocotools decoding the run-length masks.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import struct
import threading
import time
import zlib
from dataclasses import replace

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from recyclelora.data import CLASS_NAMES, palette
from recyclelora.deploy import ExportError, Manifest, load_export, segment
from recyclelora.deploy.segment import evaluation_scale
from recyclelora.serving.drain import Drain
from recyclelora.serving.errors import RequestError
from recyclelora.serving.guards import BearerAuth, UploadLimits
from recyclelora.serving.images import decode_image, encode_png
from recyclelora.serving.remote import RemoteRunner
from recyclelora.serving.render import blend, class_fractions, coco_rle
from recyclelora.serving.settings import MAKE_ONE, Settings, SettingsError, newest_export

LIMIT = 10_000_000


def blocks(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A blocky RGB frame (16-pixel squares): survives JPEG well enough to compare."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, 16, 0), 16, 1)


def cv_encode(ext: str, rgb_or_gray: np.ndarray, params: list[int] | None = None) -> bytes:
    a = rgb_or_gray if rgb_or_gray.ndim == 2 else rgb_or_gray[:, :, ::-1]
    ok, buf = cv2.imencode(ext, a, params or [])
    assert ok
    return buf.tobytes()


def refused(data: bytes, status: int, match: str, limit: int = LIMIT) -> None:
    with pytest.raises(RequestError, match=match) as e:
        decode_image(data, limit)
    assert e.value.status == status


# ---------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------


def test_png_and_lossless_webp_decode_exactly():
    rgb = blocks(48, 64)
    assert np.array_equal(decode_image(cv_encode(".png", rgb), LIMIT), rgb)
    webp = cv_encode(".webp", rgb, [cv2.IMWRITE_WEBP_QUALITY, 101])  # > 100: lossless
    assert np.array_equal(decode_image(webp, LIMIT), rgb)


def test_jpeg_decodes_close_to_the_original():
    rgb = blocks(64, 96)
    got = decode_image(cv_encode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, 95]), LIMIT)
    assert got.shape == rgb.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - rgb).mean() < 4


def test_rgba_grayscale_and_palette_become_rgb():
    rgb = blocks(32, 32)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    assert np.array_equal(decode_image(buf.tobytes(), LIMIT), rgb)  # alpha dropped
    gray = rgb[:, :, 0]
    assert np.array_equal(decode_image(cv_encode(".png", gray), LIMIT), np.dstack([gray] * 3))
    pal = io.BytesIO()
    Image.fromarray(rgb).quantize(16).save(pal, "PNG")
    expected = np.asarray(Image.open(io.BytesIO(pal.getvalue())).convert("RGB"))
    assert np.array_equal(decode_image(pal.getvalue(), LIMIT), expected)


def test_16_bit_keeps_the_high_byte_in_gray_and_colour():
    g = np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21 + 5
    assert np.array_equal(decode_image(cv_encode(".png", g), LIMIT)[:, :, 1], (g >> 8))
    c = np.stack([g, g[::-1], 65535 - g], axis=2)
    assert np.array_equal(decode_image(cv_encode(".png", c), LIMIT), (c >> 8).astype(np.uint8))


def test_exif_orientation_is_applied():
    rgb = blocks(64, 96)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, exif=exif)
    got = decode_image(buf.getvalue(), LIMIT)
    expected = np.rot90(rgb, k=-1)
    assert got.shape == expected.shape == (96, 64, 3)
    assert np.abs(got.astype(int) - expected).mean() < 4


def png_header_only(w: int, h: int) -> bytes:
    """A valid PNG signature and IHDR claiming (w, h), a few bytes of pixels: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_bad_uploads_are_refused_with_what_was_wrong():
    good_png, good_jpg = cv_encode(".png", blocks(64, 64)), cv_encode(".jpg", blocks(64, 64))
    refused(b"", 400, "empty")
    refused(b"hello, this is not an image" * 10, 400, "not a readable JPEG, PNG or WebP")
    refused(good_png[: len(good_png) // 2], 400, "truncated or corrupt")
    refused(good_jpg[: len(good_jpg) // 2], 400, "truncated or corrupt")
    gif = io.BytesIO()
    Image.fromarray(blocks(16, 16)).save(gif, "GIF")
    refused(gif.getvalue(), 415, "GIF images are not accepted")
    refused(good_png, 413, "64 x 64 = 4096 pixels, over .* limit of 4000", limit=4000)


def test_a_decompression_bomb_is_refused_before_decoding():
    for w, h in [(20_000, 20_000), (200_000, 200_000)]:  # over our limit; over Pillow's guard
        bomb = png_header_only(w, h)
        assert len(bomb) < 200
        t0 = time.perf_counter()
        refused(bomb, 413, "pixels")
        assert time.perf_counter() - t0 < 1.0  # nothing was decoded (a real decode: minutes)


def test_label_png_is_single_channel_train_ids():
    labels = np.random.default_rng(0).integers(0, 19, (30, 50), dtype=np.uint8)
    image = Image.open(io.BytesIO(encode_png(labels)))
    assert image.mode == "L" and np.array_equal(np.asarray(image), labels)


# ---------------------------------------------------------------------------------------------
# response formats
# ---------------------------------------------------------------------------------------------


def test_fractions_and_rle_masks_against_brute_force_and_pycocotools():
    from pycocotools import mask as coco_mask

    labels = np.random.default_rng(1).integers(0, 5, (37, 53), dtype=np.uint8)
    fractions = class_fractions(labels, CLASS_NAMES)
    assert list(fractions) == list(CLASS_NAMES)
    for k, name in enumerate(CLASS_NAMES):
        assert fractions[name] == sum(int(v == k) for v in labels.ravel()) / labels.size
    for k in range(5):
        rle = coco_rle(labels == k)
        assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
        coded = {"size": rle["size"], "counts": rle["counts"].encode()}
        assert np.array_equal(coco_mask.decode(coded), (labels == k).astype(np.uint8))
        assert coco_mask.area(coded) == int((labels == k).sum())


def test_blend_and_legend():
    rgb = blocks(64, 96)
    labels = np.zeros((64, 96), np.uint8)
    labels[:, 48:] = 10  # road | sky
    pal = palette()[:19].tolist()
    assert np.array_equal(blend(rgb, labels, pal, CLASS_NAMES, alpha=0.0, legend=False), rgb)
    colours = blend(rgb, labels, pal, CLASS_NAMES, alpha=1.0, legend=False)
    assert np.array_equal(colours, np.asarray(pal, np.uint8)[labels])
    with_legend = blend(rgb, labels, pal, CLASS_NAMES, alpha=0.5)
    assert with_legend.shape[0] == 64 and with_legend.shape[1] > 96
    panel = with_legend[:, 96:]
    for k in (0, 10):  # each present class has its swatch in the panel, an absent one none
        assert (panel == pal[k]).all(axis=2).any()
    assert not (panel == pal[13]).all(axis=2).any()


# ---------------------------------------------------------------------------------------------
# ASGI guards
# ---------------------------------------------------------------------------------------------


async def echo_app(scope, receive, send):
    """Reads the whole body, answers its length."""
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RuntimeError("client went away")  # what a form parser does
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


def call(app, method="POST", path="/segment", **kw) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


def test_bearer_auth():
    app = BearerAuth(echo_app, key="s3cret")
    r = call(app, content=b"abc")
    assert r.status_code == 401 and "missing API key" in r.json()["error"]
    assert r.headers["www-authenticate"] == "Bearer"
    r = call(app, content=b"abc", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "wrong API key" in r.json()["error"]
    r = call(app, content=b"abc", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.text == "3"
    for open_path in ("/livez", "/readyz", "/metrics"):
        assert call(app, "GET", open_path).status_code == 200
    assert call(app, "GET", "/docs.json").status_code == 401


def test_upload_limits_by_header_and_by_count():
    app = UploadLimits(echo_app, max_bytes=1000, timeout_s=5)
    assert call(app, content=b"x" * 1000).text == "1000"
    r = call(app, content=b"x" * 1001)  # Content-Length says so: refused unread
    assert r.status_code == 413 and "limit" in r.json()["error"]

    async def chunks():
        for _ in range(5):
            yield b"x" * 300  # no Content-Length: counted as it arrives

    r = call(app, content=chunks())
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert call(app, content=b"1", headers={"content-length": "abc"}).status_code == 400


def test_upload_limits_time_out_a_slow_body():
    async def slow_receive_app(scope, receive, send):
        app = UploadLimits(echo_app, max_bytes=1000, timeout_s=0.3)
        messages = [{"type": "http.request", "body": b"ab", "more_body": True}]

        async def receive_slowly():
            if messages:
                return messages.pop()
            await asyncio.sleep(5)  # the client stalls
            return {"type": "http.request", "body": b"", "more_body": False}

        sent = []

        async def record(message):
            sent.append(message)

        await app({"type": "http", "headers": []}, receive_slowly, record)
        return sent

    t0 = time.perf_counter()
    sent = asyncio.run(slow_receive_app(None, None, None))
    assert time.perf_counter() - t0 < 2
    assert sent[0]["status"] == 408 and b"longer than 0.3 s" in sent[1]["body"]


# ---------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------


def fake_export(folder, mtime: float):
    folder.mkdir(parents=True)
    (folder / "model.json").write_text("{}")
    os.utime(folder / "model.json", (mtime, mtime))
    return folder


def test_the_newest_finished_export_is_served(tmp_path):
    fake_export(tmp_path / "a", 1000)
    newest = fake_export(tmp_path / "b", 3000)
    fake_export(tmp_path / "c", 2000)
    fake_export(tmp_path / ".d.123.tmp", 9000)  # an export still being written
    (tmp_path / "e").mkdir()  # not an export
    assert newest_export(tmp_path) == newest
    assert Settings.from_env({}, exports=tmp_path).export == newest
    given = Settings.from_env({"RECYCLELORA_EXPORT": str(tmp_path / "a")}, exports=tmp_path)
    assert given.export == tmp_path / "a"


def test_settings_errors_say_what_to_do(tmp_path):
    with pytest.raises(SettingsError, match="no export to serve") as e:
        Settings.from_env({}, exports=tmp_path / "none")
    assert MAKE_ONE in str(e.value) and "make demo" in MAKE_ONE and "merge_and_export" in MAKE_ONE
    with pytest.raises(SettingsError, match="not an export directory"):
        Settings.from_env({"RECYCLELORA_EXPORT": str(tmp_path)})
    fake_export(tmp_path / "x", 1)
    env = {"RECYCLELORA_EXPORT": str(tmp_path / "x")}
    with pytest.raises(SettingsError, match="RECYCLELORA_MAX_PIXELS='lots' is not a number"):
        Settings.from_env({**env, "RECYCLELORA_MAX_PIXELS": "lots"})
    with pytest.raises(SettingsError, match="must be positive"):
        Settings.from_env({**env, "RECYCLELORA_MAX_UPLOAD_MB": "0"})
    with pytest.raises(SettingsError, match="RECYCLELORA_BACKEND must be one of"):
        Settings.from_env({**env, "RECYCLELORA_BACKEND": "cuda"})
    s = Settings.from_env({**env, "RECYCLELORA_MAX_UPLOAD_MB": "1.5", "RECYCLELORA_API_KEY": "k"})
    assert s.max_upload_bytes == 1536 * 1024 and s.api_key == "k" and s.max_pixels == 4096**2


# ---------------------------------------------------------------------------------------------
# graceful stop
# ---------------------------------------------------------------------------------------------


def test_drain_holds_the_stop_signal_until_requests_finished():
    handed_over = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda *_: handed_over.set())
    try:
        drain = Drain(idle_s=0.2, max_s=10)
        drain.install(signal.SIGUSR1)
        release = threading.Event()

        def request():
            with drain.track():
                release.wait(5)

        worker = threading.Thread(target=request)
        worker.start()
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.6)
        assert not handed_over.is_set()  # a request is still in flight
        release.set()
        worker.join()
        assert handed_over.wait(3)  # idle for idle_s: the server's handler runs
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_drain_gives_up_after_max_s():
    drain = Drain(idle_s=10, max_s=0.3)
    with drain.track():
        t0 = time.perf_counter()
        drain.wait()
        assert 0.25 < time.perf_counter() - t0 < 2


# ---------------------------------------------------------------------------------------------
# the remote crop runner
# ---------------------------------------------------------------------------------------------


def test_segment_through_the_remote_runner_is_the_local_one(demo_export):
    local = load_export(demo_export, backend="onnxruntime")
    calls = []

    def predict(crops):
        calls.append(len(crops))
        return local.predict_crops(crops)

    remote = RemoteRunner(Manifest.read(demo_export), predict)
    frame = blocks(160, 320, seed=3)
    assert np.array_equal(segment(remote, frame), segment(local, frame))
    assert calls and max(calls) <= local.max_batch
    broken = RemoteRunner(Manifest.read(demo_export), lambda c: local.predict_crops(c)[:, :3])
    with pytest.raises(RuntimeError, match="returned"):
        segment(broken, frame)


# ---------------------------------------------------------------------------------------------
# the model process: not ready until loaded and warm
# ---------------------------------------------------------------------------------------------


def test_the_model_service_is_ready_only_once_warm(demo_export, monkeypatch):
    import importlib

    from bentoml.exceptions import ServiceUnavailable

    monkeypatch.setenv("RECYCLELORA_EXPORT", str(demo_export))
    service = importlib.import_module("serving.service")
    release, warmed = threading.Event(), []

    def slow_load(directory, backend):  # an engine build or a large graph: takes a while
        release.wait(10)
        runner = load_export(directory, backend="onnxruntime")
        original = runner.predict_crops
        runner.predict_crops = lambda crops: warmed.append(len(crops)) or original(crops)
        return runner

    monkeypatch.setattr(service, "load_export", slow_load)
    model = service.SegmentationModel.inner()
    assert not model.__is_ready__() and model.__is_alive__()
    crops = np.zeros((1, 3, 128, 128), np.float32)
    with pytest.raises(ServiceUnavailable, match="still loading"):
        model.predict_crops(crops)
    release.set()
    assert model.ready.wait(30) and model.__is_ready__()
    assert warmed == [1, 3]  # warmed at batch 1 and at the export's max batch
    assert model.predict_crops(crops).shape == (1, 19, 128, 128)


def test_a_model_that_fails_to_load_is_not_alive(demo_export, monkeypatch):
    import importlib

    from bentoml.exceptions import ServiceUnavailable

    monkeypatch.setenv("RECYCLELORA_EXPORT", str(demo_export))
    service = importlib.import_module("serving.service")

    def broken(directory, backend):
        raise ExportError("model.onnx differs from its SHA-256 in model.json")

    monkeypatch.setattr(service, "load_export", broken)
    model = service.SegmentationModel.inner()
    deadline = time.monotonic() + 10
    while model.__is_alive__() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not model.__is_alive__() and not model.__is_ready__()
    with pytest.raises(ServiceUnavailable, match="failed to load: ExportError: model.onnx differs"):
        model.predict_crops(np.zeros((1, 3, 128, 128), np.float32))


def test_max_side_shrinks_the_evaluation_scale(demo_export):
    manifest = Manifest.read(demo_export)  # eval_scale (320, 192)
    assert evaluation_scale(manifest) == (320, 192)
    assert evaluation_scale(manifest, 1000) == (320, 192)  # never enlarged
    assert evaluation_scale(manifest, 160) == (160, 96)
    runner = load_export(demo_export, backend="onnxruntime")
    frame = blocks(160, 320, seed=5)
    coarse = segment(runner, frame, max_side=160)
    runner.manifest = replace(manifest, eval_scale=[160, 96])  # the same, said by the export
    assert np.array_equal(coarse, segment(runner, frame))
    assert coarse.shape == frame.shape[:2]
    with pytest.raises(ValueError, match="max_side must be >= 1"):
        evaluation_scale(manifest, 0)
