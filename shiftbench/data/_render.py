"""Rendering primitives of the synthetic street scenes: a pinhole camera over a flat ground,
a canvas with label / colour / depth buffers, vertical planes and upright billboards.

World coordinates: X to the right, ``Yup`` above the ground, Z forward (metres). A point
projects to ``x = cx + f X / Z`` and ``y = horizon + f (h - Yup) / Z`` (pixel centres at
``i + 0.5``), ``h`` being the camera height. Everything is vectorised numpy over pixels;
Python loops only run over scene elements (a few dozen per image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: surface kinds in ``Canvas.surface`` (shadows darken only the ground)
SKY_SURFACE, GROUND_SURFACE, UPRIGHT_SURFACE = 0, 1, 2


@dataclass(frozen=True)
class Camera:
    H: int
    W: int
    f: float        # focal length in pixels
    cx: float       # column of the vanishing point
    horizon: float  # row of the horizon
    height: float   # camera height above the ground (m)

    @property
    def cols(self) -> np.ndarray:
        return np.arange(self.W, dtype=np.float32) + 0.5

    @property
    def rows(self) -> np.ndarray:
        return np.arange(self.H, dtype=np.float32) + 0.5

    def x(self, X: float, Z: float) -> float:
        return self.cx + self.f * X / Z

    def y(self, Yup: float, Z: float) -> float:
        return self.horizon + self.f * (self.height - Yup) / Z


class Canvas:
    """Label, linear RGB, depth and surface buffers [H,W(,3)], written with a depth test."""

    def __init__(self, H: int, W: int, sky_class: int):
        self.label = np.full((H, W), sky_class, np.uint8)
        self.rgb = np.zeros((H, W, 3), np.float32)
        self.depth = np.full((H, W), np.inf, np.float32)
        self.surface = np.zeros((H, W), np.uint8)
        self.shade = np.ones((H, W), np.float32)  # multiplicative shadows, applied to the ground only

    def paint(self, rs: slice, cs: slice, mask: np.ndarray, depth, cls, rgb, surface: int = UPRIGHT_SURFACE) -> None:
        """Write ``cls``/``rgb``/``depth`` in the window [rs, cs] where ``mask`` holds and the
        surface is nearer than what is there. ``depth``/``cls`` scalars or window arrays,
        ``rgb`` [3] or window [h,w,3]."""
        d = self.depth[rs, cs]
        m = mask & (depth < d)
        if not m.any():
            return
        np.copyto(d, depth, where=m, casting="unsafe")
        np.copyto(self.label[rs, cs], cls, where=m, casting="unsafe")
        np.copyto(self.surface[rs, cs], surface, where=m, casting="unsafe")
        np.copyto(self.rgb[rs, cs], rgb, where=m[..., None], casting="unsafe")


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Value noise in [0,1], float32 ``shape``: a random (cells+1) grid, bilinearly upsampled."""
    grid = rng.random((cells[0] + 1, cells[1] + 1), dtype=np.float32)
    r = np.linspace(0, cells[0], shape[0], dtype=np.float32)
    c = np.linspace(0, cells[1], shape[1], dtype=np.float32)
    r0 = np.minimum(r.astype(np.int64), cells[0] - 1)
    c0 = np.minimum(c.astype(np.int64), cells[1] - 1)
    fr, fc = (r - r0)[:, None], (c - c0)[None, :]
    top = grid[r0][:, c0] * (1 - fc) + grid[r0][:, c0 + 1] * fc
    bottom = grid[r0 + 1][:, c0] * (1 - fc) + grid[r0 + 1][:, c0 + 1] * fc
    return top * (1 - fr) + bottom * fr


def tileable_texture(rng: np.random.Generator, n: int = 64) -> np.ndarray:
    """A wrap-around texture [n,n] in about [-1,1]: white noise plus a blurred octave."""
    fine = rng.standard_normal((n, n)).astype(np.float32)
    coarse = fine.copy()
    for axis in (0, 1):  # box blur of width 5 with wrap-around, twice per axis
        for _ in range(2):
            coarse = sum(np.roll(coarse, s, axis) for s in range(-2, 3)) / 5
    coarse /= coarse.std() + 1e-6
    return 0.35 * fine + 0.65 * coarse


def lookup(texture: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Nearest texel of a tileable texture at continuous texel coordinates (u rows, v cols)."""
    n0, n1 = texture.shape
    return texture[u.astype(np.int64) % n0, v.astype(np.int64) % n1]


def profile(rng: np.random.Generator, lo: float, hi: float, z: np.ndarray, scale: float) -> np.ndarray:
    """A smooth random 1-D height profile in [lo, hi] along depth ``z`` (knots every ``scale`` m)."""
    knots = np.arange(0.0, 400.0 + scale, scale)
    values = rng.uniform(lo, hi, len(knots))
    return np.interp(z, knots, values).astype(np.float32)


# ------------------------------------------------------------------------------------ uprights


def paint_plane(canvas: Canvas, cam: Camera, X0: float, surface_fn) -> None:
    """A vertical plane parallel to the road at lateral offset ``X0`` (m).

    For each column on that side of the vanishing point, ``Z = f X0 / (x - cx)`` and per row
    ``Yup = h - (y - horizon) Z / f``; ``surface_fn(Z [1,w], Yup [H,w]) -> (mask, cls, rgb)``
    says what the plane shows there.
    """
    dx = cam.cols - cam.cx
    side = dx < 0 if X0 < 0 else dx > 0
    idx = np.flatnonzero(side)
    if idx.size == 0:
        return
    cs = slice(int(idx[0]), int(idx[-1]) + 1)
    Z = (cam.f * X0 / dx[cs])[None, :]
    Yup = cam.height - (cam.rows - cam.horizon)[:, None] * Z / cam.f
    mask, cls, rgb = surface_fn(Z, Yup)
    canvas.paint(slice(0, cam.H), cs, mask & (Z > 0.5), np.broadcast_to(Z, Yup.shape), cls, rgb)


@dataclass
class Thing:
    """An upright billboard facing the camera: ``kind`` names its shape in :data:`SHAPES`."""

    kind: str
    X: float
    Z: float
    w: float
    h: float
    colour: tuple[float, float, float]
    y0: float = 0.0        # height of its bottom above the ground (signs on poles)
    shadow: float = 0.0    # darkening of the ground beneath it (vehicles)
    variant: int = 0       # shape variant (sign type, lit lamp, ...)


def paint_thing(canvas: Canvas, cam: Camera, t: Thing) -> None:
    """Rasterise ``t`` at pixel centres inside its projected box, with a depth test at ``t.Z``."""
    x0, x1 = cam.x(t.X - t.w / 2, t.Z), cam.x(t.X + t.w / 2, t.Z)
    yb, yt = cam.y(t.y0, t.Z), cam.y(t.y0 + t.h, t.Z)
    if t.shadow:
        _ground_shadow(canvas, cam, x0, x1, yb, yt, t.shadow)
    c0, c1 = max(0, int(np.ceil(x0 - 0.5))), min(cam.W, int(np.floor(x1 - 0.5)) + 1)
    r0, r1 = max(0, int(np.ceil(yt - 0.5))), min(cam.H, int(np.floor(yb - 0.5)) + 1)
    if c0 >= c1 or r0 >= r1:
        return
    u = ((cam.cols[c0:c1] - x0) / (x1 - x0))[None, :]
    v = ((yb - cam.rows[r0:r1]) / (yb - yt))[:, None]
    shape = (r1 - r0, c1 - c0)
    full = np.zeros(shape, bool)
    cls = np.zeros(shape, np.uint8)
    rgb = np.zeros(shape + (3,), np.float32)
    for mask, c, col in SHAPES[t.kind](u, v, np.asarray(t.colour, np.float32), t.variant):
        mask = np.broadcast_to(mask, shape)
        full |= mask
        cls[mask] = c
        rgb[mask] = np.broadcast_to(col, shape + (3,))[mask]
    canvas.paint(slice(r0, r1), slice(c0, c1), full, t.Z, cls, rgb)


def _ground_shadow(canvas: Canvas, cam: Camera, x0: float, x1: float, yb: float, yt: float, k: float) -> None:
    """Darken a flat ellipse of ground under a vehicle (image only)."""
    hpx, wpx = yb - yt, x1 - x0
    r0, r1 = max(0, int(yb - 0.12 * hpx)), min(cam.H, int(np.ceil(yb + 0.06 * hpx)) + 1)
    c0, c1 = max(0, int(x0 - 0.08 * wpx)), min(cam.W, int(np.ceil(x1 + 0.08 * wpx)) + 1)
    if c0 >= c1 or r0 >= r1:
        return
    a = (cam.cols[c0:c1] - (x0 + x1) / 2) / (0.6 * wpx + 0.5)
    b = (cam.rows[r0:r1] - yb) / (0.1 * hpx + 0.5)
    inside = (a[None, :] ** 2 + b[:, None] ** 2) < 1
    canvas.shade[r0:r1, c0:c1] *= np.where(inside, k, 1.0).astype(np.float32)


# Billboard shapes: u in [0,1] left -> right, v in [0,1] bottom -> top; each returns layers
# (mask, class, rgb) painted in order. Classes follow the 11-category scheme.
PERSON, CAR, TRUCK, DRIVABLE, NONDRIVABLE, BLOCKER, INFO, SKY, BUILDINGS, NATURE, LANES = range(11)
TYRE = np.array([0.05, 0.05, 0.055], np.float32)
GLASS = np.array([0.09, 0.11, 0.14], np.float32)
RED_LAMP = np.array([0.75, 0.06, 0.05], np.float32)
PLATE = np.array([0.85, 0.85, 0.8], np.float32)


def _band(v, lo, hi):
    return (v >= lo) & (v < hi)


def _shaded(col, v, lo=0.7):
    """A vertical brightness ramp: darker towards the ground."""
    return col * (lo + (1 - lo) * v)[..., None]


def _car(u, v, col, variant):
    cabin_half = 0.42 - 0.12 * (v - 0.58) / 0.42
    window_half = 0.34 - 0.1 * (v - 0.64) / 0.29
    wheels = (v < 0.16) & ((_band(u, 0.05, 0.22)) | (_band(u, 0.78, 0.95)))
    return [
        (_band(v, 0.1, 0.58) & _band(u, 0.01, 0.99), CAR, _shaded(col, v)),
        (_band(v, 0.58, 1.0) & (np.abs(u - 0.5) < cabin_half), CAR, _shaded(col, v)),
        (_band(v, 0.64, 0.93) & (np.abs(u - 0.5) < window_half), CAR, GLASS + 0.1 * v[..., None]),
        (_band(v, 0.40, 0.52) & (_band(u, 0.02, 0.16) | _band(u, 0.84, 0.98)), CAR, RED_LAMP),
        (_band(v, 0.2, 0.3) & (np.abs(u - 0.5) < 0.14), CAR, PLATE),
        (wheels, CAR, TYRE),
    ]


def _van(u, v, col, variant):
    top_round = 0.49 - 0.08 * np.clip((v - 0.88) / 0.12, 0, 1)
    return [
        (_band(v, 0.08, 1.0) & (np.abs(u - 0.5) < top_round), TRUCK, _shaded(col, v)),
        (_band(v, 0.6, 0.86) & (_band(u, 0.1, 0.46) | _band(u, 0.54, 0.9)), TRUCK, GLASS + 0.1 * v[..., None]),
        (_band(v, 0.25, 0.55) & (_band(u, 0.02, 0.08) | _band(u, 0.92, 0.98)), TRUCK, RED_LAMP),
        (_band(v, 0.14, 0.22) & (np.abs(u - 0.5) < 0.12), TRUCK, PLATE),
        ((v < 0.12) & (_band(u, 0.06, 0.22) | _band(u, 0.78, 0.94)), TRUCK, TYRE),
    ]


def _truck(u, v, col, variant):
    seams = (np.abs(u - 0.5) < 0.008) | (np.abs(u - 0.02) < 0.01) | (np.abs(u - 0.98) < 0.01)
    return [
        (_band(v, 0.14, 1.0) & _band(u, 0.0, 1.0), TRUCK, _shaded(col, v, 0.8)),
        (_band(v, 0.16, 0.97) & seams, TRUCK, col * 0.6),
        (_band(v, 0.1, 0.16) & _band(u, 0.04, 0.96), TRUCK, TYRE + 0.1),
        (_band(v, 0.16, 0.21) & (_band(u, 0.03, 0.12) | _band(u, 0.88, 0.97)), TRUCK, RED_LAMP),
        ((v < 0.12) & (_band(u, 0.06, 0.3) | _band(u, 0.7, 0.94)), TRUCK, TYRE),
    ]


SKIN = np.array([[0.78, 0.6, 0.48], [0.55, 0.38, 0.27], [0.35, 0.24, 0.18]], np.float32)


def _person(u, v, col, variant):
    pants = col[::-1] * 0.6
    head = ((u - 0.5) / 0.2) ** 2 + ((v - 0.9) / 0.09) ** 2 < 1
    legs = (v < 0.47) & ((np.abs(u - 0.36) < 0.12) | (np.abs(u - 0.64) < 0.12))
    return [
        (legs, PERSON, pants),
        (_band(v, 0.45, 0.82) & (np.abs(u - 0.5) < 0.36 - 0.1 * (0.82 - v)), PERSON, _shaded(col, v, 0.8)),
        (_band(v, 0.5, 0.8) & (_band(u, 0.0, 0.12) | _band(u, 0.88, 1.0)), PERSON, col * 0.9),
        (head, PERSON, SKIN[variant % 3]),
    ]


def _pole(u, v, col, variant):
    return [(_band(u, 0.0, 1.0) & _band(v, 0.0, 1.0), BLOCKER, col * (0.6 + 0.4 * np.sin(np.pi * u))[..., None])]


#: sign faces: (outer colour, inner colour, shape)
SIGN_FACES = (
    ((0.75, 0.08, 0.08), (0.92, 0.92, 0.9), "round"),      # prohibition
    ((0.1, 0.25, 0.7), (0.1, 0.25, 0.7), "round"),         # mandatory
    ((0.75, 0.08, 0.08), (0.92, 0.92, 0.9), "triangle"),   # warning
    ((0.1, 0.3, 0.75), (0.9, 0.9, 0.9), "rect"),           # information
    ((0.05, 0.4, 0.2), (0.9, 0.9, 0.9), "rect"),           # direction (green)
    ((0.92, 0.75, 0.1), (0.95, 0.95, 0.9), "diamond"),     # priority road
)


def _sign(u, v, col, variant):
    outer, inner, form = SIGN_FACES[variant % len(SIGN_FACES)]
    du, dv = u - 0.5, v - 0.5
    if form == "round":
        r = du ** 2 + dv ** 2
        face, core = r < 0.25, r < 0.12
    elif form == "triangle":
        face = (v > 0) & (np.abs(du) < 0.5 * (1 - v))
        core = (v > 0.15) & (np.abs(du) < 0.5 * (1 - v) - 0.14)
    elif form == "diamond":
        face, core = np.abs(du) + np.abs(dv) < 0.5, np.abs(du) + np.abs(dv) < 0.33
    else:
        face = _band(u, 0, 1) & _band(v, 0, 1)
        core = (np.abs(du) < 0.42) & (np.abs(dv) < 0.38) & (((v * 5) % 1 < 0.45) | (outer[1] > 0.3))
    return [(face, INFO, np.asarray(outer, np.float32)), (core, INFO, np.asarray(inner, np.float32))]


LAMPS = np.array([[0.9, 0.1, 0.05], [0.95, 0.7, 0.05], [0.1, 0.85, 0.3]], np.float32)


def _traffic_light(u, v, col, variant):
    layers = [(_band(u, 0, 1) & _band(v, 0, 1), BLOCKER, np.full(3, 0.08, np.float32))]
    for i, centre in enumerate((0.8, 0.5, 0.2)):
        lit = i == variant % 3
        lamp = ((u - 0.5) / 0.32) ** 2 + ((v - centre) / 0.11) ** 2 < 1
        layers.append((lamp, INFO, LAMPS[i] if lit else LAMPS[i] * 0.25))
    return layers


def _tree(u, v, col, variant):
    wobble = 0.04 * np.sin(9 * u + variant) + 0.03 * np.cos(13 * v + 2 * variant)
    crown = ((u - 0.5) / 0.5) ** 2 + ((v - 0.66) / 0.34) ** 2 < 1 + wobble
    trunk = (v < 0.45) & (np.abs(u - 0.5) < 0.06)
    dapple = 0.8 + 0.2 * np.sin(23 * u + 3 * variant) * np.cos(19 * v)
    return [(trunk, NATURE, np.array([0.28, 0.2, 0.14], np.float32)), (crown, NATURE, col * dapple[..., None])]


def _block(u, v, col, variant):
    stripes = ((v * 4 + (variant % 2) * u * 2) % 1) < 0.5
    body = _band(u, 0, 1) & _band(v, 0, 1)
    return [(body, BLOCKER, col), (body & stripes, BLOCKER, np.array([0.9, 0.9, 0.88], np.float32))]


def _panel(u, v, col, variant):
    """A large sign board (overhead gantry or roadside direction sign)."""
    body = _band(u, 0, 1) & _band(v, 0, 1)
    text = (np.abs(u - 0.5) < 0.42) & (np.abs(v - 0.5) < 0.34) & ((v * 4 % 1) < 0.35) & ((u * 9 % 1) < 0.7)
    return [(body, INFO, col), (text, INFO, np.array([0.92, 0.92, 0.92], np.float32))]


#: billboard kind -> shape
SHAPES = {"car": _car, "van": _van, "truck": _truck, "person": _person, "pole": _pole, "sign": _sign,
          "light": _traffic_light, "tree": _tree, "block": _block, "panel": _panel}
