"""Forgetting metrics against hand-computed values and the reference implementations' formulas."""

import math

import numpy as np
import pytest

import flowjax
from flowjax import metrics

# A 3-task accuracy matrix: R[i, j] = accuracy on task j after training on task i.
# Task 0 peaks after task 1 (0.85 > 0.8), so forgetting (max) and -BWT (diagonal) differ.
R3 = [
    [0.80, 0.20, 0.10],
    [0.85, 0.90, 0.30],
    [0.50, 0.70, 0.95],
]
B3 = [0.10, 0.15, 0.20]  # accuracies at initialisation


# -- references, transcribed from the implementations the docstrings cite ------------


def mammoth_bwt(results):  # aimagelab/mammoth utils/metrics.py backward_transfer
    n = len(results)
    return np.mean([results[-1][i] - results[i][i] for i in range(n - 1)])


def mammoth_fwt(results, random_results):  # ... forward_transfer
    n = len(results)
    return np.mean([results[i - 1][i] - random_results[i][0] for i in range(1, n)])


def mammoth_forgetting(results):  # ... forgetting (full matrix: no padding needed)
    n = len(results)
    maxx = np.max(np.array(results), axis=0)
    return np.mean([maxx[i] - results[-1][i] for i in range(n - 1)])


def avalanche_forgetting(
    R,
):  # StreamForgetting: accuracy right after training - at the end
    R = np.asarray(R)
    return np.mean([R[j, j] - R[-1, j] for j in range(len(R) - 1)])


# -- the task-sequence metrics ---------------------------------------------------------


def test_acc_bwt_fwt_forgetting_on_a_3_task_matrix_by_hand():
    assert metrics.average_accuracy(R3) == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    assert metrics.backward_transfer(R3) == pytest.approx(
        ((0.50 - 0.80) + (0.70 - 0.90)) / 2
    )  # -0.25
    assert metrics.forward_transfer(R3, B3) == pytest.approx(
        ((0.20 - 0.15) + (0.30 - 0.20)) / 2
    )  # 0.075
    # f_0 = max(0.80, 0.85) - 0.50, f_1 = max(0.20, 0.90) - 0.70
    assert metrics.forgetting(R3) == pytest.approx((0.35 + 0.20) / 2)  # 0.275
    assert metrics.sequence_metrics(R3, B3) == pytest.approx(
        {"acc": 2.15 / 3, "bwt": -0.25, "forgetting": 0.275, "fwt": 0.075}
    )
    assert set(metrics.sequence_metrics(R3)) == {"acc", "bwt", "forgetting"}


def test_the_reference_implementations_agree_where_the_docstrings_say():
    assert metrics.backward_transfer(R3) == pytest.approx(mammoth_bwt(R3))
    baseline_lists = [[b] for b in B3]  # Mammoth: random_results[i][0]
    assert metrics.forward_transfer(R3, B3) == pytest.approx(
        mammoth_fwt(R3, baseline_lists)
    )
    # No task ends above its earlier best: Mammoth's forgetting equals ours.
    assert metrics.forgetting(R3) == pytest.approx(mammoth_forgetting(R3))
    # Avalanche's forgetting is -BWT, not the max: it differs on R3 (task 0 peaked late).
    assert avalanche_forgetting(R3) == pytest.approx(-metrics.backward_transfer(R3))
    assert avalanche_forgetting(R3) == pytest.approx(0.25)
    assert metrics.forgetting(R3) != pytest.approx(avalanche_forgetting(R3))


def test_forgetting_can_be_negative_where_mammoth_clamps_it():
    R = np.array(R3)
    R[2, 0] = 0.90  # task 0 ends above its best so far (0.85)
    # f_0 = 0.85 - 0.90 = -0.05, f_1 = 0.20
    assert metrics.forgetting(R) == pytest.approx((-0.05 + 0.20) / 2)
    assert mammoth_forgetting(R.tolist()) == pytest.approx((0.0 + 0.20) / 2)


def test_forgetting_max_includes_rows_before_the_task_was_trained():
    R = np.array(R3)
    R[0, 1] = 0.95  # task 1 was better before it was trained on (as in the paper's max)
    assert metrics.forgetting(R) == pytest.approx(((0.85 - 0.50) + (0.95 - 0.70)) / 2)


def test_sequence_metrics_on_random_matrices_against_numpy(rng):
    for t in (2, 3, 5):
        R = rng.uniform(size=(t, t))
        b = rng.uniform(size=t)
        assert metrics.average_accuracy(R) == pytest.approx(R[-1].mean())
        assert metrics.backward_transfer(R) == pytest.approx(mammoth_bwt(R.tolist()))
        assert metrics.forward_transfer(R, b) == pytest.approx(
            np.mean([R[j - 1, j] - b[j] for j in range(1, t)])
        )
        best = np.array([R[: t - 1, j].max() for j in range(t - 1)])
        assert metrics.forgetting(R) == pytest.approx(np.mean(best - R[-1, : t - 1]))


def test_no_forgetting_and_no_transfer_give_zero():
    R = np.array([[0.9, 0.1, 0.1], [0.9, 0.8, 0.1], [0.9, 0.8, 0.7]])
    assert metrics.backward_transfer(R) == 0.0
    assert metrics.forgetting(R) == 0.0
    assert metrics.forward_transfer(R, [0.1, 0.1, 0.1]) == 0.0
    assert metrics.average_accuracy([[0.6]]) == 0.6  # one task: ACC only


@pytest.mark.parametrize(
    "R, match",
    [
        ([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], "square"),
        ([0.5, 0.5], "square"),
        ([[0.5, 0.5], [0.5]], "square"),
        (np.zeros((0, 0)), "empty"),
        ([[0.5, np.nan], [0.5, 0.5]], "NaN at positions \\[\\[0, 1\\]\\]"),
        ([[0.5, 1.2], [0.5, 0.5]], "\\[0, 1\\].*1.2.*\\[\\[0, 1\\]\\]"),
        ([[50.0, 60.0], [70.0, 80.0]], "percentages"),
        ([[True, False], [False, True]], "numbers"),
    ],
)
def test_bad_matrices_are_named(R, match):
    for fn in (
        metrics.accuracy_matrix,
        metrics.average_accuracy,
        metrics.backward_transfer,
        metrics.forgetting,
    ):
        with pytest.raises(ValueError, match=match):
            fn(R)


def test_transfer_needs_two_tasks_and_a_baseline_per_task():
    for fn in (metrics.backward_transfer, metrics.forgetting):
        with pytest.raises(ValueError, match="at least 2 tasks"):
            fn([[0.5]])
    with pytest.raises(ValueError, match="at least 2 tasks"):
        metrics.forward_transfer([[0.5]], [0.1])
    with pytest.raises(
        ValueError, match=r"baseline must hold one accuracy per task, shape \(3,\)"
    ):
        metrics.forward_transfer(R3, [0.1, 0.1])
    with pytest.raises(ValueError, match="baseline must be accuracies"):
        metrics.forward_transfer(R3, [0.1, -0.1, 0.1])


# -- against the pre-trained model --------------------------------------------------------


def test_retention_and_its_direction():
    assert metrics.retention(0.57, 0.76) == pytest.approx(0.75)
    assert metrics.retention(0.76, 0.76) == 1.0  # nothing forgotten
    assert metrics.retention(0.8, 0.4) == 2.0  # better than pre-trained
    assert metrics.retention(0.0, 0.4) == 0.0
    # perplexity: inverted so higher is better, = exp(mean NLL_pre - mean NLL_ft)
    assert metrics.perplexity_retention(24.0, 12.0) == 0.5
    assert metrics.perplexity_retention(12.0, 12.0) == 1.0
    nll_ft, nll_pre = 2.5, 2.0
    assert metrics.perplexity_retention(
        math.exp(nll_ft), math.exp(nll_pre)
    ) == pytest.approx(math.exp(nll_pre - nll_ft))
    assert metrics.pretrain_target_average(0.70, 0.90) == pytest.approx(0.80)
    assert metrics.pretrain_target_average(0.0, 1.0) == 0.5


@pytest.mark.parametrize(
    "fn, args, match",
    [
        (metrics.retention, (0.5, 0.0), "pretrained_accuracy is 0"),
        (metrics.retention, (np.nan, 0.5), "accuracy contains NaN"),
        (metrics.retention, (1.5, 0.5), "accuracy must be accuracies in \\[0, 1\\]"),
        (metrics.retention, (57.0, 76.0), "percentages"),
        (metrics.retention, (0.5, -0.1), "pretrained_accuracy must be"),
        (metrics.retention, ([0.5, 0.6], 0.5), "scalar"),
        (
            metrics.perplexity_retention,
            (0.5, 12.0),
            "perplexity must be a finite perplexity >= 1",
        ),
        (metrics.perplexity_retention, (12.0, np.inf), "pretrained_perplexity must be"),
        (metrics.perplexity_retention, (np.nan, 12.0), "perplexity must be"),
        (metrics.pretrain_target_average, (0.5, 1.01), "target_accuracy must be"),
        (
            metrics.pretrain_target_average,
            (np.nan, 0.5),
            "pretrain_accuracy contains NaN",
        ),
    ],
)
def test_bad_scalars_are_named(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


# -- the hardest k % ------------------------------------------------------------------------


def hardest_reference(ids, losses, correct, k):
    """Plain Python: sort by (loss descending, id ascending), keep ceil(k n / 100) exactly."""
    rows = sorted(zip(ids, losses, correct, strict=True), key=lambda r: (-r[1], r[0]))
    m = -(
        -round(k * 1000) * len(rows) // 100_000
    )  # exact ceil for k with <= 3 decimals
    return np.mean([r[2] for r in rows[:m]])


def test_hardest_accuracy_against_a_numpy_reference(rng):
    n = 200
    ids = rng.permutation(10 * n)[:n]  # scattered, unsorted ids
    losses = rng.integers(0, 20, size=n) / 4.0  # many ties
    correct = rng.uniform(size=n) < 0.6
    table = flowjax.LossTable(ids, losses)
    for k in (0.5, 1, 5, 10, 12.5, 33.3, 50, 99.9, 100):
        want = hardest_reference(ids.tolist(), losses.tolist(), correct.tolist(), k)
        assert flowjax.hardest_accuracy(table, ids, correct, k) == pytest.approx(
            want
        ), k
    assert flowjax.hardest_accuracy(table, ids, correct, 100) == pytest.approx(
        correct.mean()
    )


def test_hardest_accuracy_is_keyed_by_id_not_position(rng):
    ids = np.arange(100, 160)
    losses = rng.uniform(size=60)
    correct = rng.uniform(size=60) < 0.5
    table = flowjax.LossTable(ids, losses)
    base = flowjax.hardest_accuracy(table, ids, correct, 20)
    perm = rng.permutation(60)
    assert flowjax.hardest_accuracy(table, ids[perm], correct[perm], 20) == base
    assert flowjax.hardest_accuracy((ids, losses), ids, correct, 20) == base  # a pair
    # A table with more ids than evaluated: only the evaluated ones count.
    big = flowjax.LossTable(np.arange(100, 200), np.r_[losses, np.full(40, 99.0)])
    assert flowjax.hardest_accuracy(big, ids, correct, 20) == base


def test_hardest_accuracy_rounds_up_exactly_and_breaks_ties_by_id():
    # 10 % of 30 is exactly 3: the 4th hardest (wrong) must not count.
    ids = np.arange(30)
    losses = 30.0 - ids  # id 0 hardest
    correct = np.r_[[1, 1, 1, 0], np.zeros(26)]
    assert flowjax.hardest_accuracy((ids, losses), ids, correct, 10) == 1.0
    assert (
        flowjax.hardest_accuracy((ids, losses), ids, correct, 10.1) == 0.75
    )  # ceil(3.03)
    # 1.1 % of 3000 is exactly 33 (1.1 * 3000 / 100 is 33.000000000000007 in float)
    ids = np.arange(3000)
    correct = np.r_[np.ones(33), 0.0, np.zeros(2966)]
    assert flowjax.hardest_accuracy((ids, 3000.0 - ids), ids, correct, 1.1) == 1.0
    # k so small that k n / 100 < 1: still one example.
    assert flowjax.hardest_accuracy((ids, 3000.0 - ids), ids, correct, 0.001) == 1.0
    # Ties: equal losses, the smaller id counts as harder, whatever the order given.
    ids = np.array([9, 4, 7, 2])
    correct = np.array([0, 0, 0, 1])  # only id 2 is right
    same = np.ones(4)
    assert flowjax.hardest_accuracy((ids, same), ids, correct, 25) == 1.0
    assert (
        flowjax.hardest_accuracy((ids[::-1], same), ids[::-1], correct[::-1], 25) == 1.0
    )


def test_hardest_accuracy_bad_input():
    table = flowjax.LossTable([1, 2, 3], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"missing from the loss table: ids \[7, 9\]"):
        flowjax.hardest_accuracy(table, [1, 7, 9], [1, 0, 1], 50)
    for k in (0, -5, 100.5, np.nan, "10", True):
        with pytest.raises(ValueError, match=r"k must be a percentage in \(0, 100\]"):
            flowjax.hardest_accuracy(table, [1, 2], [1, 0], k)
    with pytest.raises(ValueError, match="booleans or 0/1"):
        flowjax.hardest_accuracy(table, [1, 2], [1, 2], 50)
    with pytest.raises(ValueError, match="align with ids"):
        flowjax.hardest_accuracy(table, [1, 2], [1, 0, 1], 50)
    with pytest.raises(ValueError, match=r"duplicate example ids: \[2\]"):
        flowjax.hardest_accuracy(table, [2, 1, 2], [1, 0, 1], 50)
    with pytest.raises(ValueError, match="ids is empty"):
        flowjax.hardest_accuracy(table, [], [], 50)
    with pytest.raises(ValueError, match="LossTable or a pair"):
        flowjax.hardest_accuracy({1: 0.5}, [1], [1], 50)
    with pytest.raises(ValueError, match="NaN"):
        flowjax.hardest_accuracy(([1, 2], [0.1, np.nan]), [1, 2], [1, 0], 50)
