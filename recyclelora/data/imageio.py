"""Reading and writing image and label files with OpenCV; failures name the file and the fix.

Images come back as (H, W, 3) uint8 RGB. Labels come back as 2-D arrays of the raw values in the
file: palette PNGs (GTAV and Mapillary labels are 8-bit palette images) give their palette
*indices*, not colours: OpenCV always expands a palette to colours, so the PNG stream is re-labelled
as greyscale before decoding (same pixel data, no colour table). Multi-channel 16-bit labels
(SYNTHIA) give one channel, the file's first (red) one, which OpenCV's BGR order returns last.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

from ..atomic import write_bytes

__all__ = [
    "DataError",
    "DataWarning",
    "encode_jpeg",
    "encode_png",
    "image_size",
    "is_complete",
    "read_bytes",
    "read_image",
    "read_label",
    "write_png",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"

_FIX = (
    "Re-extract this file from the dataset's official archive; if it is a file written by "
    "training/prepare_data.py, delete it and run that command again (it redoes missing files)."
)


class DataError(RuntimeError):
    """A dataset file or folder is missing, unreadable or inconsistent; the message says what to do.

    ``path`` is the offending file or folder when there is one.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


class DataWarning(UserWarning):
    """Recoverable data problem (size-mismatched pair, replaced unreadable sample)."""


def _color_flags() -> int:
    flags = cv2.IMREAD_IGNORE_ORIENTATION  # pixels must stay aligned with the label file
    if hasattr(cv2, "IMREAD_COLOR_RGB"):
        return flags | cv2.IMREAD_COLOR_RGB
    return flags | cv2.IMREAD_COLOR  # pragma: no cover - OpenCV < 4.10


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes, or a DataError saying it is missing / unreadable / empty."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"{path}: file not found. It was listed when the dataset was indexed, or is expected "
            f"next to its pair; check the dataset folder. {_FIX}",
            path=path,
        ) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e}). {_FIX}", path=path) from None
    if not data:
        raise DataError(f"{path}: the file is empty. {_FIX}", path=path)
    return data


def _png_chunks(data: bytes, path) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of each chunk's data; DataError when the stream is cut short."""
    chunks, pos, n = [], len(PNG_SIGNATURE), len(data)
    while True:
        if pos + 8 > n:
            raise DataError(
                f"{path}: truncated PNG (the file ends before its IEND chunk; it was probably "
                f"cut off during download, extraction or a killed conversion). {_FIX}",
                path=path,
            )
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        end = pos + 8 + length
        if end + 4 > n:
            raise DataError(
                f"{path}: truncated PNG (chunk {ctype!r} runs past the end of the file; it was "
                f"probably cut off during download, extraction or a killed conversion). {_FIX}",
                path=path,
            )
        chunks.append((ctype, pos + 8, end))
        pos = end + 4
        if ctype == b"IEND":
            return chunks


def _png_ihdr(data: bytes, path) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from the IHDR chunk."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise DataError(f"{path}: not a valid PNG (no IHDR header). {_FIX}", path=path)
    w, h, depth, ctype = struct.unpack(">IIBB", data[16:26])
    return w, h, depth, ctype


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _palette_as_grey(data: bytes, chunks) -> bytes:
    """The same PNG with colour type 0 (grey) instead of 3 (palette): decodes to the indices."""
    parts = [PNG_SIGNATURE]
    for ctype, start, end in chunks:
        if ctype == b"IHDR":
            body = bytearray(data[start:end])
            body[9] = 0  # colour type: greyscale, same bit depth, same filtered pixel stream
            parts.append(_chunk(b"IHDR", bytes(body)))
        elif ctype in (b"IDAT", b"IEND"):
            parts.append(data[start - 8 : end + 4])
        # PLTE, tRNS, bKGD, hIST, ... describe palette colours: meaningless for indices
    return b"".join(parts)


def _decode(data: bytes, flags: int, path) -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if arr is None or arr.size == 0:
        raise DataError(
            f"{path}: OpenCV cannot decode this file (corrupt, truncated, or not an image). {_FIX}",
            path=path,
        )
    return arr


def read_image(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB. EXIF orientation is ignored so pixels stay aligned with the label."""
    data = read_bytes(path)
    if data.startswith(PNG_SIGNATURE):
        _png_chunks(data, path)  # completeness check: libpng may accept a cut-off stream
    arr = _decode(data, _color_flags(), path)
    if not hasattr(cv2, "IMREAD_COLOR_RGB"):  # pragma: no cover - OpenCV < 4.10
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if arr.dtype != np.uint8:  # pragma: no cover - IMREAD_COLOR always gives 8 bits
        arr = (arr >> 8).astype(np.uint8)
    return arr


def read_label(path: str | os.PathLike, *, red_channel: bool = False) -> np.ndarray:
    """2-D array of the raw label values (uint8, or uint16 for 16-bit files).

    ``red_channel=True`` is for multi-channel labels (SYNTHIA): returns the first (red) channel.
    Otherwise the file must be single-channel (grey or palette); palette files give indices.
    """
    data = read_bytes(path)
    if data.startswith(PNG_SIGNATURE):
        chunks = _png_chunks(data, path)
        _, _, depth, ctype = _png_ihdr(data, path)
        if ctype == 3:
            arr = _decode(_palette_as_grey(data, chunks), cv2.IMREAD_UNCHANGED, path)
            if depth < 8:  # libpng expands 1/2/4-bit grey to 0..255; undo the scaling
                arr = arr // (255 // ((1 << depth) - 1))
            if red_channel:
                raise DataError(
                    f"{path}: a palette (single-channel) PNG where a multi-channel label with the "
                    f"class id in the red channel was expected (SYNTHIA GT/LABELS). Is this the "
                    f"right folder?",
                    path=path,
                )
            return np.ascontiguousarray(arr)
    arr = _decode(data, cv2.IMREAD_UNCHANGED, path)
    if arr.ndim == 3:
        if not red_channel:
            raise DataError(
                f"{path}: a label file with {arr.shape[2]} channels; a single-channel (grey or "
                f"palette) PNG of ids was expected. A colour visualisation (e.g. *_color.png) "
                f"instead of the label ids?",
                path=path,
            )
        arr = arr[:, :, 2]  # BGR / BGRA: red is index 2 (the last of BGR)
    elif red_channel:
        raise DataError(
            f"{path}: a single-channel label where a multi-channel label with the class id in the "
            f"red channel was expected (SYNTHIA GT/LABELS). Is this the right folder?",
            path=path,
        )
    return np.ascontiguousarray(arr)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file; PNGs from the header alone, others by decoding."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(33)
    except FileNotFoundError:
        raise DataError(f"{p}: file not found. {_FIX}", path=p) from None
    if head.startswith(PNG_SIGNATURE):
        w, h, _, _ = _png_ihdr(head, p)
        return h, w
    arr = _decode(read_bytes(p), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION, p)
    return arr.shape[0], arr.shape[1]


def is_complete(path: str | os.PathLike) -> bool:
    """True when the file exists and its stream is not cut short (PNG: IEND; JPEG: EOI)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size < 12:
            return False
        with open(p, "rb") as f:
            head = f.read(8)
            f.seek(-12, os.SEEK_END)
            tail = f.read(12)
    except OSError:
        return False
    if head.startswith(PNG_SIGNATURE):
        return tail[4:8] == b"IEND"
    if head.startswith(JPEG_SOI):
        return tail.endswith(b"\xff\xd9")
    return True


def encode_png(array: np.ndarray, *, rgb: bool = False, compression: int = 3) -> bytes:
    """PNG bytes of a 2-D label (uint8 / uint16) or, with ``rgb=True``, an (H, W, 3) RGB image."""
    if rgb:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:  # pragma: no cover
        raise DataError("OpenCV could not encode a PNG")
    return buf.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 75) -> bytes:
    """JPEG bytes of an (H, W, 3) uint8 RGB image (4:2:0, like Pillow's defaults)."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover
        raise DataError("OpenCV could not encode a JPEG")
    return buf.tobytes()


def write_png(path: str | os.PathLike, array: np.ndarray, *, rgb: bool = False) -> None:
    """Atomically write a label (2-D) or an RGB image (``rgb=True``) as PNG."""
    write_bytes(path, encode_png(array, rgb=rgb))
