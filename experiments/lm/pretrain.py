"""Pre-training of the LM experiment, cached as a Hugging Face checkpoint under a fingerprint.

The tiny byte-level Llama (:mod:`experiments.lm.model`, a :class:`flowjax.models.CausalLM`)
is trained on random windows of the pre-training pydoc topics (:mod:`experiments.lm.data`):
AdamW (decay 0.01), 5 % warm-up, cosine to ``lr / 10``, grad-norm clip 1.
:func:`pretrained_params` saves it with :func:`flowjax.models.save_causal_lm` in the
Hugging Face layout (``config.json`` + ``model.safetensors``) in
``<cache_dir>/pretrain-<fingerprint>/model/`` and reads it back with
:func:`flowjax.models.load_causal_lm`, the loader of the paper-scale pipeline, on every
run (so a fresh run and a cached one fine-tune the same bytes). ``fingerprint.json``
beside it is the fingerprint's source (:class:`~experiments.lm.config.PretrainConfig`,
the model's ``config.json``, sha256 of the text, the held-out rule, the jax version) and
is written last: a directory without it is incomplete and is pre-trained again. A
changed config has another fingerprint, hence another directory: it never meets a stale
model.
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
from flax import nnx
from tqdm.auto import tqdm

from experiments.lm import data as lm_data
from experiments.lm.config import PretrainConfig
from experiments.lm.methods import next_token_loss
from experiments.lm.model import build
from flowjax.models import load_causal_lm, save_causal_lm


def fingerprint(cfg: PretrainConfig, text_sha256: str) -> dict:
    """Everything the pre-trained weights depend on (hashed into the cache directory name)."""
    return {
        "format": 2,  # 1: the former TinyLM in orbax; 2: CausalLM, HF checkpoint
        "pretrain": dataclasses.asdict(cfg),
        "hf_config": cfg.model.hf_config(),
        "text_sha256": text_sha256,
        "heldout_rule": [lm_data.HELDOUT_EVERY, lm_data.HELDOUT_OFFSET],
        "jax": jax.__version__,
    }


def pretrain(cfg: PretrainConfig, stream: np.ndarray, progress: bool) -> nnx.Module:
    """Next-byte training on random windows of ``stream``; returns the trained model."""
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
    return nnx.merge(graphdef, params)


def _key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(cfg: PretrainConfig, cache_dir: Path, text_sha256: str) -> Path:
    """``<cache_dir>/pretrain-<16 hex digits of the fingerprint's sha256>``, absolute."""
    return (cache_dir / f"pretrain-{_key(fingerprint(cfg, text_sha256))}").resolve()


def pretrained_params(cfg: PretrainConfig, cache_dir: Path, stream, sha, progress):
    """The pre-trained ``nnx.Param`` state, read from the HF checkpoint cache (pre-trained first on a miss).

    Returns ``(params, info)`` with ``info["cache_hit"]`` and ``info["steps_run"]``.

    Raises:
      ValueError: the cached checkpoint's architecture is not ``cfg.model``'s
        (a cache edited by hand: the fingerprint covers the config).
    """
    fp = fingerprint(cfg, sha)
    key = _key(fp)
    path = cache_path(cfg, cache_dir, sha)
    info = {"cache_dir": str(path), "fingerprint": fp, "fingerprint_sha256_16": key}
    fp_file, model_dir = path / "fingerprint.json", path / "model"
    hit = fp_file.exists() and json.loads(fp_file.read_text()) == fp
    if hit:
        print(f"pre-training skipped: restored {path}")
        extra = {"cache_hit": True, "steps_run": 0}
    else:
        start = time.perf_counter()
        model = pretrain(cfg, stream, progress)
        took = time.perf_counter() - start
        path.mkdir(parents=True, exist_ok=True)
        # config.json also records the byte vocabulary's special ids and the context.
        hf = cfg.model.hf_config()
        special = (
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
            "max_position_embeddings",
        )
        save_causal_lm(model, model_dir, config_extra={k: hf[k] for k in special})
        fp_file.write_text(json.dumps(fp, indent=1, sort_keys=True))  # last: complete
        print(f"pre-trained {cfg.steps} steps in {took:.1f} s; saved {path}")
        extra = {"cache_hit": False, "steps_run": cfg.steps, "seconds": took}
    model = load_causal_lm(model_dir)
    if model.config != cfg.model.lm_config():
        raise ValueError(
            f"{model_dir} holds {model.config}, not the configured {cfg.model.lm_config()}."
        )
    return nnx.state(model, nnx.Param), {**info, **extra}
