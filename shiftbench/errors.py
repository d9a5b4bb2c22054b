"""User-facing errors.

A :class:`ShiftbenchError` carries one line that says what was wrong and what is
allowed. The CLI prints it as ``shiftbench: error: <message>`` and exits with 2,
without a traceback. It subclasses ``ValueError`` so library callers can catch it
the usual way.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any


#: the largest image side a suite or the synthetic generator accepts (A2D2 is 1208x1920, Cityscapes 1024x2048)
MAX_SIDE = 8192


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system's stop or time limit, ``kill``, torchrun passing one on) ended a run: handled as
    an interrupt (the finished conditions are kept), exit code 143."""

    exit_code = 143


class ShiftbenchError(ValueError):
    """A bad input: the message names the thing, what was given and what is allowed."""

    exit_code = 2


def file_error(path: str | os.PathLike, reason: str) -> ShiftbenchError:
    """A ShiftbenchError ``"<path>: <reason>"`` about one file, keeping both parts as ``.path`` and ``.reason``
    (the runner records a skipped image as {file, reason}); attributes, so that it pickles as any exception."""
    exc = ShiftbenchError(f"{path}: {reason}")
    exc.path, exc.reason = os.fspath(path), reason
    return exc


def is_int(value: Any) -> bool:
    """An integer, Python's or numpy's (``np.int64`` from ``np.arange`` or a DataFrame), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number, Python's or numpy's (ints included), but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_unit_range(value: Any) -> bool:
    """A pair (lo, hi) of real numbers with 0 <= lo < hi <= 1 (a tuple or a list, as YAML gives it)."""
    return (isinstance(value, (tuple, list)) and len(value) == 2 and all(is_real(v) for v in value)
            and 0 <= value[0] < value[1] <= 1)


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a file ("not found", "is a folder, not a file"), or None if it can."""
    path = Path(path)
    if path.is_dir():
        return "is a folder, not a file"
    return None if path.is_file() else "not found"


def comma_items(text: str, option: str, expected: str) -> list[str]:
    """The stripped items of a comma-separated option value. An empty value or an empty item ("1,,3", "fog,")
    is refused, naming ``option`` and what is ``expected``: it is a typo more often than a wish."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ShiftbenchError(f"{option}: {text!r} is empty; give {expected}")
    if not all(items):
        raise ShiftbenchError(f"{option}: {text!r} has an empty item (two commas in a row, or one at an end); "
                              f"give {expected}")
    return items


def one_line(message: str) -> str:
    """Collapse a message to a single line (the CLI's contract)."""
    return " ".join(str(message).split())


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun`` in agreement: ``1 table``, ``2 tables``, ``0 tables``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
