"""One error style for every command line of the project.

A mistake the user can fix (a missing file, a flag or config value of the wrong kind, a model
that does not fit the tokenizer) raises `UserError`, whose message names the file, flag or key
and the value expected. `cli_main` turns it into ONE line on stderr, `<prog>: error: ...`,
and exit status 2 (argparse's status for usage errors). `--debug` on the command line, or
BIGLEARN_DEBUG=1 in the environment, lets the exception through so its traceback shows.
Every other exception is a bug or a broken environment and keeps its traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Sequence

DEBUG_FLAG = "--debug"
DEBUG_ENV = "BIGLEARN_DEBUG"
USER_ERROR_STATUS = 2


class UserError(ValueError):
    """A mistake in the user's input; the message names what is wrong and what is expected.

    A ValueError, so callers that already catch ValueError keep working."""


def require(condition: bool, key: str, message: str, value) -> None:
    """UserError "<key> <message>; got <value>" unless `condition`: the one way a config checks a key.
    A NaN or infinite number is named as such first, whatever the check (NaN fails every
    comparison, so a range check alone would blame the range)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key} must be a finite number; got {value!r}")
    if not condition:
        raise UserError(f"{key} {message}; got {value!r}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The --help of every command: descriptions and epilogs as written, and each option's default
    after its help ("(default: ...)"), except where there is none to show (None, False, an empty
    list) or the help text names it already."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        shown = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if (not shown or "default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or action.default == []):
            return text
        return f"{text} (default: %(default)s)"


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Document --debug in a command's --help (cli_main reads it from the command line itself)."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")


def debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def one_line(message) -> str:
    return " ".join(str(message).split())


def cli_main(main: Callable[[list[str]], int | None], prog: str, argv: Sequence[str] | None = None,
             user_errors: tuple[type[BaseException], ...] = (UserError,)) -> int:
    """Run `main(argv)`; a UserError becomes `prog: error: ...` on stderr and exit status 2.
    `user_errors` widens that to other exceptions for a command whose code raises them for bad
    input only (the data pipeline's ValueErrors all name a file, field or flag)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv) or 0
    except user_errors as err:
        if debug_requested(argv):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return USER_ERROR_STATUS
