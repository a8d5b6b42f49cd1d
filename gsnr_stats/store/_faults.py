"""Fault injection for the crash tests: a hook the writer calls before every step of a write.

The writer calls :func:`point` with a short label (``"grads.resize"``, ``"loss.write"``,
``"records.crc"``, ``"flush"``, ``"grads.pwrite"``, ...) before each HDF5 dataset resize or
write, each flush and each chunk ``pwritev``. A test installs a hook that raises at the k-th
call to simulate a failure at that exact point (the way SQLite's test harness fails the k-th
I/O call). No hook is installed in normal use; the call then costs one global lookup.
"""

from __future__ import annotations

from collections.abc import Callable

_hook: Callable[[str], None] | None = None


def set_hook(fn: Callable[[str], None] | None) -> None:
    """Install ``fn(label)`` (or remove it with ``None``)."""
    global _hook
    _hook = fn


def point(label: str) -> None:
    """Called by the writer before each write step; runs the hook if one is installed."""
    if _hook is not None:
        _hook(label)
