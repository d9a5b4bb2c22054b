"""The 19 ``imagecorruptions`` corruptions at 5 severities, batched on any device with torch/kornia.

>>> from corruptions import CORRUPTIONS, corrupt
>>> y = corrupt(x, "fog", severity=3, seed=torch.tensor([11, 12]))  # x: float [2,3,H,W] in [0,1]
"""

from corruptions._core import CORRUPTIONS, SEVERITIES, CorruptionError, Rng, corrupt, register

# Importing the families registers their functions.
from corruptions import noise, blur, weather, digital  # noqa: E402,F401

__all__ = ["CORRUPTIONS", "SEVERITIES", "CorruptionError", "Rng", "corrupt", "register"]
