"""LossTable / WeightTable: id-keyed, sorted, validated, saved atomically."""

from __future__ import annotations

import os

import numpy as np
import pytest

import flowjax


def test_table_sorts_by_id_and_fixes_dtypes():
    t = flowjax.LossTable(np.array([30, 10, 20], np.int32), np.array([3.0, 1.0, 2.0]))
    assert t.ids.dtype == np.int64 and t.losses.dtype == np.float32
    np.testing.assert_array_equal(t.ids, [10, 20, 30])
    np.testing.assert_array_equal(t.losses, [1.0, 2.0, 3.0])
    assert len(t) == 3 and not t.ids.flags.writeable and not t.losses.flags.writeable
    assert "n=3" in repr(t) and "median=2" in repr(t)


def test_lookup_follows_the_query_order_and_names_unknown_ids():
    t = flowjax.LossTable([5, 1, 9], [0.5, 0.1, 0.9])
    np.testing.assert_array_equal(
        t.lookup([9, 1, 9, 5]), np.float32([0.9, 0.1, 0.9, 0.5])
    )
    with pytest.raises(
        ValueError, match=r"ids \[4, 100\] are not in this LossTable \(3 examples\)"
    ):
        t.lookup([1, 4, 100])
    with pytest.raises(ValueError, match="not in this LossTable"):
        flowjax.LossTable([], []).lookup([1])


def test_large_int64_ids_survive_exactly():
    ids = np.array([2**40 + 3, 2**40 + 1, -(2**50)], np.int64)
    t = flowjax.LossTable(ids, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(t.ids, np.sort(ids))
    assert t.lookup([2**40 + 3])[0] == 1.0


@pytest.mark.parametrize("cls", [flowjax.LossTable, flowjax.WeightTable])
def test_save_and_load_round_trip_atomically(tmp_path, cls):
    t = cls([3, 1, 2], [0.3, 0.1, 0.2])
    path = tmp_path / "sub" / "table.npz"
    t.save(path)
    assert os.listdir(path.parent) == ["table.npz"]  # no temporary file left behind
    assert cls.load(path) == t


def test_weight_table_keeps_its_temperature_and_load_checks_the_format(tmp_path):
    w = flowjax.LossTable([1, 2, 3], [0.1, 0.2, 0.4]).flow_weights()
    assert w.temperature == pytest.approx(0.2)
    w.save(tmp_path / "w.npz")
    assert flowjax.WeightTable.load(tmp_path / "w.npz").temperature == pytest.approx(
        0.2
    )
    with pytest.raises(ValueError, match="not a saved LossTable"):
        flowjax.LossTable.load(tmp_path / "w.npz")


def test_table_flow_weights_match_flow_weights_and_name_ids_on_error():
    t = flowjax.LossTable([7, 3, 5], [0.7, 0.3, 0.5])
    w = t.flow_weights(normalize="mean")
    ref, tau = flowjax.flow_weights(t.losses, normalize="mean")
    np.testing.assert_array_equal(w.weights, ref)
    assert w.temperature == tau == t.median_temperature()
    with pytest.raises(ValueError, match=r"non-negative.*ids \[5\]"):
        flowjax.LossTable([7, 3, 5], [0.7, 0.3, -0.5]).flow_weights()
    with pytest.raises(ValueError, match="median pre-trained loss is 0"):
        flowjax.LossTable([1, 2, 3], [0.0, 0.0, 1.0]).median_temperature()


@pytest.mark.parametrize(
    ("ids", "values", "match"),
    [
        ([1, 2, 1], [0.1, 0.2, 0.3], r"duplicate example ids: \[1\]"),
        ([1, 2], [0.1, 0.2, 0.3], "different lengths: 2 != 3"),
        ([1, 2, 3], [0.1, np.nan, np.inf], r"NaN or infinite values at ids \[2, 3\]"),
        ([1.5, 2.0], [0.1, 0.2], "must be integers"),
        ([[1, 2]], [0.1, 0.2], "1-D"),
        ([1, 2], [[0.1, 0.2]], "must be 1-D"),
    ],
)
def test_bad_tables_raise(ids, values, match):
    with pytest.raises(ValueError, match=match):
        flowjax.LossTable(ids, values)


def test_weight_table_rejects_negative_weights():
    with pytest.raises(
        ValueError, match=r"weights must be >= 0; negative at ids \[2\]"
    ):
        flowjax.WeightTable([1, 2], [0.5, -0.1])
