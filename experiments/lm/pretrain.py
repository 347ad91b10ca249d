"""Pre-training of the LM experiment, cached with orbax under a fingerprint of its config.

A byte-level :class:`~experiments.lm.model.TinyLM` is trained on random windows of the
pre-training pydoc topics (:mod:`experiments.lm.data`): AdamW (decay 0.01), 5 % warm-up,
cosine to ``lr / 10``, grad-norm clip 1. :func:`pretrained_params` saves the ``nnx.Param``
state with ``ocp.StandardCheckpointer`` in ``<cache_dir>/pretrain-<fingerprint>/`` together
with ``config.json`` (the fingerprint's source: :class:`~experiments.lm.config.PretrainConfig`,
sha256 of the text, the held-out rule, the jax version); a rerun with the same fingerprint
restores it and skips pre-training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from experiments.lm import data as lm_data
from experiments.lm.config import PretrainConfig
from experiments.lm.methods import next_token_loss
from experiments.lm.model import build


def fingerprint(cfg: PretrainConfig, text_sha256: str) -> dict:
    """Everything the pre-trained weights depend on (hashed into the cache directory name)."""
    return {
        "format": 1,
        "pretrain": dataclasses.asdict(cfg),
        "text_sha256": text_sha256,
        "heldout_rule": [lm_data.HELDOUT_EVERY, lm_data.HELDOUT_OFFSET],
        "jax": jax.__version__,
    }


def pretrain(cfg: PretrainConfig, stream: np.ndarray, progress: bool) -> nnx.State:
    """Next-byte training on random windows of ``stream``; returns the ``nnx.Param`` state."""
    model = build(cfg.model, cfg.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            optax.warmup_cosine_decay_schedule(
                0.0, cfg.lr, max(1, cfg.steps // 20), cfg.steps, cfg.lr / 10
            ),
            weight_decay=0.01,
        ),
    )
    opt_state = tx.init(params)
    window_mask = np.ones((cfg.batch, cfg.model.max_len), bool)
    window_mask[:, 0] = False

    @jax.jit
    def step(params, opt_state, tokens):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(tokens)
            return next_token_loss(logits, tokens, window_mask)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(cfg.seed)
    bar = tqdm(range(cfg.steps), desc="pre-train", disable=not progress)
    for i in bar:
        x = lm_data.sample_windows(stream, cfg.model.max_len, cfg.batch, rng)
        params, opt_state, loss = step(params, opt_state, x)
        if i % 25 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return params


def pretrained_params(cfg: PretrainConfig, cache_dir: Path, stream, sha, progress):
    """Restores the pre-trained params from the orbax cache, or pre-trains and saves them.

    Returns ``(params, info)`` with ``info["cache_hit"]`` and ``info["steps_run"]``.
    """
    fp = fingerprint(cfg, sha)
    key = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    path = (cache_dir / f"pretrain-{key}").resolve()
    abstract = nnx.split(nnx.eval_shape(lambda: build(cfg.model, cfg.seed)), nnx.Param)[
        1
    ]
    checkpointer = ocp.StandardCheckpointer()
    info = {"cache_dir": str(path), "fingerprint": fp, "fingerprint_sha256_16": key}
    cfg_file = path / "config.json"
    if cfg_file.exists() and json.loads(cfg_file.read_text()) == fp:
        params = checkpointer.restore(path / "state", abstract)
        print(f"pre-training skipped: restored {path}")
        return params, {**info, "cache_hit": True, "steps_run": 0}
    start = time.perf_counter()
    params = pretrain(cfg, stream, progress)
    took = time.perf_counter() - start
    path.mkdir(parents=True, exist_ok=True)
    checkpointer.save(path / "state", params, force=True)
    checkpointer.wait_until_finished()
    cfg_file.write_text(
        json.dumps(fp, indent=1, sort_keys=True)
    )  # written last: marks complete
    print(f"pre-trained {cfg.steps} steps in {took:.1f} s; saved {path}")
    return params, {**info, "cache_hit": False, "steps_run": cfg.steps, "seconds": took}
