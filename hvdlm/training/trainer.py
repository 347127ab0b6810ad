"""One rank's training program: `hvdlm train JOB.toml`, started once per device by a launcher.

The ranks form a tp x dp grid (hvdlm.parallel.topology). Each TP group of tp adjacent ranks holds one model replica in
shards, and its collectives (mpi4py) run inside the layers. Data parallelism with Horovod: every replica trains
on its own slice of each global batch, and Horovod's ring allreduce averages the gradients within each DP group
(the ranks holding the same shard), so all replicas take the same step and stay identical. tp = 1 is plain data
parallelism.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from pathlib import Path

import horovod.torch as hvd
import torch

from hvdlm.checkpoint.format import save_checkpoint, training_state
from hvdlm.checkpoint.reshard import load_full_state, load_model, load_optimizer, shard_state
from hvdlm.checkpoint.store import (
    checkpoint_path,
    prune_checkpoints,
    remove_stale_temporaries,
    resolve_checkpoint,
    set_aside_newer,
)
from hvdlm.config import JobConfig, TrainConfig, default_run_dir
from hvdlm.data import Dataset, open_dataset
from hvdlm.data.corpus import dataset_dir, ensure_dataset, model_vocab_size
from hvdlm.data.sampler import WindowSampler
from hvdlm.errors import InputError
from hvdlm.model import GPT
from hvdlm.parallel.topology import Topology, dp_group_ranks, init_topology
from hvdlm.training.ema import WeightEMA
from hvdlm.training.flops import flops_per_token, memory_mb, mfu, peak_tflops
from hvdlm.training.local_sgd import average_replicas
from hvdlm.training.metrics import RunLogger
from hvdlm.training.optim import clip_grad_norm, distributed_optimizer, lr_at
from hvdlm.training.precision import Precision
from hvdlm.training.preemption import Preempted, Stop, StopVote
from hvdlm.training.resume import Start, agree_on_start, check_compatible, raise_if_any, rng_state, set_rng_state


def train(cfg: JobConfig, job_name: str, run_dir: str | None, resume: str | None = None) -> Path:
    """Train to cfg.train.max_steps; returns the run directory. `resume`: "auto" or a checkpoint to continue."""
    # Horovod: one process per device; rank / size span the whole job, local_rank the node. init_topology calls
    # hvd.init, with the DP groups as process sets when tp > 1.
    topo = init_topology(cfg.parallel.tp)
    dp_rank, dp_size = topo.dp_rank, topo.dp  # all TP ranks of a replica see the same samples
    t = cfg.train
    device = _pick_device(t.deterministic)
    precision = Precision(t, device)  # refuses fp16 without a GPU before anything is written
    torch.set_num_threads(t.threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    rank0 = hvd.rank() == 0
    data = _load_dataset(cfg)
    # The model's vocabulary is the dataset tokenizer's; resolved before config.toml is written, so it records it.
    cfg.model.vocab_size = model_vocab_size(cfg.model.vocab_size, data.vocab_size)
    train_batches = WindowSampler(data.train, cfg.model.seq_len, t.batch_size, dp_rank, dp_size, t.seed)
    val_batches = WindowSampler(data.val, cfg.model.seq_len, t.batch_size, dp_rank, dp_size, t.seed)

    # Every rank seeds alike: a TP rank builds the full tensors and keeps its slice (layout-independent init).
    torch.manual_seed(t.seed)
    model = GPT(cfg.model, topo.tp_group)
    # Checkpoints are read and checked before the run directory is touched: bad input leaves nothing behind.
    start = agree_on_start(run_dir, default_run_dir(job_name), resume)
    error = None
    try:
        if start.state is not None:
            check_compatible(start.state, t, start.source)
            load_model(model, start.state, start.source, topo.tp_rank, topo.tp)
        elif t.init_from:
            source = str(resolve_checkpoint(t.init_from))
            load_model(model, load_full_state(source), source, topo.tp_rank, topo.tp)
    except InputError as e:
        error = str(e)
    raise_if_any(error, "model_loaded")
    model = model.to(device)
    # Horovod: replicas start from their DP group's root state; gradients are averaged over the DP group.
    optimizer = distributed_optimizer(model, t, topo)
    ema = WeightEMA(model, t.ema_decay) if t.ema_decay else None
    first_step, progress, error = 0, {}, None
    try:  # the rest of the checkpoint: a data position for other data, say, is refused before anything is written
        first_step, progress = _restore(start, model, optimizer, ema, precision, train_batches, topo, device, t)
    except InputError as e:
        error = str(e)
    raise_if_any(error, "state_loaded")
    resume_step = first_step if resume is not None else None  # 0: resumed, but there was nothing to resume yet
    out = _prepare_run_dir(start, cfg, resume_step)
    log = RunLogger(out, t.max_steps, enabled=rank0, tensorboard=t.tensorboard, resume_step=resume_step)

    tokens_per_step = t.batch_size * t.accumulation_steps * cfg.model.seq_len * dp_size
    peak = peak_tflops(device, t.precision, t.peak_tflops)
    model_flops = flops_per_token(model.num_params(), cfg.model.n_layer, cfg.model.seq_len, cfg.model.d_model)
    mode = f"local SGD every {t.local_sgd_interval} steps," if t.local_sgd_interval else "synchronous"
    log.info(
        f"hvdlm: {hvd.size()} rank(s) (tp {topo.tp} x dp {topo.dp}) x {torch.get_num_threads()} thread(s) on "
        f"{device.type} in {t.precision}, {model.num_params() / 1e6:.2f}M parameters, {tokens_per_step} tokens per "
        f"step ({t.accumulation_steps} micro-batch(es)), {mode} {t.optimizer}, data {len(data.train) / 1e6:.1f}M "
        f"train / {len(data.val) / 1e6:.1f}M val {data.tokenizer.kind} tokens ({train_batches.samples_per_epoch:,} "
        f"windows per epoch) from {data.path}"
    )
    log.info(f"run directory: {out}")
    if start.state is not None:
        log.info(f"resumed from {start.source} at step {first_step}")

    def evaluate(step: int) -> float:
        with ema.applied() if ema else contextlib.nullcontext():
            val = _evaluate(model, val_batches, t.eval_batches, device, precision)
        ppl = math.exp(min(val, 700))  # exp overflows a float past ~709
        log.info(f"step {step:>6} | val loss {val:.4f} | val ppl {ppl:.2f}" + (" (EMA weights)" if ema else ""))
        log.record({"step": step, "tokens": step * tokens_per_step, "val_loss": val, "val_ppl": ppl})
        return val

    final_val = progress.get("final_val_loss")
    if t.eval_interval and first_step == 0:
        progress["first_val_loss"] = final_val = evaluate(0)

    vote = StopVote(hvd.size())  # each step carries every rank's reason to stop (a signal, too many skips)
    skipped_in_a_row, stop_requested = progress.get("skipped_in_a_row", 0), False
    interval_start, interval_steps = time.perf_counter(), 0
    try:
        for step in range(first_step, t.max_steps):
            vote.start()
            lr = lr_at(step, t, dp_size)
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss, grad_norm, problem = _train_step(model, optimizer, train_batches, precision, ema, topo, t, device)
            done = step + 1
            if t.local_sgd_interval and (done % t.local_sgd_interval == 0 or done == t.max_steps):
                average_replicas(model, optimizer, topo, ema)
            interval_steps += 1

            if problem is not None:
                skipped_in_a_row += 1
                log.info(f"step {done:>6} | skipped: {problem} ({skipped_in_a_row} in a row)")
                log.record({"step": done, "skipped": problem})
                if skipped_in_a_row >= t.max_skipped_steps:
                    vote.local = Stop.NON_FINITE
            else:
                skipped_in_a_row = 0
            if done % t.log_interval == 0 or done == t.max_steps:
                # Horovod: the logged loss is the mean over ranks, i.e. the loss of the global batch. Every rank
                # joins, whatever its own step did (local SGD and fp16 replicas may differ on skipping).
                mean_loss = hvd.allreduce(loss, op=hvd.Average, name="train_loss").item()
                if problem is None:  # a skipped step has its own row
                    elapsed = time.perf_counter() - interval_start
                    tokens_per_s = tokens_per_step * interval_steps / elapsed
                    row = {
                        "step": done,
                        "loss": mean_loss,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens": done * tokens_per_step,
                        "tokens_per_s": tokens_per_s,
                        "ms_per_step": 1000 * elapsed / interval_steps,
                        "mfu": mfu(tokens_per_s, model_flops, peak, hvd.size()),
                        "memory_mb": memory_mb(device),
                    }
                    log.record(row)
                    log.info(
                        f"step {done:>6} | loss {mean_loss:.4f} | lr {lr:.2e} | grad norm {row['grad_norm']:.3f} | "
                        f"{tokens_per_s:>9,.0f} tok/s | {row['ms_per_step']:7.1f} ms/step"
                        + (f" | MFU {row['mfu']:.1%}" if row["mfu"] is not None else "")
                        + f" | {row['memory_mb']:,.0f} MB"
                    )
                    interval_start, interval_steps = time.perf_counter(), 0
            log.advance(1, loss.item() if log.enabled else None)

            is_last = done == t.max_steps
            if t.eval_interval and (done % t.eval_interval == 0 or is_last):
                final_val = evaluate(done)
                interval_start, interval_steps = time.perf_counter(), 0  # evaluation is not training throughput
            progress.update(final_val_loss=final_val, skipped_in_a_row=skipped_in_a_row)

            reason = vote.result()  # the same on every rank, so every rank takes the same branch below
            # Synchronous fp32/bf16 replicas judge by one averaged gradient, so they count skips alike and stop at
            # once. Local SGD replicas judge their own steps, and with fp16 the scaler's overflows are not counted
            # but a rank's own non-finite loss is: those stop one step after the first rank asks.
            counted_alike = not t.local_sgd_interval and not precision.scaler.is_enabled()
            if reason == Stop.NON_FINITE or (vote.local == Stop.NON_FINITE and counted_alike):
                raise InputError(
                    f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient norm (the last at step "
                    f"{done}; train.max_skipped_steps = {t.max_skipped_steps}), so the run stops. Lower train.lr, "
                    'set train.grad_clip (e.g. 1.0), use precision = "bf16" instead of fp16, or resume from an '
                    "earlier checkpoint."
                )
            stop_requested = stop_requested or reason == Stop.PREEMPTED
            # Local SGD replicas agree only where they average, so a preempted one runs on to that point.
            at_sync_point = not t.local_sgd_interval or done % t.local_sgd_interval == 0
            if stop_requested and at_sync_point and not is_last:
                _save(model, optimizer, done, cfg, out, topo, train_batches, ema, precision, progress, device)
                log.info(
                    f"preempted at step {done} ({vote.signal_name or 'signal on another rank'}): checkpoint written; "
                    "resume with --resume auto"
                )
                raise Preempted()
            if t.checkpoint_interval and done % t.checkpoint_interval == 0 and not is_last:
                _save(model, optimizer, done, cfg, out, topo, train_batches, ema, precision, progress, device)
    finally:
        log.close()
    _finish(
        model,
        optimizer,
        cfg,
        out,
        progress,
        device,
        topo,
        train_batches,
        data,
        ema,
        precision,
        save=first_step < t.max_steps,
    )
    return out


def _train_step(
    model: GPT,
    optimizer,
    batches: WindowSampler,
    precision: Precision,
    ema: WeightEMA | None,
    topo: Topology,
    t: TrainConfig,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """One optimizer step over accumulation_steps micro-batches; returns (loss, gradient norm, why it was skipped).

    The loss is this rank's mean over its micro-batches. A step whose loss or gradient norm is not finite is
    skipped: no update, no EMA update.
    """
    k = t.accumulation_steps
    optimizer.zero_grad()  # Horovod: its zero_grad takes no arguments; torch sets grads to None
    model.train()
    loss = torch.zeros((), device=device)
    for _ in range(k):  # Horovod: backward_passes_per_step = k, so only the last backward allreduces
        x, y = (b.to(device, non_blocking=True) for b in batches.next_batch())
        with precision.autocast():
            micro_loss = model(x, y)[1]
        # A non-finite loss can leave finite gradients (an infinite loss has no finite slope to speak of, yet a
        # kernel may return one). Make them NaN, so that the averaged gradient, which every replica sees, tells
        # all of them to skip the step. No host sync: a finite loss is multiplied by exactly 1.
        micro_loss = micro_loss * torch.where(torch.isfinite(micro_loss), 1.0, float("nan"))
        precision.scaler.scale(micro_loss / k).backward()
        loss += micro_loss.detach() / k
    synchronous = not t.local_sgd_interval
    if synchronous:
        # Horovod: finish the gradient allreduce before unscaling and clipping, so the norm is that of the
        # averaged gradient, then step without a second synchronisation.
        optimizer.synchronize()
    precision.scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(list(model.parameters()), t.grad_clip or float("inf"), topo.tp_group)
    # Every replica sees the same averaged gradient, so all of them skip together (the TP ranks of one replica
    # share loss and norm). With fp16 the scaler itself skips overflowing steps.
    problem = _non_finite(loss, grad_norm, precision.scaler.is_enabled())
    if problem is None:
        scale = precision.scaler.get_scale() if precision.scaler.is_enabled() else None
        with optimizer.skip_synchronize() if synchronous else contextlib.nullcontext():
            precision.scaler.step(optimizer)
        precision.scaler.update()
        overflowed = scale is not None and precision.scaler.get_scale() < scale  # the scaler skipped the step
        if ema and not overflowed:
            ema.update()
    return loss, grad_norm, problem


def _non_finite(loss: torch.Tensor, grad_norm: torch.Tensor, scaled: bool) -> str | None:
    if not torch.isfinite(loss):
        return "non-finite loss"
    if not scaled and not torch.isfinite(grad_norm):  # fp16: the scaler handles overflow by itself
        return "non-finite gradient norm"
    return None


def _restore(
    start: Start,
    model: GPT,
    optimizer,
    ema: WeightEMA | None,
    precision: Precision,
    batches: WindowSampler,
    topo: Topology,
    device: torch.device,
    t: TrainConfig,
) -> tuple[int, dict]:
    """Put the checkpoint's optimizer, EMA, scaler, data position and RNG back; returns (first step, progress).

    A fresh run seeds its dropout stream instead: one per replica, shared by its TP ranks, whose replicated
    activations must be dropped alike (replicas would otherwise all drop the same units of different samples).
    """
    state = start.state
    if state is None:
        torch.manual_seed(t.seed + 1 + topo.dp_rank)
        return 0, {}
    load_optimizer(optimizer, model, state, topo.tp_rank, topo.tp)
    if ema is not None:
        if "ema" in state:
            ema.load_state_dict(shard_state(model, state["ema"], topo.tp_rank, topo.tp))
        # else: the checkpoint had no EMA; it starts from the weights, which is what WeightEMA() did
    precision.load_state_dict(state.get("scaler"))
    batches.load_state_dict(state["data"])
    rngs = state.get("rng") or []
    if len(rngs) == topo.dp:
        set_rng_state(rngs[topo.dp_rank], device)
    else:  # another number of replicas: new dropout streams, so not bit-identical to an uninterrupted run
        torch.manual_seed(t.seed + 1 + topo.dp_rank + 7919 * state["step"])
        if hvd.rank() == 0:
            print(
                f"note: the checkpoint was written by {len(rngs)} replica(s), this run has {topo.dp}; dropout "
                "draws new masks from here",
                flush=True,
            )
    return state["step"], dict(state.get("progress") or {})


def _finish(
    model: GPT,
    optimizer,
    cfg: JobConfig,
    out: Path,
    progress: dict,
    device,
    topo: Topology,
    batches: WindowSampler,
    data: Dataset,
    ema: WeightEMA | None,
    precision: Precision,
    save: bool,
) -> None:
    """Check the replicas agree, write the final checkpoint (unless resumed from it) and summary.json, and report
    on rank 0."""
    t = cfg.train
    first_val, final_val = progress.get("first_val_loss"), progress.get("final_val_loss")
    # Horovod: gather every rank's parameter digest (index = global rank). Data parallelism must leave the
    # members of each DP group (the copies of one shard) bit-identical.
    checksums = hvd.allgather_object(_param_checksum(model))
    identical = all(
        len({checksums[r] for r in dp_group_ranks(tp_rank, len(checksums), topo.tp)}) == 1 for tp_rank in range(topo.tp)
    )
    paths = [checkpoint_path(out, t.max_steps, r, topo.tp) for r in range(topo.tp)]
    if save:
        _save(model, optimizer, t.max_steps, cfg, out, topo, batches, ema, precision, progress, device)
    # The first replica's TP ranks sample together (their layers talk), so they all generate; rank 0 prints.
    sample = None
    if t.sample_tokens and topo.dp_rank == 0:
        sample = _sample(model, data.tokenizer, t.sample_tokens, t.seed, device)
    if hvd.rank() == 0:
        summary = {
            "steps": t.max_steps,
            "ranks": hvd.size(),
            "tp": topo.tp,
            "dp": topo.dp,
            "first_val_loss": first_val,
            "final_val_loss": final_val,
            "replica_checksums": checksums,
            "replicas_identical": identical,
            "checkpoint": str(paths[0]),
            "checkpoint_shards": [str(p) for p in paths],
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if not identical:
            print(f"WARNING: the replicas diverged: parameter checksums by rank {checksums}", flush=True)
        if first_val is not None and final_val is not None:
            print(f"validation loss: {first_val:.4f} at start -> {final_val:.4f} after {t.max_steps} steps")
        if sample is not None:
            print("sample:\n" + sample)
        print(f"checkpoint: {paths[0]}" + (f" (and {len(paths) - 1} more TP shard(s))" if len(paths) > 1 else ""))
        print(f"run directory: {out}", flush=True)


def _pick_device(deterministic: bool) -> torch.device:
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it reads this when CUDA starts, so set it first.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
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


def _prepare_run_dir(start: Start, cfg: JobConfig, resume_step: int | None) -> Path:
    """Rank 0 creates the run directory and writes config.toml; every rank gets its answer.

    A new run never writes over an old one (metrics.jsonl marks a run). A run resumed from step S (0: nothing to
    resume yet) rewrites config.toml with the resolved config of this attempt (max_steps may have grown), sets
    aside checkpoints after S, which belong to an abandoned attempt, and clears temporaries of killed saves.
    """
    answer: dict = {}
    if hvd.rank() == 0:
        path = start.run_dir
        if (path / "metrics.jsonl").exists() and resume_step is None:
            answer["error"] = (
                f"run directory '{path}' already holds a run (metrics.jsonl). Continue it with --resume auto, pass "
                "a new --run-dir, or remove the old run if you no longer need it; hvdlm never writes over a run."
            )
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.toml").write_text(cfg.to_toml())
            if resume_step is not None:
                remove_stale_temporaries(path)
                aside = set_aside_newer(path, resume_step)
                if aside:
                    print(f"note: checkpoints after step {resume_step} moved to {aside}", flush=True)
    # Horovod: a broadcast doubles as the barrier that keeps other ranks from racing ahead of the check.
    answer = hvd.broadcast_object(answer, root_rank=0, name="run_dir")
    if "error" in answer:
        raise InputError(answer["error"])
    return start.run_dir


@torch.no_grad()
def _evaluate(model: GPT, batches: WindowSampler, n_batches: int, device: torch.device, precision: Precision) -> float:
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(n_batches):
        x, y = (b.to(device) for b in batches.eval_batch(i))
        with precision.autocast():
            total += model(x, y)[1].float()
    # Horovod: every rank evaluated its own slice of the same validation batches; average them.
    return hvd.allreduce(total / n_batches, op=hvd.Average, name="val_loss").item()


def _save(
    model: GPT,
    optimizer,
    step: int,
    cfg: JobConfig,
    out: Path,
    topo: Topology,
    batches: WindowSampler,
    ema: WeightEMA | None,
    precision: Precision,
    progress: dict,
    device: torch.device,
) -> None:
    """The checkpoint at `step`: the first replica's TP ranks write a shard each (the whole model when tp = 1).

    Called by every rank: all RNG states are gathered (each replica draws its own dropout masks), and the save
    counts only once every shard is on disk; then rank 0 deletes checkpoints beyond train.keep_checkpoints.
    """
    # Horovod: every rank's RNG state, by global rank; a shard keeps those of its DP group, in DP-rank order.
    rngs = hvd.allgather_object(rng_state(device), name=f"rng.{step}")
    if topo.dp_rank == 0:
        state = training_state(
            model,
            optimizer,
            step,
            cfg.to_dict(),
            topo.tp_rank,
            topo.tp,
            data=batches.state_dict(),  # (epoch, position, seed): a resumed run continues with the next sample
            ema=ema.state_dict() if ema else None,
            scaler=precision.state_dict(),
            rng=[rngs[r] for r in dp_group_ranks(hvd.rank(), hvd.size(), topo.tp)],
            progress=dict(progress),
        )
        save_checkpoint(checkpoint_path(out, step, topo.tp_rank, topo.tp), state)
    hvd.allgather_object(None, name=f"saved.{step}")  # Horovod: a barrier, so every shard is on disk
    if hvd.rank() == 0:
        prune_checkpoints(out, cfg.train.keep_checkpoints, newest=step)


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
