"""``brainfuse <command> …``: one entry point; each stage module owns its arguments.

Stage modules are imported only when their command runs (``import ants`` alone costs seconds).
"""
from __future__ import annotations

import importlib
import sys

# command -> module exposing ``cli(argv) -> int | None``
COMMANDS = {
    "demo": "brainfuse.demo",
    "convert": "brainfuse.convert",
    "templates": "brainfuse.templates",
    "anat": "brainfuse.anat",
    "dwi": "brainfuse.dwi",
    "func": "brainfuse.func",
    "tensors": "brainfuse.tensors",
    "train": "brainfuse.train",
    "evaluate": "brainfuse.evaluate",
    "predict": "brainfuse.predict",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: brainfuse <command> [options]\n\ncommands:\n" +
              "\n".join(f"  {name}" for name in COMMANDS) +
              "\n\nRun `brainfuse <command> --help` for a command's options.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"brainfuse: unknown command {command!r} (known: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command]).cli(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
