"""experiments/benchmarks/llm.py end to end at its smoke size: every figure present and consistent."""

import json

import numpy as np

from experiments.benchmarks import llm


def test_llm_benchmark_smoke(tmp_path):
    result = llm.main(["--size", "smoke", "--rounds", "1", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "llm.json").read_text()) == result
    md = (tmp_path / "llm.md").read_text()
    assert "KV-cache generate tokens/s" in md and "weighted / unweighted" in md
    p, s, d = result["prepass"], result["train_step"], result["decode"]
    # the bucketing waste, recomputed from the same synthetic examples
    sizes = llm.SIZES["smoke"]
    n = np.asarray([len(e["tokens"]) for e in llm.synthetic_examples(sizes, 512)])
    padded = sum(min(b for b in sizes.buckets if b >= m) for m in n)
    assert abs(p["padding_waste_bucketing"] - (1 - n.sum() / padded)) < 1e-9
    assert p["padding_waste_with_batch_fill"] >= p["padding_waste_bucketing"] > 0
    assert p["padded_tokens_per_s"] > p["real_tokens_per_s"] > 0
    assert (
        p["flops_per_pass"] > 0 and p["fraction_of_bf16_peak"] is None
    )  # CPU: no peak
    # random weights: the median sequence loss is about log V
    assert abs(p["tau_median_loss"] - np.log(512)) < 1.5
    assert s["plain_tokens_per_s"] > 0 and s["weighted_over_plain"]["rounds"] == 1
    assert d["generate_tokens_per_s"] > 0 and d["new_tokens"] == 16
    assert d["decode_tokens_per_s"] is None or d["decode_tokens_per_s"] > 0
    assert result["config"]["parameters"] > 0 and result["config"]["backend"] == "cpu"
