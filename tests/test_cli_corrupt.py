"""``shiftbench corrupt`` and ``shiftbench corruptions preview|list``."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from corruptions import CORRUPTIONS, corrupt
from shiftbench.cli import main
from shiftbench.seeding import sample_seeds
from tests.reference import photo, to_tensor, to_uint8

NAMES = "gaussian_noise,glass_blur,contrast"


@pytest.fixture
def tree(tmp_path):
    """IN/a.png (RGB), IN/sub/b.jpg, IN/sub/c.png (grey, another size), IN/notes.txt, IN/broken.png."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(photo("astronaut", (40, 52))).save(root / "a.png")
    Image.fromarray(photo("coffee", (40, 52))).save(root / "sub" / "b.jpg", quality=95)
    Image.fromarray(photo("chelsea", (33, 47))).convert("L").save(root / "sub" / "c.png")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"not a png either")
    return root


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _files(root) -> list[str]:
    """The images under ``root`` (not OUT's record of its seed and device)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "corrupt.json")


def _expected(image: np.ndarray, rel: str, name: str, severity: int, seed: int) -> np.ndarray:
    return to_uint8(corrupt(to_tensor(image), name, severity, seed=sample_seeds(seed, [rel])))


def test_mirrors_the_tree_and_reports_skipped_files(tree, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "corrupt", str(tree), str(out), "--corruption", NAMES, "--severity", "2,5",
                             "--seed", "3", "--quiet")
    assert code == 0
    rels = ["a.png", "sub/b.jpg", "sub/c.png"]
    assert _files(out) == sorted(f"{n}/{s}/{r}" for n in NAMES.split(",") for s in (2, 5) for r in rels)
    assert "skipping notes.txt" in err and "skipping broken.png" in err
    assert "wrote 18 images" in stdout
    # PNG outputs are exactly corrupt() of the decoded input with the path-keyed seed, truncated to uint8.
    a = np.asarray(Image.open(tree / "a.png"))
    got = np.asarray(Image.open(out / "glass_blur" / "5" / "a.png"))
    assert np.array_equal(got, _expected(a, "a.png", "glass_blur", 5, seed=3))
    grey = np.repeat(np.asarray(Image.open(tree / "sub" / "c.png"))[..., None], 3, axis=2)
    got = np.asarray(Image.open(out / "gaussian_noise" / "2" / "sub" / "c.png"))
    assert got.shape == (33, 47, 3) and np.array_equal(got, _expected(grey, "sub/c.png", "gaussian_noise", 2, seed=3))
    with Image.open(out / "contrast" / "5" / "sub" / "b.jpg") as im:
        assert im.format == "JPEG" and im.size == (52, 40) and im.mode == "RGB"


def test_images_whose_data_is_truncated_are_reported_and_skipped(tree, tmp_path, capsys):
    """Headers that read (so discovery keeps them) over data that does not decode: the rest is written."""
    for name in ("a.png", "sub/b.jpg"):
        data = (tree / name).read_bytes()
        (tree / name.replace(".", "_cut.")).write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "corrupt", str(tree), str(out), "--corruption", "contrast", "--severity", "1,3",
                             "--quiet")
    assert code == 0
    assert _files(out) == sorted(f"contrast/{s}/{r}" for s in (1, 3) for r in ("a.png", "sub/b.jpg", "sub/c.png"))
    lines = [line for line in err.splitlines() if "_cut." in line]
    assert len(lines) == 2 and all(line.startswith("shiftbench: skipping") and "unreadable" in line for line in lines)
    assert ".cpp" not in err  # torchvision's message, without its source location
    # 3 readable inputs x 2 conditions; skipped: notes.txt, broken.png and the two cut ones (found with data)
    assert "wrote 6 images" in stdout and "(3 inputs x 2 conditions; 0 already there, 4 files skipped)" in stdout


def test_a_single_truncated_image_is_one_line_exit_2(tree, tmp_path, capsys):
    data = (tree / "a.png").read_bytes()
    (tree / "cut.png").write_bytes(data[: len(data) // 3])
    for argv in (("corrupt", str(tree / "cut.png"), str(tmp_path / "out")),
                 ("corruptions", "preview", str(tree / "cut.png"), str(tmp_path / "grid.png"))):
        code, _, err = _run(capsys, *argv, "--quiet") if argv[0] == "corrupt" else _run(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, argv
        assert "is not a readable PNG/JPEG image" in err and "cut.png" in err
        assert err.startswith("shiftbench: error: " + ("input" if argv[0] == "corrupt" else "IMAGE")), err


def test_a_single_input_image_is_decoded_once(tree, tmp_path, capsys, monkeypatch):
    import shiftbench.commands.corrupt as command

    calls = []
    monkeypatch.setattr(command, "load", lambda source, real=command.load: calls.append(source.rel) or real(source))
    code, _, _ = _run(capsys, "corrupt", str(tree / "a.png"), str(tmp_path / "out"), "--corruption", "contrast",
                      "--severity", "1,2", "--quiet")
    assert code == 0 and calls == ["a.png"] and len(_files(tmp_path / "out")) == 2


def test_outputs_do_not_depend_on_batch_size(tree, tmp_path, capsys):
    for bs in ("1", "3"):
        assert _run(capsys, "corrupt", str(tree), str(tmp_path / bs), "--corruption", "shot_noise,motion_blur",
                    "--severity", "4", "--batch-size", bs, "--quiet")[0] == 0
    for rel in _files(tmp_path / "1"):
        assert (tmp_path / "1" / rel).read_bytes() == (tmp_path / "3" / rel).read_bytes(), rel


def test_rerun_skips_finished_files_and_fills_gaps(tree, tmp_path, capsys):
    out = tmp_path / "out"
    args = ("corrupt", str(tree), str(out), "--corruption", "contrast", "--severity", "1", "--quiet")
    assert _run(capsys, *args)[0] == 0
    stamp = (out / "contrast" / "1" / "a.png").stat().st_mtime_ns
    (out / "contrast" / "1" / "sub" / "b.jpg").unlink()
    code, stdout, _ = _run(capsys, *args)
    assert code == 0 and "wrote 1 image to" in stdout and "(3 inputs x 1 condition; 2 already there" in stdout
    assert (out / "contrast" / "1" / "a.png").stat().st_mtime_ns == stamp
    assert (out / "contrast" / "1" / "sub" / "b.jpg").exists()


def test_interrupted_run_leaves_only_whole_files(tree, tmp_path, capsys, monkeypatch):
    import shiftbench.commands.corrupt as command

    real, calls = command.encode, []

    def encode_then_interrupt(image, suffix):
        calls.append(suffix)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(image, suffix)

    monkeypatch.setattr(command, "encode", encode_then_interrupt)
    out = tmp_path / "out"
    code, _, err = _run(capsys, "corrupt", str(tree), str(out), "--corruption", "contrast", "--severity", "1", "--quiet")
    assert code == 130 and "interrupted" in err
    assert len(_files(out)) == 2 and not any(p.name.startswith(".") for p in out.rglob("*"))
    monkeypatch.setattr(command, "encode", real)
    assert _run(capsys, "corrupt", str(tree), str(out), "--corruption", "contrast", "--severity", "1", "--quiet")[0] == 0
    assert len(_files(out)) == 3


def test_out_made_with_another_seed_is_refused_and_a_kills_temporaries_are_removed(tree, tmp_path, capsys):
    """Skipping the files that exist is only right for the same seed and device: OUT records them. A
    temporary left by SIGKILL (no clean-up ran) is removed by the next run."""
    out = tmp_path / "out"
    args = ["corrupt", str(tree), str(out), "--corruption", "shot_noise", "--severity", "3", "--quiet"]
    assert _run(capsys, *args)[0] == 0
    assert json.loads((out / "corrupt.json").read_text()) == {"seed": 0, "device": "cpu"}
    stale, live = out / "shot_noise" / "3" / ".a.x1y2z3.tmp.png", out / "shot_noise" / "3" / ".b.q7w8e9.tmp.png"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 120, time.time() - 120))  # a killed run's, two minutes ago
    live.write_bytes(b"being written")  # another corrupt writing into the same OUT now
    code, _, err = _run(capsys, *args, "--seed", "7")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{out}: was made with --seed 0, this run has --seed 7, --device cpu; its images would mix" in err
    assert stale.exists()  # a refused run touches nothing
    code, stdout, _ = _run(capsys, *args)
    assert code == 0 and "wrote 0 images" in stdout and not stale.exists() and live.exists()
    (out / "corrupt.json").write_text("[1]")
    code, _, err = _run(capsys, *args)
    assert code == 2 and f"{out / 'corrupt.json'}: unreadable (not a JSON object)" in err


def test_a_shiftbench_run_folder_is_refused_as_out(tree, tmp_path, capsys):
    """A run's --out given as corrupt's OUT would gain <corruption>/ folders beside its states: refused, untouched."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text('{"suite": "demo"}')
    code, _, err = _run(capsys, "corrupt", str(tree), str(run), "--corruption", "fog", "--severity", "1", "--quiet")
    assert code == 2 and err.strip() == (f"shiftbench: error: {run}: holds a 'shiftbench run' (its manifest.json); "
                                         "corrupted images would mix with its results: give another OUT")
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json"]


def test_single_file_input_and_output_inside_input(tree, capsys):
    out = tree / "corrupted"  # OUT inside IN: a re-run must not corrupt its own outputs
    for _ in range(2):
        code, stdout, _ = _run(capsys, "corrupt", str(tree), str(out), "--corruption", "contrast", "--severity", "3",
                               "--quiet")
        assert code == 0
    assert "3 inputs" in stdout and len(_files(out)) == 3
    code, _, _ = _run(capsys, "corrupt", str(tree / "a.png"), str(tree / "single"), "--corruption", "fog",
                      "--severity", "1", "--quiet")
    assert code == 0 and _files(tree / "single") == ["fog/1/a.png"]


@pytest.mark.parametrize("argv,message", [
    (["--corruption", "gausian_noise"], "unknown name gausian_noise; use all or some of: gaussian_noise"),
    (["--severity", "0"], "--severity '0' is not allowed; use all or integers in 1..5"),
    (["--severity", "6"], "integers in 1..5"),
    (["--severity", "high"], "integers in 1..5"),
    (["--severity", "1,,3"], "--severity: '1,,3' has an empty item (two commas in a row, or one at an end)"),
    (["--corruption", "fog,"], "--corruption: 'fog,' has an empty item"),
    (["--batch-size", "0"], "--batch-size 0 is not allowed"),
    (["--seed", "x"], "invalid int value"),
])
def test_bad_arguments_are_one_line_exit_2(tree, tmp_path, capsys, argv, message):
    try:
        code, _, err = _run(capsys, "corrupt", str(tree), str(tmp_path / "out"), *argv)
    except SystemExit as exc:  # argparse's own errors
        code, err = exc.code, capsys.readouterr().err
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_missing_or_non_image_input(tmp_path, tree, capsys):
    code, _, err = _run(capsys, "corrupt", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert code == 2 and "does not exist; give an image file or a folder of PNG/JPEG images" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "corrupt", str(tree / "notes.txt"), str(tmp_path / "out"))
    assert code == 2 and "is not a readable PNG/JPEG image" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    code, _, err = _run(capsys, "corrupt", str(tmp_path / "texts"), str(tmp_path / "out"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds no readable PNG/JPEG image (1 other file, e.g. a.txt (not a .png/.jpg/.jpeg file))" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "corrupt", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert code == 2 and "holds no readable PNG/JPEG image; give an image file" in err
    assert not (tmp_path / "out").exists()


def test_images_smaller_than_32_pixels_are_refused(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(photo("rocket", (31, 64))).save(tmp_path / "in" / "tiny.png")
    code, _, err = _run(capsys, "corrupt", str(tmp_path / "in"), str(tmp_path / "out"))
    assert code == 2 and "tiny.png is 31x64; images must be at least 32x32" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu(tree, tmp_path, capsys):
    code, _, err = _run(capsys, "corrupt", str(tree), str(tmp_path / "out"), "--device", "cuda")
    assert code == 2 and "no CUDA device" in err


def test_preview_writes_a_labelled_19x5_grid(tmp_path, capsys):
    Image.fromarray(photo("rocket", (48, 64))).save(tmp_path / "rocket.png")
    code, stdout, _ = _run(capsys, "corruptions", "preview", str(tmp_path / "rocket.png"), str(tmp_path / "grid.png"))
    assert code == 0 and "19 corruptions x 5 severities at 48x64" in stdout
    with Image.open(tmp_path / "grid.png") as im:
        width, height = im.size
        pixels = np.asarray(im.convert("RGB"))
    assert im.format == "PNG" and height > 2 * width  # 19 rows of 5 cells
    assert pixels.std() > 20  # images, not a blank canvas
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []



@pytest.mark.parametrize("hw", [(40, 40), (48, 64), (128, 256)])
def test_preview_labels_fit_the_canvas(tmp_path, capsys, hw):
    """The labels sit in the margins at any image size: no ink on the canvas's left or top edge (labels
    placed in image pixels ran off it for small images: "aussian_noise")."""
    Image.fromarray(photo("rocket", hw)).save(tmp_path / "i.png")
    assert _run(capsys, "corruptions", "preview", str(tmp_path / "i.png"), str(tmp_path / "g.png"))[0] == 0
    with Image.open(tmp_path / "g.png") as im:
        grey = np.asarray(im.convert("L"))
    assert grey[:, :3].min() > 200 and grey[:3, :].min() > 200, hw


def test_preview_errors(tmp_path, capsys):
    for image, problem in ((tmp_path / "none.png", "does not exist"), (tmp_path, "is a folder")):
        code, _, err = _run(capsys, "corruptions", "preview", str(image), str(tmp_path / "g.png"))
        assert code == 2 and err == f"shiftbench: error: IMAGE {str(image)!r} {problem}; give one PNG or JPEG image\n"
    Image.fromarray(photo("rocket", (48, 64))).save(tmp_path / "r.png")
    code, _, err = _run(capsys, "corruptions", "preview", str(tmp_path / "r.png"), str(tmp_path / "g.jpg"))
    assert code == 2 and "must end in .png" in err


def test_list_prints_the_19_names(capsys):
    code, stdout, _ = _run(capsys, "corruptions", "list")
    assert code == 0 and stdout.split() == list(CORRUPTIONS)


def test_16_bit_pngs_are_scaled_to_8_bits(tmp_path, capsys):
    """16-bit PNGs (RGB and grey) load as floor(v * 255 / 65535), e.g. 257 k -> k, not wrapped mod 256."""
    import cv2

    import shiftbench.commands.corrupt as command

    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, (40, 52, 3)).astype(np.uint16)
    rgb16[0, :6, 0] = (0, 255, 256, 257 * 100, 65534, 65535)
    grey16 = rng.integers(0, 65536, (36, 44)).astype(np.uint16)
    root = tmp_path / "in"
    root.mkdir()
    cv2.imwrite(str(root / "rgb.png"), rgb16[..., ::-1])  # OpenCV writes BGR
    Image.fromarray(grey16).save(root / "grey.png")
    with Image.open(root / "grey.png") as im:
        assert im.mode == "I;16"
    rgb8 = (rgb16.astype(np.int64) * 255 // 65535).astype(np.uint8)
    grey8 = np.repeat((grey16.astype(np.int64) * 255 // 65535).astype(np.uint8)[..., None], 3, axis=2)
    assert list(rgb8[0, :6, 0]) == [0, 0, 0, 100, 254, 255]
    sources, _ = command.discover(root)
    loaded = {s.rel: command.load(s) for s in sources}
    assert all(t.dtype == torch.uint8 for t in loaded.values())
    assert np.array_equal(loaded["rgb.png"].permute(1, 2, 0).numpy(), rgb8)
    assert np.array_equal(loaded["grey.png"].permute(1, 2, 0).numpy(), grey8)
    out = tmp_path / "out"
    code, _, _ = _run(capsys, "corrupt", str(root), str(out), "--corruption", "contrast", "--severity", "2", "--quiet")
    assert code == 0
    for rel, image in (("rgb.png", rgb8), ("grey.png", grey8)):
        got = np.asarray(Image.open(out / "contrast" / "2" / rel))
        assert np.array_equal(got, _expected(image, rel, "contrast", 2, seed=0)), rel
