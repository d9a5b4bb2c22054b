"""The synthetic street scenes: determinism, the Dataset contract, the domains' content, and the
rendering primitives against brute-force per-pixel implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shiftbench.data import _render as R
from shiftbench.data import class_names, open_split
from shiftbench.data.synthetic import (CLASSES_11, DOMAINS, IGNORE_INDEX, SPLITS, SyntheticStreetScenes, generate,
                                       render)
from shiftbench.errors import ShiftbenchError

SMALL = (48, 96)
C = {name: i for i, name in enumerate(CLASSES_11)}


def test_constants():
    assert CLASSES_11 == ("Person", "Car", "Truck", "Drivable", "Nondrivable", "Blocker", "Info", "Sky", "Buildings",
                          "Nature", "Lanes")
    assert IGNORE_INDEX == 255 and DOMAINS == ("highway", "urban", "ambiguous")
    assert SPLITS["ambiguous"] == ("test",) and SPLITS["urban"] == ("train", "val", "test")
    assert [CLASSES_11[i] for i in (R.PERSON, R.CAR, R.TRUCK, R.LANES, R.SKY)] == ["Person", "Car", "Truck", "Lanes",
                                                                                   "Sky"]


def test_generate_types_and_default_size():
    image, label = generate("urban", 0)
    assert image.shape == (128, 256, 3) and image.dtype == np.uint8
    assert label.shape == (128, 256) and label.dtype == np.uint8
    assert set(np.unique(label)) <= set(range(11))
    chw, label2 = render("urban", 0)
    assert np.array_equal(chw.transpose(1, 2, 0), image) and np.array_equal(label, label2)


def test_deterministic_per_seed_domain_split_index():
    a = generate("highway", 3, seed=1, size=SMALL, split="val")
    b = generate("highway", 3, seed=1, size=SMALL, split="val")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    for other in (generate("highway", 4, 1, SMALL, "val"), generate("highway", 3, 2, SMALL, "val"),
                  generate("highway", 3, 1, SMALL, "train"), generate("urban", 3, 1, SMALL, "val")):
        assert not np.array_equal(a[0], other[0]) and not np.array_equal(a[1], other[1])


def test_dataset_contract():
    ds = SyntheticStreetScenes("ambiguous", "test", count=3, seed=0, size=SMALL)
    assert len(ds) == 3
    x, y, sid = ds[2]
    assert x.dtype == torch.float32 and x.shape == (3, *SMALL) and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64 and y.shape == SMALL
    assert sid == "ambiguous/test/000002"
    image, label = generate("ambiguous", 2, 0, SMALL, "test")
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(image).permute(2, 0, 1))
    assert torch.equal(y, torch.from_numpy(label).long())
    assert ds[-1][2] == sid
    with pytest.raises(IndexError):
        ds[3]


@pytest.mark.parametrize("args, match", [
    (("ambiguous", "train", 4), "'train' does not exist for domain 'ambiguous'; allowed: test"),
    (("rural", "test", 4), "'rural' is not one of highway, urban, ambiguous"),
    (("urban", "test", 0), "count 0 is not a positive integer"),
    (("urban", "test", True), "count True is not a positive integer"),
    (("urban", "test", 4, "a"), "synthetic seed 'a' is not an integer"),
    (("urban", "test", 4, 1.5), "synthetic seed 1.5 is not an integer"),
])
def test_dataset_bad_arguments(args, match):
    with pytest.raises(ShiftbenchError, match=match):
        SyntheticStreetScenes(*args)


def test_dataset_numpy_integers():
    a, b = SyntheticStreetScenes("urban", "test", np.int64(3), seed=np.int64(5)), SyntheticStreetScenes("urban", "test", 3, 5)
    assert len(a) == 3 and (a.count, a.seed) == (3, 5) and type(a.seed) is int
    assert all(torch.equal(x, y) for x, y in zip(a[2][:2], b[2][:2]))


@pytest.mark.parametrize("size", [(8, 64), (64,), "128x256", (64.5, 128)])
def test_bad_size(size):
    with pytest.raises(ShiftbenchError, match="is not \\(H, W\\) with integers 16..8192"):
        generate("urban", 0, size=size)


def test_other_sizes():
    image, label = generate("highway", 1, size=(40, 72))
    assert image.shape == (40, 72, 3) and label.shape == (40, 72)


def _class_share(domain: str, n: int = 10) -> np.ndarray:
    """Share of images of ``domain`` (test split) in which each class appears."""
    seen = np.zeros(11)
    for i in range(n):
        seen[np.unique(generate(domain, i, size=(64, 128), split="test")[1])] += 1
    return seen / n


def test_domain_content():
    highway, urban, ambiguous = (_class_share(d) for d in DOMAINS)
    # highway: no pedestrians, no sidewalks or curbs; guardrails (Info) and lanes nearly always
    assert highway[C["Person"]] == 0 and highway[C["Nondrivable"]] == 0
    assert highway[C["Info"]] >= 0.8 and highway[C["Lanes"]] >= 0.8
    # urban: sidewalks and facades always, pedestrians in most scenes
    assert urban[C["Nondrivable"]] >= 0.9 and urban[C["Buildings"]] >= 0.9 and urban[C["Person"]] >= 0.6
    # ambiguous: both kinds of content occur
    assert ambiguous[C["Nondrivable"]] > 0 and ambiguous[C["Buildings"]] > 0 and ambiguous[C["Info"]] > 0
    for share in (highway, urban, ambiguous):
        assert share[C["Sky"]] == 1 and share[C["Drivable"]] == 1 and share[C["Car"]] >= 0.5


def test_highway_has_more_trucks_than_urban():
    def truck_share(domain):
        labels = np.stack([generate(domain, i, size=(64, 128), split="train")[1] for i in range(16)])
        return (labels == C["Truck"]).sum() / max(((labels == C["Car"]) | (labels == C["Truck"])).sum(), 1)

    assert truck_share("highway") > truck_share("urban")


def test_registry_helpers():
    assert class_names("synthetic", 11) == CLASSES_11
    with pytest.raises(ShiftbenchError, match="synthetic has no 19-class scheme; allowed: 11"):
        class_names("synthetic", 19)
    from types import SimpleNamespace

    spec = SimpleNamespace(name="synthetic", count={"train": 2, "val": 1, "test": 3}, seed=0, size=SMALL)
    ds = open_split(SimpleNamespace(dataset=spec), "urban_test")
    assert isinstance(ds, SyntheticStreetScenes) and len(ds) == 3 and ds[0][2] == "urban/test/000000"
    for split, match in (("urban_tset", "synthetic split 'tset' does not exist for domain 'urban'; allowed: train"),
                         ("urban", "synthetic split 'urban' is not <domain>_<part>, e.g. highway_test"),
                         (None, r"split must be a split name \(str\), e.g. highway_test; got None")):
        with pytest.raises(ShiftbenchError, match=match):
            open_split(SimpleNamespace(dataset=spec), split)


# ------------------------------------------------------------------------------------ primitives


def test_smooth_noise_matches_bilinear_brute_force():
    rng = np.random.default_rng(0)
    grid = np.random.default_rng(0).random((4, 6), dtype=np.float32)
    out = R.smooth_noise(rng, (7, 11), (3, 5))
    for i in range(7):
        for j in range(11):
            r, c = i * 3 / 6, j * 5 / 10
            r0, c0 = min(int(r), 2), min(int(c), 4)
            fr, fc = r - r0, c - c0
            want = (grid[r0, c0] * (1 - fr) * (1 - fc) + grid[r0, c0 + 1] * (1 - fr) * fc
                    + grid[r0 + 1, c0] * fr * (1 - fc) + grid[r0 + 1, c0 + 1] * fr * fc)
            assert out[i, j] == pytest.approx(want, abs=1e-5)


def test_plane_matches_ray_intersection_brute_force():
    """paint_plane's closed form against intersecting each pixel's ray with the plane X = X0."""
    cam = R.Camera(H=20, W=30, f=25.0, cx=14.3, horizon=8.7, height=1.5)
    for X0 in (-3.0, 4.0):
        canvas = R.Canvas(cam.H, cam.W, sky_class=7)
        R.paint_plane(canvas, cam, X0, lambda Z, Yup: ((Yup >= 0) & (Yup < 2.0), 3, R.rgb(1, 0, 0)), top=2.0)
        for y in range(cam.H):
            for x in range(cam.W):
                ray = np.array([(x + 0.5 - cam.cx) / cam.f, -(y + 0.5 - cam.horizon) / cam.f, 1.0])  # X, Yup, Z
                t = X0 / ray[0]
                height = cam.height + t * ray[1]
                hit = t > 0.5 and 0 <= height < 2.0
                assert (canvas.label[y, x] == 3) == hit, (X0, y, x)
                if hit:
                    assert canvas.depth[y, x] == pytest.approx(t, rel=1e-4)


def test_thing_box_and_depth_test_brute_force():
    """A billboard covers exactly the pixel centres inside its projected box; nearer things win."""
    cam = R.Camera(H=24, W=40, f=30.0, cx=20.0, horizon=10.0, height=1.5)
    far = R.Thing("truck", X=0.5, Z=12.0, w=2.5, h=3.6, colour=(0.8, 0.8, 0.8))
    near = R.Thing("pole", X=0.0, Z=6.0, w=0.6, h=4.0, colour=(0.5, 0.5, 0.5))
    orders = []
    for order in ((far, near), (near, far)):
        canvas = R.Canvas(cam.H, cam.W, sky_class=7)
        for t in order:
            R.paint_thing(canvas, cam, t)
        orders.append(canvas.label.copy())
    assert np.array_equal(*orders)
    label = orders[0]

    def inside(t, y, x):
        return (cam.x(t.X - t.w / 2, t.Z) <= x + 0.5 < cam.x(t.X + t.w / 2, t.Z)
                and cam.y(t.h, t.Z) <= y + 0.5 < cam.y(0, t.Z))

    for y in range(cam.H):
        for x in range(cam.W):
            if inside(near, y, x):
                assert label[y, x] == R.BLOCKER
            elif label[y, x] != 7:
                assert inside(far, y, x) and label[y, x] == R.TRUCK
    assert (label == R.TRUCK).sum() > 20 and (label == R.BLOCKER).sum() > 10


@pytest.mark.parametrize("kind", sorted(R.SHAPES))
def test_sprites_reproduce_their_shapes(kind):
    """Sprite colour A * colour + B equals the shape's layers drawn with that colour."""
    n = R.SPRITE_SIZE
    u = ((np.arange(n, dtype=np.float32) + 0.5) / n)[None, :]
    v = (1 - (np.arange(n, dtype=np.float32) + 0.5) / n)[:, None]
    colour = R.rgb(0.3, 0.6, 0.2)
    for variant in range(R.VARIANTS.get(kind, 1)):
        cls, A, B = R.sprite(kind, variant)
        want_cls = np.full((n, n), R.TRANSPARENT, np.uint8)
        want_rgb = np.zeros((3, n, n), np.float32)
        for mask, c, layer in R.SHAPES[kind](u, v, colour, variant):
            mask = np.broadcast_to(mask, (n, n))
            want_cls[mask] = c
            want_rgb[:, mask] = np.broadcast_to(layer, (3, n, n))[:, mask]
        assert np.array_equal(cls, want_cls)
        assert (cls != R.TRANSPARENT).mean() > 0.02
        np.testing.assert_allclose(A * colour + B, want_rgb, atol=1e-5)


@pytest.mark.bench
@pytest.mark.parametrize("domain", ["highway", "urban"])
def test_bench_render(benchmark, domain):
    """One 128x256 scene (a new index each round)."""
    counter = iter(range(10 ** 9))
    benchmark(lambda: render(domain, next(counter)))

def test_ground_band_index_matches_a_search_per_pixel():
    from shiftbench.data.synthetic import _band_index

    edges = sorted(np.random.default_rng(1).uniform(-30, 30, 12).tolist() + [-1000.0, 1000.0])
    for horizon in (40.3, 55.0, 70.7):
        cam = R.Camera(H=128, W=256, f=211.3, cx=131.7, horizon=horizon, height=1.45)
        dy = (cam.rows[int(horizon + 0.5):] - np.float32(horizon))[:, None]
        X = (cam.cols - np.float32(cam.cx))[None, :] * (np.float32(cam.height) / dy)
        want = np.searchsorted(np.array(edges, np.float32), X, side="right")
        assert np.array_equal(_band_index(cam, dy, edges), want)


def test_dataset_pickles_for_worker_processes():
    import pickle

    ds = SyntheticStreetScenes("highway", "val", count=2, seed=4, size=SMALL)
    clone = pickle.loads(pickle.dumps(ds))
    assert all(torch.equal(a, b) for a, b in zip(ds[1][:2], clone[1][:2])) and clone[1][2] == ds[1][2]


def test_gantry_spanning_the_whole_road_renders():
    # highway/train 2575 draws a gantry panel as wide as the gantry: its centre's range rounds to
    # high < low by one ulp, which numpy's uniform refused ("high - low < 0")
    rgb, lab = generate("highway", 2575, seed=0, size=(32, 64), split="train")
    assert rgb.shape == (32, 64, 3) and lab.shape == (32, 64)
