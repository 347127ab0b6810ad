"""ZeRO checkpoints: each DP rank's slice of the optimizer state in a file of its own, and the whole state put
back together from the slices.

A ZeRO run (hvdlm.optim.zero) never holds the whole optimizer state on one rank, so neither does its save: beside
each (stage, TP rank) shard file, every DP rank d of Z writes `step-0000100[.ppS-of-P][.tpR-of-T].zeroD-of-Z.pt`
(hvdlm.checkpoint.store.slice_name) holding

    state         {key: its S elements of the flat buffer} for each moment (exp_avg, exp_avg_sq, momentum_buffer)
    scalars       the per-parameter entries that are not sliced (AdamW's step count: the same for every parameter)
    param_groups  the groups' settings (lr, betas, ...) and their parameter indices
    layout        {"numels", "shapes" (the shard's parameters in flat order: optimizer index order),
                   "shard_numel" (S), "padding", "dp_rank", "dp_size",
                   "buckets" ([its parameters' indices, padded size] of each bucket, in flat order; absent in
                   older files: one bucket of every parameter in index order)}
    step          the save's step

    weights       ZeRO-3 only: {"parts": [its part of each bucket's weights, in flat order], "names": [the
                  state_dict names of each parameter, in optimizer index order (a tied weight has two)]}

and the shard file records `zero_slices` {"size": Z, "files": [names]} in place of its `optimizer` (with ZeRO-3
its `model` leaves out the parameters the slices hold: no rank ever gathers the whole weights to save them).
The flat buffer is cut into buckets of parameters, each padded to a multiple of Z (ZeRO-1: one bucket, the
parameters in index order; ZeRO-2: many, in the order backward completes them, see hvdlm.optim.zero2); a rank's
slice is its part of every bucket, concatenated:

    bucket b   [ params ...... | pad ]  = Z parts of S_b elements; slice of rank d = [part d of bucket 0 | ... ]

`assemble` puts each bucket back together from the slices' parts in DP-rank order and cuts the flat buffer back
into one entry per parameter:
exactly the state a plain optimizer's state_dict holds, so everything that reads a checkpoint (merging, resuming at
any DP size or without ZeRO) sees the layout it always did. Torch only (no Horovod): read on login nodes too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from hvdlm.errors import InputError


def own_copies(entry: dict, skip: list[str] | tuple[()] = ()) -> dict:
    """An entry's values but `skip`, tensors copied: AdamW's step count is the same for every parameter, but
    each must have its own tensor (the optimizer adds 1 to it in place, once per tensor it updates)."""
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in entry.items() if k not in skip}


def assemble(slices: list[dict[str, Any]], source: str = "") -> dict[str, Any]:
    """The whole optimizer state (a plain optimizer's state_dict) from every DP rank's slice, in DP-rank order."""
    layout = slices[0]["layout"]
    size = layout["dp_size"]
    if [s["layout"]["dp_rank"] for s in slices] != list(range(size)) or any(
        s["layout"]["dp_size"] != size or s["layout"]["shard_numel"] != layout["shard_numel"] for s in slices
    ):
        raise InputError(
            f"the optimizer slices of '{source}' are not the {size} DP ranks of one save: copy the checkpoint's "
            "files again from the same run directory."
        )
    # A rank whose slice is all padding holds no moments: the others say which there are.
    keys = sorted({k for s in slices for k in s["state"]})
    scalars = next((s["scalars"] for s in slices if s["state"]), {})
    state: dict[int, dict] = {}
    if keys:
        zeros = torch.zeros(layout["shard_numel"])
        per_key = {key: dict(_cut(layout, [s["state"].get(key, zeros) for s in slices])) for key in keys}
        for i in sorted(per_key[keys[0]]):
            state[i] = {**own_copies(scalars), **{key: per_key[key][i] for key in keys}}
    return {"state": state, "param_groups": slices[0]["param_groups"]}


def assemble_weights(slices: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """ZeRO-3: the whole weights, by state_dict name, from every DP rank's parts (slices checked by `assemble`)."""
    names = slices[0]["weights"]["names"]
    parts = [torch.cat(s["weights"]["parts"]) for s in slices]
    return {name: tensor for i, tensor in _cut(slices[0]["layout"], parts) for name in names[i]}


def _cut(layout: dict[str, Any], parts: list[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
    """Each parameter's entry (its index and a tensor of its shape) of the flat buffer the DP ranks' slices make."""
    numels, shapes = layout["numels"], layout["shapes"]
    buckets = layout.get("buckets") or [[list(range(len(numels))), layout["shard_numel"] * layout["dp_size"]]]
    flat, offset = _whole(parts, buckets), 0
    for ids, padded in buckets:
        start = offset
        for i in ids:
            yield i, flat[offset : offset + numels[i]].view(shapes[i]).clone()
            offset += numels[i]
        offset = start + padded  # past the bucket's padding


def _whole(parts: list[torch.Tensor], buckets: list[list[int]]) -> torch.Tensor:
    """The flat buffer (padding included) from the DP ranks' slices: each bucket is its parts in DP-rank order."""
    pieces, at = [], 0
    for _, padded in buckets:
        part = padded // len(parts)
        pieces += [t[at : at + part] for t in parts]
        at += part
    return torch.cat(pieces)
