"""PyTorch comparison (optional): the official-style FLOW vision loop against its own fine-tuning.

Command (``make bench-torch`` makes a separate venv, ``.venv-torch``, with
``torch==2.13.0`` (a CPU wheel) and numpy, only when asked; never part of
``make test``; this module imports neither jax nor flowjax)::

    .venv-torch/bin/python -m experiments.benchmarks.torch_flow --out results/benchmarks/torch.json

What it measures, on the models and data sizes of
:mod:`experiments.benchmarks.suite` (the MLP 784-256-256-10 and the small
CNN, batches of 256 random 28x28 images, SGD with momentum 0.9), in
alternated rounds:

* ``ft``: one epoch of standard fine-tuning (mean cross-entropy);
* ``flow``: one epoch of the official code's FLOW loop, which computes each
  batch's weights on the fly: an extra forward of the frozen pre-trained
  model (``torch.no_grad``) every step, ``w = exp(-loss / tau)``, then the
  weighted mean loss. ``tau`` is given (the median pre-trained loss,
  computed once and not timed: the cheapest reading of the official loop).

Its FLOW / FT cost at E epochs is ``E flow / E ft``, the per-round ratio of
the epochs; flowjax's own figure (pre-pass once + E weighted epochs, over E
plain epochs) is ``end_to_end`` in ``suite.json``. ``suite.md`` quotes both
when ``torch.json`` is present in the suite's output directory.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform

import numpy as np
import torch
from torch import nn

from experiments.benchmarks import timing


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(7 * 7 * 32, 10),
    )


def _batches(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(n, 1, 28, 28)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, size=n).astype(np.int64))
    return [(x[s : s + 256], y[s : s + 256]) for s in range(0, n, 256)]


def bench(
    name: str, make, n: int, rounds: int, repeats: int = 3, epochs=(3, 10)
) -> dict:
    torch.manual_seed(0)
    pretrained = make().eval()
    batches = _batches(n)
    ce = nn.CrossEntropyLoss(reduction="none")
    with torch.no_grad():
        tau = float(torch.cat([ce(pretrained(x), y) for x, y in batches]).median())

    def epoch(flow: bool):
        model = copy.deepcopy(pretrained).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        for x, y in batches:
            if flow:
                with torch.no_grad():  # the official loop's extra forward, every step
                    w = torch.exp(-ce(pretrained(x), y) / tau)
                loss = (w * ce(model(x), y)).mean()
            else:
                loss = ce(model(x), y).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return float(loss.detach())

    kw = {"repeats": repeats, "warmups": 1}
    ft = {"ft": lambda: epoch(False)}
    ratio, t = timing.ratio_over(lambda: epoch(True), ft, rounds, **kw)
    control, _ = timing.ratio_over(ft["ft"], ft, rounds, **kw)
    summary = timing.summary(ratio)
    return {
        "model": name,
        "examples": n,
        "ft_examples_per_s": round(n / float(np.median(t["ft"]))),
        "control_same_program_two_labels": timing.summary(control),
        # The same per-round ratio at every E: the loop pays its extra forward every epoch.
        "flow_over_ft": {f"{e}_epochs": summary for e in epochs},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/benchmarks/torch.json")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    # Denormals flushed to zero, as XLA's CPU backend does: without it a few SGD steps of the
    # MLP on random data reach denormal values and its steps run up to 30x slower.
    torch.set_flush_denormal(True)
    rows = [
        bench("mlp", mlp, 256 if args.quick else 20480, args.rounds, args.repeats),
        bench("cnn", cnn, 256 if args.quick else 4096, args.rounds, args.repeats),
    ]
    result = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for r in rows:
        s = r["flow_over_ft"]["3_epochs"]
        print(
            f"{r['model']}: official-style FLOW / FT {s['median']:.3f} "
            f"({s['min']:.3f}-{s['max']:.3f}); FT {r['ft_examples_per_s']:,} ex/s"
        )
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
