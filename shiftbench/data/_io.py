"""PNG reading and writing for the dataset loaders and exporters, and the shared resize.

PNGs go through Pillow. Any read failure (missing file, truncated or corrupt PNG) becomes a
one-line :class:`ShiftbenchError` naming the file (kept apart as ``.path`` and ``.reason``).
Writing is atomic (:mod:`shiftbench.io`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shiftbench.errors import ShiftbenchError, file_error
from shiftbench.io import atomic_path

#: Pillow's modes of 16-bit grey PNGs, which its convert('RGB') clips at 255 instead of scaling
_GREY16 = ("I;16", "I;16B", "I;16L", "I")
#: Pillow modes whose values are label ids as they stand (a palette image's values are its indices)
_ID_MODES = ("L", "P", "1") + _GREY16


def read_png(path: str | os.PathLike, mode: str = "rgb") -> np.ndarray:
    """A PNG as uint8 [C,H,W]: ``"rgb"`` an image, C = 3 (grey replicated, alpha dropped, 16-bit grey scaled
    to 8 bits, floor(x * 255 / 65535), as ``shiftbench corrupt`` does); ``"ids"`` a map of label ids, C = 1
    (:func:`_label_ids`: values, never brightness)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise file_error(path, "no such file")
    try:
        with Image.open(path, formats=["PNG"]) as im:
            im.load()
            if mode == "ids" or im.mode in _GREY16 + ("RGB",):
                pixels, pil_mode = np.asarray(im), im.mode
            else:
                pixels, pil_mode = np.asarray(im.convert("RGB")), "RGB"
    except UnidentifiedImageError:
        raise file_error(path, "not a PNG image (empty, corrupt or another format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise file_error(path, f"not a readable PNG, truncated or corrupt ({' '.join(str(exc).split())})") from None
    if mode == "ids":
        pixels = _label_ids(pixels, pil_mode, path)
    elif pil_mode in _GREY16:
        grey = (pixels.astype(np.int64).clip(0, 65535) * 255 // 65535).astype(np.uint8)
        pixels = np.repeat(grey[..., None], 3, axis=-1)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _label_ids(values: np.ndarray, pil_mode: str, path: Path) -> np.ndarray:
    """uint8 [H,W] label ids from a PNG's values: grey values, a palette image's indices (the ids, as VOC-style
    tools write them; not the brightness of their colours), 16-bit values up to 255. A colour image counts only
    when its channels are equal: its brightness would pass for ids."""
    if pil_mode in ("LA", "PA"):  # the alpha channel is no id
        values = values[..., 0]
    elif pil_mode not in _ID_MODES:
        if (values[..., :3] != values[..., :1]).any():
            raise file_error(path, f"a colour ({pil_mode}) image, not a map of label ids: give the one-channel "
                             "*_gtFine_labelIds.png (grey values are the ids), not a *_color.png")
        values = values[..., 0]
    if values.size and not 0 <= values.min() <= values.max() <= 255:
        raise file_error(path, f"label ids {values.min()}..{values.max()} in a {pil_mode} image; ids must fit 0..255")
    return values.astype(np.uint8)


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write uint8 [3,H,W], [1,H,W] or [H,W] as a PNG, atomically."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"write_png wants uint8, got {image.dtype}")
    if image.ndim == 3:
        image = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG", compress_level=3)


def check_size(size) -> tuple[int, int] | None:
    """None, or (H, W) with two positive integers."""
    if size is None:
        return None
    try:
        H, W = (int(s) for s in size)
        ok = (H, W) == tuple(size) and H > 0 and W > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ShiftbenchError(f"size {size!r} is not (H, W) with two positive integers, or None")
    return H, W


def to_sample(image: np.ndarray, label: np.ndarray, size: tuple[int, int] | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 image [3,H,W] and label [H,W] -> (float32 [3,h,w] in [0,1], int64 [h,w]), resized to
    ``size`` when given: bilinear (antialiased when shrinking) for the image, nearest for the label."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float().div_(255)
    label = torch.from_numpy(np.ascontiguousarray(label))
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0].clamp_(0, 1)
        label = F.interpolate(label[None, None].to(torch.uint8), size=size, mode="nearest-exact")[0, 0]
    return x, label.long()
