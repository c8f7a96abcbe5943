"""``model.json``: everything a consumer of an export directory needs, and its integrity check.

An export directory is the whole contract between training and deployment::

    model.safetensors        merged weights, keys of build_model(preset, adapters=None)
    model.json               this manifest
    model.onnx [+ .data]     fp32 graph (and model.<precision>.onnx reduced-precision variants)
    model.<gpu>.trt<v>.<precision>.plan (+ timing cache)   TensorRT engines, where built
    export_report.json       the exporter's checks with their numbers

Nothing here reads a training recipe: a serving process needs only the directory. Every artefact
is listed with its SHA-256, and :func:`verify_artefact` refuses a file that is missing or differs
(a truncated copy, a tampered file).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text

FORMAT = "recyclelora-export/1"
MANIFEST = "model.json"
WEIGHTS = "model.safetensors"
ONNX = "model.onnx"
REPORT = "export_report.json"


class ExportError(ValueError):
    """An export directory (or an export request) that cannot be used; the message says why
    and what to do."""


class BackendUnavailable(ExportError):
    """A backend this machine cannot run (a package, a GPU or a graph is missing). ``load_export
    (backend="auto")`` passes over it to the next backend; a missing or modified artefact is a
    plain :class:`ExportError` and stops it."""


@dataclass
class Artefact:
    """One file of the directory: its SHA-256 and size, and free-form facts about it (e.g. a
    TensorRT engine's version, GPU and precision)."""

    sha256: str
    bytes: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Manifest:
    """The content of ``model.json`` (see the module docstring).

    preset: ``build_model`` preset name; the merged weights load into
        ``build_model(preset, num_classes=len(classes), adapters=None, img_size=train_size)``.
    classes: class names, index = train id; palette: one RGB triple per class.
    mean, std: RGB normalisation on 0-255 (already inside the ONNX graph and engines).
    input_size: (H, W) of the graph's crops; max_batch: its largest batch (dynamic batch axis).
    train_size: the backbone's stored position grid times the patch size (its training crop).
    patch_size: inputs are padded to a multiple of it by the PyTorch model; graphs take
        ``input_size`` exactly.
    crop, stride: the sliding window (H, W) of ``segment(mode="slide")``.
    eval_scale: (long, short) bounds a frame is rescaled to fit, ratio kept, before inference
        (mmcv ``rescale_size``); predictions are resized back to the frame.
    source: the checkpoint: path, sha256, kind ("training" / "mmseg"), iteration.
    versions: package, torch, onnx, onnxruntime... at export time.
    artefacts: file name (relative to the directory) -> :class:`Artefact`.
    """

    preset: str
    classes: list[str]
    palette: list[list[int]]
    mean: list[float]
    std: list[float]
    input_size: list[int]
    max_batch: int
    train_size: list[int]
    patch_size: int
    crop: list[int]
    stride: list[int]
    eval_scale: list[int]
    source: dict[str, Any]
    versions: dict[str, str]
    artefacts: dict[str, Artefact] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> Manifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExportError(f"{where} is not valid JSON ({e}); re-run the export") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ExportError(
                f"{where} is not a RecycleLoRA export manifest (format {got!r}, expected "
                f"{FORMAT!r}); point at a directory written by export/merge_and_export.py"
            )
        try:
            d["artefacts"] = {k: Artefact(**v) for k, v in d.get("artefacts", {}).items()}
            return cls(**d)
        except TypeError as e:
            raise ExportError(f"{where} is damaged or from another version ({e})") from e

    def write(self, directory: str | Path) -> Path:
        return write_text(Path(directory) / MANIFEST, self.to_json())

    @classmethod
    def read(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise ExportError(
                f"{directory} is not an export directory: it has no {MANIFEST}. Make one with "
                "`python export/merge_and_export.py --checkpoint CHECKPOINT --out DIR`"
            )
        return cls.from_json(path.read_text(encoding="utf-8"), str(path))

    def add_artefact(self, directory: str | Path, name: str, **info: Any) -> Artefact:
        """Hash ``directory/name`` and list it."""
        path = Path(directory) / name
        art = Artefact(sha256_file(path), path.stat().st_size, dict(info))
        self.artefacts[name] = art
        return art


def is_export_directory(directory: str | Path) -> bool:
    """Whether ``directory`` holds a readable export manifest (what ``--force`` may replace)."""
    try:
        Manifest.read(directory)
    except (ExportError, OSError, UnicodeDecodeError):
        return False
    return True


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_artefact(directory: str | Path, manifest: Manifest, name: str) -> Path:
    """The path of artefact ``name``, after checking it is listed, present and unchanged."""
    path = Path(directory) / name
    art = manifest.artefacts.get(name)
    if art is None:
        raise ExportError(
            f"{path}: not listed in {MANIFEST}; this export does not contain it. Re-run the "
            "export with the option that writes it"
        )
    if not path.is_file():
        raise ExportError(f"{path} is missing from the export: copy the whole directory again")
    if path.stat().st_size != art.bytes or sha256_file(path) != art.sha256:
        raise ExportError(
            f"{path} differs from the file the export wrote (SHA-256 mismatch): it was truncated "
            "or modified. Copy the directory again or re-run the export"
        )
    return path
