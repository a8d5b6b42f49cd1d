"""Corrupt, truncated, foreign and hostile files get a clear StoreError/SchemaError."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

import gsnr_stats as gs
from gsnr_stats.cli import main as cli_main


@pytest.fixture
def good(tmp_path, rng):
    path = tmp_path / "good.h5"
    with gs.GradientWriter(path, [("w", (64,))], chunks=(16, 64)) as w:
        w.write(0, "train", rng.normal(size=(200, 64)))
        w.write(1, "train", rng.normal(size=(50, 64)))
    return path


def edit(src, dst, fn):
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        fn(f)
    return dst


def expect(path, exc, pattern):
    with pytest.raises(exc, match=pattern):
        gs.open_store(path)
    with pytest.raises(exc, match=pattern):
        gs.reduce(path)
    assert cli_main(["info", str(path)]) == 1


def test_not_hdf5(tmp_path):
    p = tmp_path / "junk.h5"
    p.write_bytes(b"this is not an HDF5 file" * 100)
    expect(p, gs.StoreError, "junk.h5: not an HDF5 file")


def test_empty_and_missing(tmp_path):
    p = tmp_path / "empty.h5"
    p.write_bytes(b"")
    expect(p, gs.StoreError, "empty.h5")
    expect(tmp_path / "nope.h5", gs.StoreError, "nope.h5: no such file")


def test_foreign_hdf5(tmp_path):
    p = tmp_path / "foreign.h5"
    with h5py.File(p, "w") as f:
        f["data"] = np.zeros(3)
    expect(p, gs.SchemaError, "foreign.h5: not a gsnr-stats store")


def test_newer_version(good, tmp_path):
    p = edit(good, tmp_path / "new.h5", lambda f: f.attrs.__setitem__("format_version", 99))
    expect(p, gs.SchemaError, "new.h5: store format version 99 is newer")


@pytest.mark.parametrize("name", ["grads", "loss", "records", "segments", "moments/mean"])
def test_missing_dataset(good, tmp_path, name):
    p = edit(good, tmp_path / "miss.h5", lambda f: f.__delitem__(name))
    expect(p, gs.SchemaError, f"miss.h5: dataset '{name}' is missing")


def test_wrong_dtype_and_shape(good, tmp_path):
    def retype(f):
        del f["loss"]
        f.create_dataset("loss", data=np.zeros(250, dtype="i4"))

    expect(edit(good, tmp_path / "dt.h5", retype), gs.SchemaError, "dt.h5: dataset 'loss' has dtype")

    def reshape(f):
        del f["grads"]
        f.create_dataset("grads", data=np.zeros((250, 10), dtype="f4"))

    expect(edit(good, tmp_path / "sh.h5", reshape), gs.SchemaError, "sh.h5: grads has 10 columns")

    def bad_layout(f):
        f.attrs["layout"] = "[{not json"

    expect(edit(good, tmp_path / "lay.h5", bad_layout), gs.SchemaError, "lay.h5: layout attribute")

    def bad_hash(f):
        f.attrs["layout_hash"] = "0" * 64

    expect(edit(good, tmp_path / "hash.h5", bad_hash), gs.SchemaError, "layout_hash")


def set_row(f, table, i, **values):
    """Rewrite row ``i`` of a v2 table with a valid checksum (a crafted, hostile file)."""
    from gsnr_stats.store.schema import TABLES, row_crc

    g = f[table]
    for k, v in values.items():
        g[k][i] = v
    row = [g[c][i] for c, _, _ in TABLES[table]]
    g["crc"][i] = row_crc(table, row)


def test_record_index_out_of_range(good, tmp_path):
    # naive damage: the row checksum no longer matches
    expect(edit(good, tmp_path / "seg0.h5", lambda f: f["segments/stop"].__setitem__(-1, 10**9)),
           gs.SchemaError, r"seg0.h5: completed records cover 2 segment rows, only 1 are valid")
    # crafted with a valid checksum: the extents the record covers refuse it
    expect(edit(good, tmp_path / "seg.h5", lambda f: set_row(f, "segments", 1, stop=10**9)),
           gs.SchemaError, r"seg.h5: record \(step=1, split='train'\): segment rows")


def test_overlapping_segments_and_damaged_middle_row(good, tmp_path):
    expect(edit(good, tmp_path / "ov.h5", lambda f: set_row(f, "segments", 1, start=150, stop=200)),
           gs.SchemaError, "ov.h5: .*segment|ov.h5: records .* claim the same")

    def middle(f):
        f["records/lr"][0] = 0.5  # damages row 0 while row 1 stays valid

    expect(edit(good, tmp_path / "mid.h5", middle), gs.SchemaError,
           "mid.h5: table 'records' row 0 fails its checksum but later rows are valid")


def test_external_link(good, tmp_path):
    p = edit(good, tmp_path / "ext.h5",
             lambda f: f.__setitem__("evil", h5py.ExternalLink("/etc/passwd", "/x")))
    expect(p, gs.SchemaError, "ext.h5: /evil is an external link")


def test_soft_link(good, tmp_path):
    def soft(f):
        del f["label"]
        f["label"] = h5py.SoftLink("/loss")

    expect(edit(good, tmp_path / "soft.h5", soft), gs.SchemaError, "soft.h5: /label is a soft link")


def test_virtual_dataset(good, tmp_path):
    src = tmp_path / "src.h5"
    with h5py.File(src, "w") as f:
        f["x"] = np.zeros(250)

    def vds(f):
        layout = h5py.VirtualLayout(shape=(250,), dtype="f8")
        layout[:] = h5py.VirtualSource(str(src), "x", shape=(250,))
        del f["label"]
        f.create_virtual_dataset("label", layout)

    expect(edit(good, tmp_path / "vds.h5", vds), gs.SchemaError, "vds.h5: /label is a virtual")


def test_external_raw_storage(good, tmp_path):
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"\0" * 8 * 250)

    def ext(f):
        del f["label"]
        f.create_dataset("label", (250,), dtype="<f8", external=[(str(raw), 0, 8 * 250)])

    expect(edit(good, tmp_path / "extraw.h5", ext), gs.SchemaError, "external files")


def test_truncated_file(good, tmp_path):
    data = good.read_bytes()
    for frac in (0.3, 0.7, 0.95):
        p = tmp_path / f"trunc{int(frac * 100)}.h5"
        p.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(gs.StoreError, match=f"trunc{int(frac * 100)}.h5"):
            gs.reduce(p)
        assert cli_main(["info", str(p)]) in (0, 1)


def test_flipped_bytes_never_crash(good, tmp_path, rng):
    """Random byte corruption: either a clean StoreError or a successful read, never a raw
    h5py/numba exception."""
    data = bytearray(good.read_bytes())
    for i in range(40):
        bad = np.frombuffer(bytes(data), dtype=np.uint8).copy()
        pos = rng.integers(0, len(bad), size=16)
        bad[pos] = rng.integers(0, 256, size=16).astype(np.uint8)
        p = tmp_path / f"flip{i}.h5"
        p.write_bytes(bad.tobytes())
        try:
            gs.reduce(p, nonfinite="omit")
        except gs.GSNRError:
            pass


def test_cli_reduce_bad_input_exit_code(tmp_path, capsys):
    p = tmp_path / "junk.h5"
    p.write_bytes(b"nope")
    assert cli_main(["reduce", str(p), "-o", str(tmp_path / "o.nc"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "junk.h5" in err and "Traceback" not in err
