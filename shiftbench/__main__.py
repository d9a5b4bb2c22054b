"""``python -m shiftbench``: the command line, or one line when a dependency is missing from this Python
(the usual cause: the system ``python`` run from the checkout instead of the project's ``.venv``)."""

import sys

try:
    from shiftbench.cli import main

    code = main()
except ModuleNotFoundError as exc:
    if exc.name is None or exc.name.split(".")[0] in ("shiftbench", "corruptions"):
        raise  # our own code is broken: that is a bug, keep its traceback
    print(f"shiftbench: error: this Python ({sys.executable}) lacks the package {exc.name.split('.')[0]!r}; run "
          "shiftbench with the environment `make demo` or `make test` creates (.venv/bin/python -m shiftbench ..., "
          "or `source .venv/bin/activate` first), or `pip install -e .` into yours", file=sys.stderr)
    code = 2
raise SystemExit(code)
