"""A client of the segmentation service (``serving/service.py``), as a library and a CLI.

It needs numpy, Pillow, httpx and tqdm, never torch or BentoML: it runs where the frames are
taken (a robot, a camera box), with the model on another machine.

    from serving.client import SegmentationClient
    client = SegmentationClient("http://127.0.0.1:3000")      # key: RECYCLELORA_API_KEY
    labels = client.segment("frame.jpg")                      # (H, W) uint8 train ids

    python serving/client.py FRAMES_DIR --out LABELS_DIR [--overlay] [--concurrency 4]

The CLI writes one single-channel PNG of train ids per frame (same stem), or with ``--overlay``
one JPEG of the frame blended with the class colours. Exit codes: 0 every frame done, 1 some
failed (each is reported), 2 bad arguments or no usable server.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
from PIL import Image
from tqdm import tqdm

from recyclelora.atomic import write_bytes

DEFAULT_URL = "http://127.0.0.1:3000"
START_SERVER = "make serve"
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
Mode = Literal["slide", "whole"]
ImageInput = str | os.PathLike | bytes | np.ndarray


class ServiceError(RuntimeError):
    """A request the service refused or could not answer. ``status`` is the HTTP status (4xx:
    fix the request; 503: retry later), or None when no answer came (server down, timeout);
    ``message`` is the server's ``error`` text."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"{status}: {message}" if status is not None else message)
        self.status = status
        self.message = message


def encode_frame(image: ImageInput) -> tuple[str, bytes]:
    """(file name, bytes) of an upload: a file's own bytes, bytes as given, or an RGB uint8
    (H, W, 3) array encoded as PNG (lossless: the server sees exactly these pixels)."""
    if isinstance(image, bytes):
        return "frame", image
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an RGB uint8 (H, W, 3) array, got {image.dtype} {tuple(image.shape)}"
            )
        buf = io.BytesIO()
        Image.fromarray(image, "RGB").save(buf, "PNG", compress_level=1)
        return "frame.png", buf.getvalue()
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return path.name, path.read_bytes()
    raise TypeError(f"image must be a path, bytes or an RGB array, not {type(image).__name__}")


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"]
    return response.text.strip()[:500] or response.reason_phrase


class SegmentationClient:
    """One HTTP connection pool to the service; safe to share between threads.

    ``api_key`` defaults to ``RECYCLELORA_API_KEY``; ``timeout`` bounds each request in seconds
    (a large model on a CPU server takes minutes per full-size frame)."""

    def __init__(
        self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 600.0
    ) -> None:
        key = os.environ.get("RECYCLELORA_API_KEY") if api_key is None else api_key
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as e:
            raise ServiceError(None, f"{self.url}{path} did not answer in time ({e})") from e
        except httpx.TransportError as e:
            raise ServiceError(
                None,
                f"cannot reach the service at {self.url} ({e}); start it with `{START_SERVER}`",
            ) from e
        if response.is_error:
            raise ServiceError(response.status_code, _error_message(response))
        return response

    def _post_frame(self, path: str, image: ImageInput, params: dict) -> httpx.Response:
        name, data = encode_frame(image)
        query = {k: v for k, v in params.items() if v is not None}
        return self._request("POST", path, params=query, files={"image": (name, data)})

    def segment(
        self, image: ImageInput, mode: Mode = "slide", max_side: int | None = None
    ) -> np.ndarray:
        """(H, W) uint8 train ids at the frame's size."""
        response = self._post_frame("/segment", image, {"mode": mode, "max_side": max_side})
        with Image.open(io.BytesIO(response.content)) as png:
            if png.mode != "L":
                message = f"expected a single-channel PNG, got mode {png.mode}"
                raise ServiceError(response.status_code, message)
            return np.asarray(png, dtype=np.uint8)

    def segment_json(
        self,
        image: ImageInput,
        masks: bool = False,
        mode: Mode = "slide",
        max_side: int | None = None,
    ) -> dict:
        """Size, mode, ``inference_ms``, per-class pixel ``fractions`` and, with ``masks``,
        per-class COCO RLE masks of the classes present."""
        params = {"mode": mode, "max_side": max_side, "masks": str(masks).lower()}
        return self._post_frame("/segment_json", image, params).json()

    def overlay(
        self,
        image: ImageInput,
        mode: Mode = "slide",
        max_side: int | None = None,
        alpha: float = 0.5,
        legend: bool = True,
    ) -> bytes:
        """JPEG of the frame blended with the class colours (and a legend panel on the right)."""
        params = {"mode": mode, "max_side": max_side, "alpha": alpha, "legend": str(legend).lower()}
        return self._post_frame("/overlay", image, params).content

    def metadata(self) -> dict:
        """Classes, palette, geometry, backend and versions of the served export."""
        return self._request("GET", "/metadata").json()

    def ready(self) -> bool:
        """True once the model is loaded and warm; False while loading or unreachable."""
        try:
            self._request("GET", "/readyz")
        except ServiceError:
            return False
        return True


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


class UsageError(ValueError):
    """Arguments the CLI cannot run with (exit code 2)."""


def frames_of(source: Path) -> list[Path]:
    """The frames of a file or of a folder (not recursive), sorted by name."""
    if source.is_file():
        if source.suffix.lower() not in FRAME_SUFFIXES:
            raise UsageError(f"{source} is not a {'/'.join(FRAME_SUFFIXES)} file")
        return [source]
    if not source.is_dir():
        raise UsageError(f"{source} does not exist")
    frames = sorted(
        p for p in source.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES
    )
    if not frames:
        raise UsageError(f"{source} holds no {'/'.join(FRAME_SUFFIXES)} files")
    return frames


def output_paths(frames: list[Path], out: Path, suffix: str) -> dict[Path, Path]:
    """Frame -> ``out/<stem><suffix>``; two frames of one stem (a.jpg, a.png) are refused."""
    targets: dict[Path, Path] = {}
    for frame in frames:
        target = out / f"{frame.stem}{suffix}"
        if target in targets.values():
            other = next(f for f, t in targets.items() if t == target)
            raise UsageError(f"{other.name} and {frame.name} would both write {target.name}")
        targets[frame] = target
    return targets


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python serving/client.py",
        description="Segment camera frames with the RecycleLoRA service: one PNG label map of "
        "train ids (or with --overlay one JPEG overlay) per frame, same stem.",
        epilog=f"Exit codes: 0 all frames done, 1 some failed, 2 bad arguments or no server "
        f"(start one with `{START_SERVER}`).",
    )
    p.add_argument("input", type=Path, help="a frame, or a folder of .jpg/.jpeg/.png/.webp frames")
    p.add_argument("--out", type=Path, required=True, help="folder for the results (created)")
    p.add_argument("--overlay", action="store_true", help="write JPEG overlays, not label maps")
    p.add_argument("--url", default=DEFAULT_URL, help=f"the service (default {DEFAULT_URL})")
    p.add_argument("--api-key", help="bearer key (default: $RECYCLELORA_API_KEY)")
    p.add_argument("--mode", choices=("slide", "whole"), default="slide")
    p.add_argument(
        "--max-side", type=int, help="evaluate at most at this longer side (faster, coarser)"
    )
    p.add_argument("--concurrency", type=int, default=4, help="frames in flight (default 4)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    return p


def _process(
    client: SegmentationClient, frame: Path, target: Path, args: argparse.Namespace
) -> None:
    if args.overlay:
        data = client.overlay(frame, mode=args.mode, max_side=args.max_side)
    else:
        labels = client.segment(frame, mode=args.mode, max_side=args.max_side)
        buf = io.BytesIO()
        Image.fromarray(labels, "L").save(buf, "PNG")
        data = buf.getvalue()
    write_bytes(target, data)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.concurrency < 1:
            raise UsageError("--concurrency must be at least 1")
        targets = output_paths(frames_of(args.input), args.out, ".jpg" if args.overlay else ".png")
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 2
    with SegmentationClient(args.url, args.api_key, args.timeout) as client:
        try:
            client.metadata()  # reachable, ready and the key accepted, before any frame
        except ServiceError as e:
            print(f"error: the service at {client.url} cannot take frames: {e}", file=sys.stderr)
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        failed: list[tuple[Path, Exception]] = []
        with (
            ThreadPoolExecutor(args.concurrency) as pool,
            tqdm(total=len(targets), unit="frame", file=sys.stderr) as bar,
        ):
            jobs = {pool.submit(_process, client, f, t, args): f for f, t in targets.items()}
            for job in as_completed(jobs):
                error = job.exception()
                if error is not None:
                    failed.append((jobs[job], error))
                    bar.write(f"failed: {jobs[job]}: {error}", file=sys.stderr)
                bar.update()
    done = len(targets) - len(failed)
    print(f"{done} of {len(targets)} frames written to {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
