"""The official evaluation on flowjax models: an lm-evaluation-harness adapter.

FLOW's LLM results are measured with EleutherAI's lm-evaluation-harness (``lm_eval``):
GSM8K (the target), MMLU, ARC-Easy/Challenge, HellaSwag, PIQA, SIQA, OpenBookQA and
MBPP (FLOW_PAPER.md §2.2, step L6). :func:`harness_lm` wraps any JAX causal LM
(a ``logits_fn(params, tokens [B, T]) -> logits [B, T, V]``, causal, e.g. a merged
``flowjax.models`` model) and its tokenizer as an ``lm_eval.api.model.LM``, so
``lm_eval.simple_evaluate(model=harness_lm(...), tasks=[...])`` runs the harness's
tasks on it, offline on local task files if need be. Needs the ``eval`` extra
(``pip install 'flowjax-ft[eval]'``: lm-eval, without torch); not imported by
``import flowjax``. :func:`harness_causal_lm` wraps a
:class:`flowjax.models.CausalLM` and generates with its KV cache.

How each request type is scored (as the harness's Hugging Face model does):

* ``loglikelihood(context, continuation)``: trailing spaces of the context move
  to the continuation; ``context`` and ``context + continuation`` are encoded, the
  continuation is the whole encoding past the context's length; the sum of the
  continuation tokens' log-probabilities given everything before (truncated on the
  left to ``max_length``) and whether each is the greedy token.
* ``loglikelihood_rolling(string)``: the string's tokens in disjoint windows of
  ``max_length`` (``lm_eval.utils.get_rolling_token_windows``), the first predicted
  from the prefix token (BOS, else EOS).
* ``generate_until(context, gen_kwargs)``: greedy decoding of up to
  ``max_gen_toks`` tokens, stopped at EOS or at the first ``until`` string (cut
  there). By default every step recomputes the whole forward (no cache): exact
  for any causal ``logits_fn``, quadratic in the length. With a ``generate_fn``
  (:func:`harness_causal_lm` passes :func:`flowjax.models.generate`, batched
  greedy decoding with the KV cache) the batch is decoded in one compiled
  program to EOS or the largest ``max_gen_toks``, and the same stopping rule
  is applied to its tokens afterwards: the same strings as the no-cache path.

Batches are right-padded to a multiple of ``bucket`` tokens (one compiled program
per padded length); a causal model's logits at real positions do not see the
padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["harness_causal_lm", "harness_lm"]


def harness_lm(
    logits_fn: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    *,
    encode: Callable[[str], Sequence[int]],
    decode: Callable[[Sequence[int]], str],
    eos_id: int,
    bos_id: int | None = None,
    pad_id: int = 0,
    max_length: int = 2048,
    batch_size: int = 8,
    bucket: int = 64,
    generate_fn: Callable[[list[list[int]], int], list[list[int]]] | None = None,
):
    """An ``lm_eval.api.model.LM`` scoring a JAX causal LM (see the module doc for how).

    Args:
      logits_fn: ``logits_fn(params, tokens int32 [B, T]) -> logits [B, T, V]``,
        causal (position ``t`` sees tokens ``<= t`` only).
      params: its parameters (any pytree; passed as a jit argument).
      encode: text → token ids without special tokens.
      decode: token ids → text.
      eos_id: the end-of-sequence id (stops generation; the rolling prefix when
        there is no BOS).
      bos_id: the id the model expects first (Gemma ``<bos>``, Llama
        ``<|begin_of_text|>``), or None.
      pad_id: the id right-padding fills (never scored).
      max_length: the longest sequence the model is given (left-truncated).
      batch_size: requests per forward.
      bucket: padded lengths are multiples of it.
      generate_fn: ``generate_fn(prompts, max_new_tokens) -> tokens``: greedy
        continuations of a batch of prompts (lists of ids), each up to and
        including its EOS, at most ``max_new_tokens`` (e.g.
        :func:`flowjax.models.generate`); ``None``: greedy decoding through
        ``logits_fn``, the whole forward every step.

    Returns:
      An instance of a subclass of ``lm_eval.api.model.LM``.

    Raises:
      ImportError: lm-eval is not installed.
      ValueError: ``max_length``, ``batch_size`` or ``bucket`` < 1.

    Example:
      >>> import jax.numpy as jnp
      >>> from flowjax.evaluation import harness_lm
      >>> table = jnp.log(jnp.full((258, 258), 1 / 258))  # a uniform bigram "model"
      >>> lm = harness_lm(lambda p, t: p[t], table, encode=lambda s: list(s.encode()),
      ...                 decode=lambda ids: bytes(ids).decode(), eos_id=257, bos_id=256)
      >>> from lm_eval.api.instance import Instance
      >>> req = Instance("loglikelihood", {}, ("ab", "cd"), 0)
      >>> [round(x, 4) for x in lm.loglikelihood([req])[0][:1]]  # 2 tokens × log(1/258)
      [-11.1059]
    """
    try:
        from lm_eval.api.model import LM
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    except ImportError:
        raise ImportError(
            "flowjax.evaluation needs lm-eval: pip install 'flowjax-ft[eval]'."
        ) from None
    for name, value in (
        ("max_length", max_length),
        ("batch_size", batch_size),
        ("bucket", bucket),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}.")

    log_probs = jax.jit(
        lambda p, t: jax.nn.log_softmax(jnp.asarray(logits_fn(p, t), jnp.float32), -1)
    )
    prefix = [bos_id] if bos_id is not None else []

    def padded(rows: list[list[int]]) -> np.ndarray:
        width = max(len(r) for r in rows)
        width = -(-width // bucket) * bucket
        out = np.full((len(rows), width), pad_id, np.int32)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def score(pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (Σ log p(continuation), all greedy)."""
        results = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            rows, spans = [], []
            for ctx, cont in chunk:
                whole = (ctx + cont)[-(max_length + 1) :]
                inp = whole[:-1]
                rows.append(inp)
                spans.append((len(inp) - len(cont), whole[-len(cont) :]))
            lp = np.asarray(log_probs(params, padded(rows)))
            for i, (first, targets) in enumerate(spans):
                pos = np.arange(first, first + len(targets))
                row = lp[i, pos]
                total = float(row[np.arange(len(targets)), targets].sum())
                greedy = bool((row.argmax(-1) == np.asarray(targets)).all())
                results.append((total, greedy))
        return results

    def finished(tokens: list[int], until: list[str], budget: int) -> bool:
        """The stopping rule after a kept token: the budget, or a stop string in the text."""
        if len(tokens) >= budget:
            return True
        text = decode(tokens)
        return any(s and s in text for s in until)

    def greedy(rows, stops, budgets) -> list[list[int]]:
        """No cache: the whole forward of every live row at each step."""
        generated = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max(budgets)):
            if all(done):
                break
            # every row, finished or not: one compiled program per padded width
            current = [r + g for r, g in zip(rows, generated, strict=True)]
            lp = np.asarray(log_probs(params, padded(current)))
            for i in (i for i, d in enumerate(done) if not d):
                token = int(lp[i, len(current[i]) - 1].argmax())
                if token == eos_id:
                    done[i] = True
                    continue
                generated[i].append(token)
                done[i] = finished(generated[i], stops[i], budgets[i])
        return generated

    class HarnessLM(LM):
        def loglikelihood(self, requests):
            pairs = []
            for req in requests:
                context, continuation = req.args
                spaces = len(context) - len(context.rstrip(" "))
                if spaces:
                    context, continuation = (
                        context[:-spaces],
                        context[-spaces:] + continuation,
                    )
                ctx = prefix + list(encode(context))
                whole = prefix + list(encode(context + continuation))
                cont = whole[len(ctx) :]
                if not cont:
                    raise ValueError(
                        f"continuation {continuation!r} encodes to no token."
                    )
                if not ctx:
                    ctx = [eos_id]
                pairs.append((ctx, cont))
            return score(pairs)

        def loglikelihood_rolling(self, requests):
            out = []
            for req in requests:
                (string,) = req.args
                windows = [
                    make_disjoint_window(w)
                    for w in get_rolling_token_windows(
                        token_list=list(encode(string)),
                        prefix_token=bos_id if bos_id is not None else eos_id,
                        max_seq_len=max_length,
                        context_len=1,
                    )
                ]
                out.append(
                    float(
                        sum(
                            s
                            for s, _ in score([(list(c), list(t)) for c, t in windows])
                        )
                    )
                )
            return out

        def generate_until(self, requests):
            out = []
            for start in range(0, len(requests), batch_size):
                chunk = requests[start : start + batch_size]
                rows, stops, budgets = [], [], []
                for req in chunk:
                    context, kwargs = req.args
                    kwargs = dict(kwargs or {})
                    until = kwargs.get("until", [])
                    until = [until] if isinstance(until, str) else list(until)
                    budget = int(kwargs.get("max_gen_toks", 256))
                    ids = prefix + list(encode(context))
                    rows.append(ids[-max(max_length - budget, 1) :])
                    stops.append(until)
                    budgets.append(budget)
                if generate_fn is None:
                    generated = greedy(rows, stops, budgets)
                else:
                    generated = []
                    continued = generate_fn(rows, max(budgets))
                    for tokens, until, budget in zip(
                        continued, stops, budgets, strict=True
                    ):
                        kept = []
                        for token in tokens:
                            if int(token) == eos_id:
                                break
                            kept.append(int(token))
                            if finished(kept, until, budget):
                                break
                        generated.append(kept)
                for tokens, until in zip(generated, stops, strict=True):
                    text = decode(tokens)
                    cuts = [text.index(s) for s in until if s and s in text]
                    out.append(text[: min(cuts)] if cuts else text)
            return out

    return HarnessLM()


def harness_causal_lm(
    lm,
    *,
    encode: Callable[[str], Sequence[int]],
    decode: Callable[[Sequence[int]], str],
    eos_id: int,
    bos_id: int | None = None,
    pad_id: int = 0,
    max_length: int = 2048,
    batch_size: int = 8,
    bucket: int = 64,
    use_cache: bool = True,
):
    """:func:`harness_lm` for a :class:`flowjax.models.CausalLM`, generating with its KV cache.

    Log-likelihoods go through the full forward (``nnx.split``: the
    parameters are a jit argument); ``generate_until`` through
    :func:`flowjax.models.generate` (prompts left-padded to a multiple of
    ``bucket``, one compiled prefill + decode loop per batch shape and
    ``max_gen_toks``), which gives the strings of the no-cache path
    (``use_cache=False``) in a fraction of its time.

    Args:
      lm: the model.
      encode: text → token ids without special tokens.
      decode: token ids → text.
      eos_id: the end-of-sequence id.
      bos_id: the id the model expects first, or None.
      pad_id: the id padding fills.
      max_length: the longest sequence the model is given (left-truncated).
      batch_size: requests per forward or per generation batch.
      bucket: padded lengths are multiples of it.
      use_cache: False: generate through the full forward (the reference).

    Returns:
      The ``lm_eval.api.model.LM`` (as :func:`harness_lm`).

    Raises:
      ImportError: lm-eval is not installed.
      ValueError: as :func:`harness_lm`.

    Example:
      >>> from flax import nnx
      >>> from lm_eval.api.instance import Instance
      >>> from flowjax.evaluation import harness_causal_lm
      >>> from flowjax.models import CausalLM, LMConfig
      >>> cfg = LMConfig.from_hf({"model_type": "llama", "vocab_size": 258,
      ...     "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
      ...     "num_attention_heads": 2, "num_key_value_heads": 1})
      >>> kw = dict(encode=lambda s: list(s.encode()), eos_id=257, bos_id=256,
      ...           decode=lambda ids: bytes(i for i in ids if i < 256).decode("latin-1"))
      >>> lm = CausalLM(cfg, rngs=nnx.Rngs(0))
      >>> req = Instance("generate_until", {}, ("2+2=", {"max_gen_toks": 5}), 0)
      >>> [len(text) <= 5 for text in harness_causal_lm(lm, **kw).generate_until([req])]
      [True]
    """
    from flax import nnx

    from flowjax.models import generate

    graphdef, state = nnx.split(lm)

    def logits_fn(params, tokens):
        return nnx.merge(graphdef, params)(tokens)

    def generate_fn(prompts, max_new_tokens):
        return generate(
            lm,
            prompts,
            max_new_tokens=max_new_tokens,
            eos_id=eos_id,
            pad_id=pad_id,
            bucket=bucket,
        )

    return harness_lm(
        logits_fn,
        state,
        encode=encode,
        decode=decode,
        eos_id=eos_id,
        bos_id=bos_id,
        pad_id=pad_id,
        max_length=max_length,
        batch_size=batch_size,
        bucket=bucket,
        generate_fn=generate_fn if use_cache else None,
    )
