"""A2D2: our class file against the dataset's colour table, the real split lists, the exporter ->
loader round trip, the colour lookup against a brute-force one, and the one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from shiftbench.data import a2d2, class_names, open_split
from shiftbench.data._io import write_png
from shiftbench.data.export import export, scene_timestamp
from shiftbench.data.synthetic import CLASSES_11, DOMAINS, SPLITS, generate
from shiftbench.errors import ShiftbenchError

SIZE = (32, 64)
COUNT = 2
REAL_COUNTS = {"highway_train": 6132, "highway_val": 876, "highway_test": 1421, "urban_train": 6132,
               "urban_val": 876, "urban_test": 1421, "ambiguous_test": 1421, "all_train": 12264, "all_val": 1752,
               "all_test": 2842}
LINE = re.compile(r"^(highway|urban|ambiguous)/(train_val|test)/GT/\d{14}_label_frontcenter_\d{9}\.png$")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a2d2")
    export("a2d2", out, DOMAINS, COUNT, seed=5, size=SIZE, progress=False)
    return out


@pytest.fixture(scope="module")
def shared_classes(shared_dir) -> dict:
    return json.loads((shared_dir / "a2d2" / "classes.json").read_text())


# ------------------------------------------------------------------------------------ class data


def test_class_file_matches_the_dataset_table(shared_classes):
    c = a2d2.classes()
    assert list(c.categories_38) == shared_classes["categories_38"]
    assert list(c.categories_11) == shared_classes["categories_11"] == list(CLASSES_11)
    for i, name in enumerate(c.categories_38):
        target = shared_classes["map_38_to_11"][name]
        assert c.to_11[i] == (255 if target is None else CLASSES_11.index(target)), name
    assert c.to_11[255] == 255 and (c.to_11[38:] == 255).all()


def test_export_colours_group_back_to_their_class(shared_classes):
    by_colour = {"#%02x%02x%02x" % tuple(e["rgb"]): e["category"] for e in shared_classes["colours"]}
    for cls, (name, colour) in zip(CLASSES_11, a2d2.classes().export_11):
        assert by_colour[colour] == a2d2.category_of(name)
        assert shared_classes["map_38_to_11"][a2d2.category_of(name)] == cls
    assert "#000000" not in by_colour  # the exporter's ignore colour is not an A2D2 colour


def test_category_of_strips_instance_numbers():
    assert a2d2.category_of("Car 1") == "Car" and a2d2.category_of("Traffic sign 3") == "Traffic sign"
    assert a2d2.category_of("RD normal street") == "RD normal street"
    assert a2d2.category_of("Obstacles / trash") == "Obstacles / trash"


def _full_class_list(shared_classes) -> dict[str, str]:
    """The 55 colours named as in A2D2's class_list.json ("Car 1".."Car 4", "Sky")."""
    counts: dict[str, int] = {}
    for e in shared_classes["colours"]:
        counts[e["category"]] = counts.get(e["category"], 0) + 1
    seen: dict[str, int] = {}
    table = {}
    for e in shared_classes["colours"]:
        cat = e["category"]
        seen[cat] = seen.get(cat, 0) + 1
        table["#%02x%02x%02x" % tuple(e["rgb"])] = f"{cat} {seen[cat]}" if counts[cat] > 1 else cat
    return table


def test_colour_lookup_against_brute_force(shared_classes, tmp_path):
    table = _full_class_list(shared_classes)
    (tmp_path / "class_list.json").write_text(json.dumps(table))
    lookup = a2d2.read_class_list(tmp_path)
    assert len(lookup.keys) == 55
    rng = np.random.default_rng(0)
    known = np.array([[int(h[k:k + 2], 16) for k in (1, 3, 5)] for h in table], np.uint8)
    pixels = known[rng.integers(len(known), size=(40, 50))]
    unknown = rng.random((40, 50)) < 0.2
    pixels[unknown] = rng.integers(0, 256, size=(int(unknown.sum()), 3))
    rgb = pixels.transpose(2, 0, 1)
    index38 = {name: i for i, name in enumerate(shared_classes["categories_38"])}
    got38, got11 = lookup.decode(rgb, 38), lookup.decode(rgb, 11)
    for y in range(40):
        for x in range(50):
            name = table.get("#%02x%02x%02x" % tuple(pixels[y, x]))
            want38 = 255 if name is None else index38[a2d2.category_of(name)]
            target = None if name is None else shared_classes["map_38_to_11"][a2d2.category_of(name)]
            want11 = 255 if target is None else CLASSES_11.index(target)
            assert (got38[y, x], got11[y, x]) == (want38, want11)
    assert (got38[unknown] == 255).mean() > 0.99  # random colours almost never hit one of the 55


def test_authors_labels_keep_each_categorys_first_colour_and_make_the_rest_car(shared_classes, tmp_path):
    """``labels: authors`` decodes as the authors' a2d2_loader: only a category's first instance colour
    ("Car 1", "Bicycle 1", ..., "Sky") keeps its category, every other colour, known or not, is class 0."""
    table = _full_class_list(shared_classes)
    (tmp_path / "class_list.json").write_text(json.dumps(table))
    lookup = a2d2.read_class_list(tmp_path)
    assert int(lookup.first.sum()) == 38  # one colour per category
    first_listed = {}
    for e in shared_classes["colours"]:
        first_listed.setdefault(e["category"], "#%02x%02x%02x" % tuple(e["rgb"]))
    rng = np.random.default_rng(1)
    known = np.array([[int(h[k:k + 2], 16) for k in (1, 3, 5)] for h in table], np.uint8)
    pixels = known[rng.integers(len(known), size=(30, 40))]
    pixels[0, 0] = (1, 2, 3)  # not an A2D2 colour
    got = lookup.decode(pixels.transpose(2, 0, 1), 38, "authors")
    index38 = {name: i for i, name in enumerate(shared_classes["categories_38"])}
    for y in range(30):
        for x in range(40):
            colour = "#%02x%02x%02x" % tuple(pixels[y, x])
            name = table.get(colour)
            want = index38[a2d2.category_of(name)] if name and first_listed[a2d2.category_of(name)] == colour else 0
            assert got[y, x] == want, (colour, name)
    assert (got == 0).sum() > (lookup.decode(pixels.transpose(2, 0, 1), 38) == 0).sum()  # more Car than officially
    with pytest.raises(ShiftbenchError, match=r"^A2D2 labels 'authors' needs classes 38, got 11 \(the authors'"):
        lookup.decode(pixels.transpose(2, 0, 1), 11, "authors")
    with pytest.raises(ShiftbenchError, match=r"^A2D2 labels 'theirs' is not one of official, authors$"):
        a2d2.A2D2Dataset([(tmp_path / "a.png", tmp_path / "b.png")], tmp_path, classes=38, labels="theirs")


def test_a_suite_with_authors_labels_opens_its_splits_so(tree, tmp_path):
    """``dataset.labels: authors`` reaches the loader: a "Pedestrian 2" block is Pedestrian officially and
    Car (0) for the authors; the exporter's colours, each its category's first, decode the same."""
    import shutil

    from shiftbench.suite import parse_suite

    root = tmp_path / "a2d2"
    shutil.copytree(tree, root)
    table = json.loads((root / "class_list.json").read_text())
    (root / "class_list.json").write_text(json.dumps({**table, "#bd499b": "Pedestrian 2"}))
    label = a2d2.read_split(root / "split" / "highway_test_gt.txt", root)[0][1]
    rgb = a2d2.read_png(label, "rgb").copy()
    rgb[:, :4, :5] = np.array([0xBD, 0x49, 0x9B], np.uint8)[:, None, None]
    write_png(label, rgb)
    raw = {"name": "a", "dataset": {"name": "a2d2", "root": str(root), "split_dir": str(root / "split"),
                                    "classes": 38, "labels": "authors", "eval": {"id": ["highway_test"]}},
           "models": [{"name": "m", "kind": "custom", "factory": "torch.nn:Identity"}], "corruptions": {"names": "none"}}
    authors = open_split(parse_suite(raw, root, root / "a.yaml"), "highway_test")
    raw["dataset"]["labels"] = "official"
    official = open_split(parse_suite(raw, root, root / "a.yaml"), "highway_test")
    pedestrian = a2d2.classes().categories_38.index("Pedestrian")
    y_official, y_authors = official[0][1], authors[0][1]
    assert (y_official[:4, :5] == pedestrian).all() and (y_authors[:4, :5] == 0).all()
    y_official[:4, :5] = 0
    assert torch.equal(y_authors, y_official)
    assert torch.equal(authors[1][1], official[1][1])


# ------------------------------------------------------------------------------------ split lists


def test_real_split_lists_resolve(shared_dir, tmp_path):
    split_dir = shared_dir / "a2d2" / "split"
    for name, n in REAL_COUNTS.items():
        pairs = a2d2.read_split(split_dir / f"{name}_gt.txt", tmp_path)
        assert len(pairs) == n == len(set(pairs)), name
    image, label = a2d2.read_split(split_dir / "highway_test_gt.txt", tmp_path)[0]
    assert label == tmp_path / "20181108_084007/label/cam_front_center/20181108084007_label_frontcenter_000041947.png"
    assert image == tmp_path / "20181108_084007/camera/cam_front_center/20181108084007_camera_frontcenter_000041947.png"


def test_exported_tree_layout(tree, shared_dir):
    assert json.loads((tree / "class_list.json").read_text()) == {h: n for n, h in a2d2.classes().export_11}
    real_first = (shared_dir / "a2d2/split/highway_test_gt.txt").read_text().splitlines()[0]
    assert LINE.match(real_first)
    for d in DOMAINS:
        for s in SPLITS[d]:
            lines = (tree / "split" / f"{d}_{s}_gt.txt").read_text().splitlines()
            assert len(lines) == COUNT and all(LINE.match(line) for line in lines)
            ts = scene_timestamp(d, s)
            assert (tree / f"{ts[:8]}_{ts[8:]}" / "camera" / "cam_front_center"
                    / f"{ts}_camera_frontcenter_000000001.png").is_file()
    assert len((tree / "split" / "all_train_gt.txt").read_text().splitlines()) == 2 * COUNT
    assert not list(tree.rglob("*.tmp*"))  # atomic writes leave no temporaries


def test_round_trip_is_exact(tree):
    for d in DOMAINS:
        for s in SPLITS[d]:
            ds = a2d2.A2D2Dataset(a2d2.read_split(tree / "split" / f"{d}_{s}_gt.txt", tree), root=tree, classes=11)
            assert len(ds) == COUNT
            for i in range(COUNT):
                x, y, sid = ds[i]
                image, label = generate(d, i, seed=5, size=SIZE, split=s)
                assert torch.equal(y, torch.from_numpy(label).long())
                assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(image).permute(2, 0, 1))
                ts = scene_timestamp(d, s)
                assert sid == f"{ts[:8]}_{ts[8:]}/{i:09d}"


def test_38_class_scheme_and_resize(tree):
    pairs = a2d2.read_split(tree / "split" / "urban_test_gt.txt", tree)
    x38, y38, _ = a2d2.A2D2Dataset(pairs, tree, classes=38)[0]
    _, y11, _ = a2d2.A2D2Dataset(pairs, tree, classes=11)[0]
    assert torch.equal(torch.from_numpy(a2d2.classes().to_11)[y38], y11)
    names38 = class_names("a2d2", 38)
    assert {names38[i] for i in y38.unique().tolist()} <= {a2d2.category_of(n) for n, _ in a2d2.classes().export_11}
    x, y, _ = a2d2.A2D2Dataset(pairs, tree, classes=11, size=(16, 24))[0]
    assert x.shape == (3, 16, 24) and y.shape == (16, 24) and 0 <= x.min() and x.max() <= 1
    rows = np.floor((np.arange(16) + 0.5) * SIZE[0] / 16).astype(int)  # nearest: sample at the pixel centres
    cols = np.floor((np.arange(24) + 0.5) * SIZE[1] / 24).astype(int)
    assert torch.equal(y, y11[rows][:, cols])


def test_ignore_pixels_round_trip(tree, tmp_path):
    """Pixels outside the 11 classes are written black and load as 255, never 0."""
    from shiftbench.data.export import A2D2Writer

    writer = A2D2Writer(tmp_path)
    label = np.full((8, 8), 255, np.uint8)
    label[:4] = 3
    writer.write("urban", "test", 0, np.zeros((3, 8, 8), np.uint8), label)
    writer.finish()
    ds = a2d2.A2D2Dataset(a2d2.read_split(tmp_path / "split" / "urban_test_gt.txt", tmp_path), tmp_path)
    assert torch.equal(ds[0][1], torch.from_numpy(label).long())


def test_open_split(tree):
    from types import SimpleNamespace

    spec = SimpleNamespace(name="a2d2", root=tree, split_dir=tree / "split", classes=11, size=None,
                           labels="official")
    ds = open_split(SimpleNamespace(dataset=spec), "ambiguous_test")
    assert len(ds) == COUNT and ds[0][1].shape == SIZE


# ------------------------------------------------------------------------------------ errors


def _one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(ShiftbenchError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_errors_split_lists(tree, tmp_path):
    list_file = tree / "split" / "urban_test_gt.txt"
    assert "no such folder" in _one_line_error(a2d2.read_split, list_file, tmp_path / "missing")
    assert "no such split list" in _one_line_error(a2d2.read_split, tmp_path / "nope.txt", tree)
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "empty split list" in _one_line_error(a2d2.read_split, tmp_path / "empty.txt", tree)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    assert "unreadable split list" in _one_line_error(a2d2.read_split, tmp_path / "binary.txt", tree)
    (tmp_path / "bad.txt").write_text("highway/test/GT/20181108084007_label_frontcenter_1.png\nfoo.png\n")
    assert "bad.txt:2: 'foo.png' does not name a label file" in _one_line_error(a2d2.read_split,
                                                                                  tmp_path / "bad.txt", tree)


def test_errors_files(tree, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tree, root)
    pairs = a2d2.read_split(root / "split" / "urban_val_gt.txt", root)
    image0, label0 = pairs[0]
    image1, label1 = pairs[1]
    label0.write_bytes(label0.read_bytes()[:60])                     # truncated PNG
    write_png(label1, np.zeros((3, SIZE[0], SIZE[1] // 2), np.uint8))  # label half as wide as its image
    ds = a2d2.A2D2Dataset(pairs, root)
    message = _one_line_error(ds.__getitem__, 0)
    assert label0.name in message and "not a readable PNG" in message
    message = _one_line_error(ds.__getitem__, 1)
    assert label1.name in message and "label is 32x32 but its image" in message
    image0.unlink()
    assert f"{image0}: no such file" in _one_line_error(ds.__getitem__, 0)
    (root / "class_list.json").write_text('{"#ff0000": "Car 1", "#00ff00": "Spaceship 2"}')
    assert "'Spaceship 2' is not one of the 38 A2D2 categories" in _one_line_error(a2d2.A2D2Dataset, pairs, root)
    (root / "class_list.json").write_text("{not json")
    assert "not readable JSON" in _one_line_error(a2d2.A2D2Dataset, pairs, root)
    (root / "class_list.json").unlink()
    assert "class_list.json: no such file" in _one_line_error(a2d2.A2D2Dataset, pairs, root)
    assert "classes 19 is not one of 38, 11" in _one_line_error(a2d2.A2D2Dataset, pairs, root, classes=19)
    assert "no such folder" in _one_line_error(a2d2.A2D2Dataset, pairs, tmp_path / "missing")


def test_dataset_pickles_without_its_lookup_table(tree):
    import pickle

    ds = a2d2.A2D2Dataset(a2d2.read_split(tree / "split" / "highway_val_gt.txt", tree), tree)
    first = ds[0]
    data = pickle.dumps(ds)
    assert len(data) < 100_000  # the 16 MiB colour table is rebuilt in the worker, not shipped
    clone = pickle.loads(data)
    assert torch.equal(clone[0][1], first[1]) and clone[0][2] == first[2]


@pytest.mark.parametrize("image_mode,label_mode", [("L", "RGB"), ("RGBA", "RGB"), ("RGB", "P"), ("RGBA", "P")])
def test_grey_rgba_and_palette_files_load_as_their_rgb_version(tmp_path, image_mode, label_mode):
    """Grey images load replicated to 3 channels, RGBA ones without alpha, palette labels as their colours."""
    from PIL import Image

    from shiftbench.data.export import A2D2Writer

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 12, 16), np.uint8)
    if image_mode == "L":
        image[1:] = image[0]
    label = rng.integers(0, 11, (12, 16)).astype(np.uint8)
    label[0, :4] = 255
    writer = A2D2Writer(tmp_path)
    writer.write("urban", "test", 0, image, label)
    writer.finish()
    ds = a2d2.A2D2Dataset(a2d2.read_split(tmp_path / "split" / "urban_test_gt.txt", tmp_path), tmp_path)
    want_x, want_y, _ = ds[0]
    assert torch.equal(want_y, torch.from_numpy(label).long())
    image_path, label_path = ds.pairs[0]
    hwc = image.transpose(1, 2, 0)
    if image_mode == "L":
        Image.fromarray(hwc[..., 0], "L").save(image_path)
    elif image_mode == "RGBA":
        alpha = rng.integers(0, 256, (12, 16, 1), np.uint8)
        Image.fromarray(np.concatenate([hwc, alpha], axis=2), "RGBA").save(image_path)
    if label_mode == "P":
        with Image.open(label_path) as im:
            colours = np.asarray(im.convert("RGB"))
        palette, index = np.unique(colours.reshape(-1, 3), axis=0, return_inverse=True)
        p = Image.fromarray(index.reshape(12, 16).astype(np.uint8), "P")
        p.putpalette(palette.astype(np.uint8).tobytes())
        p.save(label_path)
    for path, mode in ((image_path, image_mode), (label_path, label_mode)):
        with Image.open(path) as im:
            assert im.mode == mode
    x, y, _ = ds[0]
    assert torch.equal(x, want_x) and torch.equal(y, want_y)
