"""What every command-line tool of the project shares: a parser whose errors are one line,
and one wrapper that maps the error family to exit codes.

    0 success; 1 the work failed (any SdcError, an OS error, memory); 2 a usage error (the
    parser's, or SdcUsageError); 130 interrupted.  Errors and warnings are one line on stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable

from .errors import SdcError, SdcUsageError


class ToolParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog.split()[0]}: error: {message}\n")
        sys.exit(2)


def run_tool(prog: str, work: Callable[[], int | None]) -> int:
    """Run ``work`` (a parsed command) and turn whatever it raises into one line and an exit code."""

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(f"{prog}: warning: {message}\n")

    warnings.showwarning = one_line_warning
    try:
        return work() or 0
    except SdcUsageError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 2
    except SdcError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except BrokenPipeError:  # the reader went away (| head): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except MemoryError:
        sys.stderr.write(f"{prog}: error: out of memory\n")
        return 1
    except OSError as exc:  # a file that is missing, unreadable or unwritable
        where = f": {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"{prog}: error: {exc.strerror or exc}{where}\n")
        return 1
