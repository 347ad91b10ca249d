"""Forgetting metrics: retention, the paper's averages, hardest-k % accuracy and task-sequence transfer.

Host-side functions of numbers a user has already measured (numpy in,
Python floats out), for reporting how much a fine-tuned model kept:

* against the pre-trained model: :func:`retention` (accuracy ratio) and
  :func:`perplexity_retention` (perplexity ratio, inverted so that higher is
  better for both), and :func:`pretrain_target_average`, the mean of
  pre-training and target accuracy that FLOW's paper reports (Sanyal et al.,
  ICML 2025, the "Avg." columns);
* on the target task: :func:`hardest_accuracy`, accuracy on the k % of
  target examples with the largest pre-trained loss (the paper's Table 5),
  keyed by example id;
* for a sequence of tasks, from the accuracy matrix ``R`` (``R[i, j]`` =
  accuracy on task ``j`` after training on tasks ``0..i``, checked by
  :func:`accuracy_matrix`): :func:`average_accuracy` (ACC),
  :func:`backward_transfer` (BWT) and :func:`forward_transfer` (FWT) of
  Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning",
  NeurIPS 2017, and :func:`forgetting` of Chaudhry et al., "Riemannian Walk
  for Incremental Learning", ECCV 2018; :func:`sequence_metrics` gives all
  four as a dict.

The task-sequence definitions were checked against the two reference
implementations, Avalanche (``avalanche/evaluation/metrics/forgetting_bwt.py``
and ``forward_transfer.py``, ContinualAI/avalanche at eb075be) and Mammoth
(``utils/metrics.py``, aimagelab/mammoth at e75a491). ACC, BWT and FWT agree
with both. Forgetting differs between them; each function's docstring says
how.

Accuracies are fractions in ``[0, 1]`` (not percentages). Every function
raises :class:`ValueError` naming the problem on bad input: NaN, values out
of range, a non-square matrix, ids missing from a table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from flowjax import _checks
from flowjax._types import ArrayLike
from flowjax.tables import LossTable

__all__ = [
    "accuracy_matrix",
    "average_accuracy",
    "backward_transfer",
    "forgetting",
    "forward_transfer",
    "hardest_accuracy",
    "perplexity_retention",
    "pretrain_target_average",
    "retention",
    "sequence_metrics",
]


# -- validation ------------------------------------------------------------------


def _accuracies(values: ArrayLike, what: str) -> np.ndarray:
    """``values`` as float64, checked to be finite fractions in [0, 1]."""
    arr = np.asarray(values)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{what} must be numbers; got dtype {arr.dtype}.")
    arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        raise ValueError(
            f"{what} contains NaN at positions {np.argwhere(np.isnan(arr)).tolist()}."
        )
    bad = (arr < 0) | (arr > 1)
    if bad.any():
        hint = " (percentages? divide by 100)" if (arr <= 100).all() else ""
        raise ValueError(
            f"{what} must be accuracies in [0, 1]{hint}; got {arr[bad].tolist()} "
            f"at positions {np.argwhere(bad).tolist()}."
        )
    return arr


def _accuracy(value: float, what: str) -> float:
    arr = _accuracies(value, what)
    if arr.ndim != 0:
        raise ValueError(f"{what} must be a scalar; got shape {arr.shape}.")
    return float(arr)


def _perplexity(value: float, what: str) -> float:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 0:
        raise ValueError(f"{what} must be a scalar; got shape {arr.shape}.")
    p = float(arr)
    if not math.isfinite(p) or p < 1:
        raise ValueError(
            f"{what} must be a finite perplexity >= 1 (exp of a mean NLL >= 0); got {p}."
        )
    return p


# -- against the pre-trained model -----------------------------------------------


def retention(accuracy: float, pretrained_accuracy: float) -> float:
    """Accuracy retention: the fine-tuned model's accuracy on a pre-training probe relative to the pre-trained model's.

    .. math:: \\mathrm{retention} = \\frac{a_{ft}}{a_{pre}}

    measured on the same held-out pre-training-like data (for a classifier,
    with the pre-trained head swapped back in). **Higher is better**: 1 means
    nothing was forgotten, 0.95 means 95 % of the pre-trained accuracy was
    kept; above 1 the fine-tuned model is better on the probe.

    Args:
      accuracy: the fine-tuned model's accuracy, in ``[0, 1]``.
      pretrained_accuracy: the pre-trained model's accuracy, in ``(0, 1]``.

    Returns:
      The ratio, a float >= 0.

    Raises:
      ValueError: a value that is NaN or outside ``[0, 1]``, or a
        pre-trained accuracy of 0 (nothing to retain).

    Example:
      >>> import flowjax
      >>> flowjax.retention(0.57, 0.76)
      0.75
    """
    a = _accuracy(accuracy, "accuracy")
    a0 = _accuracy(pretrained_accuracy, "pretrained_accuracy")
    if a0 == 0:
        raise ValueError(
            "pretrained_accuracy is 0: retention relative to it is undefined."
        )
    return a / a0


def perplexity_retention(perplexity: float, pretrained_perplexity: float) -> float:
    """Perplexity retention: the pre-trained model's held-out perplexity relative to the fine-tuned model's.

    .. math:: \\mathrm{retention}_{ppl} = \\frac{\\mathrm{PPL}_{pre}}{\\mathrm{PPL}_{ft}}
        = \\exp(\\bar\\ell_{pre} - \\bar\\ell_{ft})

    with :math:`\\bar\\ell` the mean token NLL on the same held-out
    pre-training-like text. Inverted so that, as for :func:`retention`,
    **higher is better**: 1 means unchanged, 0.5 means the perplexity
    doubled, above 1 the fine-tuned model predicts the text better.

    Args:
      perplexity: the fine-tuned model's perplexity, finite and >= 1.
      pretrained_perplexity: the pre-trained model's perplexity, finite and >= 1.

    Returns:
      The ratio, a float in ``(0, ∞)``.

    Raises:
      ValueError: a perplexity that is not a finite number >= 1 (naming it).

    Example:
      >>> import flowjax
      >>> flowjax.perplexity_retention(24.0, 12.0)  # perplexity doubled
      0.5
    """
    p = _perplexity(perplexity, "perplexity")
    p0 = _perplexity(pretrained_perplexity, "pretrained_perplexity")
    return p0 / p


def pretrain_target_average(pretrain_accuracy: float, target_accuracy: float) -> float:
    """The mean of pre-training and target accuracy, the single number FLOW's paper reports per method.

    .. math:: \\mathrm{Avg} = \\tfrac12 (a_{pretrain} + a_{target})

    (Sanyal et al., ICML 2025, the "Avg." columns of its result tables:
    pre-training accuracy, e.g. ImageNet with the pre-trained head swapped
    back in, and target accuracy.) Higher is better.

    Args:
      pretrain_accuracy: accuracy on the pre-training probe, in ``[0, 1]``.
      target_accuracy: accuracy on the target task, in ``[0, 1]``.

    Returns:
      The average, a float in ``[0, 1]``.

    Raises:
      ValueError: a value that is NaN or outside ``[0, 1]``.

    Example:
      >>> import flowjax
      >>> flowjax.pretrain_target_average(0.70, 0.90)
      0.8
    """
    a = _accuracy(pretrain_accuracy, "pretrain_accuracy")
    b = _accuracy(target_accuracy, "target_accuracy")
    return (a + b) / 2


# -- hardest examples --------------------------------------------------------------


def _count_of(k: float, n: int) -> int:
    """ceil(k % of n), computed exactly (k read as the decimal it prints as)."""
    if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating)):
        raise ValueError(f"k must be a percentage in (0, 100]; got {k!r}.")
    kf = float(k)
    if not (0 < kf <= 100):  # also rejects NaN
        raise ValueError(f"k must be a percentage in (0, 100]; got {kf}.")
    return math.ceil(Fraction(repr(kf)) * n / 100)


def hardest_accuracy(
    losses: LossTable | tuple[ArrayLike, ArrayLike],
    ids: ArrayLike,
    correct: ArrayLike,
    k: float = 10.0,
) -> float:
    """Accuracy on the hardest k % of target examples, hardest by pre-trained loss (the paper's Table 5).

    Of the ``n`` evaluated examples (``ids``), take the
    :math:`m = \\lceil k n / 100 \\rceil` with the largest pre-trained loss
    :math:`f_i(\\theta^*)` and report the fraction the fine-tuned model gets
    right:

    .. math:: \\mathrm{acc}_{k\\%} = \\frac1m \\sum_{i \\in H_k} c_i, \\qquad
        H_k = \\text{the } m \\text{ ids of largest } f_i(\\theta^*)

    These are the examples FLOW down-weights most, so this is where FLOW's
    target accuracy can suffer. ``m`` rounds up (``ceil``): at least one
    example, and ``k = 100`` is plain accuracy; ``k`` is read as the decimal
    it prints as, so ``k=10`` of 30 examples is exactly 3. Ties in the loss
    are broken by id, the smaller id counted as harder, so the result does not
    depend on the order of ``ids``.

    Args:
      losses: the pre-trained losses, a :class:`flowjax.LossTable` or a pair
        ``(ids, losses)``; it may hold more ids than were evaluated.
      ids: 1-D integer ids of the evaluated target examples (unique).
      correct: per-example correctness aligned with ``ids``: booleans or 0/1.
      k: the percentage of examples to keep, in ``(0, 100]``.

    Returns:
      The accuracy on the hardest ``m`` examples, a float in ``[0, 1]``.

    Raises:
      ValueError: ``k`` outside ``(0, 100]``; no ids; ids that are not unique
        integers or are missing from the loss table (the message lists them);
        ``correct`` not boolean/0-1 or not aligned with ``ids``; losses the
        :class:`flowjax.LossTable` constructor rejects.

    Example:
      >>> import flowjax
      >>> table = flowjax.LossTable([1, 2, 3, 4], [0.1, 2.0, 0.5, 3.0])
      >>> flowjax.hardest_accuracy(table, ids=[1, 2, 3, 4], correct=[1, 0, 1, 1], k=50)
      0.5
    """
    if not isinstance(losses, LossTable):
        if not isinstance(losses, Sequence) or len(losses) != 2:
            raise ValueError(
                "losses must be a flowjax.LossTable or a pair (ids, losses); "
                f"got {type(losses).__name__}."
            )
        losses = LossTable(*losses)
    ids = _checks.as_ids(ids)
    if not len(ids):
        raise ValueError("ids is empty: no evaluated examples.")
    _checks.check_unique(np.sort(ids))
    c = np.asarray(correct)
    if c.shape != ids.shape:
        raise ValueError(
            f"correct has shape {c.shape}; it must align with ids, shape {ids.shape}."
        )
    if c.dtype != np.bool_:
        if not (np.issubdtype(c.dtype, np.number) and np.isin(c, (0, 1)).all()):
            raise ValueError(
                f"correct must be booleans or 0/1; got dtype {c.dtype} with values "
                f"{np.unique(c)[:5].tolist()}."
            )
        c = c.astype(bool)
    m = _count_of(k, len(ids))
    pos, found = _checks.find_sorted(losses.ids, ids)
    if not found.all():
        raise ValueError(
            f"evaluated examples are missing from the loss table: "
            f"{_checks.describe(~found, ids)}."
        )
    f = losses.losses[pos]
    order = np.lexsort(
        (ids, -f.astype(np.float64))
    )  # largest loss first, then smallest id
    return float(c[order[:m]].mean())


# -- task sequences ----------------------------------------------------------------


def accuracy_matrix(R: ArrayLike) -> np.ndarray:
    """The accuracy matrix of a task sequence, checked: ``R[i, j]`` = accuracy on task j after training on task i.

    .. math:: R \\in [0, 1]^{T \\times T}, \\qquad R_{ij} = \\text{test accuracy on task } j
        \\text{ after training on tasks } 0, \\dots, i

    the matrix of Lopez-Paz & Ranzato (GEM, NeurIPS 2017), row per training
    stage, column per evaluated task. Every entry is needed: entries above
    the diagonal (tasks not yet trained on) enter :func:`forward_transfer`.
    The other task-sequence functions call it on their input.

    Args:
      R: a square ``[T, T]`` array (or nested lists) of accuracies in ``[0, 1]``.

    Returns:
      ``R`` as a float64 numpy array.

    Raises:
      ValueError: ``R`` is not 2-D and square, is empty, holds NaN (Mammoth's
        zero-padded lower-triangular lists must be filled in, not padded), or
        holds values outside ``[0, 1]`` (naming the positions).

    Example:
      >>> import flowjax
      >>> flowjax.accuracy_matrix([[0.9, 0.1], [0.8, 0.95]]).shape
      (2, 2)
    """
    try:
        arr = np.asarray(R)
    except ValueError as e:  # ragged nested lists
        raise ValueError(
            f"R must be a square [T, T] matrix; got ragged rows ({e})."
        ) from e
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(
            f"R must be a square [T, T] matrix (row i: after training on task i, column j: "
            f"task j); got shape {arr.shape}."
        )
    if arr.size == 0:
        raise ValueError("R is empty: a task sequence needs at least one task.")
    return _accuracies(arr, "R")


def _at_least_two(R: np.ndarray, what: str) -> None:
    if len(R) < 2:
        raise ValueError(f"{what} needs at least 2 tasks; R has shape {R.shape}.")


def average_accuracy(R: ArrayLike) -> float:
    """Average accuracy (ACC) over all tasks after training on the last one.

    .. math:: \\mathrm{ACC} = \\frac1T \\sum_{j=1}^{T} R_{T, j}

    (Lopez-Paz & Ranzato, GEM, NeurIPS 2017, eq. 2; Mammoth's and
    Avalanche's stream accuracy at the end of training.) Higher is better.

    Args:
      R: the ``[T, T]`` accuracy matrix (see :func:`accuracy_matrix`).

    Returns:
      The mean of the last row, a float in ``[0, 1]``.

    Raises:
      ValueError: what :func:`accuracy_matrix` raises.

    Example:
      >>> import flowjax
      >>> flowjax.average_accuracy([[0.9, 0.1], [0.7, 0.8]])
      0.75
    """
    R = accuracy_matrix(R)
    return float(R[-1].mean())


def backward_transfer(R: ArrayLike) -> float:
    """Backward transfer (BWT): how training on later tasks changed accuracy on earlier ones.

    .. math:: \\mathrm{BWT} = \\frac{1}{T-1} \\sum_{j=1}^{T-1} (R_{T, j} - R_{j, j})

    (Lopez-Paz & Ranzato, GEM, NeurIPS 2017, eq. 3.) Negative values are
    forgetting; **higher is better**. Mammoth's ``backward_transfer``
    computes exactly this; Avalanche's ``StreamBWT`` is the negative of its
    ``StreamForgetting``, which is this same sum (accuracy right after
    training on task j, minus at the end), so all three agree.

    Args:
      R: the ``[T, T]`` accuracy matrix (see :func:`accuracy_matrix`), T >= 2.

    Returns:
      BWT, a float in ``[-1, 1]``.

    Raises:
      ValueError: what :func:`accuracy_matrix` raises, or fewer than 2 tasks.

    Example:
      >>> import flowjax
      >>> flowjax.backward_transfer([[0.9, 0.1], [0.7, 0.8]])  # 0.7 - 0.9
      -0.2
    """
    R = accuracy_matrix(R)
    _at_least_two(R, "backward_transfer")
    d = np.diagonal(R)
    return float((R[-1, :-1] - d[:-1]).mean())


def forward_transfer(R: ArrayLike, baseline: ArrayLike) -> float:
    """Forward transfer (FWT): how training on earlier tasks helps a task before it is trained on.

    .. math:: \\mathrm{FWT} = \\frac{1}{T-1} \\sum_{j=2}^{T} (R_{j-1, j} - b_j)

    with :math:`b_j` the accuracy on task j of the model at initialisation
    (before any training in the sequence; for fine-tuning, the pre-trained
    model). (Lopez-Paz & Ranzato, GEM, NeurIPS 2017, eq. 4.) **Higher is
    better**. Avalanche's ``StreamForwardTransfer`` is this (accuracy on
    task j after training on task j-1, minus at initialisation). Mammoth's
    ``forward_transfer(results, random_results)`` is the same formula with
    ``b_j`` = ``random_results[j][0]``, which its training loop measures just
    before task j starts rather than at initialisation; pass whichever
    baseline you measured.

    Args:
      R: the ``[T, T]`` accuracy matrix (see :func:`accuracy_matrix`), T >= 2.
      baseline: ``[T]`` accuracies ``b_j`` at initialisation (``b_1`` is
        not used but must be given, so that ``baseline[j]`` is task j's).

    Returns:
      FWT, a float in ``[-1, 1]``.

    Raises:
      ValueError: what :func:`accuracy_matrix` raises, fewer than 2 tasks,
        or a baseline that is not ``[T]`` accuracies in ``[0, 1]``.

    Example:
      >>> import flowjax
      >>> flowjax.forward_transfer([[0.9, 0.3], [0.7, 0.8]], baseline=[0.1, 0.1])
      0.2
    """
    R = accuracy_matrix(R)
    _at_least_two(R, "forward_transfer")
    b = _accuracies(baseline, "baseline")
    if b.shape != (len(R),):
        raise ValueError(
            f"baseline must hold one accuracy per task, shape ({len(R)},); got shape "
            f"{b.shape}."
        )
    above = np.diagonal(R, offset=1)  # R[j-1, j], j = 1..T-1
    return float((above - b[1:]).mean())


def forgetting(R: ArrayLike) -> float:
    """Average forgetting: the drop from the best accuracy each earlier task ever had to its final accuracy.

    .. math:: F = \\frac{1}{T-1} \\sum_{j=1}^{T-1} f_j, \\qquad
        f_j = \\max_{l \\in \\{1, \\dots, T-1\\}} R_{l, j} - R_{T, j}

    (Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018,
    eq. 9, at k = T.) The max runs over every earlier row, as in the paper,
    also the rows before task j was trained on. Lower is better; ``f_j`` can
    be negative when the final model is better on task j than it ever was
    before.

    The reference implementations differ from it and from each other:

    * Mammoth's ``forgetting`` takes the max over all T rows, the last
      included, so each ``f_j`` is clamped at >= 0; and it zero-pads rows of
      tasks not yet evaluated. On a full matrix it equals
      ``mean(max(f_j, 0))``: the same as here whenever no task ends above
      its earlier best.
    * Avalanche's ``StreamForgetting`` uses the accuracy right after training
      on task j instead of the max: ``mean(R[j, j] - R[T, j])`` =
      ``-backward_transfer(R)``. It equals this one when each task's best
      accuracy was right after training on it.

    Args:
      R: the ``[T, T]`` accuracy matrix (see :func:`accuracy_matrix`), T >= 2.

    Returns:
      The average forgetting, a float in ``[-1, 1]``.

    Raises:
      ValueError: what :func:`accuracy_matrix` raises, or fewer than 2 tasks.

    Example:
      >>> import flowjax
      >>> R = [[0.9, 0.0, 0.0], [0.95, 0.8, 0.0], [0.6, 0.7, 0.9]]
      >>> round(flowjax.forgetting(R), 4)  # ((0.95 - 0.6) + (0.8 - 0.7)) / 2
      0.225
    """
    R = accuracy_matrix(R)
    _at_least_two(R, "forgetting")
    best = R[:-1, :-1].max(axis=0)
    return float((best - R[-1, :-1]).mean())


def sequence_metrics(
    R: ArrayLike, baseline: ArrayLike | None = None
) -> dict[str, float]:
    """ACC, BWT, forgetting and (given a baseline) FWT of a task sequence, as one dict.

    .. math:: \\{\\mathrm{ACC}, \\mathrm{BWT}, F, \\mathrm{FWT}\\}(R, b)

    See :func:`average_accuracy`, :func:`backward_transfer`,
    :func:`forgetting` and :func:`forward_transfer`.

    Args:
      R: the ``[T, T]`` accuracy matrix (see :func:`accuracy_matrix`), T >= 2.
      baseline: ``[T]`` accuracies at initialisation, or ``None`` (no FWT).

    Returns:
      ``{"acc", "bwt", "forgetting"}`` and, with a baseline, ``"fwt"``: floats.

    Raises:
      ValueError: what those functions raise.

    Example:
      >>> import flowjax
      >>> m = flowjax.sequence_metrics([[0.9, 0.3], [0.7, 0.8]], baseline=[0.1, 0.1])
      >>> {k: round(v, 4) for k, v in m.items()}
      {'acc': 0.75, 'bwt': -0.2, 'forgetting': 0.2, 'fwt': 0.2}
    """
    out = {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "forgetting": forgetting(R),
    }
    if baseline is not None:
        out["fwt"] = forward_transfer(R, baseline)
    return out
