"""Tensor parallelism in bf16 on CPU ranks (MPI cannot sum bf16: the collectives sum it in fp32).

Layer level (tests/tp_bf16_checks.py on 2 real MPI ranks): the collectives are exact, and a TP=2 GPT under bf16
autocast is as close to TP=1 in bf16 as bf16 rounding allows. Training level: `hvdlm train` with tp=2 in bf16
follows the 1-rank bf16 run step by step, as `hvdlm launch ... --set parallel.tp=2 --set train.precision=bf16`
would run it (it ended in a traceback before).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import checks_on_ranks, hvdlm_argv, mpirun
from helpers import sets as set_args

pytestmark = pytest.mark.distributed

STEPS = 10

# Errors are what is over the bound: ok at 0.
test_bf16_tensor_parallel_pieces_on_two_ranks = checks_on_ranks(
    2, "tp_bf16_checks.py", ["collectives_in_16_bit_floats_are_exact", "gpt_tp_in_bf16_tracks_tp1_in_bf16"]
)


def _losses(np: int, tp: int, job: Path, run_dir: Path, cache: Path) -> list[float]:
    sets = [
        f"parallel.tp={tp}",
        "train.precision=bf16",
        f"train.max_steps={STEPS}",
        "train.eval_interval=0",
        "train.sample_tokens=0",
        "train.log_interval=1",
        "train.tensorboard=false",
    ]
    argv = hvdlm_argv("train", str(job), "--run-dir", str(run_dir), *set_args(*sets))
    proc = mpirun(np, argv, cache=cache, timeout=300)
    assert proc.code == 0, f"tp={tp} bf16:\n{proc.out[-4000:]}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def test_tp2_in_bf16_trains_like_one_rank_in_bf16(job, tmp_path, cache_dir):
    one = _losses(1, 1, job, tmp_path / "one", cache_dir)
    tp2 = _losses(2, 2, job, tmp_path / "tp2", cache_dir)
    assert len(one) == len(tp2) == STEPS
    # bf16 rounds to 8 significant bits; sharded matmuls round at other places, and the paths drift apart a
    # little over the steps. 2e-2 is far above that noise and far below what a wrong sum would do.
    worst = max(abs(a - b) / abs(a) for a, b in zip(one, tp2))
    assert worst < 2e-2, f"tp=2 bf16 vs 1 rank bf16, worst relative loss difference {worst:.3g}:\n{one}\n{tp2}"
    assert tp2[-1] < tp2[0]  # and it learns
