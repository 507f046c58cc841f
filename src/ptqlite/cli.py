"""Command line: converter_lite-style flags (`--fmk=ONNX --modelFile=M --outputFile=O --configFile=C`).

`ptqlite convert ...` and `ptqlite ...` (no subcommand) both convert. Errors a user can cause print one line and
exit 2; a failure while converting exits 1.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Protocol

from . import analyze, bench, cli_convert
from .errors import PtqError, UsageError

log = logging.getLogger("ptqlite")


class Command(Protocol):
    """A subcommand module: its docstring's first line is the help line."""

    __doc__: str | None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


COMMANDS: dict[str, Command] = {
    "convert": cli_convert,
    "benchmark": bench,
    "analyze": analyze,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 too; keep the one-line style
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ptqlite", description="Post-training quantization of ONNX models.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log details of every step")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, module in COMMANDS.items():
        command = sub.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        build_parser().print_help(sys.stderr)
        return 2
    # converter_lite command lines have no subcommand: treat bare flags as `convert`.
    if argv[0].startswith("--") and argv[0] not in ("--help", "--verbose"):
        argv.insert(0, "convert")
    logging.basicConfig(level=logging.INFO if "--verbose" in argv or "-v" in argv else logging.WARNING,
                        format="ptqlite: %(levelname)s: %(message)s", stream=sys.stderr)
    previous = _raise_on_sigterm()
    try:
        args = build_parser().parse_args(argv)
        if not getattr(args, "handler", None):
            raise UsageError("expected a subcommand: " + ", ".join(COMMANDS))
        return int(args.handler(args) or 0)
    except PtqError as exc:
        print(f"ptqlite: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ptqlite: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("ptqlite: terminated; nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally` on the way out removes its temp files."""


def _terminate(signum, frame):
    raise Terminated


def _raise_on_sigterm():
    """Install the SIGTERM handler; returns the previous one (None when signals cannot be set here)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGTERM, _terminate)
    return signal.SIG_DFL if previous is None else previous


if __name__ == "__main__":
    sys.exit(main())
