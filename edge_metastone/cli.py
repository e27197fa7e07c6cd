"""`edge-metastone <command>`: parse, dispatch, and turn every error into one line and an exit code.

Exit codes: 0 success, 1 an error (one line on stderr; `-v` adds the traceback of an unexpected
one), 2 bad usage (argparse), 130 interrupted (Ctrl-C, at any moment: the commands are imported
inside the handling), 141 stdout closed early (`... | head -1`).
"""

from __future__ import annotations

import os
import signal
import sys

TYPE_CHECKING = False  # not `typing`'s: nothing but os and sys before main()'s handling starts
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_PIPE = 141  # 128 + SIGPIPE, what a C program closed by `| head` reports

_early_interrupt = False


def _defer_interrupt(signum: int, frame: object) -> None:
    # a Ctrl-C between this module's import and main()'s `try`: main() acts on it
    global _early_interrupt
    _early_interrupt = True


def _is_entry_point() -> bool:
    """This process is `edge-metastone` (console script or `python -m edge_metastone[.cli]`)."""
    argv0 = sys.argv[0] if sys.argv else ""
    return os.path.basename(argv0) == "edge-metastone" or argv0.endswith(
        (os.path.join("edge_metastone", "__main__.py"), os.path.join("edge_metastone", "cli.py"))
    )


# Only when run as the command: a program that imports this module keeps its own Ctrl-C.
if _is_entry_point() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _defer_interrupt)


def _version() -> str:
    from edge_metastone import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per command module (imports every command)."""
    import argparse

    from edge_metastone.commands import (
        batch,
        calibrate,
        convert,
        doctor,
        inspect,
        reason,
        score,
        serve,
        train_sprm,
    )

    parser = argparse.ArgumentParser(
        prog="edge-metastone",
        description="Reflective generative models (MetaStone-S1) on ordinary machines.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (convert, inspect, score, reason, batch, train_sprm, serve, calibrate, doctor):
        module.add_parser(sub)
    for command_parser in sub.choices.values():  # `-v` after the command as well
        command_parser.add_argument(
            "-v",
            "--verbose",
            dest="verbose_after",
            action="count",
            default=0,
            help="more log output",
        )
    return parser


def _configure(args: argparse.Namespace) -> int:
    """Logging and the process-wide settings the flags ask for; returns the verbosity."""
    import logging

    verbose = args.verbose + getattr(args, "verbose_after", 0)
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:  # llama.cpp's own messages only with -v: errors are our one line
        logging.getLogger("llama_cpp.native").setLevel(logging.CRITICAL)
    elif verbose == 1:
        logging.getLogger("llama_cpp.native").setLevel(logging.ERROR)
    return verbose


def _stdout_closed() -> int:
    # Python's documented recipe (library/signal.html, "Note on SIGPIPE"): point stdout at
    # devnull so the interpreter's final flush cannot raise "Exception ignored ... BrokenPipeError"
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_PIPE


def _run(argv: Sequence[str] | None, state: dict) -> int:
    from edge_metastone.errors import EdgeMetastoneError

    args = build_parser().parse_args(argv)
    state["command"] = args.command
    state["verbose"] = _configure(args)
    try:
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return code
    except EdgeMetastoneError as e:
        print(f"edge-metastone {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    state: dict = {"command": None, "verbose": 0}
    # everything, the commands' imports included, runs inside this handling: a Ctrl-C or a
    # closed pipe at any moment is a quiet exit code, never a traceback
    try:
        if signal.getsignal(signal.SIGINT) is _defer_interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if _early_interrupt:
            raise KeyboardInterrupt
        return _run(argv, state)
    except KeyboardInterrupt:
        name = f"edge-metastone {state['command']}" if state["command"] else "edge-metastone"
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _stdout_closed()
    except SystemExit:  # argparse's --help, --version and usage errors meet a closed pipe too
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_closed()
        raise
    except Exception as e:  # an unexpected error: one line, the traceback with -v
        name = f"edge-metastone {state['command']}" if state["command"] else "edge-metastone"
        if state["verbose"]:
            import traceback

            traceback.print_exc(file=sys.stderr)
        detail = " ".join(str(e).split())[:500] or "(no message)"
        hint = "" if state["verbose"] else " (run with -v for the traceback)"
        print(f"{name}: internal error: {type(e).__name__}: {detail}{hint}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
