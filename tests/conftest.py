"""Shared fixtures: small stores written through the public writer."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

# Keep the suite within 2 cores and deterministic.
os.environ.setdefault("NUMBA_NUM_THREADS", "2")
warnings.filterwarnings("ignore", message=".*os.fork.*")

import gsnr_stats as gs  # noqa: E402


def two_pass(g: np.ndarray, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Float64 two-pass reference: mean and variance per column."""
    g = np.asarray(g, dtype=np.float64)
    m = g.sum(axis=0) / g.shape[0]
    v = ((g - m) ** 2).sum(axis=0) / (g.shape[0] - ddof)
    return m, v


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def small_store(tmp_path, rng):
    """A store with two steps x (train, test), P = 3*4 + 4 = 16."""
    path = tmp_path / "small.h5"
    params = [("fc.weight", (3, 4)), ("fc.bias", (4,))]
    data = {}
    with gs.GradientWriter(path, params, attrs={"framework": "numpy", "note": "fixture"}) as w:
        for step in (0, 10):
            for split, n in (("train", 37), ("test", 23)):
                g = rng.normal(loc=0.5, scale=1.0 + step / 10, size=(n, 16)).astype(np.float32)
                loss = rng.random(n)
                w.write(step, split, g, loss=loss, lr=0.1, epoch=step / 10)
                data[(step, split)] = (g, loss)
    return path, params, data
