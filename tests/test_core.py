import subprocess
import sys

import pytest

from shiftbench import io
from shiftbench.cli import main
from shiftbench.seeding import corruption_seeds, key, model_seeds, sample_seeds


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "out.json"
    io.write_json(target, {"x": 1})
    io.write_json(target, {"x": 2})
    assert target.read_text().strip().endswith("}")
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_atomic_write_on_error_keeps_old_file(tmp_path):
    target = tmp_path / "out.txt"
    io.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]



def test_atomic_write_syncs_the_bytes_before_the_rename(tmp_path, monkeypatch):
    """fsync of the temporary file, then the rename: after a power cut the target is the old file or the new one,
    never an empty one."""
    import os

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("names the synced file by /proc/self/fd")
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(io.os, "fsync", lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(io.os, "replace", lambda a, b: calls.append(("replace", str(a))) or replace(a, b))
    io.write_text(tmp_path / "out.txt", "new")
    assert [c[0] for c in calls] == ["fsync", "replace"] and calls[0][1] == calls[1][1] != str(tmp_path / "out.txt")


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    io.write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == plain.stat().st_mode


_SIZE_LIMITED = """
import resource, signal, sys, torch
from shiftbench import io
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as a full disk would
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    io.torch_save({"counts": torch.zeros(10_000, dtype=torch.int64)}, sys.argv[1])
except BaseException as exc:
    print(type(exc).__name__, getattr(exc, "errno", None), getattr(exc, "filename", None))
"""


def test_a_failed_write_is_an_oserror_naming_the_file_and_leaves_nothing(tmp_path):
    """torch.save's own writer reports a failed write (full disk, file-size limit) as an opaque RuntimeError
    ("unexpected pos"); torch_save must raise the OSError, named after the target, like every other write."""
    import errno

    target = tmp_path / "states" / "0.pt"
    out = subprocess.run([sys.executable, "-c", _SIZE_LIMITED, str(target)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["OSError", str(errno.EFBIG), str(target)]
    assert list(target.parent.iterdir()) == []


def test_an_oserror_without_a_file_name_gets_the_target_s(tmp_path, monkeypatch):
    import errno
    import pathlib

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    with pytest.raises(OSError) as info:
        io.write_bytes(tmp_path / "x.bin", b"data")
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(tmp_path / "x.bin"))
    assert list(tmp_path.iterdir()) == []


def test_keys_are_stable_and_distinct():
    assert key(0, "a") == key(0, "a")
    assert key(0, "a") != key(1, "a") != key(0, "b")
    assert 0 <= key("x") < 2**63
    s = sample_seeds(3, ["img1", "img2"])
    assert s.tolist() == [key(3, "img1"), key(3, "img2")]
    # pinned: a changed key changes every run's noise and masks, so old run folders could not be resumed alike
    assert key(0, "a") == 6539243125055167529  # little-endian BLAKE2b-64 of "0\x1fa", top bit cleared
    assert key(1, "23") != key(12, "3")  # the separator keeps parts apart
    sid = "highway/test/000000"
    assert corruption_seeds(0, [sid]).tolist() == [3038636524560774152] and model_seeds(0, [sid]) == [5944847332916741505]


def test_cli_usage_error_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice" in err


@pytest.mark.parametrize("argv, expected", [
    ([], "shiftbench: error: the following arguments are required: COMMAND (choose from 'run', 'train', 'data', "
         "'corrupt', 'corruptions', 'report', 'check')"),
    (["corruptions"], "shiftbench corruptions: error: the following arguments are required: ACTION "
                      "(choose from 'preview', 'list')"),
    (["report"], "shiftbench report: error: the following arguments are required: RUN_DIR"),
])
def test_a_missing_command_names_the_choices(capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and capsys.readouterr().err == expected + "\n"


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "shiftbench", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("shiftbench ")


@pytest.mark.parametrize("missing", ["torch", "yaml"])
def test_python_dash_m_without_a_dependency_is_one_line_exit_2(missing):
    """The system python run from the checkout (not the .venv) fails its first heavy import: one line naming the
    package and the environment to use, not a traceback. Simulated by hiding the package from the import system."""
    code = ("import runpy, sys; sys.modules[sys.argv[1]] = None; sys.argv = ['shiftbench', 'run', 'suites/demo.yaml']; "
            "runpy.run_module('shiftbench', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code, missing], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and f"lacks the package {missing!r}" in out.stderr and ".venv" in out.stderr


def test_help_lists_every_command_in_plain_words(capsys):
    """`shiftbench --help` and each command's: exit 0, every command listed, no reST markup (``...``) shown."""
    from shiftbench.cli import COMMANDS

    texts = []
    for argv in (["--help"], *([name, "--help"] for name in COMMANDS)):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        texts.append(capsys.readouterr().out)
    assert all(name in texts[0] for name in COMMANDS)
    assert not [t for t in texts if "``" in t or ":mod:" in t or ":func:" in t]
