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

In-training section (``--training``, also part of the default run): moments of the
*training* batches taken from the user's own step on the MLP, float32, ``--train-threads``
torch threads (default 1), every cell a full SGD step (zero_grad, mean cross-entropy,
backward, ``opt.step()``) over the same batches, in interleaved rounds:

* ``plain step`` -- the baseline;
* ``TrainingMoments`` -- ``gsnr_stats.adapters.torch.TrainingMoments`` attached (hooks, one
  extra GEMM per layer, the merge kernel inside the backward); the window's record,
  written once per window, is timed apart (``flush``); ``overlap=True``: the merge on its
  worker thread (helps only where a core is free);
* ``one weight-sized GEMM per layer`` -- the plain step plus the GEMMs alone: the floor of
  any route through the ``(δ²)ᵀ(a²)`` identity (BackPACK's ``SumGradSquared`` too);
* ``Recorder keep="moments"`` -- the plain step plus ``Recorder.record`` of the same batch
  (its own forward and backward);
* BackPACK ``SumGradSquared`` and cockpit ``MeanGSNR`` (``backpack-for-pytorch``,
  ``cockpit-for-pytorch``), where they import; ``--extras DIR`` puts a directory with them
  (e.g. ``pip install --no-deps --target DIR``, so that no CUDA torch comes along) on
  ``sys.path``; "not installed" otherwise.

Columns: ms per step and the ratio to the plain step; for ``TrainingMoments`` also the max
relative error of mean and variance against the float64 two-pass of ``torch.func``
per-sample gradients of the same batches.

Columns of the first table: ms per batch, speed-up over the full dump, bytes the record adds to the store, and
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


def _mlp32() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                         nn.Linear(256, 10))


FLUSH_TIMES: list[float] = []  # seconds of each TrainingMoments.flush (one record write)


def _training_cells(batches: list[Any], where: Path) -> dict[str, Callable[[], float] | str]:
    """``{name: run over the batches -> seconds per step}``, or a reason it cannot run."""
    import torch
    import torch.nn.functional as F
    from gsnr_stats.adapters import torch as gt
    from torch import nn

    def sgd(model: Any) -> Any:
        return torch.optim.SGD(model.parameters(), lr=0.01)

    def loop(model: Any, opt: Any, extra: Callable[[Any, Any], None] | None = None) -> float:
        t0 = time.perf_counter()
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if extra is not None:
                extra(x, y)
        return (time.perf_counter() - t0) / len(batches)

    cells: dict[str, Callable[[], float] | str] = {}
    m0 = _mlp32()
    o0 = sgd(m0)
    cells["plain step (baseline)"] = lambda: loop(m0, o0)
    m1 = _mlp32()
    o1 = sgd(m1)
    tm = gt.TrainingMoments(where / "tm.h5", m1, optimizer=o1, every=None, overlap=True)
    runs = [0]
    flush_s = FLUSH_TIMES

    def with_tm() -> float:
        tm.attach()
        dt = loop(m1, o1)
        runs[0] += 1
        t0 = time.perf_counter()
        tm.flush(step=runs[0])  # the window's record, one per run: timed apart
        flush_s.append(time.perf_counter() - t0)
        tm.detach()
        return dt

    cells["TrainingMoments(overlap=True): merge on a worker thread"] = with_tm
    m5 = _mlp32()
    o5 = sgd(m5)
    tm5 = gt.TrainingMoments(where / "tm5.h5", m5, optimizer=o5, every=None)

    def with_tm5() -> float:
        tm5.attach()
        dt = loop(m5, o5)
        tm5.flush(step=runs[0])
        tm5.detach()
        return dt

    cells["TrainingMoments (default: merged inside the backward)"] = with_tm5
    mf = _mlp32()
    of = sgd(mf)
    n_b = batches[0][0].shape[0]
    lins = [m for m in mf.modules() if isinstance(m, nn.Linear)]
    fac = [(torch.rand(n_b, m.out_features), torch.rand(n_b, m.in_features)) for m in lins]
    outs = [torch.empty(m.out_features, m.in_features) for m in lins]

    def squares(x: Any, y: Any) -> None:
        for (d, a), o in zip(fac, outs, strict=True):
            torch.mm(d.t(), a, out=o)  # the (delta^2)^T (a^2) GEMM of each layer alone

    cells["plain step + one weight-sized GEMM per layer (floor of the identity)"] = \
        lambda: loop(mf, of, squares)
    m2 = _mlp32()
    o2 = sgd(m2)
    w2 = gt.open_writer(where / "rec.h5", m2, overwrite=True)
    rec = gt.Recorder(w2, m2, nn.CrossEntropyLoss(reduction="none"), keep="moments")
    k2 = [0]

    def record(x: Any, y: Any) -> None:
        k2[0] += 1
        rec.record([(x, y)], step=k2[0], split="train")

    cells['plain step + Recorder keep="moments" (own forward/backward)'] = \
        lambda: loop(m2, o2, record)
    try:
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared
    except ImportError:
        cells["BackPACK SumGradSquared"] = "not installed"
    else:
        m3 = extend(_mlp32())
        o3 = sgd(m3)
        lf3 = extend(nn.CrossEntropyLoss())

        def bp() -> float:
            t0 = time.perf_counter()
            for x, y in batches:
                o3.zero_grad()
                with backpack(SumGradSquared()):
                    lf3(m3(x), y).backward()
                o3.step()
            return (time.perf_counter() - t0) / len(batches)

        cells["BackPACK SumGradSquared"] = bp
    try:
        from backpack import extend
        from cockpit import Cockpit, quantities
        from cockpit.utils.schedules import linear
    except ImportError:
        cells["cockpit MeanGSNR"] = "not installed"
    else:
        m4 = extend(_mlp32())
        o4 = sgd(m4)
        lf4 = extend(nn.CrossEntropyLoss())
        ck = Cockpit(list(m4.parameters()), quantities=[quantities.MeanGSNR(linear(1))])
        k4 = [0]

        def cp() -> float:
            t0 = time.perf_counter()
            for x, y in batches:
                o4.zero_grad()
                out = m4(x)
                loss = lf4(out, y)
                losses = F.cross_entropy(out, y, reduction="none")
                with ck(k4[0], info={"batch_size": x.shape[0], "individual_losses": losses,
                                     "loss": loss, "optimizer": o4}):
                    loss.backward(create_graph=ck.create_graph(k4[0]))
                o4.step()
                k4[0] += 1
            return (time.perf_counter() - t0) / len(batches)

        cells["cockpit MeanGSNR"] = cp
    return cells


def training_accuracy(batches: list[Any], where: Path) -> list[tuple[str, float, float]]:
    """TrainingMoments vs the float64 two-pass of torch.func per-sample gradients of the
    same batches (float32 model; a float64 copy): ``(model, max rel err mean, var)``."""
    import torch
    import torch.nn.functional as F
    from gsnr_stats.adapters import torch as gt

    import gsnr_stats as gs

    out = []
    for tag, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        model = _mlp32().to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        rows = []
        path = where / f"acc{tag}.h5"
        with gt.TrainingMoments(path, model, optimizer=opt):
            for x, y in batches:
                x = x.to(dtype)
                rows.append(gt.per_sample_gradients(
                    model, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y,
                    fast=False).astype(np.float64))
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        G = np.concatenate(rows)
        mu = G.mean(0)
        var = ((G - mu) ** 2).sum(0) / (G.shape[0] - 1)
        st = gs.reduce(path)
        got = st["var"].values[0, 0]
        live = var > 0  # dead ReLU units: variance 0 on both routes (checked exactly)
        dead_ok = bool(np.all(got[~live] == 0))
        out.append((tag, _rel(st["mean"].values[0, 0], mu),
                    float(np.max(np.abs(got[live] - var[live]) / var[live]))
                    if dead_ok else float("inf")))
    return out


def training(args: argparse.Namespace, where: Path) -> str:
    """The in-training table (see the module docstring)."""
    import torch

    if args.extras:
        sys.path.insert(0, args.extras)
    torch.set_num_threads(args.train_threads)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(args.batch, 784, generator=gen),
                torch.randint(0, 10, (args.batch,), generator=gen))
               for _ in range(args.train_batches)]
    cells = _training_cells(batches, where)
    for fn in cells.values():  # warm-up (numba compile, BackPACK/cockpit first calls)
        if callable(fn):
            fn()
    best: dict[str, float] = {}
    ratios: dict[str, list[float]] = {k: [] for k in cells}
    rounds = max(args.repeats + 1, args.train_rounds)
    for r in range(rounds):
        base_r = None
        for key, fn in cells.items():
            # cockpit is ~100x a step: two rounds of it are plenty
            if callable(fn) and not (key.startswith("cockpit") and r >= 2):
                dt = fn()
                best[key] = min(best.get(key, float("inf")), dt)
                base_r = dt if base_r is None else base_r
                ratios[key].append(dt / base_r)  # vs the baseline run just before
                gc.collect()
    base = best["plain step (baseline)"]
    lines = [f"in-training moments: MLP 784-512-256-10, batch {args.batch}, float32, SGD, "
             f"torch threads {args.train_threads}, {args.train_batches} steps per run, "
             f"{rounds} interleaved rounds (each cell's ratio to the baseline run of the same "
             "round: median; and the ratio of the best times)",
             "", "| method | best ms / step | x plain step (median of rounds) | "
             "x plain step (best / best) |", "|---|---:|---:|---:|"]
    for key, fn in cells.items():
        if callable(fn):
            lines.append(f"| {key} | {best[key] * 1e3:.2f} | "
                         f"{float(np.median(ratios[key])):.2f} | {best[key] / base:.2f} |")
        else:
            lines.append(f"| {key} | {fn} | - | - |")
    if FLUSH_TIMES:
        lines += ["", f"TrainingMoments.flush (writing one window's record, P = 535,818): "
                      f"{min(FLUSH_TIMES) * 1e3:.1f} ms, once per window (epoch / k steps), "
                      "not in ms / step"]
    acc = training_accuracy(batches[:3], where)
    lines += ["", "TrainingMoments vs float64 two-pass of torch.func per-sample gradients "
              "(3 batches):", ""]
    lines += [f"- {tag} model: max rel err mean {m:.1e}, var {v:.1e}" for tag, m, v in acc]
    return "\n".join(lines)


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
    p.add_argument("--training", action="store_true", help="only the in-training table")
    p.add_argument("--train-threads", type=int, default=1, help="torch threads, in-training")
    p.add_argument("--train-batches", type=int, default=4, help="steps per in-training run")
    p.add_argument("--train-rounds", type=int, default=12, help="interleaved in-training rounds")
    p.add_argument("--extras", default=None,
                   help="directory with backpack/cockpit (pip install --no-deps --target)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.batches, args.repeats = 32, 1, 1
    where = Path(tempfile.mkdtemp(prefix="gsnr-bench-moments-", dir=args.dir))
    t0 = time.perf_counter()
    try:
        if args.training:
            print(training(args, where))
            return 0
        rows = bench(args, where)
        print(table(rows, args))
        print()
        print(training(args, where))
    finally:
        shutil.rmtree(where, ignore_errors=True)
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
