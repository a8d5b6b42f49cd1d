"""Hostile factored stores (format 4, issue 15): crafted, damaged and mislabelled files.

Every outcome is one of ours: :class:`SchemaError`/:class:`StoreError` naming the file and,
where there is one, the record and the factor; or a read whose values equal the undamaged
file's. Crafted files are edited with h5py (valid HDF5), so they are checked in-process.
"""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

import gsnr_stats as gs
from gsnr_stats.cli import main as cli_main

PARAMS = [("fc.weight", (6, 5)), ("fc.bias", (6,)), ("norm", (3,)), ("seq.weight", (4, 6))]
FACTORS = [("fc.weight", "fc.bias"), gs.FactorSpec("seq.weight", rows=3)]
N = 12


@pytest.fixture
def good(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "good.h5"
    with gs.GradientWriter(path, PARAMS, factors=FACTORS, chunks=(4, 3)) as w:
        for step in range(2):
            for _ in range(2):
                n = N // 2
                w.write(step, "train", rng.normal(size=(n, 3)), loss=np.arange(n),
                        factors={"fc.weight": (rng.normal(size=(n, 5)), rng.normal(size=(n, 6))),
                                 "seq.weight": (rng.normal(size=(n, 2, 6)),
                                                rng.normal(size=(n, 2, 4)))})
    return path


def edit(src, dst, fn):
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        fn(f)
    return dst


def expect(path, exc, pattern):
    with pytest.raises(exc, match=pattern):
        gs.open_store(path)
    assert cli_main(["info", str(path)]) == 1


def _replace(f, name, **kw):
    del f[name]
    f.create_dataset(name, **kw)


def _set_factors(f, fn):
    items = json.loads(f.attrs["factors"])
    fn(items)
    f.attrs["factors"] = json.dumps(items)


@pytest.mark.parametrize("case, pattern", [
    (lambda f: _replace(f, "factors/0/a", data=np.zeros((2 * N, 1, 4), "<f4")),
     r"factor 0 \('fc.weight'\) dataset 'factors/0/a' has shape \(24, 1, 4\)"),
    (lambda f: _replace(f, "factors/1/delta", data=np.zeros((2 * N, 2, 4), "<f4")),
     r"factor 1 \('seq.weight'\) dataset 'factors/1/delta' has shape"),
    (lambda f: _replace(f, "factors/1/a", data=np.zeros((2 * N, 3, 6), "<f8")),
     r"factor 1 \('seq.weight'\) dataset 'factors/1/a' has dtype float64"),
    (lambda f: _replace(f, "factors/0/a", data=np.zeros((2 * N, 1, 5), ">f4")),
     r"'factors/0/a' has dtype >f4"),
    (lambda f: _replace(f, "factors/0/delta", data=np.zeros((2 * N, 6), "<f4")),
     r"'factors/0/delta' has shape \(24, 6\)"),
    (lambda f: f.__delitem__("factors/1/delta"), r"'factors/1/delta' is missing"),
    (lambda f: f.__delitem__("factors"), "group 'factors' is missing"),
    (lambda f: f.create_group("factors/2"), r"group 'factors' holds \['0', '1', '2'\]"),
    (lambda f: f.attrs.__delitem__("factors"), "root attribute 'factors' is missing"),
    (lambda f: f.attrs.__setitem__("factors", "[{nope"), "factors attribute is not valid JSON"),
    (lambda f: f.attrs.__setitem__("factors", "[]"), "non-empty JSON list"),
    (lambda f: f.attrs.__setitem__("factors", json.dumps([{"weight": "fc.weight"}])),
     "lacks weight/bias/out/in/rows/dtype"),
    (lambda f: _set_factors(f, lambda it: it[0].update({"out": 7})),
     r"factor 0 \('fc.weight'\) says out/in 7/5"),
    (lambda f: _set_factors(f, lambda it: it[0].update({"weight": "ghost"})),
     "factor 'ghost': no such tensor"),
    (lambda f: _set_factors(f, lambda it: it[0].update({"bias": "norm"})),
     "bias 'norm' has shape"),
    (lambda f: _set_factors(f, lambda it: it[1].update({"bias": "fc.bias"})),
     "bias 'fc.bias' has shape|named by two factors"),
    (lambda f: _set_factors(f, lambda it: it[1].update({"weight": "fc.weight"})),
     "named by two factors"),
    (lambda f: _set_factors(f, lambda it: it[1].update({"dtype": "float64"})), "mix dtypes"),
    (lambda f: _set_factors(f, lambda it: it[0].update({"dtype": "int8"})), "bad weight name or dtype"),
    (lambda f: _set_factors(f, lambda it: it[1].update({"rows": 0})), "rows must be an integer"),
    (lambda f: _set_factors(f, lambda it: it[1].update({"rows": 4})),
     r"'factors/1/a' has shape \(24, 3, 6\), expected \(n, 4, 6\)"),
    (lambda f: _set_factors(f, lambda it: it.pop(1)), r"n_plain attribute 3 does not match.*27"),
    (lambda f: f.attrs.__setitem__("n_plain", 4), "n_plain attribute 4 does not match"),
    (lambda f: f.attrs.__setitem__("format_version", 3), "grads has 3 columns, layout has 63 parameters"),
])
def test_crafted_factored_files_are_refused(good, tmp_path, case, pattern):
    expect(edit(good, tmp_path / "bad.h5", case), gs.SchemaError, "bad.h5: .*" + pattern)


def test_links_inside_the_factor_groups_are_refused(good, tmp_path):
    def ext(f):
        del f["factors/0/a"]
        f["factors/0/a"] = h5py.ExternalLink("/etc/passwd", "/x")

    expect(edit(good, tmp_path / "ext.h5", ext), gs.SchemaError,
           "ext.h5: /factors/0/a is an external link")

    def soft(f):
        del f["factors/1/delta"]
        f["factors/1/delta"] = h5py.SoftLink("/factors/0/delta")

    expect(edit(good, tmp_path / "soft.h5", soft), gs.SchemaError,
           "soft.h5: /factors/1/delta is a soft link")

    def group_link(f):
        f.move("factors/1", "elsewhere")
        f["factors/1"] = h5py.SoftLink("/elsewhere")

    expect(edit(good, tmp_path / "grp.h5", group_link), gs.SchemaError,
           "grp.h5: /factors/1 is a soft link")


def test_virtual_and_external_factor_storage_is_refused(good, tmp_path):
    src = tmp_path / "src.h5"
    with h5py.File(src, "w") as f:
        f["x"] = np.zeros((2 * N, 1, 5), "<f4")

    def vds(f):
        lay = h5py.VirtualLayout(shape=(2 * N, 1, 5), dtype="<f4")
        lay[:] = h5py.VirtualSource(str(src), "x", shape=(2 * N, 1, 5))
        del f["factors/0/a"]
        f["factors/0"].create_virtual_dataset("a", lay)

    expect(edit(good, tmp_path / "vds.h5", vds), gs.SchemaError,
           "vds.h5: /factors/0/a is a virtual dataset")
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"\0" * 4 * 2 * N * 3 * 4)

    def external(f):
        del f["factors/1/delta"]
        f["factors/1"].create_dataset("delta", (2 * N, 3, 4), dtype="<f4",
                                      external=[(str(raw), 0, 4 * 2 * N * 12)])

    expect(edit(good, tmp_path / "extraw.h5", external), gs.SchemaError, "external files")


def test_factor_rows_shorter_than_the_records_claim(good, tmp_path):
    def shrink(f):
        f["factors/1/a"].resize(N, axis=0)

    expect(edit(good, tmp_path / "short.h5", shrink), gs.SchemaError,
           r"short.h5: completed records cover 24 rows of factors/1/a, the file holds 12")


def test_factor_memory_bomb_is_refused(good, tmp_path):
    """A factor dataset claiming the records' rows without the bytes behind them."""
    def bomb(f):
        _replace(f, "factors/0/a", shape=(2 * N, 1, 5), dtype="<f4", chunks=(1, 1, 5))

    expect(edit(good, tmp_path / "bomb.h5", bomb), gs.SchemaError,
           r"bomb.h5: records claim 24 rows of factor 0 \('fc.weight'\) dataset 'factors/0/a', "
           "more than its stored bytes")

    def huge(f):
        # a layout whose factored weight is 2**40 values, a tiny file: refused before any read
        lay = json.loads(f.attrs["layout"])
        lay[0]["shape"] = [2**20, 2**20]
        off = 0
        for it in lay:
            it["size"] = int(np.prod(it["shape"]))
            it["offset"] = off
            off += it["size"]
        text = json.dumps(lay, separators=(",", ":"))
        f.attrs["layout"] = text
        f.attrs["layout_hash"] = gs.Layout.from_json(text, "x").hash
        _set_factors(f, lambda it: it[0].update({"out": 2**20, "in": 2**20, "bias": None}))
        for name, width in (("a", 2**20), ("delta", 2**20)):
            _replace(f, f"factors/0/{name}", shape=(2 * N, 1, width), dtype="<f4",
                     chunks=(1, 1, 1024))
        f.attrs["n_plain"] = 9  # fc.bias is plain now

    p = edit(good, tmp_path / "huge.h5", huge)
    with pytest.raises(gs.SchemaError, match="huge.h5: "):
        gs.open_store(p)


def _flip_in(path, name, row):
    with h5py.File(path, "r") as f:
        ds = f[name]
        info = ds.id.get_chunk_info_by_coord((row // ds.chunks[0] * ds.chunks[0], 0, 0))
        off = info.byte_offset + (row % ds.chunks[0]) * ds.dtype.itemsize * int(
            np.prod(ds.shape[1:]))
    with open(path, "r+b") as fh:
        fh.seek(off + 2)
        b = fh.read(1)
        fh.seek(off + 2)
        fh.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("name, row, step", [("factors/0/a", 1, 0), ("factors/1/delta", 20, 1),
                                             ("factors/0/delta", 13, 1)])
def test_damaged_factor_bytes_name_the_record(good, tmp_path, name, row, step):
    p = tmp_path / "flip.h5"
    shutil.copy(good, p)
    _flip_in(p, name, row)
    other = 1 - step
    with gs.open_store(good) as ref, gs.open_store(p) as s:
        # the undamaged record reads as before, bit for bit
        np.testing.assert_array_equal(s.read_grads(other, "train"), ref.read_grads(other, "train"))
        pat = rf"flip.h5: record \(step={step}, split='train'\): loss/sample_id/label/factors"
        for read in (s.read_factors, s.read_grads, s.read_loss, s.read_label):
            with pytest.raises(gs.StoreError, match=pat):
                read(step, "train")
        with pytest.raises(gs.StoreError, match=pat):
            list(s.iter_grads(step, "train", rows=3))
        with pytest.raises(gs.StoreError, match=pat):
            s.read_grads_rows(step, "train", row - N * step, row - N * step + 1)


def test_damaged_plain_columns_are_detected(good, tmp_path):
    p = tmp_path / "plain.h5"
    shutil.copy(good, p)
    with h5py.File(p, "r") as f:
        off = f["grads"].id.get_chunk_info_by_coord((0, 0)).byte_offset
    with open(p, "r+b") as fh:
        fh.seek(off + 1)
        b = fh.read(1)
        fh.seek(off + 1)
        fh.write(bytes([b[0] ^ 0x08]))
    with gs.open_store(p) as s:
        with pytest.raises(gs.StoreError, match=r"record \(step=0, split='train'\): gradients"):
            s.read_grads(0, "train")
        with pytest.raises(gs.StoreError, match=r"record \(step=0, split='train'\): gradients"):
            s.read_plain_rows(0, "train")


def test_random_byte_flips_never_crash(good, tmp_path):
    """Random damage anywhere in a factored file: our error or the undamaged values."""
    rng = np.random.default_rng(11)
    data = good.read_bytes()
    with gs.open_store(good) as ref:
        want = {k: ref.read_grads(k, "train") for k in (0, 1)}
    for i in range(25):
        bad = np.frombuffer(data, np.uint8).copy()
        pos = rng.integers(0, len(bad), size=8)
        bad[pos] ^= rng.integers(1, 256, size=8).astype(np.uint8)
        p = tmp_path / f"r{i}.h5"
        p.write_bytes(bad.tobytes())
        try:
            with gs.open_store(p) as s:
                for k in (0, 1):
                    if s.has(k, "train"):
                        np.testing.assert_array_equal(s.read_grads(k, "train"), want[k])
        except gs.GSNRError as e:
            assert str(p) in str(e)
