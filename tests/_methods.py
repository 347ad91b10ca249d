"""The shared test battery's registry: every training-step method as one small recipe.

A method turns ``strength`` and θ₀ into ``(objective, tx, frozen, start)``:
``objective(params, frozen, batch) -> loss`` is differentiated with respect to
the trained parameters, which start at ``start`` (θ₀ itself, or LoRA factors);
``tx`` is an optax transformation; ``frozen`` (a teacher's parameters, the
frozen base of a LoRA model) goes into the jitted step as an argument. Every recipe trains on FLOW-weighted per-example losses, so running a
step also checks that the method composes with FLOW in one jitted step.

Used by tests/test_methods.py and, on 8 fake devices, tests/_methods_worker.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flowjax

DIM, HIDDEN, CLASSES, N = 4, 8, 3, 32
LR = 0.1


def params(seed: int = 0, dtype=jnp.float32) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    shapes = {
        "w1": (DIM, HIDDEN),
        "b1": (HIDDEN,),
        "w2": (HIDDEN, CLASSES),
        "b2": (CLASSES,),
    }
    return {
        k: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), dtype=dtype)
        for k, s in shapes.items()
    }


def logits(p, x):
    h = jnp.tanh(x.astype(p["w1"].dtype) @ p["w1"] + p["b1"][None])
    return h @ p["w2"] + p["b2"][None]


def per_example_ce(p, batch):
    z = logits(p, batch["x"]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(z, batch["label"])


def batch(seed: int = 1) -> dict[str, np.ndarray]:
    """A batch with FLOW weights from the pre-trained model's own losses."""
    rng = np.random.default_rng(seed)
    out = {
        "id": np.arange(N, dtype=np.int64),
        "x": rng.normal(size=(N, DIM)).astype(np.float32),
    }
    # A learnable task: the label is the argmax of a fixed linear map of x.
    out["label"] = np.argmax(out["x"] @ rng.normal(size=(DIM, CLASSES)), 1).astype(
        np.int32
    )
    pre = np.asarray(per_example_ce(params(), out))
    weights = flowjax.LossTable(out["id"], pre).flow_weights()
    out["weight"] = weights.lookup(out["id"])
    return out


def plain_objective(p, frozen, b):
    del frozen
    return flowjax.weighted_loss(per_example_ce(p, b), b["weight"])


def plain_tx() -> optax.GradientTransformation:
    return optax.sgd(LR, momentum=0.9)


Recipe = tuple[Callable, optax.GradientTransformation, Any, Any]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[float, Any], Recipe]  # (strength, theta0) -> recipe
    strength: float = 0.5
    # Strength at which the method is plain fine-tuning (None: it has none).
    zero: float | None = 0.0
    # Data-side methods change the batch: (strength, batch) -> batch.
    data: Callable[[float, dict], dict] | None = None


def _on_theta0(objective, tx, frozen=None):
    return lambda t0: (objective, tx, frozen, t0)


def _chain(first: optax.GradientTransformation) -> optax.GradientTransformation:
    return optax.chain(first, plain_tx())


def _nll(p, ex):
    return per_example_ce(p, jax.tree.map(lambda a: a[None], ex))[0]


@functools.cache
def _fisher_f32() -> dict[str, np.ndarray]:
    """The empirical Fisher of the battery's model at θ₀ on its batch (computed once)."""
    b = batch()
    data = [{k: b[k] for k in ("id", "x", "label")}]
    fisher = flowjax.diagonal_fisher(_nll, params(), data, progress=False)
    return {k: np.asarray(v) for k, v in fisher.items()}


def _fisher(theta0):
    return {k: jnp.asarray(v, theta0[k].dtype) for k, v in _fisher_f32().items()}


def _head_or_all(strength):
    """The head (w2, b2) as an NNX filter, or everything (``...``) at strength 0."""
    return (
        ...
        if strength == 0
        else nnx.Any(nnx.PathContains("w2"), nnx.PathContains("b2"))
    )


METHODS: list[Method] = [
    Method(
        "plain", lambda s, t0: (plain_objective, plain_tx(), None, t0), strength=0.0
    ),
    Method(
        "l2sp",
        lambda s, t0: (plain_objective, _chain(flowjax.l2sp(s, t0)), None, t0),
    ),
    Method(
        "l2sp-num_params",
        lambda s, t0: (
            plain_objective,
            _chain(flowjax.l2sp(s, t0, scale="num_params")),
            None,
            t0,
        ),
        strength=20.0,  # λ/N with N = 67 parameters
    ),
    Method(
        "ewc",
        lambda s, t0: (
            plain_objective,
            _chain(flowjax.ewc(s, _fisher(t0), t0)),
            None,
            t0,
        ),
    ),
    Method(
        "si",
        lambda s, t0: (
            plain_objective,
            _chain(flowjax.synaptic_intelligence(s)),
            None,
            t0,
        ),
        strength=100.0,  # the online importance starts at 0 and grows with the path
    ),
    # strength > 0: linear probing (only the head w2, b2 trains, selected with an
    # NNX path filter on the plain dict of params); 0: all train (the filter ...).
    Method(
        "train_only",
        lambda s, t0: (
            plain_objective,
            flowjax.train_only(plain_tx(), _head_or_all(s)),
            None,
            t0,
        ),
        strength=1.0,
    ),
    # L2-SP inside train_only, on the trainable head only (N = its 27 entries): the
    # regulariser sees the head and nothing else. strength > 0: head-only with
    # λ = strength; 0: all trainable and λ = 0, i.e. plain fine-tuning.
    Method(
        "train_only-l2sp",
        lambda s, t0: (
            plain_objective,
            flowjax.train_only(
                _chain(flowjax.l2sp(s, scale="num_params")),
                {"w1": s == 0, "b1": s == 0, "w2": True, "b2": True},  # a bool mask
            ),
            None,
            t0,
        ),
        strength=5.0,
    ),
    Method("lora", lambda s, t0: _lora(t0), zero=None),
    # QLoRA: the LoRA recipe on an NF4 base (blocks of 4 rows: DIM = 4).
    Method("qlora", lambda s, t0: _qlora(t0), zero=None),
    # I-LoRA: fast + slow LoRA (slow = EMA of fast, λ = 0.25), consistency weight
    # `strength` on both layers' states; 0 is plain LoRA (tests/test_ilora.py).
    Method("ilora", lambda s, t0: _ilora(s, t0), strength=1.0, zero=None),
    Method("adapters", lambda s, t0: _adapters(t0), zero=None),
    # Prompt / prefix tuning on the battery's MLP read as a one-token sequence
    # model (SeqMLP): 3 soft-prompt embeddings, or 2 key/value prefix vectors.
    Method("prompt", lambda s, t0: _prompt(t0), zero=None),
    Method("prefix", lambda s, t0: _prefix(t0), zero=None),
    # PackNet on task 1: prune a fraction `strength` of each kernel, retrain the
    # survivors (the pruned weights stay 0). strength 0 prunes nothing: plain.
    # A progressive network: column 0 holds θ₀ (frozen), column 1 trains.
    Method("progressive", lambda s, t0: _progressive(t0), zero=None),
    Method("packnet", lambda s, t0: _packnet(s, t0), strength=0.5),
    Method("lwf", lambda s, t0: _lwf(s, t0), strength=2.0),
    # Dynamic DRO has no strength that is plain fine-tuning (τ must be finite).
    Method(
        "dro",
        lambda s, t0: (
            lambda p, frozen, b: flowjax.dro_loss(
                per_example_ce(p, b), s, weights=b["weight"]
            ),
            plain_tx(),
            None,
            t0,
        ),
        strength=0.5,
        zero=None,
    ),
    # WiSE-FT applied after every step (SFA's form: θ ← αθ₀ + (1-α)θ).
    Method("wise_ft", lambda s, t0: _every_step_average(s, t0), strength=0.3),
    Method(
        "replay",
        lambda s, t0: (plain_objective, plain_tx(), None, t0),
        strength=0.2,
        data=lambda s, b: _replay(s, b),
    ),
]

BY_NAME = {m.name: m for m in METHODS}


class MLP(nnx.Module):
    """The battery's MLP as an NNX module, for LoRA."""

    def __init__(self, theta0):
        rngs = nnx.Rngs(0)
        dtype = theta0["w1"].dtype
        self.l1 = nnx.Linear(DIM, HIDDEN, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.l2 = nnx.Linear(HIDDEN, CLASSES, rngs=rngs, param_dtype=dtype, dtype=dtype)
        for layer, w, b in ((self.l1, "w1", "b1"), (self.l2, "w2", "b2")):
            layer.kernel[...] = theta0[w]
            layer.bias[...] = theta0[b]

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x.astype(self.l1.kernel.dtype))))


def _frozen_base(model, trained) -> Recipe:
    """Trains only the ``trained`` Variables of ``model``; the rest is the frozen argument."""
    graphdef, start, rest = nnx.split(model, trained, ...)

    def objective(trained_params, frozen, b):
        m = nnx.merge(graphdef, trained_params, frozen)
        z = m(b["x"]).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(z, b["label"])
        return flowjax.weighted_loss(ce, b["weight"])

    return objective, plain_tx(), rest, start


def _lora(theta0) -> Recipe:
    return _frozen_base(
        flowjax.add_lora(MLP(theta0), 2, rngs=nnx.Rngs(1)), nnx.LoRAParam
    )


def _qlora(theta0) -> Recipe:
    model = flowjax.add_qlora(MLP(theta0), 2, rngs=nnx.Rngs(1), block_size=4)
    return _frozen_base(model, nnx.LoRAParam)


def _ilora(strength, theta0) -> Recipe:
    """I-LoRA on the battery's LoRA model: params {"fast", "slow"}, tx flowjax.ilora."""
    model = flowjax.add_lora(MLP(theta0), 2, rngs=nnx.Rngs(1))
    graphdef, fast, rest = nnx.split(model, nnx.LoRAParam, ...)
    start = {"fast": fast, "slow": jax.tree.map(jnp.copy, fast)}

    def states(m, x):
        h = jnp.tanh(m.l1(x.astype(m.l1.kernel.dtype)))
        return [h, m.l2(h)]

    def objective(p, frozen, b):
        fast_model = nnx.merge(graphdef, p["fast"], frozen)
        hf = states(fast_model, b["x"])
        ce = optax.softmax_cross_entropy_with_integer_labels(
            hf[1].astype(jnp.float32), b["label"]
        )
        loss = flowjax.weighted_loss(ce, b["weight"])
        if strength == 0:
            return loss
        hs = states(nnx.merge(graphdef, p["slow"], frozen), b["x"])
        return loss + strength * flowjax.ilora_consistency_loss(hf, hs).mean()

    return objective, flowjax.ilora(plain_tx(), 0.25), rest, start


def _adapters(theta0) -> Recipe:
    """A bottleneck adapter after the output layer; only the AdapterParam trains."""
    model = flowjax.add_adapters(
        MLP(theta0), 2, rngs=nnx.Rngs(1), select=nnx.PathContains("l2")
    )
    return _frozen_base(model, flowjax.AdapterParam)


class SeqMLP(nnx.Module):
    """The battery's MLP as a sequence model in flowjax.prompts' contract.

    An example ``x`` is a sequence of one embedding (``embed``); one causal
    single-head attention layer over it (plus prefixes) feeds the MLP
    residually, position by position. Prediction: the example's position.
    """

    def __init__(self, theta0):
        self.mlp = MLP(theta0)

    def embed(self, x):
        return x.astype(self.mlp.l1.kernel.dtype)[:, None, :]

    def from_embeddings(self, h, *, prefixes=None):
        q = h[:, :, None, :]
        a = flowjax.prefix_attention(q, q, q, None if prefixes is None else prefixes[0])
        return self.mlp(h + a[:, :, 0])

    def __call__(self, x):
        return self.from_embeddings(self.embed(x))


def _sequence_model(model, trained) -> Recipe:
    """As _frozen_base, for a SeqMLP-based model; predicts at the example's position.

    Soft prompts and prefixes start near 0 (N(0, 0.02²)) and move the output
    only through attention, so they train with Adam at 0.3 (scale-free steps;
    Lester et al. use Adafactor at learning rate 0.3) rather than the plain step.
    """
    graphdef, start, rest = nnx.split(model, trained, ...)

    def objective(trained_params, frozen, b):
        m = nnx.merge(graphdef, trained_params, frozen)
        z = m(b["x"])[:, 0].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(z, b["label"])
        return flowjax.weighted_loss(ce, b["weight"])

    return objective, optax.adam(3 * LR), rest, start


def _prompt(theta0) -> Recipe:
    dtype = theta0["w1"].dtype
    model = flowjax.PromptTuning(
        SeqMLP(theta0), 3, DIM, rngs=nnx.Rngs(1), param_dtype=dtype
    )
    return _sequence_model(model, flowjax.PromptParam)


def _prefix(theta0) -> Recipe:
    dtype = theta0["w1"].dtype
    model = flowjax.PrefixTuning(
        SeqMLP(theta0),
        2,
        num_layers=1,
        num_heads=1,
        head_dim=DIM,
        rngs=nnx.Rngs(1),
        param_dtype=dtype,
    )
    return _sequence_model(model, flowjax.PrefixParam)


def _progressive(theta0) -> Recipe:
    dtype = theta0["w1"].dtype
    model = flowjax.ProgressiveMLP(
        [DIM, HIDDEN, CLASSES],
        rngs=nnx.Rngs(0),
        activation=jnp.tanh,
        dtype=dtype,
        param_dtype=dtype,
    )
    first = model.columns[0].layers
    for layer, w, b in ((first[0], "w1", "b1"), (first[1], "w2", "b2")):
        layer.kernel[...] = theta0[w]
        layer.bias[...] = theta0[b]
    model.add_column(nnx.Rngs(1))
    graphdef, column, rest = nnx.split(model, model.column_filter(1), ...)

    def objective(column_params, frozen, b):
        m = nnx.merge(graphdef, column_params, frozen)
        z = m(b["x"].astype(dtype), 1).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(z, b["label"])
        return flowjax.weighted_loss(ce, b["weight"])

    return objective, plain_tx(), rest, column


def _packnet(strength, theta0) -> Recipe:
    owner = flowjax.packnet_init(theta0)
    start, owner = flowjax.packnet_prune(theta0, owner, 1, keep=1.0 - strength)
    tx = optax.chain(plain_tx(), flowjax.packnet_updates(owner, 1))
    return plain_objective, tx, None, start


def _lwf_apply(p, ex):
    return logits(p, ex["x"][None])[0]


def _lwf_task_loss(z, ex):
    z = z.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(z, ex["label"])


def _lwf(strength, theta0) -> Recipe:
    objective = flowjax.lwf_objective(_lwf_apply, _lwf_task_loss, strength=strength)
    return (
        (lambda p, teacher, b: objective(p, teacher, b)[0]),
        plain_tx(),
        theta0,
        theta0,
    )


def _plain_per_example(strength, theta0) -> Recipe:
    """Plain fine-tuning through ``weighted_objective`` of LwF's per-example loss."""
    del strength
    objective = flowjax.weighted_objective(
        lambda p, ex: _lwf_task_loss(_lwf_apply(p, ex), ex)
    )
    return (lambda p, frozen, b: objective(p, b)), plain_tx(), None, theta0


# What a method at zero strength is, when not the battery's plain fine-tuning: LwF's
# teacher-free path is documented as bitwise ``weighted_objective`` of its per-example
# loss (the battery's plain loss is batched, another program: it may differ by rounding).
ZERO_REFERENCE = {"lwf": Method("plain, per example", _plain_per_example)}


def _every_step_average(alpha, theta0) -> Recipe:
    inner = plain_tx()

    def init(p):
        return inner.init(p)

    def update(grads, state, p):
        updates, state = inner.update(grads, state, p)
        stepped = optax.apply_updates(p, updates)
        averaged = flowjax.wise_ft(theta0, stepped, alpha)
        return jax.tree.map(lambda a, b: a - b, averaged, p), state

    return plain_objective, optax.GradientTransformation(init, update), None, theta0


def _replay(ratio, b):
    old = batch(seed=7)  # "old task" rows: other inputs, ids 1000+
    old = {"id": old["id"] + 1000, "x": old["x"], "label": old["label"]}
    buffer = flowjax.ReplayBuffer(16, seed=0)
    buffer.add(old)
    mixed = flowjax.replay_batches([b], buffer, ratio, seed=0, fill={"weight": 1.0})
    return next(iter(mixed))


def leaves(tree) -> dict[str, np.ndarray]:
    """Leaves by path, for comparing trained parameters of any structure."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): v for k, v in flat}


def make_step(objective, tx):
    def step(p, state, frozen, b):
        loss, grads = jax.value_and_grad(objective)(p, frozen, b)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    return step


def train(
    method: Method,
    strength: float,
    *,
    steps: int = 3,
    jit: bool = True,
    dtype=jnp.float32,
    place=None,
):
    """Runs ``steps`` steps from θ₀; returns (params, state, losses)."""
    theta0 = params(dtype=dtype)
    if place is not None:
        theta0 = place(theta0)
    objective, tx, frozen, p = method.build(strength, theta0)
    step = make_step(objective, tx)
    if jit:
        step = jax.jit(step)
    state = tx.init(p)
    b = batch() if method.data is None else method.data(strength, batch())
    losses = []
    for _ in range(steps):
        p, state, loss = step(p, state, frozen, b)
        losses.append(float(loss))
    return p, state, losses
