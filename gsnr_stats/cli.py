"""Command line: ``gsnr-stats info | reduce | osgr | plot | report | demo``.

Every command knows the three kinds of file it meets (:func:`sniff`) and does the sensible
thing with each, or says what it expects:

==========  =====================  =======================  ==========================
command     store(s) ``.h5``       stats ``.nc`` (reduce)   report directory
==========  =====================  =======================  ==========================
info        records, layout, runs  its steps, splits, runs  its stats.nc and files
reduce      reduced                refused: already reduced refused: has stats.nc
osgr, plot  reduced first          used                     its stats.nc used
report      reduced (with blocks)  used                     its stats.nc used
==========  =====================  =======================  ==========================

Exit codes: 0 success; 1 the data are bad (a damaged store, non-finite gradients, shards
whose records disagree; ``info`` met a missing or bad file, or shards ``reduce`` would
refuse);
2 the command line is wrong — an option's value, a missing file or one of the wrong kind,
an output that cannot be written, an optional extra not installed — said in one line that
names the argument; 130 interrupted. Global flags (``-v``) go anywhere on the line.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._dsutil import MOMENTS, default_n, held_out_split, output_dir, output_file
from .errors import (
    BlocksError,
    GSNRError,
    MissingDependencyError,
    MissingSplitError,
    SchemaError,
    ShardSetError,
    StoreError,
    UsageError,
)

log = logging.getLogger("gsnr_stats")

_HDF5 = b"\x89HDF\r\n\x1a\n"
_OUT = "argument -o/--output"


# -- the three kinds of file ----------------------------------------------------------------


def _stats_check(path: Path, engine: str | None) -> tuple[str, str]:
    """``("stats", "")`` for a netCDF holding the moments of ``reduce``, else why not."""
    import xarray as xr

    try:
        with xr.open_dataset(path, engine=engine) as ds:  # lazy: names only
            missing = [v for v in MOMENTS if v not in ds.variables]
            if missing:
                return "netcdf", (f"a netCDF without the variables {missing} of "
                                  "`gsnr-stats reduce`")
            return "stats", ""
    except Exception as e:  # whatever a foreign file makes the netCDF libraries say
        return "other", f"not readable as netCDF ({type(e).__name__}: {str(e)[:120]})"


def sniff(path: str | os.PathLike[str]) -> tuple[str, str]:
    """The kind of a file and, when it is none of ours, why.

    Returns
    -------
    (kind, detail)
        ``kind`` is ``"store"``, ``"stats"`` (a netCDF written by ``reduce``), ``"report"``
        (a directory with ``stats.nc``), ``"damaged"`` (a store that fails validation:
        ``detail`` is the reader's error), ``"missing"``, ``"dir"`` (another directory),
        ``"netcdf"`` (a netCDF of something else), ``"unreadable"`` or ``"other"``.
        HDF5 files go to the store reader first: the netCDF libraries never see a store.
    """
    from .store import is_store, open_store

    p = Path(path)
    if not os.path.lexists(p):
        return "missing", "no such file or directory"
    if p.is_dir():
        if (p / "stats.nc").is_file():
            return "report", ""
        return "dir", "a directory without stats.nc (not a report directory)"
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return "unreadable", e.strerror or str(e)
    if head == _HDF5:
        if not is_store(p):  # HDF5 with no gsnr-stats format attribute: a netCDF-4 file?
            return _stats_check(p, "h5netcdf")  # h5py underneath: no netCDF-C on odd HDF5
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                open_store(p).close()
            return "store", ""
        except StoreError as e:
            return "damaged", str(e)
    if head[:3] == b"CDF":
        return _stats_check(p, None)
    return "other", "neither HDF5 nor netCDF"


def _expand(items: Sequence[str], what: str) -> list[Path]:
    """Globs expanded; a pattern matching nothing or a missing file is a usage error."""
    from .store import expand_paths

    try:
        paths = expand_paths(list(items))
    except StoreError as e:
        raise UsageError(f"argument {what}: {e}") from e
    for p in paths:
        if not os.path.lexists(p):
            raise UsageError(f"argument {what}: {p}: no such file or directory")
    return paths


def _load_stats(path: Path) -> Any:
    import xarray as xr

    with open(path, "rb") as f:
        engine = "h5netcdf" if f.read(8) == _HDF5 else None
    return xr.load_dataset(path, engine=engine)


def _stats_input(args: argparse.Namespace, blocks: int | None = None) -> Any:
    """The moments Dataset of the ``stats`` argument: a stats netCDF, a report directory
    (its ``stats.nc``) or stores (reduced here)."""
    from .reduce import reduce

    paths = _expand([args.stats], "STATS")
    kinds = [sniff(p) for p in paths]
    if len(paths) == 1 and kinds[0][0] in ("stats", "report"):
        p = paths[0] / "stats.nc" if kinds[0][0] == "report" else paths[0]
        return _load_stats(p)
    if all(k in ("store", "damaged") for k, _ in kinds):
        log.info("reducing %s", ", ".join(map(str, paths)))
        return reduce(paths, allow_mixed_runs=getattr(args, "allow_mixed_runs", False))
    bad = next((p, k, d) for p, (k, d) in zip(paths, kinds, strict=True)
               if k not in ("store", "damaged") or len(paths) > 1)
    raise UsageError(f"argument STATS: {bad[0]} is {_what(bad[1], bad[2])}; expected the "
                     "netCDF written by `gsnr-stats reduce`, a report directory or stores (.h5)")


def _what(kind: str, detail: str) -> str:
    return {"stats": "a stats netCDF", "report": "a report directory",
            "store": "a gradient store"}.get(kind, detail or kind)


@contextmanager
def _blame(*rules: tuple[type[UsageError], str]) -> Iterator[None]:
    """Name the command-line argument behind a library's usage error (first rule that fits)."""
    try:
        yield
    except UsageError as e:
        if not str(e).startswith("argument "):
            for cls, arg in rules:
                if isinstance(e, cls):
                    raise type(e)(f"argument {arg}: {e}") from e
        raise


# -- writing outputs ------------------------------------------------------------------------


def _write_netcdf(ds: Any, out: Path) -> None:
    """Write next to ``out`` and rename: a failed write leaves no half file behind."""
    from ._cf import label_encoding

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        label_encoding(ds).to_netcdf(tmp)  # labels as CF char arrays, also of a re-read .nc
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR):
            raise UsageError(f"{_OUT}: cannot write {out}: {e.strerror}") from e
        raise GSNRError(f"cannot write {out}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- commands ------------------------------------------------------------------------------


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return str(nbytes)


def _info_stats(path: Path, label: str = "") -> None:
    """What a stats netCDF holds: size, provenance, records, whether intervals are possible."""
    ds = _load_stats(path)
    a = ds.attrs
    print(f"{label or path}  ({_human(path.stat().st_size)}) stats netCDF written by "
          f"gsnr-stats {a.get('library_version', '?')} (reduce)")
    K = ds.sizes.get("block", 0) if "block_mean" in ds else 0
    print(f"  P={ds.sizes.get('param', 0)}, {ds.sizes.get('step', 0)} steps x "
          f"{ds.sizes.get('split', 0)} splits, ddof {a.get('ddof', '?')}, "
          + (f"{K} jackknife blocks" if K else "no per-block moments (no intervals)"))
    print(f"  run {a.get('run_id', '?')}, framework {a.get('framework', '?')}")
    if a.get("sources"):
        print(f"  reduced from {a['sources']}")
    for st in ds["step"].values:
        cells = []
        for sp in ds["split"].values:
            c = int(ds["count"].sel(step=st, split=sp))
            if c:
                cells.append(f"{str(sp)} n={c}")
        print(f"    step {int(st):>8}  " + ", ".join(cells))


def _info_store(store: Any) -> None:
    a = store.attrs
    lay = store.layout
    print(f"{store.path}  ({_human(store.file_size())})")
    print(f"  format {a['format']} v{a['format_version']}, written by gsnr-stats "
          f"{a['library_version']}, framework {a['framework']} {a['framework_version']}")
    print(f"  created {a['created_at']}, run {a['run_id']}")
    if a["user_attrs"]:
        print(f"  attrs {a['user_attrs']}")
    comp = store.grads_compression or "none"
    print(f"  layout: {len(lay.names)} tensors, P={lay.n_params}, hash {lay.hash[:12]}, "
          f"dtype {store.grads_dtype}, chunks {store.grads_chunks}, compression {comp}")
    for n, sh, layer, o in zip(lay.names, lay.shapes, lay.layers, lay.offsets, strict=True):
        print(f"    {n:<32} {str(tuple(sh)):<20} layer {layer:<20} offset {o}")
    for line in store.describe_factors():  # format 4: factored tensors and the saving
        print(line)
    print(f"  records: {len(store.records)} complete")
    for r in store.records:
        extra = f" lr={r.lr:g}" if r.lr == r.lr else ""
        extra += f" epoch={r.epoch:g}" if r.epoch == r.epoch else ""
        extra += f" optimizer_step={r.optimizer_step}" if r.optimizer_step is not None else ""
        try:  # v3 metadata: the optimizer's class, as the recorder stored it
            opt = store.record_meta(r.step, r.split).get("optimizer")
            if isinstance(opt, dict) and "class" in opt:
                extra += f" optimizer={opt['class']}"
        except StoreError as e:  # damaged metadata: say so, list the rest
            extra += f" METADATA UNREADABLE ({e})"
        print(f"    step {r.step:>8}  {r.split:<12} {r.kind:<10} n={r.n_samples}{extra}")
    if store.incomplete:
        print(f"  INCOMPLETE records (skipped by every reader): {len(store.incomplete)}")
        for r in store.incomplete:
            print(f"    step {r.step:>8}  {r.split:<12} {r.kind:<10} "
                  f"n={r.n_samples} written before the writer stopped")
    debris = {k: v for k, v in store.debris.items() if v}
    if debris:
        print("  debris past the last completed record (ignored by readers): "
              + ", ".join(f"{k}: {v}" for k, v in debris.items()))
    traj, probes = store.trajectory(), store.probes()
    if len(traj["step"]) or len(probes["step"]):
        print(f"  trajectory rows: {len(traj['step'])}, probe rows: {len(probes['step'])}")


def _merge_problems(stores: Sequence[Any], allow_mixed_runs: bool) -> list[str]:
    """Why ``reduce`` would refuse to merge these shards (``[]``: it would merge them)."""
    from .engine import same_files, shard_set_problems

    hashes: dict[str, str] = {}
    for s in stores:
        hashes.setdefault(s.layout.hash, str(s.path))
    if len(hashes) > 1:
        return ["layouts differ: " + ", ".join(f"{h[:12]} in {p}" for h, p in hashes.items())]
    out = []
    try:
        same_files([s.path for s in stores])
    except UsageError as e:
        out.append(str(e))
    seen: dict[tuple[int, int], None] = {}
    distinct = []
    for s in stores:  # copies and mixed runs among distinct files
        st = os.stat(s.path)
        if (st.st_dev, st.st_ino) not in seen:
            seen[(st.st_dev, st.st_ino)] = None
            distinct.append(s)
    return out + shard_set_problems(distinct, allow_mixed_runs=allow_mixed_runs)


def cmd_info(args: argparse.Namespace) -> int:
    from .store import expand_paths, open_store
    from .store._process import temp_files

    try:  # a missing file is reported with the bad ones (info tells the state of each file)
        paths = expand_paths(list(args.stores))
    except StoreError as e:
        raise UsageError(f"argument FILE: {e}") from e
    bad: list[str] = []
    stores: list[Any] = []
    try:
        for path in paths:
            kind, detail = sniff(path)
            if kind == "stats":
                _info_stats(path)
                continue
            if kind == "report":
                order = {".md": 0, ".html": 1, ".png": 2}  # the page, its HTML twin, figures
                files = sorted((f.name for f in path.iterdir() if f.suffix in order),
                               key=lambda n: (order[Path(n).suffix], n))
                print(f"{path}  report directory: {', '.join(files) or 'no page yet'}")
                _info_stats(path / "stats.nc", f"  {path / 'stats.nc'}")
                continue
            for tmp, alive in temp_files(path):
                state = {True: "its writer is still running", False: "its writer died "
                         "before publishing the file; the next writer of this path removes it",
                         None: "written on another host"}[alive]
                print(f"{path}  temporary file {tmp.name}: {state}")
            try:
                if kind == "missing":
                    raise StoreError(f"{path}: no such file or directory")
                if kind not in ("store", "damaged"):
                    raise StoreError(f"{path}: {detail}; not a gsnr-stats store, stats netCDF "
                                     "or report directory")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    store = open_store(path)
            except StoreError as e:
                if len(paths) == 1:
                    raise
                print(f"{path}  BAD SHARD: {e}")
                bad.append(str(path))
                continue
            stores.append(store)
            _info_store(store)
        refused = _merge_problems(stores, args.allow_mixed_runs) if len(stores) > 1 else []
        if len(stores) > 1 or bad:
            print(f"{len(stores) + len(bad)} shards: {len(stores)} valid, {len(bad)} bad")
            runs: dict[str, int] = {}
            for s in stores:
                runs[str(s.attrs["run_id"])] = runs.get(str(s.attrs["run_id"]), 0) + 1
            print("  run ids: " + ", ".join(f"{r} ({k} shard{'s' * (k > 1)})"
                                            for r, k in runs.items()))
            for why in refused:
                print(f"  NOT MERGED (reduce refuses these shards): {why}")
            if not refused and stores:
                merged: dict[tuple[int, str], int] = {}
                for s in stores:
                    for r in s.records:
                        merged[(r.step, r.split)] = merged.get((r.step, r.split), 0) + r.n_samples
                print(f"  merged records: {len(merged)}")
                for (step, split), n in sorted(merged.items()):
                    print(f"    step {step:>8}  {split:<12} n={n}")
    finally:
        for s in stores:
            s.close()
    return 1 if bad or refused else 0


def _quiet_dask() -> None:
    """Dask logs its cluster's life cycle at INFO (and harmless tracebacks on close)."""
    import distributed  # noqa: F401 - creates its loggers

    for name in list(logging.root.manager.loggerDict):
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _reduce_inputs(items: Sequence[str]) -> list[Path]:
    """Store files for ``reduce``: other kinds are refused up front where cheap to tell."""
    paths = _expand(items, "STORES")
    for p in paths:
        # a store is validated by reduce itself; only directories, non-HDF5 files and
        # *.nc names are sniffed here (a stats netCDF is HDF5 too)
        if p.is_dir() or p.suffix == ".nc" or not _is_hdf5(p):
            kind, _ = sniff(p)
            _refuse_for_reduce(p, kind)
    return paths


def _is_hdf5(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(8) == _HDF5
    except OSError:
        return False


def _refuse_for_reduce(p: Path, kind: str) -> None:
    if kind == "stats":
        raise UsageError(f"argument STORES: {p} is a stats netCDF, already reduced; reduce "
                         "takes store files (.h5) — pass the .nc to osgr, plot or report")
    if kind == "report":
        raise UsageError(f"argument STORES: {p} is a report directory (its moments are in "
                         f"{p / 'stats.nc'}); reduce takes store files (.h5)")
    if kind == "dir":
        raise UsageError(f"argument STORES: {p} is a directory; reduce takes store files "
                         f"(.h5) or globs such as '{p / '*.h5'}'")


def _check_selection(paths: Sequence[Path], steps: Sequence[int] | None,
                     splits: Sequence[str] | None) -> None:
    """:class:`UsageError` naming ``--steps``/``--splits`` if they ask for absent records.

    Called after ``reduce`` failed, so a successful run opens no store twice. Stores this
    process cannot open are left out (their own error is the one reported).
    """
    from .store import open_store

    if steps is None and splits is None:
        return
    keys: dict[tuple[int, str], None] = {}
    for p in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                st = open_store(p)
        except GSNRError:
            continue
        with st:
            keys.update(dict.fromkeys((r.step, r.split) for r in st.records))
    if not keys:
        return
    if steps is not None:
        have = sorted({k[0] for k in keys})
        absent = sorted(set(steps) - set(have))
        if absent:
            raise UsageError(f"argument --steps: {', '.join(map(str, absent))} not in the "
                             f"stores (available: {', '.join(map(str, have))})")
        keys = {k: None for k in keys if k[0] in set(steps)}
    if splits is not None:
        have_s = sorted({k[1] for k in keys})
        absent_s = [s for s in dict.fromkeys(splits) if s not in have_s]
        if absent_s:
            where = "the selected steps" if steps is not None else "the stores"
            raise UsageError(f"argument --splits: {', '.join(map(repr, absent_s))} not in "
                             f"{where} (available: {', '.join(have_s)})")


def cmd_reduce(args: argparse.Namespace) -> int:
    from .reduce import reduce

    if args.scheduler and args.workers:
        raise UsageError("argument --scheduler: not allowed with --workers; give either "
                         "--workers (a local cluster) or --scheduler (an existing one), not both")
    scheduler: object = None
    client = None
    if args.scheduler or args.workers:
        from . import distributed

        distributed.require_dask("--workers/--scheduler")
        if args.scheduler and args.scheduler != "processes":
            try:
                distributed._scheduler_address(args.scheduler)
            except MissingDependencyError:
                raise
            except GSNRError as e:
                raise UsageError(f"argument --scheduler: {e}") from e
    out = output_file(args.output, _OUT)
    paths = _reduce_inputs(args.stores)
    if args.scheduler or args.workers:
        from .distributed import local_client

        if not args.verbose:
            _quiet_dask()
        scheduler = args.scheduler or None
        if args.workers:
            client = local_client(args.workers)
            scheduler = client
    try:
        with _blame((ShardSetError, "STORES"), (BlocksError, "--blocks")):
            stats = reduce(
                paths, steps=args.steps, splits=args.splits, ddof=args.ddof,
                nonfinite=args.nonfinite, blocks=args.blocks or None, progress=not args.quiet,
                scheduler=scheduler, skip_bad=args.skip_bad,
                allow_mixed_runs=args.allow_mixed_runs,
            )
    except SchemaError as e:  # an HDF5 input that is not a store: is it a stats netCDF?
        from .store import is_store

        for p in paths:
            if str(p) in str(e) and not is_store(p):
                _refuse_for_reduce(p, sniff(p)[0])
        raise
    except StoreError:  # --steps/--splits naming absent data is a user mistake (exit 2)
        _check_selection(paths, args.steps, args.splits)
        raise
    finally:
        if client is not None:
            cluster = client.cluster
            client.close()
            cluster.close()
    _write_netcdf(stats, out)
    if not args.quiet:
        print(f"wrote {out}: {stats.sizes['step']} steps x {stats.sizes['split']} splits x "
              f"{stats.sizes['param']} parameters")
    return 0


def cmd_osgr(args: argparse.Namespace) -> int:
    from . import estimators, theory

    out = output_file(args.output, _OUT, "osgr.nc") if args.output else None
    first = _expand(args.first_order, "--first-order") if args.first_order else None
    with _blame((ShardSetError, "STATS")):
        stats = _stats_input(args)
    splits = [str(s) for s in stats["split"].values]
    split = args.split or [held_out_split(splits)]
    n = args.n or [default_n(stats)]
    with _blame((MissingSplitError, "--split")):
        res = theory.osgr(stats, n=n, split=split, debias=not args.no_debias, by=args.by)
    print(f"theoretical OSGR R(n), moments of {', '.join(split)}, n = "
          f"{', '.join(map(str, n))}:")
    print(res["osgr"].to_dataframe().to_string())
    if first:
        tsplit = args.split[0] if args.split else args.pools[0]
        # the measurement beside the theory: one streaming pass over the stored gradients
        with _blame((MissingSplitError, "--pools"), (ShardSetError, "--first-order"),
                    (UsageError, "-n")):
            fo = estimators.osgr_first_order(
                first, n=n, splits=tuple(args.pools), n_subsets=args.subsets, seed=args.seed,
                stats=stats, theory_split=tsplit, debias=not args.no_debias,
                allow_mixed_runs=args.allow_mixed_runs,
            )
        print(f"first-order OSGR, D from {args.pools[0]!r}, D' from {args.pools[1]!r}, "
              f"{args.subsets} subsets (theory from {tsplit!r}):")
        print(fo[["osgr_first_order", "osgr_se", "osgr_theory"]].to_dataframe().to_string())
        res = res.merge(fo.rename({"osgr_se": "osgr_first_order_se",
                                   "osgr_theory": "osgr_first_order_theory"}))
    if out is not None:
        _write_netcdf(res, out)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from . import plot

    out = output_dir(args.output, _OUT, create=False)  # save_all creates it
    with _blame((ShardSetError, "STATS")):
        stats = _stats_input(args)
    paths = plot.save_all(stats, out, lr=args.lr, lr_rule=args.lr_rule,
                          steps_per_checkpoint=args.steps_per_checkpoint)
    for p in paths:
        print(p)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = output_dir(args.output, _OUT, create=False)  # write_report creates it
    paths = _expand(args.stores, "STORES")
    kinds = [sniff(p)[0] if p.is_dir() or p.suffix == ".nc" or not _is_hdf5(p) else "store"
             for p in paths]
    src: Any = paths
    if any(k in ("stats", "report") for k in kinds):
        if len(paths) > 1:
            raise UsageError("argument STORES: give store files, or one stats netCDF or one "
                             "report directory, not a mix")
        src = paths[0] if kinds[0] == "report" or paths[0].suffix == ".nc" \
            else _load_stats(paths[0])
    else:
        for p, k in zip(paths, kinds, strict=True):
            if k in ("dir", "netcdf", "other", "unreadable"):
                raise UsageError(f"argument STORES: {p} is {_what(k, sniff(p)[1])}; expected "
                                 "store files (.h5), a stats netCDF or a report directory")
    if args.blocks == 1:
        raise UsageError("argument --blocks: a jackknife needs at least 2 blocks; give 0 (no "
                         "intervals) or K >= 2")
    with _blame((MissingSplitError, "--split"), (ShardSetError, "STORES")):
        page = write_report(src, out, n=args.n, blocks=args.blocks or None, split=args.split,
                            by=args.by, lr=args.lr, lr_rule=args.lr_rule,
                            steps_per_checkpoint=args.steps_per_checkpoint,
                            allow_mixed_runs=args.allow_mixed_runs)
    print(page)
    print(page.with_suffix(".html"))  # the same page in one self-contained file
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output_dir(args.output, _OUT, create=False), quick=args.quick)
    return 0


# -- the parser ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (naming the argument) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(lo: int, what: str) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
        return v

    parse.__name__ = what  # argparse names the type in its messages
    return parse


_POS = _int_at_least(1, "must be a positive integer")
_NONNEG = _int_at_least(0, "must be an integer >= 0")


def _gap_options(s: argparse.ArgumentParser) -> None:
    """Options of the theoretical gap shared by ``plot`` and ``report`` (docs/theory.md)."""
    s.add_argument("--lr", type=float, default=None,
                   help="learning rate of the theoretical gap (default: the recorded one)")
    s.add_argument("--lr-rule", choices=("nominal", "momentum"), default="nominal",
                   help="lambda of the gap: the nominal lr, or lr/(1-momentum) for SGD with "
                        "momentum (docs/theory.md, 'Which λ'; default: nominal)")
    s.add_argument("--steps-per-checkpoint", type=_POS, nargs="+", default=None,
                   help="optimizer steps between checkpoints (default: the recorded "
                        "optimizer_step, else the step labels, with a warning)")


def _n_option(s: argparse.ArgumentParser) -> None:
    s.add_argument("-n", type=_POS, nargs="+", default=None,
                   help="training-set sizes n of the modelled step (default: the largest "
                        "sample count of the train split)")


_SPLIT_HELP = "split whose moments feed the OSGR (default: test, else a split other than train)"
_MIXED_HELP = ("pool shards of different runs (run_id); refused by default, since a glob "
               "catching a second run would silently merge it")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    common = _Parser(add_help=False)
    # default SUPPRESS: the flag after the subcommand does not reset one given before it
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress details (and show the traceback of an unexpected "
                             "error); accepted anywhere on the line")
    p = _Parser(prog="gsnr-stats",
                description="GSNR, OSGR and generalization-gap analytics on saved per-sample "
                            "gradients")
    p.add_argument("--version", action="version", version=f"gsnr-stats {__version__}",
                   help="print the version and exit")
    p.add_argument("-v", "--verbose", action="store_true", default=False,
                   help="log progress details (and show the traceback of an unexpected "
                        "error); accepted anywhere on the line")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                           help="what to do (gsnr-stats COMMAND --help for its options)")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    s = command("info", "records, sample counts, layout, runs and size of stores; summary of "
                        "a stats netCDF or a report directory")
    s.add_argument("stores", nargs="+", metavar="FILE",
                   help="store files or glob patterns, a stats netCDF or a report directory; "
                        "several shards get a merged summary when reduce would merge them, "
                        "bad ones are reported by name (exit status 1)")
    s.add_argument("--allow-mixed-runs", action="store_true", help=_MIXED_HELP)
    s.set_defaults(func=cmd_info)

    s = command("reduce", "per-parameter moments and GSNR of stores -> netCDF")
    s.add_argument("stores", nargs="+", metavar="STORES",
                   help="store files (shards of one run) or glob patterns")
    s.add_argument("-o", "--output", required=True,
                   help="output netCDF file (missing directories are created)")
    s.add_argument("--steps", type=int, nargs="+", default=None,
                   help="reduce only these steps (default: all)")
    s.add_argument("--splits", nargs="+", default=None,
                   help="reduce only these splits (default: all)")
    s.add_argument("--ddof", type=int, choices=(0, 1), default=1,
                   help="delta degrees of freedom of the variance (default: 1)")
    s.add_argument("--nonfinite", choices=("raise", "omit"), default="raise",
                   help="NaN/Inf gradients: fail naming them, or drop them per parameter "
                        "(default: raise)")
    s.add_argument("--blocks", type=_NONNEG, default=0,
                   help="keep K sample blocks for jackknife confidence intervals (default: 0, "
                        "none; report uses 8)")
    s.add_argument("--workers", type=_POS, default=None,
                   help="run on a local Dask cluster of N single-threaded worker processes "
                        "(needs the 'distributed' extra)")
    s.add_argument("--scheduler", default=None,
                   help="address of an existing Dask scheduler (tcp://host:8786), or "
                        "'processes' (needs the 'distributed' extra)")
    s.add_argument("--skip-bad", action="store_true",
                   help="skip shards that fail validation instead of failing the run")
    s.add_argument("--allow-mixed-runs", action="store_true", help=_MIXED_HELP)
    s.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no summary line")
    s.set_defaults(func=cmd_reduce)

    s = command("osgr", "theoretical one-step generalization ratio (and the first-order "
                        "measurement)")
    s.add_argument("stats", metavar="STATS",
                   help="netCDF written by `gsnr-stats reduce`, a report directory, or stores "
                        "(reduced first)")
    _n_option(s)
    s.add_argument("--split", nargs="+", default=None, help=_SPLIT_HELP + "; several allowed")
    s.add_argument("--by", choices=("model", "tensor", "layer"), default=None,
                   help="OSGR per group of parameters (default: the whole model)")
    s.add_argument("--no-debias", action="store_true", help="use m^2 instead of m^2 - s^2/N")
    s.add_argument("--first-order", nargs="+", metavar="STORE", default=None,
                   help="also measure the first-order OSGR from these stores (shards pooled)")
    s.add_argument("--pools", nargs=2, metavar=("A", "B"), default=("train", "test"),
                   help="splits of D and D' for --first-order (default: train test)")
    s.add_argument("--subsets", type=_POS, default=64,
                   help="subset pairs for --first-order (default: 64)")
    s.add_argument("--seed", type=int, default=0,
                   help="seed of the --first-order subset draws (default: 0)")
    s.add_argument("--allow-mixed-runs", action="store_true", help=_MIXED_HELP)
    s.add_argument("-o", "--output", default=None,
                   help="also write the results as a netCDF file")
    s.set_defaults(func=cmd_osgr)

    s = command("plot", "PNG figures of GSNR, OSGR and gap")
    s.add_argument("stats", metavar="STATS",
                   help="netCDF written by `gsnr-stats reduce`, a report directory, or stores "
                        "(reduced first)")
    s.add_argument("-o", "--output", required=True,
                   help="output directory (created if missing)")
    _gap_options(s)
    s.add_argument("--allow-mixed-runs", action="store_true", help=_MIXED_HELP)
    s.set_defaults(func=cmd_plot)

    s = command("report", "one-page summary of a run: report.md, a self-contained report.html, "
                         "the figures and stats.nc")
    s.add_argument("stores", nargs="+", metavar="STORES",
                   help="store files (shards) or glob patterns, one stats netCDF, or a report "
                        "directory")
    s.add_argument("-o", "--output", required=True, help="output directory (created if missing)")
    _n_option(s)
    s.add_argument("--blocks", type=_NONNEG, default=8,
                   help="sample blocks for jackknife intervals when reducing stores (default: "
                        "8; 0: none; at least 2 otherwise)")
    s.add_argument("--split", default=None, help=_SPLIT_HELP + " and the gap")
    s.add_argument("--by", default="layer",
                   help="grouping of the GSNR table: layer, tensor or model (default: layer)")
    _gap_options(s)
    s.add_argument("--allow-mixed-runs", action="store_true", help=_MIXED_HELP)
    s.set_defaults(func=cmd_report)

    s = command("demo", "end-to-end run on bundled data (netCDF + PNG figures)")
    s.add_argument("-o", "--output", default="out/demo",
                   help="output directory (default: out/demo)")
    s.add_argument("--quick", action="store_true", help="fewer epochs, for tests")
    s.set_defaults(func=cmd_demo)
    return p


# -- errors: one line each -----------------------------------------------------------------


def _raised_by_us(e: BaseException) -> bool:
    """Whether the innermost frame of ``e``'s traceback is in gsnr-stats' own code."""
    tb = e.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and Path(last).resolve().is_relative_to(Path(__file__).parent)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


@contextmanager
def _warnings_one_line(cmd: str) -> Iterator[None]:
    """Warnings as one line each, ``gsnr-stats <cmd>: warning: ...`` (no source lines)."""
    old = warnings.formatwarning
    warnings.formatwarning = (lambda message, category, *a, **k:  # type: ignore[assignment]
                              f"gsnr-stats {cmd}: warning: {_one_line(message)}"
                              f" [{category.__name__}]\n")
    try:
        yield
    finally:
        warnings.formatwarning = old


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gsnr-stats`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and usage errors (2)
        return int(e.code or 0) if isinstance(e.code, int | None) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    where = f"gsnr-stats {args.cmd}: error:"
    try:
        with _warnings_one_line(args.cmd):
            return int(args.func(args) or 0)
    except (UsageError, MissingDependencyError) as e:
        print(f"{where} {_one_line(e)}", file=sys.stderr)
        return 2
    except GSNRError as e:
        print(f"{where} {_one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:  # reading an input that went away, a full disk ...
        print(f"{where} {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, TypeError) as e:
        if args.verbose:
            raise
        if _raised_by_us(e):  # our checks of an argument's value: a usage error
            print(f"{where} {_one_line(e)}", file=sys.stderr)
            return 2
        print(f"{where} unexpected {type(e).__name__}: {_one_line(e)} (a bug? rerun with -v "
              "for the traceback and report it)", file=sys.stderr)
        return 1
    except Exception as e:
        if args.verbose:
            raise
        frames = traceback.extract_tb(e.__traceback__)
        at = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        print(f"{where} unexpected {type(e).__name__}{at}: {_one_line(e)} (a bug? rerun with "
              "-v for the traceback and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
