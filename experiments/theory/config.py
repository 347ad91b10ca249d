"""Every size and setting of the linear-theory experiment, as plain data (``summary.json`` records it).

``get_config()`` is the default run (d = 16, ρ = 0.8, ‖e‖ = 2; ``make theory``),
``get_config(quick=True)`` the reduced smoke test (``--quick``, d = 6). Single fields can be
changed from the command line: ``python -m experiments.theory.linear_theory --set d=8``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the run; :meth:`quick` is the reduced smoke-test setting."""

    d: int = 16
    rho: float = 0.8
    e_norm: float = 2.0
    seed: int = 0
    traj_max_steps: int = 3000  # figure (a)
    stall_betas: int = 200  # figure (b)
    mc_samples: int = 400_000  # figure (c)
    mc_temperature_over_e2: tuple[float, ...] = (0.1, 0.45493642311957, 2.0)
    fs_sizes: tuple[int, ...] = (250, 1000, 4000, 16000, 64000)  # figure (d)
    fs_seeds: int = 4
    fs_max_steps: int = 200
    front_betas: int = 161  # figure (e)
    front_log10_max_steps: float = 5.3
    front_steps: int = 300
    median_samples: int = 200_001
    dpi: int = 120


def get_config(quick: bool = False) -> Config:
    """The default config, or with ``quick`` the reduced smoke-test one (d = 6, fewer samples)."""
    if not quick:
        return Config()
    return Config(
        d=6,
        traj_max_steps=500,
        stall_betas=40,
        mc_samples=40_000,
        fs_sizes=(300, 3000, 30000),
        fs_seeds=2,
        fs_max_steps=60,
        front_betas=41,
        front_steps=120,
        median_samples=20_001,
        dpi=50,
    )
