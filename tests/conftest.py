"""Shared fixtures: a tiny job file, and running the real `hvdlm` CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Small enough that a multi-rank run takes seconds on 2 cores, big enough to learn something.
TINY_JOB = """
[model]
n_layer = 2
n_head = 2
d_model = 32
seq_len = 32

[train]
batch_size = 4
max_steps = 8
lr = 3e-3
warmup_steps = 2
log_interval = 1
eval_interval = 4
eval_batches = 2
sample_tokens = 16
"""


@dataclass
class Result:
    code: int
    out: str  # stdout and stderr together
    run_dir: Path | None

    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def losses(self) -> list[float]:
        return [row["loss"] for row in self.metrics() if "loss" in row]

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One corpus cache for the session, apart from the user's own."""
    return tmp_path_factory.mktemp("hvdlm-cache")


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """TINY_JOB as a file shared by the tests of one module (which train once and look at the runs many times)."""
    path = tmp_path_factory.mktemp("job") / "tiny.toml"
    path.write_text(TINY_JOB)
    return path


@pytest.fixture
def tiny_job(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_JOB)
    return path


@pytest.fixture
def hvdlm(cache_dir, tmp_path):
    """Run `python -m hvdlm ARGS` from the repository root; a `--run-dir` in ARGS is reported back."""

    def run(*args: str, timeout: float = 300) -> Result:
        env = {**os.environ, "HVDLM_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "hvdlm", *args],
            cwd=REPO,
            env=env,
            timeout=timeout,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        run_dir = Path(args[args.index("--run-dir") + 1]) if "--run-dir" in args else None
        return Result(proc.returncode, proc.stdout, run_dir)

    return run
