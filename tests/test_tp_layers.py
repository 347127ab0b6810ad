"""Every tensor-parallel piece against its unsharded reference, on real MPI ranks (tests/tp_checks.py)."""

import json
import sys
from pathlib import Path

import pytest
from helpers import mpirun

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("tp_checks.py")
CHECKS = [
    "collectives_allreduce_allgather_split_reduce_scatter_broadcast",
    "mappings_are_mirrored_pairs",
    "column_parallel_linear_matches_nn_linear",
    "row_parallel_linear_matches_nn_linear",
    "vocab_parallel_embedding_matches_nn_embedding",
    "vocab_parallel_cross_entropy_matches_f_cross_entropy",
    "gpt_shard_matches_the_unsharded_gpt",
]


def run_checks(ranks: int, script: Path) -> dict[str, dict]:
    """One run of every check in `script` on `ranks` MPI ranks; rank 0 reports a JSON line per check."""
    proc = mpirun(ranks, [sys.executable, str(script)], timeout=240)
    rows = [json.loads(line) for line in proc.out.splitlines() if line.startswith('{"check"')]
    return {"_output": proc.out, **{row["check"]: row for row in rows}}


def reported(results: dict[str, dict], name: str) -> dict:
    """The row of check `name`, which must have reported."""
    assert name in results, f"check {name} did not report:\n{results['_output'][-3000:]}"
    return results[name]


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return run_checks(2, SCRIPT)


@pytest.mark.parametrize("name", CHECKS)
def test_sharded_matches_reference_on_two_ranks(results, name):
    row = reported(results, name)
    assert row["ok"], f"{name}: worst difference {row['error']} at {row['worst']}\n{row['detail']}"


GRID_SCRIPT = Path(__file__).with_name("tp_grid_checks.py")
GRID_CHECKS = [
    "grid_coordinates_and_process_sets",
    "tp_allreduce_stays_in_the_replica",
    "broadcast_within_each_dp_group_from_its_root",
    "distributed_optimizer_averages_over_the_dp_group",
]


@pytest.fixture(scope="module")
def grid_results() -> dict[str, dict]:
    """tp 2 x dp 2 on 4 ranks, Horovod initialised with the DP process sets."""
    return run_checks(4, GRID_SCRIPT)


@pytest.mark.parametrize("name", GRID_CHECKS)
def test_tp2_x_dp2_grid_on_four_ranks(grid_results, name):
    row = reported(grid_results, name)
    assert row["ok"], f"{name}: {row['detail']}"
