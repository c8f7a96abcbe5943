"""The service's settings, from environment variables (read once at start-up).

RECYCLELORA_EXPORT          export directory (default: the newest under ./exports/)
RECYCLELORA_BACKEND         auto | tensorrt | onnxruntime | torch (default auto)
RECYCLELORA_API_KEY         when set, every endpoint but health and metrics needs
                            ``Authorization: Bearer <key>``
RECYCLELORA_MAX_UPLOAD_MB   largest request body (default 20)
RECYCLELORA_MAX_PIXELS      largest decoded frame, width x height (default 4096 x 4096)
RECYCLELORA_UPLOAD_TIMEOUT  seconds a client may take to send its body (default 30)
RECYCLELORA_MAX_LATENCY_MS  the crop batcher's latency bound (default 60000 on CPU, 5000 on GPU)
RECYCLELORA_API_WORKERS     HTTP worker processes (default 1 on CPU; up to 4 with a GPU)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..atomic import is_temporary
from ..deploy.load import BACKENDS
from ..deploy.manifest import MANIFEST

EXPORTS = Path("exports")
MAKE_ONE = "make demo && python export/merge_and_export.py"


class SettingsError(RuntimeError):
    """A setting the service cannot start with; the message says what to set."""


def newest_export(root: Path = EXPORTS) -> Path | None:
    """The export directory under ``root`` whose ``model.json`` was written last (the exporter
    renames a finished directory into place, so a half-written one is never picked)."""
    if not root.is_dir():
        return None
    found = [d for d in root.iterdir() if (d / MANIFEST).is_file() and not is_temporary(d)]
    return max(found, key=lambda d: (d / MANIFEST).stat().st_mtime, default=None)


def gpu_present() -> bool:
    """An NVIDIA device node: decides the resources BentoML asks for, before anything loads."""
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists()


def _number(env: dict[str, str], name: str, default: float, kind: type = float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive, got {raw}")
    return value


@dataclass(frozen=True)
class Settings:
    export: Path
    backend: str
    api_key: str | None
    max_upload_bytes: int
    max_pixels: int
    upload_timeout_s: float
    max_latency_ms: int
    api_workers: int
    gpu: bool

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, exports: Path = EXPORTS) -> Settings:
        """``exports``: where to look for the newest export when RECYCLELORA_EXPORT is unset."""
        env = dict(os.environ if env is None else env)
        gpu = gpu_present()
        given = env.get("RECYCLELORA_EXPORT", "").strip()
        export = Path(given) if given else newest_export(exports)
        if export is None:
            raise SettingsError(
                f"no export to serve: {exports}/ holds none. Make one with\n    {MAKE_ONE}\n"
                "or point RECYCLELORA_EXPORT at an export directory."
            )
        if not (export / MANIFEST).is_file():
            raise SettingsError(
                f"RECYCLELORA_EXPORT={export} is not an export directory (no {MANIFEST}). "
                f"Make one with\n    {MAKE_ONE}"
            )
        backend = env.get("RECYCLELORA_BACKEND", "auto").strip() or "auto"
        if backend not in BACKENDS:
            raise SettingsError(f"RECYCLELORA_BACKEND must be one of {', '.join(BACKENDS)}")
        return cls(
            export=export,
            backend=backend,
            api_key=env.get("RECYCLELORA_API_KEY") or None,
            max_upload_bytes=int(_number(env, "RECYCLELORA_MAX_UPLOAD_MB", 20) * 2**20),
            max_pixels=int(_number(env, "RECYCLELORA_MAX_PIXELS", 4096 * 4096, int)),
            upload_timeout_s=_number(env, "RECYCLELORA_UPLOAD_TIMEOUT", 30),
            max_latency_ms=int(
                _number(env, "RECYCLELORA_MAX_LATENCY_MS", 5000 if gpu else 60000, int)
            ),
            api_workers=int(
                _number(env, "RECYCLELORA_API_WORKERS", min(4, os.cpu_count() or 1) if gpu else 1)
            ),
            gpu=gpu,
        )
