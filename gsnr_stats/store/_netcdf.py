"""The netCDF-4 face of a store: HDF5 dimension scales and CF attributes, set at creation.

netCDF-C (``netCDF4``, ``xarray``'s default engine) and ``h5netcdf`` name a dataset's
dimensions by the HDF5 dimension scales attached to it; without them every axis is a
``phony_dim_N``. Every scale here is created with the schema, before the file is published
or switched to SWMR mode, and none holds data: a *dimension without a variable* (netCDF-C's
own convention, a ``NAME`` attribute starting with :data:`NOT_A_VARIABLE`) whose dataset is
never written. Growing dimensions (``sample``, ``moment_block``, table rows) are unlimited,
and netCDF readers take an unlimited dimension's length as the longest variable attached to
it, so appends never touch a scale: the writer's steps, and its crash model, are the same
as without them. The only scale with values is the small ``layout`` coordinate (one entry
per parameter tensor). Readers of the store never look at any of this (``docs/format.md``,
"Opening a store with xarray / netCDF4").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from .layout import Layout
from .schema import CRC_COL, SPLIT_MAX_BYTES, TABLES

NOT_A_VARIABLE = "This is a netCDF dimension but not a netCDF variable."
# File format bounds of a new store. SWMR needs a low bound of at least 1.10; a low bound of
# 1.12 or later ("latest") makes HDF5 write the dimension scales' references in the 1.12
# reference format, on which netCDF-C built with HDF5 1.10 (Debian 12's ncdump 4.9.0)
# crashes with SIGSEGV. Nothing else in a store needs a format newer than 1.10.
LIBVER = ("v110", "latest")
CONVENTIONS = "CF-1.10"
REFERENCES = (
    "Liu, J., Jiang, G., Bai, Y., Chen, T., Wang, H. (2020). Understanding Why Neural "
    "Networks Generalize Well Through GSNR of Parameters. ICLR 2020. arXiv:2001.07384"
)
COMMENT = (
    "The rows of grads/loss/sample_id/label (dimension sample) are the samples of all "
    "records back to back; the segments table says which rows belong to which (step, "
    "split) record and the records table which records are complete (rows of incomplete "
    "records are left by a killed writer). gsnr_stats.open_store(path) or "
    "xarray.open_dataset(path, engine='gsnr_stats') read completed records only."
)

ONE = {"units": "1"}
_KIND = {"flag_values": np.array([0, 1], np.uint8), "flag_meanings": "gradients moments"}
_SPLIT = {"long_name": "data split name: UTF-8 bytes, NUL padded"}
_ROW_CRC = {"long_name": "row checksum: CRC-32 of the table name and the row's other "
                         "columns, bit 32 set (written last)"}
_STEP = {"long_name": "checkpoint step of the record"}
_LR = {"long_name": "learning rate", **ONE}
_EPOCH = {"long_name": "epoch", **ONE}

#: attributes of every table column (``crc`` and ``split`` are shared)
COLUMN_ATTRS: dict[str, dict[str, dict[str, Any]]] = {
    "segments": {
        "step": _STEP, "split": _SPLIT,
        "kind": {"long_name": "kind of rows: per-sample gradients or moments blocks", **_KIND},
        "start": {"long_name": "first row of this write call (in grads, or in moments)"},
        "stop": {"long_name": "row past the last of this write call"},
        "sum1": {"long_name": "data checksum: sum of the values' raw bits mod 2**64"},
        "sum2": {"long_name": "data checksum: position-weighted sum of the raw bits mod 2**64"},
        "aux_crc": {"long_name": "CRC-32 (bit 32 set) of the rows' loss, sample_id, label "
                                 "bytes (or count, mean, m2)"},
    },
    "records": {
        "step": _STEP, "split": _SPLIT,
        "kind": {"long_name": "kind of record: per-sample gradients or moments only", **_KIND},
        "n_samples": {"long_name": "number of samples of the record", **ONE},
        "lr": _LR, "epoch": _EPOCH,
        "seg_stop": {"long_name": "segments rows written before this record was completed"},
        "grads_stop": {"long_name": "grads rows written before this record was completed"},
        "moments_stop": {"long_name": "moments blocks written before this record was completed"},
        "optimizer_step": {"long_name": "optimizer update count at the checkpoint "
                                        "(-1: not recorded)", **ONE},
        "meta_start": {"long_name": "first byte of the record's JSON metadata in record_meta"},
        "meta_stop": {"long_name": "byte past the last of the record's JSON metadata"},
        "meta_crc": {"long_name": "CRC-32 (bit 32 set) of the record's metadata bytes"},
    },
    "trajectory": {
        "step": {"long_name": "step"}, "lr": _LR, "epoch": _EPOCH,
        "train_loss": {"long_name": "mean training loss at the step", **ONE},
        "test_loss": {"long_name": "mean test loss at the step", **ONE},
    },
    "probes": {
        "step": {"long_name": "step"}, "n": {"long_name": "samples n of each subset", **ONE},
        "lr": _LR, "k": {"long_name": "index k of the subset pair (D_k, D'_k)"},
        "train_before": {"long_name": "mean loss on D_k before the virtual step", **ONE},
        "train_after": {"long_name": "mean loss on D_k after the virtual step", **ONE},
        "test_before": {"long_name": "mean loss on D'_k before the virtual step", **ONE},
        "test_after": {"long_name": "mean loss on D'_k after the virtual step", **ONE},
    },
}

#: attributes of the root and moments datasets
DATA_ATTRS: dict[str, dict[str, Any]] = {
    "grads": {"long_name": "per-sample gradient of each sample's own loss", **ONE,
              "comment": "d loss_i / d theta_j; loss and parameters taken as plain numbers"},
    "loss": {"long_name": "per-sample loss (NaN where not written)", **ONE},
    "sample_id": {"long_name": "sample identifier"},
    "label": {"long_name": "label or target (NaN where not written)"},
    "record_meta": {"long_name": "UTF-8 JSON metadata of the records, back to back (see "
                                 "records/meta_start, meta_stop)"},
    "moments/count": {"long_name": "number of samples of the moments block", **ONE},
    "moments/mean": {"long_name": "mean per-sample gradient of the moments block", **ONE},
    "moments/m2": {"long_name": "sum of squared deviations M2 = sum_i (g_i - mean)^2 of the "
                                "moments block", **ONE},
}


def _dim(g: h5py.Group, name: str, size: int | None) -> h5py.Dataset:
    """A dimension without a variable: ``size`` None is unlimited. Never written."""
    if size is None:
        d = g.create_dataset(name, (0,), maxshape=(None,), dtype=">f4", chunks=(1024,))
    else:
        d = g.create_dataset(name, (size,), dtype=">f4")  # contiguous, never allocated
    d.make_scale(f"{NOT_A_VARIABLE}{0 if size is None else size:10d}")
    return d


def global_attrs(library_version: str, framework: str, framework_version: str,
                 created_at: str) -> dict[str, str]:
    """CF global attributes of a store (``title`` ... ``references``)."""
    fw = f"{framework} {framework_version}".strip()
    return {
        "Conventions": CONVENTIONS,
        "title": "gsnr-stats gradient store: per-sample gradients and gradient moments",
        "source": f"gsnr-stats {library_version} GradientWriter (framework: {fw})",
        "history": f"{created_at} created by gsnr-stats {library_version}",
        "references": REFERENCES,
        "comment": COMMENT,
    }


def add_netcdf_view(f: h5py.File, layout: Layout, factors: Sequence[Any] = ()) -> None:
    """Attach dimension scales to every dataset of a new store and set CF attributes.

    Call once, while creating the schema (before SWMR mode): attaching writes attributes
    to the datasets' object headers, which a SWMR writer must not do afterwards.
    ``factors`` (format 4): ``grads`` spans the ``plain_param`` dimension, and each
    ``factors/<k>/a``, ``delta`` gets ``(sample, t, in)``, ``(sample, t, out)``.
    """
    P = layout.n_params
    sample, moment_block = _dim(f, "sample", None), _dim(f["moments"], "moment_block", None)
    param, split_byte = _dim(f, "param", P), _dim(f, "split_byte", SPLIT_MAX_BYTES)
    meta_byte = _dim(f, "meta_byte", None)
    for name in ("grads", "loss", "sample_id", "label"):
        f[name].dims[0].attach_scale(sample)
    if factors:
        plain = _dim(f, "plain_param", int(f["grads"].shape[1]))
        f["grads"].dims[1].attach_scale(plain)
        f["grads"].attrs["comment"] = ("the plain (not factored) parameters, in layout order; "
                                       "factored tensors are in factors/<k>")
        _factor_view(f, sample, factors)
    else:
        f["grads"].dims[1].attach_scale(param)
    f["record_meta"].dims[0].attach_scale(meta_byte)
    f["moments/count"].dims[0].attach_scale(moment_block)
    for name in ("moments/mean", "moments/m2"):
        f[name].dims[0].attach_scale(moment_block)
        f[name].dims[1].attach_scale(param)
    for name, attrs in DATA_ATTRS.items():
        f[name].attrs.update({k: v for k, v in attrs.items()
                              if not (factors and name == "grads" and k == "comment")})
    # the layout: a coordinate of tensor names, and one variable per field (small: T rows)
    names = f.create_dataset("layout", data=np.array(layout.names, dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
    names.make_scale("layout")
    names.attrs["long_name"] = "parameter tensor, in flat order"
    fields = (
        ("layout_layer", np.array(layout.layers, dtype=object), "layer of the tensor"),
        ("layout_shape", np.array([json.dumps(list(s)) for s in layout.shapes], dtype=object),
         "shape of the tensor (JSON list)"),
        ("layout_offset", np.array(layout.offsets, np.int64),
         "first column of the tensor in param (C order within the tensor)"),
        ("layout_size", np.array(layout.sizes, np.int64), "number of parameters of the tensor"),
    )
    for name, values, long_name in fields:
        dt = h5py.string_dtype("utf-8") if values.dtype == object else values.dtype
        d = f.create_dataset(name, data=values, dtype=dt)
        d.dims[0].attach_scale(names)
        d.attrs["long_name"] = long_name
    for tname, cols in TABLES.items():
        grp = f[tname]
        row = _dim(grp, f"{tname}_row", None)
        for cname, _, shape in (*cols, (CRC_COL, None, ())):
            ds = grp[cname]
            ds.dims[0].attach_scale(row)
            if shape:
                ds.dims[1].attach_scale(split_byte)
            ds.attrs.update(_ROW_CRC if cname == CRC_COL else COLUMN_ATTRS[tname][cname])


def _factor_view(f: h5py.File, sample: h5py.Dataset, factors: Sequence[Any]) -> None:
    """Scales ``t``, ``in``, ``out`` of each factor group and the factor datasets' attributes."""
    for k, fi in enumerate(factors):
        g = f[f"factors/{k}"]
        t, d_in, d_out = _dim(g, "t", fi.rows), _dim(g, "in", fi.in_), _dim(g, "out", fi.out)
        for name, width, text in (("a", d_in, "input rows a_it of the layer"),
                                  ("delta", d_out, "output-gradient rows delta_it of the layer")):
            ds = g[name]
            ds.dims[0].attach_scale(sample)
            ds.dims[1].attach_scale(t)
            ds.dims[2].attach_scale(width)
            ds.attrs.update({"long_name": f"{text} (zero rows pad shorter sequences)", **ONE,
                             "comment": f"per-sample gradient of {fi.weight} = sum_t delta_t "
                                        f"a_t^T" + (f"; of {fi.bias} = sum_t delta_t"
                                                    if fi.bias else "")})
