"""Image files: which suffixes count as images, scanning a folder for them, decoding one
safely (size-limited, one-line errors) and converting any mode to RGB.

Ground floor: PIL and numpy, imported inside the functions (the torch-free runtime uses
this module too).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from zmdevice.errors import UserError

if TYPE_CHECKING:
    from PIL import Image

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
"""The one list of image file suffixes (lower case): folders, tables, predict inputs."""
MAX_IMAGE_PIXELS = 100_000_000
"""Largest image decoded (width x height); a bigger one is treated as unreadable. A
compressed file of a few hundred KB can declare 20000 x 20000 pixels (a "decompression
bomb") and would take over a gigabyte to decode; real photos stay far below 100 MP."""


class CorruptImage(UserError):
    """An image file could not be read; raised only when ``skip_corrupt`` is set."""


class UnreadableImage(UserError):
    """An image file that cannot be decoded: missing, truncated, garbage or too large."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"unreadable image {path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self):
        return type(self), (self.path, self.reason)


def scan_images(folder: Path) -> list[str]:
    """Relative POSIX paths of all image files under ``folder``, sorted; hidden ones skipped."""
    found = []
    visited: set[tuple[int, int]] = set()
    # Symlinked folders are followed (data often lives elsewhere), but each real folder is
    # entered once, so a link cycle cannot loop forever.
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        stat = os.stat(directory)
        if (stat.st_dev, stat.st_ino) in visited:
            subdirs[:] = []
            continue
        visited.add((stat.st_dev, stat.st_ino))
        subdirs[:] = sorted(name for name in subdirs if not name.startswith("."))
        rel_dir = Path(directory).relative_to(folder)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((rel_dir / name).as_posix())
    found.sort()
    return found


def open_image(path: Path) -> Image.Image:
    """Decode an image file fully (in its own mode), at most ``MAX_IMAGE_PIXELS`` large.

    Raises:
        UnreadableImage: a missing, truncated, garbage or oversized file.
    """
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            # PIL warns between its own limit and twice it; ours decides, explicitly.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ValueError(
                        f"{width} x {height} pixels is more than the {MAX_IMAGE_PIXELS:,} "
                        "decoded at most"
                    )
                image.load()  # decode now, inside this try, and release the file
                return image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        # PIL reports truncated/garbage files as OSError, UnidentifiedImageError (an
        # OSError), ValueError or SyntaxError depending on the decoder, and images over
        # twice its own pixel limit as DecompressionBombError.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnreadableImage(path, reason) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 3-channel RGB; transparency is composited on white."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits instead of letting convert() clip at 255.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        grey = np.clip(np.rint(array / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "F":
        import numpy as np

        grey = np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")
