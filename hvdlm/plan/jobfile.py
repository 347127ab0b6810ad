"""The job file with a chosen layout, ready for `hvdlm sbatch`: the user's file with the layout's keys set.

The user's other keys stay as they were (TOML comments do not survive: the file is read into tables and written
back). The keys set are checked by hvdlm.config's own validation before anything is written.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import tomli_w

from hvdlm.config import load_config, parse_override
from hvdlm.plan.candidate import Candidate
from hvdlm.plan.layouts import Cluster


def layout_keys(layout: Candidate, cluster: Cluster, precision: str) -> dict[str, Any]:
    """The job keys that carry a layout. Without stages hvdlm's micro-batches are train.accumulation_steps; with
    stages they are parallel.microbatches and accumulation stays 1 (hvdlm.config refuses anything else)."""
    L = layout
    staged = L.pp > 1
    return {
        "parallel.tp": L.tp,
        "parallel.pp": L.pp,
        "parallel.pp_layers": "",  # the even split the plan assumed
        "parallel.microbatches": L.microbatches if staged else 1,
        "parallel.virtual_stages": L.virtual_stages,
        "train.accumulation_steps": 1 if staged else L.microbatches,
        "train.batch_size": L.micro_batch,
        "train.zero": L.zero,
        "train.precision": planned_precision(layout, precision),
        "model.recompute": L.recompute,
        "launch.np": cluster.gpus,
        "slurm.nodes": cluster.nodes,
        "slurm.gpus_per_node": cluster.gpus_per_node,
    }


def planned_precision(layout: Candidate, precision: str) -> str:
    """The plan's peaks and activation sizes are 16-bit: bf16, or the job's fp16 where hvdlm allows it (not with
    tp > 1, pp > 1 or ZeRO, whose per-rank gradient scalers would disagree)."""
    if precision == "fp16" and layout.tp == layout.pp == 1 and not layout.zero:
        return "fp16"
    return "bf16"


def job_text(job: str, overrides: Sequence[str], keys: dict[str, Any]) -> str:
    """The user's job file as TOML with the --set `overrides` and then `keys` set, validated as `hvdlm train` would."""
    load_config(job, [*overrides, *(f"{k}={json.dumps(v)}" for k, v in keys.items())])  # every command's checks
    with open(job, "rb") as f:  # load_config has read it: it exists and is TOML
        raw = tomllib.load(f)
    # In load_config's order: the overrides (parsed as every --set is), then the layout's keys, which win.
    settings = [parse_override(item) for item in overrides] + [(*k.split("."), v) for k, v in keys.items()]
    for section, name, value in settings:
        raw.setdefault(section, {})[name] = value
    return tomli_w.dumps(raw)
