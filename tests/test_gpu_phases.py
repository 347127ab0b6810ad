"""bench/gpu_check.sh's phases share, multigpu, large and fp8 (bench/gpu_phases.py) and the Horovod wheel cache
(bench/wheel_cache.py), on this CPU machine: what they compare, and each phase's driver end to end through
`gpu_check.sh --cpu-dry` (CPU ranks, tiny shapes, real `hvdlm launch` runs), so that the first GPU lent runs
checked logic. What only a GPU can show (ranks sharing a GPU, NCCL between GPUs, the large shape's speed and
memory, FP8) is what the phases measure there.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_phases  # noqa: E402
import wheel_cache  # noqa: E402

# --- what the phases compare (pure) -----------------------------------------------------------------------------


def test_losses_compared_step_by_step():
    assert gpu_phases.worst_relative([4.0, 2.0], [4.0, 2.002]) == pytest.approx(1e-3)
    assert gpu_phases.worst_relative([4.0, 2.0], [4.0]) == float("inf")  # a run that logged fewer steps
    ok = gpu_phases.compare_losses("tp2", [4.0, 3.0], [4.0, 3.00002], 1e-5)
    assert ok.ok and "1.00e-05" in ok.detail
    assert not gpu_phases.compare_losses("tp2", [4.0, 3.0], [4.0, 3.01], 1e-3).ok
    unlearned = gpu_phases.compare_losses("tp2", [4.0, 4.1], [4.0, 4.1], 1e-3)
    assert not unlearned.ok and "did not learn" in unlearned.detail


def test_bf16_tolerance_is_twice_the_bf16_distance_plus_eight_units():
    fp32, bf16 = [5.0, 4.0, 3.0], [5.0, 4.004, 3.0]
    assert gpu_phases.bf16_tolerance(bf16, fp32) == pytest.approx(2 * 1e-3 + 8 * 2**-9)


def test_bus_bandwidth_is_the_nccl_tests_formula():
    algbw, busbw = gpu_phases.bus_bandwidth(256 * 10**6, 0.01, 8)
    assert algbw == pytest.approx(25.6) and busbw == pytest.approx(25.6 * 2 * 7 / 8)
    assert gpu_phases.bus_bandwidth(10**9, 1.0, 2) == (1.0, 1.0)


def test_multigpu_skips_one_gpu_with_its_reason():
    assert "1 GPU(s)" in gpu_phases.multigpu_skip_reason("cuda", 1)
    assert gpu_phases.multigpu_skip_reason("cuda", 2) is None
    assert gpu_phases.multigpu_skip_reason("cpu", 0) is None  # --tiny: CPU ranks run the logic


def test_multigpu_runs_what_is_asked_with_its_references():
    plan = {
        "one_fp32": (1, [], None, 0.0),
        "one_bf16": (1, [], None, 0.0),
        "dp2_fp32": (2, [], "one_fp32", 1e-5),
        "dp2_bf16": (2, [], "one_bf16", None),
        "zero1_fp32": (2, [], "dp2_fp32", 1e-6),
    }
    assert gpu_phases.wanted(plan, set()) == set(plan)
    assert gpu_phases.wanted(plan, {"zero1_fp32"}) == {"zero1_fp32", "dp2_fp32", "one_fp32"}
    assert gpu_phases.wanted(plan, {"dp2_bf16"}) == {"dp2_bf16", "one_bf16", "one_fp32"}  # the noise needs both


def test_large_targets_judged_on_gpus_only():
    hvdlm = {"tokens_per_s": 90.0, "mfu": 0.40, "memory_mb": 1100.0}
    plain = {"tokens_per_s": 100.0, "max_memory_GiB": 1.0}
    judged = {c.name: c for c in gpu_phases.large_checks(hvdlm, plain, judged=True)}
    assert [c.ok for c in judged.values()] == [False, False, False]  # 0.90 < 0.95, 40 % < 45 %, 1.074 > 1.05
    assert "0.900" in judged["tokens/s hvdlm / plain"].detail and "1.074" in judged["peak memory hvdlm / plain"].detail
    assert all(c.ok for c in gpu_phases.large_checks(hvdlm, plain, judged=False))
    good = {"tokens_per_s": 96.0, "mfu": 0.46, "memory_mb": 1070.0}
    assert all(c.ok for c in gpu_phases.large_checks(good, plain, judged=True))


# --- the wheel cache ---------------------------------------------------------------------------------------------

KEY = "horovod-0.28.1-torch2.11.0+cu130-py3.12-cuda13.0-nccl-sm90-1a2b3c4d"


def test_a_wheel_built_on_a_lend_comes_back_in_parts_and_is_used_next_time(tmp_path):
    carried, cache, out = tmp_path / "gpu_wheels", tmp_path / "setup-cache", tmp_path / "out"
    wheel = cache / "wheels" / KEY / "horovod-0.28.1-cp312-cp312-linux_x86_64.whl"
    wheel.parent.mkdir(parents=True)
    data = os.urandom(40_000)
    wheel.write_bytes(data)
    # The lend built it: it leaves the machine as parts small enough for the device tool, names it can carry.
    assert wheel_cache.export(carried, cache, out, part_bytes=16_384) == KEY
    names = sorted(p.name for p in (out / "wheel").iterdir())
    assert names == ["key.json", "part-00", "part-01", "part-02"]
    assert all(p.stat().st_size <= 16_384 for p in (out / "wheel").iterdir())
    # Kept here, checked, filed under its key.
    kept = wheel_cache.keep(out, carried)
    assert kept == carried / KEY / wheel.name and kept.read_bytes() == data
    # The next lend: seeded into setup.sh's cache, where setup.sh looks it up by the key; nothing new to export.
    fresh = tmp_path / "next-cache"
    assert wheel_cache.seed(carried, fresh) == [KEY]
    assert hashlib.sha256((fresh / "wheels" / KEY / wheel.name).read_bytes()).digest() == hashlib.sha256(data).digest()
    assert wheel_cache.export(carried, fresh, tmp_path / "out2") is None


def test_parts_that_do_not_make_the_wheel_are_refused(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    wheel = cache / "wheels" / KEY / "horovod-0.28.1-cp312-cp312-linux_x86_64.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(os.urandom(1000))
    wheel_cache.export(tmp_path / "none", cache, out, part_bytes=600)
    (out / "wheel" / "part-01").write_bytes(b"x" * 400)
    with pytest.raises(SystemExit, match="sha256"):
        wheel_cache.keep(out, tmp_path / "carried")
    assert not (tmp_path / "carried").exists()


# --- the phases, end to end on CPU ranks ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, cache_dir) -> tuple[Path, Path, str]:
    """gpu_check.sh --cpu-dry with the four phases (multigpu: DP=2 and the allreduce only, the one-rank run taken
    from share's), once for the module: its $OUT, the phases' work folder, and its output."""
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "HVDLM_VENV": sys.prefix,
        "HVDLM_CACHE": str(cache_dir),
        "GPU_CHECK_PHASES": "share multigpu large fp8",
        "GPU_CHECK_MULTIGPU_ONLY": "dp2_fp32,allreduce",
        "GPU_CHECK_BUDGET_S": "1200",
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu-dry"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
    )
    return out, Path(f"{out}.work") / "phases", proc.stdout + proc.stderr


def phase_json(work: Path, name: str) -> dict:
    return json.loads((work / f"{name}.json").read_text())


@pytest.mark.distributed
def test_every_phase_passes_on_cpu_ranks(dry_run):
    out, _, text = dry_run
    summary = (out / "summary.md").read_text()
    for name in ("share", "multigpu", "large", "fp8"):
        assert f"| {name} | PASS |" in summary, text[-3000:]
    assert "| setup | SKIPPED |" in summary and "| hvdlm_gpt2 | SKIPPED |" in summary  # asked for by name only


@pytest.mark.distributed
def test_share_compares_tp_and_pp_with_one_rank_and_counts_their_bytes(dry_run):
    _, work, _ = dry_run
    share = phase_json(work, "share")
    assert share["checks"] == {
        "tp2 losses vs one rank (bf16)": True,
        "tp2 tp_bytes_per_step": True,
        "tp2 pp_bytes_per_step": True,
        "pp2 losses vs one rank (bf16)": True,
        "pp2 pp_bytes_per_step": True,
    }
    assert share["tp2"]["measured"]["tp_bytes_per_step"] > 0 and share["pp2"]["measured"]["pp_bytes_per_step"] > 0
    assert share["path"].startswith("cpu-mpi")  # CPU tensors; on a GPU: cuda-host or cuda-mpi, printed
    assert 8 * 2**-9 <= share["bf16_tolerance"] < 0.05


@pytest.mark.distributed
def test_multigpu_reuses_the_one_rank_run_and_measures_the_allreduce(dry_run):
    out, work, _ = dry_run
    multigpu = phase_json(work, "multigpu")
    assert multigpu["checks"] == {"dp2_fp32 vs one_fp32": True, "allreduce bandwidth": True}
    assert [row["mb"] for row in multigpu["allreduce"]] == [1, 16]
    assert all(row["busbw"] == pytest.approx(row["algbw"]) for row in multigpu["allreduce"])  # 2 ranks: 2(n-1)/n = 1
    with tarfile.open(out / "logs.tar.gz") as logs:
        log = logs.extractfile("logs/multigpu.log").read().decode()
    assert "one_fp32: taken from an earlier phase's run" in log  # share's: no device time spent twice


@pytest.mark.distributed
def test_large_reports_hvdlm_against_the_plain_loop_and_fp8_its_refusal(dry_run):
    _, work, _ = dry_run
    large = phase_json(work, "large")
    assert large["hvdlm"]["tokens_per_s"] > 0 and large["plain"]["tokens_per_s"] > 0
    assert large["hvdlm"]["steps"] == 6
    assert large["hvdlm"]["account_mb"]["params_mb"] > 0  # hvdlm's memory account beside its peak
    fp8 = phase_json(work, "fp8")
    assert "CPUs have no FP8" in fp8["skipped"]
