"""What a writer does around its file: deferred Ctrl-C, temporary names, dead writers' leftovers.

A writer works under a hidden ``.NAME.HOST.PID.RAND.tmp`` until its schema is complete
and then publishes it with ``link(2)`` (:mod:`.writer`); one killed before that leaves the
temp file, which the next writer of the path removes and ``gsnr-stats info`` lists.
"""

from __future__ import annotations

import contextlib
import functools
import glob as _glob
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def defer_sigint() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise ``KeyboardInterrupt``.

    Why: a ``KeyboardInterrupt`` raised between two dataset updates of one write would leave
    the writer's own state and h5py's objects half-updated (and h5py may swallow it in a
    ``__del__``). Only the main thread receives signals, and only Python's default handler
    is replaced: a user's own SIGINT handler is left alone. Nested blocks defer once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        old = signal.getsignal(signal.SIGINT)
    except (ValueError, OSError):
        old = None
    if old is not signal.default_int_handler:
        yield
        return
    hit: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: hit.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if hit:
            raise KeyboardInterrupt


def holds_sigint(fn: Callable[..., T]) -> Callable[..., T]:
    """Run the whole of a writer method with Ctrl-C held (:func:`defer_sigint`).

    Why the whole call and not only its write steps: the h5py objects a call creates and
    drops run Python callbacks as they are freed (weak-reference finalizers), and a
    ``KeyboardInterrupt`` delivered inside one of those is printed and lost, so the writer
    ran on after a Ctrl-C (seen once in a fault campaign's random SIGINTs, on a loaded
    machine). Held for the call, it is raised when the call returns.
    """

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> T:
        with defer_sigint():
            return fn(*args, **kwargs)

    return call


def _tmp_name(path: Path) -> Path:
    host = socket.gethostname().replace(".", "_") or "host"
    return path.with_name(f".{path.name}.{host}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def temp_files(path: str | os.PathLike[str]) -> list[tuple[Path, bool | None]]:
    """Hidden temporary files of writers of ``path``: ``(file, writer alive?)``.

    A writer works under ``.NAME.HOST.PID.RAND.tmp`` until its schema is complete; one
    killed before that leaves the file behind. Liveness is known for this host's writers
    only (``None`` for another host's).
    """
    path = Path(path)
    found: list[tuple[Path, bool | None]] = []
    host = socket.gethostname().replace(".", "_") or "host"
    try:
        entries = sorted(path.parent.glob(_glob.escape(f".{path.name}.") + "*.tmp"))
    except OSError:
        return found
    for p in entries:
        parts = p.name[len(path.name) + 2 : -len(".tmp")].split(".")
        if len(parts) == 3:
            h, pid_s = parts[0], parts[1]
        elif len(parts) == 2:  # v1 name: .NAME.PID.RAND.tmp
            h, pid_s = host, parts[0]
        else:
            continue
        if not pid_s.isdigit():
            continue
        if h != host:
            found.append((p, None))
            continue
        alive = True
        try:
            os.kill(int(pid_s), 0)
        except ProcessLookupError:
            alive = False
        except OSError:
            alive = True
        found.append((p, alive))
    return found


def cleanup_stale_tmp(path: Path) -> list[Path]:
    """Remove hidden temporary files of ``path`` left by writers of this host that died.

    A temp file of another host, or of a process still alive, is left alone.
    """
    removed: list[Path] = []
    for p, alive in temp_files(path):
        if alive is False:
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed
