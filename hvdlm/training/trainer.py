"""One rank's training program: `hvdlm train JOB.toml`, started once per device by a launcher.

The ranks form a pp x dp x tp grid (hvdlm.parallel.topology). Each TP group of tp adjacent ranks holds one model
replica (or, with pipeline stages, one stage of it) in shards, and its collectives (mpi4py) run inside the layers;
pipeline stages pass activations on (hvdlm.training.pipeline). Data parallelism with Horovod: every replica
trains on its own slice of each global batch, and Horovod's ring allreduce averages the gradients within each DP
group (the ranks holding the same shard), so all replicas take the same step and stay identical. tp = 1 is plain
data parallelism.

The run reads as named phases:

    trainer = setup(cfg, ...)                  # topology, data, model, optimizer, where to start, run directory
    for each step: train_step -> log -> evaluate -> stop_or_checkpoint
    finish                                     # final checkpoint, replica check, summary.json, sample
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import horovod.torch as hvd
import torch

from hvdlm.checkpoint.hf import load_init_state
from hvdlm.checkpoint.manager import CheckpointManager
from hvdlm.checkpoint.reshard import check_model_shape, load_model
from hvdlm.checkpoint.stages import stage_state
from hvdlm.config import JobConfig, TrainConfig, default_run_dir
from hvdlm.data import Dataset, open_dataset
from hvdlm.data.blend_sampler import Blend, BlendSampler, ValidationSets, describe_data, make_samplers, open_blend
from hvdlm.data.corpus import dataset_dir, ensure_dataset, model_vocab_size
from hvdlm.data.meta import tokenizer_setting_note
from hvdlm.data.sampler import WindowSampler
from hvdlm.devices import check_share_gpu
from hvdlm.errors import InputError
from hvdlm.model import GPT
from hvdlm.model.stage import GPTStage
from hvdlm.optim.build import build as build_optimizer
from hvdlm.optim.interface import TrainingOptimizer
from hvdlm.optim.schedule import lr_at
from hvdlm.optim.zero import zero_note
from hvdlm.parallel import jobwide
from hvdlm.parallel.agreement import together
from hvdlm.parallel.split import chunk_layers, layers_per_rank
from hvdlm.parallel.topology import Topology, all_dp_groups, elastic_job, init_topology
from hvdlm.plan.timing import bubble_fraction
from hvdlm.runfiles import SUMMARY_FILE
from hvdlm.training import elastic
from hvdlm.training.device import pick_device, to_device
from hvdlm.training.ema import WeightEMA
from hvdlm.training.flops import flops_per_token, memory_mb, mfu, peak_tflops
from hvdlm.training.memory import check_model_fits
from hvdlm.training.memory_account import ActivationMeter, memory_account
from hvdlm.training.memory_account import describe as describe_memory
from hvdlm.training.metrics import RunLogger
from hvdlm.training.outcome import RunStatus
from hvdlm.training.pipeline import PipelineRunner
from hvdlm.training.precision import Precision
from hvdlm.training.preemption import Preempted, Stop, StopVote
from hvdlm.training.profiling import StepProfiler
from hvdlm.training.resume import (
    Start,
    agree_on_start,
    check_compatible,
    check_same_global_batch,
    prepare_run_dir,
    restore_checkpoint,
)
from hvdlm.training.rollback import SpikeGuard, spike_guard
from hvdlm.training.spike import injected_lr_factor
from hvdlm.training.verdict import Verdict, decides_on_device, non_finite_flags
from hvdlm.training.watchdog import Watchdog, start_watchdog
from hvdlm.units import format_count


def train(cfg: JobConfig, job_name: str, run_dir: str | None, resume: str | None = None) -> Path:
    """Train to cfg.train.max_steps; returns the run directory. `resume`: "auto" or a checkpoint to continue.

    However the run ends, rank 0 says how in RUN_DIR/status.json (once setup has prepared the directory: bad input
    found before leaves nothing behind)."""
    watchdog = start_watchdog(cfg.train)  # before setup: hvd.init reads the stall inspector's settings
    status = RunStatus()
    try:
        path = _train(cfg, job_name, run_dir, resume, watchdog, status)
    except BaseException as error:
        status.end(error, watchdog.steps_done())
        raise
    finally:
        watchdog.stop()
    status.end(None, cfg.train.max_steps)
    return path


def _train(
    cfg: JobConfig, job_name: str, run_dir: str | None, resume: str | None, watchdog: Watchdog, status: RunStatus
) -> Path:
    trainer = setup(cfg, job_name, run_dir, resume, status)
    watchdog.attach(trainer.run_dir, hvd.rank(), hvd.size(), trainer.first_step)
    if resume is not None and trainer.first_step == cfg.train.max_steps:
        trainer.logger.info(
            f"the run in {trainer.run_dir} is complete: its checkpoint is at step {trainer.first_step} of "
            f"train.max_steps = {cfg.train.max_steps}, so there is nothing to train. To train on, raise max_steps "
            f"(e.g. --set train.max_steps={2 * cfg.train.max_steps})."
        )
        trainer.logger.close()
        return trainer.run_dir
    try:
        if elastic_job():  # under horovodrun --min-np/--max-np: the steps under hvd.elastic.run
            elastic.run_steps(trainer, watchdog, run_step)
        else:
            t = cfg.train
            profiler = StepProfiler(
                t.profile_steps, t.log_interval, trainer.first_step, trainer.run_dir, trainer.device, hvd.rank()
            )
            step = trainer.first_step
            while step < t.max_steps:  # a spike rollback (train.spike_rollback) takes the step back
                with profiler.around(step):
                    step = run_step(trainer, watchdog, step)
            profiler.finish()  # the run ended before the last recorded step
        trainer.checkpoints.drain()  # the end of the run waits for a save still being written
    except BaseException:
        trainer.checkpoints.abandon()  # an error exit: the save in flight is not put in place, the previous stays
        raise
    finally:
        trainer.logger.close()
    watchdog.beat("finish", cfg.train.max_steps)
    with together("log_written"):  # the last steps' rows: written, or every rank stops with rank 0's reason
        if trainer.logger.failure:
            trainer.raise_write_failure()
    trainer.finish()
    return trainer.run_dir


def run_step(trainer: Trainer, watchdog: Watchdog, step: int) -> int:
    """One step's phases, each announced to the watchdog; the step to go on from (after a spike rollback, the
    checkpoint's)."""
    watchdog.beat("train_step", step + 1)
    outcome = trainer.train_step(step)
    watchdog.beat("log", step + 1)
    trainer.log(outcome)
    if trainer.spikes:
        trainer.spikes.observe(trainer, outcome.done, outcome.loss, outcome.mean_loss)
    watchdog.beat("evaluate", step + 1)
    trainer.evaluate_if_due(outcome.done)
    watchdog.beat("stop_or_checkpoint", step + 1)
    return trainer.stop_or_checkpoint(outcome.done)


@dataclass
class StepOutcome:
    """What one optimizer step left for logging: `done` steps are complete after it."""

    done: int
    lr: float
    loss: torch.Tensor  # this rank's mean over its micro-batches
    grad_norm: torch.Tensor
    verdict: Verdict  # whether the step was skipped (a non-finite loss or gradient norm), read when first asked
    counted: bool = False  # the verdict is in progress["skipped_in_a_row"] (Trainer._count)
    mean_loss: float | None = None  # the global batch's loss, where a log row read it

    @property
    def problem(self) -> str | None:
        """Why the step was skipped, None if taken."""
        return self.verdict.problem


@dataclass
class Throughput:
    """Tokens per second and MFU over the steps since the last log row (evaluation time is not training time)."""

    tokens_per_step: int
    flops_per_token: int
    peak_tflops: float | None  # of one device; None: unknown, no MFU
    start: float = field(default_factory=time.perf_counter)
    steps: int = 0

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def seconds(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class Trainer:
    """Everything one rank's run holds, once: built by `setup`, driven by `train`."""

    cfg: JobConfig
    topo: Topology
    device: torch.device
    precision: Precision
    data: Dataset | Blend
    train_batches: WindowSampler | BlendSampler
    val_batches: ValidationSets  # by dataset: one, or each of a blend's
    model: GPT
    optimizer: TrainingOptimizer  # hvdlm.optim: asked through its interface, never by its kind
    ema: WeightEMA | None
    run_dir: Path
    checkpoints: CheckpointManager
    first_step: int
    progress: dict  # carried in checkpoints: first / final validation loss, skipped steps in a row
    throughput: Throughput
    logger: RunLogger | None = None  # rank 0 writes; made once the run directory is known to be ours
    pipeline: PipelineRunner | None = None  # parallel.pp > 1: this stage's part of each step
    vote: StopVote = field(init=False)  # each step carries every rank's reason to stop (a signal, too many skips)
    stop_requested: bool = False
    memory: dict | None = None  # the memory account (hvdlm.training.memory_account), measured at the first step
    # The optimizer skips a non-finite step by itself (hvdlm.training.verdict): the host reads each step's verdict
    # once the next step is queued, or when a log row or a checkpoint needs it; `pending` is the unread one.
    skips_on_device: bool = False
    pending: StepOutcome | None = None
    step_bytes: dict = field(default_factory=dict)  # payload bytes of the last step's TP and pipeline collectives
    status: RunStatus = field(default_factory=RunStatus)  # rank 0's status.json (hvdlm.training.outcome)
    spikes: SpikeGuard | None = None  # train.spike_rollback: the loss-spike detector and rollback

    def __post_init__(self) -> None:
        self.vote = StopVote(hvd.size())

    def resize(self, topo: Topology) -> None:
        """Go on with another number of replicas (an elastic reset): what depends on it is made as setup makes it
        (the samplers keep the global order and position, hvdlm.data.sampler)."""
        self.topo = self.checkpoints.topo = topo
        self.train_batches, self.val_batches = _samplers(self.cfg, self.data, topo)
        self.vote = StopVote(hvd.size())
        self.throughput.tokens_per_step = _tokens_per_step(self.cfg, topo)
        self.throughput.restart()

    @property
    def t(self) -> TrainConfig:
        return self.cfg.train

    # -- train_step --------------------------------------------------------------------------------------------

    def train_step(self, step: int) -> StepOutcome:
        """One optimizer step (the stop vote in flight with it), local SGD's averaging, and the count of skips."""
        t = self.t
        if self.logger.failure:
            self.vote.local = Stop.WRITE_FAILED
        self.vote.start()
        lr = lr_at(step, t, self.topo.dp) * injected_lr_factor(step + 1)  # (a test's spike, hvdlm.training.spike)
        self.optimizer.set_lr(lr)
        meter = ActivationMeter(self.model) if self.memory is None else None
        groups = {"tp_bytes_per_step": self.topo.tp_group, "pp_bytes_per_step": self.topo.pp_group}
        before = {key: g.bytes_moved for key, g in groups.items()}
        loss, grad_norm, verdict = self._optimizer_step(meter)
        self.step_bytes = {key: g.bytes_moved - before[key] for key, g in groups.items()}  # checked by the planner
        if meter is not None:
            self.memory = memory_account(self.model, self.optimizer, meter.peak_bytes, self.device)
            self.logger.info(describe_memory(self.memory))
        done = step + 1
        self.optimizer.after_step(done, self.ema)  # local SGD: the replicas average every few steps
        self.throughput.steps += 1
        outcome = StepOutcome(done, lr, loss, grad_norm, verdict)
        if self.skips_on_device:
            self.pending = outcome
        else:
            self._count(outcome)
        return outcome

    def _count(self, outcome: StepOutcome) -> None:
        """A step's verdict, counted once: skips in a row, a row for a skipped step, and the stop vote once
        train.max_skipped_steps are skipped in a row."""
        if outcome.counted:
            return
        outcome.counted = True
        if self.pending is outcome:
            self.pending = None
        problem = outcome.problem
        if problem is None:
            self.progress["skipped_in_a_row"] = 0
            return
        skipped = self.progress["skipped_in_a_row"] = self.progress.get("skipped_in_a_row", 0) + 1
        self.logger.info(f"step {outcome.done:>6} | skipped: {problem} ({skipped} in a row)")
        self.logger.record({"step": outcome.done, "skipped": problem})
        if skipped >= self.t.max_skipped_steps:
            self.vote.local = Stop.NON_FINITE

    def _count_previous_step(self) -> None:
        """The previous step's verdict, read now that this step's work is queued behind it. Past
        train.max_skipped_steps the run stops here, before this step's update: where the host decides, it stops
        after the previous step too (synchronous replicas count alike, so every rank stops here)."""
        previous = self.pending
        if previous is None:
            return
        self._count(previous)
        if self.vote.local == Stop.NON_FINITE:
            self.vote.result()  # this step's vote, in flight on every rank
            raise self._too_many_skipped(previous.done)

    def _optimizer_step(self, meter: ActivationMeter | None = None) -> tuple[torch.Tensor, torch.Tensor, Verdict]:
        """accumulation_steps micro-batches, then the update; returns (loss, gradient norm, the skip verdict).
        `meter` counts what the first micro-batch's forward saves for backward.

        A step whose loss or gradient norm is not finite is skipped: no update, no EMA update.
        """
        t, scaler = self.t, self.precision.scaler
        self.optimizer.zero_grad()
        self.model.train()
        if self.pipeline:  # the step's parallel.microbatches through this stage (1F1B or GPipe)
            loss = self.pipeline.forward_backward(self.train_batches, meter)
        else:
            loss = self._accumulate(t.accumulation_steps, meter)
        # The gradients averaged over the DP group; with stages, the tied weight's two copies (first and last
        # stage) get one gradient, their sum, which the optimizer takes where it commutes with its reduction.
        self.optimizer.reduce_gradients(self.pipeline.sum_tied_gradients if self.pipeline else None)
        grad_norm = self.optimizer.clip_gradients(t.grad_clip or float("inf"), scaler)
        # Every replica sees the same averaged gradient, so all of them skip together (the TP ranks of one replica
        # share loss and norm). With fp16 the scaler itself skips overflowing steps.
        flags = non_finite_flags(loss, grad_norm, scaler.is_enabled())
        found_inf = None
        if self.skips_on_device:
            self._count_previous_step()
            found_inf = flags.any().float()  # the optimizer leaves everything as it was where it is 1
        verdict = Verdict(flags)
        # The host's decision is the step's one wait for the device: it must be taken before the update, the same
        # on every replica, and counted exactly (train.max_skipped_steps).
        if self.skips_on_device or verdict.problem is None:
            scale = scaler.get_scale() if scaler.is_enabled() else None
            self.optimizer.step(scaler, found_inf)
            scaler.update()
            overflowed = scale is not None and scaler.get_scale() < scale  # the scaler skipped the step
            if self.ema and not overflowed:
                with self.optimizer.whole_model():  # ZeRO-3: the weights are a shard between passes
                    self.ema.update()
        return loss, grad_norm, verdict

    def _accumulate(self, k: int, meter: ActivationMeter | None) -> torch.Tensor:
        """Forward and backward of k micro-batches, gradients summed in .grad; their mean loss. `meter` counts what
        the first micro-batch's forward saves for backward."""
        loss = torch.zeros((), device=self.device)
        for i in range(k):  # Horovod: backward_passes_per_step = k, so only the last backward allreduces
            x, y = to_device(self.train_batches.next_batch(), self.device)
            counted = meter if meter is not None and i == 0 else contextlib.nullcontext()
            with self.precision.autocast(), counted:
                micro_loss = self.model(x, y)[1]
            # A non-finite loss can leave finite gradients (an infinite loss has no finite slope to speak of, yet a
            # kernel may return one). Make them NaN, so that the averaged gradient, which every replica sees, tells
            # all of them to skip the step. No host sync: a finite loss is multiplied by exactly 1.
            micro_loss = micro_loss * torch.where(torch.isfinite(micro_loss), 1.0, float("nan"))
            self.precision.scaler.scale(micro_loss / k).backward()
            loss += micro_loss.detach() / k
        return loss

    def tokens_trained(self) -> int:
        """Tokens of the training data used so far: the data position, exact also after a restart or an elastic
        resize on another number of replicas."""
        return self.train_batches.consumed * self.cfg.model.seq_len

    # -- log ---------------------------------------------------------------------------------------------------

    def log(self, outcome: StepOutcome) -> None:
        """At the log interval: the global batch's loss, a metrics row and a log line; the progress bar always."""
        done = outcome.done
        if done % self.t.log_interval == 0 or done == self.t.max_steps:
            # The logged loss is the mean over ranks, i.e. the loss of the global batch. Every rank joins, whatever
            # its own step did (local SGD and fp16 replicas may differ on skipping).
            mean_loss = outcome.mean_loss = jobwide.mean(outcome.loss, "train_loss")
            self._count(outcome)  # read now: the loss above waited for the step anyway
            if outcome.problem is None:  # a skipped step has its own row
                self._log_row(outcome, mean_loss)
            self.logger.advance(0, mean_loss)
        # The bar shows the loss of the last log row: reading this step's would wait for the device every step.
        self.logger.advance(1)

    def _log_row(self, outcome: StepOutcome, mean_loss: float) -> None:
        meter = self.throughput
        elapsed = meter.seconds()
        tokens_per_s = meter.tokens_per_step * meter.steps / elapsed
        row = {
            "step": outcome.done,
            "loss": mean_loss,
            "lr": outcome.lr,
            "grad_norm": float(outcome.grad_norm),
            "tokens": self.tokens_trained(),
            "tokens_per_s": tokens_per_s,
            "ms_per_step": 1000 * elapsed / meter.steps,
            "mfu": mfu(tokens_per_s, meter.flops_per_token, meter.peak_tflops, hvd.size()),
            "memory_mb": memory_mb(self.device),
            **(self.memory or {}),
            **self.step_bytes,
        }
        self.logger.record(row)
        self.logger.info(
            f"step {outcome.done:>6} | loss {mean_loss:.4f} | lr {outcome.lr:.2e} | grad norm {row['grad_norm']:.3f} "
            f"| {tokens_per_s:>9,.0f} tok/s | {row['ms_per_step']:7.1f} ms/step"
            + (f" | MFU {row['mfu']:.1%}" if row["mfu"] is not None else "")
            + f" | {row['memory_mb']:,.0f} MB"
        )
        meter.restart()

    # -- evaluate ----------------------------------------------------------------------------------------------

    def evaluate_if_due(self, done: int) -> None:
        t = self.t
        if t.eval_interval and (done % t.eval_interval == 0 or done == t.max_steps):
            self.evaluate(done)
            self.throughput.restart()  # evaluation is not training throughput

    def evaluate(self, step: int) -> float:
        """The validation loss (with the EMA weights when there is an EMA), logged and kept in progress; for a blend
        each dataset's too (val_loss/NAME), and overall their mean weighted by the blend's shares."""
        sets = self.val_batches
        whole = self.optimizer.whole_model() if self.ema else contextlib.nullcontext()  # ZeRO-3, for the EMA's swap
        with whole, self.ema.applied() if self.ema else contextlib.nullcontext():
            losses = {name: self._loss_on(batches) for name, batches in sets.samplers.items()}
        val, by_name = sets.overall(losses), sets.by_name(losses)
        ppl = math.exp(min(val, 700))  # exp overflows a float past ~709
        self.logger.info(
            f"step {step:>6} | val loss {val:.4f} | val ppl {ppl:.2f}"
            + "".join(f" | {key.removeprefix('val_loss/')} {loss:.4f}" for key, loss in by_name.items())
            + (" (EMA weights)" if self.ema else "")
        )
        tokens = self.tokens_trained()
        self.logger.record({"step": step, "tokens": tokens, "val_loss": val, "val_ppl": ppl, **by_name})
        self.progress["final_val_loss"] = val
        return val

    def _loss_on(self, batches: WindowSampler) -> float:
        """The validation loss on one dataset's evaluation batches, the mean over the replicas."""
        if self.pipeline:
            # The replicas' losses averaged, as _validation_loss does.
            val_replica = self.pipeline.validation_loss(batches, self.t.eval_batches)
            return jobwide.mean(val_replica, "val_loss")
        return _validation_loss(self.model, batches, self.t.eval_batches, self.device, self.precision)

    # -- stop_or_checkpoint ------------------------------------------------------------------------------------

    def stop_or_checkpoint(self, done: int) -> int:
        """Read the stop vote (the same on every rank, so every rank takes the same branch), then stop with an
        error (too many skipped steps), roll back (a loss spike), stop with a checkpoint (preemption), or save on
        the interval; returns the step to go on from."""
        t = self.t
        reason = self.vote.result()
        if reason == Stop.WRITE_FAILED:
            self.raise_write_failure()
        if self.pending is not None and (reason != Stop.NO or self.stop_requested or self.checkpoints.due(done)):
            self._count(self.pending)  # a checkpoint holds the count of skipped steps, and a stop reports it
        # Synchronous fp32/bf16 replicas judge by one averaged gradient, so they count skips alike and stop at
        # once. Local SGD replicas judge their own steps, and with fp16 the scaler's overflows are not counted
        # but a rank's own non-finite loss is: those stop one step after the first rank asks.
        counted_alike = not t.local_sgd_interval and not self.precision.scaler.is_enabled()
        if reason == Stop.NON_FINITE or (self.vote.local == Stop.NON_FINITE and counted_alike):
            raise self._too_many_skipped(done)
        if reason == Stop.SPIKE:  # before any save: the weights are the spike's
            # A save still being written is put in place first, so that the rollback sees every save (and sets
            # aside those from the spike).
            self.checkpoints.drain()
            return self.spikes.roll_back(self, done)
        self.stop_requested = self.stop_requested or reason == Stop.PREEMPTED
        # Local SGD replicas agree only where they average, so a preempted one runs on to that point.
        at_sync_point = not t.local_sgd_interval or done % t.local_sgd_interval == 0
        self.checkpoints.poll(done)  # a save written in the background: in place once every rank has written it
        if self.stop_requested and at_sync_point and done != t.max_steps:
            self._save(done)
            signal_name = self.vote.signal_name
            how = "interrupted" if signal_name in ("SIGINT", "SIGHUP") else "preempted"
            self.logger.info(
                f"{how} at step {done} ({signal_name or 'signal on another rank'}): checkpoint written; resume with "
                "--resume auto"
            )
            raise Preempted()
        if self.checkpoints.due(done):
            self._save(done, background=True)
        return done

    def _save(self, step: int, background: bool = False) -> None:
        with self.optimizer.weights_for_save():  # ZeRO-3: its slices hold the shard; the rest, the whole weights
            self.checkpoints.save(step, self, background=background)

    def _too_many_skipped(self, done: int) -> InputError:
        return InputError(
            f"{self.progress['skipped_in_a_row']} steps in a row had a non-finite loss or gradient norm (the last "
            f"at step {done}; train.max_skipped_steps = {self.t.max_skipped_steps}), so the run stops. Lower "
            'train.lr, set train.grad_clip (e.g. 1.0), use precision = "bf16" instead of fp16, or resume from an '
            "earlier checkpoint."
        )

    def raise_write_failure(self) -> None:
        """Every rank stops: rank 0, which could not write its log, says why (only rank 0 prints errors)."""
        raise InputError(
            f"{self.logger.failure or 'rank 0 could not write the metrics of the run'}. The run stops; its "
            "checkpoints are intact. Free space on that file system (or fix its permissions), then continue with "
            "--resume auto."
        )

    # -- finish ------------------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Check the replicas agree, write the final checkpoint (unless resumed from it) and summary.json, and
        report on rank 0."""
        t, topo = self.t, self.topo
        # Every rank's parameter digest (index = global rank). Data parallelism must leave the members of each DP
        # group (the copies of one shard) bit-identical.
        checksums = jobwide.allgather_object(_param_checksum(self.optimizer.state_tensors(self.model)), "checksums")
        world = len(checksums)
        identical = all(len({checksums[r] for r in g}) == 1 for g in all_dp_groups(world, topo.tp, topo.pp))
        if self.first_step < t.max_steps:
            self._save(t.max_steps)
        # The first replica's TP ranks sample together (their layers talk), so they all generate; rank 0 prints.
        sample = None
        if t.sample_tokens and topo.pp > 1 and hvd.rank() == 0:  # generation runs on a whole model
            print("note: no sample with pipeline stages; sample from the checkpoint with `hvdlm generate RUN_DIR`")
        if t.sample_tokens and topo.pp == 1:
            with self.optimizer.whole_model():  # ZeRO-3: collective over the DP group, which samples on one rank
                if topo.dp_rank == 0:
                    sample = _sample(self.model, self.data.tokenizer, t, self.device)
        if hvd.rank() == 0:
            self._report(checksums, identical, sample)

    def _report(self, checksums: list[str], identical: bool, sample: str | None) -> None:
        t, topo = self.t, self.topo
        first_val, final_val = self.progress.get("first_val_loss"), self.progress.get("final_val_loss")
        paths = self.checkpoints.paths(t.max_steps)
        summary = {
            "steps": t.max_steps,
            "ranks": hvd.size(),
            "tp": topo.tp,
            "dp": topo.dp,
            "pp": topo.pp,
            "first_val_loss": first_val,
            "final_val_loss": final_val,
            "replica_checksums": checksums,
            "replicas_identical": identical,
            "checkpoint": str(paths[0]),
            "checkpoint_shards": [str(p) for p in paths],
        }
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if not identical:
            print(f"WARNING: the replicas diverged: parameter checksums by rank {checksums}", flush=True)
        if first_val is not None and final_val is not None:
            print(f"validation loss: {first_val:.4f} at start -> {final_val:.4f} after {t.max_steps} steps")
        if sample is not None:
            print("sample:\n" + sample)
        print(f"checkpoint: {paths[0]}" + (f" (and {len(paths) - 1} more shard(s))" if len(paths) > 1 else ""))
        print(f"run directory: {self.run_dir}", flush=True)


# -- setup -----------------------------------------------------------------------------------------------------


def setup(
    cfg: JobConfig, job_name: str, run_dir: str | None, resume: str | None, status: RunStatus | None = None
) -> Trainer:
    """Build one rank's run. Bad input (on any rank) is every rank's error, found before anything is written.
    `status` records the run from the moment its directory is prepared."""
    t = cfg.train
    # Horovod: one process per device; rank / size span the whole job, local_rank the node. init_topology calls
    # hvd.init, with the DP groups as process sets when tp > 1.
    topo = init_topology(
        cfg.parallel.tp, cfg.parallel.pp, quiet_alone=_sends_horovod_nothing_alone(t), share_gpu=t.share_gpu
    )
    device = _device(t, topo.dp)
    precision = Precision(t, device)  # refuses fp16 without a GPU before anything is written
    # Weights, gradients and optimizer state, before anything is allocated (with the configured vocabulary: a
    # dataset's larger one only adds to what is refused here).
    with together("model_fits"):
        check_model_fits(cfg, device, hvd.local_size(), topo.dp)
    torch.set_num_threads(t.threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    data = _load_dataset(cfg)
    # The model's vocabulary is the dataset tokenizer's; resolved before config.toml is written, so it records it.
    cfg.model.vocab_size = model_vocab_size(cfg.model.vocab_size, data.vocab_size)
    # Checkpoints are read and checked before the run directory is touched: bad input leaves nothing behind.
    start = agree_on_start(run_dir, default_run_dir(job_name), resume, cfg, topo)
    trainer, init_note = _assemble(cfg, topo, precision, data, start)
    # The rest of the checkpoint: a data position for other data, say, is refused before anything is written.
    with together("state_loaded"):
        trainer.first_step = _restore(trainer, start)
    trainer.spikes = spike_guard(t, trainer.progress)  # with a checkpoint's detector state
    resume_step = trainer.first_step if resume is not None else None  # 0: resumed, but nothing to resume yet
    prepare_run_dir(start, cfg.to_toml(), resume_step)
    trainer.status = status or RunStatus()
    trainer.status.start(start.run_dir, hvd.rank() == 0, trainer.first_step)
    trainer.logger = RunLogger(
        start.run_dir, t.max_steps, enabled=hvd.rank() == 0, tensorboard=t.tensorboard, resume_step=resume_step
    )
    _banner(trainer, start)
    if init_note:
        trainer.logger.info(init_note)
    if t.eval_interval and trainer.first_step == 0:
        trainer.progress["first_val_loss"] = trainer.evaluate(0)
    trainer.throughput.restart()
    return trainer


def _sends_horovod_nothing_alone(t: TrainConfig) -> bool:
    """Whether one replica of this run sends Horovod nothing in a step: its ranks compute on the CPU (CUDA tensor
    collectives may travel through Horovod), without ZeRO or local SGD (both talk over the DP group's process set,
    even a set of one)."""
    on_cpu = t.device == "cpu" or not torch.cuda.is_available()
    # Ranks sharing a GPU send their CUDA collectives over MPI too (no process set: init_topology).
    return (on_cpu or t.share_gpu) and not t.zero and not t.local_sgd_interval


def _device(t: TrainConfig, dp: int) -> torch.device:
    """This rank's device, as train.device asks; two ranks that would share a GPU are refused on every rank, unless
    train.share_gpu allows it for a layout without NCCL (checked here, where the replicas are known)."""
    with together("device"):
        if t.share_gpu:
            check_share_gpu(dp, t.zero, t.local_sgd_interval)
        return pick_device(
            hvd.local_rank(),
            hvd.local_size(),
            t.deterministic,
            comm=_node_exchange_comm() if t.device != "cpu" else None,
            gpus_required=t.device == "cuda",
            use_gpus=t.device != "cpu",
            share=t.share_gpu,
        )


def _assemble(
    cfg: JobConfig, topo: Topology, precision: Precision, data: Dataset, start: Start
) -> tuple[Trainer, str | None]:
    """The model (loaded), its optimizer and EMA, the samplers and the checkpoint policy, held by one Trainer;
    and where --init-from weights came from (for the log)."""
    t, device = cfg.train, precision.device
    model, optimizer, init_note = _model_and_optimizer(cfg, topo, precision, start)
    shape, p = cfg.model, cfg.parallel
    train_batches, val_batches = _samplers(cfg, data, topo)
    ema = None
    if t.ema_decay:
        with optimizer.whole_model():  # ZeRO-3: the EMA starts from the whole weights
            ema = WeightEMA(model, t.ema_decay)
    trainer = Trainer(
        cfg=cfg,
        topo=topo,
        model=model,
        # Horovod: replicas start from their DP group's root state; gradients are averaged over the DP group.
        optimizer=optimizer,
        ema=ema,
        device=device,
        precision=precision,
        data=data,
        train_batches=train_batches,
        val_batches=val_batches,
        run_dir=start.run_dir,
        checkpoints=CheckpointManager(start.run_dir, cfg, topo, device),
        first_step=0,
        progress={},
        throughput=Throughput(
            tokens_per_step=_tokens_per_step(cfg, topo),
            flops_per_token=flops_per_token(model.num_params(), shape.n_layer, shape.seq_len, shape.d_model),
            peak_tflops=peak_tflops(device, t.precision, t.peak_tflops),
        ),
    )
    trainer.skips_on_device = decides_on_device(
        trainer.optimizer, precision.scaler.is_enabled(), trainer.ema, elastic_job()
    )
    if topo.pp > 1:
        trainer.pipeline = PipelineRunner(model, topo, precision, t.batch_size, p.microbatches, p.schedule)
    return trainer, init_note


def _model_and_optimizer(
    cfg: JobConfig, topo: Topology, precision: Precision, start: Start
) -> tuple[GPT, TrainingOptimizer, str | None]:
    """The model on its device (loaded: see `_build_model`) and its optimizer; where --init-from weights came from.

    ZeRO-3 never holds the whole model: the model's tensors are allocated and never filled (untouched memory the
    kernel does not back), and the optimizer keeps each rank's part of every initial value as the values are
    drawn, one tensor at a time; weights to load into the whole model (a merged checkpoint, --init-from) go in
    once the optimizer can gather it."""
    t, device = cfg.train, precision.device
    lazy = builds_lazily(t)
    model, init_note, pending = _build_model(cfg, topo, start, lazy)
    if lazy:  # the buffers only: the placeholders stay where they are (the shard goes to the device)
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, buffer.to(device))
    else:
        model = precision.convert(model.to(device))  # fp8: torchao's float8 linear layers
    _speed_up(model, t, topo, device)
    # A resume's own slice file becomes the optimizer's state (ZeRO-3: its shard of the weights too, so nothing is
    # drawn: the values would be replaced).
    adopt = start.own_slice if start.own else None
    initial = None
    if lazy and adopt is not None:
        initial = ()  # (a slice that turns out not to fit: the merged state's weights replace the zeros)
    elif lazy:
        torch.manual_seed(t.seed)  # the draws of a model built now (as `_build_model` seeds its build)
        initial = model.initial_values()
    optimizer = build_optimizer(model, cfg, topo, initial, device if lazy else None, adopt)
    if pending is not None:
        with optimizer.whole_model():
            load_model(model, pending, pending["source"], topo.tp_rank, topo.tp)
    return model, optimizer, init_note


def builds_lazily(t: TrainConfig) -> bool:
    """ZeRO-3 (fp8 swaps the linear layers, reading their weights: built whole) initialises rank by rank."""
    return t.zero == 3 and t.precision != "fp8"


def _samplers(
    cfg: JobConfig, data: Dataset | Blend, topo: Topology
) -> tuple[WindowSampler | BlendSampler, ValidationSets]:
    """This replica's training and validation batches; all TP ranks (and stages) of a replica see the same."""
    t = cfg.train
    return make_samplers(data, cfg.model.seq_len, t.batch_size, topo.dp_rank, topo.dp, t.seed)


def _tokens_per_step(cfg: JobConfig, topo: Topology) -> int:
    """Tokens in one global batch: batch_size x micro-batches (accumulated, or a pipeline's) x seq_len x
    replicas."""
    t = cfg.train
    return t.batch_size * t.accumulation_steps * cfg.parallel.microbatches * cfg.model.seq_len * topo.dp


def _build_model(
    cfg: JobConfig, topo: Topology, start: Start, lazy: bool = False
) -> tuple[GPT, str | None, dict[str, Any] | None]:
    """The model (this rank's shard), with the weights of the checkpoint to continue or to start from; with
    --init-from, where its weights came from (for the log). `lazy`: its tensors allocated but neither filled nor
    loaded (ZeRO-3, see `_model_and_optimizer`), and the --init-from state returned to load later."""
    # Every rank seeds alike: a TP rank builds the full tensors and keeps its slice (layout-independent init).
    torch.manual_seed(cfg.train.seed)
    if topo.pp == 1:
        model = GPT(cfg.model, topo.tp_group, init=not lazy)
    else:  # this rank's stage: its layers of the split, layout-independent init as the GPT's
        p = cfg.parallel  # with virtual stages, the split's chunks (hvdlm.parallel.interleaved)
        counts = chunk_layers(cfg.model.n_layer, topo.pp, p.pp_layers, p.virtual_stages)
        model = GPTStage(cfg.model, counts, topo.pp_rank, topo.tp_group, p.virtual_stages, init=not lazy)
    note = pending = None
    with together("model_loaded"):
        if start.state is not None:  # before a stage's cut, which keeps only its own RNG states
            check_same_global_batch(start.state, cfg, topo.dp, start.source)
        if start.state is not None and topo.pp > 1 and not start.own:
            start.state = stage_state(start.state, model, topo.pp_rank, topo.pp)  # this stage's part, for restore
        if start.state is not None:
            check_compatible(start.state, cfg.train, start.source)
            local = start.own and topo.tp > 1  # (a one-file save holds the vocabulary's real rows: cut as merged)
            if start.own or not lazy:
                load_model(model, start.state, start.source, topo.tp_rank, topo.tp, local, start.held())
            else:  # (restore_checkpoint loads it into the gathered model; refused here, before the optimizer)
                check_model_shape(model, start.state, start.source)
        elif cfg.train.init_from:
            # An hvdlm run or checkpoint, or a transformers GPT-2 directory (whose tokenizer the data must share).
            state = load_init_state(cfg.train.init_from, dataset_dir(cfg.data))
            if topo.pp > 1:
                state = stage_state(state, model, topo.pp_rank, topo.pp)
            if lazy:
                check_model_shape(model, state, state["source"])
                pending = state
            else:
                load_model(model, state, state["source"], topo.tp_rank, topo.tp)
            note = f"initialised from {state['origin']}; new optimizer and data order"
    return model, note, pending


def _restore(trainer: Trainer, start: Start) -> int:
    """The first step: the checkpoint's, with its state put back, or 0 with a fresh dropout stream.

    A fresh run seeds one dropout stream per replica, shared by its TP ranks, whose replicated activations must
    be dropped alike (replicas would otherwise all drop the same units of different samples).
    """
    if start.state is None:
        torch.manual_seed(trainer.t.seed + 1 + trainer.topo.dp_rank)
        return 0
    # (lazily built, the model holds a merged state's weights only once restore_checkpoint gathers it)
    return restore_checkpoint(trainer, start, weights_loaded=start.own or not builds_lazily(trainer.t))


def _banner(trainer: Trainer, start: Start) -> None:
    t, data, log = trainer.t, trainer.data, trainer.logger
    micro = t.accumulation_steps * trainer.cfg.parallel.microbatches
    mode = f"local SGD every {t.local_sgd_interval} steps," if t.local_sgd_interval else "synchronous"
    log.info(
        f"hvdlm: {hvd.size()} rank(s) ({_layout(trainer)}) x {torch.get_num_threads()} thread(s) on "
        f"{trainer.device.type} in {t.precision}{_compiled(trainer.model)}, "
        f"{format_count(trainer.model.num_params())} parameters, "
        f"{trainer.throughput.tokens_per_step} tokens per step ({micro} micro-batch(es)), {mode} "
        f"{t.optimizer}, {describe_data(data, trainer.train_batches)}"
    )
    log.info(f"run directory: {trainer.run_dir}")
    if note := tokenizer_setting_note(trainer.cfg.data, data.meta):
        log.info(note)
    if start.state is not None:
        # (each rank of the layout that saved reads its own files; any other layout reads them all, merged)
        how = "each rank read its own files" if start.own else f"merged from its {len(start.paths)} shard file(s)"
        log.info(f"resumed from {start.source} at step {trainer.first_step} ({how})")
    if note := zero_note(t):
        log.info(note)


def _layout(trainer: Trainer) -> str:
    topo, p = trainer.topo, trainer.cfg.parallel
    if topo.pp == 1:
        return f"tp {topo.tp} x dp {topo.dp}"
    counts = layers_per_rank(
        chunk_layers(trainer.cfg.model.n_layer, topo.pp, p.pp_layers, p.virtual_stages), topo.pp, p.virtual_stages
    )
    v = p.virtual_stages
    bubble = bubble_fraction(topo.pp, p.microbatches, v)
    schedule = f"interleaved 1f1b, {v} virtual stages" if v > 1 else p.schedule
    return (
        f"pp {topo.pp} x dp {topo.dp} x tp {topo.tp}; layers per stage {counts}, {p.microbatches} micro-batches, "
        f"{schedule}, bubble {bubble:.0%}"
    )


def _speed_up(model: GPT, t: TrainConfig, topo: Topology, device: torch.device) -> None:
    """What the fastest single-GPU GPT trainers do (nanoGPT, llm.c): TF32 tensor cores for fp32 matmuls, and
    torch.compile (train.compile; hvdlm.config refuses "on" with tp > 1)."""
    if device.type == "cuda":
        # fp32 matmuls on TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation), as nanoGPT and llm.c do;
        # bf16 and fp16 autocast are unaffected. flops.peak_tflops reads this flag for MFU.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # ZeRO-3's gathers are module hooks, which a compiled module would trace into its graph: eager (config
    # refuses "on").
    auto = t.compile == "auto" and device.type == "cuda" and topo.tp == 1 and topo.pp == 1 and t.zero != 3
    if t.compile == "on" or auto:
        if topo.dp == topo.tp == topo.pp == 1:
            # One rank: no gradient allreduce to overlap with backward, so the whole model is one graph, which
            # fuses across the blocks' seams (2 % of GPT-2's step on an H200, bench/log/RESULTS.md).
            model.compile()
        else:
            model.compile_parts()


def _compiled(model: GPT) -> str:
    blocks = model.blocks.values() if isinstance(model.blocks, torch.nn.ModuleDict) else model.blocks
    parts = [model, *blocks]
    return " (compiled)" if any(getattr(m, "_compiled_call_impl", None) for m in parts) else ""


def _node_exchange_comm():
    """mpi4py's world where the ranks can tell each other which GPUs they see; None without GPUs (nothing to
    share) or without MPI (horovodrun with Gloo: the device is then chosen from counts alone)."""
    if not torch.cuda.is_available() or not hvd.mpi_enabled():
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _load_dataset(cfg: JobConfig) -> Dataset | Blend:
    """One rank per node prepares the built-in corpus on first use (atomically, so nodes sharing a file system
    cannot collide); every rank waits for all of them, then memory-maps the dataset."""
    # The agreement is the barrier too, and tells every rank about a failure on any node.
    with together("data_ready"):
        if hvd.local_rank() == 0:
            ensure_dataset(cfg.data, log=print if hvd.rank() == 0 else (lambda message: None))
    return open_blend(cfg.data) if cfg.data.blend else open_dataset(dataset_dir(cfg.data))


# -- helpers without state -------------------------------------------------------------------------------------


@torch.no_grad()
def _validation_loss(
    model: GPT, batches: WindowSampler, n_batches: int, device: torch.device, precision: Precision
) -> float:
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(n_batches):
        x, y = to_device(batches.eval_batch(i), device)
        with precision.autocast():
            total += model(x, y)[1].float()
    # Every rank evaluated its own slice of the same validation batches; average them.
    return jobwide.mean(total / n_batches, "val_loss")


def _param_checksum(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A digest of every parameter's bytes (the model's state_dict sorted by name, as the optimizer's
    `state_tensors` gives it): equal digests mean bit-identical replicas."""
    h = hashlib.sha256()
    for name, p in tensors:
        h.update(name.encode())
        # A copy: numpy's view of a tensor's own storage would pin it (ZeRO-3 resizes its weights' storage).
        h.update(p.detach().cpu().clone().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _sample(model: GPT, tokenizer, t: TrainConfig, device: torch.device) -> str:
    """train.sample_tokens tokens continuing train.sample_prompt, or a new document: the tokenizer's separator
    (the end-of-document token, or the blank line between byte-level documents) suits any data."""
    ids = tokenizer.encode(t.sample_prompt) if t.sample_prompt else tokenizer.separator.tolist()
    prompt = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(t.seed)
    out = model.eval().generate(prompt, t.sample_tokens, generator=generator)[0].tolist()
    # A new document is shown without the separator it started from; a prompt is shown with its continuation.
    return tokenizer.decode(out if t.sample_prompt else out[len(ids) :])
