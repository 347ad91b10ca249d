"""The pre-pass: every fine-tuning example's loss under the frozen pre-trained model.

FLOW needs ``f_i(θ*)`` for every fine-tuning example once, before training.
:func:`per_example_losses` computes it exactly, with one compiled program for
the whole data set, sharded over all devices and hosts, keyed by example id,
and resumable after a kill.

The loop itself (sharding over the mesh's ``'data'`` axis, one compiled step,
padding of ragged batches, pipelining, multi-host input, resuming, the failure
protocol that makes every process raise the same error) is the engine in
``flowjax/_engine.py``, shared with :func:`flowjax.lm_sequence_losses`,
:func:`flowjax.lm_token_losses` and :func:`flowjax.diagonal_fisher`. This
module adds what is particular to the pre-pass: the loss table and the cache's
manifest.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from flowjax import _cache, _checks, _engine
from flowjax._engine import default_mesh
from flowjax._types import BatchedLoss, Batches, Params, PerExampleLoss
from flowjax.tables import LossTable

__all__ = ["default_mesh", "per_example_losses"]


def per_example_losses(
    loss_fn: PerExampleLoss | BatchedLoss,
    params: Params,
    batches: Batches,
    *,
    batched: bool = False,
    step_size: int | None = None,
    mesh: Mesh | None = None,
    progress: bool = True,
    cache_dir: str | None = None,
    param_shardings: Any = None,
    total: int | None = None,
    flush_seconds: float = _cache.FLUSH_SECONDS,
) -> LossTable:
    """Computes ``f_i(θ*)`` for every example: FLOW's one inference pass.

    .. math:: \\ell_i = \\mathrm{loss\\_fn}(\\theta^*, x_i) \\quad\\text{for every example } i

    ``loss_fn`` is written for ONE example and batched with ``jax.vmap``, or
    (``batched=True``) written for a batch; the batched function is jitted
    once and traced once for the whole data set
    (later calls with the same ``loss_fn`` and shapes reuse the compiled step,
    unless what it computes changed: its code, closure, ``partial`` arguments
    or the module globals it reads are part of the step's key, so a changed
    global gives a new trace, where plain ``jax.jit`` would keep the old one).

    Which form: the batched one is the fast one when the model is written for
    a batch (a Flax model called as ``model(batch["x"])``), and the one to use
    for models with BatchNorm (in eval mode). The per-example form is the
    natural one for a loss written for one example; vmapping a *batched*
    model call over single examples (``model(ex["x"][None])[0]``) adds
    transposes and copies, so pass such a model's batch loss with
    ``batched=True`` instead.

    Args:
      loss_fn: ``loss_fn(params, example) -> scalar``. ``example`` is the
        batch's pytree without its ``"id"`` field and without the batch axis.
        With ``batched=True``: ``loss_fn(params, batch) -> losses [B]``, the
        batch's pytree without ``"id"`` (e.g.
        ``optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]),
        batch["y"])``). A frozen model goes in through ``params`` (e.g. the
        state of ``nnx.split``), not as a closed-over constant.
      params: the frozen pre-trained parameters (any pytree of arrays).
      batches: an iterable of dict batches of host (numpy) arrays. Each has an
        integer ``"id"`` array of stable, unique example ids and fields with a
        leading batch axis of the same length. The first batch fixes the batch
        size and the per-example shapes; every batch must have the same
        structure, shapes and dtypes. In a multi-host run each process passes
        its own examples.
      batched: whether ``loss_fn`` takes a batch (see above). Each row's
        loss must depend on that row alone (BatchNorm in eval mode is fine;
        in train mode it is not): steps are merged from batches and padded,
        so a function that mixes rows would give losses that depend on the
        padding and on the order of the data. The first step of a new
        compiled step is therefore run a second time with half its rows
        replaced (one step's compute, once), and a ``ValueError`` is raised
        if the other rows' losses change.
      step_size: rows per compiled step (per process). Batches are split
        and merged into steps of this size, so the loader's batch size and
        the step's are independent; only the last step is padded. Default:
        the first batch's rows, merged up to 4 times that and about 4 MiB of
        input per step (a cheap model pays the fixed cost of a step less
        often; an MLP pre-pass is about 15 % faster in steps of 1024 rows
        than of 256). On one CPU device such a merged step computes its rows
        in sub-batches of the first batch's size, one after another inside
        its one program, so that no operation runs on more rows than the
        caller's batches (a conv net's activations stay in the caches); the
        losses equal those of unmerged steps (bit for bit in the tests). Pass it for a large
        model whose activations, not its inputs, bound the memory; an
        explicit ``step_size`` is always one batch of that many rows.
      mesh: a ``jax.sharding.Mesh`` with a ``'data'`` axis; the batch axis is
        sharded over it (other axes replicate the batch). Default: a 1-D mesh
        over all devices.
      progress: show a progress bar (examples done, examples/s) on process 0.
      cache_dir: a directory for incremental results. A pre-pass killed
        part-way and started again skips the examples already done and
        returns the same table as an uninterrupted run. A cached row is served
        only for the same program (a hash of the lowered batched step: the
        function's code, closed-over values, partial arguments, model code,
        shapes and mesh), the same parameter bytes and the same example data
        (a changed example under an old id is recomputed); another program
        or other parameters raise before anything is computed. Resume with
        the same number of processes: each process reads its own cache. Over
        ``flowjax.batches`` of an :class:`flowjax.ArraySource`, cached examples
        are not even read, and the data's key vouches for every row (after
        any change of the data every row is recomputed); over other batches
        each row stores a digest of its example, so only changed examples
        are (see :func:`flowjax.batches`).
      param_shardings: optional shardings for ``params`` (a ``Sharding`` or a
        matching pytree). Default: replicated over ``mesh``.
      total: the number of examples, if known, for the progress bar's ETA.
      flush_seconds: with ``cache_dir``, finished rows are written at most
        this many seconds apart (and when the pass ends or fails, with every
        step that finished before the error); a row is durable once written,
        so a kill loses at most this much work, plus up to about a second of
        steps in flight (from 1 s up, steps are dispatched and read in bursts
        of at most about half a second). ``0`` writes after every step.

    Returns:
      A :class:`flowjax.LossTable` of every example fed by every process, on
      every process. Its attribute ``cached`` is the number of rows served
      from ``cache_dir`` instead of computed (``0`` without a cache).

    Multi-host: call it on every process with the same ``loss_fn``,
    ``params``, ``mesh`` and ``cache_dir``; each process passes only its own
    batches (at least one example each; the counts may differ). Any
    process's bad input makes EVERY process raise the same ``ValueError``,
    naming the process and the example ids, within a few steps: no process is
    left waiting in a collective.

    Eval mode: the frozen model must run as it does at inference. Split an
    NNX model with BatchNorm or Dropout after ``model.eval()`` (or from
    ``nnx.view(model, use_running_average=True)``): in train mode BatchNorm
    normalises each vmapped example by its own statistics, and every example
    gets the same loss.

    Raises:
      ValueError: no batches (multi-host: on some process); a batch without
        integer ids; fields whose lengths differ from the ids'; a batch whose
        structure, shapes or dtypes differ from the first (or, multi-host,
        from another process's); duplicate ids, detected as they arrive (in
        one batch, in an earlier batch, which is what a loader that repeats
        examples, such as ``epochs=None``, gives, or on another process); a
        ``loss_fn`` that does not return one scalar per example; a batched
        ``loss_fn`` whose rows are coupled; a ``step_size`` that is not a
        positive int; NaN or
        infinite losses (naming the example ids); a mesh without a ``'data'``
        axis; a ``cache_dir`` written by a different pre-pass, not writable,
        or with a truncated or corrupted manifest (naming the file); with
        ``cache_dir``, a negative or infinite ``flush_seconds``.

    Example:
      >>> import numpy as np, jax.numpy as jnp, flowjax
      >>> loss_fn = lambda w, ex: jnp.sum((ex["x"] @ w - ex["y"]) ** 2)
      >>> batches = [{"id": np.array([4, 2]), "x": np.ones((2, 3), np.float32), "y": np.zeros((2,), np.float32)},
      ...            {"id": np.array([9]), "x": 2 * np.ones((1, 3), np.float32), "y": np.zeros((1,), np.float32)}]
      >>> table = flowjax.per_example_losses(loss_fn, jnp.ones(3), batches, progress=False)
      >>> table.ids.tolist(), table.losses.tolist()
      ([2, 4, 9], [9.0, 9.0, 36.0])

      With a cache, a second run serves every row (``cached``) instead of computing it:

      >>> import tempfile
      >>> cache = tempfile.mkdtemp()
      >>> run = lambda: flowjax.per_example_losses(
      ...     loss_fn, jnp.ones(3), batches, progress=False, cache_dir=cache)
      >>> first, again = run(), run()
      >>> first.cached, again.cached, again == table
      (0, 3, True)

      The same losses from a loss written for a batch:

      >>> batch_loss = lambda w, b: (b["x"] @ w - b["y"]) ** 2  # [B]
      >>> flowjax.per_example_losses(batch_loss, jnp.ones(3), batches, batched=True,
      ...                            progress=False) == table
      True
    """
    mesh = default_mesh() if mesh is None else mesh
    ids, losses, cached = _engine.map_examples(
        loss_fn,
        params,
        batches,
        name="per_example_losses",
        batched=batched,
        batch_size="auto" if step_size is None else step_size,
        mesh=mesh,
        param_shardings=param_shardings,
        cache=_PassCache.of(cache_dir, loss_fn, mesh, flush_seconds=flush_seconds),
        progress=progress,
        total=total,
        nonfinite=_nonfinite_losses,
    )
    table = LossTable(ids, losses)
    table.cached = cached
    return table


def _nonfinite_losses(bad: np.ndarray, ids: np.ndarray, values: np.ndarray) -> str:
    return (
        f"loss_fn returned NaN or infinite losses for example {_checks.describe(bad, ids, values)}. "
        "flowjax never sets them to 0: fix the loss (a sequence with no target tokens gives 0/0) "
        "or leave those examples out of the fine-tuning set."
    )


class _PassCache:
    """CACHE: one pass's cache as the engine uses it (:class:`flowjax._engine.Cache`).

    The engine calls ``skip_at_source`` before it reads a batch (this opens the
    cache directory: a directory that is not writable or a damaged manifest
    fails here, before any compute), ``open`` once the batch layout, the placed
    parameters and the step are known (the manifest check, see
    :mod:`flowjax._cache`), then ``add`` and ``flush``. This is the one place
    that knows :mod:`flowjax._cache`'s API.
    """

    def __init__(
        self,
        cache_dir: str,
        fn,
        mesh: Mesh,
        *,
        shape: tuple[int, ...] = (),
        fn_name: str | None = None,
        flush_seconds: float = _cache.FLUSH_SECONDS,
    ):
        self._dir, self._mesh, self._shape = cache_dir, mesh, tuple(shape)
        self._name = _describe_fn(fn) if fn_name is None else fn_name
        self._flush_seconds = flush_seconds
        self._cache: _cache.PrepassCache | None = None

    @property
    def flush_seconds(self) -> float:
        """Seconds between writes of the finished rows (the engine reads steps within it)."""
        return self._flush_seconds

    @classmethod
    def of(cls, cache_dir: str | None, fn, mesh: Mesh, **kwargs) -> _PassCache | None:
        return None if cache_dir is None else cls(cache_dir, fn, mesh, **kwargs)

    def skip_at_source(self, batches: Batches) -> Batches:
        self._cache = _cache.PrepassCache(
            self._dir,
            jax.process_index(),
            jax.process_count(),
            self._shape,
            self._flush_seconds,
        )
        return self._cache.skip_at_source(batches)

    def open(self, example_spec: str, params, step, args) -> _cache.Served:
        manifest = _cache.manifest(
            name=self._name,
            params=params,
            spec=example_spec,
            mesh=self._mesh,
            shape=self._shape,
        )
        self._cache.check(manifest, step, *args)
        return self._cache.served

    def add(self, ids: np.ndarray, values: np.ndarray) -> None:
        self._cache.add(ids, values)

    def flush(self) -> None:
        if self._cache is not None:
            self._cache.flush()


def _describe_fn(fn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
