"""Shared fixtures: the session's corpus cache, a tiny job file, and `hvdlm` (the real CLI in a subprocess).

What they are built from (and what tests import) is in helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_JOB, Result, run_cli


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
def hvdlm(cache_dir):
    """Run `python -m hvdlm ARGS` from the repository root with the session's corpus cache; a `--run-dir` in ARGS
    is reported back."""

    def run(*args: str, timeout: float = 300) -> Result:
        return run_cli(*args, cache=cache_dir, timeout=timeout)

    return run
