"""User-facing errors.

A :class:`ShiftbenchError` carries one line that says what was wrong and what is
allowed. The CLI prints it as ``shiftbench: error: <message>`` and exits with 2,
without a traceback. It subclasses ``ValueError`` so library callers can catch it
the usual way.
"""

from __future__ import annotations


class ShiftbenchError(ValueError):
    """A bad input: the message names the thing, what was given and what is allowed."""

    exit_code = 2


def one_line(message: str) -> str:
    """Collapse a message to a single line (the CLI's contract)."""
    return " ".join(str(message).split())
