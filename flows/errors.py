"""User errors: mistakes in what a person asked for, reported as one line ``error: …`` with exit code 2.

Why a class of its own: the CLI must tell "you asked for something that cannot be" (a bad cron, an
unknown key, a checkpoint that does not exist, an unknown stage) from a failure of the pipeline (a
shard that raised, a crashed trainer, exit 1) and from a bug (a traceback). Anything raising
:class:`UserError` — or a subclass such as :class:`~shardflow.flows.config.ConfigError` — before the
Prefect API starts is printed as one readable line, without a traceback, by
:func:`report_user_error`; the checks that can be made up front are made before any server starts,
so the answer comes in well under a second.

Lower layers (dataprep, train) never import this module; the CLI converts their exceptions where it
knows that they mean a user mistake (see :func:`user_error_from`).
"""
from __future__ import annotations

import sys
from typing import TextIO

EXIT_USER_ERROR = 2
"""Exit status of a user error (argparse uses the same for bad arguments)."""


class UserError(ValueError):
    """What the user asked for cannot be done as asked; the message says why, naming the file or value."""


def one_line(message: str) -> str:
    """A message folded onto one line: later lines (indented details) are joined with '; '."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return "unknown error"
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    sep = " " if head.endswith(":") else ": "
    return head + sep + "; ".join(rest)


def report_user_error(exc: BaseException, stream: TextIO | None = None) -> int:
    """Print ``error: <one line>`` to stderr; return the exit status for it (2)."""
    print(f"error: {one_line(str(exc))}", file=stream or sys.stderr)
    return EXIT_USER_ERROR


def user_error_from(exc: BaseException, prefix: str = "") -> UserError:
    """Wrap an exception of a lower layer that is known to mean a user mistake (keeps its message)."""
    msg = str(exc) or type(exc).__name__
    return UserError(f"{prefix}{msg}" if prefix else msg)
