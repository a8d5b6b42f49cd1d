"""Opening an untrusted HDF5 file without letting it hang, crash or fool the reader.

Checks the superblock's end-of-file address before HDF5 parses anything (HDF5 can loop on
structures pointing past the end of a truncated file), bounds HDF5's SWMR metadata retries
(set through the C library, which h5py does not expose), refuses links and virtual or
external storage outside the schema, and decodes the few strings the schema stores.
Used by :mod:`.reader` only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import time
from pathlib import Path
from typing import Any

import h5py

from ..errors import GSNRError, SchemaError, StoreError
from .schema import FORMAT_NAME, MAX_FILTER_RATIO

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# HDF5 retries a metadata read whose checksum fails (a reader racing a SWMR writer) with
# exponentially growing sleeps; its default for SWMR reads (100 tries) means minutes on a
# damaged file. A dozen tries cover a torn read of a live writer within milliseconds.
_SWMR_READ_ATTEMPTS = 12
_OPEN_RETRIES = 3

# -- opening -------------------------------------------------------------------------------

_libhdf5: Any = None


def _hdf5_lib() -> Any:
    """The HDF5 library h5py uses, for the one setting h5py does not expose."""
    global _libhdf5
    if _libhdf5 is None:
        _libhdf5 = False
        here = Path(h5py.__file__).parent
        cands = sorted((here.parent / "h5py.libs").glob("libhdf5-*.so*")) + sorted(
            here.glob("libhdf5*.so*"))
        cands = [c for c in cands if "_hl" not in c.name]
        for c in cands:
            with contextlib.suppress(OSError):
                lib = ctypes.CDLL(str(c))
                lib.H5Pset_metadata_read_attempts.argtypes = [ctypes.c_int64, ctypes.c_uint]
                _libhdf5 = lib
                break
        if _libhdf5 is False:
            with contextlib.suppress(OSError, AttributeError):
                lib = ctypes.CDLL(None)
                lib.H5Pset_metadata_read_attempts.argtypes = [ctypes.c_int64, ctypes.c_uint]
                _libhdf5 = lib
    return _libhdf5 or None


def _fapl(swmr: bool, locking: bool = False) -> h5py.h5p.PropFAID:
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    with contextlib.suppress(AttributeError):
        fapl.set_file_locking(locking, True)
    if swmr:
        lib = _hdf5_lib()
        if lib is not None:
            lib.H5Pset_metadata_read_attempts(fapl.id, _SWMR_READ_ATTEMPTS)
    return fapl


def _superblock(path: Path) -> tuple[int, int, int] | None:
    """``(version, consistency flags, end-of-file address)`` of a v2/v3 superblock."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        base = 0
        while base + 48 <= size:
            fh.seek(base)
            head = fh.read(48)
            if head[:8] == _SIGNATURE:
                break
            base = 512 if base == 0 else base * 2
        else:
            return None
    version, off_size = head[8], head[9]
    if version not in (2, 3) or off_size not in (4, 8):
        return None
    pos = 12 + 2 * off_size
    eof = int.from_bytes(head[pos : pos + off_size], "little")
    return version, head[11], base + eof


def _open_h5(path: Path) -> tuple[h5py.File, bool]:
    """The open file, and whether its superblock says a writer has it open (or died)."""
    if not path.exists():
        raise StoreError(f"{path}: no such file")
    if path.is_dir():
        raise StoreError(f"{path}: is a directory, not a store file")
    try:
        ok = h5py.is_hdf5(path)
    except OSError as e:
        raise StoreError(f"{path}: cannot read ({e})") from e
    if not ok:
        raise StoreError(f"{path}: not an HDF5 file (no HDF5 signature)")
    sb = _superblock(path)
    writing = sb is not None and sb[1] & 0x05 != 0  # open for (SWMR) write, or its writer died
    if sb is not None and not writing and sb[2] > path.stat().st_size:
        # HDF5 may loop for ever on structures pointing past the end of a truncated file.
        # A file a writer has open (or died with) legitimately has space allocated beyond
        # what it wrote, so there the bounded SWMR retries stand in for this check.
        raise StoreError(
            f"{path}: truncated file: {path.stat().st_size} bytes on disk, the HDF5 "
            f"superblock records {sb[2]} bytes"
        )
    name = os.fsencode(path)
    last: Exception | None = None
    locking = False
    for attempt in range(_OPEN_RETRIES if writing else 2):
        try:
            if writing:
                fid = h5py.h5f.open(name, h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ,
                                    fapl=_fapl(True, locking))
            else:
                fid = h5py.h5f.open(name, h5py.h5f.ACC_RDONLY, fapl=_fapl(False, locking))
            return h5py.File(fid), writing
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            last = e
            if "locking flag values don't match" in str(e) and not locking:
                # this process already has the file open through h5py with HDF5's default
                # locking (e.g. xarray's h5netcdf engine): HDF5 shares one handle per file
                # and refuses a second open with other flags, so open it with theirs
                locking = True
                continue
            if not writing:
                break
            if attempt + 1 < _OPEN_RETRIES and writing:
                time.sleep(0.02)  # a torn read of a live writer: look again shortly
    state = " (left open by its writer: still being written, or the writer died)" if writing else ""
    raise StoreError(f"{path}: HDF5 file cannot be opened, corrupt or truncated{state}? ({last})")


def is_store(path: Any) -> bool:
    """Whether ``path`` names an HDF5 file whose root ``format`` attribute is ``"gsnr-stats"``.

    Cheap and never raises: opens the file as :func:`open_store` does (the same guards
    against truncated and hostile files) but validates nothing else.
    """
    try:
        p = Path(os.fspath(path))
        if not p.is_file():
            return False
        f, _ = _open_h5(p)
    except (GSNRError, OSError, TypeError, ValueError):
        return False
    try:
        return _attr_str(f, "format", p, required=False) == FORMAT_NAME
    except (GSNRError, OSError, RuntimeError, ValueError):
        return False
    finally:
        with contextlib.suppress(Exception):
            f.close()


def _check_links(f: h5py.File, path: Path, groups: set[str]) -> dict[str, Any]:
    """Refuse external links, soft links, virtual datasets and external raw storage.

    Returns the objects it visited by path (``"grads"``, ``"segments/crc"``): the reader
    looks them up there instead of asking HDF5 again (each lookup costs tens of µs, and a
    store has about a hundred objects).
    """
    objs: dict[str, Any] = {}

    def check_group(g: h5py.Group, prefix: str) -> None:
        for name in g:
            link = g.get(name, getlink=True)
            full = f"{prefix}/{name}"
            if isinstance(link, h5py.ExternalLink):
                raise SchemaError(
                    f"{path}: {full} is an external link to {link.filename}:{link.path}; "
                    "refused (stores must be self-contained)"
                )
            if isinstance(link, h5py.SoftLink):
                raise SchemaError(f"{path}: {full} is a soft link to {link.path}; refused")
            if not isinstance(link, h5py.HardLink):
                raise SchemaError(f"{path}: {full} is a user-defined link; refused")
            obj = g[name]
            objs[full[1:]] = obj
            if isinstance(obj, h5py.Dataset):
                if obj.is_virtual:
                    raise SchemaError(f"{path}: {full} is a virtual dataset; refused")
                if obj.external:
                    raise SchemaError(f"{path}: {full} stores its data in external files; refused")
            elif isinstance(obj, h5py.Group) and (prefix == "" and name in groups
                                                  or prefix == "/factors" and "factors" in groups):
                check_group(obj, full)  # format 4: factors/<k>/{a, delta}, one level deeper

    check_group(f, "")
    return objs


def _attr_str(f: h5py.File, name: str, path: Path, required: bool = True) -> str:
    if name not in f.attrs:
        if required:
            raise SchemaError(f"{path}: root attribute {name!r} is missing")
        return ""
    v = f.attrs[name]
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if not isinstance(v, str):
        raise SchemaError(f"{path}: root attribute {name!r} is not a string")
    return v


_SPLIT_RE = re.compile(r"^[^\x00]+$")


def _decode_split(raw: bytes, path: Path) -> str:
    try:
        s = bytes(raw).rstrip(b"\x00").decode("utf-8")
    except UnicodeDecodeError as e:
        raise SchemaError(f"{path}: split name {raw!r} is not UTF-8") from e
    if not _SPLIT_RE.match(s):
        # (rstrip took the padding: a NUL left is inside the name, never written by us)
        raise SchemaError(f"{path}: split name {s!r} in the record index is empty or has NUL")
    return s


def _backed_rows(ds: h5py.Dataset, row_bytes: int, slack: bool = True) -> int:
    """How many rows of ``ds`` its stored bytes can back (filters at their best ratio).

    ``slack`` adds one chunk row: rows a live (or killed) writer has resized the dataset by
    but not yet stored. Without it the bound is exact: chunks are stored whole.
    """
    ratio = MAX_FILTER_RATIO if ds.id.get_create_plist().get_nfilters() else 1
    chunk_rows = (ds.chunks[0] if ds.chunks else 1) if slack else 0
    return int(ds.id.get_storage_size()) * ratio // max(1, row_bytes) + chunk_rows


