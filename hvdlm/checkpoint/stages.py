"""Pipeline stages and checkpoints: the stages' states joined into one whole-model state, and a whole-model state
cut to one stage.

Each stage's file holds the tensors of its layers under the whole GPT's names (hvdlm.model.stage), so joining is a
union: model and EMA tensors by name, optimizer state re-indexed by name. A tied embedding/head weight is there
twice, the first stage's `tok_emb.weight` and the last stage's copy `head.weight`: bit-identical, so the whole
model's state keeps both names (as GPT.state_dict() does for its tied tensor), and the optimizer keeps the one
state the GPT has, the embedding's. Cutting is the reverse, and gives the last stage's head copy the
embedding's tensors and optimizer state. An untied head (model.tie_embeddings = false) is a tensor like any other,
on the last stage only. Both work on TP-unsharded states (hvdlm.checkpoint.reshard merges and
cuts the TP shards), so any (pp, tp) layout loads into any other.
"""

from __future__ import annotations

from typing import Any

import torch

from hvdlm.errors import InputError

EMBEDDING, HEAD = "tok_emb.weight", "head.weight"


def head_is_tied(state: dict[str, Any]) -> bool:
    """Whether a state's output head is its token embedding (its recorded model.tie_embeddings; checkpoints written
    before the key existed are GPT-2's, tied)."""
    model = (state.get("config") or {}).get("model") or {}
    return bool(model.get("tie_embeddings", True))


def stage_of(state: dict[str, Any]) -> tuple[int, int]:
    """(stage, stages) of one file's state; (0, 1) for a file without stages."""
    pp = state.get("pp") or {}
    return pp.get("rank", 0), pp.get("size", 1)


def join_stages(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One whole-model state from the TP-merged states of every stage (in stage order)."""
    first = states[0]
    stages = stage_of(first)[1]
    steps = sorted({s["step"] for s in states})
    if len(steps) > 1 or [stage_of(s) for s in states] != [(r, stages) for r in range(stages)]:
        raise InputError(
            f"these files are not the {stages} stages of one checkpoint (steps {steps}, stages "
            f"{[stage_of(s) for s in states]}): a checkpoint's shards must come from one save. Copy them again "
            "from the same run directory."
        )
    model = _union([s["model"] for s in states])
    ema = _union([s["ema"] for s in states]) if all(s.get("ema") for s in states) else None
    sharding = _union([s["tp"]["sharding"] for s in states])
    joined = {
        **first,
        "model": model,
        "tp": {**first["tp"], "rank": 0, "size": 1, "sharding": sharding},
        "pp": {"rank": 0, "size": 1, "joined_from": stages, "rng_by_stage": [s.get("rng") for s in states]},
    }
    if ema is not None:
        joined["ema"] = ema
    if first.get("optimizer") is not None:
        joined["optimizer"], joined["tp"]["param_names"] = _join_optimizers(states)
    return joined


def _union(tables: list[dict]) -> dict:
    out: dict = {}
    for table in tables:
        out.update(table)
    return out


def _join_optimizers(states: list[dict[str, Any]]) -> tuple[dict, list[list[str]]]:
    """The stages' optimizer states as one, indexed in the order of the joined parameter names; the last stage's
    head copy is left out (its state is the embedding's)."""
    groups, tied = len(states[0]["tp"]["param_names"]), head_is_tied(states[0])
    names: list[list[str]] = [[] for _ in range(groups)]
    entries: dict[str, dict] = {}
    for s in states:
        flat = [n for group in s["tp"]["param_names"] for n in group]
        for g, group in enumerate(s["tp"]["param_names"]):
            for name in group:
                if name == HEAD and tied and stage_of(s)[0] > 0:
                    continue  # the tied copy
                names[g].append(name)
                entry = s["optimizer"]["state"].get(flat.index(name))
                if entry is not None:
                    entries[name] = entry
    flat_names = [n for group in names for n in group]
    state = {i: entries[n] for i, n in enumerate(flat_names) if n in entries}
    param_groups, start = [], 0
    for saved, group in zip(states[0]["optimizer"]["param_groups"], names):
        param_groups.append({**saved, "params": list(range(start, start + len(group)))})
        start += len(group)
    return {"state": state, "param_groups": param_groups}, names


def stage_state(full: dict[str, Any], model: torch.nn.Module, stage: int, stages: int) -> dict[str, Any]:
    """The part of a whole-model state (TP-unsharded) that stage `stage` of `stages` holds, in the same format,
    so that hvdlm.checkpoint.reshard's load_model and load_optimizer load it into the stage's model."""
    ours = set(model.state_dict())
    tied_copy = HEAD in ours and EMBEDDING not in ours and model.cfg.tie_embeddings  # the last stage's head copy

    def source(name: str) -> str:
        return EMBEDDING if name == HEAD and tied_copy else name

    def cut(table: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Names the whole state lacks stay missing, for load_model to report (a model of another shape).
        return {n: table[source(n)] for n in ours if source(n) in table}

    part = {**full, "model": cut(full["model"])}
    if full.get("ema"):
        part["ema"] = cut(full["ema"])
    by_stage = (full.get("pp") or {}).get("rng_by_stage")
    if by_stage and len(by_stage) == stages:
        part["rng"] = by_stage[stage]  # this stage's dropout streams; otherwise new ones (see CheckpointManager)
    elif by_stage or stages > 1:
        part["rng"] = None
    if full.get("optimizer") is not None:
        part["optimizer"], names = _cut_optimizer(full, ours, source)
        part["tp"] = {**full.get("tp", {}), "param_names": names}
    return part


def _cut_optimizer(full: dict[str, Any], ours: set[str], source) -> tuple[dict, list[list[str]]]:
    theirs = full.get("tp", {}).get("param_names")
    if not theirs:
        raise InputError(
            "the checkpoint names no optimizer parameters, so its optimizer state cannot be cut into stages."
        )
    flat = [n for group in theirs for n in group]
    names = [[n for n in ours_in_order(group, ours, source)] for group in theirs]
    state, i = {}, 0
    for group in names:
        for n in group:
            index = flat.index(source(n))
            if index in full["optimizer"]["state"]:
                state[i] = full["optimizer"]["state"][index]
            i += 1
    param_groups, start = [], 0
    for saved, group in zip(full["optimizer"]["param_groups"], names):
        param_groups.append({**saved, "params": list(range(start, start + len(group)))})
        start += len(group)
    return {**full["optimizer"], "state": state, "param_groups": param_groups}, names


def ours_in_order(group: list[str], ours: set[str], source) -> list[str]:
    """The stage's parameter names among one optimizer group of the whole model's, in its order."""
    mine = {source(n): n for n in ours}
    return [mine[n] for n in group if n in mine]
