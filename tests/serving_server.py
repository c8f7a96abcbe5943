"""The real ``bentoml serve`` of ``serving/service.py``, on 127.0.0.1 and a free port, as a
subprocess: what the serving tests and the load benchmark's quick mode talk to."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from recyclelora.data.synthetic import render_scene, stylize

REPO = Path(__file__).resolve().parents[1]
BENTOML = Path(sys.executable).parent / "bentoml"
SERVICE = "serving.service:SegmentationAPI"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(export: Path, home: Path, **settings: str) -> dict[str, str]:
    """The environment of a served export: no usage tracking, a private BentoML home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECYCLELORA_")}
    env.update(
        RECYCLELORA_EXPORT=str(export),
        BENTOML_HOME=str(home),
        BENTOML_DO_NOT_TRACK="True",
        OMP_NUM_THREADS="1",  # the tests share 2 cores with the server
        **settings,
    )
    return env


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def start(export: Path, home: Path, timeout: float = 180, **settings: str) -> Server:
    """Start the service and wait until ``/readyz`` answers 200 (model loaded and warm)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = home / f"serve-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BENTOML), "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=server_env(export, home, **settings),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stop() signals the whole process group if it must
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"bentoml serve exited with {process.returncode}:\n{server.log_tail()}"
            )
        if _get(server.url + "/readyz") == 200:
            return server
        time.sleep(0.5)
    stop(server)
    raise RuntimeError(f"bentoml serve was not ready after {timeout} s:\n{server.log_tail()}")


def stop(server: Server, timeout: float = 60) -> int:
    """SIGTERM, then wait; SIGKILL to the group if it hangs. Returns the exit code."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(10)
    return server.process.returncode


@contextlib.contextmanager
def serving(export: Path, home: Path, **settings: str) -> Iterator[Server]:
    server = start(export, home, **settings)
    try:
        yield server
    finally:
        stop(server)


def scene(seed: int, h: int, w: int) -> np.ndarray:
    """A "real"-domain demo street scene, (h, w, 3) RGB uint8: frames with several classes."""
    rng = np.random.default_rng(seed)
    return stylize(render_scene(rng, h, w), rng, "real")


def encoded(rgb: np.ndarray, fmt: str, **options) -> bytes:
    """The frame as Pillow writes it in ``fmt`` ("PNG", "JPEG", "GIF", ...)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **options)
    return buf.getvalue()
