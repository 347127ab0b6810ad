"""`hvdlm checkpoint inspect`: what a checkpoint holds, read from its files without building a model.

Read-only: the shards are memory-mapped (format.load_checkpoint with mmap), so a large checkpoint is described
without reading its tensors. The description is plain data (JSON for `--json`); `render` makes it text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hvdlm.checkpoint.format import load_checkpoint
from hvdlm.checkpoint.stages import head_is_tied, join_stages
from hvdlm.checkpoint.store import newest_loadable, resolve_checkpoint, run_directory, shard_paths
from hvdlm.units import format_count

_SHAPE_KEYS = ("n_layer", "n_head", "d_model", "seq_len", "vocab_size", "bias", "dropout")
# More keys where the arch is not GPT-2 (whose shape the keys above say whole).
_ARCH_KEYS = ("arch", "n_kv_head", "d_ff", "tie_embeddings", "rope_theta", "norm_eps")


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint PATH names (a file, any shard, or a run directory: its newest that reads, as a resume would
    take it) as a JSON-ready dict; "skipped" says which newer ones of a run directory were passed over, and why."""
    paths, states, skipped = _read_checkpoint(Path(path))
    slices = [q for p in paths for q in sorted(p.parent.glob(f"{p.name.removesuffix('.pt')}.zero*-of-*.pt"))]
    files = paths + slices
    first = states[0]
    config = first.get("config") if isinstance(first.get("config"), dict) else {}
    train = config.get("train", {})
    return {
        "checkpoint": str(paths[0]),
        "step": first["step"],
        "max_steps": train.get("max_steps"),
        "model": _model_keys(config.get("model", {})),
        "layout": {
            "tp": len(paths) // _stages(first),
            **({"pp": _stages(first)} if _stages(first) > 1 else {}),
            **({"zero_slices": len(slices) // len(paths)} if slices else {}),
            **({"zero_weights": True} if slices and train.get("zero") == 3 else {}),  # ZeRO-3: the slices hold them
            "files": [{"path": str(p), "bytes": p.stat().st_size} for p in files],
        },
        "parameters": _parameter_count(states),
        "bytes": {"files": sum(p.stat().st_size for p in files), **_tensor_bytes(states)},
        "holds": _holdings(states, train),
        **({"stages": _stage_counts(states)} if _stages(first) > 1 else {}),
        **({"skipped": skipped} if skipped else {}),
    }


def _model_keys(model: dict[str, Any]) -> dict[str, Any]:
    keys = _SHAPE_KEYS + (_ARCH_KEYS if model.get("arch", "gpt2") != "gpt2" else ())
    return {k: v for k, v in model.items() if k in keys}


def _read_checkpoint(path: Path) -> tuple[list[Path], list[dict], list[str]]:
    """The shard files, their memory-mapped states (a ZeRO save's slices assembled) and, for a run directory, what
    was passed over on the way to its newest checkpoint that reads."""
    run_dir = run_directory(path)
    if run_dir is None:
        paths = shard_paths(path)
        return paths, [load_checkpoint(p, mmap=True) for p in paths], []
    skipped: list[str] = []
    found = newest_loadable(
        run_dir, warn=lambda message: skipped.append(message.removeprefix("WARNING: skipping ")), mmap=True
    )
    if found is None:
        resolve_checkpoint(run_dir)  # raises: there is no complete checkpoint, and its error says where it looked
    saved, states = found
    return list(saved.paths), states, skipped


def _whole_model(states: list[dict]) -> dict:
    """The first TP rank's state of the whole model: with pipeline stages, the stages' files joined
    (hvdlm.checkpoint.stages), so that counts cover every layer and the tied weight's optimizer state once."""
    stages = _stages(states[0])
    if stages == 1:
        return states[0]
    per_stage = len(states) // stages
    return join_stages([states[k * per_stage] for k in range(stages)])


def _stage_counts(states: list[dict]) -> list[dict[str, Any]]:
    """Per pipeline stage: its layers, its weight tensors, and the parameters its optimizer state covers."""
    per_stage = len(states) // _stages(states[0])
    out = []
    for k, state in enumerate(states[::per_stage]):
        optimizer = state.get("optimizer")
        out.append(
            {
                "stage": k,
                "layers": (state.get("pp") or {}).get("layers", [None] * (k + 1))[k],
                "tensors": len(state["model"]),
                "optimizer_parameters": len(optimizer.get("state", {})) if isinstance(optimizer, dict) else None,
            }
        )
    return out


def _stages(state: dict) -> int:
    return (state.get("pp") or {}).get("size", 1)


def _parameter_count(states: list[dict]) -> int:
    """Trained parameters of the whole model: sharded tensors summed over the shards, replicated ones once; with
    pipeline stages, summed over the stages (the last stage's copy of the tied head left out)."""
    stages = _stages(states[0])
    per_stage = len(states) // stages
    tied = head_is_tied(states[0])
    return sum(
        _stage_parameter_count(states[k * per_stage : (k + 1) * per_stage], skip_head=tied and k > 0)
        for k in range(stages)
    )


def _stage_parameter_count(states: list[dict], skip_head: bool) -> int:
    first = states[0]
    tp = first.get("tp", {})
    sharding = tp.get("sharding", {})
    # The optimizer's parameter names leave out a tied weight (the head shares the token embedding).
    names = [n for group in tp.get("param_names") or [] for n in group] or [
        n for n in first["model"] if n != "head.weight" or not head_is_tied(first)
    ]
    total = 0
    for name in (n for n in names if not (skip_head and n == "head.weight")):
        parts = [s["model"][name] for s in states] if sharding.get(name) else [first["model"][name]]
        total += sum(t.numel() for t in parts)
    return total


def _tensor_bytes(states: list[dict]) -> dict[str, int]:
    """Bytes of tensors per section (model, optimizer, ema) over all shards."""
    out = {}
    for section in ("model", "optimizer", "ema"):
        out[section] = sum(_nbytes(s.get(section)) for s in states)
    return {k: v for k, v in out.items() if v}


def _nbytes(value: Any) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _holdings(states: list[dict], train: dict) -> dict[str, Any]:
    """What the checkpoint can restore beyond the weights, for the whole model; None for what it lacks."""
    first = _whole_model(states)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in first["model"].values()})
    optimizer = first.get("optimizer")
    rng = first.get("rng")
    return {
        "model": {"tensors": len(first["model"]), "dtypes": dtypes},
        "optimizer": _optimizer(optimizer, train) if isinstance(optimizer, dict) else None,
        "ema": {"decay": train.get("ema_decay")} if isinstance(first.get("ema"), dict) else None,
        "scaler": _plain(first.get("scaler")),
        "data": _plain(first.get("data")),
        # One RNG state per data-parallel rank holding this shard (so each rank's dropout stream resumes exactly).
        "rng": {"replicas": len(rng), "devices": sorted(rng[0])} if isinstance(rng, list) and rng else None,
        "progress": _plain(first.get("progress")),
    }


def _optimizer(optimizer: dict, train: dict) -> dict[str, Any]:
    state = optimizer.get("state", {})
    keys = sorted({k for entry in state.values() for k in entry})
    groups = optimizer.get("param_groups", [])
    return {"name": train.get("optimizer"), "parameters_with_state": len(state), "state": keys, "groups": len(groups)}


def _plain(value: Any) -> Any:
    """A small record as JSON-ready values: tensors become their shape (scaler states hold a few)."""
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else f"tensor{list(value.shape)}"
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def render(info: dict[str, Any]) -> str:
    """The description as aligned `key  value` lines."""
    shape = ", ".join(f"{k} {v}" for k, v in info["model"].items()) or "not recorded"
    of = f" (train.max_steps {info['max_steps']})" if info.get("max_steps") is not None else ""
    files = info["layout"]["files"]
    sizes = info["bytes"]
    lines = [
        ("checkpoint", info["checkpoint"]),
        ("step", f"{info['step']}{of}"),
        ("model", shape),
        ("parameters", f"{format_count(info['parameters'])} ({info['parameters']:,})"),
        ("layout", f"{_layout(info['layout'])}: {len(files)} file(s)"),
        *((("file", f"{Path(f['path']).name}  {f['bytes']:,} bytes")) for f in files),
        ("bytes", ", ".join(f"{k} {format_count(v)}" for k, v in sizes.items())),
        *_holding_lines(info["holds"]),
        *_stage_lines(info.get("stages", [])),
    ]
    lines = [("skipped", why) for why in info.get("skipped", [])] + lines
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in lines)


def _layout(layout: dict[str, Any]) -> str:
    text = f"tp {layout['tp']}" if layout.get("pp", 1) == 1 else f"pp {layout['pp']} x tp {layout['tp']}"
    # ZeRO: each shard's optimizer state (ZeRO-3: and weights) in one file per data-parallel rank
    # (hvdlm.checkpoint.slices).
    held = "optimizer state and weights" if layout.get("zero_weights") else "optimizer state"
    return text + (f", {held} in {layout['zero_slices']} ZeRO slices per shard" if "zero_slices" in layout else "")


def _holding_lines(holds: dict[str, Any]) -> list[tuple[str, str]]:
    model, opt, rng = holds["model"], holds["optimizer"], holds["rng"]
    lines = [("weights", f"{model['tensors']} tensors ({', '.join(model['dtypes'])})")]
    lines.append(
        (
            "optimizer",
            f"{opt['name'] or '?'}: state ({', '.join(opt['state']) or 'none'}) for "
            f"{opt['parameters_with_state']} parameters in {opt['groups']} group(s)",
        )
        if opt
        else ("optimizer", "none (weights only: training restarts its optimizer)")
    )
    lines.append(("ema", f"yes (decay {holds['ema']['decay']})" if holds["ema"] else "none"))
    lines.append(("scaler", _record(holds["scaler"])))
    lines.append(("data", _record(holds["data"])))
    rng_text = f"{rng['replicas']} data-parallel rank(s) ({', '.join(rng['devices'])})" if rng else "none"
    lines.append(("rng", rng_text))
    lines.append(("progress", _record(holds["progress"])))
    return lines


def _stage_lines(stages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    lines = []
    for s in stages:
        state = f", optimizer state for {s['optimizer_parameters']}" if s["optimizer_parameters"] is not None else ""
        lines.append((f"stage {s['stage']}", f"{s['layers']} layer(s): {s['tensors']} weight tensors{state}"))
    return lines


def _record(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_short(v)}" for k, v in value.items())
    return str(value)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"  # a count; a seed or an epoch reads better plain
    return str(value)
