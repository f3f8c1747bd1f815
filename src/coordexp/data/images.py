"""Reading images: one conversion to 8-bit RGB for training, inference and reports.

16-bit (and 32-bit integer) greyscale is scaled from 0..65535 to 0..255; Pillow's own
`convert("RGB")` would clip it, turning almost every pixel white. Other modes (palette, alpha,
CMYK, 1-bit, 16-bit RGB, which Pillow reads as 8-bit) go through `convert("RGB")`; alpha is dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from coordexp.errors import UserError

WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb8(image: Image.Image) -> Image.Image:
    if image.mode in WIDE_GREY:
        values = np.asarray(image, dtype=np.float64)  # [H, W]
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def check_image(path: Path, width: int, height: int, where: str) -> None:
    """The image file exists, its header reads, and its size is width x height (only the
    header is read: cheap enough to check every record before training starts)."""
    if not path.is_file():
        raise UserError(f"{where}: image file {path} not found")
    try:
        with Image.open(path) as im:
            size = im.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{where}: cannot read image {path} ({e})") from None
    if size != (width, height):
        raise UserError(f"{where}: image {path} is {size[0]}x{size[1]} but the record says "
                        f"{width}x{height}")


def open_rgb8(path: str | Path) -> Image.Image:
    """The image at path as 8-bit RGB; an unreadable file is a UserError naming it."""
    try:
        with Image.open(path) as im:
            return to_rgb8(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read image ({e})") from None
