"""Run the reference ``imagecorruptions`` 1.1.2 on current numpy / scikit-image (tests only).

imagecorruptions was written for numpy < 2 and scikit-image < 0.19: it uses ``np.float_``
(fog), ``skimage.filters.gaussian(..., multichannel=True)`` (gaussian_blur, glass_blur)
and ``scipy.ndimage.interpolation``. :func:`shim` patches those at run time; nothing of
it ships in the package. The reference truncates its float output to uint8 at the end
(``np.uint8``), which tests must keep in mind when they compare.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=None)
def shim():
    """Import imagecorruptions with the compatibility patches applied; returns the module."""
    if not hasattr(np, "float_"):
        np.float_ = np.float64
    import skimage.filters

    gaussian = skimage.filters.gaussian
    if not getattr(gaussian, "_shiftbench_shim", False):
        def patched(image, sigma=1, *args, multichannel=None, **kwargs):
            if multichannel:
                kwargs.setdefault("channel_axis", -1)
            return gaussian(image, sigma, *args, **kwargs)

        patched._shiftbench_shim = True
        skimage.filters.gaussian = patched
    import imagecorruptions
    import imagecorruptions.corruptions as ref

    ref.gaussian = skimage.filters.gaussian  # bound at import: rebind to the patched one
    return imagecorruptions


def reference(image: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """imagecorruptions.corrupt on a uint8 HxWx3 image with numpy's global RNG seeded."""
    ic = shim()
    np.random.seed(seed)
    return ic.corrupt(image, severity=severity, corruption_name=name)


@functools.lru_cache(maxsize=None)
def photo(name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A scikit-image sample photograph (astronaut, coffee, chelsea, rocket), optionally
    resized to ``size`` = (H, W) with PIL's bicubic filter; uint8 HxWx3."""
    import skimage.data
    from PIL import Image

    img = getattr(skimage.data, name)()[..., :3]
    if size is not None:
        img = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BICUBIC))
    return np.ascontiguousarray(img)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float32 [1,3,H,W] in [0,1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255).unsqueeze(0)  # a writable copy


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [1,3,H,W] or [3,H,W] in [0,1] -> uint8 HxWx3, truncating like the reference."""
    x = x.squeeze(0) if x.dim() == 4 else x
    return (x.clamp(0, 1) * 255).permute(1, 2, 0).cpu().numpy().astype(np.uint8)
