"""Framework-free helpers shared by the adapters.

Nothing here imports torch or jax: a background writer thread that overlaps writing with
computing, a progress bar, batching of in-memory arrays, the OSGR probe loop and its result
type, and small validation helpers. The frameworks' modules supply the arithmetic.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gsnr_stats.errors import AdapterError

__all__ = [
    "AsyncWriter",
    "ProbeResult",
    "RecordSummary",
    "array_batches",
    "check_layout_matches",
    "progress_bar",
    "run_probe",
]


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class RecordSummary:
    """What a recorder wrote for one record ``(step, split)``.

    Attributes
    ----------
    step, split : int, str
        The record.
    n_samples : int
        Number of samples written.
    mean_loss : float
        Mean of the per-sample losses written, :math:`\\frac{1}{N}\\sum_i \\ell_i`.
    lr, epoch : float
        Learning rate and epoch stored with the record (NaN if unknown).
    """

    step: int
    split: str
    n_samples: int
    mean_loss: float
    lr: float = math.nan
    epoch: float = math.nan


@dataclass
class ProbeResult:
    """OSGR probe rows at one checkpoint (DESIGN.md section 1, "OSGR, measured", 2).

    For each draw ``k`` the mean loss on ``D_k`` (pool A, "train") and ``D'_k`` (pool B,
    "test") before and after the virtual step :math:`\\theta' = \\theta - \\lambda
    \\nabla L[D_k]`.

    Attributes
    ----------
    step, n : int
        Checkpoint and the size ``n`` of ``D_k`` and ``D'_k``.
    lr : float
        The virtual step's learning rate :math:`\\lambda`.
    k, train_before, train_after, test_before, test_after : ndarray, shape (K,)
        One entry per draw.
    """

    step: int
    n: int
    lr: float
    k: np.ndarray
    train_before: np.ndarray
    train_after: np.ndarray
    test_before: np.ndarray
    test_after: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Measured one-step generalization ratio.

        .. math:: R = \\frac{\\sum_k \\Delta L[D'_k]}{\\sum_k \\Delta L[D_k]},
                  \\quad \\Delta L[D] = L_D(\\theta) - L_D(\\theta')
        """
        num = float(np.sum(self.test_before - self.test_after))
        den = float(np.sum(self.train_before - self.train_after))
        return num / den if den != 0 else math.nan

    def as_dict(self) -> dict[str, np.ndarray]:
        """The rows as 1-D arrays, keyed like ``GradientStore.probes()``."""
        K = self.k.size
        return {
            "step": np.full(K, self.step, dtype=np.int64),
            "n": np.full(K, self.n, dtype=np.int64),
            "lr": np.full(K, self.lr, dtype=np.float64),
            "k": self.k.astype(np.int64),
            "train_before": self.train_before,
            "train_after": self.train_after,
            "test_before": self.test_before,
            "test_after": self.test_after,
        }


def run_probe(
    *,
    size_a: int,
    size_b: int,
    n: int,
    K: int,
    lr: float,
    step: int,
    seed: int | np.random.Generator | None,
    mean_loss: Callable[[Any, str, np.ndarray], float],
    virtual_step: Callable[[np.ndarray], Any],
    theta: Any,
    writer: Any = None,
) -> ProbeResult:
    """The OSGR probe loop, framework-free.

    Parameters
    ----------
    size_a, size_b : int
        Sizes of the disjoint pools A (draws ``D_k``) and B (draws ``D'_k``).
    n, K, lr, step : int, int, float, int
        Draw size, number of draws, virtual learning rate, checkpoint.
    seed : int, Generator or None
        Randomness of the draws (without replacement within a draw).
    mean_loss : callable (theta, pool, idx) -> float
        Mean loss over samples ``idx`` of pool ``"a"`` or ``"b"`` at parameters ``theta``.
    virtual_step : callable (idx) -> theta'
        :math:`\\theta - \\lambda \\nabla L[D]` for ``D`` = samples ``idx`` of pool A.
    theta : object
        The current parameters, passed back to ``mean_loss``.
    writer : GradientWriter, optional
        Receives one ``write_probe`` row per draw.
    """
    n, K = int(n), int(K)
    if n < 1 or K < 1:
        raise AdapterError(f"probe_osgr: n and K must be >= 1, got n={n}, K={K}")
    if n > size_a or n > size_b:
        raise AdapterError(
            f"probe_osgr: draw size n={n} exceeds pool sizes (A: {size_a}, B: {size_b}); "
            "supported: n <= size of each pool (draws are without replacement)"
        )
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    rows = np.empty((K, 4))
    for k in range(K):
        ia = np.sort(rng.choice(size_a, size=n, replace=False))
        ib = np.sort(rng.choice(size_b, size=n, replace=False))
        after = virtual_step(ia)
        rows[k] = (
            mean_loss(theta, "a", ia), mean_loss(after, "a", ia),
            mean_loss(theta, "b", ib), mean_loss(after, "b", ib),
        )
    res = ProbeResult(step=int(step), n=n, lr=float(lr), k=np.arange(K, dtype=np.int64),
                      train_before=rows[:, 0].copy(), train_after=rows[:, 1].copy(),
                      test_before=rows[:, 2].copy(), test_after=rows[:, 3].copy())
    if writer is not None:
        for k in range(K):
            writer.write_probe(res.step, n, res.lr, k, *rows[k])
    return res


# --------------------------------------------------------------------------------------
# Writing in the background
# --------------------------------------------------------------------------------------


class AsyncWriter:
    """Run ``GradientWriter.write`` calls on one background thread.

    The frameworks release the GIL while computing, and ``GradientWriter`` writes whole chunk
    rows with ``pwritev`` (GIL released), so writing batch ``b`` overlaps computing batch
    ``b + 1``. At most ``max_pending`` batches wait in
    the queue; ``submit`` blocks beyond that, which bounds memory. The writer object is used
    by this thread only until :meth:`close` returns, and every error raised on the thread is
    re-raised in the caller at the next ``submit`` or at ``close``.

    Parameters
    ----------
    writer : GradientWriter
        The open writer.
    max_pending : int
        Queue length; 0 writes synchronously in the caller's thread.

    Notes
    -----
    Only the small parts of a write hold the GIL (dataset resizes, per-sample losses and ids,
    partial chunk rows through h5py). On few cores the page-cache copy of the gradients
    still competes with computing for CPU time; ``O_DIRECT`` (``GradientWriter``'s
    ``direct_io``, by default after the first GiB) removes that copy.
    """

    def __init__(self, writer: Any, max_pending: int = 2) -> None:
        self._w = writer
        self._sync = max_pending <= 0
        self._error: BaseException | None = None
        if not self._sync:
            self._q: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
            self._t = threading.Thread(target=self._run, name="gsnr-writer", daemon=True)
            self._t.start()

    def _do(self, item: tuple[str, tuple[Any, ...], dict[str, Any], Callable[[], None] | None]):
        method, args, kw, release = item
        try:
            if method == "write":
                # callables materialize on this thread (device -> host copies, JAX sync)
                kw = {k: (v() if callable(v) else v) for k, v in kw.items()}
                self._w.write(*args, **kw)
            else:
                getattr(self._w, method)(*args, **kw)
        finally:
            if release is not None:
                release()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._do(item)
                except BaseException as e:  # re-raised in the caller
                    self._error = e
            elif item[3] is not None:
                item[3]()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _put(self, item: Any) -> None:
        if self._sync:
            self._do(item)
            return
        self._raise()
        self._q.put(item)

    def write(self, step: int, split: str, *, release: Callable[[], None] | None = None,
              **kw: Any) -> None:
        """Queue ``writer.write(step, split, **kw)``; callables in ``kw`` run on the thread.

        ``release`` is called on the thread after the write (success or not), e.g. to return
        a host buffer to its pool.
        """
        self._put(("write", (step, split), kw, release))

    def end_record(self, step: int, split: str) -> None:
        """Queue ``writer.end_record(step, split)``."""
        self._put(("end_record", (step, split), {}, None))

    def close(self) -> None:
        """Wait for every queued call, stop the thread, re-raise its first error."""
        if not self._sync:
            self._q.put(None)
            self._t.join()
        self._raise()

    def __enter__(self) -> AsyncWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is not None and not self._sync:
            # stop quickly: drop nothing already queued, but do not mask the caller's error
            self._q.put(None)
            self._t.join()
            self._error = None
            return
        self.close()


class BufferPool:
    """A few reusable host buffers, so that large batches do not page-fault fresh memory.

    ``acquire`` blocks until a buffer is free: together with :class:`AsyncWriter` this keeps
    at most ``size`` batches in flight.
    """

    def __init__(self, make: Callable[[], Any], size: int) -> None:
        self._make = make
        self._free: queue.Queue[Any] = queue.Queue()
        self._made = 0
        self._size = max(1, size)

    def acquire(self) -> Any:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._made < self._size:
            self._made += 1
            return self._make()
        return self._free.get()

    def release(self, buf: Any) -> None:
        self._free.put(buf)


# --------------------------------------------------------------------------------------
# Data and progress
# --------------------------------------------------------------------------------------


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool | dict[str, Any], total: int | None, desc: str) -> Any:
    """A ``tqdm`` bar counting samples, or a no-op object. ``enabled`` may be tqdm kwargs."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    kw = {"total": total, "desc": desc, "unit": "sample", "unit_scale": True}
    if isinstance(enabled, dict):
        kw.update(enabled)
    return tqdm(**kw)


def array_batches(arrays: Sequence[Any], batch_size: int) -> Iterator[tuple[Any, ...]]:
    """Slice aligned arrays (anything with ``len`` and slicing) into batches of rows."""
    if batch_size < 1:
        raise AdapterError(f"batch_size must be >= 1, got {batch_size}")
    n = len(arrays[0])
    for a in arrays[1:]:
        if len(a) != n:
            raise AdapterError(
                f"data arrays have different lengths ({[len(a) for a in arrays]}); "
                "supported: (inputs, targets[, sample_id]) with one row per sample"
            )
    for start in range(0, n, batch_size):
        yield tuple(a[start:start + batch_size] for a in arrays)


def split_batch(batch: Any, where: str) -> tuple[Any, Any, Any]:
    """``(inputs, targets)`` or ``(inputs, targets, sample_id)`` from one batch."""
    if isinstance(batch, dict):
        try:
            return batch["inputs"], batch["targets"], batch.get("sample_id")
        except KeyError as e:
            raise AdapterError(
                f"{where}: dict batch lacks {e}; supported: keys inputs, targets[, sample_id]"
            ) from None
    if isinstance(batch, Sequence) and len(batch) in (2, 3):
        return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)
    raise AdapterError(
        f"{where}: cannot unpack a batch of type {type(batch).__name__}; supported: "
        "(inputs, targets), (inputs, targets, sample_id) or a dict with those keys"
    )


def iter_data(data: Any, batch_size: int | None, where: str) -> tuple[Iterable[Any], int | None]:
    """Batches of ``data`` and the number of samples if known (for the progress bar).

    With ``batch_size``, ``data`` is a tuple of aligned arrays; otherwise an iterable of
    batches (a ``DataLoader``, a generator, a list).
    """
    if batch_size is not None:
        if not isinstance(data, Sequence) or len(data) not in (2, 3):
            raise AdapterError(
                f"{where}: with batch_size, data must be (inputs, targets[, sample_id]) arrays"
            )
        return array_batches(list(data), int(batch_size)), len(data[0])
    total = None
    ds = getattr(data, "dataset", None)  # torch DataLoader
    if ds is not None and hasattr(ds, "__len__") and getattr(data, "drop_last", False) is False:
        total = len(ds)
    return data, total


def limited_batches(
    batches: Iterable[Any],
    max_samples: int | None,
    where: str,
    batch_len: Callable[[Any], int],
    cut: Callable[[Any, Any, Any, int], tuple[Any, Any, Any]],
) -> Iterator[tuple[Any, Any, Any, int]]:
    """``(x, y, sample_id, n)`` of each non-empty batch; the last one cut to ``max_samples``.

    ``batch_len(x)`` counts a batch's samples and ``cut(x, y, sample_id, n)`` keeps its first
    ``n`` (framework-specific slicing).
    """
    seen = 0
    for batch in batches:
        x, y, sid = split_batch(batch, where)
        n = batch_len(x)
        if max_samples is not None:
            n = min(n, max_samples - seen)
            if n <= 0:
                return
            x, y, sid = cut(x, y, sid, n)
        if n == 0:
            continue
        seen += n
        yield x, y, sid, n


def check_layout_matches(writer: Any, layout: Sequence[tuple[str, tuple[int, ...]]],
                         where: str) -> None:
    """The writer's layout names and shapes must be the adapter's layout."""
    wl = getattr(writer, "layout", None)
    if wl is None:
        return
    names = [n for n, _ in layout]
    shapes = [tuple(s) for _, s in layout]
    if list(wl.names) != names or [tuple(s) for s in wl.shapes] != shapes:
        diff = [
            (a, b) for a, b in zip(zip(wl.names, wl.shapes, strict=False),
                                   zip(names, shapes, strict=False), strict=False) if a != b
        ][:3]
        raise AdapterError(
            f"{where}: the writer's layout ({len(wl.names)} tensors) differs from the model's "
            f"({len(names)} tensors); first differences (writer, model): {diff}. Create the "
            "writer with the adapter's layout(...) and the same parameter filter"
        )


def abort_record(writer: Any, step: int, split: str) -> None:
    """After a failed recording, keep the partial record ``(step, split)`` incomplete.

    Uses ``writer.abort_record`` when the writer has it (so that ``close`` does not mark a
    partial record complete); a no-op otherwise. Never raises: the original error matters.
    """
    abort = getattr(writer, "abort_record", None)
    if abort is not None:
        try:
            abort(step, split)
        except Exception:  # noqa: BLE001 - do not mask the error being raised
            pass


def as_float(x: Any) -> float:
    """``float(x)`` that maps ``None`` to NaN."""
    return math.nan if x is None else float(x)
