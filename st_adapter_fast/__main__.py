"""Command line: ``python -m st_adapter_fast {verify,bench,train-demo} ...``.

Each subcommand lives in its own module exposing ``main(argv) -> int``; imported on use so one
command's dependencies (matplotlib, timm, ...) never slow or break another.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "verify": ("st_adapter_fast.verify", "parity of every available backend against the float64 reference"),
    "bench": ("st_adapter_fast.bench.cli", "op-level and end-to-end benchmarks, written to ./bench-results/"),
    "train-demo": ("st_adapter_fast.demo", "synthetic video task showing adapters learn temporal order"),
}


def _usage() -> str:
    lines = ["usage: python -m st_adapter_fast COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n'python -m st_adapter_fast COMMAND --help' shows a command's options.")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
