"""Llama 3.2 3B on MetaMathQA, QLoRA (LoRA on an NF4 base; not in the paper); the official recipe otherwise.

    python -m experiments.llm.run --config experiments/llm/configs/llama3_2_3b_metamath_qlora.py \
        --workdir /abs/runs/llama3_2_3b --set checkpoint=/abs/Llama-3.2-3B --set data=/abs/MetaMathQA-395K.json

(``huggingface-cli download meta-llama/Llama-3.2-3B --local-dir /abs/Llama-3.2-3B`` and
``huggingface-cli download meta-math/MetaMathQA --repo-type dataset`` fetch the inputs.)
Run every config of the model with the same ``--workdir``: the stages they share (the
pre-trained evaluation, the pre-pass, FT under WiSE-FT) are computed once and
``results.md`` collects their rows into Table 2.
"""

from experiments.llm.config import paper


def get_config():
    return paper("llama3_2_3b", "qlora")
