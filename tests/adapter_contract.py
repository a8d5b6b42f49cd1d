"""The adapter contract suite: one set of checks every framework adapter must pass.

Modelled on scikit-learn's ``sklearn/utils/estimator_checks.py``: an adapter's test module
describes a small problem as an :class:`AdapterCase` (a bundle of callables around the
adapter and an *independent* reference route), then runs every check in
:data:`ALL_CHECKS` on it. Every check has the same signature ``check(case, tmp_path)`` and
raises ``AssertionError`` on failure, so it can be parametrized directly.

What the checks assert (the estimators of ``docs/theory.md`` section 2, the store round trip
of ``docs/format.md``):

* :func:`check_layout_matches_gradients` -- the layout's names are unique and its sizes add
  up to the number of columns ``P`` of the ``(n, P)`` gradient array.
* :func:`check_sum_equals_batch_gradient` -- :math:`\\sum_i g_i` equals the framework's own
  gradient of the *summed* loss :math:`\\nabla_\\theta \\sum_i \\ell_i` (float32 tolerance).
  This also catches gradients scaled by ``1/B`` (a mean-reduced loss).
* :func:`check_finite_differences` -- each row :math:`g_i` agrees with central finite
  differences of that sample's own loss (float64 where the framework allows):
  :math:`(\\ell_i(\\theta + \\epsilon e_j) - \\ell_i(\\theta - \\epsilon e_j)) / 2\\epsilon`.
* :func:`check_store_roundtrip` -- layout -> ``GradientWriter`` -> ``open_store`` ->
  ``reduce`` round-trips names, shapes, gradients and the mean.
* :func:`check_batched_records_equal_single_write` -- a record written batch by batch by
  the adapter's recorder equals one big ``write`` of the whole gradient array (and loss).
* :func:`check_unsupported_raise` -- unsupported models/layers raise ``AdapterError`` whose
  message says what *is* supported.

:data:`FACTORED_CHECKS`, for adapters that write factored records (``AdapterCase.factors``):

* :func:`check_factored_store_roundtrip` -- the adapter's factors ``(A, D)`` and plain
  columns round-trip through a factored ``GradientWriter``, and the materialised rows
  :math:`\\sum_t \\delta_{it} a_{it}^\\top` (and ``reduce``'s mean) equal the adapter's
  per-sample gradients (their mean).
* :func:`check_factored_batched_records_equal_single_write` -- the recorder's factored
  record (``keep="factors"``), materialised, equals one big write of the full gradients.

Usage in an adapter's test module (``tests/`` is on ``sys.path`` under pytest)::

    import pytest
    from adapter_contract import ALL_CHECKS, AdapterCase

    def make_case() -> AdapterCase:
        ...
        return AdapterCase(
            name="torch-mlp",
            framework="torch",
            layout=gt.layout(model),                       # [(name, shape), ...]
            per_sample_gradients=lambda: gt.per_sample_gradients(model, loss_fn, x, y),
            batch_gradient=lambda: ...,      # (P,) framework gradient of sum of losses
            flat_params=lambda: ...,         # (P,) float64, layout order
            per_sample_losses=lambda theta: ...,   # (P,) float64 -> (n,) losses at theta
            per_sample_gradients_fd=lambda: ...,   # adapter's (n, P) at flat_params, float64
            losses=lambda: ...,              # (n,) per-sample losses the recorder stores
            write_batches=lambda writer, step, split, batch_size: ...,  # adapter's recorder
            unsupported=[(lambda: gt.per_sample_gradients(bad, ...), r"BatchNorm")],
        )

    @pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
    def test_contract(check, tmp_path):
        check(make_case(), tmp_path)

The callables are called lazily, each check calls only what it needs, so a check failure
points at one piece of the adapter. Function signatures here are stable: add fields with
defaults, never rename.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from conftest import U32, assert_within, f32_batch_sum_bound, f32_chain_bound

__all__ = [
    "ALL_CHECKS",
    "FACTORED_CHECKS",
    "AdapterCase",
    "check_batched_records_equal_single_write",
    "check_factored_batched_records_equal_single_write",
    "check_factored_store_roundtrip",
    "check_finite_differences",
    "check_layout_matches_gradients",
    "check_store_roundtrip",
    "check_sum_equals_batch_gradient",
    "check_unsupported_raise",
    "run_contract",
]


@dataclass
class AdapterCase:
    """A small problem around one adapter, described by callables.

    Parameters
    ----------
    name : str
        Label used in assertion messages.
    layout : sequence of (str, tuple of int)
        The adapter's layout, exactly what it passes to ``GradientWriter``.
    per_sample_gradients : callable () -> ndarray (n, P)
        The adapter's per-sample gradients in layout order, model in its normal precision.
    batch_gradient : callable () -> ndarray (P,)
        The framework's *own* gradient of :math:`\\sum_i \\ell_i` (e.g. ``loss.sum().backward()``
        or ``jax.grad`` of the summed loss), flattened in layout order. Independent route.
    flat_params : callable () -> ndarray (P,)
        The parameters, flattened in layout order (float64), point of the finite differences.
    per_sample_losses : callable (ndarray (P,)) -> ndarray (n,)
        Each sample's own loss :math:`\\ell_i(\\theta)` at a flat parameter vector, computed by
        the framework (float64 where possible). Independent route for finite differences.
    write_batches : callable (writer, step, split, batch_size) -> None
        Writes the record ``(step, split)`` of all ``n`` samples into an open
        ``GradientWriter`` through the adapter's recorder, ``batch_size`` samples at a time,
        in the same sample order as ``per_sample_gradients``.
    per_sample_gradients_fd : callable () -> ndarray (n, P), optional
        The adapter's gradients at ``flat_params`` in the precision the finite differences
        use (float64 model). Defaults to ``per_sample_gradients``.
    losses : callable () -> ndarray (n,), optional
        The per-sample losses the recorder stores; when given, the batched record's losses
        must equal them. Defaults to ``per_sample_losses(flat_params())``.
    unsupported : sequence of (callable () -> Any, str)
        Calls that must raise ``AdapterError`` with a message matching the regex. At least
        one is required: the contract asks for clear errors on unsupported models.
    framework : str
        Stored as the writer's ``framework`` attribute.
    sum_rtol : float
        Relative tolerance (to the largest gradient entry) of the batch-gradient check of
        adapters that do not compute in float32 (whose batch gradient may be a finite
        difference); float32 adapters are held to a float32 error bound instead.
    fd_eps, fd_rtol, fd_atol : float
        Central-difference step and tolerances; ``fd_atol`` is relative to the largest
        gradient entry.
    fd_max_coords : int or None
        Check this many randomly chosen coordinates (all when ``None``).
    f32_terms : int
        Terms along the longest float32 chain (forward, loss and backward dot products)
        ending in one gradient entry or loss; the float32 error bounds of the checks
        (``conftest.f32_chain_bound``) scale with it. The default covers this suite's
        models (the torch CNN's conv-weight chain is ~80: conv 18, pool 4, linear 12,
        softmax and BatchNorm ~15 forward; 3 + 16 positions + ~10 backward).
    batch_size : int
        Batch size used by :func:`check_batched_records_equal_single_write`; pick one that
        does not divide ``n`` so a ragged last batch is exercised.
    seed : int
        Seed of the coordinate sample.
    factors : sequence of (weight, bias or None, rows), optional
        The factored tensors (``gs.FactorSpec`` arguments) of a case whose adapter writes
        factored records (``docs/format.md``, version 4); enables :data:`FACTORED_CHECKS`.
    per_sample_factors : callable () -> (ndarray (n, P_plain), dict weight -> (A, D))
        The adapter's factors and plain columns of the same samples as
        ``per_sample_gradients``.
    write_batches_factored : callable (writer, step, split, batch_size) -> None
        As ``write_batches``, into a writer opened with ``factors`` (the adapter's recorder
        with ``keep="factors"``).
    factor_dtype : str
        ``factor_dtype`` of the factored writers the checks open.
    """

    name: str
    layout: Sequence[tuple[str, tuple[int, ...]]]
    per_sample_gradients: Callable[[], np.ndarray]
    batch_gradient: Callable[[], np.ndarray]
    flat_params: Callable[[], np.ndarray]
    per_sample_losses: Callable[[np.ndarray], np.ndarray]
    write_batches: Callable[[Any, int, str, int], None]
    per_sample_gradients_fd: Callable[[], np.ndarray] | None = None
    losses: Callable[[], np.ndarray] | None = None
    unsupported: Sequence[tuple[Callable[[], Any], str]] = ()
    framework: str = "unknown"
    sum_rtol: float = 1e-4
    fd_eps: float = 1e-6
    fd_rtol: float = 1e-5
    fd_atol: float = 1e-7
    fd_max_coords: int | None = 64
    f32_terms: int = 128
    batch_size: int = 3
    seed: int = 0
    factors: Sequence[tuple[str, str | None, int]] | None = None
    per_sample_factors: Callable[[], tuple[np.ndarray, dict[str, Any]]] | None = None
    write_batches_factored: Callable[[Any, int, str, int], None] | None = None
    factor_dtype: str = "float32"


def _sizes(case: AdapterCase) -> list[int]:
    return [math.prod(tuple(shape)) for _, shape in case.layout]


def _layers(case: AdapterCase) -> np.ndarray:
    """Each column's layer (the tensor name up to its last dot): the float32 bounds take the
    magnitude of a column's terms from its layer, whose columns share one backward vector."""
    return np.repeat([name.rpartition(".")[0] or name for name, _ in case.layout], _sizes(case))


def _grads(case: AdapterCase) -> np.ndarray:
    G = case.per_sample_gradients()
    assert isinstance(G, np.ndarray), f"{case.name}: per_sample_gradients must return ndarray"
    assert G.ndim == 2, f"{case.name}: gradients must be (n, P), got shape {G.shape}"
    return G


def check_layout_matches_gradients(case: AdapterCase, tmp_path: Path | None = None) -> None:
    """Layout names are unique strings, shapes are int tuples, sizes add up to ``P``."""
    names = [name for name, _ in case.layout]
    assert all(isinstance(n, str) and n for n in names), f"{case.name}: bad names {names}"
    assert len(set(names)) == len(names), f"{case.name}: duplicate names in layout {names}"
    for name, shape in case.layout:
        assert all(int(s) == s and s >= 0 for s in shape), f"{case.name}: bad shape {name}"
    G = _grads(case)
    assert G.shape[1] == sum(_sizes(case)), (
        f"{case.name}: gradients have {G.shape[1]} columns, layout has {sum(_sizes(case))}"
    )
    assert np.all(np.isfinite(G)), f"{case.name}: non-finite per-sample gradients"


def check_sum_equals_batch_gradient(case: AdapterCase, tmp_path: Path | None = None) -> None:
    """:math:`\\sum_i g_i = \\nabla_\\theta \\sum_i \\ell_i` to float32 tolerance.

    A factor ``1/n`` (mean-reduced loss) or a missing/duplicated sample fails this check.
    """
    G32 = _grads(case)
    G = G32.astype(np.float64)
    ref = np.asarray(case.batch_gradient(), dtype=np.float64).ravel()
    assert ref.shape == (G.shape[1],), f"{case.name}: batch gradient shape {ref.shape}"
    total = G.sum(axis=0)
    assert G.shape[0] >= 2, f"{case.name}: use at least two samples"
    if G32.dtype == np.float32:
        # float32 rows (summed in float64) vs the framework's float32 batch gradient
        bound = f32_batch_sum_bound(G, case.f32_terms, _layers(case))
        assert_within(total, ref, bound, f"{case.name}: sum of per-sample gradients != batch "
                      "gradient of summed loss")
        # a factor 1/n moves an entry by >= |ref|/2: it must exceed the bound somewhere
        assert np.any(np.abs(ref) > 10 * bound), (
            f"{case.name}: batch gradient too small to be a meaningful check")
        return
    scale = max(float(np.abs(G).max()) * math.sqrt(G.shape[0]), float(np.abs(ref).max()), 1e-30)
    np.testing.assert_allclose(
        total, ref, rtol=case.sum_rtol, atol=case.sum_rtol * scale,
        err_msg=f"{case.name}: sum of per-sample gradients != batch gradient of summed loss",
    )
    # a factor 1/n (n >= 2) would slip through only if the gradient were ~0: guard that
    assert np.abs(ref).max() > 10 * case.sum_rtol * scale, (
        f"{case.name}: batch gradient too small to be a meaningful check"
    )


def check_finite_differences(case: AdapterCase, tmp_path: Path | None = None) -> None:
    """Each :math:`g_{ij}` matches a central difference of sample ``i``'s own loss.

    .. math:: g_{ij} \\approx \\frac{\\ell_i(\\theta + \\epsilon e_j)
              - \\ell_i(\\theta - \\epsilon e_j)}{2\\epsilon}
    """
    theta = np.asarray(case.flat_params(), dtype=np.float64).copy()
    fd_route = case.per_sample_gradients_fd or case.per_sample_gradients
    G = np.asarray(fd_route(), dtype=np.float64)
    n, P = G.shape
    assert theta.shape == (P,), f"{case.name}: flat_params shape {theta.shape} != ({P},)"
    base = np.asarray(case.per_sample_losses(theta), dtype=np.float64)
    assert base.shape == (n,), f"{case.name}: per_sample_losses shape {base.shape} != ({n},)"
    rng = np.random.default_rng(case.seed)
    if case.fd_max_coords is None or case.fd_max_coords >= P:
        coords = np.arange(P)
    else:
        # always include the largest-magnitude coordinate so the check cannot pass on zeros
        coords = rng.choice(P, size=case.fd_max_coords, replace=False)
        coords = np.unique(np.append(coords, np.argmax(np.abs(G).max(axis=0))))
    fd = np.empty((n, coords.size))
    for c, j in enumerate(coords):
        old = theta[j]
        theta[j] = old + case.fd_eps
        up = np.asarray(case.per_sample_losses(theta), dtype=np.float64)
        theta[j] = old - case.fd_eps
        down = np.asarray(case.per_sample_losses(theta), dtype=np.float64)
        theta[j] = old
        fd[:, c] = (up - down) / (2 * case.fd_eps)
    scale = max(float(np.abs(G).max()), 1e-30)
    np.testing.assert_allclose(
        G[:, coords], fd, rtol=case.fd_rtol, atol=case.fd_atol * scale,
        err_msg=f"{case.name}: per-sample gradients disagree with finite differences",
    )


def check_store_roundtrip(case: AdapterCase, tmp_path: Path) -> None:
    """Layout -> writer -> store -> reduce round-trips names, shapes, gradients and mean."""
    import gsnr_stats as gs

    G = _grads(case)
    names = [name for name, _ in case.layout]
    shapes = [tuple(int(s) for s in shape) for _, shape in case.layout]
    path = Path(tmp_path) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', case.name)}-roundtrip.h5"
    with gs.GradientWriter(path, list(case.layout), attrs={"framework": case.framework}) as w:
        w.write(step=0, split="train", grads=G)
        w.end_record(0, "train")
    with gs.open_store(path) as store:
        assert list(store.layout.names) == names, f"{case.name}: names did not round-trip"
        assert [tuple(s) for s in store.layout.shapes] == shapes, f"{case.name}: shapes"
        assert store.layout.n_params == G.shape[1]
        np.testing.assert_array_equal(store.read_grads(0, "train"), G.astype(np.float32))
    stats = gs.reduce(path)
    expected_tensor = np.repeat(np.array(names, dtype=object), _sizes(case))
    assert list(stats["tensor"].values) == list(expected_tensor), f"{case.name}: tensor coord"
    assert int(stats["count"].sel(step=0, split="train")) == G.shape[0]
    np.testing.assert_allclose(
        stats["mean"].sel(step=0, split="train").values,
        G.astype(np.float32).astype(np.float64).mean(axis=0),
        rtol=1e-10, atol=1e-12 * max(float(np.abs(G).max()), 1e-30),
        err_msg=f"{case.name}: reduced mean differs from the gradients' mean",
    )


def _factor_specs(case: AdapterCase) -> list[Any]:
    import gsnr_stats as gs

    assert case.factors, f"{case.name}: the case declares no factors"
    return [gs.FactorSpec(w, bias=b, rows=r) for w, b, r in case.factors]


def _rows_bound(case: AdapterCase, G: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Two routes of the adapter's own precision, one of them rounded to float32 once more
    in the store: within ``K u_G`` colmax of the exact rows each, plus ``u |g|``."""
    u_g = float(np.finfo(G.dtype).eps) / 2
    return 2 * U32 * np.abs(ref) + 2 * f32_chain_bound(ref, case.f32_terms, _layers(case)) * (
        u_g / U32)


def check_factored_store_roundtrip(case: AdapterCase, tmp_path: Path) -> None:
    """The adapter's factors -> factored ``GradientWriter`` -> ``open_store``: the factors
    come back as written, and the materialised rows (``read_grads``: products in float64)
    equal the adapter's per-sample gradients ``G`` within the float32 store rounding and
    the adapter's own (independent routes) rounding."""
    import gsnr_stats as gs

    G = _grads(case)
    assert case.per_sample_factors is not None, f"{case.name}: no per_sample_factors"
    plain, facs = case.per_sample_factors()
    done = {n for w, b, _ in case.factors or () for n in (w, b) if n is not None}
    P_plain = sum(s for (name, _), s in zip(case.layout, _sizes(case), strict=True)
                  if name not in done)
    assert plain.shape == (G.shape[0], P_plain), f"{case.name}: plain shape {plain.shape}"
    assert set(facs) == {w for w, _, _ in case.factors or ()}, f"{case.name}: factors {facs}"
    path = Path(tmp_path) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', case.name)}-factored.h5"
    with gs.GradientWriter(path, list(case.layout), attrs={"framework": case.framework},
                           factors=_factor_specs(case), factor_dtype=case.factor_dtype) as w:
        w.write(step=0, split="train", grads=plain if P_plain else None, factors=facs,
                loss=np.zeros(G.shape[0]))
        w.end_record(0, "train")
    with gs.open_store(path) as store:
        assert store.factored, f"{case.name}: the store is not factored"
        assert [f.weight for f in store.factors] == [w for w, _, _ in case.factors or ()]
        back = store.read_factors(0, "train")
        dt = np.dtype(case.factor_dtype)
        for k, (a, d) in facs.items():
            n = a.shape[0]
            for got, want in zip(back[k], (a, d), strict=True):
                want = np.asarray(want).reshape(n, -1, want.shape[-1]).astype(dt)
                np.testing.assert_array_equal(got[:, :want.shape[1]], want,
                                              err_msg=f"{case.name}: factor {k} round trip")
        rows = store.read_grads(0, "train")
    assert rows.shape == G.shape, f"{case.name}: materialised rows {rows.shape} != {G.shape}"
    bound = _rows_bound(case, G, G)
    assert_within(rows, G.astype(np.float64), bound,
                  f"{case.name}: materialised factored rows differ from the gradients")
    # reduce reads the factors themselves: its mean is within the rows' mean bound
    stats = gs.reduce(path)
    assert int(stats["count"].sel(step=0, split="train")) == G.shape[0]
    assert_within(stats["mean"].sel(step=0, split="train").values,
                  G.astype(np.float64).mean(axis=0), bound.mean(axis=0) + 1e-12 * (
                      np.abs(G).max() + 1e-30),
                  f"{case.name}: reduce of the factored record differs from the gradients' mean")


def check_factored_batched_records_equal_single_write(case: AdapterCase,
                                                      tmp_path: Path) -> None:
    """A factored record written batch by batch by the recorder (``keep="factors"``)
    equals one big ``write`` of the full gradients once materialised."""
    assert case.write_batches_factored is not None, f"{case.name}: no factored recorder"
    check_batched_records_equal_single_write(case, tmp_path, factored=True)


def check_batched_records_equal_single_write(case: AdapterCase, tmp_path: Path,
                                             factored: bool = False) -> None:
    """A record written batch by batch by the recorder equals one big ``write``."""
    import gsnr_stats as gs

    G = _grads(case)
    if case.losses is not None:
        losses = np.asarray(case.losses(), dtype=np.float64)
    else:
        losses = np.asarray(case.per_sample_losses(np.asarray(case.flat_params())), np.float64)
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", case.name)
    one = Path(tmp_path) / f"{tag}-single.h5"
    many = Path(tmp_path) / f"{tag}-batched.h5"
    with gs.GradientWriter(one, list(case.layout), attrs={"framework": case.framework}) as w:
        w.write(step=3, split="test", grads=G, loss=losses)
        w.end_record(3, "test")
    if factored:
        many = many.with_name(f"{tag}-batched-factored.h5")
        fw = {"factors": _factor_specs(case), "factor_dtype": case.factor_dtype}
        with gs.GradientWriter(many, list(case.layout), attrs={"framework": case.framework},
                               **fw) as w:
            assert case.write_batches_factored is not None
            case.write_batches_factored(w, 3, "test", case.batch_size)
    else:
        with gs.GradientWriter(many, list(case.layout),
                               attrs={"framework": case.framework}) as w:
            case.write_batches(w, 3, "test", case.batch_size)
    with gs.open_store(one) as a, gs.open_store(many) as b:
        assert [(r.step, r.split) for r in b.records] == [(3, "test")], (
            f"{case.name}: recorder wrote records {[(r.step, r.split) for r in b.records]}"
        )
        assert not b.incomplete, f"{case.name}: recorder left the record incomplete"
        assert b.factored == factored, f"{case.name}: factored={b.factored}"
        ga, gb = a.read_grads(3, "test"), b.read_grads(3, "test")
        assert gb.shape == ga.shape, f"{case.name}: batched record shape {gb.shape} != {ga.shape}"
        # batch composition may change rounding inside the framework, nothing more: each
        # route is within K u_G colmax of the exact rows (u_G the adapter's own precision),
        # and a float64 adapter's rows are rounded to float32 once more (u |g|) in the store
        # (a factored record's products are formed from the factors in float64)
        assert_within(gb, ga, _rows_bound(case, G, ga),
                      f"{case.name}: batched record differs from one big write")
        la, lb = a.read_loss(3, "test"), b.read_loss(3, "test")
        if G.dtype == np.float32:  # two float32 forward passes: K u each, times max |loss|
            assert_within(lb, la, 2 * case.f32_terms * U32 * np.abs(la).max(),
                          f"{case.name}: recorded per-sample losses differ")
        else:  # float64 losses against the case's own (independent float64) loss formula
            np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{case.name}: recorded per-sample losses differ")
        np.testing.assert_array_equal(b.read_sample_id(3, "test"), a.read_sample_id(3, "test"))


def check_unsupported_raise(case: AdapterCase, tmp_path: Path | None = None) -> None:
    """Unsupported models raise ``AdapterError`` naming the problem and what is supported."""
    from gsnr_stats.errors import AdapterError

    assert case.unsupported, f"{case.name}: the case lists no unsupported model to check"
    for call, pattern in case.unsupported:
        try:
            call()
        except AdapterError as err:
            msg = str(err)
            assert re.search(pattern, msg), f"{case.name}: {msg!r} does not match {pattern!r}"
            assert "support" in msg.lower(), f"{case.name}: {msg!r} does not say what is supported"
        else:
            raise AssertionError(f"{case.name}: expected AdapterError matching {pattern!r}")


ALL_CHECKS: tuple[Callable[[AdapterCase, Path], None], ...] = (
    check_layout_matches_gradients,
    check_sum_equals_batch_gradient,
    check_finite_differences,
    check_store_roundtrip,
    check_batched_records_equal_single_write,
    check_unsupported_raise,
)


# The checks of factored records (AdapterCase.factors): the record checks again, factored.
FACTORED_CHECKS: tuple[Callable[[AdapterCase, Path], None], ...] = (
    check_factored_store_roundtrip,
    check_factored_batched_records_equal_single_write,
)


def run_contract(case: AdapterCase, tmp_path: Path) -> None:
    """Run every check of :data:`ALL_CHECKS` on ``case`` (stops at the first failure), and
    :data:`FACTORED_CHECKS` when the case declares factors."""
    for check in ALL_CHECKS + (FACTORED_CHECKS if case.factors else ()):
        check(case, tmp_path)
