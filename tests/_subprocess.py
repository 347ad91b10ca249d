"""Starts tests/_prepass_worker.py (or another worker) processes (fresh JAX runtimes) and reads their tables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import flowjax

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_prepass_worker.py")
TIMEOUT = 180


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def start(out: str, *args: str, worker: str = WORKER) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, worker, out, *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def start_two(outs, *args: str, worker: str = WORKER) -> list[subprocess.Popen]:
    """Starts two workers as the two processes of one jax.distributed run on loopback."""
    port = str(free_port())
    return [
        start(
            out,
            "--num-processes",
            "2",
            "--process-id",
            str(i),
            "--port",
            port,
            *args,
            worker=worker,
        )
        for i, out in enumerate(outs)
    ]


def finish(proc: subprocess.Popen, expect_rc: int = 0) -> str:
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"worker timed out:\n{output}") from None
    assert proc.returncode == expect_rc, (
        f"worker exited {proc.returncode}, expected {expect_rc}:\n{output}"
    )
    return output


def run(out: str, *args: str, expect_rc: int = 0) -> flowjax.LossTable | None:
    finish(start(out, *args), expect_rc)
    return flowjax.LossTable.load(out) if expect_rc == 0 else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
