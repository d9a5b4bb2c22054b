"""Procedural street scenes: the embedded default dataset (no downloads).

Three domains mirror the A2D2 semantic split of the mixture-of-experts line of work:

- ``highway``: a multi-lane carriageway (often with a median and the opposite carriageway),
  guardrails, dashed and solid lines, trucks and vans among the cars, grass verges and tree
  lines, few buildings far off, overhead gantry signs; no pedestrians, no sidewalks;
- ``urban``: a narrow road, curbs and sidewalks, facades on both sides, pedestrians, poles,
  signs and traffic lights, parked cars, street trees, bollards, crosswalks;
- ``ambiguous`` (test only): every scene prior interpolated between the two with a per-image
  weight t ~ U(0.3, 0.7) (arterials with buildings and guardrails, ...).

Each image comes from a pinhole camera over a flat ground plane (random focal length,
horizon, camera height and yaw): objects shrink with distance down to a pixel, lines thin
out, haze grows with depth. Colours, textures, lighting, shadows and sensor noise vary per
image, and appearances overlap on purpose (asphalt vs paving, cars vs vans vs trucks, grey
guardrails vs grey roads). Labels use the 11 A2D2 categories of :data:`CLASSES_11`.

``generate(domain, index, seed, size, split)`` is deterministic per (seed, domain, split,
index); :class:`SyntheticStreetScenes` wraps it as a torch Dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from shiftbench.data._render import (BLOCKER, BUILDINGS, DRIVABLE, GROUND_SURFACE, INFO, LANES, NATURE,
                                     NONDRIVABLE, SKY, SKY_SURFACE, Camera, Canvas, Thing, frac, lookup, paint_plane,
                                     paint_thing, sensor_noise, smooth_noise, texture)
from shiftbench.errors import MAX_SIDE, ShiftbenchError, is_int
from shiftbench.seeding import key

CLASSES_11 = ("Person", "Car", "Truck", "Drivable", "Nondrivable", "Blocker", "Info", "Sky", "Buildings", "Nature",
              "Lanes")
IGNORE_INDEX = 255
DOMAINS = ("highway", "urban", "ambiguous")
SPLITS = {"highway": ("train", "val", "test"), "urban": ("train", "val", "test"), "ambiguous": ("test",)}
DEFAULT_SIZE = (128, 256)
MIN_SIZE = 16

#: Scene priors: parameter -> (highway, urban). A pair of numbers is a range sampled
#: uniformly (integers if both ends are ints), a single number a probability. The
#: ambiguous domain interpolates both ends linearly with t ~ U(AMBIGUOUS_T) per image.
PRIORS: dict[str, tuple] = {
    "lanes": ((2, 4), (1, 1)),              # lanes in the ego direction
    "lane_width": ((3.4, 3.9), (2.7, 3.3)),
    "opposite": (0.8, 0.85),                # an opposite carriageway / lane
    "median": (0.9, 0.0),                   # divided road (median strip with a guardrail)
    "median_width": ((1.5, 5.0), (1.0, 2.0)),
    "shoulder": ((1.0, 3.2), (0.0, 0.4)),
    "edge_line": (1.0, 0.25),
    "sidewalk": (0.0, 0.97),                # per side: curb + sidewalk
    "sidewalk_width": ((1.5, 3.0), (1.8, 5.0)),
    "parking": (0.0, 0.55),                 # per side: parking lane
    "guardrail": (0.92, 0.04),              # per side
    "barrier": (0.1, 0.06),                 # per side: noise barrier / fence (Blocker)
    "facade": (0.1, 0.97),                  # per side: a row of buildings
    "setback": ((10.0, 45.0), (0.0, 1.5)),  # facades beyond the sidewalk / verge (m)
    "facade_gap": (0.5, 0.15),
    "back_row": (0.1, 0.6),                 # a second, taller row of buildings behind
    "storey": ((3.0, 3.6), (2.8, 3.6)),
    "storeys": ((1, 3), (2, 7)),
    "verge": ((3.0, 15.0), (0.5, 3.0)),     # grass beyond the road when there is no sidewalk (m)
    "treeline": (0.85, 0.25),               # per side
    "tree_height": ((6.0, 18.0), (4.0, 12.0)),
    "vehicles": ((2, 9), (1, 4)),
    "truck_share": (0.3, 0.05),
    "van_share": (0.15, 0.15),
    "parked": ((0, 0), (3, 10)),
    "pedestrians": ((0, 0), (2, 10)),
    "poles": ((0, 3), (3, 9)),
    "signs": ((1, 3), (2, 5)),
    "street_trees": ((0, 0), (0, 5)),
    "blocks": ((0, 1), (0, 4)),
    "crosswalk": (0.0, 0.45),
    "traffic_lights": (0.0, 0.7),           # at a crosswalk
    "gantry": (0.3, 0.0),
    "cobblestone": (0.0, 0.2),
    "far_city": (0.15, 0.85),               # the horizon silhouette is a skyline, not hills
    "haze": ((80.0, 400.0), (60.0, 300.0)),  # visibility (m)
}
AMBIGUOUS_T = (0.3, 0.7)

#: colours in linear-ish RGB [0,1]: name -> (base, per-channel jitter)
MATERIALS: dict[str, tuple[tuple[float, float, float], float]] = {
    "asphalt": ((0.33, 0.33, 0.35), 0.09),
    "cobblestone": ((0.42, 0.38, 0.36), 0.08),
    "concrete": ((0.5, 0.5, 0.49), 0.1),
    "paving": ((0.52, 0.44, 0.4), 0.1),
    "curb": ((0.6, 0.6, 0.58), 0.08),
    "grass": ((0.28, 0.4, 0.17), 0.08),
    "dry_grass": ((0.48, 0.45, 0.28), 0.08),
    "foliage": ((0.17, 0.3, 0.11), 0.06),
    "metal": ((0.58, 0.6, 0.62), 0.07),
    "paint": ((0.88, 0.88, 0.86), 0.05),
    "sky_clear": ((0.35, 0.55, 0.9), 0.1),
    "sky_overcast": ((0.72, 0.74, 0.78), 0.08),
    "facade_light": ((0.75, 0.7, 0.62), 0.12),
    "facade_brick": ((0.55, 0.3, 0.22), 0.1),
    "facade_grey": ((0.52, 0.53, 0.55), 0.12),
    "barrier": ((0.45, 0.47, 0.4), 0.08),
}
#: vehicle paints; cars and vans share them (vans and trucks both count as Truck)
CAR_PAINTS = np.array([[0.85, 0.85, 0.85], [0.6, 0.6, 0.62], [0.35, 0.35, 0.37], [0.08, 0.08, 0.09],
                       [0.1, 0.15, 0.4], [0.6, 0.08, 0.06], [0.1, 0.25, 0.12], [0.7, 0.62, 0.48]], np.float32)
TRUCK_PAINTS = np.array([[0.88, 0.88, 0.87], [0.62, 0.63, 0.65], [0.15, 0.22, 0.5], [0.6, 0.1, 0.08],
                         [0.2, 0.35, 0.2], [0.8, 0.6, 0.1], [0.35, 0.35, 0.37]], np.float32)
CLOTHES = np.array([[0.1, 0.1, 0.12], [0.2, 0.25, 0.45], [0.6, 0.1, 0.1], [0.8, 0.8, 0.78], [0.35, 0.3, 0.2],
                    [0.2, 0.4, 0.25], [0.5, 0.5, 0.52]], np.float32)
#: billboard kind -> (width range, height range) in metres
SIZES = {"car": ((1.7, 1.95), (1.35, 1.7)), "van": ((1.9, 2.1), (1.9, 2.5)), "truck": ((2.45, 2.6), (3.2, 4.0)),
         "person": ((0.45, 0.65), (1.5, 1.95)), "block": ((0.3, 1.2), (0.6, 1.1))}
FACADES = ("facade_light", "facade_brick", "facade_grey")
FAR = 400.0  # depth of the horizon silhouette (m)
ROAD_TEXTURE = 0.18  # amplitude of the asphalt texture


# ------------------------------------------------------------------------------------ public API


def check_split(domain: str, split: str) -> None:
    """Raise a one-line ShiftbenchError unless (domain, split) exists."""
    if domain not in SPLITS:
        raise ShiftbenchError(f"synthetic domain {domain!r} is not one of {', '.join(DOMAINS)}")
    if split not in SPLITS[domain]:
        raise ShiftbenchError(f"synthetic split {split!r} does not exist for domain {domain!r}; "
                              f"allowed: {', '.join(SPLITS[domain])}")


def check_scene_size(size) -> tuple[int, int]:
    """``size`` as (H, W), both integers in MIN_SIZE..MAX_SIDE; else a one-line error."""
    try:
        H, W = (int(s) for s in size)
        ok = H == size[0] and W == size[1] and min(H, W) >= MIN_SIZE and max(H, W) <= MAX_SIDE
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ShiftbenchError(f"synthetic size {size!r} is not (H, W) with integers {MIN_SIZE}..{MAX_SIDE}")
    return H, W


def generate(domain: str, index: int, seed: int = 0, size: tuple[int, int] = DEFAULT_SIZE,
             split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image uint8 [H,W,3], label uint8 [H,W] with the 11 classes).

    Deterministic per (seed, domain, split, index); each split is its own index space.
    """
    image, label = render(domain, index, seed, size, split)
    return np.ascontiguousarray(image.transpose(1, 2, 0)), label


def render(domain: str, index: int, seed: int = 0, size: tuple[int, int] = DEFAULT_SIZE,
           split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """:func:`generate` with the image channel-first: (uint8 [3,H,W], uint8 [H,W])."""
    check_split(domain, split)
    H, W = check_scene_size(size)
    if int(index) < 0:
        raise ShiftbenchError(f"synthetic index {index} is negative")
    rng = np.random.default_rng(key("synthetic", seed, domain, split, int(index)))
    prior = sample_prior(domain, rng)
    cam = _camera(H, W, rng)
    scene = _layout(prior, cam, rng)
    return _render(scene, prior, cam, rng)


class SyntheticStreetScenes(Dataset):
    """``count`` scenes of one domain and split: (image float32 [3,H,W] in [0,1], label int64
    [H,W], sample id ``"<domain>/<split>/<index:06d>"``)."""

    def __init__(self, domain: str, split: str, count: int, seed: int = 0,
                 size: tuple[int, int] = DEFAULT_SIZE):
        check_split(domain, split)
        if not is_int(count) or count < 1:
            raise ShiftbenchError(f"synthetic count {count!r} is not a positive integer")
        if not is_int(seed):
            raise ShiftbenchError(f"synthetic seed {seed!r} is not an integer")
        self.domain, self.split, self.count, self.seed = domain, split, int(count), int(seed)
        self.size = check_scene_size(size)

    def __len__(self) -> int:
        return self.count

    def sample_id(self, index: int) -> str:
        return f"{self.domain}/{self.split}/{index:06d}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} scenes")
        index %= self.count
        image, label = render(self.domain, index, self.seed, self.size, self.split)
        x = torch.from_numpy(image).float().div_(255)
        return x, torch.from_numpy(label).long(), self.sample_id(index)


# ------------------------------------------------------------------------------------ priors


def sample_prior(domain: str, rng: np.random.Generator) -> dict[str, float | tuple]:
    """The domain's priors with ``t`` (0 highway, 1 urban, U(0.3,0.7) ambiguous) applied."""
    t = {"highway": 0.0, "urban": 1.0}.get(domain)
    if t is None:
        t = rng.uniform(*AMBIGUOUS_T)
    out: dict[str, float | tuple] = {"t": t}
    for name, (hw, ur) in PRIORS.items():
        if isinstance(hw, tuple):
            lo, hi = ((1 - t) * a + t * b for a, b in zip(hw, ur))
            out[name] = (round(lo), round(hi)) if isinstance(hw[0], int) else (lo, hi)
        else:
            out[name] = (1 - t) * hw + t * ur
    return out


def _draw(rng: np.random.Generator, spec) -> float:
    """A value from a prior range: integers inclusive, floats uniform."""
    lo, hi = spec
    return int(rng.integers(lo, hi + 1)) if isinstance(lo, int) else float(rng.uniform(lo, hi))


def _colour(rng: np.random.Generator, material: str) -> np.ndarray:
    """A material's colour with per-image brightness and tint jitter, float32 [3,1,1]."""
    base, jitter = MATERIALS[material]
    n = rng.standard_normal(4)
    tint = (n[:3] * 0.35 + n[3]) * jitter  # per-channel tint + shared brightness
    return np.minimum(np.maximum(np.asarray(base) + tint, 0.02), 1).astype(np.float32).reshape(3, 1, 1)


# ------------------------------------------------------------------------------------ layout


def _camera(H: int, W: int, rng: np.random.Generator) -> Camera:
    return Camera(H, W, f=W * rng.uniform(0.72, 0.95), cx=W * rng.uniform(0.42, 0.58),
                  horizon=H * rng.uniform(0.36, 0.5), height=rng.uniform(1.3, 1.75))


@dataclass
class Band:
    """A strip of ground between lateral offsets x0 < x1 (m)."""

    x0: float
    x1: float
    cls: int
    colour: np.ndarray
    texture: float = 0.15  # texture amplitude


@dataclass
class Line:
    """A painted line centred at lateral offset x (m); dashed when ``period`` > 0."""

    x: float
    width: float
    period: float = 0.0
    duty: float = 1.0
    phase: float = 0.0


@dataclass
class Scene:
    bands: list[Band] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    planes: list[tuple[float, object, float]] = field(default_factory=list)  # (X0, surface_fn, top)
    things: list[Thing] = field(default_factory=list)
    crosswalk: tuple[float, float, float, float] | None = None  # (z0, z1, x0, x1)
    shadows: list[tuple[float, int, tuple]] = field(default_factory=list)  # facades: (X0, side, (edges, heights))
    lanes: list[tuple[float, int]] = field(default_factory=list)  # (centre, direction +1 ahead / -1 oncoming)
    walks: list[tuple[float, float]] = field(default_factory=list)  # sidewalk strips (x0, x1)
    roadside: list[float] = field(default_factory=list)  # offsets for poles and signs
    road: tuple[float, float] = (0.0, 0.0)


def _layout(p: dict, cam: Camera, rng: np.random.Generator) -> Scene:
    """Sample the cross-section of the road, the uprights along it and the objects on it."""
    s = Scene()
    lw = _draw(rng, p["lane_width"])
    n = _draw(rng, p["lanes"])
    road_mat = "cobblestone" if rng.random() < p["cobblestone"] else "asphalt"
    road_rgb = _colour(rng, road_mat)
    ego = int(rng.integers(n))
    XL = -(ego + 0.5) * lw + rng.normal(0, 0.12 * lw)
    XR = XL + n * lw
    for i in range(n):
        s.lanes.append((XL + (i + 0.5) * lw, +1))
    dash = (rng.uniform(10, 18), rng.uniform(0.3, 0.45)) if p["t"] < 0.5 else (rng.uniform(5, 9), 0.5)
    for i in range(1, n):
        s.lines.append(Line(XL + i * lw, 0.15, dash[0], dash[1], rng.uniform(0, 20)))
    s.bands.append(Band(XL, XR, DRIVABLE, road_rgb, ROAD_TEXTURE))
    left = _opposite(s, p, XL, n, lw, road_rgb, dash, rng) if rng.random() < p["opposite"] else XL
    s.road = (left, XR)
    for side, edge in ((-1, left), (+1, XR)):
        _roadside(s, p, side, edge, road_rgb, rng)
    _objects(s, p, rng)
    return s


def _opposite(s: Scene, p: dict, XL: float, n: int, lw: float, road_rgb: np.ndarray, dash: tuple[float, float],
              rng: np.random.Generator) -> float:
    """Oncoming lanes left of ``XL``: behind a median with a guardrail (divided road) or a centre
    line (undivided). Returns the new left edge of the road."""
    if rng.random() < p["median"]:
        s.lines.append(Line(XL + 0.3, 0.15))  # inner edge line, shoulder, grass median, guardrail
        s.bands.append(Band(XL - 0.6, XL, DRIVABLE, road_rgb, ROAD_TEXTURE))
        mw = _draw(rng, p["median_width"])
        s.bands.append(Band(XL - 0.6 - mw, XL - 0.6, NATURE, _colour(rng, "grass"), 0.35))
        _guardrail(s, XL - 0.6 - mw / 2, rng)
        n_opp, inner = n, XL - 1.2 - mw
        o0 = inner - n_opp * lw
        s.bands.append(Band(o0, inner + 0.6, DRIVABLE, road_rgb, ROAD_TEXTURE))
        s.lines.append(Line(inner - 0.3, 0.15))
    else:
        n_opp = max(1, n - int(rng.integers(0, 2)))
        o0 = XL - n_opp * lw
        s.bands.append(Band(o0, XL, DRIVABLE, road_rgb, ROAD_TEXTURE))
        s.lines.append(Line(XL, 0.15, *((0, 1, 0) if rng.random() < 0.5 else (dash[0] / 2, 0.5, 0))))
    s.lines += [Line(o0 + i * lw, 0.15, dash[0], dash[1], rng.uniform(0, 20)) for i in range(1, n_opp)]
    s.lanes += [(o0 + (i + 0.5) * lw, -1) for i in range(n_opp)]
    return o0


def _guardrail(s: Scene, X0: float, rng: np.random.Generator) -> None:
    """A steel guardrail (A2D2 'Sidebars' -> Info): a rail band and posts every ``spacing`` m."""
    rail = _colour(rng, "metal")
    spacing, top = rng.uniform(2.0, 4.0), rng.uniform(0.7, 0.8)

    def surface(Z, Yup):
        posts = (frac(Z / spacing) < 0.15 / spacing) & (Yup >= 0) & (Yup < top)
        beam = (Yup >= top - 0.32) & (Yup < top)
        shine = np.float32(0.6) + np.float32(0.2) * beam + np.float32(0.3) * (Yup > top - 0.16)
        return beam | posts, INFO, rail * shine

    s.planes.append((X0, surface, top))


def _roadside(s: Scene, p: dict, side: int, edge: float, road_rgb: np.ndarray, rng: np.random.Generator) -> None:
    """Bands, lines and uprights from the road edge outwards on one side (-1 left, +1 right)."""
    x = edge
    if rng.random() < p["edge_line"]:
        s.lines.append(Line(x - side * 0.3, 0.15))
    shoulder = _draw(rng, p["shoulder"])
    if shoulder > 0.05:
        s.bands.append(_band(x, side * shoulder, DRIVABLE, road_rgb, ROAD_TEXTURE))
        x += side * shoulder
    if rng.random() < p["parking"]:
        s.bands.append(_band(x, side * 2.2, DRIVABLE, road_rgb * rng.uniform(0.9, 1.1), ROAD_TEXTURE))
        s.lanes.append((x + side * 1.1, 0))  # 0: parked
        x += side * 2.2
    if rng.random() < p["sidewalk"]:
        s.bands.append(_band(x, side * 0.25, NONDRIVABLE, _colour(rng, "curb"), 0.1))
        x += side * 0.25
        width = _draw(rng, p["sidewalk_width"])
        mat = "paving" if rng.random() < 0.4 else "concrete"
        s.bands.append(_band(x, side * width, NONDRIVABLE, _colour(rng, mat), 0.3))
        s.walks.append(tuple(sorted((x + side * 0.3, x + side * (width - 0.3)))))
        s.roadside.append(x + side * 0.4)
        x += side * width
        beyond = _colour(rng, "grass")
    else:
        if rng.random() < p["guardrail"]:
            _guardrail(s, x + side * 0.5, rng)
        s.roadside.append(x + side * 1.2)
        verge = _draw(rng, p["verge"])
        beyond = _colour(rng, "grass" if rng.random() < 0.7 else "dry_grass")
        s.bands.append(_band(x, side * verge, NATURE, beyond, 0.4))
        x += side * verge
    if rng.random() < p["barrier"]:
        _barrier(s, x + side * 0.2, rng)
    # everything beyond: grass to the horizon, hidden behind facades and trees
    s.bands.append(_band(x, side * 1000.0, NATURE, beyond * rng.uniform(0.8, 1.1), 0.4))
    if rng.random() < p["facade"]:
        X0 = x + side * _draw(rng, p["setback"])
        _facades(s, p, X0, side, rng, gap=p["facade_gap"])
        if rng.random() < p["back_row"]:
            _facades(s, p, X0 + side * rng.uniform(8, 25), side, rng, gap=0.2, taller=2)
    if rng.random() < p["treeline"]:
        _treeline(s, p, x + side * rng.uniform(0.5, 25), rng)


def _band(x: float, signed_width: float, cls: int, colour: np.ndarray, texture: float) -> Band:
    a, b = sorted((x, x + signed_width))
    return Band(a, b, cls, colour, texture)


def _barrier(s: Scene, X0: float, rng: np.random.Generator) -> None:
    """A noise barrier or fence (A2D2 'Grid structure' -> Blocker)."""
    colour, top = _colour(rng, "barrier"), rng.uniform(1.5, 4.0)
    z0 = rng.uniform(0, 40)
    z1 = z0 + rng.uniform(30, 200)
    panel = rng.uniform(3, 5)

    def surface(Z, Yup):
        mask = (Yup >= 0) & (Yup < top) & (Z > z0) & (Z < z1)
        ribs = np.float32(1) - np.float32(0.3) * (frac(Z / panel) < 0.2 / panel)
        return mask, BLOCKER, colour * ribs * (np.float32(0.85) + np.float32(0.15 / top) * Yup)

    s.planes.append((X0, surface, top))


def _facades(s: Scene, p: dict, X0: float, side: int, rng: np.random.Generator, gap: float,
             taller: int = 0) -> None:
    """A row of buildings along the road: segments in Z with their own height, colour and windows."""
    n = 24
    edges = rng.uniform(-5, 30) + np.concatenate([[0], np.cumsum(rng.uniform(8, 35, n))]).astype(np.float32)
    lo, hi = p["storeys"]
    storey = _draw(rng, p["storey"])
    heights = (rng.integers(lo, hi + 1, n) + taller) * storey * rng.uniform(0.9, 1.1, n)
    heights = np.where(rng.random(n) < gap, -1.0, heights).astype(np.float32)
    palette = np.concatenate([_colour(rng, m) for m in FACADES], axis=2)  # [3,1,3]
    colours = palette[:, :, rng.integers(len(FACADES), size=n)] * rng.uniform(0.8, 1.2, (3, 1, n)).astype(np.float32)
    win_w, win_gap = rng.uniform(1.0, 1.8), rng.uniform(2.5, 4.0)
    lit = np.float32(rng.choice((1.0, rng.uniform(0.6, 0.85))))  # sunny or shaded side
    glass = np.float32(rng.uniform(0.2, 0.45))  # window brightness relative to the wall

    def surface(Z, Yup):
        seg = np.clip(np.searchsorted(edges, Z[0]) - 1, 0, n - 1)
        inside = (Z[0] > edges[0]) & (Z[0] < edges[-1])
        top = np.where(inside, heights[seg], -1.0)[None, :]
        mask = (Yup >= 0) & (Yup < top)
        floor_pos = frac(Yup / storey) * storey
        window = (frac((Z - edges[seg]) / win_gap) * win_gap < win_w) & (floor_pos > 0.9) & (floor_pos < 2.3) \
            & (Yup > storey) & (Yup < top - 0.6)
        return mask, BUILDINGS, colours[:, :, seg] * (lit - (lit - lit * glass) * window)

    s.planes.append((X0, surface, float(heights.max())))
    if side < 0:  # the facade shades the ground next to it
        s.shadows.append((X0, side, (edges, heights)))


def _treeline(s: Scene, p: dict, X0: float, rng: np.random.Generator) -> None:
    """A wall of trees and bushes (Nature) with a bumpy top, gaps and dappled foliage."""
    lo, hi = p["tree_height"]
    foliage = _colour(rng, "foliage")
    scale = rng.uniform(1.5, 5)
    knots = np.arange(-10, 420, scale)
    heights = rng.uniform(lo, hi, len(knots)) * (rng.random(len(knots)) > 0.12)
    tex_map = texture(rng)

    def surface(Z, Yup):
        top = np.interp(Z, knots, heights).astype(np.float32)
        mask = (Yup >= 0) & (Yup < top)
        tex = lookup(tex_map, Yup * 3.0, Z * 1.5)
        return mask, NATURE, foliage * ((0.8 + 0.25 * tex) * (0.7 + 0.3 * np.clip(Yup / hi, 0, 1)))

    s.planes.append((X0, surface, hi))


def _objects(s: Scene, p: dict, rng: np.random.Generator) -> None:
    """Vehicles in lanes, parked cars, pedestrians, poles, signs, lights, trees and blocks."""
    moving = [c for c, d in s.lanes if d != 0]
    parked = [c for c, d in s.lanes if d == 0]
    for _ in range(_draw(rng, p["vehicles"])):
        r = rng.random()
        kind = "truck" if r < p["truck_share"] else "van" if r < p["truck_share"] + p["van_share"] else "car"
        _vehicle(s, kind, moving[rng.integers(len(moving))] + rng.normal(0, 0.2), _depth(rng, 5, 150), rng)
    if parked:
        for _ in range(_draw(rng, p["parked"])):
            kind = "van" if rng.random() < p["van_share"] else "car"
            _vehicle(s, kind, parked[rng.integers(len(parked))] + rng.normal(0, 0.1), _depth(rng, 3, 80), rng)
    if s.walks:
        for _ in range(_draw(rng, p["pedestrians"])):
            x0, x1 = s.walks[rng.integers(len(s.walks))]
            _person(s, rng.uniform(x0, x1), _depth(rng, 3, 60), rng)
        for _ in range(_draw(rng, p["street_trees"])):
            x0, x1 = s.walks[rng.integers(len(s.walks))]
            _tree(s, rng.choice((x0, x1)), _depth(rng, 4, 80), rng)
    if s.roadside:
        for _ in range(_draw(rng, p["poles"])):
            _pole(s, s.roadside[rng.integers(len(s.roadside))], _depth(rng, 4, 100), rng, sign=False)
        for _ in range(_draw(rng, p["signs"])):
            _pole(s, s.roadside[rng.integers(len(s.roadside))], _depth(rng, 5, 100), rng, sign=True)
        for _ in range(_draw(rng, p["blocks"])):
            x = s.roadside[rng.integers(len(s.roadside))]
            _upright(s, "block", x, _depth(rng, 3, 50), rng, colour=(0.75, 0.1, 0.08), variant=int(rng.integers(2)))
    if rng.random() < p["crosswalk"]:
        z0 = _depth(rng, 6, 40)
        s.crosswalk = (z0, z0 + rng.uniform(3, 5), *s.road)
        for _ in range(int(rng.integers(0, 4))):
            _person(s, rng.uniform(*s.road), z0 + rng.uniform(0.5, 3), rng)
        if rng.random() < p["traffic_lights"]:
            for x in s.roadside:
                _pole(s, x, z0 - 0.5, rng, sign=False, light=True)
    if rng.random() < p["gantry"]:
        z = _depth(rng, 25, 150)
        x0, x1 = min(c for c, _ in s.lanes) - 2, max(c for c, _ in s.lanes) + 2
        for x in (x0, x1):
            s.things.append(Thing("pole", x, z + 0.3, 0.35, 7.0, (0.5, 0.52, 0.55)))
        width = min(x1 - x0, rng.uniform(4, 10))
        lo = x0 + width / 2  # when the panel spans the whole gantry, x1 - width / 2 can round below lo
        s.things.append(Thing("panel", rng.uniform(lo, max(lo, x1 - width / 2)), z, width, rng.uniform(2, 3.5),
                              (0.05, 0.3, 0.6) if rng.random() < 0.7 else (0.05, 0.4, 0.2), y0=5.2))


def _depth(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Log-uniform distance: as many far, small objects as near ones."""
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _upright(s: Scene, kind: str, X: float, Z: float, rng: np.random.Generator, colour, **kw) -> None:
    (w0, w1), (h0, h1) = SIZES[kind]
    s.things.append(Thing(kind, X, Z, rng.uniform(w0, w1), rng.uniform(h0, h1), tuple(colour), **kw))


def _vehicle(s: Scene, kind: str, X: float, Z: float, rng: np.random.Generator) -> None:
    paints = TRUCK_PAINTS if kind == "truck" else CAR_PAINTS
    colour = np.minimum(np.maximum(paints[rng.integers(len(paints))] + rng.normal(0, 0.04, 3), 0), 1)
    _upright(s, kind, X, Z, rng, colour, shadow=rng.uniform(0.35, 0.65))


def _person(s: Scene, X: float, Z: float, rng: np.random.Generator) -> None:
    colour = np.minimum(np.maximum(CLOTHES[rng.integers(len(CLOTHES))] + rng.normal(0, 0.05, 3), 0), 1)
    _upright(s, "person", X, Z, rng, colour, variant=int(rng.integers(3)))


def _tree(s: Scene, X: float, Z: float, rng: np.random.Generator) -> None:
    h = rng.uniform(4, 9)
    s.things.append(Thing("tree", X, Z, h * rng.uniform(0.5, 0.8), h, tuple(_colour(rng, "foliage").ravel()),
                          variant=int(rng.integers(100))))


def _pole(s: Scene, X: float, Z: float, rng: np.random.Generator, sign: bool, light: bool = False) -> None:
    """A pole (Blocker), optionally carrying a sign or a traffic light (Info)."""
    height = rng.uniform(2.5, 3.5) if sign or light else rng.uniform(4, 9)
    grey = tuple(_colour(rng, "metal").ravel() * rng.uniform(0.5, 1.0))
    s.things.append(Thing("pole", X, Z + 0.05, rng.uniform(0.08, 0.2), height, grey))
    if sign:
        size = rng.uniform(0.6, 0.9)
        variant = int(rng.integers(6))
        w = size * (2.0 if variant in (3, 4) and rng.random() < 0.5 else 1.0)
        s.things.append(Thing("sign", X, Z, w, size, (0, 0, 0), y0=height - 0.1, variant=variant))
    elif light:
        s.things.append(Thing("light", X, Z, 0.35, 0.95, (0, 0, 0), y0=height - 0.2, variant=int(rng.integers(3))))


# ------------------------------------------------------------------------------------ rendering


def _render(s: Scene, p: dict, cam: Camera, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    canvas = Canvas(cam.H, cam.W, SKY)
    haze_rgb = _sky(canvas, cam, rng)
    _horizon(canvas, cam, p, rng)
    _ground(canvas, cam, s, rng)
    for X0, surface, top in s.planes:
        paint_plane(canvas, cam, X0, surface, top)
    for t in sorted(s.things, key=lambda t: -t.Z):
        paint_thing(canvas, cam, t)
    return _finish(canvas, cam, p, haze_rgb, rng), canvas.label


def _sky(canvas: Canvas, cam: Camera, rng: np.random.Generator) -> np.ndarray:
    """Sky gradient with soft clouds; returns the horizon (haze) colour [3,1,1]."""
    overcast = rng.random() < 0.35
    zenith = _colour(rng, "sky_overcast" if overcast else "sky_clear")
    horizon_rgb = np.clip(zenith * 0.5 + _colour(rng, "sky_overcast") * 0.6, 0, 1)
    ramp = np.clip(cam.rows / np.float32(max(cam.horizon, 1)), 0, 1)[:, None]
    clouds = smooth_noise(rng, (cam.H, cam.W), (3, int(rng.integers(4, 9))))
    amount = np.clip((clouds - np.float32(rng.uniform(0.0, 1.0))) * 3, 0, 1)
    sky = zenith + (horizon_rgb - zenith) * ramp
    canvas.rgb[:] = sky + (np.float32(rng.uniform(0.75, 0.95)) - sky) * amount
    return horizon_rgb


def _horizon(canvas: Canvas, cam: Camera, p: dict, rng: np.random.Generator) -> None:
    """A distant silhouette standing on the horizon: hills / forest or a city skyline."""
    city = rng.random() < p["far_city"]
    if city:  # blocks of constant height
        n = int(rng.integers(6, 20))
        tops = rng.uniform(5, 45, n + 1) * (rng.random(n + 1) > 0.25)
        height = tops[np.searchsorted(np.sort(rng.uniform(0, cam.W, n)), cam.cols)]
    else:  # rolling hills: knots every few percent of the width
        knots = np.linspace(0, cam.W, int(rng.integers(5, 25)))
        height = np.interp(cam.cols, knots, rng.uniform(0, rng.uniform(8, 40), len(knots)))
    top_row = np.float32(cam.horizon) - np.float32(cam.f / FAR) * height.astype(np.float32)
    mask = (cam.rows[:, None] >= top_row[None, :]) & (cam.rows[:, None] < cam.horizon + 1)
    colour = _colour(rng, "facade_grey" if city else "foliage") * 0.8
    canvas.paint(slice(0, cam.H), slice(0, cam.W), mask, FAR, BUILDINGS if city else NATURE, colour)


def _ground(canvas: Canvas, cam: Camera, s: Scene, rng: np.random.Generator) -> None:
    """The ground plane below the horizon: bands by lateral offset, lines, crosswalk, shadows."""
    r0 = int(np.floor(cam.horizon + 0.5))
    rows = slice(r0, cam.H)
    dy = (cam.rows[rows] - np.float32(cam.horizon))[:, None]
    Z = np.float32(cam.f * cam.height) / dy                                 # [h,1]
    X = (cam.cols - np.float32(cam.cx))[None, :] * (np.float32(cam.height) / dy)  # [h,W]
    bands = sorted(s.bands, key=lambda b: b.x0)             # adjacent strips, left to right
    which = _band_index(cam, dy, [b.x0 for b in bands[1:]])
    band_cls = np.array([b.cls for b in bands], np.uint8).take(which)
    tex_amp = np.array([b.texture for b in bands], np.float32).take(which)
    tex = lookup(texture(rng), Z * 20.0, X * 20.0)
    colour = np.take(np.concatenate([b.colour.reshape(3, 1) for b in bands], axis=1), which, axis=1)  # [3,h,W]
    colour *= 1 + tex_amp * tex
    paint = _colour(rng, "paint") * np.float32(rng.uniform(0.75, 1.0))
    marks = np.zeros(X.shape, bool)
    for ln in s.lines:
        on = np.abs(X - ln.x) < ln.width / 2
        if ln.period > 0:
            on &= frac((Z + ln.phase) / ln.period) < ln.duty
        marks |= on
    band_cls[marks] = LANES
    if s.crosswalk is not None:
        z0, z1, x0, x1 = s.crosswalk
        zebra = (Z >= z0) & (Z < z1) & (X >= x0) & (X < x1) & (frac(X) < 0.5)
        band_cls[zebra] = INFO
        marks |= zebra
    np.copyto(colour, paint * (1 + 0.1 * tex), where=marks)
    canvas.paint(rows, slice(0, cam.W), np.ones(X.shape, bool), np.broadcast_to(Z, X.shape), band_cls, colour,
                 surface=GROUND_SURFACE)
    _ground_shade(canvas, rows, X, Z, s, rng)


def _band_index(cam: Camera, dy: np.ndarray, edges: list[float]) -> np.ndarray:
    """Per ground pixel [h,W], the number of band edges at or left of its lateral offset X.

    X grows along a row, so edge k starts at column ceil(cx + x_k dy / h - 1/2) of that row: mark
    those columns and take a running sum along the row (exact, and cheaper than a search per pixel).
    """
    h, W = dy.shape[0], cam.W
    start = np.ceil(cam.cx + np.asarray(edges, np.float32)[None, :] * (dy / np.float32(cam.height)) - 0.5)
    start = np.minimum(np.maximum(start, 0), W).astype(np.int64) + np.arange(h)[:, None] * (W + 1)
    marks = np.bincount(start.ravel(), minlength=h * (W + 1)).reshape(h, W + 1)[:, :W]
    return np.cumsum(marks, axis=1, dtype=np.int32)


def _ground_shade(canvas: Canvas, rows: slice, X: np.ndarray, Z: np.ndarray, s: Scene,
                  rng: np.random.Generator) -> None:
    """Shadows of facades (a sharp edge where a building stands) and of trees (blotches)."""
    shade = canvas.shade[rows]
    k = rng.uniform(0.45, 0.75)
    reach = rng.uniform(0.0, 0.8)
    for X0, side, (edges, heights) in s.shadows:
        seg = np.clip(np.searchsorted(edges, Z[:, 0]) - 1, 0, len(heights) - 1)
        height = np.where((Z[:, 0] > edges[0]) & (Z[:, 0] < edges[-1]), heights[seg], 0.0)[:, None]
        shade *= np.where(side * X > side * X0 - reach * height, k, 1.0).astype(np.float32)
    if rng.random() < 0.4:
        blotch = smooth_noise(rng, (32, 32), (6, 6))
        field_ = lookup(blotch, Z * 0.4, X * 0.8 + 8)
        shade *= np.where(field_ > rng.uniform(0.6, 0.8), k, 1.0).astype(np.float32)


def _finish(canvas: Canvas, cam: Camera, p: dict, haze_rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shadows, haze with depth, exposure and colour cast, blur, tone curve, sensor noise -> uint8 [3,H,W]."""
    colour = canvas.rgb
    ground = canvas.surface == GROUND_SURFACE
    colour *= np.float32(1) + (canvas.shade - np.float32(1)) * ground
    depth = np.minimum(canvas.depth, np.float32(2 * FAR)) * (canvas.surface != SKY_SURFACE)
    transmission = np.exp(depth * np.float32(-1 / _draw(rng, p["haze"])))
    colour = haze_rgb + (colour - haze_rgb) * transmission
    colour *= (rng.uniform(0.65, 1.25) * (1 + rng.normal(0, 0.05, 3))).astype(np.float32).reshape(3, 1, 1)
    if rng.random() < 0.3:  # slight defocus: 2x2 box filter
        colour[:, :-1] = (colour[:, :-1] + colour[:, 1:]) * np.float32(0.5)
        colour[:, :, :-1] = (colour[:, :, :-1] + colour[:, :, 1:]) * np.float32(0.5)
    np.clip(colour, 0, 1, out=colour)
    colour += np.float32(rng.uniform(-0.25, 0.35)) * colour * (1 - colour)  # tone curve (gamma-like)
    colour *= np.float32(255)
    colour += sensor_noise(rng, cam.H, cam.W) * np.float32(rng.uniform(1.2, 7.5))
    colour += np.float32(0.5)
    return np.clip(colour, 0, 255, out=colour).astype(np.uint8)
