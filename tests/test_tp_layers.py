"""Every tensor-parallel piece against its unsharded reference, on real MPI ranks (tests/tp_checks.py), and the
communicators of a tp x dp grid (tests/tp_grid_checks.py)."""

import pytest
from helpers import checks_on_ranks

pytestmark = pytest.mark.distributed

# Each check the script must report, ok: its worst difference from the reference within tolerance.
test_sharded_matches_reference_on_two_ranks = checks_on_ranks(
    2,
    "tp_checks.py",
    [
        "collectives_allreduce_allgather_split_reduce_scatter_broadcast",
        "mappings_are_mirrored_pairs",
        "column_parallel_linear_matches_nn_linear",
        "row_parallel_linear_matches_nn_linear",
        "vocab_parallel_embedding_matches_nn_embedding",
        "vocab_parallel_cross_entropy_matches_f_cross_entropy",
        "gpt_shard_matches_the_unsharded_gpt",
    ],
)

# tp 2 x dp 2 on 4 ranks, Horovod initialised with the DP process sets.
test_tp2_x_dp2_grid_on_four_ranks = checks_on_ranks(
    4,
    "tp_grid_checks.py",
    [
        "grid_coordinates_and_process_sets",
        "tp_allreduce_stays_in_the_replica",
        "broadcast_within_each_dp_group_from_its_root",
        "distributed_optimizer_averages_over_the_dp_group",
        "jobwide_collectives_over_mpi",
    ],
)
