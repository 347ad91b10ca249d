"""The public surface: layered (core first, then namespaces), complete, and documented."""

from __future__ import annotations

import ast
import inspect
import pathlib
import types

import pytest

import flowjax
import flowjax.datasets
import flowjax.evaluation
import flowjax.models

# The core, in reading order: pre-pass, tables, weights, objectives.
CORE = (
    "per_example_losses default_mesh LossTable WeightTable flow_weights "
    "median_temperature weighted_objective weighted_loss attach_weights"
).split()
NAMESPACES = {
    "baselines": {
        "l2sp",
        "ewc",
        "diagonal_fisher",
        "synaptic_intelligence",
        "lwf_objective",
        "wise_ft",
        "add_lora",
        "merge_lora",
        "add_qlora",
        "dequantize_qlora",
        "QLoRALinear",
        "ilora",
        "ilora_slow_update",
        "ilora_consistency_loss",
        "add_adapters",
        "remove_adapters",
        "AdapterParam",
        "PromptTuning",
        "PrefixTuning",
        "prefix_attention",
        "packnet_prune",
        "packnet_updates",
        "packnet_task_params",
        "ProgressiveMLP",
        "ReplayBuffer",
        "der_loss",
        "dro_loss",
        "train_only",
        "trainable_mask",
        "swap_task_parts",
    },
    "lm": {
        "token_nll",
        "chunked_token_nll",
        "lm_sequence_losses",
        "lm_token_losses",
        "TokenLosses",
        "bucket_batches",
        "weighted_lm_loss",
    },
    "data": {"batches", "ArraySource"},
    "train": {
        "TrainState",
        "init_train_state",
        "make_train_step",
        "fit",
        "RetentionMonitor",
    },
    "metrics": {
        "retention",
        "perplexity_retention",
        "pretrain_target_average",
        "hardest_accuracy",
        "accuracy_matrix",
        "average_accuracy",
        "backward_transfer",
        "forward_transfer",
        "forgetting",
    },
    "diagnostics": {
        "effective_sample_size",
        "weight_histogram",
        "plot_weight_histogram",
        "most_down_weighted",
        "weight_summary",
    },
}
_PUBLIC = [
    n for n in flowjax.__all__ if not isinstance(getattr(flowjax, n), types.ModuleType)
]


def test_all_is_layered_core_then_namespaces_then_their_names():
    assert flowjax.__all__[: len(CORE)] == CORE
    n = len(NAMESPACES)
    assert flowjax.__all__[len(CORE) : len(CORE) + n] == list(NAMESPACES)
    rest = flowjax.__all__[len(CORE) + n :]
    for ns in NAMESPACES:  # each namespace's names, as one block, in namespace order
        names = getattr(flowjax, ns).__all__
        assert set(rest[: len(names)]) == set(names), ns
        rest = rest[len(names) :]
    assert rest == []
    assert len(set(flowjax.__all__)) == len(flowjax.__all__)


def test_all_is_complete_and_importable():
    public = {
        n
        for n, v in vars(flowjax).items()
        if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
    }
    assert public == set(_PUBLIC)
    assert "freeze" not in vars(flowjax)  # optax.freeze has the opposite polarity


@pytest.mark.parametrize("ns", list(NAMESPACES))
def test_namespaces_hold_their_pieces_and_the_flat_names_are_the_same_objects(ns):
    module = getattr(flowjax, ns)
    assert isinstance(module, types.ModuleType)
    assert NAMESPACES[ns] <= set(module.__all__)
    assert not set(CORE) & set(module.__all__)  # the core is not hidden in a namespace
    for name in module.__all__:
        assert getattr(flowjax, name) is getattr(module, name), name


def test_the_module_reads_core_first():
    """A newcomer reading flowjax/__init__.py meets the core before the namespaces."""
    doc = flowjax.__doc__
    last_core = max(
        doc.index(n)
        for n in (
            "per_example_losses",
            "LossTable",
            "flow_weights",
            "weighted_objective",
        )
    )
    assert last_core < min(doc.index(f"flowjax.{ns}`") for ns in NAMESPACES)
    source = pathlib.Path(flowjax.__file__).read_text()
    modules = [
        node.module
        for node in ast.parse(source).body
        if isinstance(node, ast.ImportFrom)
    ]
    assert modules[:4] == [
        "flowjax.prepass",
        "flowjax.tables",
        "flowjax.weights",
        "flowjax.objectives",
    ]


@pytest.mark.parametrize("name", _PUBLIC)
def test_public_functions_have_maths_args_returns_and_examples(name):
    obj = getattr(flowjax, name)
    doc = inspect.getdoc(obj) or ""
    assert doc, f"{name} has no docstring"
    if inspect.isfunction(obj) and name != "default_mesh":
        for section in ("Args:", "Returns:", "Raises:", "Example:"):
            assert section in doc, f"{name} docstring lacks {section}"


@pytest.mark.parametrize("ns", list(NAMESPACES))
def test_namespaces_are_documented(ns):
    doc = getattr(flowjax, ns).__doc__
    assert doc.strip()
    if ns == "baselines":
        assert "Example:" in doc and "nnx.PathContains" in doc


# Namespaces `import flowjax` does not import (they need an extra): their own layer.
SEPARATE = {
    "datasets": {
        "VisionSource",
        "cifar10",
        "cifar100",
        "flowers102",
        "caltech101",
        "stanford_cars",
        "stanford_dogs",
        "imagenet_val",
        "stratified_rows",
        "image_batches",
        "image_transform",
        "random_resized_crop_box",
        "center_crop_box",
        "IMAGENET_MEAN",
        "IMAGENET_STD",
        "ALPACA_TEMPLATE",
        "metamathqa",
        "sft_example",
    },
    "models": {
        "ARCHS",
        "BasicBlock",
        "BatchNorm",
        "Bottleneck",
        "CausalLM",
        "KVCache",
        "LMConfig",
        "ResNet",
        "default_partition_spec",
        "generate",
        "load_causal_lm",
        "load_resnet",
        "load_tokenizer",
        "save_causal_lm",
        "resnet",
        "task_parts",
        "torch_state_dict",
    },
    "evaluation": {"harness_causal_lm", "harness_lm"},
}


def test_separate_namespaces_are_complete_documented_and_not_flat():
    for ns, names in SEPARATE.items():
        module = getattr(flowjax, ns)
        assert set(module.__all__) == names, ns
        assert f"flowjax.{ns}" in flowjax.__doc__, ns
        assert not names & set(flowjax.__all__), ns
        for name in names:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                doc = inspect.getdoc(obj) or ""
                assert doc, f"{ns}.{name} has no docstring"
            if inspect.isfunction(obj):
                for section in ("Args:", "Returns:", "Raises:", "Example:"):
                    assert section in doc, f"{ns}.{name} docstring lacks {section}"


def test_import_flowjax_does_not_import_the_separate_namespaces():
    import subprocess
    import sys

    code = (
        "import sys, flowjax; print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('PIL', 'safetensors', 'lm_eval') or m.startswith(('flowjax.datasets', "
        "'flowjax.models', 'flowjax.evaluation'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
