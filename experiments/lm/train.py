"""Pure training and evaluation functions of the LM experiment (``jax.jit`` over ``nnx.split`` state).

A model is handled as ``(graphdef, trainable, frozen)`` from
``nnx.split(model, wrt, ...)``: ``wrt = nnx.Param`` for full fine-tuning
(``frozen`` is then empty) and ``nnx.LoRAParam`` for LoRA (``frozen`` holds the
base weights, passed to the jitted step as an argument, never closed over).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flowjax
from experiments.lm.data import parse_answer
from experiments.lm.model import EOS, PAD, decode, make_greedy_decode


def lora_filter(layers) -> nnx.filterlib.Filter:
    """An NNX filter for ``flowjax.add_lora(select=...)``: the ``nnx.Linear`` layers with these names."""
    return nnx.Any(*(nnx.PathContains(name) for name in layers))


def schedule(total_steps: int, warmup_frac: float = 0.03, floor: float = 0.0):
    """Unit-peak linear warm-up then cosine decay (the official 3 % warm-up, cosine)."""
    warmup = max(1, round(warmup_frac * total_steps))
    return optax.warmup_cosine_decay_schedule(
        0.0, 1.0, warmup, max(total_steps, warmup + 1), floor
    )


def make_tx(
    total_steps: int,
    lr: float,
    *,
    regularizer: optax.GradientTransformation | None = None,
    warmup_frac: float = 0.03,
    clip_norm: float = 1.0,
    floor=0.0,
):
    """Adam (β=(0.9, 0.999), ε=1e-8, no weight decay) with grad-norm clipping and the schedule.

    The learning rate ``lr`` is held in the optimiser state
    (``optax.inject_hyperparams``), not in the transformation's code, so one
    compiled step (``flowjax.make_train_step`` shares programs between steps
    that compute the same thing) serves every learning rate of the grid and
    every seed. A ``regularizer`` (L2-SP: :func:`flowjax.l2sp`, anchored at
    the parameters given to ``init``, the pre-trained ones) comes first in
    the chain.
    """
    parts = [] if regularizer is None else [regularizer]
    parts += [
        optax.clip_by_global_norm(clip_norm),
        optax.scale_by_adam(),
        optax.scale_by_schedule(
            schedule(total_steps, warmup_frac=warmup_frac, floor=floor)
        ),
        optax.inject_hyperparams(optax.scale)(step_size=-lr),
    ]
    return optax.chain(*parts)


@functools.cache
def step_objective(graphdef, objective):
    """``objective`` in ``flowjax.make_train_step``'s form: ``fn(trainable, batch, frozen) -> loss``.

    ``objective(logits, tokens, mask, weights) -> scalar`` is the method's loss
    (:func:`experiments.lm.methods.sft_loss`); the batch holds ``tokens``,
    ``mask`` and ``weight`` (``[B]`` per sequence or ``[B, T-1]`` per token);
    ``frozen`` is the rest of the ``nnx.split`` state (the base weights under
    LoRA; empty for full fine-tuning).
    """

    def fn(trainable, batch, frozen):
        logits = nnx.merge(graphdef, trainable, frozen)(batch["tokens"])
        return objective(logits, batch["tokens"], batch["mask"], batch["weight"])

    return fn


def make_mean_nll(graphdef):
    """Jitted ``(state, windows [M, T]) -> (sum of next-token NLL, count)`` over every position."""

    @jax.jit
    def nll_sum(state, windows):
        logits = nnx.merge(graphdef, *state)(windows)
        mask = jnp.ones(windows.shape, bool).at[:, 0].set(False)
        nll, m = flowjax.token_nll(logits, windows, mask)
        return jnp.sum(jnp.where(m, nll, 0.0)), jnp.sum(m)

    return nll_sum


class Evaluator:
    """Held-out perplexity and exact-match accuracy, compiled once per model structure.

    Greedy decoding runs on the whole split at once (one jitted call per
    ``chunk`` rows, fixed shapes, ``max_new`` steps).
    """

    def __init__(self, graphdef, *, chunk: int = 512, max_new: int = 20):
        self.nll_sum = make_mean_nll(graphdef)
        self.greedy = make_greedy_decode(graphdef, max_new)
        self.chunk, self.max_new = chunk, max_new

    def perplexity(self, state, windows: np.ndarray) -> float:
        """``exp`` of the mean next-token NLL (nats) over all windows."""
        total, count = 0.0, 0
        for s in range(0, len(windows), self.chunk):
            t, c = self.nll_sum(state, windows[s : s + self.chunk])
            total, count = total + float(t), count + int(c)
        return float(np.exp(total / count))

    def completions(self, state, split: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The greedy completion tokens of each prompt (up to and with the first EOS)."""
        tokens, plen = split["tokens"], split["prompt_len"]
        t = tokens.shape[1]
        if int(plen.max()) + self.max_new > t:
            raise ValueError(
                f"prompt length {int(plen.max())} + max_new {self.max_new} exceeds {t}."
            )
        prompt = np.where(np.arange(t) < plen[:, None], tokens, PAD).astype(np.int32)
        out = []
        for s in range(0, len(tokens), self.chunk):
            sl = slice(s, s + self.chunk)
            buf = np.asarray(self.greedy(state, prompt[sl], plen[sl]))
            for row, p in zip(buf, plen[sl], strict=True):
                gen = row[p : p + self.max_new]
                stop = np.flatnonzero(gen == EOS)
                out.append(gen if not len(stop) else gen[: stop[0] + 1])
        return out

    def exact_match(self, state, split: dict[str, np.ndarray]) -> dict[str, float]:
        """Exact match of greedy completions.

        Returns ``{"answer": ..., "response": ...}``: ``answer`` is the
        fraction whose number after ``"The result is "``
        (:func:`experiments.lm.data.parse_answer`) equals ``a + b``;
        ``response`` the fraction whose completion is the reference response
        token for token, EOS included (stricter).
        """
        comps = self.completions(state, split)
        ans, resp = [], []
        for gen, ref, m, want in zip(
            comps, split["tokens"], split["mask"], split["answer"], strict=True
        ):
            ans.append(parse_answer(decode(gen)) == int(want))
            resp.append(np.array_equal(gen, ref[m]))
        return {"answer": float(np.mean(ans)), "response": float(np.mean(resp))}
