"""Heatmap pictures: colour maps, overlays on the image, and captioned grids (OpenCV).

Signed maps (LRP, gradients) use a blue-white-red scale symmetric around zero (red: evidence
for the class, blue: against); non-negative maps (Grad-CAM) use OpenCV's "jet". Each map is
scaled by its own largest magnitude, so pictures show where, not how much.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from ..data.images import to_uint8
from ..errors import AuditkitError


def _blue_white_red() -> np.ndarray:
    """A 256-entry BGR lookup table: blue (-1) -> white (0) -> red (+1)."""
    t = np.linspace(-1.0, 1.0, 256)
    red = np.where(t < 0, 1.0 + t, 1.0)
    green = 1.0 - np.abs(t)
    blue = np.where(t > 0, 1.0 - t, 1.0)
    return (np.stack([blue, green, red], axis=1) * 255).round().astype(np.uint8).reshape(256, 1, 3)


_BWR = _blue_white_red()


def colorize(heatmap: torch.Tensor, signed: bool | None = None) -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8 RGB picture."""
    values = heatmap.detach().float().cpu().numpy()
    if signed is None:
        signed = bool((values < 0).any())
    scale = float(np.abs(values).max()) or 1.0
    if signed:
        index = np.clip((values / scale + 1.0) * 127.5, 0, 255).astype(np.uint8)
        bgr = cv2.applyColorMap(index, _BWR)
    else:
        index = np.clip(values / scale * 255.0, 0, 255).astype(np.uint8)
        bgr = cv2.applyColorMap(index, cv2.COLORMAP_JET)
    return bgr[:, :, ::-1].copy()


def to_rgb(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, 3) uint8."""
    pixels = to_uint8(image)
    return np.repeat(pixels[:, :, None], 3, axis=2) if pixels.ndim == 2 else np.ascontiguousarray(pixels[:, :, :3])


def overlay(image: torch.Tensor, heatmap: torch.Tensor, alpha: float = 0.55, signed: bool | None = None) -> np.ndarray:
    """The image (greyed) with the coloured heatmap blended on top."""
    base = to_rgb(image).astype(np.float32)
    grey = base.mean(axis=2, keepdims=True).repeat(3, axis=2)
    colour = colorize(heatmap, signed).astype(np.float32)
    return np.clip((1 - alpha) * grey + alpha * colour, 0, 255).astype(np.uint8)


def upscale(picture: np.ndarray, min_side: int = 128) -> np.ndarray:
    """Small images (28x28 digits) enlarged with nearest neighbours so pixels stay visible."""
    factor = max(1, -(-min_side // min(picture.shape[:2])))
    if factor == 1:
        return picture
    return cv2.resize(picture, (picture.shape[1] * factor, picture.shape[0] * factor), interpolation=cv2.INTER_NEAREST)


def captioned(picture: np.ndarray, caption: str) -> np.ndarray:
    """``picture`` with a white strip and a caption underneath."""
    height = 18
    strip = np.full((height, picture.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, caption[: max(1, picture.shape[1] // 7)], (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                cv2.LINE_AA)
    return np.concatenate([picture, strip], axis=0)


def grid(tiles: list[np.ndarray], columns: int = 8, gap: int = 4) -> np.ndarray:
    """Tiles of equal size laid out in rows on a white background."""
    if not tiles:
        raise AuditkitError("nothing to lay out in a grid")
    height, width = tiles[0].shape[:2]
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    canvas = np.full((rows * (height + gap) + gap, columns * (width + gap) + gap, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        y, x = gap + r * (height + gap), gap + c * (width + gap)
        canvas[y : y + height, x : x + width] = tile
    return canvas


def encode_png(picture: np.ndarray) -> bytes:
    """An RGB (H, W, 3) or grey (H, W) uint8 picture as PNG bytes."""
    ok, encoded = cv2.imencode(".png", picture[:, :, ::-1] if picture.ndim == 3 else picture)
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 array
        raise AuditkitError("could not encode a PNG")
    return encoded.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes as an RGB (H, W, 3) or grey (H, W) uint8 picture."""
    picture = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if picture is None:
        raise AuditkitError("not a readable PNG")
    return picture[:, :, ::-1].copy() if picture.ndim == 3 else picture


def png_data_uri(picture: np.ndarray) -> str:
    """A picture as a data: URI, for self-contained HTML."""
    import base64

    return "data:image/png;base64," + base64.b64encode(encode_png(picture)).decode("ascii")


def outline(picture: np.ndarray, mask: np.ndarray, colour=(0, 200, 0)) -> np.ndarray:
    """``picture`` (H, W, 3) with the border of ``mask`` (any size, > half = inside) drawn on it."""
    inside = cv2.resize((mask > 127).astype(np.uint8) if mask.dtype == np.uint8 else (mask > 0.5).astype(np.uint8),
                        (picture.shape[1], picture.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(inside, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    drawn = np.ascontiguousarray(picture.copy())
    cv2.drawContours(drawn, contours, -1, colour, 1)
    return drawn


def write_png(path: str | Path, picture: np.ndarray) -> Path:
    """Writes an RGB uint8 picture (atomically: temp file, then rename)."""
    from .._io import atomic_write

    def write(tmp: Path) -> None:
        tmp.write_bytes(encode_png(picture))

    return atomic_write(path, write, overwrite=True)
