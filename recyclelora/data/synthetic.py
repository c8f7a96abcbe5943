"""Procedural two-domain street scenes for the CPU demo: no download, 19 Cityscapes classes.

Both domains share one scene model (sky, buildings, vegetation, road with sidewalks, poles with
signs and lights, vehicles, people); they differ in appearance only, which is the domain gap
of synthetic-to-real training: the "synthetic" style is flat and saturated, the "real" style has
shifted hues, lower saturation, texture noise, blur and a vignette. Files are written in the
official GTAV and Cityscapes layouts (Cityscapes label ids), so the demo runs the real loaders
and ``prepare_data.py`` conversions.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from cityscapesscripts.helpers.labels import trainId2label

from .labels import palette
from .layouts import CITYSCAPES_LAYOUT, GTAV_LAYOUT

ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)


def render_scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (H, W) uint8 train-id map of a street seen from a car."""
    h, w = height, width
    lab = np.full((h, w), SKY, np.uint8)
    horizon = int(h * rng.uniform(0.38, 0.52))
    vx = int(w * rng.uniform(0.35, 0.65))  # vanishing point

    for _ in range(rng.integers(4, 9)):  # buildings and walls of trees along the horizon
        x0 = int(rng.uniform(-0.1, 1.0) * w)
        bw, bh = int(rng.uniform(0.1, 0.35) * w), int(rng.uniform(0.15, 0.4) * h)
        cls = BUILDING if rng.random() < 0.7 else VEGETATION
        lab[max(horizon - bh, 0) : horizon + 2, max(x0, 0) : x0 + bw] = cls
    for _ in range(rng.integers(1, 4)):
        cx, cy = int(rng.uniform(0, w)), horizon - int(rng.uniform(0, 0.1) * h)
        axes = (int(rng.uniform(0.05, 0.15) * w), int(rng.uniform(0.05, 0.15) * h))
        cv2.ellipse(lab, (cx, cy), axes, 0, 0, 360, VEGETATION, -1)

    lab[horizon:] = TERRAIN
    spread = rng.uniform(0.55, 0.9)
    left, right = int(vx - spread * w), int(vx + spread * w)
    cv2.fillPoly(
        lab,
        [np.array([[vx - 2, horizon], [vx + 2, horizon], [right + w // 6, h], [left - w // 6, h]])],
        SIDEWALK,
    )
    cv2.fillPoly(lab, [np.array([[vx, horizon], [vx, horizon], [right, h], [left, h]])], ROAD)
    if rng.random() < 0.6:  # a fence or wall along one side
        side = rng.choice([-1, 1])
        x_edge = vx + side * int(0.45 * w)
        y_top = horizon - int(0.05 * h)
        cls = FENCE if rng.random() < 0.5 else WALL
        pts = np.array([[vx, horizon], [x_edge, y_top], [x_edge, h], [vx, horizon + 2]])
        if side > 0:
            pts[:, 0] = np.clip(pts[:, 0], vx, w)
        cv2.fillPoly(lab, [pts], cls)

    for _ in range(rng.integers(1, 4)):  # poles with a sign or a traffic light
        x = int(rng.uniform(0.05, 0.95) * w)
        y_base = int(h * rng.uniform(0.6, 0.9))
        top = max(horizon - int(0.3 * h), 2)
        cv2.line(lab, (x, y_base), (x, top), POLE, max(1, w // 128))
        s = max(3, w // 40)
        cls = SIGN if rng.random() < 0.5 else LIGHT
        cv2.rectangle(lab, (x - s, top), (x + s, top + (2 * s if cls == LIGHT else s)), cls, -1)

    for _ in range(rng.integers(1, 5)):  # vehicles on the road, larger when nearer
        y = int(rng.uniform(horizon + 0.05 * h, h * 0.95))
        depth = (y - horizon) / (h - horizon)
        cls = rng.choice([CAR, CAR, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE])
        vw = int(w * depth * {CAR: 0.25, TRUCK: 0.3, BUS: 0.4, TRAIN: 0.6, MOTORCYCLE: 0.08}[cls])
        vh = int(vw * {CAR: 0.6, TRUCK: 0.8, BUS: 0.7, TRAIN: 0.5, MOTORCYCLE: 1.0}[cls])
        x = int(vx + (rng.uniform(-0.8, 0.8)) * depth * w * 0.5)
        cv2.rectangle(lab, (x - vw // 2, y - vh), (x + vw // 2, y), int(cls), -1)
    for _ in range(rng.integers(0, 5)):  # people on the sidewalks, some riding bicycles
        y = int(rng.uniform(horizon + 0.1 * h, h * 0.95))
        depth = (y - horizon) / (h - horizon)
        side = rng.choice([-1, 1])
        x = int(vx + side * (0.35 + rng.uniform(0, 0.2)) * depth * w)
        ph, pw = int(h * depth * 0.35), max(2, int(w * depth * 0.03))
        if rng.random() < 0.3:
            cv2.rectangle(lab, (x - 3 * pw, y - ph // 3), (x + 3 * pw, y), BICYCLE, -1)
            cv2.rectangle(lab, (x - pw, y - ph), (x + pw, y - ph // 3), RIDER, -1)
        else:
            cv2.rectangle(lab, (x - pw, y - ph), (x + pw, y), PERSON, -1)
    return lab


def stylize(lab: np.ndarray, rng: np.random.Generator, domain: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB appearance of a train-id map in the "synthetic" or "real" style."""
    colours = palette()[:19].astype(np.float32)
    if domain == "real":  # a different camera and world: hue shift, duller colours
        hsv = cv2.cvtColor(colours[None].astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + 12) % 180
        hsv[..., 1] *= 0.6
        colours = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0].astype(np.float32)
    elif domain != "synthetic":
        raise ValueError(f"domain must be 'synthetic' or 'real', got {domain!r}")
    img = colours[lab] + rng.normal(0, 6, size=(19, 3)).astype(np.float32)[lab]
    if domain == "real":
        img += rng.normal(0, 18, size=img.shape).astype(np.float32)  # sensor noise and texture
        img = cv2.GaussianBlur(img, (5, 5), 1.2)
        yy, xx = np.mgrid[: lab.shape[0], : lab.shape[1]]
        r = np.hypot((yy / lab.shape[0] - 0.5), (xx / lab.shape[1] - 0.5))
        img *= (1 - 0.6 * r**2)[..., None]  # vignette
        img = 255 * (np.clip(img, 0, 255) / 255) ** 1.2
    return np.clip(img, 0, 255).astype(np.uint8)


def label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids -> Cityscapes label ids (how GTAV and Cityscapes ship their labels)."""
    table = np.zeros(256, np.uint8)  # 255 (ignore) -> 0 "unlabeled"
    for t in range(19):
        table[t] = trainId2label[t].id
    return table[train_ids]


def write_demo_datasets(
    root: str | Path,
    n_source: int = 48,
    n_target: int = 16,
    size: tuple[int, int] = (128, 256),
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``root/gta`` (synthetic style, GTAV layout) and ``root/cityscapes`` (real style,
    Cityscapes layout with a train and a val split); returns the two roots."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    gta, cs = root / "gta", root / "cityscapes"
    h, w = size

    def write(img_path: Path, lab_path: Path, domain: str) -> None:
        lab = render_scene(rng, h, w)
        img_path.parent.mkdir(parents=True, exist_ok=True)
        lab_path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(img_path), cv2.cvtColor(stylize(lab, rng, domain), cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(lab_path), label_ids(lab))

    g = GTAV_LAYOUT
    for i in range(n_source):
        key = f"{i:05d}"
        write(g.image_path(g.image_dir(gta), key), g.label_path(g.label_dir(gta), key), "synthetic")
    c = CITYSCAPES_LAYOUT
    for split, n in (("train", n_target), ("val", n_target)):
        for i in range(n):
            key = f"demo/demo_{0:06d}_{i:06d}"  # CITY/stem
            write(
                c.image_path(c.image_dir(cs, split), key),
                c.label_path(c.label_dir(cs, split), key),
                "real",
            )
    return {"gtav": gta, "cityscapes": cs}
