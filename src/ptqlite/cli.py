"""Command line: converter_lite-style flags (`--fmk=ONNX --modelFile=M --outputFile=O --configFile=C`).

`ptqlite convert ...` and `ptqlite ...` (no subcommand) both convert. Errors a user can cause print one line and
exit 2; a failure while converting exits 1.
"""

from __future__ import annotations

import argparse
import difflib
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
    """Errors in the one-line style; records its flags, so an unknown one can be named with a suggestion."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--verify` must not silently mean `--verifyFloor`
        self.flags: list[str] = []  # before argparse adds -h
        self.commands: dict[str, _Parser] = {}  # subcommand parsers, by name
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        self.flags += [n for n in names if n.startswith("-")]
        return super().add_argument(*names, **kwargs)

    def error(self, message: str):  # argparse exits 2 too; keep the one-line style
        raise UsageError(f"{self.prog}: {message}")


# Flags of every command, taken out of the command line wherever they stand (before or after the subcommand).
VERBOSE_FLAGS = {"--verbose": 1, "-v": 1, "-vv": 2, "-vvv": 3}
_VERBOSE_HELP = "log what each stage decided (-vv: everything)"


def build_parser() -> _Parser:
    parser = _Parser(prog="ptqlite", description="Post-training quantization of ONNX models.")
    parser.add_argument("--verbose", "-v", action="count", default=0, help=_VERBOSE_HELP)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, module in COMMANDS.items():
        command = sub.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        command.add_argument("--verbose", "-v", action="count", default=0, help=_VERBOSE_HELP)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
        parser.commands[name] = command
    return parser


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from . import __version__

    try:
        return installed("ptqlite")
    except PackageNotFoundError:  # run from a source tree (PYTHONPATH=src)
        return __version__


def split_global_flags(argv: list[str]) -> tuple[list[str], int, bool]:
    """The command line without -v/-vv/--verbose/--version (wherever they stand), the verbosity, --version."""
    rest, verbosity, show_version = [], 0, False
    for arg in argv:
        if arg in VERBOSE_FLAGS:
            verbosity += VERBOSE_FLAGS[arg]
        elif arg == "--version":
            show_version = True
        else:
            rest.append(arg)
    return rest, verbosity, show_version


def unknown_flag(parser: _Parser, argv: list[str]) -> str | None:
    """One sentence for the first flag in `argv` that `parser` does not know, with the nearest known flag."""
    known = parser.flags + ["--help", "-h"]
    for arg in argv:
        if not arg.startswith("-") or arg[1:2].isdigit() or arg == "-":  # a value (a negative number, stdin)
            continue
        name = arg.split("=", 1)[0]
        if name in known:
            continue
        same_case = [flag for flag in known if flag.lower() == name.lower()]
        near = same_case or difflib.get_close_matches(name, known, n=1, cutoff=0.7)
        hint = f"; did you mean {near[0]}?" if near else f"; expected one of {', '.join(f for f in parser.flags if f.startswith('--'))}"
        return f"unknown flag {name} for {parser.prog}{hint}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv, verbosity, show_version = split_global_flags(list(sys.argv[1:] if argv is None else argv))
    if show_version:
        print(f"ptqlite {version()}")
        return 0
    if not argv:
        build_parser().print_help(sys.stderr)
        return 2
    # converter_lite command lines have no subcommand: treat bare flags as `convert`.
    if argv[0].startswith("--") and argv[0] != "--help":
        argv.insert(0, "convert")
    logger = logging.getLogger("ptqlite")
    level = logger.level
    logging.basicConfig(level=logging.WARNING, format="ptqlite: %(levelname)s: %(message)s", stream=sys.stderr)
    logger.setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG))
    previous = _raise_on_sigterm()
    try:
        parser = build_parser()
        if argv[0] in COMMANDS:
            problem = unknown_flag(parser.commands[argv[0]], argv[1:])
            if problem:
                raise UsageError(problem)
        elif not argv[0].startswith("-"):
            near = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
            hint = f"did you mean {near[0]}?" if near else "expected one of " + ", ".join(COMMANDS)
            raise UsageError(f"unknown subcommand '{argv[0]}'; {hint}")
        args = parser.parse_args(argv)
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
        logger.setLevel(level)
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
