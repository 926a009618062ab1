"""A split as stored images (`EncodedSplit`), what `pfb-train shards` (shards.py) writes: each source's
`encode` makes them (registry.py). Encoded images keep their bytes when readers take the format,
pixels and other formats become lossless PNG."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from pfb_train.data.decode import BadImage, decode_rgb


@dataclass
class EncodedSplit:
    """One split to write: its name in _info.json, its length, and `read(index) -> (encoded image
    bytes, extension without the dot, label int)`."""

    name: str
    length: int
    read: Callable[[int], tuple[bytes, str, int]]


def image_kind(data: bytes):
    """'jpg', 'png' or 'webp' from the leading bytes, or None."""
    if data[:2] == b"\xff\xd8":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def png(pixels: np.ndarray) -> bytes:
    """uint8 pixels (H, W) or (H, W, 3) as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def stored(data: bytes, fallback_extension: str) -> tuple[bytes, str]:
    """The bytes as they are if readers take the format; else PNG; else (no decode) as they are."""
    kind = image_kind(data)
    if kind is not None:
        return data, kind
    try:  # the harness's one decode rule (data/decode.py): 16-bit keeps its top byte, bombs are refused
        return png(np.asarray(decode_rgb(data))), "png"
    except BadImage:  # stored as it is: it stands in when read, as on the other layouts
        return data, fallback_extension or "bin"


def pixel_split(images: np.ndarray, labels, name: str) -> EncodedSplit:
    """uint8 (N, C, H, W) images in memory (C 1 or 3), written as PNG."""

    def read(i):
        pixels = images[i].transpose(1, 2, 0)
        return png(pixels[..., 0] if pixels.shape[-1] == 1 else pixels), "png", int(labels[i])

    return EncodedSplit(name, len(labels), read)
