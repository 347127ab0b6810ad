"""Loss-spike rollback (train.spike_rollback): the ranks agree on a spike, go back to the newest checkpoint from
before it, skip the data that led to it, and go on; a spike that keeps coming back stops the run.

How the ranks agree. Every rank computes the same global loss each step (one scalar allreduce), but only rank 0's
detector (hvdlm.training.spike) decides: it puts Stop.SPIKE into the stop vote of the next step, which every rank
reads after that step (hvdlm.training.preemption). So all ranks roll back after the same step, one step after
the spike is confirmed, whatever each rank's own arithmetic made of the loss; rank 0 then picks the checkpoint and
every rank hears its choice (hvdlm.parallel.agreement).

Which checkpoint. The loss of step s is computed with the weights after step s - 1, so the checkpoint of step c
is seen to be healthy by the loss of step c + 1. A spike whose first high step is b therefore goes back to the
newest complete checkpoint of a step <= b - 2: the weights of step b - 1 may be the damaged ones (an update that
went wrong shows only in the next loss). Newer checkpoints (written during the spike) are set aside, as a resume
sets aside an abandoned attempt's (hvdlm.checkpoint.store.set_aside_newer), so that `--resume auto` never takes
them. A damaged checkpoint is passed over for the one before, as `--resume auto` does.

What is skipped. The run goes on from the checkpoint's step with everything it held (weights, optimizer, EMA,
random streams) except the data position: the sampler stays where it was (hvdlm.data.sampler), so every batch
trained since the checkpoint (its steps c + 1 up to the rollback) is skipped, and the steps are trained again on
the data after them. metrics.jsonl is cut back to the checkpoint's step, as for a resume, and gets one row
{"step": c, "rollback": {...}} with the spike's losses, its statistics and the skipped window.

When it stops. A rollback whose spike comes back before the run has got past the step it rolled back from is
one more in a row; after train.spike_max_rollbacks in a row, the next spike stops the run with SpikeRecurred
(exit hvdlm.runfiles.SPIKE_EXIT_CODE). So does a spike with no checkpoint from before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import horovod.torch as hvd

from hvdlm.checkpoint.stages import stage_state
from hvdlm.checkpoint.store import newest_intact, set_aside_newer
from hvdlm.config import TrainConfig
from hvdlm.parallel import jobwide
from hvdlm.parallel.agreement import rank0_decides, together
from hvdlm.runfiles import SPIKE_EXIT_CODE, SpikeRecurred
from hvdlm.training.metrics import RunLogger
from hvdlm.training.preemption import Stop
from hvdlm.training.resume import Start, load_save, restore_checkpoint
from hvdlm.training.spike import SpikeDetector, SpikeState

PROGRESS_KEY = "spike"  # the detector's state in the run's progress (carried in checkpoints)


def spike_guard(t: TrainConfig, progress: dict) -> SpikeGuard | None:
    """The run's guard when train.spike_rollback is on, with the detector state `progress` holds (a checkpoint's)."""
    return SpikeGuard(t, progress) if t.spike_rollback else None


class SpikeGuard:
    """The trainer's hooks: `observe` after each step's log, `roll_back` when the stop vote says SPIKE."""

    def __init__(self, t: TrainConfig, progress: dict):
        self.t = t
        self.detector = SpikeDetector(t.spike_sigma, t.spike_steps, t.spike_window)
        self.load(progress)

    def load(self, progress: dict) -> None:
        self.detector.state = SpikeState.from_dict(progress.get(PROGRESS_KEY))

    def observe(self, trainer, step: int, loss: Any, mean_loss: float | None) -> None:
        """Every rank, every step (a collective): the global loss into the detector; rank 0 votes on a spike."""
        if mean_loss is None:
            mean_loss = jobwide.mean(loss, "spike_loss")
        spike = self.detector.observe(step, mean_loss)
        trainer.progress[PROGRESS_KEY] = self.detector.state.to_dict()
        if spike is not None and hvd.rank() == 0:
            trainer.vote.local = max(trainer.vote.local, Stop.SPIKE)
            trainer.logger.info(
                f"step {step:>6} | loss spike: {self.t.spike_steps} steps in a row from step {spike.start} above "
                f"{spike.threshold:.4f} (running mean {spike.mean:.4f}, std {spike.std:.4f}, spike_sigma "
                f"{self.t.spike_sigma:g}), losses {', '.join(f'{x:.4f}' for x in spike.losses)}; the ranks roll "
                "back after the next step"
            )

    def roll_back(self, trainer, done: int) -> int:
        """Every rank, after step `done`: back to the checkpoint from before the spike, the data position kept;
        returns the step to go on from. Raises SpikeRecurred when the run must stop instead."""
        answer = rank0_decides(lambda: self._choose(trainer, done), f"spike_rollback.{done}")
        if "stop" in answer:
            raise SpikeRecurred(answer["stop"])
        position = trainer.train_batches.state_dict()  # the data position now, past every batch since the checkpoint
        state_before = self.detector.state
        paths = [Path(p) for p in answer["paths"]]
        start = load_save(trainer.run_dir, paths, True, trainer.cfg, trainer.topo)
        with together(f"spike_loaded.{done}"):
            step = _load(trainer, start)
        # Every step since the checkpoint took one global batch; earlier rollbacks' windows are counted by their own.
        skipped = (done - step) * trainer.throughput.tokens_per_step // trainer.cfg.model.seq_len
        trainer.train_batches.load_state_dict(position)
        # The statistics are the checkpoint's (healthy); the counts of rollbacks are the run's own.
        self.load(trainer.progress)
        s = self.detector.state
        s.rollbacks, s.in_a_row, s.rolled_back_from = state_before.rollbacks + 1, state_before.in_a_row + 1, done
        s.streak, s.spike = [], None
        trainer.progress[PROGRESS_KEY] = s.to_dict()
        if trainer.vote.local == Stop.SPIKE:
            trainer.vote.local = Stop.NO
        record = {
            **answer["spike"],
            "to_step": step,
            "from_step": done,
            "skipped_steps": [step + 1, done],
            "skipped_samples": skipped,
            "skipped_positions": [_consumed(position) - skipped, _consumed(position)],  # of the global order
            "skipped_tokens": skipped * trainer.cfg.model.seq_len,
            "rollbacks": s.rollbacks,
            "in_a_row": s.in_a_row,
            "set_aside": answer["aside"],
        }
        how = "each rank read its own files" if start.own else "merged"
        _log_rollback(trainer, step, record, self.t.spike_max_rollbacks, how)
        return step

    def _choose(self, trainer, done: int) -> dict[str, Any]:
        """Rank 0: the checkpoint to go back to (every file checked), or why the run stops."""
        s, t = self.detector.state, self.t
        spike = s.spike or {"start": done, "detected": done, "losses": []}  # (rank 0 votes only with a spike)
        trusted = spike["start"] - 2  # the newest step whose weights a healthy loss was seen from
        # Checkpoints written during the spike go aside whatever follows, so that --resume auto never takes one.
        aside = set_aside_newer(trainer.run_dir, trusted) if trusted >= 0 else None
        if s.in_a_row >= t.spike_max_rollbacks:
            return {"stop": _recurred_message(spike, t, s.in_a_row)}
        found = newest_intact(trainer.run_dir, warn=lambda message: print(message, flush=True))
        if found is None or found.step > trusted:
            return {"stop": _no_checkpoint_message(spike, t, trusted)}
        paths = [str(p) for p in found.paths]
        return {"paths": paths, "spike": spike, "aside": str(aside) if aside else None}


def _load(trainer, start: Start) -> int:
    """A checkpoint's model, optimizer, EMA, scaler, progress, random streams and data position, into the running
    trainer (as setup loads one to resume: each rank its own files at the layout that saved); its step."""
    topo = trainer.topo
    if not start.own and topo.pp > 1:
        start.state = stage_state(start.state, trainer.model, topo.pp_rank, topo.pp)
    return restore_checkpoint(trainer, start, weights_loaded=False)


def _consumed(data: dict[str, int]) -> int:
    """Samples of the global order a data position is past (hvdlm.data.sampler)."""
    return data["epoch"] * data["samples_per_epoch"] + data["position"]


def _log_rollback(trainer, step: int, record: dict[str, Any], max_rollbacks: int, how: str) -> None:
    """metrics.jsonl cut back to the checkpoint's step, as for a resume (the rows of the abandoned steps would
    otherwise show twice), then the rollback's row; and the log line (`how`: how the checkpoint was read)."""
    t = trainer.t
    trainer.logger.close()
    trainer.logger = RunLogger(trainer.run_dir, t.max_steps, hvd.rank() == 0, t.tensorboard, resume_step=step)
    trainer.logger.record({"step": step, "rollback": record})
    first, last = record["skipped_steps"]
    aside = (
        f"; checkpoints after step {record['start'] - 2} moved to {record['set_aside']}" if record["set_aside"] else ""
    )
    trainer.logger.info(
        f"step {record['from_step']:>6} | spike rollback {record['in_a_row']} of at most {max_rollbacks} in a row: "
        f"back to the checkpoint of step {step} ({how}), skipping the data of steps {first}-{last} "
        f"({record['skipped_samples']:,} samples, {record['skipped_tokens']:,} tokens){aside}"
    )
    trainer.throughput.restart()


def _recurred_message(spike: dict, t: TrainConfig, in_a_row: int) -> str:
    losses = ", ".join(f"{x:.4f}" for x in spike["losses"])
    what = f"the loss spiked from step {spike['start']} ({losses}, against a running mean of {spike['mean']:.4f})"
    if in_a_row:
        what = f"{what.replace('spiked', 'spiked again', 1)} after {in_a_row} rollback(s) in a row"
    return (
        f"{what} (train.spike_max_rollbacks = {t.spike_max_rollbacks}), so the run stops (exit {SPIKE_EXIT_CODE}). "
        "A spike that comes back on other data follows the run, not the data: lower train.lr, raise "
        "train.warmup_steps or set train.grad_clip, then continue with --resume auto (the checkpoints from before "
        "the spike are intact). If the rise is expected (a new data mix), raise train.spike_sigma or turn "
        "train.spike_rollback off."
    )


def _no_checkpoint_message(spike: dict, t: TrainConfig, trusted: int) -> str:
    return (
        f"a loss spike began at step {spike['start']}, and the run directory holds no complete checkpoint of step "
        f"{trusted} or before to roll back to (train.checkpoint_interval = {t.checkpoint_interval}, "
        f"keep_checkpoints = {t.keep_checkpoints}), so the run stops (exit {SPIKE_EXIT_CODE}). Write checkpoints "
        "more often, keep more of them, or raise train.spike_window so that judging starts after the first one; "
        "then start again (or continue from a checkpoint with --resume)."
    )
