"""Errors a user sees as one line, and the checks of numbers they give or files hold.

Nothing here imports another module of this project.
"""
import contextlib
import math
import os
import re
import sys


class UserError(Exception):
    """Bad input, or a state the user must fix. The message is the one line they see."""
class Diverged(UserError):
    pass


def first_line(e):
    """An exception's message cut to its first line (libraries raise pages), else its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def printable(text):
    """Text from outside (a file name, a field of a file, a request line) safe to print on one line of
    any terminal or log: bytes that are not UTF-8 as \\xff, control characters (a newline, an escape
    sequence that would retitle a window or clear the screen) as \\x1b. The one way user-supplied text
    is printed."""
    text = os.fsencode(text).decode("utf-8", "backslashreplace") if isinstance(text, str) else str(text)
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: f"\\x{ord(m[0]):02x}", text)


def error_line(e):
    """The one line a user sees for an error, printable whatever file names it holds."""
    if isinstance(e, OSError) and not isinstance(e, UserError):
        return printable(f"error: {e.strerror or e}" + (f": {os.fsdecode(e.filename)}" if e.filename else ""))
    return "error: " + printable(first_line(e))


@contextlib.contextmanager
def one_line_errors(interrupted="interrupted"):
    """Every script's main runs inside this: a UserError or OSError becomes one 'error: ...' line and
    exit 1; Ctrl-C becomes one line and exit 130. Anything else is a bug and keeps its traceback."""
    try:
        yield
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    except (UserError, OSError) as e:
        sys.exit(error_line(e))


def check_at_least(args, minimum, *flags):
    """One-line error for an integer option (None: not given) below `minimum`."""
    for flag in flags:
        v = getattr(args, flag)
        if v is not None and v < minimum:
            raise UserError(f"--{flag.replace('_', '-')} must be at least {minimum}, got {v}")


FLOAT32_MAX = 3.4028234663852886e38


def check_positive(args, *flags):
    for flag in flags:
        v = getattr(args, flag)
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise UserError(f"--{flag.replace('_', '-')} must be a positive number, got {v}")
        if v is not None and v > FLOAT32_MAX:  # torch keeps it in float32 tensors: 1e300 would not fit
            raise UserError(f"--{flag.replace('_', '-')} must be at most {FLOAT32_MAX:.4g} (float32's largest), got {v}")


def is_number(v):
    """A real, finite int or float (not a bool): what a figure read from a file must be."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
