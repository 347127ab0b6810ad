"""Where a run starts: fresh, from another run's weights (init_from), or where an earlier attempt stopped.

Rank 0 looks at the run directory and decides; every rank hears the decision, then loads the checkpoint itself
(merged to one unsharded state, so it loads at any TP size). The RNG states travel in the checkpoint per DP rank,
so a resumed run draws the same dropout masks as one never interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvdlm.checkpoint.reshard import load_full_state, merge_states
from hvdlm.checkpoint.store import (
    newest_loadable,
    remove_stale_temporaries,
    resolve_checkpoint,
    set_aside_newer,
    shard_paths,
)
from hvdlm.config import JobConfig, TrainConfig
from hvdlm.errors import InputError
from hvdlm.fsutil import atomic_write
from hvdlm.parallel.agreement import rank0_decides, together
from hvdlm.runfiles import CONFIG_FILE, refuse_to_overwrite


@dataclass
class Start:
    run_dir: Path
    state: dict[str, Any] | None  # the unsharded checkpoint to continue from; None: step 0
    source: str = ""  # where state came from, for messages


def agree_on_start(requested: str | None, default: Path, resume: str | None) -> Start:
    """Rank 0 picks the run directory and, with `resume`, the checkpoint; every rank loads that checkpoint."""
    loaded: list[dict[str, Any]] = []  # rank 0 keeps the states it read while looking, instead of reading twice

    def look() -> dict[str, Any]:
        path = Path(requested or default).resolve()
        if resume == "auto":
            # None: no checkpoint yet, a fresh start (the first start of a job that may be requeued).
            found = newest_loadable(path, warn=lambda message: print(message, flush=True))
            if not found:
                return {"path": str(path)}
            loaded.append(merge_states(found[1]))
            return {"path": str(path), "paths": [str(p) for p in found[0].paths]}
        if resume:
            return {"path": str(path), "paths": [str(p) for p in shard_paths(resolve_checkpoint(resume))]}
        return {"path": str(path)}

    answer = rank0_decides(look, "start")
    if "paths" not in answer:
        return Start(Path(answer["path"]), None)
    with together("resume_loaded"):  # e.g. a file system that this node sees differently
        state = loaded[0] if loaded else load_full_state(answer["paths"][0])
    return Start(Path(answer["path"]), state, source=answer["paths"][0])


def prepare_run_dir(start: Start, config_toml: str, resume_step: int | None) -> Path:
    """Rank 0 creates the run directory and writes config.toml; every rank gets its answer.

    A new run never writes over an old one (metrics.jsonl marks a run). A run resumed from step S (0: nothing to
    resume yet) rewrites config.toml with the resolved config of this attempt (max_steps may have grown), sets
    aside checkpoints after S, which belong to an abandoned attempt, and clears temporaries of killed saves.
    """

    def prepare() -> None:
        path = start.run_dir
        if resume_step is None:
            refuse_to_overwrite(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            atomic_write(path / CONFIG_FILE, config_toml)
        except OSError as e:
            raise InputError(
                f"cannot write the run directory '{path}': {e.strerror or e}. Pass a --run-dir where you can write "
                "and that has room."
            ) from None
        if resume_step is not None:
            remove_stale_temporaries(path)
            aside = set_aside_newer(path, resume_step)
            if aside:
                print(f"note: checkpoints after step {resume_step} moved to {aside}", flush=True)

    rank0_decides(prepare, "run_dir")
    return start.run_dir


def check_compatible(state: dict[str, Any], cfg_train: TrainConfig, source: str) -> None:
    """What a checkpoint cannot be continued into: another optimizer, or a run that ends before it."""
    if state["step"] > cfg_train.max_steps:
        raise InputError(
            f"checkpoint '{source}' is at step {state['step']}, past train.max_steps = {cfg_train.max_steps}: there "
            f"is nothing left to train. Raise max_steps (e.g. --set train.max_steps={2 * state['step']}) to go on."
        )
    theirs = state.get("config", {}).get("train", {}).get("optimizer", "adamw")
    if theirs != cfg_train.optimizer:
        raise InputError(
            f"checkpoint '{source}' was written with train.optimizer = \"{theirs}\", this job uses "
            f'"{cfg_train.optimizer}": its optimizer state does not carry over. Resume with optimizer = '
            f'"{theirs}", or start a new run from its weights with --init-from.'
        )


def check_same_global_batch(state: dict[str, Any], cfg: JobConfig, dp: int, source: str) -> None:
    """A checkpoint continued on another number of pipeline stages keeps its global batch (sequences per step:
    batch_size x replicas x micro-batches). Resumed without the run's pipeline settings, the stages' ranks become
    replicas and the micro-batches one, which changes it silently (often halves it). A changed train.batch_size
    says the change is meant; --max-restarts keeps the stages and says itself how the batch changes."""
    config = state.get("config") or {}
    theirs_p, theirs_t = config.get("parallel", {}), config.get("train", {})
    pp, t, p = theirs_p.get("pp", 1), cfg.train, cfg.parallel
    replicas = _replicas(state)
    if pp == p.pp or replicas is None or theirs_t.get("batch_size") != t.batch_size:
        return
    micro = theirs_t.get("accumulation_steps", 1) * theirs_p.get("microbatches", 1)
    theirs, ours = t.batch_size * replicas * micro, t.batch_size * dp * t.accumulation_steps * p.microbatches
    if theirs == ours:
        return
    key = "parallel.microbatches" if p.pp > 1 else "train.accumulation_steps"
    keep = (
        f", or keep it here with --set {key}={theirs // (t.batch_size * dp)}"
        if theirs % (t.batch_size * dp) == 0
        else ""
    )
    raise InputError(
        f"checkpoint '{source}' was written by {pp} pipeline stage(s) (parallel.pp = {pp}, parallel.microbatches = "
        f"{theirs_p.get('microbatches', 1)}) taking {theirs} sequences per step, and this job, with parallel.pp = "
        f"{p.pp} on {dp} replica(s), would take {ours}: the global batch would change. Resume with the run's "
        f"settings (--set parallel.pp={pp} --set parallel.microbatches={theirs_p.get('microbatches', 1)}){keep}; "
        "to change the global batch on purpose, change train.batch_size."
    )


def _replicas(state: dict[str, Any]) -> int | None:
    """The data-parallel replicas of the run that wrote `state`: its RNG states, one per replica (per stage)."""
    by_stage = (state.get("pp") or {}).get("rng_by_stage")
    rngs = by_stage[0] if by_stage else state.get("rng")
    return len(rngs) if isinstance(rngs, list) and rngs else None
