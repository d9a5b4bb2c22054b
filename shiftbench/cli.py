"""Command line: ``shiftbench <command> ...`` and ``python -m shiftbench <command> ...``.

Commands live in :mod:`shiftbench.commands`, one module each, registered in
:data:`COMMANDS`. A module provides ``add_arguments(parser)`` and ``main(args) -> int``
and imports its heavy dependencies inside ``main``. Any :class:`ShiftbenchError`
(or the corruptions package's ``CorruptionError``), and any file-system error (a path that
cannot be created, read or written), becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from shiftbench.errors import ShiftbenchError, Terminated, one_line

#: command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("shiftbench.commands.run", "sweep a suite: clean + corruptions x severities through every model"),
    "train": ("shiftbench.commands.train", "train the experts, the baseline and the gates of a suite"),
    "data": ("shiftbench.commands.data", "write synthetic street scenes in the A2D2 or Cityscapes on-disk format"),
    "corrupt": ("shiftbench.commands.corrupt", "corrupt an image or a folder tree into OUT/<corruption>/<severity>/"),
    "corruptions": ("shiftbench.commands.corruptions", "list the 19 corruptions, or preview them as a 19 x 5 grid"),
    "report": ("shiftbench.commands.report", "figures and tables (Markdown, LaTeX, HTML) from a run directory"),
    "check": ("shiftbench.commands.check", "compare a run's calibration with a stored baseline (CI gate)"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {one_line(self._with_choices(message))}\n")

    def _with_choices(self, message: str) -> str:
        """A missing sub-command names its choices, as a mistyped one does."""
        head = "the following arguments are required: "
        if not message.startswith(head):
            return message
        choices = {a.metavar or a.dest: a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)}
        names = [f"{n} (choose from {', '.join(map(repr, choices[n]))})" if n in choices else n
                 for n in message[len(head):].split(", ")]
        return head + ", ".join(names)


def build_parser() -> argparse.ArgumentParser:
    from shiftbench import __version__

    parser = _Parser(prog="shiftbench", description="Does a segmentation model still know when it is wrong under "
                     "image corruptions? Sweep corruptions through models, measure uncertainty and calibration, "
                     "report and gate. `shiftbench COMMAND --help` for each command.")
    parser.add_argument("--version", action="version", version=f"shiftbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # command not built yet
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        cmd.set_defaults(_main=module.main)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ShiftbenchError]
    try:
        from corruptions import CorruptionError

        errors.append(CorruptionError)
    except ImportError:
        pass
    return tuple(errors)


_FULL = "free some space and run the same command again (what finished is kept)"
#: what to do about an OSError, by errno, where the default advice about paths would mislead
_OS_HINTS = {errno.ENOSPC: _FULL, errno.EDQUOT: _FULL,
             errno.EEXIST: "a file stands where a folder is needed; give another path or move the file",
             errno.ENOTDIR: "a file stands where a folder is needed; give another path or move the file",
             errno.EISDIR: "a folder stands where a file is needed; give a file name"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except _user_errors() as exc:
        print(f"shiftbench: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system said no: a path that cannot be created, read or written
        where = f" {exc.filename!r}" if exc.filename else ""
        hint = _OS_HINTS.get(exc.errno, "check the paths given (input folders must be readable, "
                                        "output folders creatable and writable)")
        print(f"shiftbench: error: cannot use{where}: {exc.strerror or one_line(exc)}; {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM during a run (errors.Terminated)
        terminated = isinstance(exc, Terminated)
        print(f"shiftbench: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return Terminated.exit_code if terminated else 130


if __name__ == "__main__":
    raise SystemExit(main())
