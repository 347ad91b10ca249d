"""The lm-evaluation-harness adapter: each request type against numpy, and lm_eval's own runner on local tasks."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("lm_eval")  # the eval extra (make test installs it)

from lm_eval.api.instance import Instance

from flowjax.evaluation import harness_lm

BOS, EOS, V = 256, 257, 258
ORDER = 16  # the "model" looks at the last 16 tokens: from the question to its answer


def encode(s):
    return list(s.encode("utf-8"))


def decode(ids):
    return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


def _key(tokens):
    """Hash of the last ORDER tokens (0-padded on the left), as the model computes it."""
    k = 0
    for t in ([0] * ORDER + list(tokens))[-ORDER:]:
        k = (k * 263 + int(t)) % 4099
    return k


def ngram_model(texts, seed=0):
    """A causal 16-gram "LM": random log-probs per context, with each text's next tokens made likely."""
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 1, (4099, V)).astype(np.float32)
    for text in texts:
        ids = [BOS, *encode(text)]
        for i in range(1, len(ids)):
            table[_key(ids[:i]), ids[i]] += 8.0
    return jnp.asarray(table)


def logits_fn(table, tokens):
    padded = jnp.pad(tokens, ((0, 0), (ORDER - 1, 0)))
    key = jnp.zeros(tokens.shape, jnp.int32)
    for j in range(ORDER):
        key = (key * 263 + padded[:, j : j + tokens.shape[1]]) % 4099
    return table[key]


def _logp(table, context_ids, target):
    row = np.asarray(table[_key(context_ids)], np.float64)
    row = row - row.max()
    return row[target] - math.log(np.exp(row).sum())


def _lm(table, **kw):
    kw.setdefault("bucket", 16)
    return harness_lm(
        logits_fn, table, encode=encode, decode=decode, eos_id=EOS, bos_id=BOS, **kw
    )


def test_loglikelihood_and_rolling_equal_numpy():
    table = ngram_model(["the cat sat"])
    lm = _lm(table, batch_size=2)
    reqs = [("the cat", " sat"), ("a dog", " ran far"), ("", "hello")]
    got = lm.loglikelihood(
        [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
    )
    for (ctx, cont), (total, _) in zip(reqs, got, strict=True):
        ids = [BOS, *encode(ctx)]
        want = 0.0
        for t in encode(cont):
            want += _logp(table, ids, t)
            ids.append(t)
        assert total == pytest.approx(want, rel=1e-5)
    assert got[0][1] is True  # " sat" is the model's greedy continuation
    # rolling, one window: every token of the string from the BOS prefix
    text = "the cat sat on"
    req = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    (rolled,) = _lm(table, max_length=64).loglikelihood_rolling(req)
    ids, want = [BOS], 0.0
    for t in encode(text):
        want += _logp(table, ids, t)
        ids.append(t)
    assert rolled == pytest.approx(want, rel=1e-5)
    # windows of 4 tokens: each window's tokens see only what the window holds
    # (lm-eval's disjoint rolling windows, as its Hugging Face model scores them)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    (rolled4,) = _lm(table, max_length=4).loglikelihood_rolling(req)
    want4 = 0.0
    for ctx, cont in map(
        make_disjoint_window,
        get_rolling_token_windows(
            token_list=encode(text), prefix_token=BOS, max_seq_len=4, context_len=1
        ),
    ):
        ids = list(ctx)
        for t in cont:
            want4 += _logp(table, ids, t)
            ids.append(t)
    assert rolled4 == pytest.approx(want4, rel=1e-5) and rolled4 != pytest.approx(want)


def test_generate_until_is_greedy_and_stops():
    table = ngram_model(["Q: 2+2?\nA: #### 4\n\nQ"])
    lm = _lm(table)
    reqs = [
        Instance(
            "generate_until",
            {},
            ("Q: 2+2?\nA:", {"until": ["\n\n"], "max_gen_toks": 20}),
            0,
        ),
        Instance(
            "generate_until",
            {},
            ("Q: 2+2?\nA:", {"until": ["4"], "max_gen_toks": 20}),
            1,
        ),
        Instance("generate_until", {}, ("Q: 2+2?\nA:", {"max_gen_toks": 3}), 2),
    ]
    out = lm.generate_until(reqs)
    assert out == [" #### 4", " #### ", " ##"]


def _task(tmp_path, name, rows, spec):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {data}", "test_split: test", *spec]  # fmt: skip
    (tmp_path / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def _gsm_task(tmp_path, rows, until):
    """A local GSM8K-style task: greedy up to 16 tokens, the ``#### N`` answer filter."""
    _task(tmp_path, "tiny_gsm", rows, [
        "output_type: generate_until", 'doc_to_text: "Question: {{question}}\\nAnswer:"',
        'doc_to_target: "{{answer}}"', "generation_kwargs:", f"  until: {until}",
        "  do_sample: false", "  max_gen_toks: 16", "filter_list:", "  - name: strict-match",
        "    filter:", "      - function: regex", '        regex_pattern: "#### (\\\\-?[0-9]+)"',
        "      - function: take_first", "metric_list:", "  - metric: exact_match",
    ])  # fmt: skip


def test_lm_eval_scores_a_local_multiple_choice_and_a_gsm8k_style_task(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    mc = [
        {
            "question": "The sky is",
            "choices": ["blue", "green", "loud"],
            "answer": 0,
        },
        {"question": "Fire is", "choices": ["cold", "hot"], "answer": 1},
        {
            "question": "Snow is",
            "choices": ["white", "black"],
            "answer": 1,
        },  # the model says white: wrong
    ]
    gsm = [
        {"question": "2+2", "answer": "4"},
        {"question": "3+3", "answer": "6"},
    ]
    table = ngram_model(
        ["The sky is blue", "Fire is hot", "Snow is white",
         "Question: 2+2\nAnswer: #### 4\n\n", "Question: 3+3\nAnswer: #### 7\n\n"]
    )  # fmt: skip
    _task(tmp_path, "tiny_mc", mc, [
        "output_type: multiple_choice", 'doc_to_text: "{{question}}"',
        'doc_to_choice: "{{choices}}"', 'doc_to_target: "{{answer}}"',
        "metric_list:", "  - metric: acc",
    ])  # fmt: skip
    _gsm_task(tmp_path, gsm, until='["\\n\\n"]')
    out = lm_eval.simple_evaluate(
        model=_lm(table),
        tasks=["tiny_mc", "tiny_gsm"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        num_fewshot=0,
    )
    # Multiple choice: the choice with the highest log-likelihood of " " + choice (lm-eval's
    # target delimiter), computed in numpy: 2 of 3 right.
    picks = []
    for doc in mc:
        ids = [BOS, *encode(doc["question"])]
        scores = []
        for choice in doc["choices"]:
            lp, ctx = 0.0, list(ids)
            for t in encode(" " + choice):
                lp += _logp(table, ctx, t)
                ctx.append(t)
            scores.append(lp)
        picks.append(int(np.argmax(scores)) == doc["answer"])
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(picks))
    assert np.mean(picks) == pytest.approx(2 / 3)
    # Generation: greedy "#### 4" right, "#### 7" wrong under the regex filter.
    assert out["results"]["tiny_gsm"]["exact_match,strict-match"] == pytest.approx(0.5)


def _tiny_gemma(seed=0):
    """A random Gemma 2 over the byte vocabulary: sliding window 4, shorter than the prompts."""
    from flax import nnx

    from flowjax.models import CausalLM, LMConfig

    cfg = LMConfig.from_hf(
        {"model_type": "gemma2", "vocab_size": V, "hidden_size": 16,
         "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 8, "sliding_window": 4,
         "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    )  # fmt: skip
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)  # numpy weights: no compilation per initialiser
    state = jax.tree.map(
        lambda x: rng.normal(0, x.shape[0] ** -0.5 if x.ndim == 2 else 0.1, x.shape),
        state,
    )
    return nnx.merge(graphdef, state)


def latin1(ids):
    """Byte ids to text, one character per byte (the random model's bytes are no UTF-8)."""
    return bytes(i for i in ids if i < 256).decode("latin-1")


def test_generate_until_with_the_kv_cache_equals_the_no_cache_path(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import flowjax.models as fm
    from flowjax.evaluation import harness_causal_lm

    lm = _tiny_gemma(seed=1)
    contexts = ["Q: 2+2?\nA:", "Question: 3+3\nAnswer:", "7*8="]
    rows = [[BOS, *encode(c)] for c in contexts]
    free = fm.generate(lm, rows, max_new_tokens=16, eos_id=-1, bucket=16)
    # EOS: a token the first context generates (after 2 others) and the others never do
    eos = next(t for t in free[0][2:] if t not in free[1] + free[2])
    kw = {"encode": encode, "decode": latin1, "eos_id": eos, "bos_id": BOS}
    cached = harness_causal_lm(lm, bucket=16, **kw)
    plain = harness_causal_lm(lm, bucket=16, use_cache=False, **kw)
    stop = latin1(free[1][4:6])  # a string the second context's text reaches
    reqs = [
        Instance("generate_until", {}, (contexts[0], {"max_gen_toks": 12}), 0),
        Instance(
            "generate_until",
            {},
            (contexts[1], {"until": [stop], "max_gen_toks": 16}),
            1,
        ),
        Instance("generate_until", {}, (contexts[2], {"max_gen_toks": 5}), 2),
    ]
    want = plain.generate_until(reqs)
    assert cached.generate_until(reqs) == want
    # and the three rules acted: EOS, the until string, the budget
    assert want[0] == latin1(free[0][: free[0].index(eos)])
    text = latin1(free[1])
    assert stop not in want[1] and want[1] == text[: text.index(stop)]
    assert want[2] == latin1(free[2][:5])
    # lm-eval's own runner on a GSM8K-style local task: the same responses through both
    gsm = [
        {"question": f"{a}+{b}", "answer": str(a + b)}
        for a, b in [(2, 2), (13, 29), (7, 5)]
    ]
    _gsm_task(tmp_path, gsm, until='["\\n\\n", "Q"]')
    runs = [
        lm_eval.simple_evaluate(
            model=model,
            tasks=["tiny_gsm"],
            task_manager=TaskManager(
                include_path=str(tmp_path), include_defaults=False
            ),
            num_fewshot=0,
        )
        for model in (cached, plain)
    ]
    resps = [[s["resps"] for s in r["samples"]["tiny_gsm"]] for r in runs]
    assert resps[0] == resps[1] and len(resps[0]) == 3
    assert all(r[0][0] for r in resps[0])  # non-empty generations
