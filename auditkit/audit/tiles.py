"""Example tiles of an audit, kept as data in its report: for a few correct and wrong predictions of
each variant, the image, its mask and one heatmap per attribution method, as small base64 PNGs.

The report can then be rendered, re-rendered and compared from its JSON alone (auditkit/audit/html.py,
`auditkit report`): no model, data or device. Heatmaps are stored as 8-bit PNGs of map / scale
(signed maps around 128) with their scale, so the renderer colours them exactly as
auditkit.explain.render does.
"""

from __future__ import annotations

import base64

import cv2
import numpy as np
import torch

from ..data import collate, to_uint8
from ..device import autocast
from ..explain import attribute
from ..explain.render import decode_png, encode_png

MAX_SIDE = 80  # stored pictures are at most this many pixels on a side (area resampling)


def _b64(picture: np.ndarray) -> str:
    return base64.b64encode(encode_png(picture)).decode("ascii")


def _unb64(text: str) -> np.ndarray:
    return decode_png(base64.b64decode(text))


def _shrink(picture: np.ndarray) -> np.ndarray:
    height, width = picture.shape[:2]
    factor = MAX_SIDE / max(height, width)
    if factor >= 1:
        return picture
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(picture, size, interpolation=cv2.INTER_AREA)


def encode_map(heatmap: torch.Tensor) -> dict:
    """A heatmap (H, W) as {"png", "scale", "signed"}: 8-bit levels of map / scale."""
    values = heatmap.detach().float().cpu().numpy()
    signed = bool((values < 0).any())
    scale = float(np.abs(values).max()) or 1.0
    levels = (values / scale + 1.0) * 127.5 if signed else values / scale * 255.0
    return {"png": _b64(_shrink(np.clip(levels, 0, 255).round().astype(np.uint8))), "scale": scale, "signed": signed}


def decode_map(entry: dict) -> torch.Tensor:
    """The stored heatmap back as a float (H, W) tensor (up to its 8-bit quantisation)."""
    levels = _unb64(entry["png"]).astype(np.float32)
    values = levels / 127.5 - 1.0 if entry["signed"] else levels / 255.0
    return torch.from_numpy(values * entry["scale"])


def encode_picture(picture: torch.Tensor) -> str:
    """An image or mask (C, H, W) in [0, 1] as a small base64 PNG (what decode_picture reads)."""
    return _b64(_shrink(to_uint8(picture)))


def decode_picture(text: str) -> np.ndarray:
    """A stored image or mask as uint8 (H, W) or (H, W, 3)."""
    return _unb64(text)


def example_tiles(model, dataset, examples: dict, methods, epsilon: float, device, precision: str) -> dict:
    """{variant: {"correct": [tile, ...], "wrong": [...]}} for the chosen dataset indices; each tile is
    {"index", "label", "prediction", "image", "mask" (or None), "maps": {method: encoded map}}."""
    tiles: dict = {}
    for variant, chosen in examples.items():
        tiles[variant] = {}
        for kind, indices in chosen.items():
            tiles[variant][kind] = []
            if not indices:
                continue
            batch = collate([dataset[i] for i in indices]).to(device)
            with autocast(device, precision):
                with torch.no_grad():
                    predictions = model(batch.images).argmax(1)
                maps = {}
                for method in methods:
                    options = {"epsilon": epsilon} if method == "lrp_epsilon" else {}
                    maps[method] = attribute(model, batch.images, predictions, method, **options)[:, 0]
            for k, index in enumerate(indices):
                mask = encode_picture(batch.masks[k]) if bool(batch.has_mask[k]) else None
                tiles[variant][kind].append({
                    "index": int(index),
                    "label": int(batch.labels[k]),
                    "prediction": int(predictions[k]),
                    "image": encode_picture(batch.images[k]),
                    "mask": mask,
                    "maps": {method: encode_map(values[k]) for method, values in maps.items()},
                })
    return tiles
