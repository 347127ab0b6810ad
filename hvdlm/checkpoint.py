"""Checkpoints: written atomically (temporary file, fsync, rename), so a crash never leaves a torn file.

With tensor parallelism each TP rank writes its own shard, `step-0000100.tp1-of-2.pt`; without, one file,
`step-0000100.pt`. A file holds:

    model       the rank's state_dict (its shards, plus the replicated tensors)
    optimizer   the rank's optimizer state_dict
    step, config
    tp          {"rank", "size", "sharding": {name: [dim, full, chunks] or None}, "param_names": [[...], ...]}
    ema         the moving average of the weights, sharded like model (when enabled)
    scaler      the fp16 gradient scaler's state (when enabled)
    data        the sampler's position (the same on every rank)
    rng         the RNG states of the DP group's ranks holding this shard, by DP rank (dropout streams)
    progress    what the loop needs from before a restart (first and last validation loss, skipped steps in a row)

Every value is a tensor, a number, a string or a container of them, so `torch.load(weights_only=True)` reads it:
a checkpoint file is data and never runs code.

`sharding` says how each tensor was cut (see hvdlm.layers.Sharding), so shards can be merged without building
the model; `param_names` names the optimizer's parameters (per group, in order), so its state merges the same
way. `merge_states` makes one unsharded state of any set of shards; `load_model` and `load_optimizer` cut a full
state to the loading model's TP size, so a checkpoint written with any TP size loads into any other.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hvdlm.errors import InputError
from hvdlm.layers import Sharding, full_shape, merge, shard

_SHARD_NAME = re.compile(r"^(?P<stem>.+)\.tp(?P<rank>\d+)-of-(?P<size>\d+)\.pt$")
_STEP_STEM = re.compile(r"^step-(?P<step>\d+)$")


def checkpoint_path(run_dir: Path, step: int, tp_rank: int = 0, tp: int = 1) -> Path:
    """The file of TP rank `tp_rank` (of `tp`) at `step`; one unsharded file when tp = 1."""
    stem = run_dir / "checkpoints" / f"step-{step:07d}"
    return stem.with_name(f"{stem.name}.pt" if tp == 1 else f"{stem.name}.tp{tp_rank}-of-{tp}.pt")


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an interrupt leaves no half-written file behind
        raise
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only: a checkpoint file is data and never runs code.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler raises many kinds on damaged or foreign bytes
        size = path.stat().st_size if path.is_file() else 0
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        if "weights_only" in reason:  # torch's advice to load with weights_only=False, which hvdlm never does
            reason = "it is not a torch file of tensors and plain values only"
        raise InputError(
            f"cannot read checkpoint '{path}' ({size:,} bytes): it is truncated, damaged or not a checkpoint "
            f"({type(e).__name__}: {reason}). Copy it again, or name another step's checkpoint."
        ) from None
    _check_structure(state, path)
    return state


def _check_structure(state: Any, path: Path) -> None:
    """A torch file is not necessarily ours: refuse one that lacks what merging and loading read."""
    problem = None
    if not isinstance(state, dict):
        problem = f"it holds a {type(state).__name__}, not a checkpoint"
    elif not isinstance(state.get("model"), dict) or not all(torch.is_tensor(t) for t in state["model"].values()):
        problem = "it has no 'model' table of tensors"
    elif not isinstance(state.get("step"), int):
        problem = "it records no step"
    elif "tp" in state and not (isinstance(state["tp"], dict) and {"rank", "size", "sharding"} <= state["tp"].keys()):
        problem = "its tensor-parallel record is incomplete"
    if problem:
        raise InputError(
            f"'{path}' is not an hvdlm checkpoint: {problem}. Name a file from a run's checkpoints/ directory."
        )


# ------------------------------------------------------------------------------------------------------------
# What a rank saves
# ------------------------------------------------------------------------------------------------------------


def training_state(
    model: torch.nn.Module, optimizer, step: int, config: dict, tp_rank: int, tp: int, **extra: Any
) -> dict:  # fmt: skip
    """One rank's checkpoint: its shard of the model and optimizer, how to put the shards together, and `extra`
    (ema, scaler, data, rng, progress: see the module docstring)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {
        **{key: value for key, value in extra.items() if value is not None},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "config": config,
        "tp": {
            "rank": tp_rank, "size": tp, "sharding": sharding_of(model),
            "param_names": [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups],
        },  # fmt: skip
    }


def sharding_of(model: torch.nn.Module) -> dict[str, list[int] | None]:
    """How each state_dict entry is split, as plain lists (checkpoints load with weights_only)."""
    out: dict[str, list[int] | None] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        spec: Sharding | None = getattr(t, "tp_shard", None)
        out[name] = None if spec is None else [spec.dim, spec.full, spec.chunks]
    return out


# ------------------------------------------------------------------------------------------------------------
# Finding, merging and loading
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedCheckpoint:
    """One save in a run directory: its step and its files (one per TP rank, in rank order)."""

    step: int
    paths: tuple[Path, ...]


def find_checkpoints(run_dir: str | Path) -> list[SavedCheckpoint]:
    """The complete checkpoints in RUN_DIR/checkpoints, newest first.

    Complete means every shard file is there (a save killed between shards leaves an incomplete set, which is
    skipped); whether the files read is for `load_checkpoint` to say.
    """
    return [saved for saved, missing in _scan(run_dir) if not missing]


def _scan(run_dir: str | Path) -> list[tuple[SavedCheckpoint, list[str]]]:
    """Every save in RUN_DIR/checkpoints, newest first, with the names of its missing shard files."""
    found: dict[tuple[int, int], set[int]] = {}
    for p in (Path(run_dir) / "checkpoints").glob("step-*.pt"):
        if m := _SHARD_NAME.match(p.name):
            stem, rank, size = m["stem"], int(m["rank"]), int(m["size"])
        else:
            stem, rank, size = p.name[: -len(".pt")], 0, 1
        if (s := _STEP_STEM.match(stem)) and rank < size:
            found.setdefault((int(s["step"]), size), set()).add(rank)
    saves = []
    for (step, size), ranks in sorted(found.items(), reverse=True):
        paths = tuple(checkpoint_path(Path(run_dir), step, r, size) for r in range(size))
        saves.append((SavedCheckpoint(step, paths), [paths[r].name for r in range(size) if r not in ranks]))
    return saves


def newest_loadable(run_dir: str | Path, warn=print) -> tuple[SavedCheckpoint, list[dict[str, Any]]] | None:
    """The newest checkpoint of RUN_DIR whose every shard reads, with the shards' states; None if there is no
    complete checkpoint at all.

    A damaged, unreadable or incomplete newer one is reported through `warn` and passed over for the one before;
    complete checkpoints none of which reads are an InputError (nothing is changed).
    """
    damaged = 0
    for saved, missing in _scan(run_dir):
        if missing:
            warn(f"WARNING: skipping checkpoint step {saved.step}: incomplete, {', '.join(missing)} missing.")
            continue
        try:
            return saved, [load_checkpoint(p) for p in saved.paths]
        except InputError as e:
            damaged += 1
            warn(f"WARNING: skipping checkpoint step {saved.step}: {e}")
    if damaged:
        raise InputError(
            f"none of the checkpoints in '{Path(run_dir) / 'checkpoints'}' reads ({damaged} tried, see the warnings "
            "above). "
            "Restore them from a copy, or name a good checkpoint file; hvdlm leaves them as they are."
        )
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint named by a run directory (its newest complete checkpoint) or by a file (or any shard)."""
    path = Path(path)
    if path.is_dir() and path.name == "checkpoints" and not (path / "checkpoints").is_dir():
        path = path.parent  # RUN_DIR/checkpoints named instead of RUN_DIR
    if path.is_dir():
        saved = find_checkpoints(path)
        if not saved:
            raise InputError(
                f"'{path}' holds no complete checkpoint (looked in {path / 'checkpoints'}). Name a run directory "
                "that has written one, or a checkpoint file."
            )
        return saved[0].paths[0]
    return path


def shard_paths(path: str | Path) -> list[Path]:
    """The files of the checkpoint `path` names, in TP-rank order.

    `path` may be an unsharded file, any one shard (`step-0000100.tp0-of-2.pt`), or the unsharded name of a
    sharded checkpoint (`step-0000100.pt` when only its shards exist).
    """
    path = Path(path)
    m = _SHARD_NAME.match(path.name)
    if m:
        stem, size = m["stem"], int(m["size"])
    elif path.is_file():
        return [path]
    else:
        stem = path.name[: -len(".pt")] if path.name.endswith(".pt") else path.name
        sizes = {int(m["size"]) for p in path.parent.glob(f"{stem}.tp*-of-*.pt") if (m := _SHARD_NAME.match(p.name))}
        if not sizes:
            raise InputError(f"no checkpoint at '{path}': neither that file nor its shards ({stem}.tpN-of-M.pt) exist.")
        if len(sizes) > 1:
            raise InputError(
                f"'{path.parent}' holds shards of '{stem}' for several TP sizes {sorted(sizes)}; name one shard."
            )
        size = sizes.pop()
    paths = [path.parent / f"{stem}.tp{r}-of-{size}.pt" for r in range(size)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise InputError(
            f"checkpoint '{stem}' in '{path.parent}' is incomplete: {len(missing)} of its {size} shards are missing "
            f"({', '.join(missing)})."
        )
    return paths


def load_full_state(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path` (any of the forms `shard_paths` accepts) as one unsharded state."""
    return merge_states([load_checkpoint(p) for p in shard_paths(path)])


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One unsharded checkpoint state from the states of all TP ranks (in rank order)."""
    first = states[0]
    tp = first.get("tp", {}).get("size", 1)
    if tp == 1:
        return first
    steps = sorted({s["step"] for s in states})
    sizes = sorted({s.get("tp", {}).get("size", 1) for s in states})
    if len(steps) > 1 or len(sizes) > 1:
        raise InputError(
            f"these shards belong to different checkpoints (steps {steps}, TP sizes {sizes}): a checkpoint's "
            "shards must come from one save. Copy them again from the same run directory."
        )
    if len(states) != tp or [s["tp"]["rank"] for s in states] != list(range(tp)):
        raise InputError(f"expected the {tp} shards of one checkpoint in rank order, got {len(states)} states.")
    specs = {name: Sharding(*spec) if spec else None for name, spec in first["tp"]["sharding"].items()}

    def merged(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        spec = specs.get(name)
        # Optimizer moments have their parameter's shape; scalars (Adam's step count) are replicated.
        return merge(parts, spec) if spec is not None and parts[0].dim() > spec.dim else parts[0]

    model = {name: merged(name, [s["model"][name] for s in states]) for name in first["model"]}
    ema = first.get("ema")
    if ema is not None:
        ema = {name: merged(name, [s["ema"][name] for s in states]) for name in ema}
    optimizer = first.get("optimizer")
    if optimizer is not None:
        flat_names = [n for group in first["tp"]["param_names"] for n in group]
        state = {}
        for idx, entry in optimizer["state"].items():
            state[idx] = {
                key: merged(flat_names[idx], [s["optimizer"]["state"][idx][key] for s in states])
                if torch.is_tensor(value) else value
                for key, value in entry.items()
            }  # fmt: skip
        optimizer = {**optimizer, "state": state}
    tp_info = {**first["tp"], "rank": 0, "size": 1}
    return {**first, "model": model, "optimizer": optimizer, "tp": tp_info, **({"ema": ema} if ema else {})}


def load_model(model: torch.nn.Module, full_state: dict[str, Any], source: str, tp_rank: int, tp: int) -> None:
    """Load an unsharded state into this rank's shard of `model`, after checking that the shapes agree."""
    full = full_state["model"]
    expected = model.state_dict(keep_vars=True)
    problems = []
    missing = [n for n in expected if n not in full]
    unexpected = [n for n in full if n not in expected]
    if missing or unexpected:
        problems.append(
            f"{len(missing)} tensors missing (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:3]})"
        )
    for name, t in expected.items():
        if name in full and tuple(full[name].shape) != full_shape(t):
            problems.append(f"'{name}' is {tuple(full[name].shape)} there, {full_shape(t)} here")
    their_cfg = full_state.get("config", {}).get("model", {})
    our_cfg = model.cfg.__dict__ if hasattr(model, "cfg") else {}
    # Some shapes do not show in any tensor: n_head cuts the same (3d, d) attention weights into other heads.
    for key in ("n_layer", "n_head", "d_model", "seq_len", "bias"):
        if key in their_cfg and key in our_cfg and their_cfg[key] != our_cfg[key]:
            problems.append(f"{key} is {their_cfg[key]} there, {our_cfg[key]} here")
    if problems:
        theirs, ours = _shape_summary(their_cfg), _shape_summary(our_cfg)
        raise InputError(
            f"checkpoint '{source}' holds a model of another shape: {'; '.join(problems[:4])}. "
            f"Checkpoint model: {theirs}; this job's model: {ours}. Set the [model] keys to the checkpoint's."
        )
    model.load_state_dict(shard_state(model, full, tp_rank, tp))


def shard_state(model: torch.nn.Module, full: dict[str, torch.Tensor], tp_rank: int, tp: int) -> dict:
    """This rank's slices of an unsharded state dict shaped like `model`'s (weights or their moving average)."""
    local = {}
    for name, t in model.state_dict(keep_vars=True).items():
        spec: Sharding | None = getattr(t, "tp_shard", None)
        local[name] = shard(full[name], spec, tp_rank, tp) if spec is not None else full[name]
    return local


def _shape_summary(model_cfg: dict) -> str:
    keys = ("n_layer", "n_head", "d_model", "seq_len", "vocab_size", "bias")
    return ", ".join(f"{k}={model_cfg[k]}" for k in keys if k in model_cfg) or "unknown"


def load_optimizer(optimizer, model: torch.nn.Module, full_state: dict[str, Any], tp_rank: int, tp: int) -> None:
    """Load an unsharded optimizer state (see merge_states) into this rank's optimizer, cutting each moment like
    its parameter. Parameters are matched by name, so the order of the optimizer's groups may differ."""
    saved = full_state["optimizer"]
    names = {id(p): name for name, p in model.named_parameters()}
    ours = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    theirs = full_state.get("tp", {}).get("param_names") or ours  # files without names: same model, same order
    flat_theirs = [n for g in theirs for n in g]
    index = {name: i for i, name in enumerate(n for g in ours for n in g)}
    params = dict(model.named_parameters())
    if sorted(flat_theirs) != sorted(index):
        raise InputError(
            f"the optimizer state in the checkpoint covers {len(flat_theirs)} parameters, this model has {len(index)}; "
            "the model shapes differ."
        )
    state = {}
    for i, entry in saved["state"].items():
        name = flat_theirs[i]
        spec: Sharding | None = getattr(params[name], "tp_shard", None)
        state[index[name]] = {
            key: shard(v, spec, tp_rank, tp) if spec is not None and torch.is_tensor(v) and v.dim() > spec.dim else v
            for key, v in entry.items()
        }  # fmt: skip
    groups, start = [], 0
    for saved_group, our_names in zip(saved["param_groups"], ours):
        groups.append({**saved_group, "params": list(range(start, start + len(our_names)))})
        start += len(our_names)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------------------------------------------
# Housekeeping in a run directory
# ------------------------------------------------------------------------------------------------------------


def prune_checkpoints(run_dir: str | Path, keep: int, newest: int) -> list[int]:
    """Delete all but the `keep` newest complete checkpoints up to step `newest`, the one just written (keep = 0
    keeps all); returns the deleted steps.

    Called after a save is complete on every rank, so the newest is whole before an older one goes. Incomplete
    sets (a save killed between shards) and anything newer than `newest` are left alone.
    """
    if keep <= 0:
        return []
    removed = [saved for saved in find_checkpoints(run_dir) if saved.step <= newest][keep:]
    for saved in removed:
        for p in saved.paths:
            p.unlink(missing_ok=True)
    return [saved.step for saved in removed]


def set_aside_newer(run_dir: str | Path, step: int) -> Path | None:
    """Move the checkpoint files of steps after `step` into checkpoints/set-aside-after-NNNNNNN/.

    A run resumed from step S writes its own checkpoints after S; those an abandoned attempt left there (after a
    resume from an earlier step by choice, or a damaged newest file that was passed over) would otherwise outrank
    them in the next `--resume auto` and in pruning. They are kept, not deleted: they may be someone's evidence.
    """
    folder = Path(run_dir) / "checkpoints"
    newer = [p for saved, _ in _scan(run_dir) if saved.step > step for p in saved.paths if p.exists()]
    if not newer:
        return None
    aside = folder / f"set-aside-after-{step:07d}"
    aside.mkdir(exist_ok=True)
    for p in newer:
        os.replace(p, aside / p.name)
    return aside


def remove_stale_temporaries(run_dir: str | Path) -> None:
    """Temporary files of saves killed mid-write (`.step-*.pt.tmp-PID`): never a checkpoint, only wasted space."""
    for p in (Path(run_dir) / "checkpoints").glob(".step-*.pt.tmp-*"):
        p.unlink(missing_ok=True)
