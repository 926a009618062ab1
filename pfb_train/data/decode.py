"""One rule for turning stored image bytes into pixels, shared by every layout and decode path.

- **Size.** An image whose header gives more than `MAX_PIXELS` pixels is not decoded on any path: a
  22 KB PNG can claim 14,000 x 13,000 pixels (546 MB of RGB). The limit is PIL's own (it refuses
  at twice `Image.MAX_IMAGE_PIXELS`, DecompressionBombError), so the `cpu` path decodes what PIL
  decodes; the `device` and `dali` paths read the same header with PIL's lazy `Image.open` (no
  pixels decoded) before their decoders see the bytes.
- **Pixels.** Every image becomes 8-bit RGB. 16-bit grey (PIL's `I;16*`, and `I`, which PIL gives
  16-bit PGM) keeps its top 8 bits (0x4000 -> 0x40), which is what the `device` path gets from
  torchvision.io (uint16 >> 8, `top_byte`) and DALI within one level (it scales by 255/65535);
  16-bit RGB(A) PNGs PIL itself reads as their top bytes. Floats (`F`) are taken as [0, 1],
  torchvision's convention. Alpha and palette transparency are dropped, as torchvision.io and DALI
  drop them (a palette image goes through RGBA so that PIL does not warn about its transparency);
  CMYK, 1-bit, LA and the rest by PIL's `convert("RGB")`.
- **Failure.** Whatever PIL raises while reading or decoding a file becomes `BadImage` with a
  one-line reason; the datasets make it a stand-in (missing.py).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union, cast

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pfb_train.errors import squeezed

# 178,956,970 with PIL's default: where PIL raises DecompressionBombError. An int unless the check was turned off
# (None) before this import, which fails here as it always has.
MAX_PIXELS = 2 * cast(int, Image.MAX_IMAGE_PIXELS)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's grey modes wider than 8 bits (integers)

Source = Union[str, Path, bytes, bytearray, memoryview, torch.Tensor]


class BadImage(Exception):
    """The image cannot be decoded; the message is the one-line reason a stand-in records."""


class TooLarge(BadImage):
    """The header gives more than MAX_PIXELS pixels: refused before decoding."""


def _file(source: Source):
    """What Image.open takes: a path as it is, encoded bytes (or a uint8 tensor of them) as a stream."""
    if isinstance(source, (str, Path)):
        return source
    if isinstance(source, torch.Tensor):
        # numpy's stubs give ndarray the buffer protocol on Python 3.12+ only; it has it on every version
        return io.BytesIO(source.numpy())  # type: ignore[arg-type]
    return io.BytesIO(source)


def _reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):  # its message holds the stream's repr: say it plainly
        return "not an image file PIL can read"
    message = squeezed(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def open_image(source: Source) -> Image.Image:
    """The image opened lazily (PIL reads the header, no pixels), its size checked.

    `source`: a file path, encoded bytes, or a uint8 tensor of them. Raises TooLarge over MAX_PIXELS,
    BadImage when the file cannot be read or is not an image PIL knows."""
    try:
        image = Image.open(_file(source))
    except Image.DecompressionBombError as e:  # PIL's check, at the same limit
        raise TooLarge(f"more than {MAX_PIXELS:,} pixels, PIL's decompression-bomb limit ({e})") from None
    except Exception as e:  # noqa: BLE001 - only opening is inside: any failure is the file's
        raise BadImage(_reason(e)) from None
    width, height = image.size
    if width * height > MAX_PIXELS:  # the same limit, also if PIL's own check was turned off
        image.close()
        raise TooLarge(f"{width} x {height} pixels, more than {MAX_PIXELS:,} (PIL's decompression-bomb limit)")
    return image


def header_size(source: Source) -> tuple[int, int]:
    """(height, width) in pixels from the image's header, no pixels decoded. Raises as open_image."""
    with open_image(source) as image:
        width, height = image.size
    return height, width


def check_size(data: torch.Tensor) -> None:
    """Raises TooLarge if the encoded image `data` (uint8 tensor) claims more than MAX_PIXELS pixels.

    For decoders other than PIL (torchvision.io, DALI): a header PIL cannot parse passes, the
    decoder may still know the format."""
    try:
        header_size(data)
    except TooLarge:
        raise
    except BadImage:
        pass


def decode_rgb(source: Source) -> Image.Image:
    """The image decoded to 8-bit RGB by the module's rule (a loaded PIL image, mode "RGB").

    `source`: a file path, encoded bytes, or a uint8 tensor of them. Raises TooLarge over MAX_PIXELS
    and BadImage for anything that does not decode (empty, truncated, not an image, an unknown mode)."""
    if isinstance(source, (bytes, bytearray, memoryview, torch.Tensor)) and len(source) == 0:
        raise BadImage("no image data (empty or null)")
    with open_image(source) as image:
        try:
            return to_rgb(image)
        except Exception as e:  # noqa: BLE001 - PIL's plugins raise OSError, SyntaxError, ValueError, EOFError,
            raise BadImage(_reason(e)) from None  # struct.error, zlib.error... for damaged data: the file's fault


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` (any PIL mode) as 8-bit RGB: see the module's rule."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.clip(np.asarray(image, dtype=np.int64), 0, 0xFFFF) >> 8  # the top 8 bits, as top_byte
        return Image.fromarray(pixels.astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        levels = np.nan_to_num(np.asarray(image, dtype=np.float64)) * 255  # [0, 1] -> 0..255
        return Image.fromarray(np.clip(levels.round(), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")  # then the alpha is dropped: the palette colours, as torchvision.io gives
    return image.convert("RGB")


def top_byte(image: torch.Tensor) -> torch.Tensor:
    """A decoded image as uint8: uint16 (16-bit PNG from torchvision.io) keeps its top 8 bits; uint8 as it is."""
    if image.dtype == torch.uint16:
        return (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def rgb_tensor(source: Source) -> torch.Tensor:
    """decode_rgb's pixels as a (3, H, W) uint8 tensor (the device path's fallback for formats
    torchvision.io does not read: BMP, TIFF, PPM, ...). Raises as decode_rgb."""
    return torch.from_numpy(np.asarray(decode_rgb(source)).copy()).permute(2, 0, 1)
