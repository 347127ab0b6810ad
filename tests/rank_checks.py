"""What the scripts run under `mpirun -np P` share (tests/tp_checks.py, tests/tp_bf16_checks.py): one TP group of
all P ranks, the `@check` registry, seeded random tensors, and the runner that reports each check.

A check returns its errors {what: error}, or (errors, detail) to say more; the runner takes the worst error over
all ranks, and rank 0 prints one JSON line per check: {"check", "ok", "error", "worst", "detail"}. A check that
raises fails with its traceback as detail, and the other checks still run. The scripts are started as
`python tests/X.py`, so this directory is on sys.path.
"""

from __future__ import annotations

import json
import math
import traceback
from collections.abc import Callable

import torch
from mpi4py import MPI

from hvdlm.config import ModelConfig
from hvdlm.model import GPT
from hvdlm.parallel.topology import GridPosition, Group, make_tp_group

world = MPI.COMM_WORLD
G: Group = make_tp_group(GridPosition(world.Get_rank(), world.Get_size(), world.Get_size()), world)
P, R = G.size, G.rank
CHECKS: dict[str, Callable] = {}


def check(fn: Callable) -> Callable:
    """Register `fn` as a check, run in the order of registration."""
    CHECKS[fn.__name__] = fn
    return fn


def rnd(*shape, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same standard-normal tensor on every rank, for the same seed."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def gpt_and_its_shard(cfg: ModelConfig, seed: int, batch: int) -> tuple[GPT, GPT, torch.Tensor, torch.Tensor]:
    """The unsharded GPT and this rank's TP shard of it (the same weights: both from `seed`), and a batch of inputs
    and targets, the same on every rank."""
    torch.manual_seed(seed)
    ref = GPT(cfg)
    torch.manual_seed(seed)
    par = GPT(cfg, G)
    shape = (batch, cfg.seq_len)
    idx = torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed + 1))
    tgt = torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed + 2))
    return ref, par, idx, tgt


def run_checks(tol: float) -> int:
    """Every registered check; a check is ok when its worst error over all ranks is at most `tol`. The exit
    status: 1 if any check failed."""
    failed = 0
    for name, fn in CHECKS.items():
        try:
            result = fn()
            errs, detail = result if isinstance(result, tuple) else (result, "")
            worst = max(errs.values())
            worst_key = max(errs, key=errs.get)
        except Exception:  # report it as a failed check; the other checks still run
            worst, worst_key, detail = math.inf, "exception", traceback.format_exc()
        worst = world.allreduce(worst, op=MPI.MAX)
        ok = worst <= tol
        failed += not ok
        if world.Get_rank() == 0:
            row = {"check": name, "ok": ok, "error": worst, "worst": worst_key, "detail": detail}
            print(json.dumps(row), flush=True)
    return 1 if failed else 0
