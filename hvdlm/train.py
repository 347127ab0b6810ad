"""One rank's training program: `hvdlm train JOB.toml`, started once per device by a launcher.

Data parallelism with Horovod: every rank holds a full replica, trains on its own slice of each global batch,
and Horovod's ring allreduce averages the gradients, so all replicas take the same step and stay identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import horovod.torch as hvd
import torch

from hvdlm.checkpoint import checkpoint_path, save_checkpoint
from hvdlm.config import JobConfig, default_run_dir
from hvdlm.data import Dataset, open_dataset
from hvdlm.data.corpus import dataset_dir, ensure_dataset, model_vocab_size
from hvdlm.data.sampler import WindowSampler
from hvdlm.errors import InputError
from hvdlm.metrics import RunLogger
from hvdlm.model import GPT
from hvdlm.optim import lr_at, make_adamw


def train(cfg: JobConfig, job_name: str, run_dir: str | None) -> Path:
    """Train to cfg.train.max_steps; returns the run directory."""
    # Horovod: one process per device; rank / size span the whole job, local_rank the node.
    hvd.init()
    device = _pick_device()
    torch.set_num_threads(cfg.train.threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    rank0 = hvd.rank() == 0
    data = _load_dataset(cfg)
    # The model's vocabulary is the dataset tokenizer's; resolved before config.toml is written, so it records it.
    cfg.model.vocab_size = model_vocab_size(cfg.model.vocab_size, data.vocab_size)
    out = _agree_on_run_dir(run_dir, job_name, cfg)
    log = RunLogger(out, cfg.train.max_steps, enabled=rank0)
    t = cfg.train

    train_batches = WindowSampler(data.train, cfg.model.seq_len, t.batch_size, hvd.rank(), hvd.size(), t.seed)
    val_batches = WindowSampler(data.val, cfg.model.seq_len, t.batch_size, hvd.rank(), hvd.size(), t.seed)

    torch.manual_seed(t.seed)
    model = GPT(cfg.model).to(device)
    optimizer = make_adamw(model, t)
    # Horovod: start every replica from rank 0's weights and optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    # Horovod: gradients are averaged across ranks by allreduce, overlapped with the backward pass.
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), op=hvd.Average)

    tokens_per_step = t.batch_size * cfg.model.seq_len * hvd.size()
    log.info(
        f"hvdlm: {hvd.size()} rank(s) x {torch.get_num_threads()} thread(s) on {device.type}, "
        f"{model.num_params() / 1e6:.2f}M parameters, {tokens_per_step} tokens per step, "
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
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
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
        if t.checkpoint_interval and done % t.checkpoint_interval == 0 and not is_last and rank0:
            save_checkpoint(checkpoint_path(out, done), _state(model, optimizer, done, cfg, train_batches))

    log.close()
    _finish(model, optimizer, cfg, out, first_val, final_val, device, train_batches, data)
    return out


def _finish(
    model: GPT, optimizer, cfg: JobConfig, out: Path, first_val, final_val, device, batches: WindowSampler,
    data: Dataset,
) -> None:  # fmt: skip
    """Check the replicas agree, write the final checkpoint and summary.json, and report on rank 0."""
    t = cfg.train
    # Horovod: gather every replica's parameter digest; data parallelism must leave them bit-identical.
    checksums = hvd.allgather_object(_param_checksum(model))
    identical = len(set(checksums)) == 1
    if hvd.rank() == 0:
        path = save_checkpoint(checkpoint_path(out, t.max_steps), _state(model, optimizer, t.max_steps, cfg, batches))
        summary = {
            "steps": t.max_steps, "ranks": hvd.size(), "first_val_loss": first_val, "final_val_loss": final_val,
            "replica_checksums": checksums, "replicas_identical": identical, "checkpoint": str(path),
        }  # fmt: skip
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if not identical:
            print(f"WARNING: the {hvd.size()} replicas diverged: parameter checksums {checksums}", flush=True)
        if first_val is not None:
            print(f"validation loss: {first_val:.4f} at start -> {final_val:.4f} after {t.max_steps} steps")
        if t.sample_tokens:
            print("sample:\n" + _sample(model, data.tokenizer, t.sample_tokens, t.seed, device))
        print(f"checkpoint: {path}")
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


def _state(model: GPT, optimizer, step: int, cfg: JobConfig, batches: WindowSampler) -> dict:
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "config": cfg.to_dict(),
        "data": batches.state_dict(),  # (epoch, position, seed): a resumed run continues with the next sample
    }  # fmt: skip


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
