"""The peer for bench/dp_scaling.py: the same training step as hvdlm's, with PyTorch DistributedDataParallel.

On GPUs: one GPU per rank (LOCAL_RANK) and NCCL, hvdlm's GPU setting; on CPUs: gloo, as before.

Same model, data, sampler, optimizer, clipping and timing as hvdlm.training.trainer; only the gradient averaging
differs.
Started by `python -m torch.distributed.run --nproc_per_node N bench/ddp_baseline.py JOB.toml --set ...`.
Prints one JSON line with tokens/s on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from hvdlm.config import load_config
from hvdlm.data import open_dataset
from hvdlm.data.corpus import ensure_dataset, model_vocab_size
from hvdlm.data.sampler import WindowSampler
from hvdlm.model import GPT
from hvdlm.optim.schedule import lr_at
from hvdlm.optim.torch_optimizers import make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the timing")
    args = parser.parse_args()
    cfg = load_config(args.job, args.overrides)
    t = cfg.train

    # One GPU per rank and NCCL where there are GPUs (torchrun sets LOCAL_RANK); gloo on CPU ranks.
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(t.threads or int(os.environ.get("OMP_NUM_THREADS", "1")))
    if rank == 0:
        ensure_dataset(cfg.data)
    dist.barrier()
    data = open_dataset(ensure_dataset(cfg.data))
    cfg.model.vocab_size = model_vocab_size(cfg.model.vocab_size, data.vocab_size)
    batches = WindowSampler(data.train, cfg.model.seq_len, t.batch_size, rank, world, t.seed)
    torch.manual_seed(t.seed)
    model = GPT(cfg.model).to(device)
    # DDP broadcasts rank 0's weights at construction.
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model.module, t)

    tokens_per_step = t.batch_size * cfg.model.seq_len * world
    for step in range(t.max_steps):
        if step == args.warmup_steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, t)
        x, y = batches.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()  # DDP averages gradients in buckets, overlapped with the backward pass
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run ahead of the host: time their end, not their launch
    elapsed = time.perf_counter() - start
    timed = t.max_steps - args.warmup_steps
    if rank == 0:
        print(json.dumps({"tokens_per_s": tokens_per_step * timed / elapsed, "ms_per_step": 1000 * elapsed / timed}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
