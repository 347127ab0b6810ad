"""One rank's training program: `hvdlm train JOB.toml`, started once per device by a launcher.

The ranks form a tp x dp grid (hvdlm.topology). Each TP group of tp adjacent ranks holds one model replica in
shards, and its collectives (mpi4py) run inside the layers. Data parallelism with Horovod: every replica trains
on its own slice of each global batch, and Horovod's ring allreduce averages the gradients within each DP group
(the ranks holding the same shard), so all replicas take the same step and stay identical. tp = 1 is plain data
parallelism.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import horovod.torch as hvd
import torch

from hvdlm.checkpoint import checkpoint_path, load_full_state, load_model, save_checkpoint, training_state
from hvdlm.config import JobConfig, default_run_dir
from hvdlm.data import Dataset, open_dataset
from hvdlm.data.corpus import dataset_dir, ensure_dataset, model_vocab_size
from hvdlm.data.sampler import WindowSampler
from hvdlm.errors import InputError
from hvdlm.metrics import RunLogger
from hvdlm.model import GPT
from hvdlm.optim import clip_grad_norm, distributed_optimizer, lr_at
from hvdlm.topology import Topology, dp_group_ranks, init_topology


def train(cfg: JobConfig, job_name: str, run_dir: str | None) -> Path:
    """Train to cfg.train.max_steps; returns the run directory."""
    # Horovod: one process per device; rank / size span the whole job, local_rank the node. init_topology calls
    # hvd.init, with the DP groups as process sets when tp > 1.
    topo = init_topology(cfg.parallel.tp)
    dp_rank, dp_size = topo.dp_rank, topo.dp  # all TP ranks of a replica see the same samples
    device = _pick_device()
    torch.set_num_threads(cfg.train.threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    rank0 = hvd.rank() == 0
    t = cfg.train
    data = _load_dataset(cfg)
    # The model's vocabulary is the dataset tokenizer's; resolved before config.toml is written, so it records it.
    cfg.model.vocab_size = model_vocab_size(cfg.model.vocab_size, data.vocab_size)
    train_batches = WindowSampler(data.train, cfg.model.seq_len, t.batch_size, dp_rank, dp_size, t.seed)
    val_batches = WindowSampler(data.val, cfg.model.seq_len, t.batch_size, dp_rank, dp_size, t.seed)

    # Every rank seeds alike: a TP rank builds the full tensors and keeps its slice (layout-independent init).
    torch.manual_seed(t.seed)
    model = GPT(cfg.model, topo.tp_group)
    if t.init_from:  # before the run directory exists: a bad checkpoint leaves nothing behind
        load_model(model, load_full_state(t.init_from), t.init_from, topo.tp_rank, topo.tp)
    model = model.to(device)
    out = _agree_on_run_dir(run_dir, job_name, cfg)
    log = RunLogger(out, t.max_steps, enabled=rank0)
    # Horovod: replicas start from their DP group's root state; gradients are averaged over the DP group.
    optimizer = distributed_optimizer(model, t, topo)
    # Dropout draws from here on: one stream per replica, shared by its TP ranks, whose replicated activations
    # must be dropped alike (replicas would otherwise all drop the same units of different samples).
    torch.manual_seed(t.seed + 1 + dp_rank)

    tokens_per_step = t.batch_size * cfg.model.seq_len * dp_size
    log.info(
        f"hvdlm: {hvd.size()} rank(s) (tp {topo.tp} x dp {topo.dp}) x {torch.get_num_threads()} thread(s) on "
        f"{device.type}, {model.num_params() / 1e6:.2f}M parameters, {tokens_per_step} tokens per step, "
        f"data {len(data.train) / 1e6:.1f}M train / {len(data.val) / 1e6:.1f}M val {data.tokenizer.kind} tokens "
        f"({train_batches.samples_per_epoch:,} windows per epoch) from {data.path}"
    )
    log.info(f"run directory: {out}")

    first_val = final_val = None
    if t.eval_interval:
        first_val = final_val = _evaluate(model, val_batches, t.eval_batches, device)
        log.info(f"step {0:>6} | val loss {first_val:.4f}")
        log.record({"step": 0, "val_loss": first_val})

    interval_start, interval_steps = time.perf_counter(), 0
    for step in range(t.max_steps):
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr

        x, y = (b.to(device, non_blocking=True) for b in train_batches.next_batch())
        model.train()
        _, loss = model(x, y)
        optimizer.zero_grad()  # Horovod: its zero_grad takes no arguments; torch sets grads to None
        loss.backward()
        # Horovod: finish the gradient allreduce before clipping, so the norm is that of the averaged gradient,
        # then step without a second synchronisation.
        optimizer.synchronize()
        grad_norm = clip_grad_norm(list(model.parameters()), t.grad_clip or float("inf"), topo.tp_group)
        with optimizer.skip_synchronize():
            optimizer.step()
        interval_steps += 1
        done = step + 1

        if done % t.log_interval == 0 or done == t.max_steps:
            # Horovod: the logged loss is the mean over ranks, i.e. the loss of the global batch.
            mean_loss = hvd.allreduce(loss.detach(), op=hvd.Average, name="train_loss").item()
            elapsed = time.perf_counter() - interval_start
            row = {
                "step": done, "loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_step * interval_steps / elapsed,
                "ms_per_step": 1000 * elapsed / interval_steps,
            }  # fmt: skip
            log.record(row)
            log.info(
                f"step {done:>6} | loss {mean_loss:.4f} | lr {lr:.2e} | {row['tokens_per_s']:>9,.0f} tok/s"
                f" | {row['ms_per_step']:7.1f} ms/step"
            )
            interval_start, interval_steps = time.perf_counter(), 0
        log.advance(1, loss.item() if log.enabled else None)

        is_last = done == t.max_steps
        if t.eval_interval and (done % t.eval_interval == 0 or is_last):
            final_val = _evaluate(model, val_batches, t.eval_batches, device)
            log.info(f"step {done:>6} | val loss {final_val:.4f}")
            log.record({"step": done, "val_loss": final_val})
            interval_start, interval_steps = time.perf_counter(), 0  # evaluation is not training throughput
        if t.checkpoint_interval and done % t.checkpoint_interval == 0 and not is_last and dp_rank == 0:
            _save(model, optimizer, done, cfg, out, topo, train_batches)  # the first replica's TP ranks: a shard each

    log.close()
    _finish(model, optimizer, cfg, out, first_val, final_val, device, topo, train_batches, data)
    return out


def _finish(
    model: GPT, optimizer, cfg: JobConfig, out: Path, first_val, final_val, device, topo: Topology,
    batches: WindowSampler, data: Dataset,
) -> None:  # fmt: skip
    """Check the replicas agree, write the final checkpoint and summary.json, and report on rank 0."""
    t = cfg.train
    # Horovod: gather every rank's parameter digest (index = global rank). Data parallelism must leave the
    # members of each DP group (the copies of one shard) bit-identical.
    checksums = hvd.allgather_object(_param_checksum(model))
    identical = all(
        len({checksums[r] for r in dp_group_ranks(tp_rank, len(checksums), topo.tp)}) == 1 for tp_rank in range(topo.tp)
    )
    paths = [checkpoint_path(out, t.max_steps, r, topo.tp) for r in range(topo.tp)]
    if topo.dp_rank == 0:
        _save(model, optimizer, t.max_steps, cfg, out, topo, batches)
    # The first replica's TP ranks sample together (their layers talk), so they all generate; rank 0 prints.
    sample = None
    if t.sample_tokens and topo.dp_rank == 0:
        sample = _sample(model, data.tokenizer, t.sample_tokens, t.seed, device)
    hvd.allgather_object(None, name="checkpoints_written")  # Horovod: a barrier, so every shard is on disk
    if hvd.rank() == 0:
        summary = {
            "steps": t.max_steps, "ranks": hvd.size(), "tp": topo.tp, "dp": topo.dp, "first_val_loss": first_val,
            "final_val_loss": final_val, "replica_checksums": checksums, "replicas_identical": identical,
            "checkpoint": str(paths[0]), "checkpoint_shards": [str(p) for p in paths],
        }  # fmt: skip
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if not identical:
            print(f"WARNING: the replicas diverged: parameter checksums by rank {checksums}", flush=True)
        if first_val is not None:
            print(f"validation loss: {first_val:.4f} at start -> {final_val:.4f} after {t.max_steps} steps")
        if sample is not None:
            print("sample:\n" + sample)
        print(f"checkpoint: {paths[0]}" + (f" (and {len(paths) - 1} more TP shard(s))" if len(paths) > 1 else ""))
        print(f"run directory: {out}", flush=True)


def _pick_device() -> torch.device:
    if torch.cuda.is_available():
        # Horovod: one GPU per rank, chosen by the rank's index on its node.
        torch.cuda.set_device(hvd.local_rank())
        return torch.device("cuda", hvd.local_rank())
    return torch.device("cpu")


def _load_dataset(cfg: JobConfig) -> Dataset:
    """One rank per node prepares the built-in corpus on first use (atomically, so nodes sharing a file system
    cannot collide); every rank waits for all of them, then memory-maps the dataset."""
    error = None
    if hvd.local_rank() == 0:
        try:
            ensure_dataset(cfg.data, log=print if hvd.rank() == 0 else (lambda message: None))
        except InputError as e:
            error = str(e)
    # Horovod: gathering every rank's outcome is the barrier, and tells every rank about a failure on any node.
    errors = [e for e in hvd.allgather_object(error, name="data_ready") if e]
    if errors:
        raise InputError(errors[0])
    return open_dataset(dataset_dir(cfg.data))


def _agree_on_run_dir(requested: str | None, job_name: str, cfg: JobConfig) -> Path:
    """Rank 0 picks (or checks) the run directory and writes config.toml; every rank gets its answer."""
    answer: dict = {}
    if hvd.rank() == 0:
        path = Path(requested or default_run_dir(job_name)).resolve()
        if (path / "metrics.jsonl").exists():
            answer["error"] = (
                f"run directory '{path}' already holds a run (metrics.jsonl). Pass a new --run-dir, or remove the "
                "old run if you no longer need it; hvdlm never writes over a run."
            )
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.toml").write_text(cfg.to_toml())
        answer["path"] = str(path)
    # Horovod: a broadcast doubles as the barrier that keeps other ranks from racing ahead of the check.
    answer = hvd.broadcast_object(answer, root_rank=0, name="run_dir")
    if "error" in answer:
        raise InputError(answer["error"])
    return Path(answer["path"])


@torch.no_grad()
def _evaluate(model: GPT, batches: WindowSampler, n_batches: int, device: torch.device) -> float:
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(n_batches):
        x, y = (b.to(device) for b in batches.eval_batch(i))
        total += model(x, y)[1]
    # Horovod: every rank evaluated its own slice of the same validation batches; average them.
    return hvd.allreduce(total / n_batches, op=hvd.Average, name="val_loss").item()


def _save(model: GPT, optimizer, step: int, cfg: JobConfig, out: Path, topo: Topology, batches: WindowSampler) -> Path:
    """This rank's shard of the checkpoint at `step` (the whole model when tp = 1), with the data position."""
    state = training_state(model, optimizer, step, cfg.to_dict(), topo.tp_rank, topo.tp)
    state["data"] = batches.state_dict()  # (epoch, position, seed): a resumed run continues with the next sample
    return save_checkpoint(checkpoint_path(out, step, topo.tp_rank, topo.tp), state)


def _param_checksum(model: GPT) -> str:
    """A digest of every parameter's bytes: equal digests mean bit-identical replicas."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _sample(model: GPT, tokenizer, n_tokens: int, seed: int, device: torch.device) -> str:
    prompt = torch.tensor([tokenizer.encode("def ")], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.eval().generate(prompt, n_tokens, generator=generator)
    return tokenizer.decode(out[0].tolist())
