"""Merging TP shards (and pipeline stages) into one unsharded state, and cutting an unsharded state to any TP size.

`merge_states` makes one unsharded state of a checkpoint's shards; `load_model` and `load_optimizer` cut a full
state to the loading model's TP size, so a checkpoint written with any TP size loads into any other. Pipeline
stages are joined and cut by hvdlm.checkpoint.stages, on TP-merged states.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hvdlm.checkpoint.format import load_checkpoint
from hvdlm.checkpoint.stages import join_stages, stage_of
from hvdlm.checkpoint.store import shard_paths
from hvdlm.config import MODEL_SHAPE_KEYS, model_shape
from hvdlm.errors import InputError
from hvdlm.parallel.layers import Sharding, full_shape, merge, shard


def load_full_state(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The checkpoint at `path` (any of the forms `shard_paths` accepts) as one unsharded state (`verify=False`:
    its files were checked against their manifest already)."""
    return merge_states([load_checkpoint(p, verify=verify) for p in shard_paths(path)])


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One unsharded checkpoint state from the states of all its files (in (stage, TP rank) order)."""
    stages = stage_of(states[0])[1]
    if stages == 1:
        return merge_tp(states)
    if len(states) % stages:
        raise InputError(f"expected the files of {stages} pipeline stages, got {len(states)}.")
    per_stage = len(states) // stages
    return join_stages([merge_tp(states[s * per_stage : (s + 1) * per_stage]) for s in range(stages)])


def merge_tp(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One unsharded state from the states of all TP ranks (in rank order) of one stage."""
    first = states[0]
    tp = first.get("tp", {}).get("size", 1)
    if tp == 1 and not _padded(first):
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
                if torch.is_tensor(value)
                else value
                for key, value in entry.items()
            }
        optimizer = {**optimizer, "state": state}
    tp_info = {**first["tp"], "rank": 0, "size": 1}
    return {**first, "model": model, "optimizer": optimizer, "tp": tp_info, **({"ema": ema} if ema else {})}


def _padded(state: dict[str, Any]) -> bool:
    """Whether a tensor of the state holds padding beyond its full size (the vocabulary's rows, at any tp)."""
    specs = state.get("tp", {}).get("sharding", {})
    model = state["model"]
    return any(spec and name in model and model[name].shape[spec[0]] != spec[1] for name, spec in specs.items())


def load_model(
    model: torch.nn.Module,
    full_state: dict[str, Any],
    source: str,
    tp_rank: int,
    tp: int,
    local: bool = False,
    held: frozenset[str] = frozenset(),
) -> None:
    """Load an unsharded state into this rank's shard of `model`, after checking that the shapes agree. `local`:
    the state is this TP rank's own shard file (padded slices, loaded as they are); `held`: the parameters that
    state leaves to the optimizer's slice (ZeRO-3's own files), left as they are here."""
    check_model_shape(model, full_state, source, local, held)
    model.load_state_dict(shard_state(model, full_state["model"], tp_rank, tp, local, held), strict=not held)


def check_model_shape(
    model: torch.nn.Module,
    full_state: dict[str, Any],
    source: str,
    local: bool = False,
    held: frozenset[str] = frozenset(),
) -> None:
    """Refuse a state whose model is of another shape than `model` (one InputError naming the differences)."""
    problems = _shape_problems(model, full_state, local, held)
    if problems:
        theirs = _shape_summary(full_state.get("config", {}).get("model", {}))
        ours = _shape_summary(model.cfg.__dict__ if hasattr(model, "cfg") else {})
        raise InputError(
            f"checkpoint '{source}' holds a model of another shape: {'; '.join(problems)}. "
            f"Checkpoint model: {theirs}; this job's model: {ours}. Set the [model] keys to the checkpoint's."
        )


def _shape_problems(
    model: torch.nn.Module, full_state: dict[str, Any], local: bool = False, held: frozenset[str] = frozenset()
) -> list[str]:
    """What differs between the checkpoint's model and `model`: the recorded shape keys first (they say why), then
    the tensors, four differences in all unless more keys differ."""
    full = full_state["model"]
    expected = model.state_dict(keep_vars=True)
    tensors = []
    missing = [n for n in expected if n not in full and n not in held]
    unexpected = [n for n in full if n not in expected]
    if missing or unexpected:
        tensors.append(
            f"{len(missing)} tensors missing (first: {missing[:3]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:3]})"
        )
    for name, t in expected.items():
        ours = tuple(t.shape) if local else full_shape(t)
        if name in full and tuple(full[name].shape) != ours:
            tensors.append(f"'{name}' is {tuple(full[name].shape)} there, {ours} here")
    their_cfg = full_state.get("config", {}).get("model", {})
    our_cfg = model.cfg.__dict__ if hasattr(model, "cfg") else {}
    # Some shapes do not show in any tensor: n_head cuts the same (3d, d) attention weights into other heads, and
    # a llama of GPT-2's tensor shapes computes another function. Compared resolved (0 key/value heads = n_head),
    # a checkpoint written before a key existed taking its default (gpt2, a tied head).
    keys = []
    if their_cfg and our_cfg:
        theirs, ours = model_shape(their_cfg), model_shape(our_cfg)
        keys = [f"{k} is {theirs[k]} there, {ours[k]} here" for k in MODEL_SHAPE_KEYS if theirs[k] != ours[k]]
    return keys + tensors[: max(0, 4 - len(keys))]


def shard_state(
    model: torch.nn.Module,
    full: dict[str, torch.Tensor],
    tp_rank: int,
    tp: int,
    local: bool = False,
    held: frozenset[str] = frozenset(),
) -> dict:
    """This rank's slices of an unsharded state dict shaped like `model`'s (weights or their moving average);
    `local`: `full` is this rank's own already, `held`: names it leaves out (see `load_model`)."""
    mine = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name in held:
            continue
        spec: Sharding | None = None if local else getattr(t, "tp_shard", None)
        mine[name] = shard(full[name], spec, tp_rank, tp) if spec is not None else full[name]
    return mine


def _shape_summary(model_cfg: dict) -> str:
    if not model_cfg:
        return "unknown"
    shape = {**model_shape(model_cfg), "vocab_size": model_cfg.get("vocab_size")}
    keys = ["n_layer", "n_head", "d_model", "seq_len", "vocab_size", "bias"]
    if shape["arch"] != "gpt2":  # GPT-2's are the keys above; the others' shapes have more
        keys = ["arch", *keys, "n_kv_head", "d_ff", "tie_embeddings"]
    return ", ".join(f"{k}={shape[k]}" for k in keys if shape[k] is not None)


def load_optimizer(
    optimizer, model: torch.nn.Module, full_state: dict[str, Any], tp_rank: int, tp: int, local: bool = False
) -> None:
    """Load an unsharded optimizer state (see merge_states) into this rank's optimizer, cutting each moment like
    its parameter (`local`: a state of this TP rank's own file, loaded as it is). Parameters are matched by name,
    so the order of the optimizer's groups may differ."""
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
        spec: Sharding | None = None if local else getattr(params[name], "tp_shard", None)
        state[index[name]] = {
            key: shard(v, spec, tp_rank, tp) if spec is not None and torch.is_tensor(v) and v.dim() > spec.dim else v
            for key, v in entry.items()
        }
    groups, start = [], 0
    for saved_group, our_names in zip(saved["param_groups"], ours):
        groups.append({**saved_group, "params": list(range(start, start + len(our_names)))})
        start += len(our_names)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
