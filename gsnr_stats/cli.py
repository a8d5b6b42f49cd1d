"""Command line: ``gsnr-stats info | reduce | osgr | plot | report | demo``.

Exit codes: 0 success, 1 bad input (a :class:`GSNRError`: message on stderr, no traceback),
2 usage error (argparse).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .errors import GSNRError, StoreError

log = logging.getLogger("gsnr_stats")


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return str(nbytes)


def cmd_info(args: argparse.Namespace) -> int:
    from .store import expand_paths, open_store
    from .store._process import temp_files

    paths = expand_paths(args.stores)
    for path in paths:
        for tmp, alive in temp_files(path):
            state = {True: "its writer is still running", False: "its writer died before "
                     "publishing the file; the next writer of this path removes it",
                     None: "written on another host"}[alive]
            print(f"{path}  temporary file {tmp.name}: {state}")
    bad: list[str] = []
    merged: dict[tuple[int, str], int] = {}
    hashes: dict[str, str] = {}
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                store = open_store(path)
        except StoreError as e:
            if len(paths) == 1:
                raise
            print(f"{path}  BAD SHARD: {e}")
            bad.append(str(path))
            continue
        with store:
            hashes.setdefault(store.layout.hash, str(path))
            for r in store.records:
                merged[(r.step, r.split)] = merged.get((r.step, r.split), 0) + r.n_samples
            a = store.attrs
            lay = store.layout
            print(f"{path}  ({_human(store.file_size())})")
            print(f"  format {a['format']} v{a['format_version']}, written by gsnr-stats "
                  f"{a['library_version']}, framework {a['framework']} {a['framework_version']}")
            print(f"  created {a['created_at']}, run {a['run_id']}")
            if a["user_attrs"]:
                print(f"  attrs {a['user_attrs']}")
            comp = store.grads_compression or "none"
            print(f"  layout: {len(lay.names)} tensors, P={lay.n_params}, hash {lay.hash[:12]}, "
                  f"dtype {store.grads_dtype}, chunks {store.grads_chunks}, compression {comp}")
            for n, s, layer, o in zip(lay.names, lay.shapes, lay.layers, lay.offsets, strict=True):
                print(f"    {n:<32} {str(tuple(s)):<20} layer {layer:<20} offset {o}")
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
    if len(paths) > 1:
        print(f"{len(paths)} shards: {len(paths) - len(bad)} valid, {len(bad)} bad")
        if len(hashes) > 1:
            print("  LAYOUTS DIFFER (reduce refuses to merge): "
                  + ", ".join(f"{h[:12]} in {p}" for h, p in hashes.items()))
        print(f"  merged records: {len(merged)}")
        for (step, split), n in sorted(merged.items()):
            print(f"    step {step:>8}  {split:<12} n={n}")
    return 1 if bad else 0


def _quiet_dask() -> None:
    """Dask logs its cluster's life cycle at INFO (and harmless tracebacks on close)."""
    import distributed  # noqa: F401 - creates its loggers

    for name in list(logging.root.manager.loggerDict):
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def cmd_reduce(args: argparse.Namespace) -> int:
    from .reduce import reduce

    scheduler: object = None
    client = None
    if args.scheduler and args.workers:
        raise GSNRError("give either --workers (a local cluster) or --scheduler (an existing one)")
    if args.workers is not None and args.workers < 1:
        raise GSNRError(f"--workers must be >= 1, got {args.workers}")
    if args.scheduler or args.workers:
        try:
            from .distributed import local_client
        except ImportError as e:  # pragma: no cover - dask is an optional extra
            raise GSNRError(
                "--workers/--scheduler need Dask: pip install 'gsnr-stats[distributed]'"
            ) from e
        if not args.verbose:
            _quiet_dask()
        if args.scheduler:
            scheduler = args.scheduler
        else:
            client = local_client(args.workers)
            scheduler = client
    try:
        stats = reduce(
            args.stores,
            steps=args.steps,
            splits=args.splits,
            ddof=args.ddof,
            nonfinite=args.nonfinite,
            blocks=args.blocks,
            progress=not args.quiet,
            scheduler=scheduler,
            skip_bad=args.skip_bad,
        )
    finally:
        if client is not None:
            cluster = client.cluster
            client.close()
            cluster.close()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats.to_netcdf(out)
    if not args.quiet:
        print(f"wrote {out}: {stats.sizes['step']} steps x {stats.sizes['split']} splits x "
              f"{stats.sizes['param']} parameters")
    return 0


def cmd_osgr(args: argparse.Namespace) -> int:
    import xarray as xr

    from . import estimators, theory

    stats = xr.load_dataset(args.stats)
    res = theory.osgr(stats, n=args.n, split=args.split, debias=not args.no_debias, by=args.by)
    print(res["osgr"].to_dataframe().to_string())
    if args.first_order:
        # the measurement beside the theory: one streaming pass over the stored gradients
        fo = estimators.osgr_first_order(
            args.first_order, n=args.n, splits=tuple(args.pools), n_subsets=args.subsets,
            seed=args.seed, stats=stats, theory_split=args.split or args.pools[0],
            debias=not args.no_debias,
        )
        print(f"first-order OSGR, D from {args.pools[0]!r}, D' from {args.pools[1]!r}, "
              f"{args.subsets} subsets (theory from {args.split or args.pools[0]!r}):")
        print(fo[["osgr_first_order", "osgr_se", "osgr_theory"]].to_dataframe().to_string())
        res = res.merge(fo.rename({"osgr_se": "osgr_first_order_se",
                                   "osgr_theory": "osgr_first_order_theory"}))
    if args.output:
        res.to_netcdf(args.output)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    import xarray as xr

    from . import plot

    stats = xr.load_dataset(args.stats)
    paths = plot.save_all(stats, Path(args.output), lr=args.lr, lr_rule=args.lr_rule,
                          steps_per_checkpoint=args.steps_per_checkpoint)
    for p in paths:
        print(p)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    blocks = None if args.blocks == 0 else args.blocks
    page = write_report(args.stores, Path(args.output), n=args.n, blocks=blocks,
                        split=args.split, by=args.by, lr=args.lr, lr_rule=args.lr_rule,
                        steps_per_checkpoint=args.steps_per_checkpoint)
    print(page)
    return 0


def _gap_options(s: argparse.ArgumentParser) -> None:
    """Options of the theoretical gap shared by ``plot`` and ``report`` (docs/theory.md)."""
    s.add_argument("--lr", type=float, default=None,
                   help="learning rate of the theoretical gap (default: the recorded one)")
    s.add_argument("--lr-rule", choices=("nominal", "momentum"), default="nominal",
                   help="lambda of the gap: the nominal lr, or lr/(1-momentum) for SGD with "
                        "momentum (docs/theory.md, 'Which λ')")
    s.add_argument("--steps-per-checkpoint", type=int, nargs="+", default=None,
                   help="optimizer steps between checkpoints (default: the recorded "
                        "optimizer_step, else the step labels, with a warning)")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.output), quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(
        prog="gsnr-stats",
        description="GSNR, OSGR and generalization-gap analytics on saved per-sample gradients",
    )
    p.add_argument("--version", action="version", version=f"gsnr-stats {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("info", help="records, sample counts, layout, incomplete records, size")
    s.add_argument("stores", nargs="+",
                   help="store files or glob patterns; several shards get a merged summary, bad "
                        "ones are reported by name (exit status 1)")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("reduce", help="per-parameter moments and GSNR -> netCDF")
    s.add_argument("stores", nargs="+", help="store files (shards) or glob patterns")
    s.add_argument("-o", "--output", required=True, help="output netCDF file")
    s.add_argument("--steps", type=int, nargs="+", default=None)
    s.add_argument("--splits", nargs="+", default=None)
    s.add_argument("--ddof", type=int, choices=(0, 1), default=1)
    s.add_argument("--nonfinite", choices=("raise", "omit"), default="raise")
    s.add_argument("--blocks", type=int, default=None,
                   help="keep K sample blocks for jackknife confidence intervals")
    s.add_argument("--workers", type=int, default=None,
                   help="run on a local Dask cluster of N single-threaded worker processes")
    s.add_argument("--scheduler", default=None,
                   help="address of an existing Dask scheduler (tcp://host:8786), or 'processes'")
    s.add_argument("--skip-bad", action="store_true",
                   help="skip shards that fail validation instead of failing the run")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_reduce)

    s = sub.add_parser("osgr", help="theoretical one-step generalization ratio from stats")
    s.add_argument("stats", help="netCDF written by `gsnr-stats reduce`")
    s.add_argument("-n", type=int, nargs="+", required=True, help="training-set sizes")
    s.add_argument("--split", default=None, help="split whose moments to use (default: all)")
    s.add_argument("--by", choices=("tensor", "layer"), default=None)
    s.add_argument("--no-debias", action="store_true", help="use m^2 instead of m^2 - s^2/N")
    s.add_argument("--first-order", nargs="+", metavar="STORE", default=None,
                   help="also measure the first-order OSGR from these stores (shards pooled)")
    s.add_argument("--pools", nargs=2, metavar=("A", "B"), default=("train", "test"),
                   help="splits of D and D' for --first-order (default: train test)")
    s.add_argument("--subsets", type=int, default=64, help="subset pairs for --first-order")
    s.add_argument("--seed", type=int, default=0, help="seed of the subset draws")
    s.add_argument("-o", "--output", default=None, help="also write a netCDF")
    s.set_defaults(func=cmd_osgr)

    s = sub.add_parser("plot", help="PNG figures from a stats netCDF")
    s.add_argument("stats")
    s.add_argument("-o", "--output", required=True, help="output directory")
    _gap_options(s)
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("report", help="one-page summary (figures + Markdown) of stores")
    s.add_argument("stores", nargs="+",
                   help="store files (shards) or glob patterns, or one stats netCDF (.nc)")
    s.add_argument("-o", "--output", required=True, help="output directory")
    s.add_argument("-n", type=int, nargs="+", default=None,
                   help="training-set sizes n for the OSGR and gap (default: train count)")
    s.add_argument("--blocks", type=int, default=8,
                   help="sample blocks for jackknife intervals when reducing (0: none)")
    s.add_argument("--split", default=None,
                   help="split whose moments feed OSGR and gap (default: test)")
    s.add_argument("--by", default="layer", help="grouping: layer, tensor or model")
    _gap_options(s)
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("demo", help="end-to-end run on bundled data (netCDF + PNG figures)")
    s.add_argument("-o", "--output", default="out/demo")
    s.add_argument("--quick", action="store_true", help="fewer epochs, for tests")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gsnr-stats`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except GSNRError as e:
        print(f"gsnr-stats {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"gsnr-stats {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
