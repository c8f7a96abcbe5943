"""The real service: ``bentoml serve`` on 127.0.0.1 and a free port, over a tiny export.

References: the inference API (``segment(load_export(export, "onnxruntime"), frame)``) on the
same frame and export, pycocotools decoding the masks, the export's own ``model.json``. Every
bad request of the service's table is sent, then a good request must still succeed.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from recyclelora.data import CLASS_NAMES
from recyclelora.deploy import load_export, segment
from recyclelora.serving.render import blend, class_fractions

from .serving_server import (
    BENTOML,
    REPO,
    SERVICE,
    encoded,
    scene,
    server_env,
    serving,
    start,
    stop,
)
from .test_serving_parts import png_header_only

pytestmark = pytest.mark.slow

MAX_PIXELS = 250_000  # the frames below are 120 x 240 = 28,800
LIMITS = {
    "RECYCLELORA_MAX_PIXELS": str(MAX_PIXELS),
    "RECYCLELORA_MAX_UPLOAD_MB": "1",
    "RECYCLELORA_UPLOAD_TIMEOUT": "2",
}


def png(rgb: np.ndarray) -> bytes:
    return encoded(rgb, "PNG")


def jpeg(rgb: np.ndarray) -> bytes:
    return encoded(rgb, "JPEG")


def gif(rgb: np.ndarray) -> bytes:
    return encoded(rgb, "GIF")


FRAME = scene(0, 120, 240)
FRAME_PNG = png(FRAME)


@pytest.fixture(scope="module")
def server(demo_export, tmp_path_factory):
    with serving(demo_export, tmp_path_factory.mktemp("bentoml"), **LIMITS) as s:
        yield s


@pytest.fixture(scope="module")
def local(demo_export):
    return load_export(demo_export, backend="onnxruntime")


def post(server, path: str, data: bytes = FRAME_PNG, params=None, **kw) -> httpx.Response:
    files = {"image": ("frame.png", data, "image/png")}
    return httpx.post(server.url + path, files=files, params=params, timeout=60, **kw)


def assert_still_serves(server) -> None:
    r = post(server, "/segment")
    assert r.status_code == 200, r.text
    assert np.asarray(Image.open(io.BytesIO(r.content))).shape == FRAME.shape[:2]


def labels_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.mode == "L"
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------
# each endpoint, against the inference API
# ---------------------------------------------------------------------------------------------


def test_segment_equals_the_inference_api(server, local):
    expected = segment(local, FRAME)
    assert len(np.unique(expected)) > 1  # a frame with several classes
    assert np.array_equal(labels_of(post(server, "/segment")), expected)
    whole = labels_of(post(server, "/segment", params={"mode": "whole"}))
    assert np.array_equal(whole, segment(local, FRAME, mode="whole"))
    small = labels_of(post(server, "/segment", params={"max_side": 100}))
    reference = segment(local, FRAME, max_side=100)
    assert not np.array_equal(reference, segment(local, FRAME))  # a coarser evaluation scale
    assert np.array_equal(small, reference)


def test_jpeg_upload_equals_the_inference_api_on_the_decoded_frame(server, local):
    buf = io.BytesIO()
    Image.fromarray(FRAME).save(buf, "JPEG", quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    got = labels_of(post(server, "/segment", buf.getvalue()))
    assert np.array_equal(got, segment(local, decoded))


def test_segment_json_fractions_and_masks(server, local):
    from pycocotools import mask as coco_mask

    r = post(server, "/segment_json", params={"masks": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = segment(local, FRAME)
    assert (body["width"], body["height"], body["mode"]) == (240, 120, "slide")
    assert body["inference_ms"] > 0
    assert body["fractions"] == pytest.approx(class_fractions(expected, CLASS_NAMES), abs=1e-12)
    assert sum(body["fractions"].values()) == pytest.approx(1.0)
    assert [m["id"] for m in body["masks"]] == sorted(np.unique(expected).tolist())
    for m in body["masks"]:
        assert m["name"] == CLASS_NAMES[m["id"]]
        rle = {"size": m["rle"]["size"], "counts": m["rle"]["counts"].encode()}
        assert np.array_equal(coco_mask.decode(rle), (expected == m["id"]).astype(np.uint8))
    plain = post(server, "/segment_json").json()
    assert "masks" not in plain and plain["fractions"] == body["fractions"]


def test_overlay_is_the_blended_frame_with_a_legend(server, local, demo_export):
    r = post(server, "/overlay", params={"alpha": 0.6})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    picture = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    manifest = json.loads((demo_export / "model.json").read_text())
    expected = blend(FRAME, segment(local, FRAME), manifest["palette"], CLASS_NAMES, 0.6)
    assert picture.shape == expected.shape and picture.shape[1] > FRAME.shape[1]
    assert np.abs(picture.astype(int) - expected).mean() < 3  # JPEG


def test_metadata(server, demo_export):
    r = httpx.get(server.url + "/metadata", timeout=30)
    assert r.status_code == 200
    meta = r.json()
    manifest = json.loads((demo_export / "model.json").read_text())
    assert meta["classes"] == list(CLASS_NAMES) == manifest["classes"]
    assert meta["palette"] == manifest["palette"] and meta["preset"] == "tiny"
    assert meta["backend"]["name"] == "onnxruntime"
    sha = hashlib.sha256((demo_export / "model.json").read_bytes()).hexdigest()
    assert meta["export_sha256"] == sha
    assert meta["versions"]["bentoml"] and meta["versions"]["onnxruntime"]
    assert "path" not in meta["source"]  # no server path leaks to clients


def test_health_metrics_and_openapi(server):
    for path in ("/livez", "/readyz"):
        assert httpx.get(server.url + path).status_code == 200
    post(server, "/segment")
    metrics = httpx.get(server.url + "/metrics").text
    assert re.search(r'request_duration_seconds_bucket\{[^}]*endpoint="/segment"', metrics)
    spec = httpx.get(server.url + "/docs.json").json()
    for path in ("/segment", "/segment_json", "/overlay", "/metadata", "/livez", "/metrics"):
        assert path in spec["paths"]
    body = spec["paths"]["/segment"]["post"]["requestBody"]["content"]
    assert "image" in body["multipart/form-data"]["schema"]["properties"]
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def batching_totals(server) -> tuple[float, float]:
    """(crops, batches) the model process has run through its batchable API so far."""
    metrics = httpx.get(server.url + "/metrics").text
    total = {}
    for part in ("sum", "count"):
        pattern = rf'adaptive_batch_size_{part}\{{[^}}]*method_name="predict_crops"[^}}]*\}} (\S+)'
        total[part] = sum(float(v) for v in re.findall(pattern, metrics))
    return total["sum"], total["count"]


def test_concurrent_requests_share_batches(server):
    crops0, batches0 = batching_totals(server)
    with cf.ThreadPoolExecutor(12) as pool:  # whole mode: one crop per request
        codes = list(
            pool.map(lambda _: post(server, "/segment", params={"mode": "whole"}), range(24))
        )
    assert all(r.status_code == 200 for r in codes)
    crops, batches = batching_totals(server)
    assert crops - crops0 == 24
    assert batches - batches0 < 24  # some crops of different requests ran as one batch


# ---------------------------------------------------------------------------------------------
# the bad-input table: each a 4xx JSON error saying what was wrong, then a good request
# ---------------------------------------------------------------------------------------------


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def files(data: bytes, name: str = "image", kind: str = "image/png"):
    return {name: ("frame", data, kind)}


BAD = {
    "empty upload": (dict(files=files(b"")), 400, "empty"),
    "empty body": (dict(headers={"content-type": "multipart/form-data; boundary=x"}), 400, ""),
    "non-image bytes": (dict(files=files(b"GET / HTTP/1.1\r\n" * 50)), 400, "not a readable"),
    "truncated jpeg": (dict(files=files(truncated(jpeg(FRAME)))), 400, "truncated or corrupt"),
    "truncated png": (dict(files=files(truncated(FRAME_PNG))), 400, "truncated or corrupt"),
    "decompression bomb": (dict(files=files(png_header_only(50_000, 50_000))), 413, "pixels"),
    "over the pixel limit": (dict(files=files(png(scene(1, 500, 600)))), 413, "limit of 250000"),
    "over the upload limit": (dict(files=files(b"\0" * (2 << 20))), 413, "limit of 1 MB"),
    "wrong content type": (dict(json={"image": "aGVsbG8="}), 415, "multipart/form-data"),
    "pickle body": (
        dict(content=pickle.dumps({"x": 1}), headers={"content-type": "application/pickle"}),
        415,
        "multipart/form-data",
    ),
    "missing field": (dict(files=files(FRAME_PNG, name="file")), 400, "unexpected form field"),
    "url instead of a file": (
        dict(files={"image": (None, "http://127.0.0.1:9/frame.png")}),  # a text part
        400,
        "must be a file upload",
    ),
    "extra field": (
        dict(files=files(FRAME_PNG), data={"path": "/etc/passwd"}),
        400,
        "unexpected form field",
    ),
    "gif": (dict(files=files(gif(FRAME))), 415, "GIF images are not accepted"),
    "unknown query value": (dict(files=files(FRAME_PNG), params={"scale": 2}), 400, "scale"),
    "malformed mode": (dict(files=files(FRAME_PNG), params={"mode": "sliding"}), 400, "mode"),
    "malformed max_side": (
        dict(files=files(FRAME_PNG), params={"max_side": "big"}),
        400,
        "max_side",
    ),
    "max_side too small": (dict(files=files(FRAME_PNG), params={"max_side": 0}), 400, "max_side"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_a_clear_4xx_and_the_service_stays_up(server, case):
    kw, status, words = BAD[case]
    r = httpx.post(server.url + "/segment", timeout=60, **kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert words.lower() in r.json()["error"].lower()
    assert_still_serves(server)


def test_an_upload_without_length_over_the_limit_is_cut_off(server):
    def stream():  # a well-formed part of 2.5 MB, chunked: no Content-Length to refuse it by
        yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="f.png"\r\n\r\n'
        for _ in range(40):
            yield b"\0" * 65536

    headers = {"content-type": "multipart/form-data; boundary=x"}
    r = httpx.post(server.url + "/segment", content=stream(), headers=headers, timeout=60)
    assert r.status_code == 413 and "limit of 1 MB" in r.json()["error"]
    assert_still_serves(server)


def raw_request(server, body_sent: bytes, declared: int) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /segment HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {declared}\r\n\r\n"
    )
    s.sendall(head.encode() + body_sent)
    return s


def test_a_slow_upload_times_out_with_408(server):
    s = raw_request(server, b"--x\r\n", declared=100_000)  # then nothing more
    t0 = time.monotonic()
    answer = b""
    while b"}" not in answer and time.monotonic() - t0 < 15:  # headers, then the JSON body
        chunk = s.recv(4096)
        if not chunk:
            break
        answer += chunk
    s.close()
    answer = answer.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "longer than 2 s" in answer and time.monotonic() - t0 < 10
    assert_still_serves(server)


def test_an_aborted_upload_leaves_the_service_up(server):
    for _ in range(3):
        s = raw_request(server, FRAME_PNG[:1000], declared=len(FRAME_PNG) + 200)
        s.close()  # the client goes away mid-body
    assert_still_serves(server)


def test_50_bad_requests_in_parallel(server):
    cases = list(BAD.values())

    def send(i: int) -> int:
        kw, _, _ = cases[i % len(cases)]
        return httpx.post(server.url + "/segment", timeout=120, **kw).status_code

    with cf.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(send, range(50)))
    assert all(400 <= c < 500 for c in codes), codes
    assert_still_serves(server)


def test_a_get_on_a_post_endpoint_is_405_json(server):
    r = httpx.get(server.url + "/segment")
    assert r.status_code == 405 and "error" in r.json()
    assert_still_serves(server)


# ---------------------------------------------------------------------------------------------
# fuzzing the OpenAPI document, the README's curl examples
# ---------------------------------------------------------------------------------------------


def test_openapi_fuzzing_finds_no_server_error(server, tmp_path):
    exe = Path(sys.executable).parent / "schemathesis"
    checks = "not_a_server_error,response_schema_conformance,content_type_conformance"
    cmd = [str(exe), "run", server.url + "/docs.json", "--max-examples", "20", "--seed", "1"]
    cmd += ["--checks", checks, "--request-timeout", "60", "--no-color"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "passed" in r.stdout
    assert_still_serves(server)


def readme_curl_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Serving") :]
    section = section[: section.index("\n## ", 4)]
    return [line.strip() for line in section.splitlines() if line.strip().startswith("curl ")]


def test_the_readme_curl_examples_work(server, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("the curl program is not installed on this machine")
    commands = readme_curl_commands()
    assert len(commands) >= 4
    (tmp_path / "frame.jpg").write_bytes(jpeg(FRAME))
    for command in commands:
        command = command.replace("http://localhost:3000", server.url)
        r = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, timeout=120)
        assert r.returncode == 0, (command, r.stderr)
    labels = np.asarray(Image.open(tmp_path / "labels.png"))
    assert labels.shape == FRAME.shape[:2] and labels.max() < len(CLASS_NAMES)
    assert Image.open(tmp_path / "overlay.jpg").format == "JPEG"


# ---------------------------------------------------------------------------------------------
# the API key, start-up without an export, SIGTERM under load
# ---------------------------------------------------------------------------------------------


def test_api_key(demo_export, tmp_path):
    with serving(demo_export, tmp_path / "home", RECYCLELORA_API_KEY="k-123") as s:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k-123"}):
            r = post(s, "/segment", headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]
            assert httpx.get(s.url + "/metadata", headers=headers).status_code == 401
            assert httpx.get(s.url + "/docs.json", headers=headers).status_code == 401
        for path in ("/livez", "/readyz", "/metrics"):  # probes and scrapers carry no key
            assert httpx.get(s.url + path).status_code == 200
        good = {"Authorization": "Bearer k-123"}
        assert post(s, "/segment", headers=good).status_code == 200
        assert httpx.get(s.url + "/metadata", headers=good).status_code == 200


def test_bentoml_build_packs_the_service_and_the_export(demo_export, tmp_path):
    project = tmp_path / "project"  # what `bentoml build` sees in the repository root
    project.mkdir()
    for name in ("serving", "recyclelora"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "bentofile.yaml", project)
    shutil.copytree(demo_export, project / "exports" / "demo")
    env = server_env(Path(""), tmp_path / "home")
    del env["RECYCLELORA_EXPORT"]
    r = subprocess.run(
        [str(BENTOML), "build"], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    bentos = list((tmp_path / "home" / "bentos" / "recyclelora").glob("*/bento.yaml"))
    assert len(bentos) == 1
    src = bentos[0].parent / "src"
    assert (src / "serving" / "service.py").is_file()
    assert (src / "recyclelora" / "serving" / "images.py").is_file()
    assert (src / "exports" / "demo" / "model.json").read_bytes() == (
        demo_export / "model.json"
    ).read_bytes()
    spec = (bentos[0].parent / "apis" / "openapi.yaml").read_text()
    assert "/segment_json" in spec


def test_start_up_without_an_export_says_how_to_make_one(tmp_path):
    empty = tmp_path / "exports"
    empty.mkdir()
    env = server_env(Path(""), tmp_path / "home")
    del env["RECYCLELORA_EXPORT"]
    service_copy = tmp_path / "app"  # the service looks for exports/ beside itself
    shutil.copytree(REPO / "serving", service_copy / "serving")
    (service_copy / "exports").mkdir()
    env["PYTHONPATH"] = str(REPO)
    cmd = [str(BENTOML), "serve", SERVICE, "--port", "0", "--working-dir", str(service_copy)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "no export to serve" in out and "make demo && python export/merge_and_export.py" in out


def wait_in_progress(server, endpoint: str, n: int, timeout: float = 30.0) -> None:
    """Until BentoML's in-progress gauge of ``endpoint`` reaches ``n``: a request the server has
    not received yet is not in flight, and a SIGTERM may rightly refuse its connection."""
    pattern = re.compile(
        rf'request_in_progress\{{[^}}]*endpoint="{re.escape(endpoint)}"[^}}]*\}}\s+([0-9.]+)'
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = pattern.search(httpx.get(server.url + "/metrics").text)
        if m and float(m[1]) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{n} requests to {endpoint} were not in progress within {timeout} s")


def test_sigterm_during_load_finishes_requests_in_flight_and_exits_0(demo_export, tmp_path):
    s = start(demo_export, tmp_path / "home")
    try:
        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(post, s, "/segment") for _ in range(8)]
            wait_in_progress(s, "/segment", 8)  # all received by the server, none answered yet
            assert not any(f.done() for f in futures)
            s.process.send_signal(signal.SIGTERM)
            codes = [f.result().status_code for f in futures]
        assert codes == [200] * 8
        assert s.process.wait(60) == 0
    finally:
        stop(s)
