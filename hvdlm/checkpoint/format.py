"""The checkpoint file: what one rank's file holds, written atomically and read as data only.

With tensor parallelism each TP rank writes its own shard, `step-0000100.tp1-of-2.pt`; without, one file,
`step-0000100.pt`. A file holds:

    model       the rank's state_dict (its shards, plus the replicated tensors)
    optimizer   the rank's optimizer state_dict
    step, config
    tp          {"rank", "size", "sharding": {name: [dim, full, chunks] or None}, "param_names": [[...], ...]};
                unequal blocks (q, k, v with grouped-query attention) add [..., multiple, parts] (Sharding.recorded)
    ema         the moving average of the weights, sharded like model (when enabled)
    scaler      the fp16 gradient scaler's state (when enabled)
    data        the sampler's position (the same on every rank; a blend's names its datasets and shares)
    rng         the RNG states of the DP group's ranks holding this shard, by DP rank (dropout streams)
    progress    what the loop needs from before a restart (first and last validation loss, skipped steps in a row)
    zero_slices with ZeRO (1, 2 or 3), in place of optimizer: {"size": Z, "files": [the DP ranks' slice files]}
                (hvdlm.checkpoint.slices; load_checkpoint assembles them into optimizer, and with ZeRO-3 the
                parameters of model, which the slices hold)

Every value is a tensor, a number, a string or a container of them, so `torch.load(weights_only=True)` reads it:
a checkpoint file is data and never runs code. `sharding` says how each tensor was cut (see
hvdlm.parallel.layers.Sharding), so shards can be merged without building the model; `param_names` names the
optimizer's parameters (per group, in order), so its state merges the same way (hvdlm.checkpoint.reshard).
"""

from __future__ import annotations

import errno
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from hvdlm.checkpoint.manifest import HashingWriter, check_files
from hvdlm.checkpoint.slices import assemble, assemble_weights
from hvdlm.errors import InputError
from hvdlm.fsutil import atomic_writer
from hvdlm.parallel.layers import Sharding, merge


def save_checkpoint(
    path: Path, state: dict[str, Any], digests: dict[str, dict] | None = None, publish: bool = True
) -> Path:
    """Write one rank's checkpoint file atomically (hvdlm.fsutil): a crash mid-save leaves the old one or none.
    With `digests`, the file's size and digest are recorded there under its name, for the save's manifest. With
    publish=False the file stays under its temporary name until hvdlm.fsutil.publish(path) (an async save)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_writer(path, publish) as f:
            hashing = HashingWriter(f)  # hashed as it streams out: the manifest costs no second read
            torch.save(state, hashing)
        if digests is not None:
            digests[path.name] = hashing.entry()
    except RuntimeError as e:
        # torch's zip writer reports a failed write (a full disk, a quota) as a RuntimeError without the cause: ask
        # the file system, so that callers see the OSError a plain write would have raised.
        raise _write_error(path) from e
    return path


def _write_error(path: Path) -> OSError:
    stats = os.statvfs(path.parent)
    if stats.f_bavail * stats.f_frsize < 1 << 20:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if not os.access(path.parent, os.W_OK):
        return OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return OSError(errno.EIO, "the write failed", str(path))


def load_checkpoint(path: Path, mmap: bool = False, verify: bool = True) -> dict[str, Any]:
    """One rank's file, checked (against its save's checksum manifest when it has one; `verify=False`: checked
    already, by `check_loadable`); `mmap` maps the tensors instead of reading them (inspecting a large file),
    unverified.

    A ZeRO shard's optimizer state comes back whole, assembled from its DP ranks' slice files (named in the file),
    so that every reader sees the layout of a plain optimizer's state."""
    verify = verify and not mmap  # mmap: a description (inspect) that reads only what it shows
    if verify:
        check_files([path])
    state = _read(path, mmap)
    _check_structure(state, path)
    sliced = state.pop("zero_slices", None)
    if sliced is not None:
        slices = [_read(p, mmap) for p in slice_files(path, sliced, verify)]
        state["optimizer"] = assemble(slices, str(path))
        if "weights" in slices[0]:  # ZeRO-3: the slices hold the weights too
            state["model"].update(_unpadded(assemble_weights(slices), state))
    return state


def load_own_files(
    path: Path, dp_rank: int, dp: int, verify: bool = True
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One shard file as it was written (its tensors this very shard's: a TP rank's padded slices, a ZeRO-3 file
    without its parameters) and, where a ZeRO save has `dp` slices, the one of DP rank `dp_rank`: what a rank of
    the layout that saved needs, and no other rank's files (hvdlm.training.resume)."""
    if verify:
        check_files([path])
    state = _read(path, mmap=False)
    _check_structure(state, path)
    sliced = state.pop("zero_slices", None)
    if sliced is None or sliced.get("size") != dp:
        return state, None
    own = slice_files(path, sliced, verify=False)[dp_rank]
    if verify:
        check_files([own])
    return state, _read(own, mmap=False)


def check_loadable(paths: list[Path]) -> None:
    """Refuse, as `load_checkpoint` would, a save whose shard files (with their slice files) do not load, without
    holding their tensors: each file checked against the save's manifest, then opened mapped."""
    check_files(paths)
    for path in paths:
        state = _read(path, mmap=True)
        _check_structure(state, path)
        if state.get("zero_slices") is not None:
            for p in slice_files(path, state["zero_slices"], verify=True):
                _read(p, mmap=True)


def slice_files(path: Path, sliced: dict[str, Any], verify: bool) -> list[Path]:
    """The slice files a ZeRO shard file names, every one there (and checked against the manifest with `verify`)."""
    files = [path.parent / name for name in sliced["files"]]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise InputError(
            f"checkpoint '{path}' is incomplete: {len(missing)} of the {len(files)} files holding its optimizer "
            f"state are missing ({', '.join(missing)}). Copy them from the same run directory."
        )
    if verify:
        check_files(files)
    return files


def _unpadded(weights: dict[str, torch.Tensor], state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Weights as the file's other tensors are: a one-file save (tp = 1) holds the vocabulary's real rows, not the
    rows the slices keep padded for fast kernels (the save cut the rest of its state likewise)."""
    if state.get("tp", {}).get("size", 1) != 1:
        return weights
    specs = state.get("tp", {}).get("sharding", {})
    return {name: merge([t], Sharding(*specs[name])) if specs.get(name) else t for name, t in weights.items()}


def _read(path: Path, mmap: bool) -> Any:
    # weights_only: a checkpoint file is data and never runs code.
    try:
        # Only torch's zip format maps; a file in another (an older torch's, or not torch's) is read as before.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler raises many kinds on damaged or foreign bytes
        size = path.stat().st_size if path.is_file() else 0
        reason = whole_sentences(str(e))
        if "weights_only" in reason:  # torch's advice to load with weights_only=False, which hvdlm never does
            reason = "it is not a torch file of tensors and plain values only"
        raise InputError(
            f"cannot read checkpoint '{path}' ({size:,} bytes): it is truncated, damaged or not a checkpoint "
            f"({type(e).__name__}: {reason}). Copy it again, or name another step's checkpoint."
        ) from None


def whole_sentences(text: str, limit: int = 200) -> str:
    """The leading sentences of a message's first line, as many as fit in `limit` characters and never cut inside
    one (torch's messages run on with advice of their own); a first sentence longer than that ends at a word, with
    "...". The last full stop is left to the sentence that quotes it."""
    sentences = re.split(r"(?<=\.)\s+", (text.strip().splitlines() or [""])[0])
    kept = sentences[0]
    for sentence in sentences[1:]:
        if len(kept) + 1 + len(sentence) > limit:
            break
        kept += " " + sentence
    if len(kept) > limit:
        kept = kept[:limit].rsplit(" ", 1)[0] + " ..."
    return kept.removesuffix(".")


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


def training_state(
    model: torch.nn.Module, optimizer, step: int, config: dict, tp_rank: int, tp: int, **extra: Any
) -> dict:
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
            "rank": tp_rank,
            "size": tp,
            "sharding": sharding_of(model),
            "param_names": [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups],
        },
    }


def sharding_of(model: torch.nn.Module) -> dict[str, list | None]:
    """How each state_dict entry is split, as plain lists (checkpoints load with weights_only)."""
    out: dict[str, list | None] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        spec: Sharding | None = getattr(t, "tp_shard", None)
        out[name] = None if spec is None else spec.recorded()
    return out
