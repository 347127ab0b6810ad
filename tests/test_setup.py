"""The set-up script's failures: each says what failed and what to do, and exits non-zero.

The successful path is exercised by every `make test` (it runs the set-up first, and the other tests use it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
from helpers import REPO

from hvdlm.cache import cache_root

SETUP = REPO / "hvdlm" / "install" / "setup.sh"


def _bin_without_mpi(tmp_path: Path) -> Path:
    """A PATH with the shell tools the script needs, but no MPI, compiler or apt-get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "cat", "sha256sum", "cut", "mkdir", "id", "dirname", "python3", "env", "grep", "tail"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return bin_dir


def test_missing_mpi_stops_with_how_to_provide_it(tmp_path):
    env = {
        "PATH": str(_bin_without_mpi(tmp_path)),
        "HOME": str(tmp_path),
        "HVDLM_VENV": str(tmp_path / "venv"),
        "HVDLM_CACHE": str(tmp_path / "cache"),
    }
    proc = subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "FAILED: these are missing: openmpi-bin libopenmpi-dev" in proc.stderr
    assert "module load openmpi" in proc.stderr
    assert not (tmp_path / "venv").exists()  # stopped before touching anything


def _cached_horovod_sdist() -> Path | None:
    path = cache_root() / "src" / "horovod-0.28.1.tar.gz"
    return path if path.is_file() else None


@pytest.mark.skipif(
    _cached_horovod_sdist() is None,
    reason="no Horovod source distribution in the set-up cache to break (this set-up used a prebuilt wheel)",
)
def test_failed_horovod_build_shows_the_error_and_what_to_do(tmp_path):
    # A source distribution whose build fails, in a cache of its own.
    unpacked = tmp_path / "unpacked"
    with tarfile.open(_cached_horovod_sdist()) as tar:
        tar.extractall(unpacked, filter="data")
    source = unpacked / "horovod-0.28.1"
    (source / "setup.py").write_text("import sys\nsys.exit('error: simulated compiler failure in horovod_torch.cc')\n")
    (tmp_path / "cache" / "src").mkdir(parents=True)
    with tarfile.open(tmp_path / "cache" / "src" / "horovod-0.28.1.tar.gz", "w:gz") as tar:
        tar.add(source, arcname="horovod-0.28.1")
    # A fresh venv that sees this environment's torch (and the rest) through a .pth file, without Horovod's key.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {**os.environ, "HVDLM_VENV": str(venv), "HVDLM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "FAILED: the Horovod build failed" in proc.stderr
    assert "simulated compiler failure" in proc.stderr  # the tail of the build log is shown
    assert "then 'make' again" in proc.stderr
    assert not list((tmp_path / "cache" / "wheels").glob("*/*.whl"))  # nothing broken was cached


def test_offline_without_a_horovod_source_says_where_to_put_it(tmp_path):
    # Offline (HVDLM_OFFLINE=1, a machine without a network), nothing may be fetched: a missing source
    # distribution stops the set-up with the knob that supplies it, before any build.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {
        **os.environ,
        "HVDLM_VENV": str(venv),
        "HVDLM_CACHE": str(tmp_path / "cache"),
        "HVDLM_OFFLINE": "1",
        "HVDLM_WHEELHOUSE": str(tmp_path / "carried"),
    }
    proc = subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "FAILED: offline (HVDLM_OFFLINE=1) and no Horovod source distribution" in proc.stderr
    assert "HVDLM_HOROVOD_SDIST" in proc.stderr and "bench/gpu_carry.sh" in proc.stderr
    assert "downloading" not in proc.stdout
