"""Cityscapes: the official labelId -> trainId table, the exporter -> loader round trip (exact up to
the documented 11 -> Cityscapes mapping), resizing and the one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from shiftbench.data import cityscapes, class_names, open_split
from shiftbench.data._io import write_png
from shiftbench.data.export import CITYSCAPES_LABEL_ID_11, export
from shiftbench.data.synthetic import CLASSES_11, DOMAINS, SPLITS, generate
from shiftbench.errors import ShiftbenchError

SIZE = (32, 64)
COUNT = 2
#: cityscapesScripts labels.py: (name, id, trainId), trainId 255 = ignored in evaluation
OFFICIAL = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
]
#: the documented export: 11-class category -> Cityscapes class it is written as (Lanes: lost into road)
DOCUMENTED = {"Person": "person", "Car": "car", "Truck": "truck", "Drivable": "road", "Nondrivable": "sidewalk",
              "Blocker": "pole", "Info": "traffic sign", "Sky": "sky", "Buildings": "building",
              "Nature": "vegetation", "Lanes": "road"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cityscapes")
    export("cityscapes", out, DOMAINS, COUNT, seed=3, size=SIZE, progress=False)
    return out


def test_train_id_table_is_official():
    for name, label_id, train_id in OFFICIAL:
        assert cityscapes.TRAIN_ID[label_id] == train_id, name
        if train_id != 255:
            assert cityscapes.CLASSES_19[train_id] == name
    assert (cityscapes.TRAIN_ID[34:] == 255).all()
    assert class_names("cityscapes", 19) == cityscapes.CLASSES_19


def test_export_mapping_is_the_documented_one():
    by_id = {label_id: name for name, label_id, _ in OFFICIAL}
    assert {c: by_id[i] for c, i in zip(CLASSES_11, CITYSCAPES_LABEL_ID_11)} == DOCUMENTED


def test_round_trip_up_to_the_documented_mapping(tree):
    expected_train_id = np.full(256, 255, np.uint8)
    for i, c in enumerate(CLASSES_11):
        expected_train_id[i] = cityscapes.CLASSES_19.index(DOCUMENTED[c])
    ids = []
    for seq, split in enumerate(("train", "val", "test")):
        ds = cityscapes.CityscapesDataset(tree, split)
        domains = [d for d in DOMAINS if split in SPLITS[d]]
        assert len(ds) == COUNT * len(domains)
        for k in range(len(ds)):
            x, y, sid = ds[k]
            city, stem = sid.split("/")
            index = int(stem.rsplit("_", 1)[1])
            assert stem == f"{city}_{seq:06d}_{index:06d}" and city in domains
            ids.append(sid)
            image, label = generate(city, index, seed=3, size=SIZE, split=split)
            assert torch.equal(y, torch.from_numpy(expected_train_id[label]).long())
            assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(image).permute(2, 0, 1))
    assert len(set(ids)) == len(ids)  # unique across splits, as in Cityscapes (ids key noise and maps)


def test_resize_and_open_split(tree):
    from types import SimpleNamespace

    spec = SimpleNamespace(name="cityscapes", root=tree, size=(16, 40))
    ds = open_split(spec, "val")
    x, y, _ = ds[0]
    assert x.shape == (3, 16, 40) and y.shape == (16, 40) and y.dtype == torch.int64
    full = cityscapes.CityscapesDataset(tree, "val")[0][1]
    rows = np.floor((np.arange(16) + 0.5) * SIZE[0] / 16).astype(int)
    cols = np.floor((np.arange(40) + 0.5) * SIZE[1] / 40).astype(int)
    assert torch.equal(y, full[rows][:, cols])


def _one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(ShiftbenchError) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_errors(tree, tmp_path):
    import shutil

    assert "no such folder" in _one_line_error(cityscapes.CityscapesDataset, tmp_path / "missing", "val")
    assert "'dev' is not one of train, val, test" in _one_line_error(cityscapes.CityscapesDataset, tree, "dev")
    (tmp_path / "empty" / "leftImg8bit" / "val" / "x").mkdir(parents=True)
    assert "no <city>/*_leftImg8bit.png images" in _one_line_error(cityscapes.CityscapesDataset, tmp_path / "empty",
                                                                   "val")
    assert "leftImg8bit/val" in _one_line_error(cityscapes.CityscapesDataset, tmp_path, "val")
    root = tmp_path / "copy"
    shutil.copytree(tree, root)
    ds = cityscapes.CityscapesDataset(root, "test")
    (image0, label0), (_, label1) = ds.pairs[:2]
    label0.write_bytes(label0.read_bytes()[:50])
    write_png(label1, np.zeros((SIZE[0] + 1, SIZE[1]), np.uint8))
    message = _one_line_error(ds.__getitem__, 0)
    assert label0.name in message and "PNG" in message
    message = _one_line_error(ds.__getitem__, 1)
    assert label1.name in message and "label is 64x33 but its image" in message
    image0.write_bytes(b"")
    assert f"{image0}: not a PNG image" in _one_line_error(ds.__getitem__, 0)
    with pytest.raises(ShiftbenchError, match="size"):
        cityscapes.CityscapesDataset(root, "test", size=(0, 10))


def test_a_split_group_refuses_a_repeated_sample_id(tree, tmp_path):
    """Two splits of one group holding frames of the same name (an export of before unique names): refused, since
    an image's corruption noise and its saved map are keyed by its id; the exporter's own trees pass."""
    import shutil
    from types import SimpleNamespace

    from shiftbench.runner.data import open_split as open_group
    from shiftbench.runner.dist import World

    spec = SimpleNamespace(name="cityscapes", root=tree, size=None, eval={"id": ["val", "test"]})
    suite = SimpleNamespace(dataset=spec, run=SimpleNamespace(limit=None))
    assert len(open_group(suite, "id", World(), cache_bytes=0)) == 2 * COUNT + 3 * COUNT
    root = tmp_path / "copy"
    shutil.copytree(tree, root)
    for kind in ("leftImg8bit", "gtFine"):  # the test split's highway frames renamed to the val split's names
        for path in (root / kind / "test" / "highway").iterdir():
            path.rename(path.with_name(path.name.replace("highway_000002_", "highway_000001_")))
    spec.root = root
    message = _one_line_error(open_group, suite, "id", World(), cache_bytes=0)
    assert message == ("dataset.eval.id: sample id 'highway/highway_000001_000000' occurs in splits 'val' and "
                       "'test'; each image's corruption noise and saved map are keyed by its id, so a group must hold "
                       "each id once (list each split once, and splits without shared file names)")


def test_shrinking_is_antialiased(tmp_path):
    """1-px stripes shrunk 3.2x average to ~0.5 (as torchvision's antialiased resize), not aliased samples."""
    from torchvision.transforms.v2.functional import resize

    stripes = np.zeros((3, 32, 64), np.uint8)
    stripes[..., 1::2] = 255
    image_path, label_path = cityscapes.frame_paths(tmp_path, "val", "c", "c_000000_000000")
    write_png(image_path, stripes)
    write_png(label_path, np.full((32, 64), 7, np.uint8))
    x, y, _ = cityscapes.CityscapesDataset(tmp_path, "val", size=(8, 20))[0]
    assert x.shape == (3, 8, 20) and torch.equal(y, torch.zeros(8, 20, dtype=torch.int64))
    assert (x - 0.5).abs().max() < 0.04
    want = resize(torch.from_numpy(stripes).float() / 255, [8, 20], antialias=True)
    assert torch.allclose(x, want, atol=1e-6)


def test_a_16_bit_grey_image_is_scaled_to_8_bits_not_clipped(tmp_path):
    """floor(v * 255 / 65535), as `shiftbench corrupt` loads it (Pillow's convert('RGB') clips at 255)."""
    from PIL import Image

    grey16 = np.array([[0, 257, 1000, 32768, 65535, 65534]], np.uint16).repeat(32, 0).repeat(6, 1)  # 32 x 36
    image_path, label_path = cityscapes.frame_paths(tmp_path, "val", "c", "c_000000_000000")
    image_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grey16).save(image_path)
    write_png(label_path, np.full((32, 36), 7, np.uint8))
    x, _, _ = cityscapes.CityscapesDataset(tmp_path, "val")[0]
    want = torch.from_numpy((grey16.astype(np.int64) * 255 // 65535).astype(np.float32) / 255).expand(3, -1, -1)
    assert torch.equal(x, want) and x[0, 0, ::6].mul(255).round().tolist() == [0, 1, 3, 127, 255, 254]


def _label_file(tmp_path, ids: np.ndarray, mode: str) -> Path:
    """A 32 x W frame whose label PNG holds ``ids`` in Pillow ``mode`` (P: a palette whose colours' brightness is not
    the index; RGB/RGBA/LA: the ids in every colour channel)."""
    from PIL import Image

    image_path, label_path = cityscapes.frame_paths(tmp_path, "val", "c", "c_000000_000000")
    write_png(image_path, np.full((3, *ids.shape), 128, np.uint8))
    label_path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        im = Image.fromarray(ids.astype(np.uint8), "L").convert("P")
        im.putpalette(np.random.default_rng(0).integers(0, 256, 768).astype(np.uint8).tobytes())
    elif mode == "I;16":
        im = Image.fromarray(ids.astype(np.uint16))
    elif mode in ("RGB", "RGBA", "LA"):
        channels = {"RGB": 3, "RGBA": 4, "LA": 2}[mode]
        stacked = np.repeat(ids.astype(np.uint8)[..., None], channels, axis=-1)
        stacked[..., -1] = 255 if mode != "RGB" else stacked[..., -1]
        im = Image.fromarray(stacked, mode)
    else:
        im = Image.fromarray(ids.astype(np.uint8), "L")
    im.save(label_path)
    assert Image.open(label_path).mode == mode
    return tmp_path


@pytest.mark.parametrize("mode", ["L", "P", "I;16", "LA", "RGB", "RGBA"])
def test_label_ids_are_values_in_any_one_channel_encoding(tmp_path, mode):
    """A palette label's indices are its ids (not the brightness of its colours); 16-bit, grey+alpha and
    equal-channel colour files give the same ids as the 8-bit grey file."""
    ids = np.array([[7, 26, 0, 33, 24, 11, 23, 4]], np.uint8).repeat(32, 0).repeat(4, 1)  # 32 x 32
    root = _label_file(tmp_path, ids, mode)
    _, y, _ = cityscapes.CityscapesDataset(root, "val")[0]
    assert y[0, ::4].tolist() == [0, 13, 255, 18, 11, 2, 10, 255]


@pytest.mark.parametrize("mode,ids,reason", [
    ("RGB", np.array([[7, 26], [8, 0]]), "a colour (RGB) image, not a map of label ids"),
    ("I;16", np.array([[7, 256], [8, 0]]), "label ids 0..256 in a I;16 image; ids must fit 0..255"),
])
def test_label_files_that_hold_no_ids_are_refused(tmp_path, mode, ids, reason):
    ids = ids.repeat(16, 0).repeat(16, 1)
    if mode == "RGB":  # a colour image: channels differ
        from PIL import Image

        root = _label_file(tmp_path, ids, "L")
        _, label_path = cityscapes.frame_paths(root, "val", "c", "c_000000_000000")
        Image.fromarray(np.stack([ids, ids[::-1], ids], -1).astype(np.uint8)).save(label_path)
    else:
        root = _label_file(tmp_path, ids, mode)
    with pytest.raises(ShiftbenchError, match="labelIds") as info:
        cityscapes.CityscapesDataset(root, "val")[0]
    assert reason in str(info.value)
