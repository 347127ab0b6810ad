"""Rank-0 reporting: a progress bar, a log line per interval, metrics.jsonl and TensorBoard in the run directory.

Every other rank gets a logger whose methods do nothing, so the training loop calls it unconditionally.

metrics.jsonl is the record of the run (one JSON object per row, `hvdlm plot` reads it); TensorBoard event
files in RUN_DIR/tensorboard show the same numbers live (`tensorboard --logdir runs/`). A resumed run first cuts
both back to the step it resumes from, so that they read as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from hvdlm.fsutil import atomic_write
from hvdlm.runfiles import METRICS_FILE, TENSORBOARD_DIR


class RunLogger:
    """Rank 0's reporter. `resume_step` S (not None): this run continues an earlier attempt after its step S."""

    def __init__(
        self,
        run_dir: Path | None,
        max_steps: int,
        enabled: bool,
        tensorboard: bool = False,
        resume_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.failure: str | None = None  # why metrics.jsonl could not be written
        self._file = None
        self._writer = None
        self._bar = None
        if not enabled:
            return
        if run_dir is not None:
            run_dir = Path(run_dir)
            if resume_step is not None:
                truncate_metrics(run_dir / METRICS_FILE, resume_step)
            self._file = open(run_dir / METRICS_FILE, "a", buffering=1)  # created when not there
            if tensorboard:
                self._writer = _summary_writer(run_dir / TENSORBOARD_DIR, resume_step)
        # A bar only where someone watches: a terminal, or `hvdlm launch` run from one (HVDLM_PROGRESS=1).
        if os.environ.get("HVDLM_PROGRESS") == "1" or sys.stderr.isatty():
            from tqdm import tqdm  # only where a bar is drawn: job-prep commands import this module

            self._bar = tqdm(
                total=max_steps,
                initial=resume_step or 0,
                desc="train",
                unit="step",
                ncols=100,
                mininterval=0.5,
                file=sys.stderr,
            )

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def record(self, row: dict[str, Any]) -> None:
        """One row of metrics.jsonl (with the wall-clock "time" added), and its numbers as TensorBoard scalars.

        A failed write (a full disk) does not raise here, on rank 0 alone: it is kept in `failure`, which the
        trainer's stop vote hands to every rank, so that all of them stop together."""
        if self._file:
            # JSON has no NaN or Infinity (Python would write them, strict readers refuse them): null instead.
            clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
            try:
                self._file.write(json.dumps({**clean, "time": round(time.time(), 3)}, allow_nan=False) + "\n")
            except OSError as e:
                self.failure = f"cannot write '{self._file.name}': {e.strerror or e}"
                self._close_file()
        if self._writer is not None and isinstance(row.get("step"), int):
            for tag, value in scalars_of(row).items():
                self._writer.add_scalar(tag, value, global_step=row["step"])

    def advance(self, steps: int = 1, loss: float | None = None) -> None:
        if self._bar is not None:
            if steps:
                self._bar.update(steps)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._close_file()
        if self._writer is not None:
            self._writer.close()  # flushes the pending events
            self._writer = None

    def _close_file(self) -> None:
        if self._file:
            try:
                self._file.close()
            except OSError:  # the buffered rest of a line that a full disk refused: failure says so already
                pass
            self._file = None


def scalars_of(row: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of a metrics row: its finite numbers, tagged by kind.

    Evaluation rows (they carry "val_loss") give val/loss, val/ppl, ...; training rows train/loss, train/lr,
    train/tokens_per_s, train/mfu, ...; a skipped step gives train/skipped = 1. "step" is the x axis and "time"
    TensorBoard's own wall time, so neither is a scalar; nulls (mfu without a known peak) are left out.
    """
    if "skipped" in row:
        return {"train/skipped": 1.0}
    validation = "val_loss" in row
    out = {}
    for key, value in row.items():
        if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        if validation:
            if not key.startswith("val_"):
                continue  # the tokens of an evaluation row are the training row's, already plotted
            out[f"val/{key[len('val_') :]}"] = float(value)
        else:
            out[f"train/{key}"] = float(value)
    return out


def truncate_metrics(path: Path, resume_step: int) -> None:
    """Cut metrics.jsonl back to the rows of steps <= resume_step, atomically (hvdlm.fsutil).

    The steps after the checkpoint are trained again, so their rows would otherwise appear twice. resume_step 0
    means the run starts over (no checkpoint was there): every row goes, the step-0 evaluation is redone.
    Lines that do not parse as a JSON object with a step are kept untouched: they are not ours to judge, and
    `hvdlm plot` names them to the user. The exception is a last line without its newline that does not parse:
    the torn write of a process killed mid-line, which belongs to a step after the checkpoint.
    """
    if not path.exists():
        return
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    kept = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                continue  # torn last write
            kept.append(line if line.endswith("\n") else line + "\n")
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            kept.append(line if line.endswith("\n") else line + "\n")
        elif resume_step > 0 and step <= resume_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write(path, "".join(kept))  # a failed rewrite leaves the original as it was


def _summary_writer(log_dir: Path, resume_step: int | None):
    """A TensorBoard writer; on resume it purges the earlier attempt's events after the resume step.

    purge_step P makes TensorBoard drop every earlier event with step >= P when it reads the directory: P = S + 1
    keeps steps 0..S of a run resumed after step S; P = 0 drops all for a run that starts over (S = 0).
    Imported here: tensorboard is slow to import and only rank 0 with train.tensorboard on needs it.
    """
    from torch.utils.tensorboard import SummaryWriter

    purge = None if resume_step is None else (resume_step + 1 if resume_step > 0 else 0)
    # flush_secs: the events reach the disk every 30 s, so a live TensorBoard follows and a killed run loses little.
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge, flush_secs=30)
