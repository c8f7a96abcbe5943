"""Camera frames in, label maps out: decoding that never trusts the upload.

An upload is decoded only after its header passed every check: it is a JPEG, PNG or WebP, and
its width x height is within the limit (a decompression bomb is a tiny file with a huge header,
so the pixel count is checked before any pixel is decoded). Whatever the file holds - RGB, RGBA,
palette, grayscale, 16-bit, CMYK, an EXIF orientation - the result is the upright RGB uint8
frame a camera would have delivered.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import RequestError

FORMATS = ("JPEG", "PNG", "WEBP")


def _to_uint8(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8 RGB. 16-bit samples keep their high byte, as Pillow
    reads 16-bit colour PNGs: the same rule for grayscale and colour."""
    if image.mode.startswith("I;16") or image.mode == "I":
        a = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Upload bytes -> upright (H, W, 3) uint8 RGB. Raises :class:`RequestError`: 400 empty,
    not an image or truncated; 415 another image format; 413 over ``max_pixels``."""
    if not data:
        raise RequestError(400, "the image is empty: send the frame's bytes in the field 'image'")
    corrupt = (OSError, SyntaxError, ValueError, EOFError)  # Pillow's ways of saying so
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            # Pillow's own guard, inside open(), for headers far beyond any camera
            raise RequestError(
                413, f"the image header claims far more than this service's {max_pixels} pixels"
            ) from None
        except UnidentifiedImageError:
            raise RequestError(
                400, "the upload is not a readable JPEG, PNG or WebP image"
            ) from None
        except corrupt as e:  # a header cut short
            raise RequestError(400, f"the image is truncated or corrupt ({e})") from None
        if image.format not in FORMATS:
            raise RequestError(415, f"{image.format} images are not accepted: send JPEG, PNG, WebP")
        w, h = image.size
        if w * h > max_pixels:
            raise RequestError(
                413,
                f"the image is {w} x {h} = {w * h} pixels, over this service's limit of "
                f"{max_pixels}: downscale it before sending",
            )
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            return np.ascontiguousarray(_to_uint8(image))
        except (*corrupt, Image.DecompressionBombWarning) as e:
            raise RequestError(400, f"the image is truncated or corrupt ({e})") from None


def encode_png(image: np.ndarray) -> bytes:
    """(H, W) uint8 ids -> single-channel 8-bit PNG; (H, W, 3) RGB -> RGB PNG."""
    bgr = image if image.ndim == 2 else image[:, :, ::-1]
    ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return buf.tobytes()


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """(H, W, 3) RGB -> JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return buf.tobytes()
