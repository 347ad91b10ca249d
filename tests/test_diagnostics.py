"""FLOW diagnostics against numpy and their invariants."""

import json
import os

import numpy as np
import pytest

import flowjax
from flowjax import diagnostics


def _table(rng, n=50):
    ids = rng.permutation(1000)[:n]
    losses = rng.gamma(2.0, 1.0, size=n)
    lt = flowjax.LossTable(ids, losses)
    return lt, lt.flow_weights()


def test_ess_against_numpy_and_its_invariants(rng):
    lt, wt = _table(rng)
    w = wt.weights.astype(np.float64)
    want = w.sum() ** 2 / (w**2).sum()
    assert diagnostics.effective_sample_size(wt) == pytest.approx(want, rel=1e-12)
    assert diagnostics.effective_sample_size(w) == pytest.approx(want, rel=1e-12)
    assert diagnostics.effective_sample_size(wt, fraction=True) == pytest.approx(
        want / len(w)
    )
    assert 1 < diagnostics.effective_sample_size(wt) < len(w)
    # uniform weights: n; one non-zero weight: 1; scale invariance (normalize= changes nothing)
    assert diagnostics.effective_sample_size(np.full(37, 0.3)) == pytest.approx(37)
    assert diagnostics.effective_sample_size(
        np.full(37, 0.3), fraction=True
    ) == pytest.approx(1)
    assert diagnostics.effective_sample_size(np.r_[np.zeros(9), 0.2]) == 1.0
    assert diagnostics.effective_sample_size(
        lt.flow_weights(normalize="mean")
    ) == pytest.approx(want, rel=1e-6)
    # huge weights do not overflow the squares
    assert diagnostics.effective_sample_size([1e200, 1e200]) == 2.0
    # τ → ∞ gives uniform weights, so ESS → n
    assert diagnostics.effective_sample_size(lt.flow_weights(1e9)) == pytest.approx(
        len(w)
    )


def test_histogram_against_np_histogram(rng):
    _, wt = _table(rng)
    w = wt.weights
    for bins, value_range in (
        (20, None),
        (7, (0.0, 1.0)),
        (np.array([0, 0.1, 0.5, 1.0]), None),
    ):
        counts, edges = np.histogram(w, bins=bins, range=value_range)
        h = diagnostics.weight_histogram(wt, bins, value_range=value_range)
        np.testing.assert_array_equal(h.counts, counts)
        np.testing.assert_array_equal(h.edges, edges)
        assert h.edges.dtype == np.float64
        assert h.counts.dtype == np.int64 and h.counts.sum() == len(w)
    h = diagnostics.weight_histogram(w)
    np.testing.assert_array_equal(h.counts, np.histogram(w, bins=20)[0])


def test_most_down_weighted_smallest_first_ties_by_id():
    #          ids: 5    6    7    8    9    10
    lt = flowjax.LossTable([9, 5, 8, 6, 10, 7], [3.0, 0.2, 3.0, 4.0, 3.0, 1.0])
    wt = lt.flow_weights()
    d = diagnostics.most_down_weighted(wt, k=3, losses=lt)
    assert d.ids.tolist() == [
        6,
        8,
        9,
    ]  # loss 4, then the tie at loss 3 by id (8 < 9 < 10)
    np.testing.assert_array_equal(d.weights, wt.lookup([6, 8, 9]))
    assert d.losses.tolist() == [4.0, 3.0, 3.0]
    # numpy reference on random weights with ties
    rng = np.random.default_rng(1)
    ids = rng.permutation(500)[:100]
    w = rng.integers(0, 10, size=100) / 10.0
    ref = sorted(zip(w.tolist(), ids.tolist(), strict=True))[:15]
    d = diagnostics.most_down_weighted(flowjax.WeightTable(ids, w), k=15)
    assert d.ids.tolist() == [i for _, i in ref]
    assert d.losses is None
    np.testing.assert_allclose(d.weights, [x for x, _ in ref])
    # k larger than the table: all of it
    assert len(diagnostics.most_down_weighted(wt, k=100).ids) == 6


def test_most_down_weighted_bad_input():
    lt = flowjax.LossTable([1, 2, 3], [0.1, 0.2, 0.3])
    wt = lt.flow_weights()
    with pytest.raises(ValueError, match="WeightTable"):
        diagnostics.most_down_weighted(np.ones(3))
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            diagnostics.most_down_weighted(wt, k=k)
    other = flowjax.LossTable([1, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"lacks the weight table's ids \[3\]"):
        diagnostics.most_down_weighted(wt, k=3, losses=other)
    with pytest.raises(ValueError, match="LossTable or None"):
        diagnostics.most_down_weighted(wt, k=3, losses=wt)


@pytest.mark.parametrize(
    "weights, match",
    [
        (np.array([]), "empty"),
        (np.ones((2, 2)), "1-D"),
        (np.array([0.5, np.nan]), "NaN or infinite"),
        (np.array([0.5, -0.1]), "must be >= 0; negative at positions \\[1\\]"),
        (np.array([True, False]), "numbers"),
        (np.zeros(3), "every weight is 0"),
    ],
)
def test_ess_bad_input(weights, match):
    with pytest.raises(ValueError, match=match):
        diagnostics.effective_sample_size(weights)


def test_plot_is_written(tmp_path, rng):
    _, wt = _table(rng)
    path = tmp_path / "weights.png"
    out = diagnostics.plot_weight_histogram(wt, path, log=True)
    assert out == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    plain = diagnostics.plot_weight_histogram(np.ones(4), tmp_path / "u.png", title="t")
    assert os.path.getsize(plain) > 0


def test_summary_values_and_text(rng):
    lt, wt = _table(rng, n=40)
    w = wt.weights.astype(np.float64)
    info, text = diagnostics.weight_summary(wt, lt)
    order = np.lexsort((wt.ids, wt.weights))[:5]
    assert info["n"] == 40
    assert info["temperature"] == wt.temperature == pytest.approx(np.median(lt.losses))
    assert info["mean_weight"] == pytest.approx(w.mean())
    assert info["ess"] == pytest.approx(w.sum() ** 2 / (w**2).sum())
    assert info["ess_fraction"] == pytest.approx(info["ess"] / 40)
    assert info["fraction_below"] == pytest.approx(np.mean(w < 0.1))
    assert info["down_weighted_ids"] == wt.ids[order].tolist()
    assert info["down_weighted_losses"] == pytest.approx(
        lt.lookup(wt.ids[order]).tolist()
    )
    json.dumps(info)  # serialisable as is
    assert text.startswith("FLOW weights: n = 40, τ = ")
    assert f"ESS = {info['ess']:.3g}" in text
    for i in info["down_weighted_ids"]:
        assert str(i) in text.splitlines()[1]
    # without losses or a known temperature
    info, text = diagnostics.weight_summary(
        flowjax.WeightTable([3, 1, 2], [1.0, 0.05, 0.5]), k=2
    )
    assert info["temperature"] is None and "τ = unknown" in text
    assert info["down_weighted_ids"] == [1, 2] and "down_weighted_losses" not in info
    assert info["fraction_below"] == pytest.approx(1 / 3)
    assert "33.3% below 0.1" in text
