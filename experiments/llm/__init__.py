"""The paper's LLM experiments: MetaMathQA, FLOW, Gemma 2 / Llama 3.2, lm-eval (``python -m experiments.llm.run``)."""
