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
    TABLES_V2,
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
