"""Run under `mpirun -np 4`: the communicators of a tp 2 x dp 2 grid, with Horovod initialised as training does.

Rank 0 prints one JSON line per check: {"check", "ok", "detail"}. tests/test_tp_layers.py starts this.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import horovod.torch as hvd
import torch
from mpi4py import MPI

from hvdlm.config import JobConfig, ModelConfig, TrainConfig
from hvdlm.model import GPT
from hvdlm.optim.build import build as build_optimizer
from hvdlm.optim.replicated import broadcast_initial_state
from hvdlm.optim.torch_optimizers import make_optimizer
from hvdlm.parallel import collectives
from hvdlm.parallel.topology import init_topology

world = MPI.COMM_WORLD
rank = world.Get_rank()


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def report(name: str, ok: bool, detail) -> None:
    ok = world.allreduce(ok, op=MPI.LAND)
    details = world.gather(detail, root=0)
    if rank == 0:
        print(json.dumps({"check": name, "ok": ok, "detail": details}), flush=True)


def main() -> int:
    topo = init_topology(2, quiet_alone=True)  # dp = 2: Horovod's cycle stays
    assert world.Get_size() == 4, "run with 4 ranks"

    # Coordinates: TP ranks adjacent, DP groups {0, 2} and {1, 3}.
    want = {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1)}[rank]
    ps = topo.dp_process_set
    report(
        "grid_coordinates_and_process_sets",
        (topo.tp_rank, topo.dp_rank) == want
        and ps.ranks == [want[0], want[0] + 2]
        and ps.size() == 2
        and topo.tp_group.comm.Get_size() == 2
        and topo.dp_group.comm.Get_size() == 2,
        {"tp_rank": topo.tp_rank, "dp_rank": topo.dp_rank, "dp_set": ps.ranks},
    )

    # The TP communicator sums inside a replica only: {0, 1} and {2, 3}.
    s = collectives.allreduce(torch.tensor([float(rank)]), topo.tp_group).item()
    report("tp_allreduce_stays_in_the_replica", s == (1.0 if rank < 2 else 5.0), s)

    # Each rank starts from different weights and optimizer moments; the broadcast gives every rank those of its
    # DP group's root (ranks 0 and 1), and leaves the two shards of a replica different.
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=8, seq_len=4)
    torch.manual_seed(100 + rank)
    model = GPT(cfg, topo.tp_group)
    opt = make_optimizer(model, TrainConfig())
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.1 * (rank + 1))
    opt.step()
    before = digest(model), opt.state_dict()["state"][0]["exp_avg"].clone()
    broadcast_initial_state(model, opt, topo)
    after = digest(model), opt.state_dict()["state"][0]["exp_avg"]
    digests = world.allgather(after[0])
    roots = world.allgather(before[0])
    moments = world.allgather(after[1])
    ok = digests[rank] == roots[topo.dp_root] and digests[0] != digests[1]
    ok = ok and torch.equal(moments[rank], moments[topo.dp_root]) and not torch.equal(moments[0], moments[1])
    report("broadcast_within_each_dp_group_from_its_root", ok, {"after": digests, "roots_before": roots})

    # Horovod: the DistributedOptimizer averages over the DP process set only: (0 + 2) / 2 and (1 + 3) / 2.
    torch.manual_seed(7)
    model = GPT(cfg, topo.tp_group)
    opt = build_optimizer(model, JobConfig(), topo)
    sum(p.sum() * float(rank) for p in model.parameters()).backward()  # every gradient entry = the rank
    opt.reduce_gradients()
    grads = {p.grad.flatten()[0].item() for p in model.parameters()}
    report("distributed_optimizer_averages_over_the_dp_group", grads == {1.0 if rank % 2 == 0 else 2.0}, sorted(grads))

    # The job-wide collectives (agreements, the stop vote, the logged means) over MPI, on every rank of the grid;
    # Horovod's cycle left as the launch set it, since the DP groups average their gradients through it.
    from hvdlm.parallel import jobwide

    vote = torch.tensor([rank * 10], dtype=torch.int32)
    pending = jobwide.PendingMax(vote, "vote")
    found = {
        "over_mpi": jobwide._world is not None,
        "gathered": jobwide.allgather_object(f"r{rank}", "gather"),
        "broadcast": jobwide.broadcast_object({"from": rank}, 2, "bcast"),
        "mean": jobwide.mean(torch.tensor(float(rank)), "mean"),
        "vote": pending.wait(),
        "cycle": os.environ.get("HOROVOD_CYCLE_TIME"),
    }
    want = {"over_mpi": True, "gathered": ["r0", "r1", "r2", "r3"], "broadcast": {"from": 2}, "mean": 1.5}
    report("jobwide_collectives_over_mpi", found == {**want, "vote": 30, "cycle": "5"}, found)

    hvd.allgather_object(None, name="done")  # Horovod: nobody shuts down while others still communicate
    return 0


if __name__ == "__main__":
    sys.exit(main())
