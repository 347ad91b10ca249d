"""The id-keyed tables (LossTable, WeightTable, TokenLosses, TokenWeights): sorted, validated, saved atomically."""

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


@pytest.mark.parametrize("start", [0, 7, -3, 2**62])
def test_lookup_of_consecutive_ids_matches_a_dict(start):
    # Consecutive ids take the subtraction path: same rows and errors as the search.
    rng = np.random.default_rng(0)
    ids = start + rng.permutation(50)
    values = rng.random(50).astype(np.float32)
    t = flowjax.WeightTable(ids, values)
    query = start + rng.integers(0, 50, size=80)
    ref = dict(zip(ids.tolist(), values.tolist(), strict=True))
    np.testing.assert_array_equal(
        t.lookup(query), np.float32([ref[i] for i in query.tolist()])
    )
    for bad in ([start - 1], [start + 50], [start + 3, start + 51]):
        with pytest.raises(
            ValueError, match=rf"\[{bad[-1]}\] .*not in this WeightTable"
        ):
            t.lookup(np.asarray(bad, np.int64))
    gap = flowjax.WeightTable(
        np.r_[ids, start + 60], np.r_[values, 1.0]
    )  # not consecutive
    np.testing.assert_array_equal(gap.lookup(query), t.lookup(query))
    with pytest.raises(
        ValueError, match=rf"\[{start + 55}\] .*not in this WeightTable"
    ):
        gap.lookup([start + 55])


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
    with pytest.raises(
        ValueError, match=r"w\.npz is not a saved LossTable: it holds a WeightTable"
    ):
        flowjax.LossTable.load(tmp_path / "w.npz")


def test_table_flow_weights_match_flow_weights_and_name_ids_on_error():
    t = flowjax.LossTable([7, 3, 5], [0.7, 0.3, 0.5])
    w = t.flow_weights(normalize="mean")
    ref = flowjax.flow_weights(t.losses, normalize="mean")
    np.testing.assert_array_equal(w.weights, ref.astype(np.float32))
    tau = flowjax.median_temperature(t.losses)
    assert w.temperature == tau == t.median_temperature() == pytest.approx(0.5)
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
        ([1, 2], ["a", "b"], "must be numbers"),
        # Range checks run on the stored float32 values, naming the ids.
        ([1, 2, 3], [0.5, 1e300, -1e300], r"overflow float32.*ids \[2, 3\]"),
        ([1, 2, 3], [0.5, 1e-50, 0.0], r"underflow to 0 in float32.*ids \[2\]"),
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


def test_weight_table_range_checks_run_after_the_float32_cast():
    with pytest.raises(ValueError, match=r"weights overflow float32.*ids \[7\]"):
        flowjax.WeightTable([7, 8], [1e39, 0.5])
    with pytest.raises(
        ValueError, match=r"weights underflow to 0 in float32.*ids \[8\]"
    ):
        flowjax.WeightTable([7, 8], [1.0, 1e-46])
    # A float32 subnormal survives the cast: stored, not refused, not zeroed.
    assert flowjax.WeightTable([7], [1e-40]).weights[0] > 0
    # Exact zeros are legitimate weights (an example dropped on purpose).
    assert flowjax.WeightTable([7], [0.0]).weights[0] == 0


def test_flow_weights_of_very_hard_examples_round_to_float32_zero():
    # FLOW's weight of a very hard example is below float32's range: its float32 value
    # is 0 (as in the official float32 code), and a real data set has such examples
    # (the digits demo: τ = 0.014, losses up to 2). The others stay exact.
    table = flowjax.LossTable([1, 2, 3], [0.0, 1.0, 900.0])
    for temperature in (1.0, 8.0):  # exp(-900): 0 in float64; exp(-112.5): float32 0
        w = table.flow_weights(temperature)
        assert w.weights.dtype == np.float32 and w.weights[2] == 0
        np.testing.assert_allclose(
            w.weights[:2], np.exp([0.0, -1.0 / temperature]), rtol=1e-6
        )
    assert table.flow_weights(100.0).weights[2] == pytest.approx(np.exp(-9.0))


def _token_losses():
    losses = np.array([[0.5, 2.0, 0.0], [1.0, 0.0, 0.0], [0.25, 4.0, 3.0]], np.float32)
    mask = np.array([[True, True, False], [True, False, False], [True, True, True]])
    return flowjax.TokenLosses([30, 10, 20], losses, mask)


def test_token_tables_are_members_of_the_family(tmp_path):
    tl = _token_losses()
    assert isinstance(tl, flowjax.tables._IdTable)
    assert issubclass(flowjax.TokenWeights, flowjax.tables._IdTable)
    np.testing.assert_array_equal(tl.ids, [10, 20, 30])  # sorted, rows follow their ids
    np.testing.assert_array_equal(tl.lookup([30]), [[0.5, 2.0, 0.0]])
    np.testing.assert_array_equal(tl.lookup_mask([10]), [[True, False, False]])
    assert not tl.losses.flags.writeable and not tl.mask.flags.writeable
    # τ_tok = median over the six target tokens (0.25, 0.5, 1, 2, 3, 4) = 1.5.
    assert tl.median_temperature() == 1.5
    tw = tl.flow_weights()
    assert isinstance(tw, flowjax.TokenWeights) and tw.temperature == 1.5
    ref = np.where(tl.mask, np.exp(-tl.losses.astype(np.float64) / 1.5), 0.0)
    np.testing.assert_allclose(tw.weights, ref, rtol=1e-6)
    np.testing.assert_array_equal(
        tw.weights, flowjax.token_flow_weights(tl.losses, tl.mask).astype(np.float32)
    )
    # Normalised over target tokens only: mean weight 1 per target token.
    tw1 = tl.flow_weights(normalize="mean")
    assert tw1.weights[tl.mask].mean() == pytest.approx(1.0, rel=1e-6)
    assert (tw1.weights[~tl.mask] == 0).all()
    for table, cls in ((tl, flowjax.TokenLosses), (tw, flowjax.TokenWeights)):
        table.save(tmp_path / "t.npz")
        assert cls.load(tmp_path / "t.npz") == table
    assert "TokenWeights(n=3" in repr(tw) and "temperature=1.5" in repr(tw)


def test_token_lookup_repads_to_a_batch_length_and_names_ids():
    tl = _token_losses()
    np.testing.assert_array_equal(
        tl.lookup([10, 30], length=6),
        [[1.0, 0, 0, 0, 0], [0.5, 2.0, 0, 0, 0]],
    )
    np.testing.assert_array_equal(tl.lookup([10, 30], length=3), [[1.0, 0], [0.5, 2.0]])
    with pytest.raises(
        ValueError, match=r"length 3 cuts off target tokens of ids \[20\]"
    ):
        tl.lookup([10, 20], length=3)
    with pytest.raises(
        ValueError, match=r"ids \[11, 12\] are not in this TokenLosses \(3 examples\)"
    ):
        tl.lookup([10, 11, 12])
    with pytest.raises(ValueError, match=r"ids \[11\] are not in this TokenWeights"):
        tl.flow_weights().lookup_mask([11])
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="length must be an int >= 2"):
            tl.lookup([10], length=bad)
    with pytest.raises(ValueError, match="one value per id"):
        flowjax.LossTable([1], [0.5]).lookup([1], length=4)


@pytest.mark.parametrize(
    ("ids", "losses", "mask", "match"),
    [
        (
            [1, 2],
            [[0.5, np.nan], [1.0, 0.0]],
            [[1, 1], [1, 0]],
            r"NaN or infinite.*ids \[1\]",
        ),
        (
            [1, 1],
            [[0.5, 0.0], [1.0, 0.0]],
            [[1, 0], [1, 0]],
            r"duplicate example ids: \[1\]",
        ),
        (
            [1, 2],
            [[0.5, 0.0], [1e300, 0.0]],
            [[1, 0], [1, 0]],
            r"overflow float32.*ids \[2\]",
        ),
        ([1, 2], [[0.5, 1e-50], [1.0, 0.0]], [[1, 1], [1, 0]], r"underflow.*ids \[1\]"),
        (
            [1, 2],
            [[0.5, 3.0], [1.0, 0.0]],
            [[1, 0], [1, 0]],
            r"0 where the mask is False.*ids \[1\]",
        ),
        ([1, 2], [[0.5, 0.0], [1.0, 0.0]], [[1, 0]], "mask has shape"),
        ([1, 2], [[0.5, 0.0], [1.0, 0.0]], [[2, 0], [1, 0]], "mask must be boolean"),
        ([1, 2], [0.5, 1.0], [1, 1], "must be 2-D"),
        ([1, 2, 3], [[0.5], [1.0]], [[1], [1]], "different lengths"),
    ],
)
def test_token_tables_are_validated(ids, losses, mask, match):
    with pytest.raises(ValueError, match=match):
        flowjax.TokenLosses(ids, np.asarray(losses), np.asarray(mask))


def test_token_weights_are_validated_and_nan_outside_the_mask_is_refused_too():
    with pytest.raises(
        ValueError, match=r"weights must be >= 0; negative at ids \[2\]"
    ):
        flowjax.TokenWeights([1, 2], [[0.5], [-0.5]], [[True], [True]], 1.0)
    with pytest.raises(ValueError, match=r"0 where the mask is False.*ids \[1\]"):
        flowjax.TokenWeights([1, 2], [[np.nan], [0.5]], [[False], [True]])
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        flowjax.TokenWeights([1], [[0.5]], [[True]], -1.0)
    with pytest.raises(ValueError, match="needs a boolean mask"):
        flowjax.TokenLosses([1], [[0.5]], None)


def _saved(tmp_path, table=None):
    path = tmp_path / "table.npz"
    (table or flowjax.LossTable(np.arange(50), np.linspace(0.1, 5.0, 50))).save(path)
    return path


def test_truncated_table_file_is_a_value_error_naming_the_path(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    for keep in (len(data) // 2, len(data) - 10):
        path.write_bytes(data[:keep])
        with pytest.raises(ValueError, match=rf"{path}.* truncated or corrupted"):
            flowjax.LossTable.load(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{path} is not a saved LossTable.*empty"):
        flowjax.LossTable.load(path)


def test_corrupted_table_file_is_a_value_error_naming_the_path(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    start = data.index(b"\x93NUMPY", data.index(b"values.npy"))
    data[start + 200] ^= 0xFF  # one flipped byte inside the values array
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path} is truncated or corrupted.*CRC"):
        flowjax.LossTable.load(path)
    path.write_bytes(b"id,loss\n1,0.5\n")
    with pytest.raises(
        ValueError, match=rf"{path} is not a saved LossTable: it is not an \.npz"
    ):
        flowjax.LossTable.load(path)
    with pytest.raises(FileNotFoundError):
        flowjax.LossTable.load(tmp_path / "missing.npz")


def test_table_file_with_wrong_keys_pickles_or_version_is_refused(tmp_path):
    path = tmp_path / "t.npz"
    fmt = np.array("flowjax.LossTable/1")
    np.savez(path, format=fmt, ids=np.arange(2), losses=np.ones(2))
    with pytest.raises(
        ValueError,
        match=r"t\.npz is not a saved LossTable: it has arrays.*"
        r"missing \['values'\], unexpected \['losses'\]",
    ):
        flowjax.LossTable.load(path)
    np.savez(path, format=fmt, ids=np.arange(2), values=np.array([{"a": 1}, None]))
    with pytest.raises(
        ValueError, match=r"t\.npz is not a saved LossTable: it holds pickled"
    ):
        flowjax.LossTable.load(path)
    np.savez(
        path,
        format=np.array("flowjax.LossTable/2"),
        ids=np.arange(2),
        values=np.ones(2),
    )
    with pytest.raises(
        ValueError, match=r"format version '2'; this flowjax reads version '1'"
    ):
        flowjax.LossTable.load(path)
    np.savez(path, ids=np.arange(2), values=np.ones(2))
    with pytest.raises(ValueError, match="no flowjax table format tag"):
        flowjax.LossTable.load(path)
    np.savez(path, format=fmt, ids=np.arange(2), values=np.array([0.5, np.nan]))
    with pytest.raises(
        ValueError,
        match=r"t\.npz holds an invalid LossTable: losses contain NaN.*ids \[1\]",
    ):
        flowjax.LossTable.load(path)


def test_attach_weights_attaches_token_weights_by_id_at_the_batch_length(rng):
    tl = _token_losses()  # ids 10, 20, 30; width 3 (the longest bucket, T_max = 4)
    tw = tl.flow_weights()
    # A shuffled training batch padded to T = 5: rows of [B, T - 1] = [3, 4].
    ids = np.array([30, 10, 20])
    mask = np.zeros((3, 5), bool)
    mask[:, 1:4] = tl.lookup_mask(ids)
    batch = {"id": ids, "tokens": np.ones((3, 5), np.int32), "mask": mask}
    out = flowjax.attach_weights(batch, tw)
    assert out["weight"].shape == (3, 4) and "weight" not in batch
    for r, i in enumerate(ids):
        row = tw.weights[np.searchsorted(tw.ids, i)]
        np.testing.assert_array_equal(out["weight"][r], np.pad(row, (0, 1)))
    # The attached weights feed weighted_lm_loss(level="token") directly.
    nll = rng.exponential(size=(3, 4)).astype(np.float32)
    got = flowjax.weighted_lm_loss(nll, mask[:, 1:], out["weight"], level="token")
    ref = np.sum(out["weight"] * nll * mask[:, 1:]) / mask[:, 1:].sum()
    assert float(got) == pytest.approx(ref, rel=1e-6)
    # length= overrides the batch's tokens; without either there is no T to pad to.
    assert flowjax.attach_weights({"id": ids}, tw, length=7)["weight"].shape == (3, 6)
    with pytest.raises(ValueError, match="pass length="):
        flowjax.attach_weights({"id": ids}, tw)
    with pytest.raises(ValueError, match=r"ids \[11\] are not in this TokenWeights"):
        flowjax.attach_weights(
            {"id": np.array([10, 11]), "tokens": np.ones((2, 5))}, tw
        )
    with pytest.raises(ValueError, match=r"cuts off target tokens of ids \[20\]"):
        flowjax.attach_weights({"id": ids, "tokens": np.ones((3, 3))}, tw)
    # A batch whose target mask is not the table's: weights for other tokens.
    other = mask.copy()
    other[1, 1] = False  # second row, id 10
    with pytest.raises(
        ValueError, match=r"target tokens differ from the batch's mask at ids \[10\]"
    ):
        flowjax.attach_weights({**batch, "mask": other}, tw)
    with pytest.raises(ValueError, match="only for token weights"):
        flowjax.attach_weights(
            {"id": ids}, flowjax.WeightTable(ids, [1.0, 1.0, 1.0]), length=5
        )


def test_tables_of_ids_in_order_own_their_arrays_and_still_check_every_value():
    # Sorted unique ids skip the sort: the table still copies, never aliases the caller's.
    ids, losses = np.arange(5), np.float32([0.5, 1.0, 2.0, 0.0, 3.0])
    table = flowjax.LossTable(ids, losses)
    ids[0], losses[0] = 99, 7.0
    assert table.ids[0] == 0 and table.losses[0] == np.float32(0.5)
    assert not table.ids.flags.writeable and not table.losses.flags.writeable
    assert ids.flags.writeable and losses.flags.writeable
    mask = np.array([[True, False], [True, True]])
    tokens = flowjax.TokenLosses([3, 4], np.float32([[1.0, 0.0], [2.0, 3.0]]), mask)
    mask[0, 0] = False
    assert tokens.mask[0, 0] and not tokens.mask.flags.writeable
    # The float32 fast checks still refuse, naming the example.
    with pytest.raises(ValueError, match=r"NaN or infinite.*\b11\b"):
        flowjax.LossTable([10, 11], np.float32([1.0, np.nan]))
    with pytest.raises(ValueError, match=r"negative.*\b21\b"):
        flowjax.WeightTable([20, 21], np.float32([1.0, -0.5]))
    with pytest.raises(ValueError, match="duplicate"):
        flowjax.LossTable([1, 1], np.float32([1.0, 2.0]))
