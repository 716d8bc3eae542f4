"""Entry point of the ``appliance`` binary built by PyInstaller (packaging/appliance.spec).

A frozen binary has no ``python`` next to it: ``sys.executable`` is the binary itself. Two parts
of appliance start children through ``sys.executable``, so this entry point speaks both
dialects before handing over to the CLI:

- multiprocessing *spawn* children (the serve worker) re-run the executable with
  multiprocessing's own arguments; ``freeze_support()`` (patched for POSIX by PyInstaller's
  runtime hook) recognises them and runs the child instead of the CLI.
- ``python -m appliance.MODULE ARGS...`` (the doctor's crash-isolated llama.cpp child): run that
  module as ``__main__``. Only modules of the appliance package are accepted, so the binary is
  not a general Python interpreter.
"""

from __future__ import annotations

import multiprocessing
import runpy
import sys

MODULE_FLAG = "-m"
ALLOWED_PREFIX = "appliance."


def main() -> None:
    multiprocessing.freeze_support()
    argv = sys.argv
    if len(argv) >= 3 and argv[1] == MODULE_FLAG and argv[2].startswith(ALLOWED_PREFIX):
        module = argv[2]
        sys.argv = [module, *argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    from appliance.cli.main import entry

    entry()


if __name__ == "__main__":
    main()
