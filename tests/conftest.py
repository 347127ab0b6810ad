"""Shared fixtures: the session's corpus cache, a tiny job file, and `hvdlm` (the real CLI in a subprocess).

What they are built from (and what tests import) is in helpers.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from helpers import TINY_JOB, Result, rank_check_rows, reported, run_cli


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
def full_disk_rename(monkeypatch) -> None:
    """os.replace fails as on a full disk (ENOSPC) for the test: an atomic write cannot put its file in place."""

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)


@pytest.fixture
def hvdlm(cache_dir):
    """Run `python -m hvdlm ARGS` from the repository root with the session's corpus cache; a `--run-dir` in ARGS
    is reported back."""

    def run(*args: str, timeout: float = 300) -> Result:
        return run_cli(*args, cache=cache_dir, timeout=timeout)

    return run


@pytest.fixture(scope="module")
def check_row():
    """check_row(np, script, name): the row of check `name` of `script` run on np MPI ranks (see
    helpers.rank_check_rows); each script runs once for the module, and a run that failed fails every test."""
    runs: dict[tuple[int, str], dict | Exception] = {}

    def row(np: int, script: Path, name: str) -> dict:
        key = (np, str(script))
        if key not in runs:
            try:
                runs[key] = rank_check_rows(np, script)
            except Exception as e:  # a timeout: not again for every check
                runs[key] = e
        if isinstance(runs[key], Exception):
            raise runs[key]
        return reported(runs[key], name)

    return row
