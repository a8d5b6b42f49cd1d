"""Moments-only recording versus full per-sample dumps: time per batch and bytes per record.

Models: the MLP 784-512-256-10 and the CNN (two conv blocks + two linear layers, 3x32x32)
of ``bench/adapters.py``, batch 256 by default, CPU. Cells, each timed over the same
batches in one run (interleaved repeats, best kept):

* ``plain backward`` -- forward + ``loss.sum().backward()`` (the floor: no per-sample work);
* ``full dump (keep="grads")`` -- ``gsnr_stats.adapters.torch.Recorder`` writing every
  per-sample gradient into an uncompressed float32 store (the full per-sample path; Linear
  and Conv gradients from one backward, written straight into the writer's buffer);
  ``fast=False``: the same through ``vmap`` + concatenation;
* ``moments, vmap path`` -- ``keep="moments", fast=False``: ``torch.func`` per-sample
  gradients reduced on the fly (two-pass kernel, float64) to one (count, mean, M2) block per
  batch;
* ``moments, fast path`` -- ``keep="moments"``: Linear/Conv moments from the layer inputs and
  output gradients of one backward (``adapters/_torch_fast.py``).

Columns: ms per batch, speed-up over the full dump, bytes the record adds to the store, and
the agreement of the fast path with the vmap path (max relative difference of mean and var;
on the float32 model it is bounded by the float32 rounding of the per-sample gradients, so a
float64 copy of the model is checked too). Run ``python bench/moments.py [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]


def _models() -> dict[str, tuple[Any, tuple[int, ...]]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from adapters import torch_models  # bench/adapters.py: the same models

    return torch_models()


def _record_bytes(path: Path, step: int, split: str) -> int:
    """Bytes of data one record holds in the store (gradient rows with their loss, id and
    label, or moments blocks), from the store's own index."""
    import gsnr_stats as gs

    with gs.open_store(path) as s:
        rec = s.record(step, split)
        P = s.layout.n_params
        if rec.kind == "moments":
            return len(s.read_moments(step, split)[0]) * (16 * P + 8)
        return rec.n_samples * (P * s.grads_dtype.itemsize + 24)


def _recorded(model: Any, lf: Any, batches: list[Any], where: Path, tag: str,
              **kw: Any) -> tuple[float, int, Any]:
    """Seconds per batch of one record of ``batches`` (after a warm-up record), bytes."""
    from gsnr_stats.adapters import torch as gt

    import gsnr_stats as gs

    path = where / f"{tag}.h5"
    with gt.open_writer(path, model, overwrite=True) as w:
        rec = gt.Recorder(w, model, lf, max_pending=2, **kw)
        rec.record(batches[:1], step=0, split="warmup")
        t0 = time.perf_counter()
        rec.record(batches[1:], step=1, split="train")
        w.flush()
        dt = time.perf_counter() - t0
    size = _record_bytes(path, 1, "train")
    stats = gs.reduce(path, steps=[1]) if kw.get("keep") == "moments" else None
    path.unlink()
    return dt / (len(batches) - 1), size, stats


def _backward(model: Any, lf: Any, batches: list[Any]) -> float:
    for x, y in batches[:1]:
        model.zero_grad()
        lf(model(x), y).sum().backward()
    t0 = time.perf_counter()
    for x, y in batches[1:]:
        model.zero_grad()
        lf(model(x), y).sum().backward()
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return dt / (len(batches) - 1)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def float64_check(model: Any, lf: Any, x: Any, y: Any) -> tuple[float, float]:
    """Max relative mean / var difference, fast path vs vmap moments, on a float64 copy."""
    import copy

    from gsnr_stats.adapters import torch as gt

    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    G = gt.per_sample_gradients(m64, lf, x64, y)
    mu = G.mean(0)
    var = ((G - mu) ** 2).sum(0) / (G.shape[0] - 1)
    from gsnr_stats.adapters._torch_fast import FastPath

    rec = gt.Recorder(None, m64, lf, keep="moments")
    fp = FastPath(rec._eng, rec._sub_engine)
    fm, fq, _ = fp.moments(x64, y, x64.shape[0])
    return _rel(fm, mu), _rel(fq / (G.shape[0] - 1), var)


def gsnr_precision(rs: tuple[float, ...] = (1.6e11, 2.7e15, 1e20), n: int = 256
                   ) -> list[tuple[float, float, float]]:
    """Fast-path variance at high GSNR vs the float64 two-pass of vmap's per-sample rows.

    A float64 ``Linear(3, 2)`` under squared error with targets offset by ``sqrt(r)`` and a
    constant input feature (the bias and that feature's weights have GSNR about ``r``).
    Returns ``(r, GSNR of the reference at its worst element, max relative error of the
    variance)``; the error is ``inf`` where the fast path's variance is 0 or not finite.
    """
    import torch
    from gsnr_stats.adapters import torch as gt
    from gsnr_stats.adapters._torch_fast import FastPath
    from torch import nn

    def mse(out: Any, y: Any) -> Any:
        return ((out - y) ** 2).sum(1)

    out = []
    for r in rs:
        torch.manual_seed(0)
        model = nn.Linear(3, 2).double()
        with torch.no_grad():
            model.weight.mul_(0.1)
            model.bias.zero_()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        x[:, 0] = 1.0
        y = torch.randn(n, 2, generator=g, dtype=torch.float64) - float(np.sqrt(r))
        G = gt.per_sample_gradients(model, mse, x, y, fast=False)
        mu = G.mean(0)
        var = ((G - mu) ** 2).sum(0) / (n - 1)
        rec = gt.Recorder(None, model, mse, keep="moments")
        fp = FastPath(rec._eng, rec._sub_engine)
        _, fq, _ = fp.moments(x, y, n)
        fv = fq / (n - 1)
        err = np.abs(fv - var) / var
        err[~(np.isfinite(fv) & (fv > 0))] = np.inf
        j = int(np.argmax(mu ** 2 / var))
        out.append((r, float(mu[j] ** 2 / var[j]), float(err.max())))
    return out


def bench(args: argparse.Namespace, where: Path) -> list[Row]:
    import torch
    from torch import nn

    if args.threads:
        torch.set_num_threads(args.threads)
    lf = nn.CrossEntropyLoss(reduction="none")
    rows: list[Row] = []
    for mname, (model, shape) in _models().items():
        if args.models and not any(m.lower() in mname.lower() for m in args.models):
            continue
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(args.batch, *shape, generator=gen),
                    torch.randint(0, 10, (args.batch,), generator=gen))
                   for _ in range(args.batches + 1)]
        cells: dict[str, Callable[[], tuple[float, int, Any]]] = {
            "plain backward (floor)": lambda m=model, b=batches: (_backward(m, lf, b), 0, None),
            'full dump (keep="grads")': lambda m=model, b=batches: _recorded(m, lf, b, where,
                                                                             "grads"),
            'full dump, vmap path (fast=False)': lambda m=model, b=batches: _recorded(
                m, lf, b, where, "gvmap", fast=False),
            "moments, vmap path": lambda m=model, b=batches: _recorded(
                m, lf, b, where, "mvmap", keep="moments", fast=False),
            "moments, fast path": lambda m=model, b=batches: _recorded(
                m, lf, b, where, "mfast", keep="moments", fast=True),
        }
        best: dict[str, float] = {}
        size: dict[str, int] = {}
        stats: dict[str, Any] = {}
        for _ in range(args.repeats):
            for key, fn in cells.items():
                dt, nbytes, st = fn()
                best[key] = min(best.get(key, float("inf")), dt)
                size[key], stats[key] = nbytes, st
                gc.collect()
        sv, sf = stats["moments, vmap path"], stats["moments, fast path"]
        acc32 = (_rel(sf["mean"].values, sv["mean"].values),
                 _rel(sf["var"].values, sv["var"].values))
        acc64 = float64_check(model, lf, *batches[0])
        full = best['full dump (keep="grads")']
        for key in cells:
            rows.append({"model": mname, "method": key, "ms": best[key] * 1e3,
                         "speedup": full / best[key], "bytes": size[key],
                         "acc": (acc32, acc64) if key == "moments, fast path" else None})
    return rows


def _fmt_bytes(n: int) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n} B"


def table(rows: list[Row], args: argparse.Namespace) -> str:
    """Markdown table of the rows."""
    lines = [
        f"batch {args.batch}, {args.batches} timed batches per record, CPU ({os.cpu_count()} "
        f"cores, torch threads {args.threads or 'default'}), float32 model, uncompressed store",
        "",
        "| model | method | ms / batch | x full dump | bytes / record | fast vs vmap: max rel "
        "err mean, var (float32 model; float64 copy) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        acc = ""
        if r["acc"] is not None:
            (m32, v32), (m64, v64) = r["acc"]
            acc = f"{m32:.1e}, {v32:.1e}; {m64:.1e}, {v64:.1e}"
        nbytes = "-" if r["method"].startswith("plain") else _fmt_bytes(r["bytes"])
        lines.append(f"| {r['model']} | {r['method']} | {r['ms']:.1f} | {r['speedup']:.1f} | "
                     f"{nbytes} | {acc} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python bench/moments.py [--quick] [--batch N] [--batches B] ...``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: batch 32, 1 batch, 1 repeat")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=4, help="timed batches per record")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats, best kept")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--models", nargs="*", default=[], help="substrings: mlp, cnn")
    p.add_argument("--dir", default=None, help="where stores are written (temp dir)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.batches, args.repeats = 32, 1, 1
    where = Path(tempfile.mkdtemp(prefix="gsnr-bench-moments-", dir=args.dir))
    t0 = time.perf_counter()
    try:
        rows = bench(args, where)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    print(table(rows, args))
    print("\nfast-path moments at high GSNR (float64 Linear, batch 256), vs vmap two-pass:\n")
    print("| target GSNR r | GSNR of the worst element | max rel err of the variance |")
    print("|---:|---:|---:|")
    for r, got, err in gsnr_precision():
        print(f"| {r:.1e} | {got:.2e} | {err:.1e} |")
    print(f"\n(total {time.perf_counter() - t0:.0f} s; best of {args.repeats} interleaved repeats; "
          "bytes / record = gradient rows with loss/id/label, or moments blocks, of one record)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
