"""The house rules of DESIGN §2 and the README's code map, checked on the source.

Imports are read from the AST of every module of the package (``gsnr_stats/`` and
``adapters/``, installed as ``gsnr_stats.adapters``), function-level imports included and
``if TYPE_CHECKING:`` blocks excluded (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for base, pkg in ((ROOT / "gsnr_stats", "gsnr_stats"), (ROOT / "adapters", "gsnr_stats.adapters")):
        for p in sorted(base.rglob("*.py")):
            parts = list(p.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = p
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _walk(node: ast.AST):
    """``ast.walk`` that skips the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for c in child.orelse:
                yield c
                yield from _walk(c)
            continue
        yield child
        yield from _walk(child)


def _imports(mod: str, path: Path) -> set[str]:
    """Fully qualified names this module imports (modules, or ``module.name``)."""
    is_pkg = path.name == "__init__.py"
    package = mod if is_pkg else mod.rpartition(".")[0]
    out: set[str] = set()
    for n in _walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = package.split(".")
                base = base[: len(base) - (n.level - 1)]
                src = ".".join(base + ([n.module] if n.module else []))
            else:
                src = n.module or ""
            out.add(src)
            out.update(f"{src}.{a.name}" for a in n.names)
    return out


def _graph() -> dict[str, set[str]]:
    """Edges between modules of the package (``from . import x`` counts as importing x)."""
    g: dict[str, set[str]] = {}
    for mod, path in MODULES.items():
        deps = set()
        for name in _imports(mod, path):
            # the longest prefix that is one of our modules
            parts = name.split(".")
            for k in range(len(parts), 0, -1):
                cand = ".".join(parts[:k])
                if cand in MODULES:
                    if cand != mod:
                        deps.add(cand)
                    break
        g[mod] = deps
    return g


def _parents(mod: str) -> set[str]:
    """Packages whose ``__init__`` runs before ``mod``: importing them is not a cycle."""
    parts = mod.split(".")
    return {".".join(parts[:k]) for k in range(1, len(parts))}


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        color[u] = 1
        stack.append(u)
        for v in sorted(g[u]):
            if v in _parents(u):
                continue  # e.g. store/reader importing gsnr_stats.errors through the package
            if color.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if color.get(v) is None and (c := visit(v)):
                return c
        stack.pop()
        color[u] = 2
        return None

    for u in sorted(g):
        if color.get(u) is None and (c := visit(u)):
            return c
    return None


def test_the_graph_reader_sees_known_edges():
    """The checker itself: it finds edges that exist, or the tests below prove nothing."""
    g = _graph()
    assert "gsnr_stats.engine" in g["gsnr_stats.distributed"]
    assert "gsnr_stats.store.views" in g["gsnr_stats.store.reader"]
    assert "gsnr_stats.adapters._torch_engine" in g["gsnr_stats.adapters._torch_fast"]
    assert "gsnr_stats.kernels" in g["gsnr_stats.store.schema"]
    # a planted cycle is reported
    assert _cycle({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}}) == ["a.x", "a.y", "a.z", "a.x"]


def test_no_import_cycle_inside_the_package():
    cyc = _cycle(_graph())
    assert cyc is None, "import cycle: " + " -> ".join(cyc or [])


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_only_the_store_knows_hdf5_bytes(mod):
    """No module outside ``gsnr_stats/store/`` imports h5py or mmap: byte layout is the store's."""
    if mod.startswith("gsnr_stats.store"):
        return
    bad = {n for n in _imports(mod, MODULES[mod])
           if n.split(".")[0] in ("h5py", "mmap")}
    assert not bad, f"{mod} imports {sorted(bad)}; read through gsnr_stats.store instead"


def test_arrows_point_one_way():
    """DESIGN §2's dependency directions."""
    g = _graph()

    def reach(u: str) -> set[str]:
        seen, todo = set(), [u]
        while todo:
            for v in g[todo.pop()]:
                if v not in seen and v not in _parents(u):
                    seen.add(v)
                    todo.append(v)
        return seen

    # the engine and the store never reach up to the front door or the Dask backend
    for low in ("gsnr_stats.engine", "gsnr_stats.store", "gsnr_stats.kernels"):
        assert not reach(low) & {"gsnr_stats.reduce", "gsnr_stats.distributed"}, low
    assert "gsnr_stats.reduce" not in reach("gsnr_stats.distributed")
    # closed forms, groups and intervals work on Datasets only
    for pure in ("gsnr_stats.theory", "gsnr_stats.groups", "gsnr_stats.uncertainty"):
        r = reach(pure)
        assert not {m for m in r if m.startswith("gsnr_stats.store")}, pure
        assert "gsnr_stats.estimators" not in r and "gsnr_stats.engine" not in r, pure
    # kernels import nothing of ours; the store never imports analytics
    assert reach("gsnr_stats.kernels") == set()
    assert not reach("gsnr_stats.store") - {m for m in MODULES if m.startswith("gsnr_stats.store")} \
        - {"gsnr_stats.errors", "gsnr_stats.kernels", "gsnr_stats._version"}
    # adapters are above the core: no core module imports an adapter at module level
    for mod in MODULES:
        if mod.startswith("gsnr_stats.adapters") or mod in ("gsnr_stats.studies",
                                                            "gsnr_stats.inmemory"):
            continue  # studies builds the sklearn comparisons, inmemory runs the adapters'
            # recorders into memory, on purpose (lazily, inside functions)
        assert not {d for d in g[mod] if d.startswith("gsnr_stats.adapters")}, mod


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if not m.startswith("gsnr_stats.adapters")))
def test_the_core_never_imports_a_framework(mod):
    bad = {n for n in _imports(mod, MODULES[mod])
           if n.split(".")[0] in ("torch", "jax", "flax", "equinox", "optax", "lightning")}
    assert not bad, f"{mod} imports {sorted(bad)}"


def test_numba_kernels_live_in_kernels_py():
    """Every ``@njit`` function is in ``gsnr_stats/kernels.py``."""
    where = []
    for mod, path in MODULES.items():
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.FunctionDef):
                for d in n.decorator_list:
                    f = d.func if isinstance(d, ast.Call) else d
                    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                    if name in ("njit", "jit", "vectorize", "guvectorize", "stencil"):
                        where.append(f"{mod}.{n.name}")
    assert where and all(w.startswith("gsnr_stats.kernels.") for w in where), where


def test_only_theory_keeps_a_lazy_compatibility_shim():
    """``importlib.import_module`` hides edges from the checks above: allowed only in the
    documented shim that keeps old ``gsnr_stats.theory.<name>`` paths working."""
    users = {mod for mod, p in MODULES.items() if "import_module(" in p.read_text()}
    assert users <= {"gsnr_stats.theory"}, users


def test_no_file_over_the_size_guide():
    """~800 lines per file (the README's code map says why any exception must be one file)."""
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 850}
    assert not big, big


@pytest.mark.parametrize("compression", [None, "lzf"])
def test_reduce_enters_the_store_to_open_and_then_only_consumes_views(tmp_path, compression):
    """One ``gs.reduce`` of one file: every call from outside ``gsnr_stats/store/`` into it
    is opening/validating the shard, asking for a record's view, or consuming that view
    (its chunk rows, loss, attributes); nothing reads HDF5 datasets or offsets directly."""
    import sys

    import numpy as np

    import gsnr_stats as gs

    p = tmp_path / "run.h5"
    rng = np.random.default_rng(0)
    # chunks of 64 KiB: HDF5 aligns them, so uncompressed rows are mapped, lzf rows copied
    P = 2500
    with gs.GradientWriter(p, [("w", (P,))], chunks=(16, 1024), compression=compression) as w:
        for step in range(2):
            w.write(step, "train", rng.normal(size=(40, P)).astype(np.float32))
            w.write(step, "train", rng.normal(size=(9, P)).astype(np.float32))
    store_dir = str(ROOT / "gsnr_stats" / "store")
    calls: list[tuple[str, str]] = []

    def prof(frame, event, arg):
        if event != "call":
            return
        f = frame.f_code.co_filename
        caller = frame.f_back.f_code.co_filename if frame.f_back else ""
        if f.startswith(store_dir) and not caller.startswith(store_dir) \
                and caller.startswith(str(ROOT / "gsnr_stats")):
            calls.append((Path(caller).name, frame.f_code.co_qualname))

    sys.setprofile(prof)
    try:
        ds = gs.reduce(p, blocks=2)
    finally:
        sys.setprofile(None)
    assert ds["count"].values.tolist() == [[49], [49]]
    entered = {q for _, q in calls}
    allowed = {
        # open and validate (once per shard)
        "expand_paths", "open_store", "GradientStore.__init__", "GradientStore.check_chunks",
        "check_same_layout", "GradientStore.close",
        # planning: which records, how big (metadata already loaded at open)
        "GradientStore.records", "GradientStore.has", "GradientStore.record",
        "GradientStore.attrs", "Layout.n_params", "Layout.hash", "Layout.to_json",
        "Layout.tensor_of_param", "Layout.layer_of_param",
        # the one door per record, and consuming what it hands out
        "GradientStore.view", "RecordView.__init__", "RecordView.__enter__",
        "RecordView.__exit__", "RecordView.close", "RecordView.iter_rows", "RecordView.loss",
        "RecordView.meta", "ChunkRows.mapped", "data_checksum",
    }
    assert entered <= allowed, sorted(entered - allowed)
    assert ("engine.py", "GradientStore.view") in calls  # the views path was the one taken
    with gs.open_store(p) as s, s.view(0, "train") as v:  # and the kind of rows expected
        assert {r.mapped for r in v} == {compression is None}
    n_views = sum(q == "GradientStore.view" for _, q in calls)
    assert n_views == 2  # one per record


def test_every_package_is_in_the_distribution():
    # a wheel holds only the packages pyproject lists: gsnr_stats.store was missing once
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = cfg.get("package-dir", {})
    found = {"gsnr_stats." + ".".join(p.parent.relative_to(ROOT / "gsnr_stats").parts)
             if p.parent != ROOT / "gsnr_stats" else "gsnr_stats"
             for p in (ROOT / "gsnr_stats").rglob("__init__.py")}
    found |= {name + "".join("." + q for q in p.parent.relative_to(ROOT / d).parts)
              for name, d in dirs.items() for p in (ROOT / d).rglob("__init__.py")}
    assert found == listed
