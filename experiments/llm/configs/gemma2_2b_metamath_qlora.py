"""Gemma 2 2B on MetaMathQA, QLoRA (LoRA on an NF4 base; not in the paper); the official recipe otherwise.

    python -m experiments.llm.run --config experiments/llm/configs/gemma2_2b_metamath_qlora.py \
        --workdir /abs/runs/gemma2_2b --set checkpoint=/abs/gemma-2-2b --set data=/abs/MetaMathQA-395K.json

(``huggingface-cli download google/gemma-2-2b --local-dir /abs/gemma-2-2b`` and
``huggingface-cli download meta-math/MetaMathQA --repo-type dataset`` fetch the inputs.)
Run every config of the model with the same ``--workdir``: the stages they share (the
pre-trained evaluation, the pre-pass, FT under WiSE-FT) are computed once and
``results.md`` collects their rows into Table 2.
"""

from experiments.llm.config import paper


def get_config():
    return paper("gemma2_2b", "qlora")
