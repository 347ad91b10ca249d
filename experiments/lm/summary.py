"""The numbers of the LM experiment: FLOW-weight statistics and ``results.md``.

:func:`weight_stats` summarises the pre-pass weights (τ, mean, fractions below 0.1 and above
0.9, per token kind); :func:`markdown` writes the tables of ``results.md`` from
``results.json`` alone, through :mod:`experiments.report`.
"""

from __future__ import annotations

import numpy as np

from experiments import report


def weight_stats(w: dict) -> dict:
    """τ and histogram statistics of the FLOW weights (sequence, token, token by kind)."""
    tok = w["tok_weights"]
    return {
        "tau_seq": w["tau_seq"],
        "tau_tok": w["tau_tok"],
        "sequence": _hist_stats(w["sequence"]),
        "sequence_mean1": _hist_stats(w["sequence_mean1"]),
        "token": _hist_stats(tok),
        "token_by_kind": {
            k: {
                **_hist_stats(tok[w["tok_kind"] == k]),
                "mean_loss": float(w["tok_losses"][w["tok_kind"] == k].mean()),
            }
            for k in ("scaffold", "digit", "'.'", "EOS")
        },
    }


def _hist_stats(x) -> dict:
    x = np.asarray(x, float)
    return {
        "n": len(x),
        "mean": float(x.mean()),
        "frac_below_0.1": float(np.mean(x < 0.1)),
        "frac_above_0.9": float(np.mean(x > 0.9)),
    }


def markdown(r: dict) -> str:
    """``results.md`` from a results dict (``results.json``) alone."""
    seeds, d = r["config"]["seeds"], r["data"]
    lines = [
        "# FLOW on a byte-level LM: pydoc pre-training, addition fine-tuning",
        "",
        "Task: prompt `What is {a} plus {b}?\\n` (masked), response "
        "`The result is {a+b}.<EOS>` (the target). Held-out pydoc perplexity (exp of the "
        "mean NLL per byte, nats) measures forgetting; exact match is the fraction of "
        f"{d['test_problems']} test problems whose greedy completion has the number "
        "`a+b` right after `The result is ` (exact response: the whole completion equals "
        f"the reference, EOS included). Mean ± std over seeds {tuple(seeds)}, one shared "
        "pre-trained model. The learning rate of every method is chosen from the same "
        "grid by the same rule: best validation exact match on seed 0 "
        f"({d['val_problems']} validation problems), ties to the smaller learning rate.",
        "",
        report.markdown_table(
            [
                "method",
                "lr",
                "held-out pydoc perplexity",
                "test exact match",
                "exact response",
            ],
            [
                [
                    "pre-trained",
                    "–",
                    *(
                        f"{r['pretrained'][k]:.3f}"
                        for k in ("perplexity", "exact_match", "exact_response")
                    ),
                ],
                *(
                    [
                        m["name"],
                        f"{m['lr']:g}",
                        report.pm(m["perplexity"], digits=2),
                        report.pm(m["exact_match"], digits=3),
                        report.pm(m["exact_response"], digits=3),
                    ]
                    for m in r["methods"].values()
                ),
            ],
        ),
    ]
    grid = r["config"]["lr_grid"]
    lines += [
        "",
        "Learning-rate grid (seed 0): validation exact match (the selection criterion) / "
        "held-out pydoc perplexity (reported, never used for the choice).",
        "",
        report.markdown_table(
            ["method", *(f"lr {k:g}" for k in grid)],
            [
                [
                    m["name"],
                    *(
                        f"{m['val_exact_match_by_lr'][f'{k:g}']:.3f} / "
                        f"{m['perplexity_by_lr_seed0'][f'{k:g}']:.1f}"
                        for k in grid
                    ),
                ]
                for m in r["methods"].values()
            ],
        ),
    ]
    nf4 = [m for m in r["methods"].values() if "nf4_base" in m]
    if nf4:
        b = nf4[0]["nf4_base"]
        lines += [
            "",
            "**QLoRA's base** is the pre-trained model quantised to NF4: before any "
            f"training it has held-out perplexity {b['perplexity']:.3f} (the float "
            f"model: {r['pretrained']['perplexity']:.3f}) and validation exact match "
            f"{b['exact_match']:.3f}.",
        ]
    if "ilora" in r["methods"]:
        lines += [
            "",
            "**I-LoRA** replays windows of the pre-training pydoc text (not the "
            "held-out topics the perplexity is measured on) and is evaluated with its "
            "slow adapter; it uses pre-training data, so unlike FLOW it is not "
            "data-oblivious.",
        ]
    for key, what in (("prompt", "soft prompt"), ("prefix", "prefix")):
        m = r["methods"].get(key)
        if m is None or "untrained" not in m:
            continue
        ppl = ", ".join(f"{u['perplexity']:.3f}" for u in m["untrained"])
        lines += [
            "",
            f"**{m['name']}** is evaluated with its {what} applied (held-out "
            f"perplexity too); the model without it is the pre-trained one exactly. "
            f"With the random initial {what} (seeds {', '.join(map(str, r['config']['seeds']))}) "
            f"the held-out perplexity is {ppl}.",
        ]
    w = r["weights"]
    lines += [
        "",
        "**FLOW (sequence, mean-1 weights)** uses the FLOW sequence weights divided by "
        f"their mean over the training set ({w['sequence']['mean']:.3f}), i.e. "
        '`flow_weights(normalize="mean")`: the same relative weighting as FLOW '
        "(sequence), but the same average step size as standard FT at the same learning "
        "rate. Plain FLOW's weights (mean < 1) also shrink the effective learning rate; "
        "comparing the two rows separates the reweighting from that shrink.",
        "",
        "## FLOW weights of the training set (pre-trained model)",
        "",
        f"τ_seq = {w['tau_seq']:.4f}, τ_tok = {w['tau_tok']:.4f} (medians of the "
        "sequence / token losses, nats).",
    ]
    rows = [("sequence", w["sequence"]), ("token (all)", w["token"])]
    rows += [(f"token: {k}", v) for k, v in w["token_by_kind"].items()]
    lines += [
        "",
        report.markdown_table(
            ["weights", "n", "mean", "< 0.1", "> 0.9", "mean loss (nats)"],
            [
                [
                    name,
                    h["n"],
                    f"{h['mean']:.3f}",
                    f"{h['frac_below_0.1']:.1%}",
                    f"{h['frac_above_0.9']:.1%}",
                    f"{h['mean_loss']:.3f}" if "mean_loss" in h else "–",
                ]
                for name, h in rows
            ],
        ),
    ]
    lines += [
        "",
        "Wall-clock times and whether the pre-trained model came from the cache: "
        "`timing.json`.",
        "",
    ]
    return "\n".join(lines)
