"""Where a run starts: fresh, from another run's weights (init_from), or where an earlier attempt stopped.

Rank 0 looks at the run directory and decides; every rank hears the decision, then loads the checkpoint itself
(merged to one unsharded state, so it loads at any TP size). The RNG states travel in the checkpoint per DP rank,
so a resumed run draws the same dropout masks as one never interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import horovod.torch as hvd
import torch

from hvdlm.checkpoint.reshard import load_full_state, merge_states
from hvdlm.checkpoint.store import newest_loadable, resolve_checkpoint, shard_paths
from hvdlm.config import TrainConfig
from hvdlm.errors import InputError


@dataclass
class Start:
    run_dir: Path
    state: dict[str, Any] | None  # the unsharded checkpoint to continue from; None: step 0
    source: str = ""  # where state came from, for messages


def agree_on_start(requested: str | None, default: Path, resume: str | None) -> Start:
    """Rank 0 picks the run directory and, with `resume`, the checkpoint; every rank loads that checkpoint."""
    answer: dict[str, Any] = {}
    loaded = None
    if hvd.rank() == 0:
        path = Path(requested or default).resolve()
        answer["path"] = str(path)
        try:
            if resume == "auto":
                # None: no checkpoint yet, a fresh start (the first start of a job that may be requeued).
                found = newest_loadable(path, warn=lambda message: print(message, flush=True))
                if found:
                    answer["paths"] = [str(p) for p in found[0].paths]
                    loaded = merge_states(found[1])
            elif resume:
                answer["paths"] = [str(p) for p in shard_paths(resolve_checkpoint(resume))]
        except InputError as e:
            answer["error"] = str(e)
    # Horovod: a broadcast doubles as the barrier that keeps other ranks from racing ahead of rank 0's look.
    answer = hvd.broadcast_object(answer, root_rank=0, name="start")
    if "error" in answer:
        raise InputError(answer["error"])
    if "paths" not in answer:
        return Start(Path(answer["path"]), None)
    error = None
    try:
        state = loaded if loaded is not None else load_full_state(answer["paths"][0])
    except InputError as e:  # e.g. a file system that this node sees differently
        error, state = str(e), None
    raise_if_any(error, "resume_loaded")
    return Start(Path(answer["path"]), state, source=answer["paths"][0])


def raise_if_any(error: str | None, name: str) -> None:
    """Every rank raises the first rank's error, or none does: ranks must not part ways at a collective."""
    errors = [e for e in hvd.allgather_object(error, name=name) if e]
    if errors:
        raise InputError(errors[0])


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


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
