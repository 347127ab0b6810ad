"""Where a run starts: fresh, from another run's weights (init_from), or where an earlier attempt stopped.

Rank 0 looks at the run directory and decides; every rank hears the decision, then loads the checkpoint itself:
at the layout that saved it, only its own files (its shard file and its ZeRO slice: no rank ever holds more of
the state than training does); at any other, merged to one unsharded state, which loads at any TP size, stage
split and DP size. The RNG states travel in the checkpoint per DP rank, so a resumed run draws the same dropout
masks as one never interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hvdlm.checkpoint.format import load_own_files
from hvdlm.checkpoint.manager import stage_record
from hvdlm.checkpoint.reshard import load_full_state, load_model
from hvdlm.checkpoint.stages import stage_state
from hvdlm.checkpoint.store import (
    newest_intact,
    remove_stale_temporaries,
    resolve_checkpoint,
    set_aside_newer,
    shard_paths,
)
from hvdlm.config import JobConfig, TrainConfig
from hvdlm.errors import InputError
from hvdlm.fsutil import atomic_write
from hvdlm.parallel import jobwide
from hvdlm.parallel.agreement import rank0_decides, together
from hvdlm.parallel.topology import Topology
from hvdlm.runfiles import CONFIG_FILE, refuse_to_overwrite


@dataclass
class Start:
    run_dir: Path
    state: dict[str, Any] | None  # the checkpoint to continue from (unsharded, or `own`); None: step 0
    source: str = ""  # where state came from, for messages
    paths: list[Path] = field(default_factory=list)  # the save's shard files, stage-major
    own: bool = False  # state is this rank's own shard file as written, at the layout that wrote it
    own_slice: dict[str, Any] | None = None  # with `own` and ZeRO: this rank's slice file
    verified: bool = False  # every file of the save passed its manifest check already

    def held(self) -> frozenset[str]:
        """The parameters this rank's own slice holds in place of its shard file (ZeRO-3)."""
        weights = (self.own_slice or {}).get("weights") or {}
        return frozenset(name for names in weights.get("names", []) for name in names)


def agree_on_start(requested: str | None, default: Path, resume: str | None, cfg: JobConfig, topo: Topology) -> Start:
    """Rank 0 picks the run directory and, with `resume`, the checkpoint; every rank loads that checkpoint: only
    its own files where the run's layout is the one that saved (every rank's answer agreeing), else merged."""

    def look() -> dict[str, Any]:
        path = Path(requested or default).resolve()
        if resume == "auto":
            # None: no checkpoint yet, a fresh start (the first start of a job that may be requeued).
            found = newest_intact(path, warn=lambda message: print(message, flush=True))
            if not found:
                return {"path": str(path)}
            return {"path": str(path), "paths": [str(p) for p in found.paths], "verified": True}
        if resume:
            return {"path": str(path), "paths": [str(p) for p in shard_paths(resolve_checkpoint(resume))]}
        return {"path": str(path)}

    answer = rank0_decides(look, "start")
    run_dir = Path(answer["path"])
    if "paths" not in answer:
        return Start(run_dir, None)
    return load_save(run_dir, [Path(p) for p in answer["paths"]], bool(answer.get("verified")), cfg, topo)


def load_save(run_dir: Path, paths: list[Path], verified: bool, cfg: JobConfig, topo: Topology) -> Start:
    """Every rank: the save of these shard files, its own files where every rank's are of this layout, else the
    merged state (uncut: a stage takes its part with hvdlm.checkpoint.stages.stage_state). Collective."""
    with together("resume_own_files"):  # e.g. a file system that this node sees differently
        own = own_start(run_dir, paths, verified, cfg, topo)
    if all(jobwide.allgather_object(own is not None, "resume_own")):
        return own
    del own  # (its tensors, before the merged state's)
    with together("resume_loaded"):
        state = load_full_state(paths[0], verify=not verified)
    return Start(run_dir, state, str(paths[0]), paths, verified=verified)


def own_start(run_dir: Path, paths: list[Path], verified: bool, cfg: JobConfig, topo: Topology) -> Start | None:
    """This rank's own shard file (and ZeRO slice file) where the save's layout is this run's: the same TP size,
    stages split alike, ZeRO at the same stage on as many DP ranks, the EMA kept if this run keeps one. None
    where any differs (the merged state reshards)."""
    if len(paths) != topo.pp * topo.tp:
        return None
    path = paths[topo.pp_rank * topo.tp + topo.tp_rank]
    state, own_slice = load_own_files(path, topo.dp_rank, topo.dp, verify=not verified)
    theirs = state.get("config") or {}
    zero = cfg.train.zero if own_slice is not None else 0
    same = (
        state.get("tp", {}).get("size", 1) == topo.tp
        and (state.get("pp") or None) == (stage_record(cfg, topo.pp_rank) if topo.pp > 1 else None)
        and theirs.get("train", {}).get("zero", 0) == zero
        and (not cfg.train.ema_decay or "ema" in state)
    )
    if not same:
        return None
    return Start(run_dir, state, str(paths[0]), paths, own=True, own_slice=own_slice, verified=verified)


def restore_checkpoint(run: Any, start: Start, weights_loaded: bool) -> int:
    """Put `start`'s save into a built trainer (`run`: its model, optimizer, topology and checkpoint manager);
    returns its step. `weights_loaded`: the model holds the save's weights already (setup loads them before the
    optimizer shards them); a stage's merged state is its own part already (stage_state). Collective.

    Own files: the optimizer takes its slice as it is, unless another bucket size (say) cuts the flat buffer
    otherwise on some rank; then every rank goes back to the merged state."""
    topo, optimizer, model = run.topo, run.optimizer, run.model
    if start.own:
        sliced = start.own_slice is not None
        taken = optimizer.load_checkpoint_slice(start.own_slice) if sliced else True
        if all(jobwide.allgather_object(taken, "resume_slice")):
            if not weights_loaded:  # (ZeRO-3: the parameters are the slice's, `held`, taken above)
                load_model(model, start.state, start.source, topo.tp_rank, topo.tp, topo.tp > 1, start.held())
            return run.checkpoints.restore(start.state, run, local=topo.tp > 1, sliced=sliced)
        merged = merged_start(start, model, topo)
        start.own = False  # (for the banner)
        start, weights_loaded = merged, False  # ZeRO-3: the weights too, which the own slice would have held
    # ZeRO-3: the merged state is loaded into the whole weights, and its shard cut from them after.
    with optimizer.whole_model():
        if not weights_loaded:
            load_model(model, start.state, start.source, topo.tp_rank, topo.tp)
        return run.checkpoints.restore(start.state, run)


def merged_start(start: Start, model: torch.nn.Module, topo: Topology) -> Start:
    """The merged state of `start`'s save, cut to this rank's stage: where its own slice would not load after all
    (another bucket size cuts the flat buffer otherwise)."""
    state = load_full_state(start.paths[0], verify=not start.verified)
    if topo.pp > 1:
        state = stage_state(state, model, topo.pp_rank, topo.pp)
    return Start(start.run_dir, state, start.source, start.paths, verified=start.verified)


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
