"""Per-record optimizer metadata (issue 12): ``optimizer_step`` and ``meta`` in the store.

The learning rate was read from one param group and the optimizer's kind was lost; ``step``
is free-form, so the number of optimizer updates between checkpoints could not be known.
Format 3 stores each record's optimizer update count and a JSON object (the optimizer's
class and per-group hyper-parameters) crash-safely with its completion marker, reads them
back exactly, keeps reading v1/v2 files, refuses hostile metadata with our errors, and
``reduce`` carries them into the Dataset (``optimizer_step`` coordinate, ``optimizer``
attribute).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

import gsnr_stats as gs
from gsnr_stats.errors import SchemaError, StoreError
from gsnr_stats.store import GradientWriter, open_store
from gsnr_stats.store.schema import (
    FORMAT_VERSION,
    META_MAX_BYTES,
    TABLES,
    TABLES_V2,
    bytes_crc,
    row_crc,
)

PARAMS = [("fc.weight", (3, 4)), ("fc.bias", (3,))]
P = 15


def torch_meta(lr: float = 0.1, momentum: float = 0.9) -> dict:
    """Metadata as the torch recorder writes it (SGD with momentum, one group)."""
    return {
        "optimizer": {
            "class": "SGD", "module": "torch.optim.sgd",
            "groups": [{"lr": lr, "momentum": momentum, "dampening": 0, "weight_decay": 5e-4,
                        "nesterov": False, "params": ["fc.weight", "fc.bias"]}],
        },
        "framework": "torch 2.13.0",
    }


def grads(step: int, n: int = 6) -> np.ndarray:
    return np.random.default_rng(step).normal(size=(n, P))


def _open(path: Path) -> gs.GradientStore:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_store(path)


# -- writer API and round trip -------------------------------------------------------------

def test_meta_and_optimizer_step_round_trip_through_every_write_path(tmp_path):
    path = tmp_path / "s.h5"
    adam = {"optimizer": {"class": "Adam", "module": "torch.optim.adam", "groups": [
        {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
         "amsgrad": False, "params": ["fc.weight"]},
        {"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
         "amsgrad": False, "params": ["fc.bias"]}]}, "note": "ünïcode ✓", "none": None}
    with GradientWriter(path, PARAMS) as w:
        w.write(0, "train", grads(0), lr=0.1, optimizer_step=0, meta=torch_meta())
        with w.record(1, "train", lr=0.1, optimizer_step=20, meta=adam) as r:
            r.write(grads(1)[:3])
            r.write(grads(1)[3:])
        w.write_moments(2, "train", 6, np.zeros(P), np.ones(P), optimizer_step=40,
                        meta=torch_meta(0.05))
        w.write(2, "test", grads(2))  # no metadata at all
        w.write(3, "train", grads(3))
        w.end_record(3, "train", optimizer_step=60, meta={"k": 1})
    with _open(path) as s:
        assert s.version == FORMAT_VERSION == 3
        got = {(r.step, r.split): (r.optimizer_step, s.record_meta(r.step, r.split))
               for r in s.records}
    # the raw bytes in the file are the UTF-8 JSON of what was given (independent read)
    with h5py.File(path, "r", locking=False) as f:
        raw = f["record_meta"][()].tobytes()
    assert got == {(0, "train"): (0, torch_meta()), (1, "train"): (20, adam),
                   (2, "train"): (40, torch_meta(0.05)), (2, "test"): (None, {}),
                   (3, "train"): (60, {"k": 1})}
    want = b"".join(json.dumps(m, ensure_ascii=False, separators=(",", ":")).encode()
                    # completion order: record() block, end_record, then close() in write order
                    for m in (adam, {"k": 1}, torch_meta(), torch_meta(0.05)))
    assert raw == want
    # RecordInfo keeps its positional fields; optimizer_step is the new last one
    r0 = _open(path).records[0]
    assert (r0.step, r0.split, r0.kind, r0.n_samples, r0.lr) == (0, "train", "gradients", 6, 0.1)
    assert gs.store.RecordInfo(0, "a", "gradients", 1).optimizer_step is None


def test_last_value_given_for_a_record_wins(tmp_path):
    path = tmp_path / "s.h5"
    with GradientWriter(path, PARAMS) as w:
        with w.record(0, "train", optimizer_step=5, meta={"v": 1}) as r:
            r.write(grads(0)[:2])
            r.write(grads(0)[2:4], optimizer_step=7, meta={"v": 2})
            r.write(grads(0)[4:])  # None keeps what was given before
        w.write(1, "train", grads(1), optimizer_step=3, meta={"a": 1})
        w.write(1, "train", grads(1), meta={"b": 2})  # replaced, not merged
        w.write(2, "train", grads(2), optimizer_step=9)
        w.end_record(2, "train", optimizer_step=10)
    with _open(path) as s:
        assert [(r.optimizer_step, s.record_meta(r.step, r.split)) for r in s.records] == [
            (7, {"v": 2}), (3, {"b": 2}), (10, {})]


def test_numpy_scalars_and_tuples_are_stored_as_json_numbers_and_lists(tmp_path):
    path = tmp_path / "s.h5"
    meta = {"lr": np.float32(0.25), "n": np.int64(3), "flag": np.bool_(True),
            "betas": (0.9, np.float64(0.999)), "deep": {"x": [1, (2, 3)]}}
    with GradientWriter(path, PARAMS) as w:
        w.write(0, "train", grads(0), optimizer_step=np.int64(12), meta=meta)
    with _open(path) as s:
        assert s.records[0].optimizer_step == 12
        m = s.record_meta(0, "train")
    assert m == {"lr": 0.25, "n": 3, "flag": True, "betas": [0.9, 0.999],
                 "deep": {"x": [1, [2, 3]]}}
    assert type(m["n"]) is int and type(m["flag"]) is bool


@pytest.mark.parametrize("kw,match", [
    ({"optimizer_step": -1}, r"s\.h5: record \(step=0, split='train'\): optimizer_step -1 is "
                             "negative"),
    ({"optimizer_step": 2.5}, r"record \(step=0, split='train'\): optimizer_step 2.5 is not an "
                              "integer"),
    ({"optimizer_step": 2**63}, r"optimizer_step .* does not fit in int64"),
    ({"optimizer_step": "ten"}, r"optimizer_step 'ten' is not an integer"),
    ({"optimizer_step": True}, r"optimizer_step True is a bool, not an update count"),
    ({"meta": {"optimizer": {"groups": [{"lr": math.nan}]}}},
     r"record \(step=0, split='train'\): meta\['optimizer'\]\['groups'\]\[0\]\['lr'\] is nan"),
    ({"meta": {"eps": math.inf}}, r"meta\['eps'\] is inf; JSON metadata holds finite numbers"),
    ({"meta": {"eps": np.float32("-inf")}}, r"meta\['eps'\] is -inf"),
    ({"meta": {1: "a"}}, r"meta has key 1 of type int; JSON object keys must be str"),
    ({"meta": {"t": object()}}, r"meta\['t'\] = <object object .* is not JSON"),
    ({"meta": {"s": {1, 2}}}, r"meta\['s'\] = .* of type set is not JSON"),
    ({"meta": [1, 2]}, r"meta must be a mapping \(dict\), got list"),
    ({"meta": {"x": "y" * META_MAX_BYTES}}, r"meta is 65544 bytes as JSON, more than the 65536"),
])
@pytest.mark.parametrize("how", ["write", "write_moments", "record", "end_record"])
def test_invalid_optimizer_step_or_meta_is_refused_and_appends_nothing(tmp_path, kw, match, how):
    path = tmp_path / "s.h5"
    with GradientWriter(path, PARAMS) as w:
        sizes = lambda: {k: w._f[k].shape[0] for k in ("grads", "record_meta", "records/crc",  # noqa: E731
                                                        "segments/crc", "moments/count")}
        before = sizes()
        with pytest.raises(SchemaError, match=match):
            if how == "write":
                w.write(0, "train", grads(0), **kw)
            elif how == "write_moments":
                w.write_moments(0, "train", 6, np.zeros(P), np.ones(P), **kw)
            elif how == "record":
                with w.record(0, "train", **kw) as r:
                    r.write(grads(0))
            else:
                w.write(0, "train", grads(0))
                before = sizes()
                w.end_record(0, "train", **kw)
        assert sizes() == before  # nothing appended; the writer goes on
        w.write(0, "train", grads(0), optimizer_step=4, meta={"ok": True})
    with _open(path) as s:
        assert [(r.step, r.n_samples, r.optimizer_step) for r in s.records] == [
            (0, 6 * (1 + (how == "end_record")), 4)]
        assert s.record_meta(0, "train") == {"ok": True}


def test_meta_of_exactly_64_kib_is_accepted_and_deep_nesting_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    big = {"x": "y" * (META_MAX_BYTES - len('{"x":""}'))}
    deep: dict = {}
    cur = deep
    for _ in range(40):
        cur["d"] = {}
        cur = cur["d"]
    with GradientWriter(path, PARAMS) as w:
        w.write(0, "train", grads(0), meta=big)
        with pytest.raises(SchemaError, match="nested deeper than 32 levels"):
            w.write(1, "train", grads(1), meta=deep)
        cyc: dict = {}
        cyc["self"] = cyc
        with pytest.raises(SchemaError, match="nested deeper than 32 levels"):
            w.write(1, "train", grads(1), meta=cyc)
    with _open(path) as s:
        assert s.record_meta(0, "train") == big
        assert len(json.dumps(big, separators=(",", ":"))) == META_MAX_BYTES


def test_record_meta_of_a_missing_record_names_it(tmp_path):
    path = tmp_path / "s.h5"
    with GradientWriter(path, PARAMS) as w:
        w.write(0, "train", grads(0), meta={"a": 1})
    with _open(path) as s, pytest.raises(StoreError, match=r"s\.h5: no record \(step=5, split='train'\)"):
        s.record_meta(5, "train")


# -- older formats keep reading --------------------------------------------------------------

def to_v2(src: Path, dst: Path) -> Path:
    """Rewrite a v3 store as the v2 writer wrote it: no record_meta, 9 records columns."""
    import shutil

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        del f["record_meta"]
        g = f["records"]
        for c in ("optimizer_step", "meta_start", "meta_stop", "meta_crc"):
            del g[c]
        for i in range(g["crc"].shape[0]):
            g["crc"][i] = row_crc("records", [g[c][i] for c, _, _ in TABLES_V2["records"]],
                                  version=2)
        f.attrs["format_version"] = 2
    return dst


def test_v2_stores_still_read_without_optimizer_step_or_meta(tmp_path):
    src = tmp_path / "v3.h5"
    with GradientWriter(src, PARAMS) as w:
        for step in range(3):
            w.write(step, "train", grads(step), lr=0.1, epoch=step, optimizer_step=10 * step,
                    meta=torch_meta())
    v2 = to_v2(src, tmp_path / "v2.h5")
    with _open(v2) as s:
        assert s.version == 2
        assert [(r.step, r.n_samples, r.lr, r.epoch, r.optimizer_step) for r in s.records] == [
            (k, 6, 0.1, float(k), None) for k in range(3)]
        assert [s.record_meta(k, "train") for k in range(3)] == [{}, {}, {}]
        np.testing.assert_array_equal(s.read_grads(1, "train"), grads(1).astype(np.float32))


# -- hostile files ---------------------------------------------------------------------------

def _meta_store(path: Path) -> Path:
    with GradientWriter(path, PARAMS) as w:
        for step in range(3):
            w.write(step, "train", grads(step), optimizer_step=20 * step,
                    meta=torch_meta(0.1 * (step + 1)))
    return path


def _set_record(f: h5py.File, i: int, **values: object) -> None:
    """Rewrite records row ``i`` with a valid row checksum (a crafted file)."""
    g = f["records"]
    for k, v in values.items():
        g[k][i] = v
    g["crc"][i] = row_crc("records", [g[c][i] for c, _, _ in TABLES["records"]])


def _craft(src: Path, dst: Path, fn) -> Path:
    import shutil

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        fn(f)
    return dst


def _extent(f: h5py.File, i: int) -> tuple[int, int]:
    return int(f["records/meta_start"][i]), int(f["records/meta_stop"][i])


def _replace_meta(f: h5py.File, i: int, raw: bytes, recrc: bool = True) -> None:
    """Append ``raw`` to record_meta and point records row ``i`` at it."""
    d = f["record_meta"]
    n0 = d.shape[0]
    d.resize(n0 + len(raw), axis=0)
    d[n0:] = np.frombuffer(raw, np.uint8)
    crc = bytes_crc(np.frombuffer(raw, np.uint8)) if recrc else int(f["records/meta_crc"][i])
    _set_record(f, i, meta_start=n0, meta_stop=n0 + len(raw), meta_crc=crc)


@pytest.fixture
def meta_file(tmp_path) -> Path:
    return _meta_store(tmp_path / "good.h5")


@pytest.mark.parametrize("case,err,match", [
    ("stop_past_end", SchemaError, r"record \(step=1, split='train'\): metadata bytes \[\d+, 99999\) "
                                   r"outside the \d+ bytes of record_meta"),
    ("start_after_stop", SchemaError,
     r"record \(step=1, split='train'\): metadata bytes \[\d+, \d+\) outside"),
    ("negative_start", SchemaError, r"record \(step=1, split='train'\): metadata bytes \[-5, "),
    ("oversize", SchemaError, r"record \(step=1, split='train'\): metadata of 70000 bytes is larger "
                              "than the 65536"),
    ("overlap", SchemaError, r"records \(step=0, split='train'\) and \(step=1, split='train'\) claim "
                             "the same metadata bytes"),
    ("optimizer_step", SchemaError, r"record \(step=1, split='train'\): stored optimizer_step -7 is "
                                    "negative"),
    ("no_dataset", SchemaError, r"dataset 'record_meta' is missing"),
    ("wrong_dtype", SchemaError, r"dataset 'record_meta' has dtype float64, expected uint8"),
])
def test_hostile_extents_are_refused_on_open(meta_file, tmp_path, case, err, match):
    def fn(f: h5py.File) -> None:
        a, b = _extent(f, 1)
        if case == "stop_past_end":
            _set_record(f, 1, meta_stop=99999)
        elif case == "start_after_stop":
            _set_record(f, 1, meta_start=b + 1)
        elif case == "negative_start":
            _set_record(f, 1, meta_start=-5)
        elif case == "oversize":
            f["record_meta"].resize(200000, axis=0)
            _set_record(f, 1, meta_start=0, meta_stop=70000)
        elif case == "overlap":
            _set_record(f, 1, meta_start=_extent(f, 0)[1] - 3)
        elif case == "optimizer_step":
            _set_record(f, 1, optimizer_step=-7)
        elif case == "no_dataset":
            del f["record_meta"]
        else:
            del f["record_meta"]
            f.create_dataset("record_meta", data=np.zeros(3000))
    bad = _craft(meta_file, tmp_path / f"{case}.h5", fn)
    with pytest.raises(err, match=match) as ei:
        _open(bad)
    assert str(bad) in str(ei.value)


@pytest.mark.parametrize("case,err,match", [
    ("bad_crc", StoreError, "metadata bytes fail their checksum: the file is damaged"),
    ("not_utf8", SchemaError, "metadata is not UTF-8 JSON .*UnicodeDecodeError"),
    ("not_json", SchemaError, "metadata is not UTF-8 JSON .*JSONDecodeError"),
    ("nan_literal", SchemaError, "metadata is not UTF-8 JSON .*NaN is not JSON"),
    ("float_overflow", SchemaError, "metadata is not UTF-8 JSON .*1e999 overflows float64"),
    ("list", SchemaError, "metadata is a JSON list, not an object"),
    ("string", SchemaError, "metadata is a JSON str, not an object"),
    ("deep_object", SchemaError, "metadata is nested deeper than 32 levels"),
    ("deep_list", SchemaError, r"metadata (is nested deeper than 32 levels|is not UTF-8 JSON "
                               r"\(RecursionError)"),
])
def test_hostile_meta_bytes_are_our_error_naming_file_and_record(meta_file, tmp_path, case, err,
                                                                 match):
    raw = {
        "not_utf8": b'{"a": "\xff\xfe"}',
        "not_json": b'{"optimizer": {"class": "SGD"',
        "nan_literal": b'{"lr": NaN}',
        "float_overflow": b'{"lr": 1e999}',
        "list": b"[1, 2, 3]",
        "string": b'"SGD"',
        "deep_object": b'{"d":' * 40 + b"1" + b"}" * 40,
        "deep_list": b'{"d":' + b"[" * 30000 + b"]" * 30000 + b"}",  # 60006 bytes
    }.get(case)

    def fn(f: h5py.File) -> None:
        if case == "bad_crc":
            a, _ = _extent(f, 1)
            f["record_meta"][a + 5] ^= 0x20  # one flipped bit in the stored bytes
        else:
            _replace_meta(f, 1, raw)
    bad = _craft(meta_file, tmp_path / f"{case}.h5", fn)
    with _open(bad) as s:
        assert s.record_meta(0, "train") == torch_meta(0.1)  # the other records read on
        with pytest.raises(err, match=rf"{case}\.h5: record \(step=1, split='train'\): {match}"):
            s.record_meta(1, "train")
    with pytest.raises(err, match=rf"{case}\.h5: record \(step=1, split='train'\)"):
        gs.reduce(bad)  # reduce reads the metadata: a damaged record is not skipped silently


def test_every_flipped_meta_byte_is_detected(meta_file, tmp_path):
    """Flip bytes of one record's stored metadata: each copy is refused (CRC-32 detects any
    change of up to 32 consecutive bits), never read as other metadata. Every byte through
    the decoder, a seeded sample of them in the file."""
    from gsnr_stats.store._meta import decode_meta

    with h5py.File(meta_file, "r", locking=False) as f:
        a, b = _extent(f, 2)
        crc = int(f["records/meta_crc"][2])
        off = f["record_meta"].id.get_chunk_info(0).byte_offset
    src = meta_file.read_bytes()
    raw = src[off + a: off + b]
    assert json.loads(raw) == torch_meta(0.1 * 3)
    assert decode_meta(raw, crc, "w") == torch_meta(0.1 * 3)
    rng = np.random.default_rng(5)
    for k in range(len(raw)):
        bad = bytearray(raw)
        bad[k] ^= int(rng.integers(1, 256))
        with pytest.raises(StoreError, match="w: metadata bytes fail their checksum"):
            decode_meta(bytes(bad), crc, "w")
    for k in rng.choice(len(raw), size=6, replace=False):
        damaged = bytearray(src)
        damaged[off + a + int(k)] ^= 0x01
        p = tmp_path / f"flip{k}.h5"
        p.write_bytes(bytes(damaged))
        with _open(p) as s, pytest.raises(StoreError, match=rf"flip{k}\.h5: record \(step=2, "
                                          r"split='train'\): metadata bytes fail their checksum"):
            s.record_meta(2, "train")


def test_netcdf_c_still_opens_a_v3_store(meta_file):
    """No compound or variable-length types in v3 either: netCDF-C (netCDF4) opens the file
    and reads the metadata bytes and the new records columns."""
    netCDF4 = pytest.importorskip("netCDF4")
    with _open(meta_file) as s:
        want = [s.record_meta(k, "train") for k in range(3)]
    d = netCDF4.Dataset(meta_file)
    try:
        raw = np.asarray(d["record_meta"][:]).tobytes()
        rec = d.groups["records"]
        extents = list(zip(rec["meta_start"][:].tolist(), rec["meta_stop"][:].tolist(),
                           strict=True))
        assert rec["optimizer_step"][:].tolist() == [0, 20, 40]
    finally:
        d.close()
    assert [json.loads(raw[a:b]) for a, b in extents] == want == [
        torch_meta(0.1 * (k + 1)) for k in range(3)]


# -- reduce: the optimizer_step coordinate and the optimizer attribute -----------------------

def test_reduce_carries_optimizer_step_and_optimizer_into_the_dataset(tmp_path):
    path = tmp_path / "s.h5"
    sgd, adam = torch_meta(0.1), {"optimizer": {"class": "Adam", "groups": [{"lr": 1e-3}]}}
    with GradientWriter(path, PARAMS) as w:
        w.write(0, "train", grads(0), optimizer_step=0, meta=sgd)
        w.write(0, "test", grads(10))  # no optimizer_step: the train record's holds
        w.write(1, "train", grads(1))  # step 1 has none at all
        w.write(2, "train", grads(2), optimizer_step=40, meta=adam)
        w.write(2, "test", grads(12), optimizer_step=40, meta={"framework": "torch 2.13.0"})
        w.write_moments(3, "train", 6, np.zeros(P), np.ones(P), optimizer_step=60,
                        meta={"framework": "x"})  # last step, but no meta["optimizer"]
    ds = gs.reduce(path)
    assert ds["optimizer_step"].dims == ("step",) and ds["optimizer_step"].dtype == np.int64
    assert ds["optimizer_step"].values.tolist() == [0, -1, 40, 60]
    # the last step that has meta["optimizer"] is step 2 (Adam); canonical JSON
    assert ds.attrs["optimizer"] == json.dumps(adam["optimizer"], sort_keys=True)
    assert json.loads(ds.attrs["optimizer"]) == adam["optimizer"]
    # the numbers are the ones without metadata (the coordinate is extra, nothing else moves)
    g = grads(2).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(ds["mean"].sel(step=2, split="train"), g.mean(0), rtol=1e-12)
    # netCDF-legal: the Dataset round-trips through to_netcdf with coordinate and attribute
    nc = tmp_path / "s.nc"
    ds.to_netcdf(nc)
    import xarray as xr

    with xr.open_dataset(nc) as back:
        assert back["optimizer_step"].values.tolist() == [0, -1, 40, 60]
        assert back.attrs["optimizer"] == ds.attrs["optimizer"]


def test_old_stores_reduce_with_all_minus_one_and_empty_optimizer(tmp_path):
    src = tmp_path / "v3.h5"
    with GradientWriter(src, PARAMS) as w:
        for step in range(3):
            w.write(step, "train", grads(step), optimizer_step=7 * step, meta=torch_meta())
    ds = gs.reduce(to_v2(src, tmp_path / "v2.h5"))
    assert ds["optimizer_step"].values.tolist() == [-1, -1, -1]
    assert ds.attrs["optimizer"] == ""
    ref = gs.reduce(src)
    assert ref["optimizer_step"].values.tolist() == [0, 7, 14]
    for v in ("mean", "var", "gsnr"):
        np.testing.assert_array_equal(ds[v].values, ref[v].values)


def test_splits_of_one_step_disagreeing_on_optimizer_step_is_an_error(tmp_path):
    path = tmp_path / "s.h5"
    with GradientWriter(path, PARAMS) as w:
        w.write(5, "train", grads(0), optimizer_step=100)
        w.write(5, "test", grads(1), optimizer_step=101)
    with pytest.raises(StoreError, match=r"s\.h5: record \(step=5, split='train'\) has optimizer_step "
                       r"100, .*s\.h5: record \(step=5, split='test'\) has 101"):
        gs.reduce(path)


def test_shards_of_one_record_merge_their_optimizer_step_or_refuse_a_mismatch(tmp_path):
    a, b, c = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    for path, ostep, rows in ((a, 30, slice(0, 4)), (b, 30, slice(4, 9)), (c, 31, slice(0, 4))):
        with GradientWriter(path, PARAMS, run_id="run") as w:
            w.write(1, "train", grads(1, 9)[rows], optimizer_step=ostep, meta=torch_meta())
    ds = gs.reduce([a, b])
    assert ds["optimizer_step"].values.tolist() == [30]
    assert int(ds["count"].sel(step=1, split="train")) == 9
    np.testing.assert_allclose(ds["mean"].sel(step=1, split="train"),
                               grads(1, 9).astype(np.float32).astype(np.float64).mean(0),
                               rtol=1e-12, atol=1e-15)
    with pytest.raises(StoreError, match=r"a\.h5: record \(step=1, split='train'\) has "
                       r"optimizer_step 30, .*c\.h5: record \(step=1, split='train'\) has 31"):
        gs.reduce([a, c])


def test_distributed_partials_carry_optimizer_step_across_column_blocks(tmp_path):
    """The Dask path's pieces (one task per shard and column block, then concat_columns) give
    the same coordinate and attribute as the in-process reduce (no cluster needed)."""
    from gsnr_stats import distributed as D
    from gsnr_stats.engine import build_dataset

    path = tmp_path / "s.h5"
    with GradientWriter(path, PARAMS, chunks=(4, 8)) as w:
        for step in range(2):
            w.write(step, "train", grads(step), optimizer_step=11 * step + 1,
                    meta=torch_meta(0.1 + step))
    parts = {}
    for step in range(2):
        blocks = [D.partial_task(str(path), step, "train", c0, c1, 1, "raise")
                  for c0, c1 in ((0, 8), (8, P))]
        parts[(step, "train")] = D.concat_columns(blocks)
    with _open(path) as s:
        layout = s.layout
    ds = build_dataset(parts, layout, ddof=1, blocks=None, nonfinite="raise")
    ref = gs.reduce(path)
    assert ds["optimizer_step"].values.tolist() == ref["optimizer_step"].values.tolist() == [1, 12]
    assert ds.attrs["optimizer"] == ref.attrs["optimizer"] == json.dumps(
        torch_meta(1.1)["optimizer"], sort_keys=True)
    np.testing.assert_array_equal(ds["mean"].values, ref["mean"].values)


# -- gsnr-stats info ------------------------------------------------------------------------

def test_info_shows_optimizer_step_and_class_and_survives_damaged_metadata(meta_file, tmp_path,
                                                                           capsys):
    from gsnr_stats.cli import main

    assert main(["info", str(meta_file)]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("step")]
    assert [x.split()[1] for x in lines] == ["0", "1", "2"]
    for k, line in enumerate(lines):
        assert line.endswith(f"optimizer_step={20 * k} optimizer=SGD"), line
    with GradientWriter(tmp_path / "plain.h5", PARAMS) as w:
        w.write(0, "train", grads(0))
    assert main(["info", str(tmp_path / "plain.h5")]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("step")]
    assert lines[0].endswith(" n=6")  # nothing invented for a record without
    bad = _craft(meta_file, tmp_path / "bad.h5",
                 lambda f: f["record_meta"].__setitem__(_extent(f, 1)[0] + 3, 0))
    assert main(["info", str(bad)]) == 0  # info lists a damaged store, it does not fail
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("step")]
    assert "METADATA UNREADABLE" in lines[1] and "fail their checksum" in lines[1]
    assert lines[0].endswith("optimizer=SGD") and lines[2].endswith("optimizer=SGD")


# -- crash safety: a kill or an exception at every write step --------------------------------

def campaign_meta(step: int) -> dict:
    return torch_meta(0.1 * (step + 1), momentum=0.5 + step / 10)


def meta_writer(path: str | Path, report) -> None:
    """The campaigns' writer: metadata through write + end_record, a record() block whose
    later write replaces its meta, and write_moments + end_record(optimizer_step=);
    ``report(step)`` after each completed record."""
    with GradientWriter(path, PARAMS, chunks=(4, 8)) as w:
        g = grads(0)
        w.write(0, "train", g, optimizer_step=0, meta=campaign_meta(0))
        w.end_record(0, "train")
        report(0)
        with w.record(1, "train", optimizer_step=20, meta={"stale": 1}) as r:
            r.write(grads(1), meta=campaign_meta(1))
        report(1)
        g = grads(2)
        w.write_moments(2, "train", 6, g.mean(0), np.ones(P), meta=campaign_meta(2))
        w.end_record(2, "train", optimizer_step=40)
        report(2)


def meta_work(path: str, rep: int, records: int = 3) -> None:
    """:func:`meta_writer` as tests/fault_harness.py runs it in forked children."""
    import os

    meta_writer(path, lambda step: os.write(rep, f"done {step}\n".encode()))


def _check_campaign_file(path: Path, done: list[int],
                         reduce: bool = False) -> tuple[int, int, int]:
    """Records reported done are there; every record read as complete has its exact
    optimizer_step and metadata. Returns the counts of complete and incomplete records and
    the metadata bytes left as debris (of a record whose completion row is missing)."""
    if not path.exists():
        assert not done, (path, done)
        return 0, 0, 0
    with _open(path) as s:
        steps = [r.step for r in s.records]
        assert set(done) <= set(steps), (path, done, steps)
        for r in s.records:
            assert (s.record_meta(r.step, "train"), r.optimizer_step) == (
                campaign_meta(r.step), 20 * r.step), (path, r)
        n_inc, debris = len(s.incomplete), s.debris.get("record_meta bytes", 0)
    if reduce and steps:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = gs.reduce(path)
        assert ds["optimizer_step"].values.tolist() == [20 * st for st in steps]
        assert ds.attrs["optimizer"] == json.dumps(campaign_meta(steps[-1])["optimizer"],
                                                   sort_keys=True)
    return len(steps), n_inc, debris


def _fault_labels(tmp_path: Path) -> list[str]:
    """The labels of the campaign writer's write steps, in order (step k is labels[k - 1])."""
    from gsnr_stats.store import _faults

    labels: list[str] = []
    _faults.set_hook(labels.append)
    try:
        meta_writer(tmp_path / "count.h5", lambda step: None)
    finally:
        _faults.set_hook(None)
    return labels


def test_completed_records_meta_survives_a_kill_at_every_write_step(tmp_path):
    """At every write step (each HDF5 resize/write and flush of the writer, the fault hook of
    tests/test_faults.py) take the bytes the file has on disk: exactly what a SIGKILL there
    leaves (the writer's unflushed HDF5 cache dies with the process; the page cache does
    not). Every such file keeps each completed record's optimizer_step and metadata."""
    from gsnr_stats.store import _faults

    path = tmp_path / "live.h5"
    done: list[int] = []
    snaps: list[tuple[str, bytes | None, list[int]]] = []

    def hook(label: str) -> None:
        snaps.append((label, path.read_bytes() if path.exists() else None, list(done)))

    _faults.set_hook(hook)
    try:
        meta_writer(path, done.append)
    finally:
        _faults.set_hook(None)
    snaps.append(("closed", path.read_bytes(), list(done)))
    labels = {lab for lab, _, _ in snaps}
    assert {"record_meta.resize", "record_meta.write", "records/meta_crc.write"} <= labels
    # identical bytes are one file state (HDF5 caches between flushes): check each once,
    # against the most records reported done while the file had those bytes
    states: dict[bytes | None, list[int]] = {}
    for _lab, data, rep in snaps:
        states[data] = rep
    incomplete = debris = 0
    for k, (data, rep) in enumerate(states.items()):
        f = tmp_path / f"kill{k}.h5"
        if data is not None:
            f.write_bytes(data)
        _, i, d = _check_campaign_file(f, rep, reduce=k % 10 == 0)
        incomplete, debris = incomplete + i, debris + (d > 0)
    assert _check_campaign_file(f, [0, 1, 2], reduce=True) == (3, 0, 0)  # the closed file
    # states struck between a record's flushed metadata and its completion row included
    assert len(snaps) >= 150 and len(states) >= 10 and incomplete >= 3 and debris >= 2, (
        len(snaps), len(states), incomplete, debris)


def test_completed_records_meta_survives_an_exception_at_every_step_of_completion(tmp_path):
    """An exception (a failing disk) at every write step of the completions: the writer
    stops with our StoreError and every record completed before keeps its metadata."""
    from gsnr_stats.store import _faults

    labels = _fault_labels(tmp_path)
    # every step that writes metadata or ends a completion (the other steps are struck by
    # the campaigns of tests/test_faults.py), and the step after the last one
    strike = [k + 1 for k, lab in enumerate(labels) if lab.startswith(
        ("record_meta.", "flush", "records/meta_crc", "records/crc"))]
    assert len(strike) >= 15
    first = 0
    for k in [*strike, len(labels) + 1]:
        path = tmp_path / f"raise{k}.h5"
        hits = [0]
        done: list[int] = []

        def hook(label: str, k=k, hits=hits) -> None:
            hits[0] += 1
            if hits[0] == k:
                raise RuntimeError(f"injected at {label}")

        _faults.set_hook(hook)
        try:
            meta_writer(path, done.append)
            raised = None
        except StoreError as e:
            raised = e
        finally:
            _faults.set_hook(None)
        if raised is None:
            assert k == len(labels) + 1 and done == [0, 1, 2]
        else:
            assert str(path) in str(raised) and "injected at" in str(raised), raised
            first = first or k
        _check_campaign_file(path, done)
    assert first > 0


def test_real_sigkill_during_a_completion_matches(tmp_path):
    """The snapshot model above, checked against real SIGKILLs: tests/fault_harness.py forks
    a child per trial that kills itself at write step k of the second record's completion
    (every fifth step of it)."""
    import subprocess
    import sys

    labels = _fault_labels(tmp_path)
    meta_at = [k + 1 for k, lab in enumerate(labels) if lab == "record_meta.resize"]
    crc_at = [k + 1 for k, lab in enumerate(labels) if lab == "records/crc.write"]
    # from record 1's first metadata step to the first step after its completion row was
    # flushed (k1 - 1), every fifth step, ending exactly there
    k1 = crc_at[1] + 3
    k0 = meta_at[1] + (k1 - 1 - meta_at[1]) % 5
    out = tmp_path / "kills"
    out.mkdir()
    proc = subprocess.run([sys.executable, __file__, "hookkill", str(out), str(k0), str(k1), "5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(results) >= 6 and all(r["signal"] == 9 for r in results), results
    flushed = meta_at[1] + 2  # the flush of record 1's metadata bytes (and data)
    for r in results:
        c, i, d = _check_campaign_file(Path(r["path"]), r["done"])
        # killed before the completion row reached the file: record 1 is incomplete (once
        # its segments were flushed) and its flushed metadata is debris; after: both whole
        late = r["arg"] > flushed
        want = (1, int(late), late) if r["arg"] < k1 - 1 else (2, 0, False)
        assert (c, i, d > 0) == want, (r, c, i, d)


if __name__ == "__main__":  # the campaign's harness process (see the test above)
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import fault_harness as fh

    fh.work = meta_work  # the harness forks one child per trial; each runs this writer
    fh.main(sys.argv)
