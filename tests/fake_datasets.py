"""Tiny fake dataset releases in the exact official layouts, for tests (reusable by any test).

Each ``make_*`` writes a few small images into ``root`` with the release's folder names, file
suffixes, bit depths and label encodings, and returns a :class:`FakeRelease` with what was
written (the RGB pixels and the *raw* label values), so tests can check loaders against it.

PNG files are encoded here with ``zlib`` alone - no OpenCV - so the library's decoders are
checked against an independent writer: palette PNGs with duplicate palette colours (GTAV and
Mapillary labels: only the indices carry the ids), 16-bit RGB (SYNTHIA labels, class id in the
first = red channel, instance ids in green), 8-bit grey and RGB. JPEGs (BDD100K, Mapillary
images) go through OpenCV; their pixels are lossy, so compare them loosely.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "MAPILLARY_V12_COLORS",
    "MAPILLARY_V12_NAMES",
    "FakeItem",
    "FakeRelease",
    "blocky_labels",
    "jpeg_bytes",
    "make_all",
    "make_bdd100k",
    "make_cityscapes",
    "make_gtav",
    "make_mapillary",
    "make_synthia",
    "make_urbansyn",
    "png_bytes",
    "truncate",
]

# Mapillary Vistas v1.2 labels (config_v1.2.json "readable" names, label-id order) and colours.
MAPILLARY_V12_NAMES: tuple[str, ...] = (
    "Bird",
    "Ground Animal",
    "Curb",
    "Fence",
    "Guard Rail",
    "Barrier",
    "Wall",
    "Bike Lane",
    "Crosswalk - Plain",
    "Curb Cut",
    "Parking",
    "Pedestrian Area",
    "Rail Track",
    "Road",
    "Service Lane",
    "Sidewalk",
    "Bridge",
    "Building",
    "Tunnel",
    "Person",
    "Bicyclist",
    "Motorcyclist",
    "Other Rider",
    "Lane Marking - Crosswalk",
    "Lane Marking - General",
    "Mountain",
    "Sand",
    "Sky",
    "Snow",
    "Terrain",
    "Vegetation",
    "Water",
    "Banner",
    "Bench",
    "Bike Rack",
    "Billboard",
    "Catch Basin",
    "CCTV Camera",
    "Fire Hydrant",
    "Junction Box",
    "Mailbox",
    "Manhole",
    "Phone Booth",
    "Pothole",
    "Street Light",
    "Pole",
    "Traffic Sign Frame",
    "Utility Pole",
    "Traffic Light",
    "Traffic Sign (Back)",
    "Traffic Sign (Front)",
    "Trash Can",
    "Bicycle",
    "Boat",
    "Bus",
    "Car",
    "Caravan",
    "Motorcycle",
    "On Rails",
    "Other Vehicle",
    "Trailer",
    "Truck",
    "Wheeled Slow",
    "Car Mount",
    "Ego Vehicle",
    "Unlabeled",
)
MAPILLARY_V12_COLORS: tuple[tuple[int, int, int], ...] = (
    (165, 42, 42), (0, 192, 0), (196, 196, 196), (190, 153, 153), (180, 165, 180),
    (90, 120, 150), (102, 102, 156), (128, 64, 255), (140, 140, 200), (170, 170, 170),
    (250, 170, 160), (96, 96, 96), (230, 150, 140), (128, 64, 128), (110, 110, 110),
    (244, 35, 232), (150, 100, 100), (70, 70, 70), (150, 120, 90), (220, 20, 60),
    (255, 0, 0), (255, 0, 100), (255, 0, 200), (200, 128, 128), (255, 255, 255),
    (64, 170, 64), (230, 160, 50), (70, 130, 180), (190, 255, 255), (152, 251, 152),
    (107, 142, 35), (0, 170, 30), (255, 255, 128), (250, 0, 30), (100, 140, 180),
    (220, 220, 220), (220, 128, 128), (222, 40, 40), (100, 170, 30), (40, 40, 40),
    (33, 33, 33), (100, 128, 160), (142, 0, 0), (70, 100, 150), (210, 170, 100),
    (153, 153, 153), (128, 128, 128), (0, 0, 80), (250, 170, 30), (192, 192, 192),
    (220, 220, 0), (140, 140, 20), (119, 11, 32), (150, 0, 255), (0, 60, 100),
    (0, 0, 142), (0, 0, 90), (0, 0, 230), (0, 80, 100), (128, 64, 64),
    (0, 0, 110), (0, 0, 70), (0, 0, 192), (32, 32, 32), (120, 10, 10),
    (0, 0, 0),
)  # fmt: skip


# -- independent encoders ------------------------------------------------------------------------


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def png_bytes(array: np.ndarray, *, palette: np.ndarray | None = None) -> bytes:
    """Encode a PNG with zlib only. (H, W) uint8/uint16 -> grey, or palette (colour type 3) when
    ``palette`` ((N, 3) uint8) is given; (H, W, 3) uint8/uint16 -> RGB in the array's channel
    order (channel 0 is the file's first = red channel)."""
    a = np.asarray(array)
    if a.dtype not in (np.uint8, np.uint16):
        raise TypeError(a.dtype)
    depth = 8 if a.dtype == np.uint8 else 16
    if a.ndim == 2:
        ctype = 0 if palette is None else 3
        if palette is not None and depth != 8:
            raise ValueError("palette PNGs are 8-bit here")
    elif a.ndim == 3 and a.shape[2] == 3:
        ctype = 2
    else:
        raise ValueError(a.shape)
    h, w = a.shape[:2]
    rows = a.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows.reshape(h, -1)], axis=1).tobytes()
    out = [
        b"\x89PNG\r\n\x1a\n",
        _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0)),
    ]
    if palette is not None:
        out.append(_chunk(b"PLTE", np.asarray(palette, np.uint8).reshape(-1).tobytes()))
    out.append(_chunk(b"IDAT", zlib.compress(raw, 6)))
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)


def jpeg_bytes(rgb: np.ndarray, quality: int = 95) -> bytes:
    import cv2

    ok, buf = cv2.imencode(
        ".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    assert ok
    return buf.tobytes()


def truncate(path: str | Path, keep: float = 0.6) -> None:
    """Cut a file short in place (a killed download / conversion)."""
    p = Path(path)
    data = p.read_bytes()
    p.write_bytes(data[: max(1, int(len(data) * keep))])


# -- content -------------------------------------------------------------------------------------


def blocky_labels(
    rng: np.random.Generator, hw: tuple[int, int], values, block: int = 8
) -> np.ndarray:
    """Piecewise-constant random labels (blocks of ``block`` px) drawn from ``values``."""
    h, w = hw
    values = np.asarray(values)
    coarse = rng.choice(values, size=(-(-h // block), -(-w // block)))
    return np.repeat(np.repeat(coarse, block, 0), block, 1)[:h, :w].astype(values.dtype)


def _rgb(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    return rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)


def _smooth_rgb(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    # JPEG-friendly content (flat 16-px colour blocks): survives compression within a few levels
    levels = np.arange(256, dtype=np.uint8)
    return np.stack([blocky_labels(rng, hw, levels, block=16) for _ in range(3)], axis=-1)


@dataclass
class FakeItem:
    key: str
    image: Path
    label: Path
    rgb: np.ndarray  # the pixels written (JPEG: before compression)
    raw: np.ndarray  # the raw label values written (SYNTHIA: the red channel)


@dataclass
class FakeRelease:
    name: str
    root: Path
    items: list[FakeItem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _dup_palette(n: int = 256) -> np.ndarray:
    # Many indices share a colour (like the Cityscapes colours of ids 0-4): decoding colours
    # instead of indices cannot recover the ids.
    pal = np.zeros((n, 3), np.uint8)
    pal[::3] = (128, 64, 128)
    return pal


def make_gtav(
    root: str | Path,
    n: int = 4,
    hw: tuple[int, int] = (40, 60),
    *,
    mismatched: tuple[int, ...] = (),
    seed: int = 0,
) -> FakeRelease:
    """``images/NNNNN.png`` RGB + ``labels/NNNNN.png`` palette PNG of Cityscapes ids 0-35.

    Items in ``mismatched`` get a label 2 rows and 4 columns larger than their image.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    rel = FakeRelease("gtav", root)
    for i in range(n):
        key = f"{i + 1:05d}"
        rgb = _rgb(rng, hw)
        lhw = (hw[0] + 2, hw[1] + 4) if i in mismatched else hw
        raw = blocky_labels(rng, lhw, np.arange(36, dtype=np.uint8), block=4)
        img = _write(root / "images" / f"{key}.png", png_bytes(rgb))
        lab = _write(root / "labels" / f"{key}.png", png_bytes(raw, palette=_dup_palette()))
        rel.items.append(FakeItem(key, img, lab, rgb, raw))
    return rel


def make_synthia(
    root: str | Path, n: int = 3, hw: tuple[int, int] = (40, 60), *, seed: int = 1
) -> FakeRelease:
    """``RGB/NNNNNNN.png`` + 16-bit 3-channel ``GT/LABELS/NNNNNNN.png``: R class id (0-22),
    G instance id (up to 4000), B noise."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rel = FakeRelease("synthia", root)
    for i in range(n):
        key = f"{i:07d}"
        rgb = _rgb(rng, hw)
        cls = blocky_labels(rng, hw, np.arange(23, dtype=np.uint16), block=4)
        inst = rng.integers(0, 4000, size=hw, dtype=np.uint16)
        noise = rng.integers(0, 65535, size=hw, dtype=np.uint16)
        lab16 = np.stack([cls, inst, noise], axis=-1)  # file channel order R, G, B
        img = _write(root / "RGB" / f"{key}.png", png_bytes(rgb))
        lab = _write(root / "GT" / "LABELS" / f"{key}.png", png_bytes(lab16))
        rel.items.append(FakeItem(key, img, lab, rgb, cls))
    return rel


def make_urbansyn(
    root: str | Path, n: int = 3, hw: tuple[int, int] = (40, 60), *, seed: int = 2
) -> FakeRelease:
    """``rgb/rgb_NNNN.png`` + ``ss/ss_NNNN.png`` (8-bit grey train ids 0-19, 19 = unlabelled)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rel = FakeRelease("urbansyn", root)
    for i in range(n):
        key = f"{i + 1:04d}"
        rgb = _rgb(rng, hw)
        raw = blocky_labels(rng, hw, np.arange(20, dtype=np.uint8), block=4)
        img = _write(root / "rgb" / f"rgb_{key}.png", png_bytes(rgb))
        lab = _write(root / "ss" / f"ss_{key}.png", png_bytes(raw))
        rel.items.append(FakeItem(key, img, lab, rgb, raw))
    return rel


def make_cityscapes(
    root: str | Path,
    split: str = "val",
    cities: tuple[str, ...] = ("frankfurt", "lindau"),
    per_city: int = 2,
    hw: tuple[int, int] = (32, 64),
    *,
    seed: int = 3,
) -> FakeRelease:
    """``leftImg8bit/SPLIT/CITY/*_leftImg8bit.png`` + ``gtFine/SPLIT/CITY/*_gtFine_labelIds.png``
    (grey ids 0-33), with the release's other gtFine files beside them (color, instanceIds,
    polygons) that a loader must ignore."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rel = FakeRelease("cityscapes", root)
    for city in cities:
        for j in range(per_city):
            base = f"{city}_000000_{j * 19 + 19:06d}"
            rgb = _rgb(rng, hw)
            raw = blocky_labels(rng, hw, np.arange(34, dtype=np.uint8), block=4)
            img = _write(
                root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", png_bytes(rgb)
            )
            gt = root / "gtFine" / split / city
            lab = _write(gt / f"{base}_gtFine_labelIds.png", png_bytes(raw))
            _write(gt / f"{base}_gtFine_color.png", png_bytes(_rgb(rng, hw)))
            _write(gt / f"{base}_gtFine_instanceIds.png", png_bytes(raw.astype(np.uint16) * 1000))
            _write(gt / f"{base}_gtFine_polygons.json", b'{"imgHeight": 32, "objects": []}')
            rel.items.append(FakeItem(f"{city}/{base}", img, lab, rgb, raw))
    return rel


def make_bdd100k(
    root: str | Path,
    split: str = "val",
    n: int = 3,
    hw: tuple[int, int] = (36, 64),
    *,
    seed: int = 4,
) -> FakeRelease:
    """``images/10k/SPLIT/X.jpg`` + ``labels/sem_seg/masks/SPLIT/X.png`` (grey train ids, 255)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rel = FakeRelease("bdd100k", root)
    values = np.array(list(range(19)) + [255], dtype=np.uint8)
    for i in range(n):
        key = f"7d2f7975-e0c1c5{i:02d}"
        rgb = _smooth_rgb(rng, hw)
        raw = blocky_labels(rng, hw, values, block=4)
        img = _write(root / "images" / "10k" / split / f"{key}.jpg", jpeg_bytes(rgb))
        lab = _write(root / "labels" / "sem_seg" / "masks" / split / f"{key}.png", png_bytes(raw))
        rel.items.append(FakeItem(key, img, lab, rgb, raw))
    return rel


def make_mapillary(
    root: str | Path,
    sizes: tuple[tuple[int, int], ...] = ((65, 97), (64, 96), (97, 65)),
    *,
    seed: int = 5,
) -> FakeRelease:
    """``config_v1.2.json`` (all 66 v1.2 labels), ``validation/images/X.jpg`` and
    ``validation/v1.2/labels/X.png`` (palette PNG of label ids 0-65, official colours)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rel = FakeRelease("mapillary", root)
    config = {
        "labels": [
            {"readable": name, "color": list(color)}
            for name, color in zip(MAPILLARY_V12_NAMES, MAPILLARY_V12_COLORS, strict=True)
        ],
        "version": "1.2",
    }
    _write(root / "config_v1.2.json", json.dumps(config, indent=1).encode())
    pal = np.zeros((256, 3), np.uint8)
    pal[: len(MAPILLARY_V12_COLORS)] = MAPILLARY_V12_COLORS
    for i, hw in enumerate(sizes):
        key = f"{'abcdefghij'[i]}Xq3_{i:02d}kL9mN2pR5sT8uV1w"
        rgb = _smooth_rgb(rng, hw)
        raw = blocky_labels(rng, hw, np.arange(66, dtype=np.uint8), block=4)
        img = _write(root / "validation" / "images" / f"{key}.jpg", jpeg_bytes(rgb))
        lab = _write(
            root / "validation" / "v1.2" / "labels" / f"{key}.png", png_bytes(raw, palette=pal)
        )
        rel.items.append(FakeItem(key, img, lab, rgb, raw))
    return rel


def make_all(base: str | Path) -> dict[str, FakeRelease]:
    """All six fake releases under ``base/<name>``."""
    base = Path(base)
    return {
        "gtav": make_gtav(base / "gtav"),
        "synthia": make_synthia(base / "synthia"),
        "urbansyn": make_urbansyn(base / "urbansyn"),
        "cityscapes": make_cityscapes(base / "cityscapes"),
        "bdd100k": make_bdd100k(base / "bdd100k"),
        "mapillary": make_mapillary(base / "mapillary"),
    }
