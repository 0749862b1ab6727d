"""Tie a child process's life to its parent's: the kernel sends it SIGTERM when the parent dies.

Children that run in their own session (so that a terminal's Ctrl-C reaches only the parent,
which then stops them in order) would otherwise outlive a parent killed outright (SIGKILL, OOM).
Linux only (PR_SET_PDEATHSIG); elsewhere it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal

_PR_SET_PDEATHSIG = 1


def _libc():
    with contextlib.suppress(OSError):
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return None


# Resolved here, in the parent: find_library runs `ldconfig -p`, which a preexec_fn (a forked child
# of a possibly threaded process, before exec) must not do.
_LIBC = _libc()


def term_on_parent_death() -> None:
    """Ask for SIGTERM when the parent dies (usable as subprocess's ``preexec_fn``)."""
    with contextlib.suppress(AttributeError):  # no libc, or no prctl (not Linux)
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def die_with_parent(parent: int) -> None:
    """term_on_parent_death, then exit at once if ``parent`` already died before the request took effect."""
    term_on_parent_death()
    if os.getppid() != parent:
        raise SystemExit(1)
