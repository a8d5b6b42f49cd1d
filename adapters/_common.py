"""Framework-free helpers shared by the adapters.

Nothing here imports torch or jax: a background writer thread that overlaps writing with
computing, a progress bar, batching of in-memory arrays, the OSGR probe loop and its result
type, and small validation helpers. The frameworks' modules supply the arithmetic.
"""

from __future__ import annotations

import contextlib
import math
import queue
import random
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
    "check_sample_id",
    "preserved_host_rng",
    "progress_bar",
    "run_probe",
    "split_batch",
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
    optimizer_step : int or None
        The optimizer's update count stored with the record (None if unknown).
    """

    step: int
    split: str
    n_samples: int
    mean_loss: float
    lr: float = math.nan
    epoch: float = math.nan
    optimizer_step: int | None = None


@dataclass
class ProbeResult:
    """OSGR probe rows at one checkpoint (docs/theory.md, "Measured OSGR", 2).

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

    def end_record(self, step: int, split: str, **kw: Any) -> None:
        """Queue ``writer.end_record(step, split, **kw)`` (``optimizer_step=``, ``meta=``:
        the record attributes of ``GradientWriter.end_record``; none given, none passed)."""
        self._put(("end_record", (step, split), kw, None))

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
# Host random state
# --------------------------------------------------------------------------------------

RngSaver = Callable[[], Callable[[], None]]


@contextlib.contextmanager
def preserved_host_rng(*savers: RngSaver) -> Iterator[None]:
    """Leave the host's global random generators as they were, also on exception.

    Recording from a training loop draws random numbers (a ``DataLoader``'s shuffle seed,
    augmentations in the dataset, random layers); without this the recorded run would
    diverge from an unrecorded one. Saved and restored: Python's ``random``, numpy's
    global (legacy ``np.random.*``) generator, and whatever the ``savers`` cover -- each
    ``saver()`` captures a state and returns the function that restores it (the torch
    adapter passes its CPU/CUDA generators and a ``DataLoader``'s own ``generator``).
    Generators held elsewhere (``np.random.default_rng()`` objects in user code, JAX keys,
    worker processes) are not global and not touched.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 - the global state is the point
    restores = [s() for s in savers]
    try:
        yield
    finally:
        for r in reversed(restores):
            r()
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)


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


#: Keys of a dict batch (see :func:`split_batch`): inputs, targets, sample ids.
DICT_KEYS: dict[str, tuple[str, ...]] = {
    "inputs": ("inputs", "x"),
    "targets": ("targets", "y", "labels"),
    "sample_id": ("sample_id",),
}

BATCH_RULE = (
    "a batch is (inputs, targets); (inputs, targets, sample_id) only when the third element "
    "is a 1-D integer tensor/array with one id per sample; a dict with keys "
    "inputs|x, targets|y|labels[, sample_id]; anything else: pass unpack=lambda batch: "
    "(inputs, targets) or (inputs, targets, sample_id)"
)

Unpack = Callable[[Any], Sequence[Any]]


def _describe(a: Any) -> str:
    """``dtype float32, shape (64,)`` of an array-like, or its type."""
    dt, shape = getattr(a, "dtype", None), getattr(a, "shape", None)
    if dt is None or shape is None:
        return f"type {type(a).__name__}"
    return f"dtype {str(dt).removeprefix('torch.')}, shape {tuple(shape)}"


def _is_array(a: Any) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype")


def is_integer_dtype(dtype: Any) -> bool:
    """True for signed/unsigned integer dtypes of numpy, jax or torch (never bool)."""
    try:
        return bool(np.issubdtype(np.dtype(dtype), np.integer))
    except TypeError:  # a torch dtype: no numpy equivalent object
        name = str(dtype).removeprefix("torch.")
        return name.startswith(("int", "uint")) and name[-1].isdigit()


def check_sample_id(sid: Any, n: int | None, where: str, origin: str) -> Any:
    """``sid`` if it can be sample ids of a batch of ``n`` (1-D, integer, length ``n``).

    Never casts: a float array (per-sample weights, say) is refused rather than truncated
    to int, which would make every id 0. ``origin`` names where ``sid`` came from.
    """
    if sid is None:
        return None
    if not _is_array(sid):
        arr = np.asarray(sid)
        if arr.dtype == object:
            arr = np.asarray([], dtype=np.float64)  # refuse below, naming its type
        ok = is_integer_dtype(arr.dtype) and arr.ndim == 1 and (n is None or arr.shape[0] == n)
        desc = f"type {type(sid).__name__}, {_describe(arr)}"
    else:
        shape = tuple(sid.shape)
        ok = (is_integer_dtype(sid.dtype) and len(shape) == 1
              and (n is None or shape[0] == n))
        desc = _describe(sid)
    if not ok:
        raise AdapterError(
            f"{where}: {origin} ({desc}) cannot be sample ids"
            + (f" of a batch of {n} samples" if n is not None else "")
            + ": sample ids are a 1-D integer tensor/array with one id per sample, and "
            "floats are never cast to int. If it is something else (per-sample weights, a "
            "second target), pass unpack=lambda batch: (batch[0], batch[1]) to drop it, or "
            "return (inputs, targets, ids) from unpack; rule: " + BATCH_RULE
        )
    return sid


def _dict_batch(batch: Any, where: str) -> tuple[Any, Any, Any]:
    found: dict[str, str] = {}
    for role, keys in DICT_KEYS.items():
        hit = [k for k in keys if k in batch]
        if len(hit) > 1:
            raise AdapterError(f"{where}: dict batch has several {role} keys {hit}; pass "
                               f"unpack= to say which is which; rule: {BATCH_RULE}")
        if hit:
            found[role] = hit[0]
    missing = [r for r in ("inputs", "targets") if r not in found]
    extra = sorted(str(k) for k in batch if k not in found.values())
    if missing or extra:
        raise AdapterError(
            f"{where}: dict batch with keys {sorted(str(k) for k in batch)}: "
            + (f"no {' / '.join(missing)} key; " if missing else "")
            + (f"unrecognised keys {extra} (not dropped silently); " if extra else "")
            + "pass unpack=lambda batch: (inputs, targets[, sample_id]), e.g. "
            "unpack=lambda b: ({'input_ids': b['input_ids'], 'attention_mask': "
            f"b['attention_mask']}}, b['labels']); rule: {BATCH_RULE}"
        )
    sid = batch[found["sample_id"]] if "sample_id" in found else None
    return batch[found["inputs"]], batch[found["targets"]], sid


def split_batch(batch: Any, where: str, unpack: Unpack | None = None,
                batch_len: Callable[[Any], int] | None = None) -> tuple[Any, Any, Any]:
    """``(inputs, targets, sample_id)`` from one batch, by an explicit rule.

    The rule (without ``unpack``):

    * a 2-sequence ``(inputs, targets)``;
    * a 3-sequence ``(inputs, targets, sample_id)`` only when the third element is a 1-D
      integer tensor/array with one id per sample; a float third element (per-sample
      weights, say), a second target, or a longer sequence is an :class:`AdapterError`
      naming the element and ``unpack=`` (never a silent cast of floats to int);
    * a dict with an inputs key (``inputs`` or ``x``), a targets key (``targets``, ``y``
      or ``labels``) and optionally ``sample_id`` (:data:`DICT_KEYS`); other keys are an
      error, not dropped silently;
    * anything else (a bare tensor, ...) is an error that mentions ``batch_size=`` and
      ``unpack=``.

    Parameters
    ----------
    batch : object
        One batch as the data yields it.
    where : str
        Caller, for messages.
    unpack : callable batch -> (inputs, targets) or (inputs, targets, sample_id), optional
        The user's rule instead of the one above; the ids it returns are checked the same
        way (``None`` for no ids).
    batch_len : callable inputs -> int, optional
        Number of samples of the inputs; with it the ids' length is checked too.
    """
    if unpack is not None:
        try:
            out = unpack(batch)
        except AdapterError:
            raise
        except Exception as e:
            raise AdapterError(f"{where}: unpack(batch) raised {type(e).__name__}: {e}; it "
                               "must return (inputs, targets) or (inputs, targets, "
                               "sample_id)") from e
        if not isinstance(out, tuple | list) or len(out) not in (2, 3):
            raise AdapterError(
                f"{where}: unpack(batch) returned "
                + (f"a {len(out)}-sequence" if isinstance(out, tuple | list)
                   else type(out).__name__)
                + "; it must return (inputs, targets) or (inputs, targets, sample_id)")
        x, y = out[0], out[1]
        sid = out[2] if len(out) == 3 else None
        n = batch_len(x) if (batch_len is not None and sid is not None) else None
        return x, y, check_sample_id(sid, n, where, "the third value unpack returned")
    if isinstance(batch, dict):
        x, y, sid = _dict_batch(batch, where)
        n = batch_len(x) if (batch_len is not None and sid is not None) else None
        return x, y, check_sample_id(sid, n, where, "the batch's 'sample_id'")
    if isinstance(batch, tuple | list):
        if len(batch) == 2:
            return batch[0], batch[1], None
        if len(batch) == 3:
            n = batch_len(batch[0]) if batch_len is not None else None
            return batch[0], batch[1], check_sample_id(batch[2], n, where,
                                                       "the batch's third element")
        raise AdapterError(
            f"{where}: a batch of {len(batch)} elements ("
            + ", ".join(f"[{i}] {_describe(a)}" for i, a in enumerate(batch[:6]))
            + f"); pass unpack=lambda batch: (inputs, targets[, sample_id]); rule: {BATCH_RULE}")
    raise AdapterError(
        f"{where}: cannot unpack a batch of type {type(batch).__name__} ({_describe(batch)}). "
        "If data is (inputs, targets) arrays of the whole set, pass batch_size= to slice it "
        "into batches; if each batch is one tensor, pass unpack=lambda batch: (inputs, "
        f"targets); rule: {BATCH_RULE}"
    )


def iter_data(data: Any, batch_size: int | None, where: str,
              unpack: Unpack | None = None) -> tuple[Iterable[Any], int | None]:
    """Batches of ``data`` and the number of samples if known (for the progress bar).

    With ``batch_size``, ``data`` is a tuple of aligned arrays (``(inputs, targets[,
    sample_id])``; with ``unpack``, any number of arrays, each batch a tuple of their
    slices); otherwise an iterable of batches (a ``DataLoader``, a generator, a list).
    A tuple of whole-set arrays without ``batch_size`` is refused with a message saying
    ``batch_size=`` (iterating it would yield the arrays, not batches).
    """
    if batch_size is not None:
        ok = isinstance(data, Sequence) and (len(data) >= 1 if unpack is not None
                                             else len(data) in (2, 3))
        if not ok:
            raise AdapterError(
                f"{where}: with batch_size, data must be (inputs, targets[, sample_id]) arrays"
                " (any tuple of aligned arrays with unpack=)"
            )
        return array_batches(list(data), int(batch_size)), len(data[0])
    if unpack is None:
        if _is_array(data):
            raise AdapterError(
                f"{where}: data is one array ({_describe(data)}), not an iterable of batches; "
                "pass (inputs, targets) with batch_size=, a DataLoader, or unpack=")
        if (isinstance(data, tuple | list) and 2 <= len(data) <= 3
                and all(_is_array(a) and len(a.shape) >= 1 for a in data)
                and len({int(a.shape[0]) for a in data}) == 1):
            raise AdapterError(
                f"{where}: data is a tuple of {len(data)} arrays ("
                + ", ".join(_describe(a) for a in data)
                + "), not an iterable of batches: pass batch_size= (e.g. batch_size=256) to "
                "slice (inputs, targets[, sample_id]) into batches, or pass a DataLoader")
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
    unpack: Unpack | None = None,
) -> Iterator[tuple[Any, Any, Any, int]]:
    """``(x, y, sample_id, n)`` of each non-empty batch; the last one cut to ``max_samples``.

    ``batch_len(x)`` counts a batch's samples and ``cut(x, y, sample_id, n)`` keeps its first
    ``n`` (framework-specific slicing). Batches are unpacked by :func:`split_batch` (its
    rule, or ``unpack``).
    """
    seen = 0
    for batch in batches:
        x, y, sid = split_batch(batch, where, unpack, batch_len)
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


# --------------------------------------------------------------------------------------
# Factored records (docs/format.md, format version 4)
# --------------------------------------------------------------------------------------


def writer_factors(writer: Any) -> list[tuple[str, str | None, int]]:
    """The factors a writer was opened with, ``[(weight, bias or None, rows), ...]`` in
    declaration order (empty for a writer of full per-sample gradients)."""
    out = []
    for f in getattr(writer, "factors", None) or ():
        out.append((str(f.weight), None if f.bias is None else str(f.bias), int(f.rows)))
    return out


def check_factored_writer(writer: Any, keep: str, where: str) -> list[tuple[str, str | None, int]]:
    """``keep="factors"`` needs a writer opened with ``factors=`` and ``keep="grads"`` one
    without (a factored store refuses full rows); the writer's factors."""
    facs = writer_factors(writer)
    if keep == "factors" and not facs:
        raise AdapterError(
            f"{where}: keep='factors' needs a writer opened with factors= (e.g. the adapter's "
            "open_writer(..., factors='auto')); this writer stores full per-sample gradients")
    if keep != "factors" and facs:
        raise AdapterError(
            f"{where}: the writer was opened with factors {[f[0] for f in facs]}: record "
            f"with keep='factors' (keep={keep!r} writes full per-sample rows, which a "
            "factored store refuses)")
    return facs


def plain_offsets(layout: Sequence[tuple[str, tuple[int, ...]]],
                  factored: set[str]) -> dict[str, tuple[int, int]]:
    """Columns ``(start, stop)`` of each tensor of ``layout`` not in ``factored``, in the
    plain ``grads`` of a factored record (layout order, factored tensors left out)."""
    out, off = {}, 0
    for name, shape in layout:
        if name in factored:
            continue
        size = math.prod(tuple(shape))
        out[name] = (off, off + size)
        off += size
    return out


class WriteBlocks:
    """Consecutive batches' ``write`` arguments merged into blocks of about ``rows`` samples
    (at most ``max_bytes``), queued on an :class:`AsyncWriter`.

    A factored batch is small (an MLP's 256 samples are 2.4 MB) and each ``write`` costs a
    fixed ~1 ms per dataset (loss, ids, labels, plain columns, two per factor), more than
    the GPU takes to compute the batch: merging amortises it. The arrays are concatenated
    on the writer thread. Batches with and without ids (or labels) are not merged.
    """

    def __init__(self, aw: AsyncWriter, step: int, split: str, rows: int = 4096,
                 max_bytes: int = 64 << 20, **fixed: Any) -> None:
        self.aw, self.step, self.split = aw, step, split
        self.rows, self.max_bytes, self.fixed = rows, max_bytes, fixed
        self._parts: list[dict[str, Any]] = []
        self._n = self._bytes = 0

    def add(self, n: int, **kw: Any) -> None:
        """Queue one batch of ``n`` rows (``grads``, ``factors``, ``loss``, ``sample_id``,
        ``label``: arrays, a dict of ``(A, D)`` pairs, or None)."""
        if self._parts and [v is None for v in self._parts[0].values()] != [
                v is None for v in kw.values()]:
            self.flush()
        size = sum(a.nbytes for v in kw.values() if v is not None
                   for a in (v.values() if isinstance(v, dict) else (v,))
                   for a in (a if isinstance(a, tuple) else (a,)))
        self._parts.append(kw)
        self._n += n
        self._bytes += size
        if self._n >= self.rows or self._bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        """Queue the merged block (nothing if empty)."""
        if not self._parts:
            return
        parts, self._parts, self._n, self._bytes = self._parts, [], 0, 0

        def cat(key: str, parts: list[dict[str, Any]] = parts) -> Callable[[], Any]:
            def run() -> Any:
                vs = [p[key] for p in parts]
                if vs[0] is None:
                    return None
                if isinstance(vs[0], dict):
                    return {k: tuple(np.concatenate([v[k][j] for v in vs]) for j in (0, 1))
                            for k in vs[0]}
                return np.concatenate(vs)
            return run

        self.aw.write(self.step, self.split, **{k: cat(k) for k in parts[0]}, **self.fixed)
