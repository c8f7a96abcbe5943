"""The RecycleLoRA segmentation service: ``bentoml serve`` in the repository root.

Two BentoML services, each its own process:

- ``SegmentationModel`` owns the inference backend (``load_export(..., "auto")``: TensorRT on a
  GPU, else ONNX Runtime) and one batchable crop API, so the crops of concurrent requests run
  as one batch of up to the export's ``max_batch``;
- ``SegmentationAPI``, the HTTP front, decodes frames, cuts them into sliding-window crops with
  the inference API's ``segment()`` (whose crops go to the model process) and encodes answers.

Settings are environment variables, listed in ``recyclelora/serving/settings.py``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Literal

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, ServiceUnavailable
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from recyclelora.deploy import Manifest, load_export
from recyclelora.deploy import segment as segment_frame
from recyclelora.deploy.manifest import MANIFEST
from recyclelora.serving.drain import Drain
from recyclelora.serving.errors import RequestError
from recyclelora.serving.guards import BearerAuth, UploadLimits
from recyclelora.serving.images import decode_image, encode_jpeg, encode_png
from recyclelora.serving.remote import RemoteRunner
from recyclelora.serving.render import blend, class_fractions, coco_rle
from recyclelora.serving.settings import Settings

log = logging.getLogger("bentoml.recyclelora")  # BentoML shows its own loggers' records

# Set in the process manager, which imports this module before it makes sockets and workers
# (they inherit the environment): the model process listens on loopback TCP, whose socket
# outlives the manager's stop, so requests in flight at SIGTERM finish (see
# recyclelora/serving/drain.py); it answers only the front, which sends this launch's random
# token (BentoML's clients send BENTO_CLOUD_API_KEY as a bearer token); no usage reports.
os.environ.setdefault("BENTOML_NO_UDS", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
MODEL_TOKEN = os.environ.setdefault("BENTO_CLOUD_API_KEY", secrets.token_urlsafe(32))

SETTINGS = Settings.from_env(exports=Path(__file__).resolve().parents[1] / "exports")
MANIFEST_DATA = Manifest.read(SETTINGS.export)
EXPORT_SHA256 = hashlib.sha256((SETTINGS.export / MANIFEST).read_bytes()).hexdigest()
TIMEOUT_S = 600 if not SETTINGS.gpu else 120  # a 2048-wide frame of the large model on CPU: minutes
Mode = Literal["slide", "whole"]


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


@bentoml.service(
    name="recyclelora-model",
    workers=1,  # one copy of the model; its backend uses every core or the GPU
    threads=1,  # one batch at a time: batching, not threads, is how it keeps up
    resources={"gpu": 1} if SETTINGS.gpu else {},
    traffic={"timeout": TIMEOUT_S},
    # the front's client of this service would otherwise replace its connection pool every 100
    # calls or 5 minutes, failing the calls still in flight on the old one (BentoML 1.4.39)
    runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9},
)
class SegmentationModel:
    """The export on its backend; ready once loaded and warmed up (the first request is not
    the one that pays for an engine build, a graph optimisation or memory allocation)."""

    def __init__(self) -> None:
        self.runner = None
        self.failure: str | None = None
        self.ready = threading.Event()
        self.drain = Drain()
        self.drain.install()
        threading.Thread(target=self._load, name="load-export", daemon=True).start()

    def _load(self) -> None:
        try:
            t0 = time.perf_counter()
            runner = load_export(SETTINGS.export, backend=SETTINGS.backend)
            h, w = runner.input_size
            for n in sorted({1, runner.max_batch}):
                runner.predict_crops(np.zeros((n, 3, h, w), np.float32))
            self.runner = runner
            self.ready.set()
            took = time.perf_counter() - t0
            log.info("%s ready in %.1f s: %s", SETTINGS.export, took, runner.reason)
        except Exception as e:  # reported by /livez, /readyz and every request
            self.failure = f"{type(e).__name__}: {e}"
            log.exception("the export %s could not be loaded", SETTINGS.export)

    def __is_ready__(self) -> bool:
        return self.ready.is_set()

    def __is_alive__(self) -> bool:
        return self.failure is None

    def _runner(self):
        if self.failure is not None:
            raise ServiceUnavailable(f"the model failed to load: {self.failure}")
        if not self.ready.is_set():
            raise ServiceUnavailable("the model is still loading: retry in a few seconds")
        return self.runner

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=MANIFEST_DATA.max_batch,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def predict_crops(self, crops: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 RGB 0-255 crops -> (B, K, H, W) float32 scores."""
        with self.drain.track():
            return self._runner().predict_crops(crops)

    @bentoml.api
    def backend(self) -> dict:
        """What runs the crops, and why it was picked."""
        runner = self._runner()
        return {"name": runner.name, "detail": runner.detail, "reason": runner.reason}


# ---------------------------------------------------------------------------------------------
# The HTTP API
# ---------------------------------------------------------------------------------------------


class Error(BaseModel):
    error: str


class Mask(BaseModel):
    id: int
    name: str
    rle: dict


class SegmentJSON(BaseModel):
    width: int
    height: int
    mode: Mode
    inference_ms: float
    fractions: dict[str, float]
    masks: list[Mask] | None = None


class Metadata(BaseModel):
    classes: list[str]
    palette: list[list[int]]
    preset: str
    input_size: list[int]
    max_batch: int
    crop: list[int]
    stride: list[int]
    eval_scale: list[int]
    backend: dict
    export: str
    export_sha256: str
    source: dict
    versions: dict[str, str | None]


ERRORS = {
    status: {"model": Error, "description": why}
    for status, why in {
        400: "malformed request, unreadable image or unknown parameter",
        401: "missing or wrong API key (when one is set)",
        408: "the upload was too slow",
        413: "body or image over the limits",
        415: "not multipart/form-data, or not a JPEG, PNG or WebP image",
        503: "the model is loading or overloaded: retry",
    }.items()
}
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}},
                    "additionalProperties": False,
                }
            }
        },
    }
}
ModeQuery = Annotated[Mode, Query(description="slide: the paper's sliding window; whole: one crop")]
MaxSideQuery = Annotated[
    int | None,
    Query(ge=32, le=16384, description="evaluate at most at this longer side: faster, coarser"),
]

app = FastAPI(
    title="RecycleLoRA segmentation",
    description="Semantic segmentation of street scenes (19 Cityscapes classes).",
    docs_url=None,  # BentoML serves the OpenAPI document (/docs.json) and its page (/)
    redoc_url=None,
    openapi_url=None,
)


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


@app.exception_handler(RequestError)
async def _request_error(_: Request, e: RequestError) -> JSONResponse:
    return _error(e.status, e.message)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
    return _error(400, "invalid request: " + "; ".join(problems))


@app.exception_handler(HTTPException)
async def _http(_: Request, e: HTTPException) -> JSONResponse:
    return _error(e.status_code, str(e.detail))


@app.exception_handler(Exception)
async def _unexpected(_: Request, e: Exception) -> JSONResponse:
    log.error("unexpected error", exc_info=e)
    return _error(500, "an unexpected error occurred; the server log has the details")


async def _upload(request: Request, allowed: set[str]) -> bytes:
    """The bytes of the multipart field ``image``, after the request's shape was checked."""
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        known = ", ".join(sorted(allowed))
        raise RequestError(400, f"unknown query parameter(s) {', '.join(unknown)}; known: {known}")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        got = kind or "no content type"
        raise RequestError(415, f"send the frame as multipart/form-data, field 'image' (got {got})")
    form = await request.form(max_files=1, max_fields=1)
    try:
        fields = set(form.keys())
        if fields != {"image"}:
            extra = sorted(fields - {"image"})
            raise RequestError(
                400,
                f"unexpected form field(s) {', '.join(extra)}: send only 'image'"
                if extra
                else "the form has no field 'image': send the frame in it",
            )
        upload = form["image"]
        if isinstance(upload, str):
            raise RequestError(400, "the field 'image' must be a file upload, not text")
        return await upload.read()
    finally:
        await form.close()


async def _segmented(
    svc: SegmentationAPI, request: Request, allowed: set[str], mode: Mode, max_side: int | None
) -> tuple[np.ndarray, np.ndarray, float]:
    """The request's frame, its train ids at the frame's size, and the inference ms."""
    data = await _upload(request, allowed)
    return await run_in_threadpool(_labels, svc.runner, data, mode, max_side)


def _labels(
    runner: RemoteRunner, data: bytes, mode: Mode, max_side: int | None
) -> tuple[np.ndarray, np.ndarray, float]:
    image = decode_image(data, SETTINGS.max_pixels)
    t0 = time.perf_counter()
    try:
        labels = segment_frame(runner, image, mode, max_side=max_side)
    except BentoMLException as e:
        if getattr(e, "error_code", None) is not None and int(e.error_code) == 503:
            raise RequestError(503, str(e) or "the model is busy: retry") from None
        raise
    return image, labels, 1000 * (time.perf_counter() - t0)


@bentoml.service(
    name="recyclelora",
    workers=SETTINGS.api_workers,
    traffic={"timeout": TIMEOUT_S},
    http={"cors": {"enabled": False}},
)
@bentoml.asgi_app(app, path="/")
class SegmentationAPI:
    """Camera frames in, label maps out."""

    model = bentoml.depends(SegmentationModel)

    def __init__(self) -> None:
        self.runner = RemoteRunner(MANIFEST_DATA, lambda crops: self.model.predict_crops(crops))
        self._backend: dict | None = None

    @app.post(
        "/segment",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "the label map"}, **ERRORS},
        openapi_extra=IMAGE_BODY,
        summary="Label map (single-channel PNG of train ids, the frame's size)",
    )
    async def segment(
        self, request: Request, mode: ModeQuery = "slide", max_side: MaxSideQuery = None
    ) -> Response:
        _, labels, ms = await _segmented(self, request, {"mode", "max_side"}, mode, max_side)
        png = await run_in_threadpool(encode_png, labels)
        return Response(png, media_type="image/png", headers={"X-Inference-Ms": f"{ms:.1f}"})

    @app.post(
        "/segment_json",
        response_model=SegmentJSON,
        response_model_exclude_none=True,
        responses=ERRORS,
        openapi_extra=IMAGE_BODY,
        summary="Per-class pixel fractions, timing and optional COCO RLE masks",
    )
    async def segment_json(
        self,
        request: Request,
        mode: ModeQuery = "slide",
        max_side: MaxSideQuery = None,
        masks: Annotated[bool, Query(description="add per-class COCO RLE masks")] = False,
    ) -> SegmentJSON:
        image, labels, ms = await _segmented(
            self, request, {"mode", "max_side", "masks"}, mode, max_side
        )
        classes = MANIFEST_DATA.classes
        rles = None
        if masks:
            present = np.unique(labels)
            rles = await run_in_threadpool(
                lambda: [
                    Mask(id=int(k), name=classes[k], rle=coco_rle(labels == k)) for k in present
                ]
            )
        h, w = image.shape[:2]
        return SegmentJSON(
            width=w,
            height=h,
            mode=mode,
            inference_ms=round(ms, 1),
            fractions=class_fractions(labels, classes),
            masks=rles,
        )

    @app.post(
        "/overlay",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}, "description": "blended frame"}, **ERRORS},
        openapi_extra=IMAGE_BODY,
        summary="The frame blended with the class colours, with a legend",
    )
    async def overlay(
        self,
        request: Request,
        mode: ModeQuery = "slide",
        max_side: MaxSideQuery = None,
        alpha: Annotated[float, Query(ge=0, le=1, description="weight of the colours")] = 0.5,
        legend: bool = True,
    ) -> Response:
        image, labels, _ = await _segmented(
            self, request, {"mode", "max_side", "alpha", "legend"}, mode, max_side
        )
        m = MANIFEST_DATA
        picture = await run_in_threadpool(blend, image, labels, m.palette, m.classes, alpha, legend)
        return Response(await run_in_threadpool(encode_jpeg, picture), media_type="image/jpeg")

    @app.get("/metadata", response_model=Metadata, responses={401: ERRORS[401]})
    async def metadata(self) -> Metadata:
        if self._backend is None:
            self._backend = await run_in_threadpool(self.model.backend)
        m = MANIFEST_DATA
        return Metadata(
            classes=m.classes,
            palette=m.palette,
            preset=m.preset,
            input_size=m.input_size,
            max_batch=m.max_batch,
            crop=m.crop,
            stride=m.stride,
            eval_scale=m.eval_scale,
            backend=self._backend,
            export=SETTINGS.export.name,
            export_sha256=EXPORT_SHA256,
            source={k: v for k, v in m.source.items() if k != "path"},
            versions={
                p: _version(p) for p in ("recyclelora", "bentoml", "onnxruntime", "tensorrt")
            },
        )


SegmentationModel.add_asgi_middleware(BearerAuth, key=MODEL_TOKEN)
# outermost first: a request without the key is refused before its body is read
if SETTINGS.api_key:
    SegmentationAPI.add_asgi_middleware(BearerAuth, key=SETTINGS.api_key)
SegmentationAPI.add_asgi_middleware(
    UploadLimits, max_bytes=SETTINGS.max_upload_bytes, timeout_s=SETTINGS.upload_timeout_s
)
