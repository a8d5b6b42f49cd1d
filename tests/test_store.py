"""Writer/reader round trips of the store schema."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

import gsnr_stats as gs
from gsnr_stats.store import FORMAT_VERSION, Layout, auto_chunks


def test_roundtrip_records_and_attrs(small_store):
    path, params, data = small_store
    with gs.open_store(path) as s:
        assert s.layout.names == ("fc.weight", "fc.bias")
        assert s.layout.shapes == ((3, 4), (4,))
        assert s.layout.offsets == (0, 12)
        assert s.layout.layers == ("fc", "fc")
        assert s.layout.n_params == 16
        assert s.steps == [0, 10]
        assert set(s.splits) == {"train", "test"}
        a = s.attrs
        assert a["format"] == "gsnr-stats" and a["format_version"] == FORMAT_VERSION
        assert a["framework"] == "numpy" and a["user_attrs"] == {"note": "fixture"}
        assert a["created_at"].endswith("+00:00")
        for (step, split), (g, loss) in data.items():
            np.testing.assert_array_equal(s.read_grads(step, split), g)
            np.testing.assert_array_equal(s.read_loss(step, split), loss)
            np.testing.assert_array_equal(s.read_sample_id(step, split), np.arange(len(g)))
            rec = s.record(step, split)
            assert rec.n_samples == len(g) and rec.lr == 0.1 and rec.epoch == step / 10
        assert not s.incomplete


def test_batches_equal_one_write(tmp_path, rng):
    g = rng.normal(size=(101, 7)).astype(np.float32)
    lab = rng.integers(0, 3, 101)
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    with gs.GradientWriter(a, [("w", (7,))]) as w:
        w.write(3, "train", g, label=lab, sample_id=np.arange(101) + 1000)
    with gs.GradientWriter(b, [("w", (7,))], chunks=(8, 3)) as w:
        # interleave two records to exercise segments
        for i in range(0, 101, 17):
            w.write(3, "train", g[i : i + 17], label=lab[i : i + 17],
                    sample_id=np.arange(i, min(i + 17, 101)) + 1000)
            w.write(3, "test", g[i : i + 17])
    with gs.open_store(a) as sa, gs.open_store(b) as sb:
        for name in ("read_grads", "read_label", "read_sample_id"):
            np.testing.assert_array_equal(getattr(sa, name)(3, "train"),
                                          getattr(sb, name)(3, "train"))
    ra, rb = gs.reduce(a), gs.reduce(b, splits=["train"])
    np.testing.assert_allclose(ra["var"].values, rb["var"].values, rtol=1e-12)


def test_record_context_and_end(tmp_path, rng):
    path = tmp_path / "r.h5"
    g = rng.normal(size=(10, 2))
    with gs.GradientWriter(path, [("a", (2,))]) as w:
        with w.record(1, "train", lr=0.5) as r:
            r.write(g[:4])
            r.write(g[4:])
        assert w.flush() is None
        with pytest.raises(gs.StoreError, match="already completed"):
            w.write(1, "train", g)
    with gs.open_store(path) as s:
        assert s.record(1, "train").lr == 0.5
        np.testing.assert_allclose(s.read_grads(1, "train"), g.astype(np.float32))


def test_auto_chunks_about_2mib():
    for p in (1, 10, 1000, 262144, 10**7):
        r, c = auto_chunks(p, 4)
        assert 1 <= c <= min(p, 8192)
        assert r * c * 4 <= 4 << 20
        if p >= 1000:
            assert r * c * 4 >= 1 << 20


def test_writer_refuses_existing_and_bad_shapes(tmp_path):
    path = tmp_path / "x.h5"
    with gs.GradientWriter(path, [("a", (2, 2))]) as w:
        with pytest.raises(gs.SchemaError, match=r"expected \(n, 4\)"):
            w.write(0, "train", np.zeros((3, 5)))
        with pytest.raises(gs.SchemaError, match="loss has 2 values"):
            w.write(0, "train", np.zeros((3, 4)), loss=np.zeros(2))
        with pytest.raises(gs.SchemaError, match="split"):
            w.write(0, "", np.zeros((3, 4)))
    with pytest.raises(gs.StoreError, match="exists"):
        gs.GradientWriter(path, [("a", (2,))])
    with pytest.raises(gs.SchemaError, match="duplicate"):
        gs.GradientWriter(tmp_path / "y.h5", [("a", (2,)), ("a", (3,))])
    with pytest.raises(gs.SchemaError, match="no parameters"):
        gs.GradientWriter(tmp_path / "z.h5", [])


def test_float16_overflow_check(tmp_path):
    path = tmp_path / "h.h5"
    with gs.GradientWriter(path, [("a", (2,))], dtype="float16") as w:
        w.write(0, "train", np.array([[1.0, 2.0], [3.0, 4.0]]))
        with pytest.raises(gs.StoreError, match="overflows float16"):
            w.write(0, "train", np.array([[1e6, 0.0]]))
    st = gs.reduce(path)
    np.testing.assert_allclose(st["mean"].values.ravel(), [2.0, 3.0])


@pytest.mark.parametrize("compression", ["lzf", "gzip"])
def test_compressed_store_reduces_the_same(tmp_path, rng, compression):
    g = (rng.normal(size=(300, 50)) * 3 + 1).astype(np.float32)
    a, b = tmp_path / "plain.h5", tmp_path / "comp.h5"
    for p, comp in ((a, None), (b, compression)):
        with gs.GradientWriter(p, [("w", (50,))], chunks=(64, 16), compression=comp) as w:
            w.write(0, "train", g)
    ra, rb = gs.reduce(a), gs.reduce(b)
    np.testing.assert_array_equal(ra["mean"].values, rb["mean"].values)
    np.testing.assert_array_equal(ra["var"].values, rb["var"].values)


def test_layout_json_and_hash_stable():
    lay = Layout.from_params([("conv.w", (2, 3)), ("conv.b", (2,), "conv"), ("fc", 4)])
    assert lay.layers == ("conv", "conv", "fc")
    again = Layout.from_json(lay.to_json(), "mem")
    assert again == lay and again.hash == lay.hash
    assert list(lay.tensor_of_param()) == ["conv.w"] * 6 + ["conv.b"] * 2 + ["fc"] * 4
    assert json.loads(lay.to_json())[2]["offset"] == 8


def test_trajectory_and_probe_tables(tmp_path):
    path = tmp_path / "t.h5"
    with gs.GradientWriter(path, [("a", (1,))]) as w:
        for t in (2, 0, 1):
            w.write_trajectory(t, lr=0.1, train_loss=1.0 / (t + 1), test_loss=1.2 / (t + 1))
        w.write_probe(0, n=16, lr=1e-3, k=0, train_before=1.0, train_after=0.9,
                      test_before=1.1, test_after=1.05)
    with gs.open_store(path) as s:
        tr = s.trajectory()
        np.testing.assert_array_equal(tr["step"], [0, 1, 2])
        np.testing.assert_allclose(tr["train_loss"], [1.0, 0.5, 1 / 3])
        pr = s.probes()
        assert pr["n"][0] == 16 and pr["test_after"][0] == 1.05


def test_moments_only_record(tmp_path, rng):
    g = rng.normal(size=(90, 5)) + 2
    path = tmp_path / "m.h5"
    with gs.GradientWriter(path, [("a", (5,))]) as w:
        for blk in np.array_split(g, 3):
            m = blk.mean(0)
            w.write_moments(0, "train", len(blk), m, ((blk - m) ** 2).sum(0))
    st = gs.reduce(path, blocks=3)
    np.testing.assert_allclose(st["mean"].values[0, 0], g.mean(0), rtol=1e-13)
    np.testing.assert_allclose(st["var"].values[0, 0], g.var(0, ddof=1), rtol=1e-12)
    assert int(st["count"].values[0, 0]) == 90
    np.testing.assert_allclose(st["block_count"].values[0, 0], [30, 30, 30])
    with gs.open_store(path) as s, pytest.raises(gs.StoreError, match="moments only"):
        s.read_grads(0, "train")


def test_live_reader_sees_flushed_records(tmp_path, rng):
    """SWMR: a reader can open the store while the writer is still running."""
    path = tmp_path / "live.h5"
    w = gs.GradientWriter(path, [("a", (3,))])
    w.write(0, "train", rng.normal(size=(5, 3)))
    w.end_record(0, "train")
    w.write(1, "train", rng.normal(size=(5, 3)))
    w.flush()
    with pytest.warns(gs.IncompleteRecordWarning, match="step=1"):
        s = gs.open_store(path)
    assert [r.step for r in s.records] == [0]
    assert [r.step for r in s.incomplete] == [1]
    s.close()
    w.close()
    with h5py.File(path, "r") as f:  # cleanly closed: plain open works again
        assert f.attrs["format"] == "gsnr-stats"


def test_abort_record_leaves_it_incomplete(tmp_path, rng):
    path = tmp_path / "ab.h5"
    with gs.GradientWriter(path, [("a", (2,))]) as w:
        w.write(0, "train", rng.normal(size=(4, 2)))
        w.write(1, "train", rng.normal(size=(4, 2)))
        w.abort_record(1, "train")
    with pytest.warns(gs.IncompleteRecordWarning, match="step=1"):
        s = gs.open_store(path)
    assert [r.step for r in s.records] == [0] and [r.step for r in s.incomplete] == [1]
    s.close()
