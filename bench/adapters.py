"""Adapter dump throughput: per-sample gradients into a store on disk, versus computing alone.

Models (CPU, batch 256 by default):

* MLP 784-512-256-10 (ReLU), P = 535,818
* CNN: two conv blocks (3->16->32 channels, 3x3, ReLU, 2x2 max-pool) + 2048-128-10, input
  3x32x32, P = 268,650

Columns, in samples per second:

* ``torch.func`` -- ``vmap(grad)`` of the per-sample loss with ``functional_call``, gradients
  computed and discarded (the reference the torch adapter is measured against);
* ``gsnr per_sample_gradients(fast=True, out=buf)`` -- the adapter's Linear/Conv route (one
  ordinary backward, :math:`g_i = \\delta_i a_i^\\top`) into a reused buffer, computing only;
* ``gsnr torch dump`` -- ``gsnr_stats.adapters.torch.Recorder`` writing every batch into an
  uncompressed float32 store (includes computing, host copies, HDF5 writes, final flush);
  by default through the Linear/Conv route straight into the writer's buffer, ``fast=False``
  through ``vmap`` + concatenation;
  ``disk``: the default writer (``direct_io="auto"``: page cache for the first GiB,
  ``O_DIRECT`` after); ``direct_io=True``: whole chunks written with ``O_DIRECT``
  throughout; ``direct_io=False``: through the page cache throughout; ``tmpfs``: into
  ``/dev/shm``;
* ``BackPACK BatchGrad`` / ``Opacus GradSampleModule`` -- the same per-sample gradients by
  those libraries (summed loss, so nothing is scaled by 1/B), when importable;
* ``jax vmap(grad)`` and ``gsnr jax dump`` -- the same for JAX (and its factored dump,
  kernels found on the per-example jaxpr, ``adapters/_jax_factors.py``);
* ``I/O ceiling`` -- ``GradientWriter.write`` of ready gradient arrays, nothing computed: the
  dump cannot beat it (a batch of the MLP is 256 x 535,818 x 4 B = 549 MB).
* ``gsnr torch dump keep='factors'`` -- a factored store (issue 15, ``docs/adapters.md``):
  each Linear's inputs and output gradients (the MLP: 2,330 numbers per sample instead of
  535,818; the CNN: its convolutions as per-sample columns, its two Linears factored).
  ``--factored`` runs only the MLP's row, ``torch.func``, and the sizes of the same records
  stored full and factored (a short run).

BackPACK and Opacus are not dependencies. To include them without touching the project's
environment, install them (no dependencies: they would pull another torch) into a separate
folder and point ``--extra-path`` (or ``GSNR_BENCH_EXTRA_PATH``) at it::

    python -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install --no-deps --target /tmp/benchdeps \\
        backpack-for-pytorch opacus einops unfoldnd
    python bench/adapters.py --extra-path /tmp/benchdeps

Before timing, each third-party result is checked against ``torch.func`` on one batch (the
"max rel err" column). Run: ``python bench/adapters.py [--quick]``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]


def _rate(n_samples: int, seconds: float) -> float:
    return n_samples / seconds if seconds > 0 else float("nan")


# --------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------


def torch_models() -> dict[str, tuple[Any, tuple[int, ...]]]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256),
                        nn.ReLU(), nn.Linear(256, 10))
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )
    return {"MLP 784-512-256-10": (mlp.eval(), (784,)),
            "CNN 2conv+2fc 3x32x32": (cnn.eval(), (3, 32, 32))}


def torch_func_grads(model: Any, loss_fn: Any) -> Callable[[Any, Any], dict[str, Any]]:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def one(p: dict[str, Any], x: Any, y: Any) -> Any:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)).sum()

    f = vmap(grad(one), in_dims=(None, 0, 0))
    return lambda x, y: f(params, x, y)


def time_batches(fn: Callable[[Any, Any], Any], batches: list[tuple[Any, Any]],
                 warmup: int = 1) -> float:
    for x, y in batches[:warmup]:
        fn(x, y)
    t0 = time.perf_counter()
    n = 0
    for x, y in batches[warmup:]:
        out = fn(x, y)
        del out
        n += len(x)
    return _rate(n, time.perf_counter() - t0)


def flat_torch(d: dict[str, Any], names: list[str]) -> np.ndarray:
    n = next(iter(d.values())).shape[0]
    import torch

    return torch.cat([d[k].reshape(n, -1) for k in names], 1).numpy()


def backpack_fn(model: Any) -> tuple[Callable[[Any, Any], Any], Callable[[Any, Any], Any]]:
    import copy

    from backpack import backpack, extend
    from backpack.extensions import BatchGrad
    from torch import nn

    m = extend(copy.deepcopy(model))
    lf = extend(nn.CrossEntropyLoss(reduction="sum"))  # sum: grad_batch not scaled by 1/B

    def run(x: Any, y: Any) -> dict[str, Any]:
        m.zero_grad()
        loss = lf(m(x), y)
        with backpack(BatchGrad()):
            loss.backward()
        return {k: p.grad_batch for k, p in m.named_parameters()}

    return run, run


def opacus_fn(model: Any) -> tuple[Callable[[Any, Any], Any], Callable[[Any, Any], Any]]:
    import copy
    import warnings

    from opacus import GradSampleModule
    from torch import nn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # opacus records activations in training mode only (these models have no
        # BatchNorm/Dropout, so train() changes nothing else)
        m = GradSampleModule(copy.deepcopy(model).train(), loss_reduction="sum")
    lf = nn.CrossEntropyLoss(reduction="sum")

    def run(x: Any, y: Any) -> dict[str, Any]:
        for p in m.parameters():
            p.grad = None
            p.grad_sample = None
        lf(m(x), y).backward()
        return {k.removeprefix("_module."): p.grad_sample for k, p in m.named_parameters()}

    return run, run


def torch_dump(model: Any, loss_fn: Any, batches: list[tuple[Any, Any]], where: Path,
               direct_io: bool | str = "auto", warmup: int = 1, fast: bool = True) -> float:
    from gsnr_stats.adapters import torch as gt

    path = where / "torch_dump.h5"
    with gt.open_writer(path, model, overwrite=True, direct_io=direct_io) as w:
        rec = gt.Recorder(w, model, loss_fn, fast=fast)
        rec.record(batches[:warmup], step=0, split="warmup")
        t0 = time.perf_counter()
        rec.record(batches[warmup:], step=1, split="train")
        n = sum(len(x) for x, _ in batches[warmup:])
        w.flush()
        dt = time.perf_counter() - t0
    path.unlink()
    return _rate(n, dt)


def torch_factored_dump(model: Any, loss_fn: Any, batches: list[tuple[Any, Any]], where: Path,
                        warmup: int = 1, sizes: dict[str, int] | None = None) -> float:
    """``Recorder(keep="factors")`` into a factored store (``open_writer(factors="auto")``:
    every Linear stored as its inputs and output gradients); the store's size in ``sizes``."""
    from gsnr_stats.adapters import torch as gt

    path = where / "torch_factored.h5"
    with gt.open_writer(path, model, overwrite=True, factors="auto", loss_fn=loss_fn,
                        example=batches[0]) as w:
        rec = gt.Recorder(w, model, loss_fn, keep="factors")
        rec.record(batches[:warmup], step=0, split="warmup")
        t0 = time.perf_counter()
        rec.record(batches[warmup:], step=1, split="train")
        n = sum(len(x) for x, _ in batches[warmup:])
        w.flush()
        dt = time.perf_counter() - t0
    if sizes is not None:
        sizes["factored"] = path.stat().st_size
    path.unlink()
    return _rate(n, dt)


def store_sizes(model: Any, loss_fn: Any, batches: list[tuple[Any, Any]],
                where: Path) -> tuple[int, int]:
    """Bytes of the same records (``batches``, one warm-up record + one) stored full and
    factored."""
    sizes: dict[str, int] = {}
    torch_factored_dump(model, loss_fn, batches, where, sizes=sizes)
    from gsnr_stats.adapters import torch as gt

    path = where / "torch_full.h5"
    with gt.open_writer(path, model, overwrite=True) as w:
        rec = gt.Recorder(w, model, loss_fn)
        rec.record(batches[:1], step=0, split="warmup")
        rec.record(batches[1:], step=1, split="train")
    full = path.stat().st_size
    path.unlink()
    return full, sizes["factored"]


def write_only(layout: list[tuple[str, tuple[int, ...]]], G: np.ndarray, nb: int,
               where: Path, direct_io: bool | str = "auto") -> float:
    """The I/O ceiling: ``GradientWriter.write`` of ready (n, P) float32 arrays, no compute.

    The rows sit in a buffer from ``GradientWriter.alloc_rows``, as in the torch recorder.
    """
    import gsnr_stats as gs

    path = where / "write_only.h5"
    with gs.GradientWriter(path, layout, overwrite=True, direct_io=direct_io) as w:
        buf = w.alloc_rows(G.shape[0])
        buf[:] = G
        G = buf
        w.write(0, "warmup", G)
        t0 = time.perf_counter()
        for _ in range(nb):
            w.write(1, "train", G)
        w.flush()
        dt = time.perf_counter() - t0
    path.unlink()
    return _rate(nb * G.shape[0], dt)


def best_of(cells: dict[str, Callable[[], float]], repeats: int,
            base: str) -> tuple[dict[str, float], dict[str, float]]:
    """Best rate of each cell, and its median ratio to the ``base`` cell run just before it.

    Each repeat runs every cell once, each right after a fresh run of ``base``: on a shared
    machine the load drifts over minutes, and a ratio of two adjacent runs is far less noisy
    than a ratio of two bests taken at different times.
    """
    best: dict[str, float] = {}
    ratios: dict[str, list[float]] = {k: [] for k in cells}
    for _ in range(repeats):
        for key, fn in cells.items():
            if key == base:
                continue
            b = cells[base]()
            gc.collect()
            rate = fn()
            gc.collect()
            best[base] = max(best.get(base, 0.0), b)
            best[key] = max(best.get(key, 0.0), rate)
            ratios[key].append(rate / b)
    ratios[base] = [1.0]
    return best, {k: float(np.median(v)) for k, v in ratios.items()}


FAST = "gsnr per_sample_gradients(fast=True, out=buf), compute only"
FACTORED = "gsnr torch dump keep='factors' -> factored store (disk)"


def bench_torch(args: argparse.Namespace, targets: dict[str, Path]) -> list[Row]:
    import torch
    from gsnr_stats.adapters import torch as gt
    from torch import nn

    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[Row] = []
    disk = next(iter(targets.values()))[0]
    lf = nn.CrossEntropyLoss(reduction="none")
    for mname, (model, shape) in torch_models().items():
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(args.batch, *shape, generator=gen),
                    torch.randint(0, 10, (args.batch,), generator=gen))
                   for _ in range(args.batches + 1)]
        names = [k for k, _ in model.named_parameters()]
        ref_fn = torch_func_grads(model, lf)
        ref = flat_torch(ref_fn(*batches[0]), names)
        # the recorder's way: one reused buffer, no fresh pages per batch
        out = np.empty_like(ref)
        fast_fn = lambda x, y, m=model, o=out: gt.per_sample_gradients(  # noqa: E731
            m, lf, x, y, fast=True, out=o)
        cells: dict[str, Callable[[], float]] = {
            "torch.func vmap(grad)": lambda f=ref_fn, b=batches: time_batches(f, b),
            FAST: lambda f=fast_fn, b=batches: time_batches(f, b)}
        errs_fast = float(np.abs(fast_fn(*batches[0]) - ref).max() / np.abs(ref).max())
        # issue 15: every Linear stored as its two factors (the CNN's convs as columns)
        cells[FACTORED] = lambda m=model, b=batches: torch_factored_dump(m, lf, b, disk)
        if args.factored:  # only the factored row (and its size): a short run
            rates, ratio = best_of({k: cells[k] for k in ("torch.func vmap(grad)", FACTORED)},
                                   args.repeats, "torch.func vmap(grad)")
            full, fac = store_sizes(model, lf, batches[:3], disk)
            for key, rate in rates.items():
                rows.append({"model": mname, "method": key, "rate": rate, "ratio": ratio[key]})
            rows.append({"model": mname, "method": "store size, full / factored (same records)",
                         "rate": None, "ratio": None,
                         "note": f"{full / 1e6:.1f} MB / {fac / 1e6:.2f} MB = "
                                 f"{full / fac:.0f}x smaller"})
            break
        for tname, (where, dio) in targets.items():
            cells[f"gsnr torch dump -> store ({tname})"] = (
                lambda m=model, b=batches, w=where, d=dio: torch_dump(m, lf, b, w, d))
        for tname, (where, dio) in targets.items():
            if dio == "auto":  # the vmap route, for comparison
                cells[f"gsnr torch dump, fast=False ({tname})"] = (
                    lambda m=model, b=batches, w=where, d=dio: torch_dump(m, lf, b, w, d,
                                                                         fast=False))
        lay = [(k, tuple(p.shape)) for k, p in model.named_parameters()]
        for tname, (where, dio) in targets.items():
            if dio == "auto" or where != disk:
                continue
            cells[f"(I/O ceiling: GradientWriter.write alone, {tname})"] = (
                lambda lay=lay, G=ref, w=where, d=dio: write_only(lay, G, args.batches, w, d))
        errs: dict[str, Any] = {"torch.func vmap(grad)": 0.0,
                                FAST: errs_fast}
        for label, maker in (("BackPACK BatchGrad", backpack_fn),
                             ("Opacus GradSampleModule", opacus_fn)):
            try:
                run, _ = maker(model)
            except ImportError as e:
                errs[label] = f"not importable ({e.name})"
                continue
            got = flat_torch(run(*batches[0]), names)
            errs[label] = float(np.abs(got - ref).max() / np.abs(ref).max())
            cells[label] = lambda r=run, b=batches: time_batches(r, b)
        rates, ratio = best_of(cells, args.repeats, "torch.func vmap(grad)")
        for key, rate in rates.items():
            rows.append({"model": mname, "method": key, "rate": rate, "ratio": ratio[key],
                         "err": errs.get(key)})
        for key, note in errs.items():
            if isinstance(note, str):
                rows.append({"model": mname, "method": key, "rate": None, "ratio": None,
                             "note": note})
    return rows


# --------------------------------------------------------------------------------------
# JAX
# --------------------------------------------------------------------------------------


def jax_models() -> dict[str, tuple[Any, Callable[..., Any], tuple[int, ...]]]:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)

    def dense(i: int, o: int) -> dict[str, np.ndarray]:
        return {"w": (rng.normal(size=(i, o)) / np.sqrt(i)).astype(np.float32),
                "b": np.zeros(o, np.float32)}

    def conv(i: int, o: int) -> dict[str, np.ndarray]:
        return {"w": (rng.normal(size=(o, i, 3, 3)) / np.sqrt(9 * i)).astype(np.float32),
                "b": np.zeros(o, np.float32)}

    def xent(logits: Any, y: Any) -> Any:
        return jax.nn.logsumexp(logits) - logits[y]

    mlp = {"fc1": dense(784, 512), "fc2": dense(512, 256), "fc3": dense(256, 10)}

    def mlp_loss(p: Any, x: Any, y: Any) -> Any:
        h = jax.nn.relu(x @ p["fc1"]["w"] + p["fc1"]["b"])
        h = jax.nn.relu(h @ p["fc2"]["w"] + p["fc2"]["b"])
        return xent(h @ p["fc3"]["w"] + p["fc3"]["b"], y)

    cnn = {"conv1": conv(3, 16), "conv2": conv(16, 32), "fc1": dense(2048, 128),
           "fc2": dense(128, 10)}

    def block(p: Any, h: Any) -> Any:
        h = jax.lax.conv_general_dilated(h, p["w"], (1, 1), "SAME",
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        h = jax.nn.relu(h + p["b"][None, :, None, None])
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2),
                                     "VALID")

    def cnn_loss(p: Any, x: Any, y: Any) -> Any:
        h = block(p["conv2"], block(p["conv1"], x[None]))
        h = jax.nn.relu(h.reshape(-1) @ p["fc1"]["w"] + p["fc1"]["b"])
        return xent(h @ p["fc2"]["w"] + p["fc2"]["b"], y)

    return {"MLP 784-512-256-10": (mlp, mlp_loss, (784,)),
            "CNN 2conv+2fc 3x32x32": (cnn, cnn_loss, (3, 32, 32))}


def jax_dump(params: Any, loss: Any, batches: list[tuple[Any, Any]], where: Path,
             direct_io: bool | str = "auto") -> float:
    from gsnr_stats.adapters import jax as gj

    path = where / "jax_dump.h5"
    with gj.open_writer(path, params, overwrite=True, direct_io=direct_io) as w:
        rec = gj.Recorder(w, loss, params)
        rec.record(params, batches[:1], step=0, split="warmup")
        t0 = time.perf_counter()
        rec.record(params, batches[1:], step=1, split="train")
        w.flush()
        dt = time.perf_counter() - t0
    path.unlink()
    return _rate(sum(len(x) for x, _ in batches[1:]), dt)


def jax_factored_dump(params: Any, loss: Any, batches: list[tuple[Any, Any]],
                      where: Path) -> float:
    """``Recorder(keep="factors")`` into a factored store (kernels found on the jaxpr)."""
    from gsnr_stats.adapters import jax as gj

    path = where / "jax_factored.h5"
    with gj.open_writer(path, params, overwrite=True, factors="auto", loss_fn=loss,
                        example=batches[0]) as w:
        rec = gj.Recorder(w, params, loss, keep="factors")
        rec.record(batches[:1], 0, "warmup")
        t0 = time.perf_counter()
        rec.record(batches[1:], 1, "train")
        w.flush()
        dt = time.perf_counter() - t0
    path.unlink()
    return _rate(sum(len(x) for x, _ in batches[1:]), dt)


def bench_jax(args: argparse.Namespace, targets: dict[str, Path]) -> list[Row]:
    import jax

    rows: list[Row] = []
    disk = next(iter(targets.values()))[0]
    for mname, (params, loss, shape) in jax_models().items():
        rng = np.random.default_rng(1)
        batches = [(rng.normal(size=(args.batch, *shape)).astype(np.float32),
                    rng.integers(0, 10, args.batch)) for _ in range(args.batches + 1)]
        f = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))
        cells: dict[str, Callable[[], float]] = {
            "jax jit(vmap(grad))": lambda f=f, p=params, b=batches: time_batches(
                lambda x, y: jax.block_until_ready(f(p, x, y)), b)}
        for tname, (where, dio) in targets.items():
            cells[f"gsnr jax dump -> store ({tname})"] = (
                lambda p=params, lo=loss, b=batches, w=where, d=dio: jax_dump(p, lo, b, w, d))
        cells["gsnr jax dump keep='factors' -> factored store (disk)"] = (
            lambda p=params, lo=loss, b=batches, w=disk: jax_factored_dump(p, lo, b, w))
        rates, ratio = best_of(cells, args.repeats, "jax jit(vmap(grad))")
        for key, rate in rates.items():
            rows.append({"model": mname, "method": key, "rate": rate, "ratio": ratio[key],
                         "err": None})
    return rows


# --------------------------------------------------------------------------------------


def table(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"batch {args.batch}, {args.batches} timed batches per cell, CPU "
        f"({os.cpu_count()} cores), float32 gradients, uncompressed store",
        "",
        "| model | method | samples/s (best) | x own vmap(grad) (median, paired) "
        "| max rel err vs torch.func |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        rate = "n/a" if r.get("rate") is None else f"{r['rate']:.0f}"
        ratio = "n/a" if r.get("ratio") is None else f"{r['ratio']:.2f}"
        err = r.get("note") or ("" if r.get("err") is None else f"{r['err']:.1e}")
        lines.append(f"| {r['model']} | {r['method']} | {rate} | {ratio} | {err} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batch 32, 1 timed batch, 1 repeat")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=6, help="timed batches per cell")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--extra-path", default=os.environ.get("GSNR_BENCH_EXTRA_PATH", ""),
                   help="folder with backpack/opacus installed outside the project env")
    p.add_argument("--dir", default=None, help="where stores are written (temp dir)")
    p.add_argument("--skip", nargs="*", default=[], choices=["torch", "jax"])
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats, best kept")
    p.add_argument("--no-tmpfs", action="store_true", help="do not also dump to /dev/shm")
    p.add_argument("--no-direct-io", action="store_true",
                   help="only the default writer: no direct_io=True / False cells")
    p.add_argument("--factored", action="store_true",
                   help="only the MLP's factored dump vs torch.func, and the store sizes")
    args = p.parse_args(argv)
    if args.factored:
        args.skip = ["jax"]
    if args.quick:
        args.batch, args.batches, args.repeats = 32, 1, 1
    if args.extra_path:
        sys.path.append(args.extra_path)
    warnings.filterwarnings("ignore", category=UserWarning)  # backpack/opacus hook chatter
    disk = Path(tempfile.mkdtemp(prefix="gsnr-bench-", dir=args.dir))
    targets = {"disk": (disk, "auto")}
    if not args.no_direct_io:
        targets["disk, direct_io=True"] = (disk, True)
        targets["disk, direct_io=False"] = (disk, False)
    shm = Path("/dev/shm")
    if not args.no_tmpfs and shm.is_dir() and os.access(shm, os.W_OK):
        targets["tmpfs"] = (Path(tempfile.mkdtemp(prefix="gsnr-bench-", dir=shm)), False)
    rows: list[Row] = []
    t0 = time.perf_counter()
    try:
        if "torch" not in args.skip:
            rows += bench_torch(args, targets)
        if "jax" not in args.skip:
            rows += bench_jax(args, targets)
    finally:
        for where, _ in targets.values():
            shutil.rmtree(where, ignore_errors=True)
    print(table(rows, args))
    print(f"\n(total {time.perf_counter() - t0:.0f} s; {args.repeats} repeats; samples/s: best "
          "run; ratio: median over repeats of the cell's rate over its own vmap(grad) run just "
          "before it; disk = a temp dir on the working filesystem, default writer "
          "(direct_io='auto': page cache for the first GiB, O_DIRECT after); direct_io=True: "
          "O_DIRECT throughout; direct_io=False: page cache throughout; tmpfs = /dev/shm)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
