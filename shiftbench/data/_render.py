"""Rendering primitives of the synthetic street scenes: a pinhole camera over a flat ground,
a canvas with label / colour / depth buffers, vertical planes and upright billboards.

World coordinates: X to the right, ``Yup`` above the ground, Z forward (metres). A point
projects to ``x = cx + f X / Z`` and ``y = horizon + f (h - Yup) / Z`` (pixel centres at
``i + 0.5``), ``h`` being the camera height. Everything is vectorised numpy over pixels;
Python loops only run over scene elements (a few dozen per image). Colours are planar,
``[3,H,W]`` float32, so per-pixel masks broadcast over the channel axis cheaply; a colour
constant is ``[3,1,1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable

import numpy as np

#: surface kinds in ``Canvas.surface`` (shadows darken only the ground)
SKY_SURFACE, GROUND_SURFACE, UPRIGHT_SURFACE = 0, 1, 2
#: the 11 A2D2 categories, in the order of ``synthetic.CLASSES_11``
PERSON, CAR, TRUCK, DRIVABLE, NONDRIVABLE, BLOCKER, INFO, SKY, BUILDINGS, NATURE, LANES = range(11)


def rgb(*values: float) -> np.ndarray:
    """A colour constant, float32 [3,1,1]."""
    return np.asarray(values, np.float32).reshape(3, 1, 1)


def frac(x: np.ndarray) -> np.ndarray:
    """x - floor(x): the fractional part (much faster than ``%`` on floats)."""
    return x - np.floor(x)


@dataclass(frozen=True)
class Camera:
    H: int
    W: int
    f: float        # focal length in pixels
    cx: float       # column of the vanishing point
    horizon: float  # row of the horizon
    height: float   # camera height above the ground (m)

    @cached_property
    def cols(self) -> np.ndarray:
        """Pixel-centre x of each column, float32 [W] (read-only)."""
        return _frozen(np.arange(self.W, dtype=np.float32) + np.float32(0.5))

    @cached_property
    def rows(self) -> np.ndarray:
        """Pixel-centre y of each row, float32 [H] (read-only)."""
        return _frozen(np.arange(self.H, dtype=np.float32) + np.float32(0.5))

    def x(self, X: float, Z: float) -> float:
        return self.cx + self.f * X / Z

    def y(self, Yup: float, Z: float) -> float:
        return self.horizon + self.f * (self.height - Yup) / Z


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


class Canvas:
    """Label [H,W], colour [3,H,W], depth and surface buffers, written with a depth test."""

    def __init__(self, H: int, W: int, sky_class: int):
        self.label = np.full((H, W), sky_class, np.uint8)
        self.rgb = np.zeros((3, H, W), np.float32)
        self.depth = np.full((H, W), np.inf, np.float32)
        self.surface = np.full((H, W), SKY_SURFACE, np.uint8)
        self.shade = np.ones((H, W), np.float32)  # multiplicative shadows, applied to the ground only

    def paint(self, rs: slice, cs: slice, mask: np.ndarray, depth, cls, colour, surface: int = UPRIGHT_SURFACE) -> None:
        """Write ``cls``/``colour``/``depth`` in the window [rs, cs] where ``mask`` holds and the
        surface is not farther than what is there. ``depth``, ``cls``: scalars or arrays that
        broadcast to the window [h,w]; ``colour``: broadcasts to [3,h,w]."""
        d = self.depth[rs, cs]
        m = mask & (depth <= d)
        hit = np.flatnonzero(m.any(1)) if m.shape[0] > 8 else range(m.shape[0])
        if len(hit) == 0:
            return
        if len(hit) < m.shape[0]:  # crop to the rows that change
            a, b = int(hit[0]), int(hit[-1]) + 1
            start = rs.start or 0
            rs, m, d = slice(start + a, start + b), m[a:b], d[a:b]
            depth, cls = _rows(depth, a, b, 0), _rows(cls, a, b, 0)
            colour = _rows(colour, a, b, 1)
        np.copyto(d, depth, where=m, casting="unsafe")
        np.copyto(self.label[rs, cs], cls, where=m, casting="unsafe")
        np.copyto(self.surface[rs, cs], surface, where=m, casting="unsafe")
        np.copyto(self.rgb[:, rs, cs], colour, where=m, casting="unsafe")


def _rows(value, a: int, b: int, axis: int):
    """Rows a:b (along ``axis``) of a per-pixel array; values constant along it unchanged."""
    value = np.asarray(value)
    if value.ndim >= 2 + axis and value.shape[-2] > 1:
        return value[..., a:b, :]
    return value


# ------------------------------------------------------------------------------------ noise


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Value noise in [0,1], float32 ``shape``: a random (cells+1) grid, bilinearly upsampled
    as ``A_rows @ grid @ A_cols^T`` with the [n, cells+1] interpolation matrices A."""
    grid = rng.random((cells[0] + 1, cells[1] + 1), dtype=np.float32)
    return _interp_matrix(shape[0], cells[0]) @ grid @ _interp_matrix(shape[1], cells[1]).T


@lru_cache(maxsize=64)
def _interp_matrix(n: int, cells: int) -> np.ndarray:
    """[n, cells+1] weights of linear interpolation from cells+1 knots to n samples (read-only, cached)."""
    pos = np.linspace(0, cells, n, dtype=np.float32)
    i0 = np.minimum(pos.astype(np.int64), cells - 1)
    weights = np.zeros((n, cells + 1), np.float32)
    weights[np.arange(n), i0] = 1 - (pos - i0)
    weights[np.arange(n), i0 + 1] = pos - i0
    return _frozen(weights)


_TEXTURES: list[np.ndarray] = []


def texture(rng: np.random.Generator) -> np.ndarray:
    """A wrap-around texture [64,64], zero mean, unit spread (white noise plus a blurred octave),
    picked from a fixed pool of 16 and randomly rolled, transposed and flipped by ``rng``."""
    if not _TEXTURES:
        pool = np.random.default_rng(7)
        for _ in range(16):
            fine = pool.standard_normal((64, 64), dtype=np.float32)
            coarse = fine
            for axis in (0, 1):  # box blur of width 5 with wrap-around, twice per axis
                for _ in range(2):
                    coarse = sum(np.roll(coarse, s, axis) for s in range(-2, 3)) / np.float32(5)
            _TEXTURES.append(np.float32(0.4) * fine + np.float32(0.6) * coarse / coarse.std())
    tex = np.roll(_TEXTURES[rng.integers(len(_TEXTURES))], tuple(rng.integers(64, size=2)), (0, 1))
    tex = tex.T if rng.random() < 0.5 else tex
    return tex[::-1] if rng.random() < 0.5 else tex


def lookup(texture: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Nearest texel of a tileable texture (side a power of two) at texel coordinates (u rows, v cols)."""
    n0, n1 = texture.shape
    return texture.take((u.astype(np.int32) & (n0 - 1)) * n1 + (v.astype(np.int32) & (n1 - 1)))


_NOISE_POOL: dict[tuple[int, int], np.ndarray] = {}


def sensor_noise(rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    """Unit Gaussian noise [3,H,W]: a random window of a fixed pool (drawing fresh normals
    costs more than rendering the scene); the window offset comes from ``rng``."""
    pool = _NOISE_POOL.get((H, W))
    if pool is None:
        pool = np.random.default_rng(20240611).standard_normal((3, 2 * H, 2 * W), dtype=np.float32)
        _NOISE_POOL[(H, W)] = pool
    r, c = int(rng.integers(H)), int(rng.integers(W))
    return pool[:, r:r + H, c:c + W][rng.permutation(3)]


# ------------------------------------------------------------------------------------ uprights

#: surface_fn(Z [1,w], Yup [H,w]) -> (mask [H,w], class (scalar or [H,w]), colour -> [3,H,w])
SurfaceFn = Callable[[np.ndarray, np.ndarray], tuple]


def paint_plane(canvas: Canvas, cam: Camera, X0: float, surface_fn: SurfaceFn, top: float = 60.0) -> None:
    """A vertical plane parallel to the road at lateral offset ``X0`` (m), up to ``top`` m high.

    For each column on that side of the vanishing point, ``Z = f X0 / (x - cx)``, and per row
    ``Yup = h - (y - horizon) Z / f``; ``surface_fn`` says what the plane shows there.
    """
    dx = cam.cols - np.float32(cam.cx)
    idx = np.flatnonzero(dx < 0 if X0 < 0 else dx > 0)
    if idx.size == 0:
        return
    cs = slice(int(idx[0]), int(idx[-1]) + 1)
    Z = (np.float32(cam.f * X0) / dx[cs])[None, :]
    # rows that can show the plane: between the top (at the nearest visible depth) and the ground line
    z_near = max(float(Z.min()), 0.5)
    r0 = max(0, int(cam.y(top, z_near)))
    rows = slice(r0, cam.H)
    Yup = np.float32(cam.height) - (cam.rows[rows] - np.float32(cam.horizon))[:, None] * (Z / np.float32(cam.f))
    mask, cls, colour = surface_fn(Z, Yup)
    canvas.paint(rows, cs, mask & (Z > 0.5), np.broadcast_to(Z, Yup.shape), cls, colour)


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
    """Rasterise ``t`` at the pixel centres inside its projected box, with a depth test at ``t.Z``:
    its sprite is sampled (nearest) at those centres, colour = A * t.colour + B."""
    x0, x1 = cam.x(t.X - t.w / 2, t.Z), cam.x(t.X + t.w / 2, t.Z)
    yb, yt = cam.y(t.y0, t.Z), cam.y(t.y0 + t.h, t.Z)
    if t.shadow:
        _ground_shadow(canvas, cam, x0, x1, yb, yt, t.shadow)
    c0, c1 = max(0, math.ceil(x0 - 0.5)), min(cam.W, math.ceil(x1 - 0.5))
    r0, r1 = max(0, math.ceil(yt - 0.5)), min(cam.H, math.ceil(yb - 0.5))
    if c0 >= c1 or r0 >= r1:
        return
    cls_map, A, B = sprite(t.kind, t.variant)
    n = SPRITE_SIZE
    ui = np.minimum(((cam.cols[c0:c1] - np.float32(x0)) * np.float32(n / (x1 - x0))).astype(np.int32), n - 1)
    vi = np.minimum(((cam.rows[r0:r1] - np.float32(yt)) * np.float32(n / (yb - yt))).astype(np.int32), n - 1)
    idx = vi[:, None] * n + ui[None, :]
    cls = cls_map.take(idx)
    colour = A.take(idx) * rgb(*t.colour) + np.take(B.reshape(3, -1), idx, axis=1)
    canvas.paint(slice(r0, r1), slice(c0, c1), cls != TRANSPARENT, t.Z, cls, colour)


def _ground_shadow(canvas: Canvas, cam: Camera, x0: float, x1: float, yb: float, yt: float, k: float) -> None:
    """Darken a flat ellipse of ground under a vehicle (image only)."""
    hpx, wpx = yb - yt, x1 - x0
    r0, r1 = max(0, int(yb - 0.12 * hpx)), min(cam.H, math.ceil(yb + 0.06 * hpx) + 1)
    c0, c1 = max(0, int(x0 - 0.08 * wpx)), min(cam.W, math.ceil(x1 + 0.08 * wpx) + 1)
    if c0 >= c1 or r0 >= r1:
        return
    a = (cam.cols[c0:c1] - np.float32((x0 + x1) / 2)) / np.float32(0.6 * wpx + 0.5)
    b = (cam.rows[r0:r1] - np.float32(yb)) / np.float32(0.1 * hpx + 0.5)
    inside = (a[None, :] ** 2 + b[:, None] ** 2) < 1
    canvas.shade[r0:r1, c0:c1] *= np.float32(1) - np.float32(1 - k) * inside


# ------------------------------------------------------------------------------------ shapes
# Billboard shapes: u [1,w] in [0,1] left -> right, v [h,1] in [0,1] bottom -> top, colour
# [3,1,1]; each returns layers (mask, class, colour) painted in order.

TYRE = rgb(0.05, 0.05, 0.055)
GLASS = rgb(0.09, 0.11, 0.14)
RED_LAMP = rgb(0.75, 0.06, 0.05)
PLATE = rgb(0.85, 0.85, 0.8)
WHITE = rgb(0.9, 0.9, 0.88)
SKIN = (rgb(0.78, 0.6, 0.48), rgb(0.55, 0.38, 0.27), rgb(0.35, 0.24, 0.18))
TROUSERS = (rgb(0.1, 0.12, 0.2), rgb(0.25, 0.22, 0.2), rgb(0.05, 0.05, 0.05), rgb(0.45, 0.4, 0.3))


def _band(x, lo, hi):
    return (x >= lo) & (x < hi)


def _shaded(col, v, lo=0.7):
    """A vertical brightness ramp: darker towards the ground; [3,h,1]."""
    return col * (np.float32(lo) + np.float32(1 - lo) * v)


def _car(u, v, col, variant):
    cabin_half = 0.42 - 0.12 * (v - 0.58) / 0.42
    window_half = 0.34 - 0.1 * (v - 0.64) / 0.29
    return [
        (_band(v, 0.1, 0.58) & _band(u, 0.01, 0.99), CAR, _shaded(col, v)),
        (_band(v, 0.58, 1.0) & (np.abs(u - 0.5) < cabin_half), CAR, _shaded(col, v)),
        (_band(v, 0.64, 0.93) & (np.abs(u - 0.5) < window_half), CAR, GLASS + 0.1 * v),
        (_band(v, 0.40, 0.52) & (_band(u, 0.02, 0.16) | _band(u, 0.84, 0.98)), CAR, RED_LAMP),
        (_band(v, 0.2, 0.3) & (np.abs(u - 0.5) < 0.14), CAR, PLATE),
        ((v < 0.16) & (_band(u, 0.05, 0.22) | _band(u, 0.78, 0.95)), CAR, TYRE),
    ]


def _van(u, v, col, variant):
    top_round = 0.49 - 0.08 * np.clip((v - 0.88) / 0.12, 0, 1)
    return [
        (_band(v, 0.08, 1.0) & (np.abs(u - 0.5) < top_round), TRUCK, _shaded(col, v)),
        (_band(v, 0.6, 0.86) & (_band(u, 0.1, 0.46) | _band(u, 0.54, 0.9)), TRUCK, GLASS + 0.1 * v),
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


def _person(u, v, col, variant):
    head = ((u - 0.5) / 0.2) ** 2 + ((v - 0.9) / 0.09) ** 2 < 1
    legs = (v < 0.47) & ((np.abs(u - 0.36) < 0.12) | (np.abs(u - 0.64) < 0.12))
    return [
        (legs, PERSON, TROUSERS[variant % len(TROUSERS)]),
        (_band(v, 0.45, 0.82) & (np.abs(u - 0.5) < 0.36 - 0.1 * (0.82 - v)), PERSON, _shaded(col, v, 0.8)),
        (_band(v, 0.5, 0.8) & (_band(u, 0.0, 0.12) | _band(u, 0.88, 1.0)), PERSON, col * 0.9),
        (head, PERSON, SKIN[variant // len(TROUSERS) % len(SKIN)]),
    ]


def _pole(u, v, col, variant):
    return [(_band(u, 0.0, 1.0) & _band(v, 0.0, 1.0), BLOCKER, col * (0.6 + 0.4 * np.sin(np.pi * u)))]


#: sign faces: (outer colour, inner colour, shape)
SIGN_FACES = (
    (rgb(0.75, 0.08, 0.08), rgb(0.92, 0.92, 0.9), "round"),      # prohibition
    (rgb(0.1, 0.25, 0.7), rgb(0.1, 0.25, 0.7), "round"),         # mandatory
    (rgb(0.75, 0.08, 0.08), rgb(0.92, 0.92, 0.9), "triangle"),   # warning
    (rgb(0.1, 0.3, 0.75), rgb(0.9, 0.9, 0.9), "rect"),           # information
    (rgb(0.05, 0.4, 0.2), rgb(0.9, 0.9, 0.9), "rect"),           # direction (green)
    (rgb(0.92, 0.75, 0.1), rgb(0.95, 0.95, 0.9), "diamond"),     # priority road
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
        core = (np.abs(du) < 0.42) & (np.abs(dv) < 0.38) & (frac(v * 5) < 0.45)
    return [(face, INFO, outer), (core, INFO, inner)]


LAMPS = (rgb(0.9, 0.1, 0.05), rgb(0.95, 0.7, 0.05), rgb(0.1, 0.85, 0.3))


def _traffic_light(u, v, col, variant):
    """Housing = A2D2 'Signal corpus' (Blocker), lamps = 'Traffic signal' (Info)."""
    layers = [(_band(u, 0, 1) & _band(v, 0, 1), BLOCKER, rgb(0.08, 0.08, 0.08))]
    for i, centre in enumerate((0.8, 0.5, 0.2)):
        lamp = ((u - 0.5) / 0.32) ** 2 + ((v - centre) / 0.11) ** 2 < 1
        layers.append((lamp, INFO, LAMPS[i] if i == variant % 3 else LAMPS[i] * 0.25))
    return layers


def _tree(u, v, col, variant):
    wobble = 0.04 * np.sin(9 * u + variant) + 0.03 * np.cos(13 * v + 2 * variant)
    crown = ((u - 0.5) / 0.5) ** 2 + ((v - 0.66) / 0.34) ** 2 < 1 + wobble
    trunk = (v < 0.45) & (np.abs(u - 0.5) < 0.06)
    dapple = 0.8 + 0.2 * np.sin(23 * u + 3 * variant) * np.cos(19 * v)
    return [(trunk, NATURE, rgb(0.28, 0.2, 0.14)), (crown, NATURE, col * dapple)]


def _block(u, v, col, variant):
    stripes = frac(v * 4 + (variant % 2) * u * 2) < 0.5
    body = _band(u, 0, 1) & _band(v, 0, 1)
    return [(body, BLOCKER, col), (body & stripes, BLOCKER, WHITE)]


def _panel(u, v, col, variant):
    """A large sign board (overhead gantry or roadside direction sign)."""
    body = _band(u, 0, 1) & _band(v, 0, 1)
    text = (np.abs(u - 0.5) < 0.42) & (np.abs(v - 0.5) < 0.34) & (frac(v * 4) < 0.35) & (frac(u * 9) < 0.7)
    return [(body, INFO, col), (text, INFO, WHITE)]


#: billboard kind -> shape
SHAPES = {"car": _car, "van": _van, "truck": _truck, "person": _person, "pole": _pole, "sign": _sign,
          "light": _traffic_light, "tree": _tree, "block": _block, "panel": _panel}

#: sprite variants per kind (sign faces, lit lamp, skin x trousers, crown shapes, stripe patterns)
VARIANTS = {"sign": len(SIGN_FACES), "light": 3, "person": len(SKIN) * len(TROUSERS), "tree": 4, "block": 2}
SPRITE_SIZE = 64
TRANSPARENT = 255
_SPRITES: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def sprite(kind: str, variant: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A billboard's shape rasterised once at SPRITE_SIZE^2 (row 0 = top): class [S,S]
    (TRANSPARENT outside), and colour = A [S,S] * thing colour + B [3,S,S]."""
    variant %= VARIANTS.get(kind, 1)
    key = (kind, variant)
    if key not in _SPRITES:
        n = SPRITE_SIZE
        u = ((np.arange(n, dtype=np.float32) + 0.5) / n)[None, :]
        v = (1 - (np.arange(n, dtype=np.float32) + 0.5) / n)[:, None]
        cls = np.full((n, n), TRANSPARENT, np.uint8)
        probe = []
        for col in (rgb(0, 0, 0), rgb(1, 1, 1)):  # colours are affine in the thing's colour
            colour = np.zeros((3, n, n), np.float32)
            for mask, c, layer in SHAPES[kind](u, v, col, variant):
                mask = np.broadcast_to(mask, (n, n))
                cls[mask] = c
                np.copyto(colour, layer, where=mask)
            probe.append(colour)
        _SPRITES[key] = (cls, np.ascontiguousarray(probe[1][0] - probe[0][0]), probe[0])
    return _SPRITES[key]
