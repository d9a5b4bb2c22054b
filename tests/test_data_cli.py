"""``shiftbench data synth``: writes both formats; bad input is one line on stderr and exit 2."""

from __future__ import annotations

import pytest

from shiftbench import cli


def test_synth_writes_the_requested_tree(tmp_path, capsys):
    out = tmp_path / "cs"
    rc = cli.main(["data", "synth", str(out), "--format", "cityscapes", "--domain", "ambiguous", "--count", "2",
                   "--seed", "1", "--size", "32x48", "--quiet"])
    assert rc == 0
    assert "wrote 2 cityscapes scenes" in capsys.readouterr().out
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == [f"{tree}/test/ambiguous/ambiguous_000002_00000{i}_{suffix}.png"
                     for tree, suffix in (("gtFine", "gtFine_labelIds"), ("leftImg8bit", "leftImg8bit"))
                     for i in range(2)]


def test_synth_a2d2_all_domains(tmp_path):
    out = tmp_path / "a2d2"
    assert cli.main(["data", "synth", str(out), "--format", "a2d2", "--count", "1", "--size", "32x32", "--quiet"]) == 0
    assert len(list(out.rglob("*_camera_frontcenter_*.png"))) == 7  # 3 + 3 + 1 (domain, split) pairs
    assert (out / "class_list.json").is_file() and (out / "split" / "ambiguous_test_gt.txt").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--format", "kitti"], "format 'kitti' is not one of a2d2, cityscapes"),
    (["--format", "a2d2", "--domain", "rural"], "--domain 'rural' is not one of highway, urban, ambiguous, all"),
    (["--format", "a2d2", "--size", "big"], "--size 'big' is not HxW, e.g. 128x256"),
    (["--format", "a2d2", "--size", "8x8"], "synthetic size (8, 8) is not (H, W) with integers 16..8192"),
    (["--format", "a2d2", "--size", "100000x100000"], "synthetic size (100000, 100000) is not (H, W) with integers 16..8192"),
    (["--format", "a2d2", "--count", "0"], "count 0 is not a positive integer"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    rc = cli.main(["data", "synth", str(tmp_path / "out"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"shiftbench: error: {message}\n"
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_out_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert cli.main(["data", "synth", str(tmp_path / "f"), "--format", "a2d2", "--quiet"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err



def test_out_must_be_new_or_empty(tmp_path, capsys):
    """A second export into the same folder would mix two trees (other sizes, seeds or domains)."""
    out = tmp_path / "cs"
    args = ["data", "synth", str(out), "--format", "cityscapes", "--domain", "urban", "--count", "1", "--quiet"]
    assert cli.main(args) == 0
    before = sorted(out.rglob("*"))
    assert cli.main([*args, "--seed", "5", "--size", "64x128"]) == 2
    assert capsys.readouterr().err == f"shiftbench: error: {out}: exists and is not empty; write the tree into a new or empty folder\n"
    assert sorted(out.rglob("*")) == before
    assert cli.main(["data", "synth", "", "--format", "a2d2", "--quiet"]) == 2
    assert "output folder: empty path" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main([*args[:2], str(tmp_path / "empty"), *args[3:]]) == 0
