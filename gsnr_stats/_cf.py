"""CF metadata of the moments Dataset of ``reduce``: units, definitions, provenance.

:func:`annotate` is the last step of :func:`gsnr_stats.engine.build_dataset`, so every
route to the Dataset (``gs.reduce``, the Dask path, ``gs.gsnr``) and every netCDF written
from it (``gsnr-stats reduce -o``, ``stats.to_netcdf``) carries:

* ``units`` on every numeric variable and coordinate. CF ``units`` must parse with
  UDUNITS-2, which has no "loss" or "parameter" unit: losses and parameters are plain
  numbers, so their units are ``"1"`` and the unit in words is in ``units_description``
  (``mean``: "loss per parameter unit", i.e. d loss / d theta_j).
* a ``comment`` defining each symbol (m_j, s_j^2, M2_j, N, GSNR, debiased GSNR) in words,
  as in ``docs/theory.md``;
* global ``Conventions``, ``title``, ``source``, ``history``, ``references`` (Liu et al.,
  ICLR 2020) and ``comment``, plus the stores' framework, its version and the model;
* a ``block`` coordinate ``0 .. K-1`` when per-block moments are kept;
* string labels (``split``, ``tensor``, ``layer``) written as character arrays: a netCDF
  ``string`` variable named like its dimension is a CF coordinate variable, which CF
  requires to be numeric (cfchecker aborts on it); a char array is a label variable.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable
from typing import Any

import xarray as xr

from ._version import __version__
from .store._netcdf import REFERENCES

CONVENTIONS = "CF-1.8"
ONE = "1"
GRAD = "loss per parameter unit (d loss / d theta_j: loss and parameters are plain numbers)"
GRAD2 = "(loss per parameter unit)^2"

_G = ("g_ij = d loss_i / d theta_j is the gradient of sample i's own loss with respect to "
      "parameter j, at the checkpoint (step) on the samples of the split; ")
_N = "N (N_j: the samples of parameter j kept, with nonfinite='omit')"

#: attributes of each variable and coordinate (the engine's ``long_name`` is replaced)
VARIABLES: dict[str, dict[str, str]] = {
    "count": {
        "long_name": "number of samples N of the record (step, split)",
        "units": ONE,
        "comment": "N: how many per-sample gradients the moments of this step and split are "
                   "computed from",
    },
    "mean": {
        "long_name": "mean per-sample gradient m_j", "units": ONE, "units_description": GRAD,
        "comment": _G + f"m_j = (1/N) sum_i g_ij, the mean over the {_N} samples",
    },
    "m2": {
        "long_name": "sum of squared deviations M2_j of the per-sample gradient",
        "units": ONE, "units_description": GRAD2,
        "comment": _G + "M2_j = sum_i (g_ij - m_j)^2; kept so that the moments of shards and "
                        "blocks merge exactly (Chan et al.)",
    },
    "var": {
        "long_name": "per-sample gradient variance s_j^2", "units": ONE,
        "units_description": GRAD2,
        "comment": _G + "s_j^2 = M2_j / (N - ddof) (global attribute ddof), the variance over "
                        "samples of g_ij; NaN where N <= ddof",
    },
    "gsnr": {
        "long_name": "gradient signal-to-noise ratio r_j = m_j^2 / s_j^2", "units": ONE,
        "units_description": "dimensionless ratio",
        "comment": "GSNR of parameter j (Liu et al. 2020): squared mean over variance of the "
                   "per-sample gradient; +inf where s_j^2 = 0 and m_j != 0, NaN where s_j^2 = 0 "
                   "and m_j = 0",
    },
    "gsnr_debiased": {
        "long_name": "debiased GSNR r_j - 1/N", "units": ONE,
        "units_description": "dimensionless ratio",
        "comment": "m_j^2 overestimates the squared expected gradient by about s_j^2/N, so "
                   "(m_j^2 - s_j^2/N) / s_j^2 = r_j - 1/N is the GSNR with that bias removed; "
                   "negative where the signal is below what N samples resolve",
    },
    "n_dead": {
        "long_name": "parameters with s_j^2 = 0 and m_j = 0 (GSNR NaN)", "units": ONE,
        "comment": "count of parameters whose per-sample gradient is zero on every sample",
    },
    "n_inf": {
        "long_name": "parameters with s_j^2 = 0 and m_j != 0 (GSNR +inf)", "units": ONE,
        "comment": "count of parameters whose per-sample gradient is the same non-zero value "
                   "on every sample",
    },
    "n_omitted": {
        "long_name": "non-finite samples dropped per parameter", "units": ONE,
        "comment": "samples whose gradient of parameter j was NaN or Inf, left out of N_j "
                   "(nonfinite='omit')",
    },
    "lr": {
        "long_name": "learning rate given with the record", "units": ONE,
        "units_description": "parameter unit^2 per loss unit (lr * m_j is in parameter units)",
        "comment": "NaN where the record has none",
    },
    "epoch": {"long_name": "epoch given with the record", "units": ONE,
              "comment": "NaN where the record has none"},
    "loss_mean": {
        "long_name": "mean per-sample loss", "units": ONE,
        "units_description": "loss units (as returned by the loss function)",
        "comment": "(1/N) sum_i loss_i over the samples of the record that have a loss",
    },
    "loss_var": {
        "long_name": "variance of the per-sample loss", "units": ONE,
        "units_description": "loss units^2",
        "comment": "sum_i (loss_i - mean)^2 / (N - ddof)",
    },
    "block_count": {
        "long_name": "number of samples N_k of jackknife block k", "units": ONE,
        "comment": "samples of the record in block k (consecutive samples, blocks of nearly "
                   "equal size)",
    },
    "block_mean": {
        "long_name": "mean per-sample gradient m_kj of block k", "units": ONE,
        "units_description": GRAD,
        "comment": _G + "m_kj = mean of g_ij over the samples of block k",
    },
    "block_m2": {
        "long_name": "sum of squared deviations M2_kj of block k", "units": ONE,
        "units_description": GRAD2,
        "comment": _G + "M2_kj = sum over the samples i of block k of (g_ij - m_kj)^2",
    },
    # coordinates
    "step": {
        "long_name": "checkpoint step", "units": ONE,
        "comment": "the step label given to the writer for the record (an epoch or an "
                   "update count); the optimizer updates are in optimizer_step",
    },
    "optimizer_step": {
        "long_name": "optimizer update count at the checkpoint", "units": ONE,
        "comment": "-1 where not recorded",
    },
    "split": {"long_name": "data split",
              "comment": "name of the data the samples come from (train, test, ...)"},
    "param": {"long_name": "flat parameter index j", "units": ONE,
              "comment": "position in the flat parameter vector (global attribute layout)"},
    "tensor": {"long_name": "parameter tensor of parameter j"},
    "layer": {"long_name": "layer of parameter j"},
    "block": {"long_name": "jackknife block index k", "units": ONE,
              "comment": "blocks of consecutive samples of each record"},
}

#: the string label variables written as netCDF character arrays
LABELS = ("split", "tensor", "layer")

COMMENT = (
    "Per-parameter moments of the per-sample gradients of each (step, split) record of a "
    "gradient store. g_ij = d loss_i / d theta_j: gradient of sample i's loss with respect "
    "to parameter j; N: samples of the record; m_j: mean of g_ij over the samples; M2_j: "
    "sum of squared deviations from m_j; s_j^2 = M2_j / (N - ddof): variance; "
    "GSNR r_j = m_j^2 / s_j^2; debiased GSNR r_j - 1/N. Losses and parameters are plain "
    "numbers (units 1); each variable's units_description gives its unit in words. See "
    "docs/theory.md and docs/format.md of gsnr-stats."
)

#: the store attributes kept as global attributes of the Dataset (store key -> Dataset key)
_STORE_KEYS = {"framework_version": "framework_version"}
#: user attributes naming the model (torch/jax: model, sklearn: estimator)
_MODEL_KEYS = ("model", "estimator", "recorded_by")


def _join(values: Iterable[Any]) -> str:
    return ",".join(sorted({str(v) for v in values if v not in (None, "")}))


def provenance(stores: Iterable[Any]) -> dict[str, str]:
    """Provenance of the stores a Dataset is reduced from, as netCDF global attributes.

    Parameters
    ----------
    stores
        Open :class:`~gsnr_stats.store.GradientStore` objects, paths (opened here; one
        this process cannot open is left out: the Dask workers may see files it does not),
        or dicts shaped like ``GradientStore.attrs`` (``gs.gsnr``'s in-memory writer).

    Returns
    -------
    dict
        ``framework_version`` and ``model`` / ``estimator`` / ``recorded_by`` (from the
        writer's ``attrs``), each the sorted distinct values joined by ``,``; keys with no
        value are left out. Nothing that differs between two reductions of the same data
        (no timestamps), so the in-process, Dask and in-memory Datasets are equal.
    """
    from .store import open_store

    found: list[dict[str, Any]] = []
    for s in stores:
        if isinstance(s, str | os.PathLike):
            with contextlib.suppress(Exception), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with contextlib.closing(open_store(s)) as st:
                    found.append(st.attrs)
        else:
            found.append(s if isinstance(s, dict) else s.attrs)
    out: dict[str, str] = {}
    for key, name in _STORE_KEYS.items():
        out[name] = _join(a.get(key) for a in found)
    for key in _MODEL_KEYS:
        out[key] = _join(a.get("user_attrs", {}).get(key) for a in found
                         if isinstance(a.get("user_attrs", {}).get(key), str))
    return {k: v for k, v in out.items() if v}


def label_encoding(ds: xr.Dataset) -> xr.Dataset:
    """Write the string labels (:data:`LABELS`) of ``ds`` as netCDF character arrays.

    Sets ``encoding`` in place: ``dtype="S1"`` and a character dimension ``<name>_nchar``,
    and drops the ``original_shape`` a Dataset read from a file carries, so that a subset
    of it (shorter labels) is written without xarray's length-mismatch warning.
    """
    for name in LABELS:
        if name in ds.variables:
            enc = ds[name].encoding
            enc.pop("original_shape", None)
            enc.update(dtype="S1", char_dim_name=f"{name}_nchar")
    return ds


def annotate(ds: xr.Dataset) -> xr.Dataset:
    """Set the CF attributes of the moments Dataset (in place) and return it.

    Adds the ``block`` coordinate, replaces each known variable's attributes by
    :data:`VARIABLES`, marks the string labels for character-array encoding and sets the
    global ``Conventions``/``title``/``source``/``history``/``references``/``comment``.
    Attributes already in ``ds.attrs`` (run id, framework, sources) are kept.
    """
    if "block" in ds.dims and "block" not in ds.coords:
        ds = ds.assign_coords(block=("block", list(range(ds.sizes["block"]))))
    for name in list(ds.variables):
        if name in VARIABLES:
            ds[name].attrs.update(VARIABLES[name])
    if "var" in ds and "ddof" in ds.attrs:
        ds["var"].attrs["long_name"] += f" (ddof={ds.attrs['ddof']})"
    label_encoding(ds)
    a = ds.attrs
    fw = " ".join(x for x in (a.get("framework", ""), a.get("framework_version", "")) if x)
    model = a.get("model") or a.get("estimator") or ""
    a.update({
        "Conventions": CONVENTIONS,
        "title": "per-parameter gradient moments and GSNR",
        "source": (f"gsnr-stats {__version__} reduce of per-sample gradients"
                   + (f" recorded with {fw}" if fw else "")
                   + (f", model {model}" if model else "")),
        "history": f"per-sample gradient moments reduced by gsnr-stats {__version__}",
        "references": REFERENCES,
        "comment": COMMENT,
    })
    return ds
